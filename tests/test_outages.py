"""Outages, for real: stop the store under traffic, then bring it back.

Each test breaks a real thing — a private ``redis-server`` with AOF
persistence, a private PostgreSQL cluster made with ``initdb``, a SQLite
file locked by another writer or made unwritable — while requests and
management writes flow, and checks what clients saw and what the store kept:

* no request is let through that should not be;
* clients get 503 with ``Retry-After`` (never a 500, never a hang beyond the
  store's timeout);
* service comes back without restarting the app once the store is back;
* no key that was created is lost, and a management write that failed is
  reported as failed and not half-applied.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from keyguard import KeyGuard, management_app, open_store
from tests.backends.servers import in_ci

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TOKEN = "outage-admin-token-0123456789-abc"
TIMEOUT = 1.0  # the store's bound on every call
BOUND = TIMEOUT * 6  # generous: what a client may wait, at worst, for its answer


def need(tool: str) -> str:
    """The path of ``tool``, or skip (fail in CI) if it is not installed."""
    path = shutil.which(tool)
    if path is None:
        if in_ci():
            pytest.fail(f"CI=true and {tool} is not installed")
        pytest.skip(f"{tool} not installed")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


@dataclass
class Issued:
    internal_id: str
    internal_secret: str
    external_id: str


async def setup_keys(c: httpx.AsyncClient) -> Issued:
    assert (await c.put("/admin/apis/orders", json={"exposed": True})).status_code == 200
    internal = (
        await c.post("/admin/apis/orders/keys", json={"name": "Staff", "kind": "internal"})
    ).json()
    external = (
        await c.post("/admin/apis/orders/keys", json={"name": "Acme", "kind": "external"})
    ).json()
    return Issued(internal["client_id"], internal["secret"], external["client_id"])


def requests_for(keys: Issued) -> dict[str, dict[str, str]]:
    """Valid and invalid credentials: only the first two may ever get a 200."""
    return {
        "internal": {
            "X-IBM-Client-Id": keys.internal_id,
            "X-IBM-Client-Secret": keys.internal_secret,
        },
        "external": {"X-IBM-Client-Id": keys.external_id},
        "wrong secret": {"X-IBM-Client-Id": keys.internal_id, "X-IBM-Client-Secret": "wrong"},
        "unknown id": {"X-IBM-Client-Id": "0" * 32},
        "no id": {},
    }


async def get(
    c: httpx.AsyncClient, path: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    with anyio.fail_after(BOUND):
        return await c.get(path, headers=headers or {})


def check_refused_cleanly(r: httpx.Response, during_outage: bool) -> None:
    """A refusal: never a 500; during an outage either the IBM 503 with Retry-After or (a
    read that still works, e.g. SQLite readers under a lock) the normal 401."""
    assert r.status_code != 500
    if r.status_code == 503:
        assert int(r.headers["retry-after"]) > 0
        assert r.json()["moreInformation"] == "Key store unavailable."
    else:
        assert r.status_code == 401, (r.status_code, r.text)
        assert not during_outage or r.json()["httpCode"] == "401"


async def exercise(
    url: str,
    break_store: Callable[[], None],
    repair_store: Callable[[], None],
    *,
    reads_may_survive: bool = False,
    **options: object,
) -> None:
    """Run traffic and management writes across an outage of the store at ``url``."""
    store = open_store(url, timeout=TIMEOUT, **options)  # type: ignore[arg-type]
    app = Starlette(
        routes=[Route("/hello", hello), Mount("/admin", management_app(store, token=TOKEN))]
    )
    app.add_middleware(KeyGuard, store=store, api="orders", exclude_paths=["/admin/*"])
    transport = httpx.ASGITransport(app=app)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=auth) as c:
            keys = await setup_keys(c)
            cases = requests_for(keys)
            for name, headers in cases.items():
                r = await get(c, "/hello", headers)
                assert r.status_code == (200 if name in ("internal", "external") else 401), name

            break_store()
            # A cache may answer from its snapshot for at most its TTL: past it, fail closed.
            await anyio.sleep(float(str(options.get("cache_ttl") or 0)) * 1.2)
            statuses: set[int] = set()
            for _ in range(3):
                for name, headers in cases.items():
                    r = await get(c, "/hello", headers)
                    statuses.add(r.status_code)
                    if r.status_code == 200:
                        assert reads_may_survive, name
                        assert name in ("internal", "external"), name
                    else:
                        check_refused_cleanly(r, during_outage=True)
            if not reads_may_survive:
                assert statuses == {503}
            with anyio.fail_after(BOUND):
                failed = await c.post(
                    "/admin/apis/orders/keys", json={"name": "During", "kind": "internal"}
                )
            assert failed.status_code == 503, failed.text
            assert failed.json()["code"] == "store_unavailable"
            assert int(failed.headers["retry-after"]) > 0
            assert "secret" not in failed.json()

            repair_store()
            deadline = time.monotonic() + 30
            while (await get(c, "/hello", cases["internal"])).status_code != 200:
                assert time.monotonic() < deadline, "the store did not come back"
                await anyio.sleep(0.2)
            for name, headers in cases.items():
                r = await get(c, "/hello", headers)
                assert r.status_code == (200 if name in ("internal", "external") else 401), name
            listed = (await c.get("/admin/apis/orders/keys")).json()["keys"]
            assert sorted(k["name"] for k in listed) == [
                "Acme",
                "Staff",
            ]  # nothing lost, nothing half-made
            api = (await c.get("/admin/apis/orders")).json()
            assert api["keys"] == {"internal": 1, "external": 1}
            again = await c.post(
                "/admin/apis/orders/keys", json={"name": "During", "kind": "internal"}
            )
            assert again.status_code == 201
    finally:
        with anyio.fail_after(BOUND):
            await store.aclose()


# -- Redis ------------------------------------------------------------------------------------


@contextlib.contextmanager
def private_redis(tmp_path: Path) -> Iterator[tuple[int, Callable[[], None], Callable[[], None]]]:
    """A redis-server with AOF (fsync always) in ``tmp_path``: stop() kills it, start() restarts
    it on the same port and folder."""
    binary = need("redis-server")
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        procs.append(
            subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(tmp_path),
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--save",
                    "",
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        wait_for_port(port)

    def stop() -> None:
        procs[-1].send_signal(signal.SIGKILL)  # a crash, not a polite shutdown
        procs[-1].wait(10)

    start()
    try:
        yield port, stop, start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.mark.parametrize("cache_ttl", [0, 0.5])
async def test_redis_killed_and_restarted(tmp_path: Path, cache_ttl: float) -> None:
    """Redis killed mid-traffic: 503s, no 500s, nothing let through, nothing lost (AOF), the
    failed write not applied; service resumes once Redis is back — with and without the cache."""
    with private_redis(tmp_path) as (port, stop, start):
        await exercise(f"redis://127.0.0.1:{port}/0", stop, start, cache_ttl=cache_ttl)


# -- PostgreSQL -------------------------------------------------------------------------------


def _pg_bindir() -> Path:
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = Path(
            subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
        if (found / "initdb").exists():
            return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    if in_ci():
        pytest.fail("CI=true and PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
    pytest.skip("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")


@contextlib.contextmanager
def private_postgres() -> Iterator[tuple[int, Callable[[], None], Callable[[], None]]]:
    """A PostgreSQL cluster of its own (initdb in a temporary folder, trust auth); stop() and
    start() use pg_ctl. As root, the server runs as the postgres user."""
    bindir = _pg_bindir()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="keyguard-pg-"))
    data = folder / "data"
    if as_postgres:
        shutil.chown(folder, "postgres", "postgres")
    port = free_port()

    def pg(*args: str) -> None:
        subprocess.run([*as_postgres, *args], check=True, capture_output=True, timeout=120)

    pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=on"

    def start() -> None:
        pg(
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(folder / "log"),
            "-w",
            "start",
        )

    def stop() -> None:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")

    start()
    try:
        yield port, stop, start
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            stop()
        shutil.rmtree(folder, ignore_errors=True)


async def test_postgres_stopped_and_restarted() -> None:
    """A private PostgreSQL stopped mid-traffic (immediate mode, like a crash): 503s, no 500s,
    nothing let through, committed keys kept, the failed write not applied; service resumes."""
    with private_postgres() as (port, stop, start):
        await exercise(f"postgresql://postgres@127.0.0.1:{port}/postgres", stop, start, cache_ttl=0)


# -- SQLite -----------------------------------------------------------------------------------


async def test_sqlite_locked_by_another_writer(tmp_path: Path) -> None:
    """Another process holds SQLite's write lock: reads still answer (WAL), a management write
    fails with 503 within the timeout and leaves nothing behind; it works once the lock goes."""
    path = tmp_path / "keys.db"
    holder: list[sqlite3.Connection] = []

    def lock() -> None:
        conn = sqlite3.connect(path, isolation_level=None, timeout=0)
        conn.execute("BEGIN EXCLUSIVE")
        holder.append(conn)

    def unlock() -> None:
        holder.pop().execute("ROLLBACK")

    await exercise(f"sqlite:///{path}", lock, unlock, reads_may_survive=True, cache_ttl=0)


def _chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


async def test_sqlite_file_not_writable(tmp_path: Path) -> None:
    """The database file (and its WAL) become unwritable, even for root (chattr +i): a write
    fails cleanly with 503 and is not half-applied; writes work again once it is writable."""
    need("chattr")
    path = tmp_path / "keys.db"
    files: list[Path] = []

    def freeze() -> None:
        files[:] = [p for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]
        try:
            _chattr("+i", *files)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"chattr +i unsupported here: {exc.stderr!r}")

    def thaw() -> None:
        _chattr("-i", *files)

    try:
        await exercise(f"sqlite:///{path}", freeze, thaw, reads_may_survive=True, cache_ttl=0)
    finally:
        with contextlib.suppress(Exception):
            thaw()
