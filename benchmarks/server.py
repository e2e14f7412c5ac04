"""Throughput and latency through a real server: uvicorn (one worker) under wrk on loopback.

Falls back to a bounded Python client when wrk is not installed (slower, so
its absolute figures are lower; the ratio to the bare app is what counts).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Load:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    non_200: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def uvicorn_command(port: int, workers: int = 1) -> list[str]:
    """uvicorn serving benchmarks.serve:app on loopback ``port``, no access log."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "benchmarks.serve:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
        "--workers",
        str(workers),
    ]


def start(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    """uvicorn serving benchmarks.serve:app with ``env``; returns once it answers."""
    port = free_port()
    proc = subprocess.Popen(
        uvicorn_command(port),
        cwd=ROOT,
        env={**os.environ, **env},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return proc, port
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("uvicorn did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load(port: int, headers: dict[str, str], seconds: int, connections: int) -> Load:
    """Drive the server for ``seconds`` and report what the client saw."""
    if shutil.which("wrk"):
        return _wrk(port, headers, seconds, connections)
    return _python_client(port, headers, seconds, connections)


def _wrk(port: int, headers: dict[str, str], seconds: int, connections: int) -> Load:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run(
        [*args, f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non_200 = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return Load(
        rps, _wrk_ms(out, "50%"), _wrk_ms(out, "99%"), int(non_200.group(1)) if non_200 else 0
    )


def _wrk_ms(out: str, percentile: str) -> float:
    value, unit = re.search(rf"{percentile}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def _python_client(port: int, headers: dict[str, str], seconds: int, connections: int) -> Load:
    import asyncio

    async def main() -> Load:
        latencies: list[float] = []
        bad = 0
        deadline = time.monotonic() + seconds
        limits = httpx.Limits(max_connections=connections)
        async with httpx.AsyncClient(limits=limits, headers=headers) as client:

            async def worker() -> None:
                nonlocal bad
                while time.monotonic() < deadline:
                    t = time.perf_counter()
                    r = await client.get(f"http://127.0.0.1:{port}/")
                    latencies.append((time.perf_counter() - t) * 1000)
                    bad += r.status_code != 200

            await asyncio.gather(*(worker() for _ in range(connections)))
        latencies.sort()
        return Load(
            len(latencies) / seconds,
            latencies[len(latencies) // 2],
            latencies[int(len(latencies) * 0.99)],
            bad,
        )

    return asyncio.run(main())
