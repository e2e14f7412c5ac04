"""A slow hash scheme (bcrypt): does hashing ever block the event loop?

Cheap requests (an external key, id only) are timed one by one, first alone,
then while other tasks keep sending wrong secrets for an internal key, each
of which costs a full bcrypt verification. keyguard verifies in a worker
thread, so the cheap requests' p99 should barely move.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from passlib.context import CryptContext
from starlette.types import ASGIApp, Message

from benchmarks.apps import keyguard
from benchmarks.inprocess import _receive, scope_for
from keyguard import KeyManager, MemoryStore, SecretHasher


@dataclass
class SlowResult:
    p50_alone_us: float
    p99_alone_us: float
    p50_loaded_us: float
    p99_loaded_us: float
    slow_verifications: int


async def _timed(app: ASGIApp, headers: list[tuple[bytes, bytes]]) -> float:
    async def send(message: Message) -> None:
        pass

    start = time.perf_counter_ns()
    await app(scope_for(headers), _receive, send)
    return (time.perf_counter_ns() - start) / 1000


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


async def run(cheap_requests: int = 3000, bcrypt_rounds: int = 10) -> SlowResult:
    context = CryptContext(schemes=["bcrypt"], bcrypt__default_rounds=bcrypt_rounds)
    hasher = SecretHasher(context)
    store = MemoryStore()
    manager = KeyManager(store, hasher=hasher)
    await manager.expose("bench")
    internal = await manager.create_key("bench", name="internal", kind="internal")
    external = await manager.create_key("bench", name="external", kind="external")
    app = keyguard(store, hasher=hasher)
    cheap = [(b"x-ibm-client-id", external.client_id.encode())]
    wrong = [
        (b"x-ibm-client-id", internal.client_id.encode()),
        (b"x-ibm-client-secret", b"not-the-secret"),
    ]

    async def cheap_latencies() -> list[float]:
        out = []
        for _ in range(cheap_requests):
            out.append(await _timed(app, cheap))
            await asyncio.sleep(0)
        return out

    alone = await cheap_latencies()
    stop = asyncio.Event()
    slow_done = 0

    async def slow_worker() -> None:
        nonlocal slow_done
        while not stop.is_set():
            await _timed(app, wrong)
            slow_done += 1

    workers = [asyncio.create_task(slow_worker()) for _ in range(4)]
    loaded = await cheap_latencies()
    stop.set()
    await asyncio.gather(*workers)
    return SlowResult(
        _pct(alone, 0.5), _pct(alone, 0.99), _pct(loaded, 0.5), _pct(loaded, 0.99), slow_done
    )
