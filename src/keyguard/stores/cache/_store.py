"""``CachedStore`` itself (see the package docstring for what it keeps and why)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, cast

from keyguard import metrics
from keyguard.audit import AuditEvent
from keyguard.errors import ConfigurationError, StoreClosed, StoreUnavailable
from keyguard.models import Api, KeyChanges, KeyRecord, RateLimit
from keyguard.stores._paging import DEFAULT_PAGE_SIZE, KeyPage
from keyguard.stores.base import ChangeFeed, KeyStore, Snapshots
from keyguard.stores.cache._entries import (
    ApiEntry,
    Entries,
    InFlight,
    KeyEntry,
    MissBudget,
    Names,
)

if TYPE_CHECKING:
    from keyguard.usage import UsageCount

__all__ = [
    "DEFAULT_CACHE_TTL",
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_MISS_READS_PER_SECOND",
    "DEFAULT_SNAPSHOT_KEYS",
    "REFRESH_AHEAD",
    "CachedStore",
    "check_cache_ttl",
]

DEFAULT_CACHE_TTL = 1.0
DEFAULT_MAX_ENTRIES = 100_000
DEFAULT_SNAPSHOT_KEYS = 1000
"""An API holding at most this many keys is cached whole, as one snapshot."""
DEFAULT_MISS_READS_PER_SECOND = 1000.0
"""Store reads per second a process spends on cache misses of large APIs' client ids."""
REFRESH_AHEAD = 0.25
"""The last part of its TTL in which an entry in use is refreshed in the background."""
_WARN_EVERY = 60.0

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


def _whole(value: object, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"cache {name} must be a whole number of at least {minimum}")
    return value


