"""``memory://``: keys in a dict of this process. For tests and single-process demos."""

from __future__ import annotations

import bisect
import dataclasses
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta

from keyguard.audit import DEFAULT_AUDIT_RETENTION, AuditEvent, check_retention, cutoff_id
from keyguard.errors import ApiHasKeys, ApiNotExposed, DuplicateName, KeyLimitReached
from keyguard.models import Api, KeyChanges, KeyKind, KeyRecord, RateLimit, name_key
from keyguard.stores._idtag import new_tag_key_text, parse_tag_key
from keyguard.stores._paging import (
    DEFAULT_PAGE_SIZE,
    KeyPage,
    check_page,
    decode_cursor,
    encode_cursor,
    name_filter,
    to_micros,
)
from keyguard.usage import UsageCount

__all__ = ["MemoryStore"]


@dataclasses.dataclass
class _ApiState:
    exposed: bool
    max_keys_per_kind: int
    rate_limits: tuple[RateLimit, ...] = ()
    # client_id -> record, in insertion order (created_at order for this process)
    keys: dict[str, KeyRecord] = dataclasses.field(default_factory=dict)
    names: set[str] = dataclasses.field(default_factory=set)
    counts: dict[KeyKind, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(KeyKind, 0)
    )
    # The listing order (SPEC §5): (created_at in µs, insertion number, client_id), sorted.
    order: list[tuple[int, int, str]] = dataclasses.field(default_factory=list)
    positions: dict[str, tuple[int, int, str]] = dataclasses.field(default_factory=dict)
    inserted: int = 0


