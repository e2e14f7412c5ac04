"""A flood of wrong secrets under a slow scheme does not starve valid callers (issue 12,
item 7): waiting verifications start by their client id's recent failures, fewest first,
so first requests of other keys go before the flood's and the flood gets the 503s.

The slow scheme is a gate: a verification of a wrong secret blocks until the test hands
it a permit, so every outcome is counted, none timed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import anyio
import pytest
from passlib.context import CryptContext
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import keyguard.secrets
from keyguard import KeyGuard, KeyManager, MemoryStore, SecretHasher
from keyguard.manager import Denial
from tests.helpers import http_scope, run_asgi

pytestmark = pytest.mark.anyio

WRONG = "wrong-secret"


class GatedContext:
    """A passlib-like context: verifying ``WRONG`` waits for a permit; others run at once.
    ``started`` lists the secrets in the order their verifications began."""

    def __init__(self) -> None:
        self.real = CryptContext(schemes=["pbkdf2_sha256"], pbkdf2_sha256__default_rounds=1)
        self.permits = threading.Semaphore(0)
        self.started: list[str] = []
        self._lock = threading.Lock()

    def hash(self, secret: str) -> str:
        return str(self.real.hash(secret))

    def verify(self, secret: str, stored: str) -> bool:
        with self._lock:
            self.started.append(secret)
        if secret == WRONG:
            assert self.permits.acquire(timeout=30)
        return bool(self.real.verify(secret, stored))

    def default_scheme(self) -> str:
        return "gated"


class Setup:
    def __init__(self, timeout: float) -> None:
        self.gate = GatedContext()
        self.hasher = SecretHasher(self.gate, offload=True, offload_threads=1)
        self.store = MemoryStore()
        self.store.timeout = timeout  # type: ignore[attr-defined]
        self.manager = KeyManager(self.store, hasher=self.hasher)

    async def keys(self, valid: int) -> tuple[str, list[tuple[str, str]]]:
        """The attacked key's id, and ``valid`` other keys as (id, secret)."""
        await self.manager.expose("orders", max_keys_per_kind=valid + 1)
        target = await self.manager.create_key("orders", name="Target", kind="internal")
        others = []
        for i in range(valid):
            key = await self.manager.create_key("orders", name=f"C{i}", kind="internal")
            assert key.secret is not None
            others.append((key.client_id, str(key.secret)))
        self.app = KeyGuard(
            Starlette(routes=[Route("/", lambda r: PlainTextResponse("ok"))]),
            store=self.store,
            api="orders",
            hasher=self.hasher,
        )
        return target.client_id, others

    async def request(self, client_id: str, secret: str, statuses: list[int]) -> None:
        headers = [
            (b"x-ibm-client-id", client_id.encode()),
            (b"x-ibm-client-secret", secret.encode()),
        ]
        sent = await run_asgi(self.app, http_scope("/", headers))
        statuses.append(sent[0]["status"])


async def until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(20):
        while not condition():  # noqa: ASYNC110 - polls the library's counters, no event
            await anyio.sleep(0.005)


async def test_first_requests_of_valid_keys_start_before_a_queued_flood() -> None:
    """With the one slot busy and seven wrong secrets for an id that failed before already
    waiting, five valid first requests arriving later verify next, then the flood."""
    s = Setup(timeout=30)  # nobody times out here: only the order is counted
    target, valid = await s.keys(5)
    wrong: list[int] = []
    ok: list[int] = []
    async with anyio.create_task_group() as tg:
        s.gate.permits.release()
        await s.request(target, WRONG, wrong)  # one earlier failure for the target
        assert wrong == [401]
        assert s.hasher.recent_failures(target) == 1
        for _ in range(8):
            tg.start_soon(s.request, target, WRONG, wrong)
        await until(lambda: s.hasher.queued() == 7)  # one holds the slot, seven wait
        for client_id, secret in valid:
            tg.start_soon(s.request, client_id, secret, ok)
        await until(lambda: s.hasher.queued() == 12)
        s.gate.permits.release(8)
    assert ok == [200] * 5
    assert wrong == [401] * 9
    secrets_in_order = [secret for _, secret in valid]
    assert s.gate.started[:2] == [WRONG, WRONG]
    assert sorted(s.gate.started[2:7]) == sorted(secrets_in_order)
    assert s.gate.started[7:] == [WRONG] * 7
    assert s.hasher.recent_failures(target) == 9
    assert all(s.hasher.recent_failures(client_id) == 0 for client_id, _ in valid)


