"""``keyguard demo``: it starts, answers its own printed curl lines as it says, and stops cleanly.

The demo runs as the installed console script in a subprocess on port 0 (a
free port it prints), and the curl lines are run exactly as printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from keyguard import KeyManager, open_store

pytestmark = pytest.mark.slow

KEYGUARD = Path(sys.executable).parent / "keyguard"
READY = "Press Ctrl-C to stop."
CURL = shutil.which("curl")


@dataclass
class Demo:
    """A running demo: its process and what it printed up to READY."""

    process: subprocess.Popen[str]
    banner: list[str]

    def tries(self) -> list[tuple[int, str, str]]:
        """The printed (status, annotation, curl line) triples."""
        found = []
        for comment, line in zip(self.banner, self.banner[1:], strict=False):
            match = re.fullmatch(r"# (\d{3}): (.*)", comment)
            if match and line.startswith("curl "):
                found.append((int(match[1]), match[2], line))
        return found

    def stop(self, sig: signal.Signals) -> tuple[int, str]:
        """Send ``sig``; the exit code and the rest of stdout."""
        self.process.send_signal(sig)
        rest, _ = self.process.communicate(timeout=30)
        return self.process.returncode, rest


class Starter(Protocol):
    """Starts the demo with extra arguments and environment."""

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> Demo: ...


def environment(**extra: str) -> dict[str, str]:
    """This process's environment without KEYGUARD_* variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGUARD_")}
    env.update(extra)
    return env


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Starter]:
    """Start ``keyguard demo --port 0 ARGS`` and wait for its banner; killed if a test fails."""
    started: list[subprocess.Popen[str]] = []

    def starter(*args: str, env: dict[str, str] | None = None) -> Demo:
        errors = tmp_path / f"demo-{len(started)}.err"
        stderr = errors.open("w")
        process = subprocess.Popen(
            [str(KEYGUARD), "demo", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=tmp_path,
            env=env or environment(),
        )
        stderr.close()
        started.append(process)
        banner: list[str] = []
        done = threading.Event()

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                banner.append(line.rstrip("\n"))
                if line.strip() == READY:
                    break
            done.set()

        threading.Thread(target=read, daemon=True).start()
        assert done.wait(60), f"no banner; stderr: {errors.read_text()}"
        assert banner[-1:] == [READY], "\n".join(banner)
        return Demo(process, banner)

    yield starter
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)


