"""The load: wrk on loopback (or the bounded Python client of ``benchmarks.server``
where wrk is missing), and reading and combining wrk's reports."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from benchmarks import server

CONNECTIONS = 32


@dataclass
class ClientResult:
    load: server.Load
    errors: int


def wrk_args(
    port: int, headers: dict[str, str], seconds: int, connections: int = CONNECTIONS
) -> list[str]:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    return [*args, f"http://127.0.0.1:{port}/"]


def drive(port: int, headers: dict[str, str], seconds: int) -> ClientResult:
    """Load the server for ``seconds`` with wrk (or the Python client, without wrk)."""
    if not shutil.which("wrk"):
        return ClientResult(server.load(port, headers, seconds, CONNECTIONS), 0)
    out = subprocess.run(
        wrk_args(port, headers, seconds), capture_output=True, text=True, check=True
    ).stdout
    return ClientResult(parse_wrk(out), wrk_errors(out))


def spawn(
    port: int, headers: dict[str, str], seconds: int, connections: int
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        wrk_args(port, headers, seconds, connections),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_all(clients: list[subprocess.Popen[str]]) -> None:
    for c in clients:
        c.kill()
    for c in clients:
        c.communicate()


def wrk_requests(out: str) -> tuple[int, float]:
    """The requests wrk completed and over how many seconds (``N requests in Xs``)."""
    found = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", out)
    if found is None:
        raise ValueError(f"no request count in wrk's output: {out!r}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[found.group(3)]
    return int(found.group(1)), float(found.group(2)) * scale


def combine(outs: list[str], stagger: float) -> ClientResult:
    """Two wrk runs, the second started ``stagger`` seconds after the first, as one load:
    requests/s is every request completed over the whole span (first start to last end,
    so the moments only one client runs count too); p50 is the clients' p50s weighted
    by their requests, p99 the larger one; non-200 and socket errors are summed."""
    loads = [parse_wrk(out) for out in outs]
    done = [wrk_requests(out) for out in outs]
    span = max(done[0][1], stagger + done[1][1])
    total = sum(n for n, _ in done)
    return ClientResult(
        server.Load(
            total / span,
            sum(load.p50_ms * n for load, (n, _) in zip(loads, done, strict=True)) / total,
            max(load.p99_ms for load in loads),
            sum(load.non_200 for load in loads),
        ),
        sum(wrk_errors(out) for out in outs),
    )


def parse_wrk(out: str) -> server.Load:
    """requests/s, p50, p99 and non-2xx/3xx count from wrk's ``--latency`` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise ValueError(f"no Requests/sec in wrk's output: {out!r}")
    non_200 = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return server.Load(
        float(rps.group(1)),
        server._wrk_ms(out, "50%"),
        server._wrk_ms(out, "99%"),
        int(non_200.group(1)) if non_200 else 0,
    )


def wrk_errors(out: str) -> int:
    """The sum of wrk's socket errors (connect, read, write, timeout); 0 if it reports none."""
    found = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return sum(int(n) for n in found.groups()) if found else 0
