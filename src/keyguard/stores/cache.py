"""``CachedStore``: a bounded, short-lived cache of the request path's lookups.

A remote store costs a network round trip per request. ``CachedStore`` wraps
any store and keeps, per API, a *snapshot*: whether the API is exposed and
all of its keys (an API holds at most ``2 * max_keys_per_kind`` keys, ten by
default). A lookup is answered from the API's snapshot while it is fresh,
whatever the client id — so a flood of made-up ids, well-formed or not,
costs at most one refresh per API per ``ttl``, never one store round trip
per request. Concurrent lookups that miss share one refresh.

Made-up API names (an ``api=`` callable reading the host or the path) are
bounded the same way: the cache also keeps the set of existing API names,
read with one ``list_apis`` at most once per ``ttl`` when a name it has no
snapshot of is asked for. A name not in that set is answered "unknown"
from it, so a flood of invented names costs at most one store read per
``ttl``, and never fills the cache (only existing APIs get a snapshot).

Everything else (management reads and every write) goes straight to the
wrapped store. Staleness is bounded three ways:

* a write made through this ``CachedStore`` (so through any ``KeyManager``,
  middleware or management app sharing it) drops the API's snapshot before
  it returns: this process sees its own changes at once;
* where the wrapped store has a change feed (``ChangeFeed``: Redis pub/sub),
  a change made by another process drops the snapshot as soon as the
  notice arrives;
* in every case a snapshot is used for at most ``ttl`` seconds from when its
  read *started*: the documented bound for a change made elsewhere (R7), e.g.
  if a notice is lost, and it holds while the store is slow.

A snapshot used in the last quarter of its TTL is refreshed in the
background while it keeps answering, so a busy API's requests never wait on
the store; a request waits only when no valid snapshot exists.

Memory is bounded by ``max_entries``: the snapshots together hold at most
that many keys (each API counting one more), the oldest dropped first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from keyguard import metrics
from keyguard.audit import AuditEvent
from keyguard.errors import ConfigurationError
from keyguard.models import Api, KeyChanges, KeyRecord, RateLimit
from keyguard.stores._paging import DEFAULT_PAGE_SIZE, KeyPage
from keyguard.stores.base import ChangeFeed, KeyStore

if TYPE_CHECKING:
    from keyguard.usage import UsageCount

__all__ = ["DEFAULT_CACHE_TTL", "DEFAULT_MAX_ENTRIES", "CachedStore", "check_cache_ttl"]

DEFAULT_CACHE_TTL = 1.0
DEFAULT_MAX_ENTRIES = 100_000
REFRESH_AHEAD = 0.25
"""The last part of its TTL in which a snapshot in use is refreshed in the background."""

logger = logging.getLogger("keyguard")


def check_cache_ttl(ttl: object) -> None:
    """Raise ``ConfigurationError`` unless ``ttl`` is ``None``, 0 (no cache) or in (0, 3600].

    The one check of a cache TTL, for every store (``open_store`` and ``CachedStore``).
    """
    if ttl is None:
        return
    if (
        isinstance(ttl, bool)
        or not isinstance(ttl, (int, float))
        or not (ttl == 0 or 0 < ttl <= 3600)
    ):
        raise ConfigurationError(
            f"cache ttl must be 0 or None (no cache) or a number of seconds in (0, 3600], "
            f"got {ttl!r}"
        )


@dataclass(frozen=True, slots=True)
class _Snapshot:
    expires: float
    exposed: bool
    keys: dict[str, KeyRecord]
    rate_limits: tuple[RateLimit, ...] = ()

    @property
    def size(self) -> int:
        return 1 + len(self.keys)


@dataclass(frozen=True, slots=True)
class _Names:
    expires: float
    existing: frozenset[str]


class CachedStore:
    """Wrap ``store`` with per-API snapshots kept ``ttl`` seconds, ``max_entries`` keys in all.

    ``clock`` is the monotonic clock used for expiry (tests pass their own).
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        ttl: float = DEFAULT_CACHE_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_cache_ttl(ttl)
        if not ttl:
            raise ConfigurationError("cache ttl must be a number of seconds in (0, 3600]")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigurationError("cache max_entries must be a positive whole number")
        self.store = store
        self.ttl = float(ttl)
        # A snapshot this close to expiry is refreshed in the background on its next use.
        self._ahead = self.ttl * REFRESH_AHEAD
        self.max_entries = max_entries
        self._clock = clock
        self._snapshots: dict[str, _Snapshot] = {}
        self._size = 0
        self._refreshing: dict[str, asyncio.Task[_Snapshot]] = {}
        self._names: _Names | None = None
        self._names_task: asyncio.Task[_Names] | None = None
        self._feed = store if isinstance(store, ChangeFeed) else None
        # keyguard.metrics: the refreshes' reads timed, lookups counted (no-ops when off).
        self._reads = metrics.timed_store(store)
        self._count_lookup = metrics.count_lookup()
        self._watcher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"CachedStore({self.store!r}, ttl={self.ttl})"

    @property
    def description(self) -> str:
        """The wrapped store's description (for log lines)."""
        inner = getattr(self.store, "description", None)
        return inner if isinstance(inner, str) else repr(self.store)

    @property
    def timeout(self) -> float | None:
        """The wrapped store's timeout, if it has one."""
        value = getattr(self.store, "timeout", None)
        return float(value) if isinstance(value, (int, float)) else None

    def __len__(self) -> int:
        """How many entries (APIs plus their keys) the cache holds now."""
        return self._size

    # -- the request path ---------------------------------------------------------------------

    async def lookup(self, api: str, client_id: str | None) -> tuple[bool, KeyRecord | None]:
        """The answer from ``api``'s snapshot, refreshed from the store when stale."""
        if self._feed is not None and (self._watcher is None or self._watcher.done()):
            # Not listening (first use, or a new event loop): what is cached may
            # have missed notices, so start afresh.
            self.clear()
            self._start_watching(self._feed)
        snapshot = self._snapshots.get(api)
        now = self._clock()
        if snapshot is None or snapshot.expires <= now:
            self._count_lookup(False)
            if snapshot is None and api not in (await self._api_names()).existing:
                # An API nobody created (perhaps a made-up name): no read of its own.
                return False, None
            snapshot = await self._refresh(api)
        else:
            self._count_lookup(True)
            if snapshot.expires - now <= self._ahead and api not in self._refreshing:
                # Nearly expired: refresh it in the background and answer from it meanwhile,
                # so no request waits on the store while a valid entry exists (SPEC §11).
                self._start_refresh(api)
        return snapshot.exposed, None if client_id is None else snapshot.keys.get(client_id)

    def cached_rate_limits(self, api: str) -> tuple[RateLimit, ...] | None:
        """``api``'s rate limits from its snapshot while it is fresh, else ``None``
        (what ``KeyManager`` reads right after a ``lookup``: no store round trip)."""
        snapshot = self._snapshots.get(api)
        if snapshot is None or snapshot.expires <= self._clock():
            return None
        return snapshot.rate_limits

    async def _api_names(self) -> _Names:
        names = self._names
        if names is not None and names.expires > self._clock():
            return names
        loop = asyncio.get_running_loop()
        task = self._names_task
        if task is None or task.get_loop() is not loop:
            task = loop.create_task(self._fetch_names(), name="keyguard-cache-refresh-names")
            self._names_task = task
            task.add_done_callback(self._names_refreshed)
        return await asyncio.shield(task)

    async def _fetch_names(self) -> _Names:
        read_at = self._clock()
        apis = await self._reads.list_apis()
        return _Names(read_at + self.ttl, frozenset(a.name for a in apis))

    def _names_refreshed(self, task: asyncio.Task[_Names]) -> None:
        failed = task.cancelled() or task.exception() is not None  # (retrieves the exception)
        if self._names_task is task:
            self._names_task = None
            if not failed:
                self._names = task.result()

    async def _refresh(self, api: str) -> _Snapshot:
        loop = asyncio.get_running_loop()
        task = self._refreshing.get(api)
        if task is None or task.get_loop() is not loop:
            task = self._start_refresh(api)
        return await asyncio.shield(task)

    def _start_refresh(self, api: str) -> asyncio.Task[_Snapshot]:
        # Its own task, shared by every lookup that misses meanwhile: a caller that
        # is cancelled (a client gone) cancels neither the refresh nor the others.
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._fetch(api), name=f"keyguard-cache-refresh-{api}")
        self._refreshing[api] = task
        task.add_done_callback(functools.partial(self._refreshed, api))
        return task

    async def _fetch(self, api: str) -> _Snapshot:
        read_at = self._clock()  # the snapshot's age counts from before the reads
        found = await self._reads.get_api(api)
        records = await self._reads.list_keys(api) if found is not None else []
        return _Snapshot(
            read_at + self.ttl,
            found is not None and found.exposed,
            {record.client_id: record for record in records},
            () if found is None else found.rate_limits,
        )

    def _refreshed(self, api: str, task: asyncio.Task[_Snapshot]) -> None:
        failed = task.cancelled() or task.exception() is not None  # (retrieves the exception)
        if self._refreshing.get(api) is task:
            del self._refreshing[api]
            if not failed:
                self._keep(api, task.result())
        # Otherwise the API was invalidated while this refresh ran: its answer may
        # predate the change, so it is not kept.

    def _keep(self, api: str, snapshot: _Snapshot) -> None:
        self._drop(api)
        while self._snapshots and self._size + snapshot.size > self.max_entries:
            self._drop(next(iter(self._snapshots)))  # oldest first: dicts keep order
        if snapshot.size <= self.max_entries:
            self._snapshots[api] = snapshot
            self._size += snapshot.size

    def _drop(self, api: str) -> None:
        old = self._snapshots.pop(api, None)
        if old is not None:
            self._size -= old.size

    # -- invalidation ---------------------------------------------------------------------------

    def invalidate(self, api: str, client_id: str | None = None) -> None:
        """Forget what is cached of ``api`` (a change to any of its keys changes its snapshot).

        A refresh of ``api`` already under way is neither kept nor shared with later
        lookups: it may have read the store before the change.
        """
        self._drop(api)
        self._refreshing.pop(api, None)
        if client_id is None:
            # The API itself changed (created, perhaps): the set of names may too.
            self._names = None
            self._names_task = None

    def clear(self) -> None:
        """Forget everything."""
        self._snapshots.clear()
        self._size = 0
        self._refreshing.clear()
        self._names = None
        self._names_task = None

    # -- pass-through reads and invalidating writes --------------------------------------------

    async def get_api(self, api: str) -> Api | None:
        return await self.store.get_api(api)

    async def list_apis(self) -> list[Api]:
        return await self.store.list_apis()

    async def get_key(self, api: str, client_id: str) -> KeyRecord | None:
        return await self.store.get_key(api, client_id)

    async def list_keys(self, api: str) -> list[KeyRecord]:
        return await self.store.list_keys(api)

    async def page_keys(
        self,
        api: str,
        *,
        limit: int = DEFAULT_PAGE_SIZE,
        after: str | None = None,
        name: str | None = None,
    ) -> KeyPage:
        return await self.store.page_keys(api, limit=limit, after=after, name=name)

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
        try:
            return await self.store.upsert_api(
                api,
                exposed=exposed,
                max_keys_per_kind=max_keys_per_kind,
                default_max_keys_per_kind=default_max_keys_per_kind,
                rate_limits=rate_limits,
                audit=audit,
            )
        finally:
            self.invalidate(api)

    async def insert_key(self, record: KeyRecord, *, audit: AuditEvent | None = None) -> None:
        try:
            await self.store.insert_key(record, audit=audit)
        finally:
            self.invalidate(record.api, record.client_id)

    async def update_key(
        self,
        api: str,
        client_id: str,
        changes: KeyChanges,
        *,
        audit: AuditEvent | None = None,
    ) -> KeyRecord | None:
        try:
            return await self.store.update_key(api, client_id, changes, audit=audit)
        finally:
            self.invalidate(api, client_id)

    async def set_secret_hash(
        self,
        api: str,
        client_id: str,
        secret_hash: str,
        *,
        previous_until: datetime | None = None,
        audit: AuditEvent | None = None,
    ) -> KeyRecord | None:
        try:
            return await self.store.set_secret_hash(
                api, client_id, secret_hash, previous_until=previous_until, audit=audit
            )
        finally:
            self.invalidate(api, client_id)

    async def delete_key(
        self, api: str, client_id: str, *, audit: AuditEvent | None = None
    ) -> bool:
        try:
            return await self.store.delete_key(api, client_id, audit=audit)
        finally:
            self.invalidate(api, client_id)

    async def delete_api(self, api: str, *, force: bool, audit: AuditEvent | None = None) -> bool:
        try:
            return await self.store.delete_api(api, force=force, audit=audit)
        finally:
            self.invalidate(api)

    async def list_audit(
        self,
        *,
        api: str | None = None,
        client_id: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[AuditEvent]:
        return await self.store.list_audit(api=api, client_id=client_id, limit=limit, before=before)

    # Usage goes straight through: a key's last_used_at changing drops no snapshot (it is
    # approximate by design, SPEC §8, and would otherwise empty the cache every flush).

    async def record_usage(self, counts: Sequence[UsageCount]) -> None:
        await self.store.record_usage(counts)

    async def read_usage(
        self, api: str, client_id: str | None, since: datetime
    ) -> list[UsageCount]:
        return await self.store.read_usage(api, client_id, since)

    async def prune_usage(self, before: datetime) -> None:
        await self.store.prune_usage(before)

    async def aclose(self) -> None:
        """Stop watching for changes and close the wrapped store."""
        refreshing: list[asyncio.Task[object]] = [*self._refreshing.values()]
        if self._names_task is not None:
            refreshing.append(self._names_task)
        for task in refreshing:
            task.cancel()
        for task in refreshing:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
            self._watcher = None
        self.clear()
        await self.store.aclose()

    # -- the change feed -----------------------------------------------------------------------

    def _start_watching(self, feed: ChangeFeed) -> None:
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch(feed), name="keyguard-cache-watch"
        )

    async def _watch(self, feed: ChangeFeed) -> None:
        delay = 0.1
        lost = False

        def ready() -> None:
            nonlocal delay, lost
            delay = 0.1
            if lost:
                logger.info("key store change feed restored")
                lost = False
            # Notices may have been missed while not listening: start afresh.
            self.clear()

        while True:
            try:
                await feed.watch(self.invalidate, on_ready=ready)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Once per outage; the cache's TTL bounds staleness meanwhile.
                if not lost:
                    logger.warning("key store change feed lost (%s); retrying", type(exc).__name__)
                    lost = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.ttl)