def run_curl(line: str) -> tuple[int, str]:
    """Run a printed curl line as it is (plus -s); its status and body."""
    result = subprocess.run(
        ["/bin/sh", "-c", f"{line} -s --max-time 10"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    head, _, body = result.stdout.partition("\n\n")  # text mode has turned CRLF into LF
    return int(head.split()[1]), body


def check_tries(demo: Demo) -> None:
    """Every printed curl line gets the status printed above it (and IBM's message, if any)."""
    tries = demo.tries()
    statuses = [status for status, _, _ in tries]
    assert statuses.count(200) >= 3
    assert {400, 401} <= set(statuses)
    for status, annotation, line in tries:
        got, body = run_curl(line)
        assert got == status, (line, got, body)
        if status != 200 and "/keyguard/" not in line:
            assert annotation.startswith(json.loads(body)["moreInformation"])
    hello = json.loads(run_curl(tries[0][2])[1])
    assert hello["message"] == "Hello, demo-internal!"
    (ibm,) = [line for _, _, line in tries if "--request PUT" in line]
    echoed = json.loads(run_curl(ibm)[1])
    assert echoed["method"] == "PUT"
    assert echoed["path"] == "/"
    assert echoed["name"] == "demo-internal"
    assert echoed["body"] == {"id": 999999999999999}
    # Any other method and path is answered the same way.
    other = tries[0][2].replace("/hello", "/orders/42") + " -X DELETE"
    assert json.loads(run_curl(other)[1])["method"] == "DELETE"
    # The printed console address serves the page (it asks for the token in the browser).
    (console,) = [line for line in demo.banner if line.startswith("Web console:")]
    status, page = run_curl(f"curl -i {console.split()[2]}")
    assert status == 200
    assert "<title>Sharing &amp; keys · keyguard</title>" in page


def printed_token(demo: Demo) -> str:
    """The management token the demo printed."""
    (line,) = [line for line in demo.banner if line.strip().startswith("token: ")]
    return line.split("token: ", 1)[1]


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_demo_runs_its_curl_lines_and_reruns(start: Starter, tmp_path: Path) -> None:
    """Run twice on one store: each run's curl lines answer as printed, the second run
    replaces the demo keys (recorded as the CLI's changes), and SIGINT and SIGTERM both
    stop it with exit code 0."""
    store = f"sqlite:///{tmp_path / 'demo.db'}"

    first = start("--store", store)
    check_tries(first)
    first_internal = first.tries()[0][2]
    code, rest = first.stop(signal.SIGINT)
    assert code == 0
    assert "keyguard demo stopped." in rest

    second = start(
        "--store", store, env=environment(KEYGUARD_DEMO_TOKEN="chosen-token-0123456789-abcdefghij")
    )
    assert printed_token(second) == "chosen-token-0123456789-abcdefghij"
    check_tries(second)
    # The first run's internal key, sent to the second run: replaced, so refused.
    second_base = re.findall(r"http://127\.0\.0\.1:\d+", second.tries()[0][2])[0]
    old_key = re.sub(r"http://127\.0\.0\.1:\d+", second_base, first_internal)
    assert run_curl(old_key)[0] == 401
    code, _ = second.stop(signal.SIGTERM)
    assert code == 0

    async def demo_keys() -> tuple[list[tuple[str, str]], set[str]]:
        opened = open_store(store)
        try:
            manager = KeyManager(opened)
            keys = await manager.list_keys("demo")
            events = (await manager.audit("demo", limit=100)).events
        finally:
            await opened.aclose()
        return [(key.name, key.kind.value) for key in keys], {event.actor for event in events}

    keys, actors = asyncio.run(demo_keys())
    assert keys == [("demo-internal", "internal"), ("demo-external", "external")]
    # A command line's changes are the CLI's (SPEC §6), not the Python default "python".
    assert len(actors) == 1
    assert next(iter(actors)).startswith("cli:")


def test_demo_defaults_to_keyguard_demo_db_and_ignores_keyguard_store(
    start: Starter, tmp_path: Path
) -> None:
    """Without --store the demo uses ./keyguard-demo.db, even when KEYGUARD_STORE is set."""
    demo = start(env=environment(KEYGUARD_STORE=f"sqlite:///{tmp_path / 'other.db'}"))
    assert "(store: sqlite:///keyguard-demo.db)" in "\n".join(demo.banner)
    assert len(printed_token(demo)) >= 32
    code, _ = demo.stop(signal.SIGINT)
    assert code == 0
    # The printed command line manages the demo's own store, from any folder.
    (manage,) = [
        line.strip() for line in demo.banner if line.strip().startswith("keyguard --store")
    ]
    assert f"--store sqlite:///{tmp_path / 'keyguard-demo.db'} " in manage
    listed = subprocess.run(
        ["/bin/sh", "-c", manage.replace("keyguard ", f"{KEYGUARD} --json ", 1)],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
        check=True,
    )
    assert {key["name"] for key in json.loads(listed.stdout)["keys"]} == {
        "demo-internal",
        "demo-external",
    }
    assert (tmp_path / "keyguard-demo.db").is_file()
    assert not (tmp_path / "other.db").exists()


def test_demo_on_a_busy_port_exits_1(tmp_path: Path) -> None:
    """A port already in use is one error line and exit code 1, never a traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [str(KEYGUARD), "demo", "--port", str(port), "--store", "memory://"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=environment(),
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr.startswith(f"keyguard: error: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in result.stderr


def test_demo_without_uvicorn_names_the_extra(tmp_path: Path) -> None:
    """Without uvicorn, the demo says which extra to install, and exits 1."""
    (tmp_path / "uvicorn").mkdir()
    (tmp_path / "uvicorn" / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    result = subprocess.run(
        [str(KEYGUARD), "demo", "--port", "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment(PYTHONPATH=str(tmp_path)),
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == "keyguard: error: keyguard demo needs: pip install 'keyguard[cli]'\n"
