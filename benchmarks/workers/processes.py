"""The server's processes for the ``workers`` benchmark: starting uvicorn in a process
group of its own, stopping the whole group, and what ``/proc`` says about it (CPU time,
connections held)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from benchmarks import server

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    served_dir: Path
    pids: list[int]  # the processes that serve (the workers, not the supervisor)


class Interrupted(Exception):
    """SIGTERM arrived while servers were running."""


@contextmanager
def signals_raise() -> Iterator[None]:
    """While inside, Ctrl-C raises KeyboardInterrupt at once and SIGTERM raises
    :class:`Interrupted`, so cleanup in ``finally`` runs. (``asyncio.run``'s own SIGINT
    handler only cancels the main task, which code blocked in a subprocess never sees.)
    Main thread only."""

    def terminated(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(f"signal {signum}")

    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)


def _die_with_parent() -> list[str]:
    """A command prefix that makes the server get SIGTERM if the benchmark dies without
    cleaning up (util-linux's setpriv, Linux), or nothing where it is missing. Not a
    ``preexec_fn``: other threads (aiosqlite's) run in this process when it forks."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def start(env: dict[str, str], workers: int, timeout: float = 60) -> Server:
    """uvicorn with ``workers`` serving ``benchmarks.serve:app``; returns once every worker
    has started its lifespan (a ready file each)."""
    served_dir = Path(tempfile.mkdtemp(prefix="kgbench-served-"))
    port = server.free_port()
    proc = subprocess.Popen(
        [*_die_with_parent(), *server.uvicorn_command(port, workers)],
        cwd=server.ROOT,
        env={**os.environ, **env, "KGB_SERVED_DIR": str(served_dir)},
        start_new_session=True,
    )
    running = Server(proc, port, served_dir, [])
    try:
        deadline = time.monotonic() + timeout
        while True:
            running.pids = sorted(_reports(served_dir, "ready"))
            if len(running.pids) >= workers:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn: {len(running.pids)} of {workers} workers ready")
            time.sleep(0.05)
        if len(running.pids) != workers:
            raise RuntimeError(f"{len(running.pids)} workers started, {workers} asked for")
    except BaseException:
        stop(running)
        raise
    return running


def stop(running: Server, timeout: float = 15) -> dict[int, tuple[int, int]]:
    """Stop the server and everything in its process group, and return what each worker
    wrote at shutdown: pid -> (200 responses, other responses). Raises if a process of
    the group outlives SIGKILL."""
    pgid = running.proc.pid  # start_new_session: the group is the server's own pid
    if running.proc.poll() is None:
        running.proc.terminate()  # uvicorn's supervisor passes it on to the workers
        with suppress(subprocess.TimeoutExpired):
            running.proc.wait(timeout)
    _kill_group(pgid, timeout)
    running.proc.wait()
    served: dict[int, tuple[int, int]] = {}
    for pid, path in _reports(running.served_dir, "served").items():
        ok, other = path.read_text(encoding="utf-8").split()
        served[pid] = (int(ok), int(other))
    shutil.rmtree(running.served_dir, ignore_errors=True)
    return served


def _reports(directory: Path, what: str) -> dict[int, Path]:
    """pid -> path of the ``what-<pid>`` files the workers wrote (not their temporaries)."""
    found = {}
    for path in directory.iterdir():
        matched = re.fullmatch(rf"{what}-(\d+)", path.name)
        if matched:
            found[int(matched.group(1))] = path
    return found


def _kill_group(pgid: int, timeout: float) -> None:
    """Wait for the group to empty; SIGKILL what is left; raise if something survives."""
    deadline = time.monotonic() + timeout
    killed = False
    while group_alive(pgid):
        if time.monotonic() > deadline:
            if killed:
                raise RuntimeError(f"processes of group {pgid} survived SIGKILL")
            os.killpg(pgid, signal.SIGKILL)
            killed = True
            deadline = time.monotonic() + timeout
        time.sleep(0.05)


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in the process group ``pgid``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text(encoding="utf-8").rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (those still running)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1]
        except OSError:
            continue
        parts = fields.split()
        total += int(parts[11]) + int(parts[12])  # utime, stime (fields 14 and 15)
    return total / _TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs have spent busy since boot (``/proc/stat``: not idle, not iowait)."""
    with open("/proc/stat", encoding="utf-8") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / _TICKS


def connections(pids: list[int], port: int) -> list[int]:
    """How many established TCP connections to ``port`` each of ``pids`` holds now."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(OSError), open(table, encoding="utf-8") as f:
            for line in list(f)[1:]:
                parts = line.split()
                # local address (hex ip:port), state ("01": established), inode
                if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "01":
                    inodes.add(f"socket:[{parts[9]}]")
    counts = []
    for pid in pids:
        held = 0
        with suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with suppress(OSError):
                    held += os.readlink(fd) in inodes
        counts.append(held)
    return counts
