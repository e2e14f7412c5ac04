"""A flood of wrong secrets under a slow scheme (bcrypt): how long do valid callers wait?

Forty tasks keep sending wrong secrets for an internal key, each costing a
full bcrypt verification, while valid callers make their *first* request
(so no remembered secret helps them) one after another. A verification that
cannot start within the store's timeout is refused with 503, and waiting
verifications start by their id's recent failures and verifications under
way, fewest first: the flood's requests are what get refused, and a valid
first request waits for about the verification running when it came, then
pays its own. One bcrypt verification alone is timed first, for scale.

Run:  python -m benchmarks.flood
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

from passlib.context import CryptContext
from starlette.types import Message

from benchmarks.inprocess import _receive, scope_for
from keyguard import KeyGuard, KeyManager, MemoryStore, SecretHasher


async def ok_app(scope: object, receive: object, send: object) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]


def collect(sent: list[Message]) -> Callable[[Message], Awaitable[None]]:
    """An ASGI send that appends to ``sent``."""

    async def send(message: Message) -> None:
        sent.append(message)

    return send


async def main(flooders: int = 40, callers: int = 30, timeout: float = 3.0) -> dict[str, float]:
    """Valid first requests' latency (p50, p99, max, seconds) during the flood."""
    hasher = SecretHasher(CryptContext(schemes=["bcrypt"], bcrypt__rounds=10))
    store = MemoryStore()
    store.timeout = timeout  # type: ignore[attr-defined]  # what SQL and Redis stores have
    manager = KeyManager(store, hasher=hasher)
    await manager.expose("orders", max_keys_per_kind=callers + 1)
    target = await manager.create_key("orders", name="Target", kind="internal")
    valid = [
        await manager.create_key("orders", name=f"C{i}", kind="internal") for i in range(callers)
    ]
    app = KeyGuard(ok_app, store=store, api="orders", hasher=hasher)
    record = await store.get_key("orders", target.client_id)
    assert record is not None
    start = time.perf_counter()
    await hasher.verify(target.client_id, "x", record.secret_hash)
    alone = time.perf_counter() - start
    wrong = scope_for(
        [(b"x-ibm-client-id", target.client_id.encode()), (b"x-ibm-client-secret", b"x")]
    )
    statuses: dict[int, int] = {}
    stop = False

    async def flood() -> None:
        while not stop:
            sent: list[Message] = []

            await app(dict(wrong), _receive, collect(sent))
            statuses[sent[0]["status"]] = statuses.get(sent[0]["status"], 0) + 1

    tasks = [asyncio.create_task(flood()) for _ in range(flooders)]
    await asyncio.sleep(1)
    latencies: list[float] = []
    for key in valid:
        headers = [
            (b"x-ibm-client-id", key.client_id.encode()),
            (b"x-ibm-client-secret", str(key.secret).encode()),
        ]
        sent: list[Message] = []

        start = time.perf_counter()
        await app(scope_for(headers), _receive, collect(sent))
        latencies.append(time.perf_counter() - start)
        assert sent[0]["status"] in (200, 503)
        statuses[-sent[0]["status"]] = statuses.get(-sent[0]["status"], 0) + 1
    stop = True
    await asyncio.gather(*tasks)
    latencies.sort()
    result = {
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "max_s": latencies[-1],
        "one_verification_alone_s": alone,
    }
    print(f"valid first requests during a {flooders}-task wrong-secret flood (bcrypt, 10 rounds):")
    print(
        {k: round(v, 3) for k, v in result.items()}, "statuses (negative: valid callers):", statuses
    )
    return result


if __name__ == "__main__":
    asyncio.run(main())
