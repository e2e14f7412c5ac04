"""A slow hash scheme (bcrypt): does hashing ever block the event loop?

Cheap requests (an external key, id only) are issued on a 1 ms timer and
timed from the moment they were due to the moment they finished, so any
time the event loop spends blocked shows up in their latency. They run
first alone, then while four tasks keep sending wrong secrets for an
internal key, each of which costs a full bcrypt verification. For contrast,
the same run with ``offload=False`` (bcrypt on the event loop).

It also times repeat requests with a valid secret under bcrypt and under
the default scheme: the verified-secret memo makes them cost the same.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from passlib.context import CryptContext
from starlette.types import ASGIApp, Message

from benchmarks.apps import bare, keyguard
from benchmarks.inprocess import Contender, _receive, added, run, scope_for
from keyguard import KeyManager, MemoryStore, SecretHasher


@dataclass
class Latencies:
    p50_us: float
    p99_us: float
    slow_verifications: int


@dataclass
class SlowResult:
    alone: Latencies
    offloaded: Latencies
    blocking: Latencies
    repeat_bcrypt_added_us: float
    repeat_default_added_us: float


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def _setup(
    hasher: SecretHasher,
) -> tuple[
    ASGIApp, list[tuple[bytes, bytes]], list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]
]:
    store = MemoryStore()
    manager = KeyManager(store, hasher=hasher)
    await manager.expose("bench")
    internal = await manager.create_key("bench", name="internal", kind="internal")
    external = await manager.create_key("bench", name="external", kind="external")
    assert internal.secret is not None
    cheap = [(b"x-ibm-client-id", external.client_id.encode())]
    wrong = [
        (b"x-ibm-client-id", internal.client_id.encode()),
        (b"x-ibm-client-secret", b"not-the-secret"),
    ]
    valid = [
        (b"x-ibm-client-id", internal.client_id.encode()),
        (b"x-ibm-client-secret", internal.secret.encode()),
    ]
    return keyguard(store, hasher=hasher), cheap, wrong, valid


async def _cheap_under_load(hasher: SecretHasher, workers: int, requests: int) -> Latencies:
    app, cheap, wrong, _ = await _setup(hasher)

    async def send(message: Message) -> None:
        pass

    stop = asyncio.Event()
    slow_done = 0

    async def slow_worker() -> None:
        nonlocal slow_done
        while not stop.is_set():
            await app(scope_for(wrong), _receive, send)
            slow_done += 1
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(slow_worker()) for _ in range(workers)]
    latencies = []
    for _ in range(requests):
        due = time.perf_counter() + 0.001
        await asyncio.sleep(0.001)
        await app(scope_for(cheap), _receive, send)
        latencies.append((time.perf_counter() - due) * 1e6)
    stop.set()
    await asyncio.gather(*tasks)
    return Latencies(_pct(latencies, 0.5), _pct(latencies, 0.99), slow_done)


async def main(requests: int = 1000, bcrypt_rounds: int = 10) -> SlowResult:
    def bcrypt_hasher(offload: bool) -> SecretHasher:
        context = CryptContext(schemes=["bcrypt"], bcrypt__default_rounds=bcrypt_rounds)
        return SecretHasher(context, offload=offload)

    alone = await _cheap_under_load(bcrypt_hasher(True), 0, requests)
    offloaded = await _cheap_under_load(bcrypt_hasher(True), 4, requests)
    blocking = await _cheap_under_load(bcrypt_hasher(False), 4, requests // 20)

    slow_app, _, _, slow_valid = await _setup(bcrypt_hasher(True))
    fast_app, _, _, fast_valid = await _setup(SecretHasher())
    contenders = [
        Contender("bare", bare(), []),
        Contender("bcrypt, repeat valid secret", slow_app, slow_valid),
        Contender("default, repeat valid secret", fast_app, fast_valid),
    ]
    await run(contenders, rounds=9, batch=2000)
    return SlowResult(
        alone,
        offloaded,
        blocking,
        added(contenders[1], contenders[0]),
        added(contenders[2], contenders[0]),
    )
