"""The SQL store's engine handling, against real servers broken on purpose: the whole-call
timeout on a frozen PostgreSQL, one engine per event loop, SQLite under writers from
several processes, and libpq's TLS parameters on a PostgreSQL with TLS on (issue 13).

PostgreSQL here is a private cluster (``initdb`` in a temporary folder, TLS on with a
throwaway CA made with the ``openssl`` command), since these tests freeze it and count
its connections; the shared servers are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import asyncpg
import httpx
import pytest
from sqlalchemy import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from keyguard import KeyGuard, open_store
from keyguard.errors import ConfigurationError, StoreUnavailable
from keyguard.models import KeyKind
from keyguard.stores.sql import SQLStore
from tests.backends.servers import require_server
from tests.helpers import expose, record
from tests.test_outages import _pg_bindir, free_port, need

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TIMEOUT = 1.0  # the store's bound on each call in the frozen-server tests
# A hang guard, not a speed test: past the store's own deadline a call has only its
# cleanup left, which must not wait on the frozen server (the old code took 2-4 times
# ``timeout``: a driver timeout, then a rollback and a close waiting for their own).
CALL_BOUND = TIMEOUT * 1.5
BOUND = 60  # seconds: only there so that a hang fails instead of blocking the run
POOL_SIZE = 2
PASSWORD = "pw-Sh0uld-n3ver-sh0w"


# -- a private PostgreSQL cluster with TLS -------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> None:
    """A self-signed CA, ``name.crt`` and ``name.key`` in ``folder``."""
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN=keyguard test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip


def _make_cert(folder: Path, name: str, *, cn: str, ca: str, usage: str) -> None:
    """A certificate ``name.crt`` (key ``name.key``) for ``cn``, signed by ``ca``."""
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
        "-out", f"{name}.csr", "-subj", f"/CN={cn}",
        cwd=folder,
    )  # fmt: skip
    (folder / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
    )
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
        cwd=folder,
    )  # fmt: skip


@dataclass
class PrivatePostgres:
    port: int
    certs: Path
    data: Path

    def url(self, user: str = "postgres", **query: str) -> str:
        """This cluster's URL for ``user`` (with a password trust auth ignores), and
        ``query`` as URL parameters."""
        url = f"postgresql://{user}:{PASSWORD}@127.0.0.1:{self.port}/postgres"
        if query:
            url += "?" + "&".join(f"{k}={quote(v, safe='/')}" for k, v in query.items())
        return url

    def _pids(self) -> list[int]:
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(postmaster)], capture_output=True, text=True
        ).stdout.split()
        return [postmaster, *map(int, children)]

    def _signal(self, sig: signal.Signals) -> None:
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The server and every backend stopped (SIGSTOP): connections are accepted by the
        kernel, and nothing ever answers; thawed on the way out."""
        self._signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._signal(signal.SIGCONT)

    async def count_connections(self, application_name: str) -> int:
        """How many connections named ``application_name`` the server has, asked on a
        connection of its own."""
        conn = await asyncpg.connect(
            host="127.0.0.1", port=self.port, user="postgres", database="postgres", ssl=False
        )
        try:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                application_name,
            )
        finally:
            await conn.close()
        return count

    async def connections_left(self, application_name: str) -> int:
        """``count_connections`` once it reaches 0, or after 10 s: a backend leaves
        pg_stat_activity a moment after its client said goodbye."""
        for _ in range(200):
            if not (count := await self.count_connections(application_name)):
                break
            await asyncio.sleep(0.05)
        return count


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this module's own: TLS on (a server certificate from a
    throwaway CA), trust auth, and a role ``certuser`` that must log in with a client
    certificate."""
    need("openssl")
    bindir = _pg_bindir()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="keyguard-pg-tls-"))
    data, certs = folder / "data", folder / "certs"
    certs.mkdir()
    _make_ca(certs, "ca")
    _make_ca(certs, "other-ca")
    _make_cert(certs, "server", cn="localhost", ca="ca", usage="serverAuth")
    _make_cert(certs, "client", cn="certuser", ca="ca", usage="clientAuth")
    for key in certs.glob("*.key"):
        key.chmod(0o600)
    if as_postgres:
        for path in (folder, certs, *certs.iterdir()):
            shutil.chown(path, "postgres", "postgres")
    port = free_port()

    def pg(*args: str) -> None:
        subprocess.run([*as_postgres, *args], check=True, capture_output=True, timeout=120)

    pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
    hba = data / "pg_hba.conf"
    hba.write_text("hostssl all certuser 127.0.0.1/32 cert\n" + hba.read_text())
    options = (
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c ssl=on "
        f"-c ssl_cert_file={certs / 'server.crt'} -c ssl_key_file={certs / 'server.key'} "
        f"-c ssl_ca_file={certs / 'ca.crt'} -c max_connections=60"
    )
    start = [str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log")]
    pg(*start, "-w", "start")
    server = PrivatePostgres(port, certs, data)
    try:

        async def add_role() -> None:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=port, user="postgres", database="postgres", ssl=False
            )
            try:
                await conn.execute("CREATE ROLE certuser LOGIN SUPERUSER")
            finally:
                await conn.close()

        asyncio.run(add_role())
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            server._signal(signal.SIGCONT)
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


async def _drop(store: SQLStore) -> None:
    async with store.engine.begin() as conn:
        for table in ("keys", "apis", "meta"):
            await conn.exec_driver_sql(f"DROP TABLE IF EXISTS {store.table_prefix}{table}")


# -- item 8: the whole call within ``timeout`` ---------------------------------------------------


async def _bounded_failure(call: Any, elapsed: list[float]) -> StoreUnavailable:
    """Await ``call``, which must fail with StoreUnavailable before CALL_BOUND."""
    started = time.monotonic()
    with anyio.fail_after(CALL_BOUND), pytest.raises(StoreUnavailable) as caught:
        await call
    elapsed.append(round(time.monotonic() - started, 3))
    return caught.value


def test_every_call_on_a_frozen_postgres_ends_within_its_timeout(
    private_postgres: PrivatePostgres,
) -> None:
    """Against a frozen PostgreSQL, each kind of call — on pooled connections found hung,
    then on new connections that never answer, then from a second event loop — fails with
    StoreUnavailable within its timeout (plus scheduling slack), never the 2-4 times it took
    when a driver timeout was followed by a rollback and a close each waiting again."""
    store = SQLStore.from_url(
        private_postgres.url(), table_prefix="kg_frozen_", timeout=TIMEOUT, pool_size=3
    )
    elapsed: dict[str, list[float]] = {"pooled": [], "new": [], "second loop": []}
    key = record()

    async def first_loop() -> None:
        await expose(store)
        await store.insert_key(key)
        # Three pooled connections, warm, that will hang mid-statement.
        await asyncio.gather(*(store.get_api("orders") for _ in range(3)))
        with private_postgres.frozen():
            calls = [
                store.lookup("orders", key.client_id),
                store.get_key("orders", key.client_id),
                store.insert_key(record(name="During")),
                store.list_keys("orders"),  # the pool's connections are cut by now
                store.upsert_api(
                    "orders", exposed=False, max_keys_per_kind=None, default_max_keys_per_kind=5
                ),
                store.delete_key("orders", key.client_id),
            ]
            for n, call in enumerate(calls):
                failure = await _bounded_failure(call, elapsed["pooled" if n < 3 else "new"])
                assert "unavailable" in str(failure)
                assert PASSWORD not in str(failure)

    async def second_loop() -> None:
        with private_postgres.frozen():
            await _bounded_failure(store.lookup("orders", key.client_id), elapsed["second loop"])
            await _bounded_failure(store.insert_key(record(name="Later")), elapsed["second loop"])
        # Thawed: the same store serves again, and the write made in the outage is not there.
        with anyio.fail_after(BOUND):
            assert [k.name for k in await store.list_keys("orders")] == ["Acme"]
            await _drop(store)
            await store.aclose()

    try:
        asyncio.run(first_loop())
        asyncio.run(second_loop())
    finally:
        print(f"seconds per call, timeout {TIMEOUT:g} s: {elapsed}")
    assert [len(times) for times in elapsed.values()] == [3, 3, 2]


# -- item 7: one engine per event loop -----------------------------------------------------------


def test_twenty_event_loops_hold_no_more_connections_than_one(
    private_postgres: PrivatePostgres,
) -> None:
    """One store used from 20 successive asyncio.run calls keeps working, and the server
    never holds more of its connections than one loop's pool: each loop's connections are
    closed when that loop ends, and none are left once the store is closed."""
    name = f"kg-loops-{os.getpid()}"
    store = SQLStore.from_url(
        private_postgres.url(),
        table_prefix="kg_loops_",
        pool_size=POOL_SIZE,
        max_overflow=0,
        connect_args={"server_settings": {"application_name": name}},
    )
    counts: list[int] = []

    async def one_loop(n: int) -> None:
        with anyio.fail_after(BOUND):
            await expose(store, limit=100)
            await store.insert_key(record(name=f"Key {n}"))
            # More calls at once than the pool has connections: the pool fills up.
            found = await asyncio.gather(*(store.lookup("orders", None) for _ in range(6)))
            assert found == [(True, None)] * 6
            counts.append(await private_postgres.count_connections(name))

    for n in range(20):
        asyncio.run(one_loop(n))

    async def finish() -> int:
        with anyio.fail_after(BOUND):
            assert len(await store.list_keys("orders")) == 20
            await _drop(store)
            await store.aclose()
            return await private_postgres.connections_left(name)

    assert asyncio.run(finish()) == 0, counts
    assert max(counts) <= POOL_SIZE, counts
    assert counts[-1] >= 1, counts  # the count sees the store's connections at all


async def test_store_closed_in_its_loop_frees_that_loop_only(
    private_postgres: PrivatePostgres,
) -> None:
    """aclose in the running loop closes that loop's connections at once, and the store then
    refuses calls instead of reconnecting."""
    name = f"kg-close-{os.getpid()}"
    store = SQLStore.from_url(
        private_postgres.url(),
        table_prefix="kg_close_",
        connect_args={"server_settings": {"application_name": name}},
    )
    with anyio.fail_after(BOUND):
        await expose(store)
        assert await private_postgres.count_connections(name) == 1
        await _drop(store)
        await store.aclose()
        assert await private_postgres.connections_left(name) == 0
        with pytest.raises(StoreUnavailable, match="closed"):
            await store.get_api("orders")


# -- item 10: SQLite under writers from several processes -----------------------------------------

PROCESSES, TASKS, ROUNDS = 8, 3, 20
STORM_TIMEOUT = 2.0  # short, so that a writer starved behind the others shows


async def _storm(path: str, worker: int, barrier: Any) -> tuple[int, int, list[str]]:
    """One process of the storm: TASKS tasks, each creating keys, exposing and un-exposing
    an API of its own, deleting every other key and reading; returns what it did and every
    failure it met."""
    store = SQLStore.from_url(f"sqlite:///{path}", timeout=STORM_TIMEOUT)
    await anyio.to_thread.run_sync(barrier.wait)  # every process starts together
    created = deleted = 0
    failures: list[str] = []

    async def task(t: int) -> None:
        nonlocal created, deleted
        for i in range(ROUNDS):
            try:
                await store.upsert_api(
                    "storm", exposed=True, max_keys_per_kind=None, default_max_keys_per_kind=10_000
                )
                key = record(
                    api="storm",
                    name=f"w{worker} t{t} {i}",
                    kind=KeyKind.INTERNAL if i % 2 else KeyKind.EXTERNAL,
                )
                await store.insert_key(key)
                created += 1
                await store.upsert_api(
                    f"w{worker}-t{t}",
                    exposed=i % 2 == 0,
                    max_keys_per_kind=None,
                    default_max_keys_per_kind=5,
                )
                if i % 2:
                    assert await store.delete_key("storm", key.client_id) is True
                    deleted += 1
                assert await store.get_api("storm") is not None
            except Exception as exc:
                failures.append(f"round {i} of task {t}: {type(exc).__name__}: {exc}")

    try:
        await asyncio.gather(*(task(t) for t in range(TASKS)))
    finally:
        await store.aclose()
    return created, deleted, failures


def _storm_process(path: str, worker: int, barrier: Any, results: Any) -> None:
    try:
        results.put((worker, asyncio.run(_storm(path, worker, barrier))))
    except BaseException as exc:  # reported, not lost in the child's stderr
        results.put((worker, (0, 0, [f"{type(exc).__name__}: {exc}"])))


@pytest.mark.serial  # a writer starved by the machine, not by the store, would show too
async def test_sqlite_serves_a_storm_of_writers_from_several_processes(tmp_path: Path) -> None:
    """8 processes x 3 tasks writing to one new SQLite file at once (creating its tables,
    creating, deleting and reading keys, exposing APIs) are all served: no call refused for
    lock contention, and the keys and the per-kind counts are exactly what was written."""
    path = str(tmp_path / "storm.db")
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(PROCESSES)
    results = spawn.Queue()
    workers = [
        spawn.Process(target=_storm_process, args=(path, n, barrier, results))
        for n in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    try:
        outcomes = dict([await anyio.to_thread.run_sync(results.get, True, BOUND) for _ in workers])
    finally:
        for worker in workers:
            worker.join(BOUND)
            if worker.is_alive():
                worker.kill()
    failures = [failure for _, _, found in outcomes.values() for failure in found]
    assert failures == []
    created = sum(c for c, _, _ in outcomes.values())
    deleted = sum(d for _, d, _ in outcomes.values())
    assert (created, deleted) == (PROCESSES * TASKS * ROUNDS, PROCESSES * TASKS * ROUNDS // 2)
    store = SQLStore.from_url(f"sqlite:///{path}")
    try:
        keys = await store.list_keys("storm")
        api = await store.get_api("storm")
        assert api is not None
        assert len(keys) == created - deleted
        assert (api.internal_keys, api.external_keys) == (0, created - deleted)
        assert len(await store.list_apis()) == 1 + PROCESSES * TASKS
    finally:
        await store.aclose()


# -- item 11: libpq's TLS parameters -------------------------------------------------------------


def test_tls_parameters_leave_the_url_for_asyncpg(private_postgres: PrivatePostgres) -> None:
    """sslmode, sslrootcert, sslcert and sslkey are taken out of the URL SQLAlchemy sees (so
    neither asyncpg's keywords nor the store's repr get them) and given to asyncpg whole."""
    certs = private_postgres.certs
    url = private_postgres.url(
        sslmode="verify-full",
        sslrootcert=str(certs / "ca.crt"),
        sslcert=str(certs / "client.crt"),
        sslkey=str(certs / "client.key"),
    )
    store = SQLStore.from_url(url)
    assert not set(store.engine.url.query) & {"sslmode", "sslrootcert", "sslcert", "sslkey"}
    for hidden in (PASSWORD, str(certs), "sslkey"):
        assert hidden not in repr(store)
        assert hidden not in store.url
        assert hidden not in store.description


def test_unknown_sslmode_is_refused_at_opening() -> None:
    """An sslmode libpq does not know is a ConfigurationError when the store is opened."""
    with pytest.raises(ConfigurationError, match="sslmode must be one of"):
        SQLStore.from_url("postgresql://u@db.example/app?sslmode=verify_full")


async def _uses_tls(store: SQLStore) -> bool:
    async with store.engine.connect() as conn:
        found = await conn.exec_driver_sql(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        return bool(found.scalar_one())


@pytest.mark.parametrize(
    ("user", "query"),
    [
        ("postgres", {"sslmode": "require"}),
        ("postgres", {"sslmode": "verify-ca", "sslrootcert": "ca.crt"}),
        ("postgres", {"sslmode": "verify-full", "sslrootcert": "ca.crt"}),
        (
            "certuser",  # logs in with a client certificate only (pg_hba "cert")
            {
                "sslmode": "verify-full",
                "sslrootcert": "ca.crt",
                "sslcert": "client.crt",
                "sslkey": "client.key",
            },
        ),
    ],
)
async def test_tls_urls_work(
    private_postgres: PrivatePostgres, user: str, query: dict[str, str]
) -> None:
    """A PostgreSQL URL with libpq's TLS parameters connects over TLS and serves the store:
    sslmode=require, verify-ca and verify-full with the CA, and a client certificate."""
    query = {k: str(private_postgres.certs / v) if k != "sslmode" else v for k, v in query.items()}
    store = SQLStore.from_url(private_postgres.url(user, **query), table_prefix="kg_tls_")
    try:
        with anyio.fail_after(BOUND):
            await expose(store)
            key = record()
            await store.insert_key(key)
            assert await store.lookup("orders", key.client_id) == (True, key)
            assert await _uses_tls(store) is True
    finally:
        with anyio.fail_after(BOUND):
            await _drop(store)
            await store.aclose()


async def test_client_certificate_is_what_logs_in(private_postgres: PrivatePostgres) -> None:
    """Without sslcert/sslkey, the role that needs a client certificate is refused: the
    certificate of the test above really was sent."""
    certs = private_postgres.certs
    url = private_postgres.url("certuser", sslmode="verify-full", sslrootcert=str(certs / "ca.crt"))
    store = SQLStore.from_url(url, timeout=5)
    try:
        with anyio.fail_after(BOUND), pytest.raises(StoreUnavailable):
            await store.get_api("orders")
    finally:
        await store.aclose()


async def _hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


# asyncpg, under load, now and then leaves the transport of a connection whose TLS
# handshake failed unclosed (seen in 2 of about 12 full runs, never alone; keyguard holds
# no handle on it: the connection never came into being). The test collects it itself,
# with that warning ignored, rather than let it fail whichever test the collector runs in.
@pytest.mark.filterwarnings("ignore:unclosed transport:ResourceWarning")
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
async def test_wrong_ca_is_a_clean_503_and_nothing_secret_is_logged(
    private_postgres: PrivatePostgres, caplog: pytest.LogCaptureFixture
) -> None:
    """verify-full against a server whose certificate another CA signed fails with
    StoreUnavailable at the store and 503 on the request path (never a 500 or a raw
    driver error), and no log record, at DEBUG through every logger, shows the password or
    the certificate and key paths."""
    for name in ("", "keyguard", "sqlalchemy", "asyncpg"):
        caplog.set_level(logging.DEBUG, logger=name)
    certs = private_postgres.certs
    url = private_postgres.url(
        sslmode="verify-full",
        sslrootcert=str(certs / "other-ca.crt"),
        sslcert=str(certs / "client.crt"),
        sslkey=str(certs / "client.key"),
    )
    store = SQLStore.from_url(url, timeout=5)
    guarded = open_store(url, timeout=5, cache_ttl=0)
    app = Starlette(routes=[Route("/hello", _hello)])
    app.add_middleware(KeyGuard, store=guarded, api="orders")
    try:
        with anyio.fail_after(BOUND):
            with pytest.raises(StoreUnavailable) as caught:
                await store.get_api("orders")
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                answer = await client.get("/hello", headers={"X-IBM-Client-Id": "0" * 32})
    finally:
        await store.aclose()
        await guarded.aclose()
        await asyncio.sleep(0)  # the transports' close callbacks
        gc.collect()
    assert "certificate" in str(caught.value.__cause__).lower()
    assert answer.status_code == 503, answer.text
    assert caplog.records  # the loggers were listening
    for shown in (str(caught.value), repr(store), answer.text, caplog.text):
        assert PASSWORD not in shown
        assert str(certs) not in shown


def test_twenty_event_loops_on_mariadb_hold_no_more_connections_than_one() -> None:
    """The same on MariaDB (which went from 4 to 117 connections with the old store): over 20
    successive asyncio.run calls, the server never holds more of the store's connections
    (counted by their database, one of the test's own) than one loop's pool."""
    base = make_url(require_server("mysql")).set(drivername="mysql+asyncmy")
    database = f"kgt_loops_{secrets.token_hex(4)}"
    admin_url = base.render_as_string(hide_password=False)

    async def admin(statement: str, *parameters: str) -> int:
        engine = create_async_engine(admin_url, poolclass=NullPool)
        try:
            async with engine.begin() as conn:
                result = await conn.exec_driver_sql(statement, parameters)
                return int(result.scalar() or 0) if result.returns_rows else 0
        finally:
            await engine.dispose()

    count = "SELECT COUNT(*) FROM information_schema.processlist WHERE db = %s"
    asyncio.run(admin(f"CREATE DATABASE {database}"))
    store = SQLStore.from_url(
        base.set(database=database).render_as_string(hide_password=False),
        pool_size=POOL_SIZE,
        max_overflow=0,
    )
    counts: list[int] = []
    try:

        async def one_loop(n: int) -> None:
            with anyio.fail_after(BOUND):
                await expose(store, limit=100)
                await store.insert_key(record(name=f"Key {n}"))
                await asyncio.gather(*(store.lookup("orders", None) for _ in range(6)))
                counts.append(await admin(count, database))

        for n in range(20):
            asyncio.run(one_loop(n))

        async def finish() -> int:
            with anyio.fail_after(BOUND):
                assert len(await store.list_keys("orders")) == 20
                await store.aclose()
                for _ in range(200):  # a server thread ends a moment after the goodbye
                    if not (left := await admin(count, database)):
                        break
                    await asyncio.sleep(0.05)
                return left

        assert asyncio.run(finish()) == 0, counts
    finally:
        asyncio.run(admin(f"DROP DATABASE IF EXISTS {database}"))
    assert max(counts) <= POOL_SIZE, counts
    assert counts[-1] >= 1, counts
