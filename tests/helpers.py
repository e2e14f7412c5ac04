"""Small test-only helpers: an ASGI driver and a store wrapper that counts or fails.

The wrapper sits around a *real* store; it never stands in for a database.
Its ``fail_with`` models an outage for front-door tests that do not need a
real server to be stopped (the store tests break real servers).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import cast

import anyio
from starlette.types import ASGIApp, Message, Scope

from keyguard import KeyStore
from keyguard.audit import AuditEvent
from keyguard.models import Api, KeyChanges, KeyKind, KeyRecord, RateLimit, utcnow
from keyguard.secrets import new_client_id
from keyguard.stores._paging import DEFAULT_PAGE_SIZE, KeyPage
from keyguard.stores.base import Snapshots
from keyguard.usage import UsageCount


async def eventually(check: Callable[[], Awaitable[bool]], deadline: float = 60) -> None:
    """Wait until ``check()`` is true (another task's, store's or process's effect, with no
    event to await); fail after a generous ``deadline`` in seconds."""
    with anyio.fail_after(deadline):
        while not await check():  # noqa: ASYNC110 - polled: there is no event to await
            await anyio.sleep(0.02)


def record(
    api: str = "orders",
    name: str = "Acme",
    kind: KeyKind = KeyKind.EXTERNAL,
    secret_hash: str | None = None,
    client_id: str | None = None,
    offset: int = 0,
) -> KeyRecord:
    """A key record as ``KeyManager`` would build it (an internal key always has a hash:
    a placeholder unless ``secret_hash`` is given), created ``offset`` ms from now."""
    if secret_hash is None and kind is KeyKind.INTERNAL:
        secret_hash = "$pbkdf2-sha256$1$placeholder"
    return KeyRecord(
        api=api,
        client_id=client_id or new_client_id(),
        name=name,
        kind=kind,
        secret_hash=secret_hash,
        created_at=utcnow() + timedelta(milliseconds=offset),
    )


async def expose(store: KeyStore, api: str = "orders", limit: int | None = None) -> Api:
    """Create (if needed) and expose ``api`` on ``store``, optionally setting its limit."""
    return await store.upsert_api(
        api, exposed=True, max_keys_per_kind=limit, default_max_keys_per_kind=5
    )


class CountingStore:
    """Delegates to ``inner`` and counts calls per method (``calls["lookup"]`` …).

    Setting ``fail_with`` to an exception makes every call raise it (an outage)
    until it is set back to ``None``.
    """

    def __init__(self, inner: KeyStore) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.lookups: list[tuple[str, str | None]] = []
        self.fail_with: Exception | None = None

    def _enter(self, method: str) -> None:
        self.calls[method] += 1
        if self.fail_with is not None:
            raise self.fail_with

    async def lookup(self, api: str, client_id: str | None) -> tuple[bool, KeyRecord | None]:
        self._enter("lookup")
        self.lookups.append((api, client_id))
        return await self.inner.lookup(api, client_id)

    async def snapshot(
        self, api: str, *, max_keys: int
    ) -> tuple[Api | None, list[KeyRecord] | None]:
        self._enter("snapshot")
        return await cast("Snapshots", self.inner).snapshot(api, max_keys=max_keys)

    async def get_api(self, api: str) -> Api | None:
        self._enter("get_api")
        return await self.inner.get_api(api)

    async def list_apis(self) -> list[Api]:
        self._enter("list_apis")
        return await self.inner.list_apis()

    async def upsert_api(
        self,
        api: str,
        *,
        exposed: bool | None,
        max_keys_per_kind: int | None,
        default_max_keys_per_kind: int,
        rate_limits: tuple[RateLimit, ...] | None = None,
        audit: AuditEvent | None = None,
    ) -> Api:
        self._enter("upsert_api")
        return await self.inner.upsert_api(
            api,
            exposed=exposed,
            max_keys_per_kind=max_keys_per_kind,
            default_max_keys_per_kind=default_max_keys_per_kind,
            rate_limits=rate_limits,
            audit=audit,
        )

    async def insert_key(self, record: KeyRecord, *, audit: AuditEvent | None = None) -> None:
        self._enter("insert_key")
        await self.inner.insert_key(record, audit=audit)

    async def get_key(self, api: str, client_id: str) -> KeyRecord | None:
        self._enter("get_key")
        return await self.inner.get_key(api, client_id)

    async def list_keys(self, api: str) -> list[KeyRecord]:
        self._enter("list_keys")
        return await self.inner.list_keys(api)

    async def page_keys(
        self,
        api: str,
        *,
        limit: int = DEFAULT_PAGE_SIZE,
        after: str | None = None,
        name: str | None = None,
    ) -> KeyPage:
        self._enter("page_keys")
        return await self.inner.page_keys(api, limit=limit, after=after, name=name)

    async def update_key(
        self,
        api: str,
        client_id: str,
        changes: KeyChanges,
        *,
        audit: AuditEvent | None = None,
    ) -> KeyRecord | None:
        self._enter("update_key")
        return await self.inner.update_key(api, client_id, changes, audit=audit)

    async def set_secret_hash(
        self,
        api: str,
        client_id: str,
        secret_hash: str,
        *,
        previous_until: datetime | None = None,
        audit: AuditEvent | None = None,
    ) -> KeyRecord | None:
        self._enter("set_secret_hash")
        return await self.inner.set_secret_hash(
            api, client_id, secret_hash, previous_until=previous_until, audit=audit
        )

    async def delete_key(
        self, api: str, client_id: str, *, audit: AuditEvent | None = None
    ) -> bool:
        self._enter("delete_key")
        return await self.inner.delete_key(api, client_id, audit=audit)

    async def delete_api(self, api: str, *, force: bool, audit: AuditEvent | None = None) -> bool:
        self._enter("delete_api")
        return await self.inner.delete_api(api, force=force, audit=audit)

    async def list_audit(
        self,
        *,
        api: str | None = None,
        client_id: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[AuditEvent]:
        self._enter("list_audit")
        return await self.inner.list_audit(api=api, client_id=client_id, limit=limit, before=before)

    async def record_usage(self, counts: Sequence[UsageCount]) -> None:
        self._enter("record_usage")
        await self.inner.record_usage(counts)

    async def read_usage(
        self, api: str, client_id: str | None, since: datetime
    ) -> list[UsageCount]:
        self._enter("read_usage")
        return await self.inner.read_usage(api, client_id, since)

    async def prune_usage(self, before: datetime) -> None:
        self._enter("prune_usage")
        await self.inner.prune_usage(before)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def run_asgi(
    app: ASGIApp, scope: Scope, incoming: list[Message] | None = None
) -> list[Message]:
    """Call ``app`` once with ``scope``; return every message it sent.

    ``incoming`` are the messages ``receive`` hands out, in order; after them
    ``receive`` reports a disconnect.
    """
    queue = list(incoming or [])
    sent: list[Message] = []

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        kind = "websocket.disconnect" if scope["type"] == "websocket" else "http.disconnect"
        return {"type": kind}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def http_scope(path: str = "/", headers: list[tuple[bytes, bytes]] | None = None) -> Scope:
    """A minimal HTTP GET scope."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers or [],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