class MemoryStore:
    """An in-process store. Each instance is independent; nothing outlives the process.

    Every operation completes without awaiting, so it is atomic among the tasks
    of one event loop; a lock makes writes safe across threads too.
    """

    def __init__(self, *, audit_retention: timedelta | float = DEFAULT_AUDIT_RETENTION) -> None:
        self._apis: dict[str, _ApiState] = {}
        self._lock = threading.Lock()
        self.audit_retention = check_retention(audit_retention)
        # Oldest first, by id: new events append (ids only grow within a process).
        self._audit: list[AuditEvent] = []
        # (api, hour) -> client_id -> [requests, rate_limited]
        self._usage: dict[tuple[str, datetime], dict[str, list[int]]] = {}
        self._id_tag_key: bytes | None = None

    def __repr__(self) -> str:
        keys = sum(len(state.keys) for state in self._apis.values())
        return f"MemoryStore(apis={len(self._apis)}, keys={keys})"

    @property
    def description(self) -> str:
        """Where the keys are, for log lines."""
        return "in-process memory store"

    async def lookup(self, api: str, client_id: str | None) -> tuple[bool, KeyRecord | None]:
        exposed, record, _ = self.lookup_now(api, client_id)
        return exposed, record

    def lookup_now(
        self, api: str, client_id: str | None
    ) -> tuple[bool, KeyRecord | None, tuple[RateLimit, ...]]:
        """``lookup``'s answer, and the API's rate limits (``()`` for an unknown API), at
        once: what the request path reads (``keyguard.stores.base.LookupNow``)."""
        state = self._apis.get(api)
        if state is None:
            return False, None, ()
        return (
            state.exposed,
            None if client_id is None else state.keys.get(client_id),
            state.rate_limits,
        )

    def cached_rate_limits(self, api: str) -> tuple[RateLimit, ...] | None:
        """``api``'s rate limits as they are now (``None`` for an unknown API): read by
        ``KeyManager`` right after a ``lookup``, without an ``await``."""
        state = self._apis.get(api)
        return None if state is None else state.rate_limits

    async def get_api(self, api: str) -> Api | None:
        state = self._apis.get(api)
        return None if state is None else self._api(api, state)

    async def snapshot(
        self, api: str, *, max_keys: int
    ) -> tuple[Api | None, list[KeyRecord] | None]:
        state = self._apis.get(api)
        if state is None:
            return None, None
        keys = list(state.keys.values()) if len(state.keys) <= max_keys else None
        return self._api(api, state), keys

    async def list_apis(self) -> list[Api]:
        return [self._api(name, self._apis[name]) for name in sorted(self._apis)]

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
        with self._lock:
            state = self._apis.get(api)
            if state is None:
                state = self._apis[api] = _ApiState(False, default_max_keys_per_kind)
            if exposed is not None:
                state.exposed = exposed
            if max_keys_per_kind is not None:
                state.max_keys_per_kind = max_keys_per_kind
            if rate_limits is not None:
                state.rate_limits = rate_limits
            self._record(audit)
            return self._api(api, state)

    async def insert_key(self, record: KeyRecord, *, audit: AuditEvent | None = None) -> None:
        with self._lock:
            state = self._apis.get(record.api)
            if state is None or not state.exposed:
                raise ApiNotExposed(f"API {record.api!r} is not exposed")
            if state.counts[record.kind] >= state.max_keys_per_kind:
                raise KeyLimitReached(
                    f"API {record.api!r} has no room for another {record.kind.value} key "
                    f"(at most {state.max_keys_per_kind} per kind)"
                )
            folded = name_key(record.name)
            if folded in state.names:
                raise DuplicateName(f"API {record.api!r} already has a key named {record.name!r}")
            state.keys[record.client_id] = record
            state.names.add(folded)
            state.counts[record.kind] += 1
            state.inserted += 1
            position = (to_micros(record.created_at), state.inserted, record.client_id)
            bisect.insort(state.order, position)
            state.positions[record.client_id] = position
            self._record(audit)

    async def get_key(self, api: str, client_id: str) -> KeyRecord | None:
        state = self._apis.get(api)
        return None if state is None else state.keys.get(client_id)

    async def list_keys(self, api: str) -> list[KeyRecord]:
        state = self._apis.get(api)
        return [] if state is None else [state.keys[entry[2]] for entry in state.order]

    async def page_keys(
        self,
        api: str,
        *,
        limit: int = DEFAULT_PAGE_SIZE,
        after: str | None = None,
        name: str | None = None,
    ) -> KeyPage:
        """A walk of the API's sorted positions from the cursor's (one bisect); with a
        ``name``, as far as it takes to fill the page (memory is fast)."""
        check_page(limit)
        start = None if after is None else decode_cursor(after)
        needle = name_filter(name)
        state = self._apis.get(api)
        if state is None:
            return KeyPage([], None)
        with self._lock:
            order = state.order
            index = 0 if start is None else bisect.bisect_left(order, (start[0], start[1] + 1))
            found: list[KeyRecord] = []
            last: tuple[int, int, str] | None = None
            while index < len(order):
                if len(found) == limit:
                    assert last is not None
                    return KeyPage(found, encode_cursor(last[0], last[1]))
                last = order[index]
                index += 1
                record = state.keys[last[2]]
                if needle is None or needle in name_key(record.name):
                    found.append(record)
            return KeyPage(found, None)

    async def update_key(
        self,
        api: str,
        client_id: str,
        changes: KeyChanges,
        *,
        audit: AuditEvent | None = None,
    ) -> KeyRecord | None:
        with self._lock:
            state = self._apis.get(api)
            record = None if state is None else state.keys.get(client_id)
            if state is None or record is None:
                return None
            updated = changes.apply(record)
            old, new = name_key(record.name), name_key(updated.name)
            if new != old:
                if new in state.names:
                    raise DuplicateName(f"API {api!r} already has a key named {updated.name!r}")
                state.names.discard(old)
                state.names.add(new)
            state.keys[client_id] = updated
            self._record(audit)
            return updated

    async def set_secret_hash(
        self,
        api: str,
        client_id: str,
        secret_hash: str,
        *,
        previous_until: datetime | None = None,
        audit: AuditEvent | None = None,
    ) -> KeyRecord | None:
        with self._lock:
            state = self._apis.get(api)
            record = None if state is None else state.keys.get(client_id)
            if state is None or record is None or record.kind is not KeyKind.EXTERNAL:
                return None
            keep = previous_until is not None and record.secret_hash is not None
            updated = dataclasses.replace(
                record,
                secret_hash=secret_hash,
                previous_secret_hash=record.secret_hash if keep else None,
                previous_secret_expires_at=previous_until if keep else None,
            )
            state.keys[client_id] = updated
            self._record(audit)
            return updated

    async def delete_key(
        self, api: str, client_id: str, *, audit: AuditEvent | None = None
    ) -> bool:
        with self._lock:
            state = self._apis.get(api)
            record = None if state is None else state.keys.pop(client_id, None)
            if state is None or record is None:
                return False
            state.names.discard(name_key(record.name))
            state.counts[record.kind] -= 1
            position = state.positions.pop(client_id)
            del state.order[bisect.bisect_left(state.order, position)]
            self._record(audit)
            return True

    async def delete_api(self, api: str, *, force: bool, audit: AuditEvent | None = None) -> bool:
        with self._lock:
            state = self._apis.get(api)
            if state is None:
                return False
            if state.keys and not force:
                raise ApiHasKeys.holding(api, len(state.keys))
            del self._apis[api]
            self._record(audit)
            return True

    async def list_audit(
        self,
        *,
        api: str | None = None,
        client_id: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[AuditEvent]:
        cutoff = cutoff_id(self.audit_retention)
        with self._lock:
            events = self._audit
            end = len(events) if before is None else bisect.bisect_left(events, before, key=_id)
            found: list[AuditEvent] = []
            for index in range(end - 1, -1, -1):
                event = events[index]
                if event.id < cutoff or len(found) >= limit:
                    break
                if (api is None or event.api == api) and (
                    client_id is None or event.client_id == client_id
                ):
                    found.append(event)
            return found

    def _record(self, audit: AuditEvent | None) -> None:
        """Keep ``audit`` (called under the lock, once the change is made); prune old ones."""
        if audit is None:
            return
        events = self._audit
        if events and events[-1].id > audit.id:
            bisect.insort(events, audit, key=_id)  # an id made by another process's clock
        else:
            events.append(audit)
        cutoff = cutoff_id(self.audit_retention)
        if events[0].id < cutoff:
            del events[: bisect.bisect_left(events, cutoff, key=_id)]

    async def record_usage(self, counts: Sequence[UsageCount]) -> None:
        with self._lock:
            for count in counts:
                bucket = self._usage.setdefault((count.api, count.hour), {})
                held = bucket.setdefault(count.client_id, [0, 0])
                held[0] += count.requests
                held[1] += count.rate_limited
                used = count.last_used_at
                state = self._apis.get(count.api)
                record = None if state is None else state.keys.get(count.client_id)
                if state is None or record is None or used is None:
                    continue
                if record.last_used_at is None or record.last_used_at < used:
                    state.keys[count.client_id] = dataclasses.replace(record, last_used_at=used)

    async def read_usage(
        self, api: str, client_id: str | None, since: datetime
    ) -> list[UsageCount]:
        found = []
        for (bucket_api, hour), bucket in list(self._usage.items()):
            if bucket_api != api or hour < since:
                continue
            for key_id, (requests, limited) in list(bucket.items()):
                if client_id is None or key_id == client_id:
                    found.append(UsageCount(api, key_id, hour, requests, limited))
        return found

    async def prune_usage(self, before: datetime) -> None:
        with self._lock:
            for api, hour in [slot for slot in self._usage if slot[1] < before]:
                del self._usage[(api, hour)]

    async def id_tag_key(self) -> bytes:
        """This store's client id tag key (``IdTagKeys``): made on first call, kept here."""
        with self._lock:
            if self._id_tag_key is None:
                self._id_tag_key = parse_tag_key(new_tag_key_text(), "memory store")
            return self._id_tag_key

    async def aclose(self) -> None:
        """Nothing to release; the data stays until the store is garbage-collected."""

    @staticmethod
    def _api(name: str, state: _ApiState) -> Api:
        return Api(
            name=name,
            exposed=state.exposed,
            max_keys_per_kind=state.max_keys_per_kind,
            internal_keys=state.counts[KeyKind.INTERNAL],
            external_keys=state.counts[KeyKind.EXTERNAL],
            rate_limits=state.rate_limits,
        )


def _id(event: AuditEvent) -> str:
    return event.id