class CachedStore:
    """Wrap ``store`` with entries kept ``ttl`` seconds, ``max_entries`` keys in all.

    ``snapshot_keys``: an API holding at most this many keys (and at most a quarter of
    ``max_entries``, so a snapshot leaves room for others) is cached whole (one snapshot,
    one round trip per refresh), a larger one key by key. ``miss_reads_per_second``: the
    store reads this process spends at most on misses of large APIs' client ids (the
    flood bound). ``precheck``: an optional ``(api, client_id) -> bool`` run before such
    a read; ``False`` answers "not registered" without one. ``clock`` is the monotonic
    clock used for expiry (tests pass their own).
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        ttl: float = DEFAULT_CACHE_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        snapshot_keys: int = DEFAULT_SNAPSHOT_KEYS,
        miss_reads_per_second: float = DEFAULT_MISS_READS_PER_SECOND,
        precheck: Callable[[str, str], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_cache_ttl(ttl)
        if not ttl:
            raise ConfigurationError("cache ttl must be a number of seconds in (0, 3600]")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigurationError("cache max_entries must be a positive whole number")
        _whole(snapshot_keys, "snapshot_keys", minimum=0)
        if (
            isinstance(miss_reads_per_second, bool)
            or not isinstance(miss_reads_per_second, (int, float))
            or not 1 <= miss_reads_per_second <= 1_000_000
        ):
            raise ConfigurationError(
                "cache miss_reads_per_second must be a number from 1 to 1000000"
            )
        if precheck is not None and not callable(precheck):
            raise ConfigurationError("cache precheck must be a callable (api, client_id) -> bool")
        self.store = store
        self.ttl = float(ttl)
        # An entry this close to expiry is refreshed in the background on its next use.
        self._ahead = self.ttl * REFRESH_AHEAD
        self.max_entries = max_entries
        # A snapshot must leave room for others: never more than a quarter of the cache.
        self.snapshot_keys = min(snapshot_keys, max_entries // 4)
        self.miss_reads_per_second = float(miss_reads_per_second)
        self.precheck = precheck
        self._clock = clock
        self._entries = Entries(max_entries)
        # Each API's generation: bumped when the API itself changes, which makes every
        # key entry of it, and every read of it under way, stale at once.
        self._gen: dict[str, int] = {}
        self._refreshing: dict[str, InFlight[ApiEntry]] = {}
        self._reading: dict[tuple[str, str], InFlight[KeyEntry]] = {}
        self._budget = MissBudget(self.miss_reads_per_second, clock())
        self.refused_misses = 0
        """Misses answered "not registered" without a read, the budget being used up."""
        self._warned_at: float | None = None
        self._names: Names | None = None
        self._names_task: asyncio.Task[Names] | None = None
        self._feed = store if isinstance(store, ChangeFeed) else None
        # keyguard.metrics: the refreshes' reads timed, lookups counted (no-ops when off).
        self._reads = metrics.timed_store(store)
        self._count_lookup = metrics.count_lookup()
        self._counting = metrics.counts(self._count_lookup)  # else hits skip a no-op call
        self._snapshots = cast("Snapshots", self._reads) if isinstance(store, Snapshots) else None
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
        """How many keys and APIs the cache holds now (at most ``max_entries``)."""
        return self._entries.size

    # -- the request path ---------------------------------------------------------------------

    async def lookup(self, api: str, client_id: str | None) -> tuple[bool, KeyRecord | None]:
        """The answer from what is cached of ``api``, read from the store when stale."""
        hit = self.lookup_now(api, client_id)  # (which starts listening for changes first)
        if hit is not None:
            return hit[0], hit[1]
        # self._entries.get(api), inline (an API entry is never a negative one).
        known = self._entries.known
        found = known.get(api)
        if found is not None:
            known.move_to_end(api)
        entry = found if isinstance(found, ApiEntry) else None
        now = self._clock()
        if entry is None or entry.expires <= now:
            self._count_lookup(False)
            if entry is None and api not in (await self._api_names()).existing:
                # An API nobody created (perhaps a made-up name): no read of its own.
                return False, None
            entry = await self._refresh(api)  # (_key judges the key's entry after the wait)
        else:
            if self._counting:
                self._count_lookup(True)
            if entry.expires - now <= self._ahead and api not in self._refreshing:
                # Nearly expired: refresh it in the background and answer from it meanwhile,
                # so no request waits on the store while a valid entry exists (SPEC §11).
                self._start_refresh(api)
        if client_id is None:
            return entry.exposed, None
        if entry.keys is not None:
            return entry.exposed, entry.keys.get(client_id)
        # A large API: the key's own entry (a fresh one answered in lookup_now).
        return entry.exposed, await self._key(api, client_id, entry.gen)

    def lookup_now(
        self, api: str, client_id: str | None
    ) -> tuple[bool, KeyRecord | None, tuple[RateLimit, ...]] | None:
        """A hit: ``lookup``'s answer and the API's rate limits from a fresh entry of the
        API (and, for a large API, of the key), without a coroutine; ``None``, having
        counted nothing, when ``lookup`` must refresh or read (``keyguard.stores.base``'s
        ``LookupNow``). Where the store has a change feed and nobody listens to it, it
        starts listening, with the cache emptied, and answers ``None``."""
        watcher = self._watcher
        if self._feed is not None and (
            watcher is None
            or watcher.done()
            or (
                # The running loop runs: only a watcher of another loop needs asking (a
                # Python-level call, kept off the request path's common case).
                watcher.get_loop() is not asyncio.get_running_loop()
                and not watcher.get_loop().is_running()
            )
        ):
            # Not listening (first use, or a new event loop; a watcher left pending in a
            # loop that stopped or closed without ending its tasks never listens again):
            # what is cached may have missed notices, so start afresh. (A watcher in
            # another loop that still runs is left to it.)
            self.clear()
            self._start_watching(self._feed)
            return None
        # self._entries.get(api), inline (an API entry is never a negative one).
        known = self._entries.known
        entry = known.get(api)
        if not isinstance(entry, ApiEntry):
            return None
        known.move_to_end(api)
        now = self._clock()
        if entry.expires <= now:
            return None
        if client_id is None:
            record = None
        elif entry.keys is not None:
            record = entry.keys.get(client_id)
        else:
            # A large API: the key's own entry, fresh, of the API's generation.
            found = self._entries.get((api, client_id))
            if not (
                isinstance(found, KeyEntry)
                and found.gen == entry.gen
                and found.expires - now > self._ahead
            ):
                return None
            record = found.record
        if self._counting:
            self._count_lookup(True)
        if entry.expires - now <= self._ahead and api not in self._refreshing:
            # Nearly expired: refresh it in the background and answer from it meanwhile,
            # so no request waits on the store while a valid entry exists (SPEC §11).
            self._start_refresh(api)
        return entry.exposed, record, entry.rate_limits

    def cached_rate_limits(self, api: str) -> tuple[RateLimit, ...] | None:
        """``api``'s rate limits from its entry while it is fresh, else ``None``
        (what ``KeyManager`` reads right after a ``lookup``: no store round trip)."""
        entry = self._entries.known.get(api)  # peek(api): the lookup just before marked it used
        if not isinstance(entry, ApiEntry) or entry.expires <= self._clock():
            return None
        return entry.rate_limits

    # -- API entries ------------------------------------------------------------------------

    async def _api_names(self) -> Names:
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

    async def _fetch_names(self) -> Names:
        read_at = self._clock()
        apis = await self._reads.list_apis()
        return Names(read_at + self.ttl, frozenset(a.name for a in apis))

    def _names_refreshed(self, task: asyncio.Task[Names]) -> None:
        failed = task.cancelled() or task.exception() is not None  # (retrieves the exception)
        if self._names_task is task:
            self._names_task = None
            if not failed:
                self._names = task.result()

    async def _refresh(self, api: str) -> ApiEntry:
        refresh = self._refreshing.get(api)
        if not self._shareable(refresh, api):
            return await asyncio.shield(self._start_refresh(api))
        assert refresh is not None
        return await asyncio.shield(refresh.task)

    def _shareable(self, reading: InFlight[ApiEntry] | InFlight[KeyEntry] | None, api: str) -> bool:
        """Whether a lookup now may wait for ``reading`` (of ``api``) instead of reading
        afresh: same event loop, same generation of the API, started less than a TTL ago."""
        return (
            reading is not None
            and reading.task.get_loop() is asyncio.get_running_loop()
            and reading.gen == self._gen.get(api, 0)
            and reading.started + self.ttl > self._clock()
        )

    def _start_refresh(self, api: str) -> asyncio.Task[ApiEntry]:
        # Its own task, shared by every lookup that misses meanwhile: a caller that
        # is cancelled (a client gone) cancels neither the refresh nor the others.
        loop = asyncio.get_running_loop()
        started, gen = self._clock(), self._gen.get(api, 0)
        task = loop.create_task(
            self._fetch(api, started, gen), name=f"keyguard-cache-refresh-{api}"
        )
        refresh = InFlight(started, gen, task)
        self._refreshing[api] = refresh
        task.add_done_callback(functools.partial(self._refreshed, api, refresh))
        return task

    async def _fetch(self, api: str, read_at: float, gen: int) -> ApiEntry:
        # (The entry's age counts from before the read: ``read_at``.)
        limit = self.snapshot_keys
        if self._snapshots is not None:
            found, records = await self._snapshots.snapshot(api, max_keys=limit)
        else:  # a store of someone else's without snapshot(): two round trips
            found = await self._reads.get_api(api)
            small = found is not None and found.internal_keys + found.external_keys <= limit
            records = await self._reads.list_keys(api) if small else None
        if found is None:
            return ApiEntry(read_at + self.ttl, False, (), {}, gen)
        keys = None if records is None else {record.client_id: record for record in records}
        return ApiEntry(read_at + self.ttl, found.exposed, found.rate_limits, keys, gen)

    def _refreshed(
        self, api: str, refresh: InFlight[ApiEntry], task: asyncio.Task[ApiEntry]
    ) -> None:
        failed = task.cancelled() or task.exception() is not None  # (retrieves the exception)
        if self._refreshing.get(api) is refresh:
            del self._refreshing[api]
            if not failed:
                self._entries.put(api, task.result())
        # Otherwise the API was invalidated while this refresh ran: its answer may
        # predate the change, so it is not kept.

    # -- key entries (large APIs) ---------------------------------------------------------

    async def _key(self, api: str, client_id: str, gen: int) -> KeyRecord | None:
        slot = (api, client_id)
        found = self._entries.get(slot)
        now = self._clock()
        known = False
        if isinstance(found, KeyEntry):
            if found.gen != gen:
                self._entries.pop(slot)  # the API changed since: stale whatever its age
            elif found.expires > now:
                if (
                    found.record is not None
                    and found.expires - now <= self._ahead
                    and slot not in self._reading
                ):
                    self._start_read(slot, gen)  # refresh ahead, as for an API
                return found.record
            else:
                # Expired. A key it found is a real caller's: read again, outside the budget.
                known = found.record is not None
        reading = self._reading.get(slot)
        if self._shareable(reading, api):
            assert reading is not None
            return (await asyncio.shield(reading.task)).record
        if not known:
            if self.precheck is not None and not self.precheck(api, client_id):
                return None
            if not self._budget.take(now):
                self._refuse(api, now)
                return None
        return (await asyncio.shield(self._start_read(slot, gen))).record

    def _start_read(self, slot: tuple[str, str], gen: int) -> asyncio.Task[KeyEntry]:
        loop = asyncio.get_running_loop()
        started = self._clock()
        task = loop.create_task(
            self._fetch_key(*slot, started, gen), name="keyguard-cache-read-key"
        )
        reading = InFlight(started, gen, task)
        self._reading[slot] = reading
        task.add_done_callback(functools.partial(self._read, slot, reading))
        return task

    async def _fetch_key(self, api: str, client_id: str, read_at: float, gen: int) -> KeyEntry:
        # (The entry's age counts from before the read: ``read_at``.)
        _, record = await self._reads.lookup(api, client_id)
        return KeyEntry(read_at + self.ttl, record, gen)

    def _read(
        self, slot: tuple[str, str], reading: InFlight[KeyEntry], task: asyncio.Task[KeyEntry]
    ) -> None:
        failed = task.cancelled() or task.exception() is not None  # (retrieves the exception)
        if self._reading.get(slot) is reading:
            del self._reading[slot]
            if not failed and self._gen.get(slot[0], 0) == reading.gen:
                self._entries.put(slot, task.result())
        # Otherwise the key or its API changed while this read ran: not kept.

    def _refuse(self, api: str, now: float) -> None:
        self.refused_misses += 1
        if self._warned_at is None or now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            logger.warning(
                "cache miss budget (%g store reads/s) used up, api %s: client ids not in "
                "the cache are answered 'not registered' without a store read",
                self.miss_reads_per_second,
                api,
            )

    # -- invalidation ---------------------------------------------------------------------------

    def invalidate(self, api: str, client_id: str | None = None) -> None:
        """Forget what a change of ``api`` (of its key ``client_id``, if given) may have
        made stale: the key's entry and the API's snapshot; for a change of the API itself
        (``client_id`` ``None``), everything cached of it.

        A read of it already under way is neither kept nor shared with later lookups:
        it may have read the store before the change.
        """
        entry = self._entries.get(api)
        if client_id is None or (isinstance(entry, ApiEntry) and entry.keys is not None):
            self._entries.pop(api)
        self._refreshing.pop(api, None)
        if client_id is None:
            # Every key entry of the API, and every read of one under way, is now stale.
            self._gen[api] = self._gen.get(api, 0) + 1
            # The API itself changed (created, perhaps): the set of names may too.
            self._names = None
            self._names_task = None
        else:
            self._entries.pop((api, client_id))
            self._reading.pop((api, client_id), None)

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()
        self._refreshing.clear()
        self._reading.clear()
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
        refreshing: list[asyncio.Task[object]] = [r.task for r in self._refreshing.values()]
        refreshing.extend(reading.task for reading in self._reading.values())
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
            except StoreClosed:
                # The wrapped store was closed under the cache: nothing more to hear, and
                # no watcher to start again on the next lookup.
                self._feed = None
                return
            except StoreUnavailable as exc:
                # Once per outage; the cache's TTL bounds staleness meanwhile.
                if not lost:
                    logger.warning("key store change feed lost (%s); retrying", type(exc).__name__)
                    lost = True
            except Exception:
                # Not an outage but a bug (the feed's, or a callback's): with its traceback,
                # once until the feed listens again; the TTL still bounds staleness.
                if not lost:
                    logger.exception("key store change feed failed; retrying")
                    lost = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.ttl)
