"""No timing oracle: the refusals that could leak whether a client id exists cost the same.

Statistical, with a generous margin: a deliberately slow passlib scheme makes
one verification take milliseconds, so doing it or not doing it is a
difference of orders of magnitude, while equal work stays within a factor
well below 2 even on a noisy machine. Medians over interleaved requests.
"""

from __future__ import annotations

import statistics
import time

import pytest
from passlib.context import CryptContext

from keyguard import KeyGuard, KeyManager, MemoryStore, SecretHasher
from tests.helpers import http_scope, run_asgi

# Serial: the medians compare CPU work, which another test worker on the same cores skews.
pytestmark = [pytest.mark.anyio, pytest.mark.serial]


async def noop_app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("no request here may reach the app")


async def test_wrong_secret_and_secretless_cost_the_same() -> None:
    """A wrong secret and a secret sent to a secretless key share a message and cost the same
    (one slow verification each); an unknown id, whose message differs, costs none."""
    context = CryptContext(schemes=["pbkdf2_sha256"], pbkdf2_sha256__default_rounds=40_000)
    hasher = SecretHasher(context, offload=False)
    store = MemoryStore()
    manager = KeyManager(store, hasher=hasher)
    await manager.expose("orders")
    internal = await manager.create_key("orders", name="Staff", kind="internal")
    external = await manager.create_key("orders", name="Acme", kind="external")
    guard = KeyGuard(noop_app, store=store, api="orders", hasher=hasher)

    cases = {
        "unknown id": [(b"x-ibm-client-id", b"0" * 32), (b"x-ibm-client-secret", b"guess")],
        "wrong secret": [
            (b"x-ibm-client-id", internal.client_id.encode()),
            (b"x-ibm-client-secret", b"guess"),
        ],
        "secretless key": [
            (b"x-ibm-client-id", external.client_id.encode()),
            (b"x-ibm-client-secret", b"guess"),
        ],
        "no secret sent": [(b"x-ibm-client-id", internal.client_id.encode())],
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    shapes: dict[str, set[tuple[int, tuple[bytes, ...]]]] = {name: set() for name in cases}
    for _ in range(25):
        for name, headers in cases.items():
            start = time.perf_counter()
            sent = await run_asgi(guard, http_scope("/", headers))
            times[name].append(time.perf_counter() - start)
            shapes[name].add((sent[0]["status"], tuple(h for h, _ in sent[0]["headers"])))
    median = {name: statistics.median(t) for name, t in times.items()}
    verified = [median["wrong secret"], median["secretless key"]]
    assert max(verified) / min(verified) < 1.5, median
    assert median["no secret sent"] * 5 < min(verified), median
    assert median["unknown id"] * 5 < min(verified), median  # no dummy verification
    # Same status and the same header names for all three: only the message differs.
    assert shapes["unknown id"] == shapes["wrong secret"] == shapes["secretless key"]
    assert len(shapes["unknown id"]) == 1
