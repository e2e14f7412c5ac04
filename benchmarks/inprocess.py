"""Per-request cost, driving ASGI apps directly (no sockets), contenders interleaved."""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Scope


@dataclass
class Contender:
    """An app to time, with the headers that make its requests succeed."""

    name: str
    app: ASGIApp
    headers: list[tuple[bytes, bytes]]
    rounds: list[float] = field(default_factory=list)  # µs per request, one per round


def scope_for(headers: list[tuple[bytes, bytes]]) -> Scope:
    """A GET / scope like a server's, with a few ordinary headers before the credentials."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"keyguard-bench/1"),
            (b"accept", b"*/*"),
            *headers,
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def status_of(app: ASGIApp, headers: list[tuple[bytes, bytes]]) -> int:
    """The status ``app`` answers a request with ``headers`` (to check a contender first)."""
    statuses: list[int] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope_for(headers), _receive, send)
    return statuses[0]


async def _batch(
    app: ASGIApp, template: Scope, n: int, clock: Callable[[], int] = time.perf_counter_ns
) -> float:
    async def send(message: Message) -> None:
        pass

    start = clock()
    for _ in range(n):
        scope = dict(template)
        scope["state"] = {}
        await app(scope, _receive, send)
    return (clock() - start) / n / 1000


async def run(
    contenders: list[Contender],
    *,
    rounds: int,
    batch: int,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> None:
    """Time every contender ``rounds`` times, in a new random order each round (wall time
    by default; ``clock=time.thread_time_ns`` counts this thread's CPU time only)."""
    for c in contenders:
        status = await status_of(c.app, c.headers)
        if status != 200:
            raise RuntimeError(f"{c.name} answers {status}, not 200: the benchmark would lie")
        await _batch(c.app, scope_for(c.headers), batch)  # warm up
    order = list(contenders)
    for _ in range(rounds):
        random.shuffle(order)
        for c in order:
            gc.collect()
            c.rounds.append(await _batch(c.app, scope_for(c.headers), batch, clock))


def added(c: Contender, bare: Contender) -> float:
    """Median over rounds of (this contender - the bare app), in µs: the check's own cost."""
    return statistics.median(x - b for x, b in zip(c.rounds, bare.rounds, strict=True))