async def test_a_first_burst_for_one_id_waits_behind_other_ids() -> None:
    """Before any of them has failed, six concurrent wrong secrets for one id rank by the
    verifications of that id already under way: three valid first requests arriving later
    still verify right after the one holding the slot."""
    s = Setup(timeout=30)
    target, valid = await s.keys(3)
    wrong: list[int] = []
    ok: list[int] = []
    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(s.request, target, WRONG, wrong)
        await until(lambda: s.hasher.queued() == 5)
        for client_id, secret in valid:
            tg.start_soon(s.request, client_id, secret, ok)
        await until(lambda: s.hasher.queued() == 8)
        s.gate.permits.release(6)
    assert ok == [200] * 3
    assert wrong == [401] * 6
    assert s.gate.started[0] == WRONG
    assert sorted(s.gate.started[1:4]) == sorted(secret for _, secret in valid)
    assert s.gate.started[4:] == [WRONG] * 5


async def test_flood_gets_the_503s_and_valid_first_requests_get_the_slot() -> None:
    """A flood of wrong secrets queued past the store's timeout: the flood's waiters are
    refused with 503, valid first requests that came later are admitted, and a secret
    that verified before is answered without queueing at all."""
    s = Setup(timeout=3)
    target, valid = await s.keys(4)
    wrong: list[int] = []
    ok: list[int] = []
    async with anyio.create_task_group() as tg:
        s.gate.permits.release()
        await s.request(target, WRONG, wrong)
        for _ in range(6):
            tg.start_soon(s.request, target, WRONG, wrong)
        await until(lambda: s.hasher.queued() == 5)
        for client_id, secret in valid:
            tg.start_soon(s.request, client_id, secret, ok)
        await until(lambda: s.hasher.queued() == 9)
        s.gate.permits.release()  # the slot's holder finishes: the valid ones go next
        await until(lambda: len(ok) == 4)
        assert ok == [200] * 4
        # The next wrong secret holds the slot now and four wait; a remembered secret
        # needs no slot.
        assert s.hasher.queued() == 4
        again: list[int] = []
        await s.request(*valid[0], again)
        assert again == [200]
        assert s.hasher.queued() == 4
        await until(lambda: wrong.count(503) == 4)
        s.gate.permits.release()
    assert sorted(wrong) == [401, 401, 401, 503, 503, 503, 503]
    assert s.gate.started.count(WRONG) == 3


async def test_failures_counted_only_where_a_verification_ran() -> None:
    """A wrong secret and a secret sent to a secretless key count against the id; a
    missing secret, an unknown id and a valid secret do not."""
    hasher = SecretHasher()
    manager = KeyManager(MemoryStore(), hasher=hasher)
    await manager.expose("orders")
    internal = await manager.create_key("orders", name="In", kind="internal")
    external = await manager.create_key("orders", name="Ex", kind="external")
    assert internal.secret is not None
    a = "orders"
    assert await manager.authenticate(a, internal.client_id, None) is Denial.INVALID_SECRET
    assert hasher.recent_failures(internal.client_id) == 0
    assert await manager.authenticate(a, internal.client_id, "x") is Denial.INVALID_SECRET
    assert await manager.authenticate(a, external.client_id, "x") is Denial.INVALID_SECRET
    assert hasher.recent_failures(internal.client_id) == 1
    assert hasher.recent_failures(external.client_id) == 1
    unknown = "0" * 32
    assert await manager.authenticate(a, unknown, "x") is Denial.CLIENT_ID_NOT_REGISTERED
    assert hasher.recent_failures(unknown) == 0
    info = await manager.authenticate(a, internal.client_id, str(internal.secret))
    assert not isinstance(info, Denial)
    assert hasher.recent_failures(internal.client_id) == 1


def test_failure_counts_are_bounded_and_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    """At most ``max_remembered`` ids are counted (the least recently failed go first);
    a count older than FAILURE_WINDOW no longer counts, and the next failure restarts it."""
    hasher = SecretHasher(max_remembered=3)
    for i in range(10):
        hasher.failed(f"{i:032x}")
    hasher.failed(f"{7:032x}")
    assert len(hasher._failures) == 3
    assert [hasher.recent_failures(f"{i:032x}") for i in (0, 6, 7, 8, 9)] == [0, 0, 2, 1, 1]
    now = time.monotonic()
    later = now + keyguard.secrets.FAILURE_WINDOW + 1
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert hasher.recent_failures(f"{7:032x}") == 0
    hasher.failed(f"{7:032x}")
    assert hasher.recent_failures(f"{7:032x}") == 1


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    """A request cancelled while waiting for a slot (client gone) leaves no waiter behind,
    and the slot still goes round afterwards."""
    s = Setup(timeout=30)
    target, valid = await s.keys(1)
    wrong: list[int] = []
    ok: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(s.request, target, WRONG, wrong)
        await until(lambda: len(s.gate.started) == 1)
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as inner:
                inner.start_soon(s.request, target, WRONG, wrong)
                await until(lambda: s.hasher.queued() == 1)
                scope.cancel()
        assert s.hasher.queued() == 0
        tg.start_soon(s.request, *valid[0], ok)
        await until(lambda: s.hasher.queued() == 1)
        s.gate.permits.release()
    assert wrong == [401]
    assert ok == [200]
