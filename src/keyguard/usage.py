"""Per-key usage (SPEC §10): counted in memory on the request path, written in batches.

The request path pays one dict lookup and an increment (``UsageRecorder.admitted``
/ ``rate_limited``): no I/O, no lock (the event loop is single-threaded), no
clock read. A background task started lazily in the running loop writes
everything counted since its last write every ``interval`` seconds (and at
each hour boundary) as **one** ``record_usage`` call, whatever the number of
requests, keys or APIs; the middleware also flushes on the lifespan's
shutdown and in ``aclose``. A write that fails is
kept and retried with the next one, so a store outage loses nothing while the
process lives; a crash loses at most one interval.

Buckets are hours (UTC); stores add counts to what a bucket holds, so many
processes flushing the same hour sum correctly, and keep ``last_used_at``
as the latest any of them wrote. Buckets older than ``RETENTION`` are
pruned, at most once an hour per process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from keyguard.errors import ConfigurationError, StoreUnavailable

if TYPE_CHECKING:
    from starlette.types import Message, Receive

    from keyguard.stores.base import KeyStore

__all__ = [
    "DEFAULT_USAGE_FLUSH",
    "MAX_USAGE_HOURS",
    "RETENTION",
    "UsageCount",
    "UsageNotWritten",
    "UsageRecorder",
    "check_usage_flush",
    "hour_start",
    "merge_hours",
]

logger = logging.getLogger("keyguard")

DEFAULT_USAGE_FLUSH = 10.0
"""Seconds between two writes of the counts (SPEC §10's default)."""
RETENTION = timedelta(days=35)
"""How long hourly buckets are kept."""
MAX_USAGE_HOURS = 840
"""The longest range ``KeyManager.usage`` reads: the 35 days kept."""
PRUNE_INTERVAL = 3600.0  # seconds between two prunes by one process
FAILURE_LOG_INTERVAL = 60.0  # seconds between two WARNING records of failed writes

_HOUR = 3600


def hour_start(moment: datetime) -> datetime:
    """The start of the UTC hour holding ``moment``."""
    return moment.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


@dataclass(frozen=True, slots=True)
class UsageCount:
    """One key's traffic in one hourly bucket.

    ``requests`` counts admitted requests, ``rate_limited`` the 429s. Written
    to a store, ``last_used_at`` is when the latest admitted request of the
    bucket came (``None`` if none was admitted); read back it is ``None``
    (a key's ``last_used_at`` is on its record).
    """

    api: str
    client_id: str
    hour: datetime
    requests: int = 0
    rate_limited: int = 0
    last_used_at: datetime | None = None


class UsageNotWritten(StoreUnavailable):
    """Raised by a store's ``record_usage`` that wrote the counts of some APIs but not
    those of ``apis`` (a Redis Cluster node down, say, while the others answer).

    The recorder keeps only these APIs' counts for the next write: keeping the others
    too would add them twice.
    """

    def __init__(self, message: str, apis: frozenset[str]) -> None:
        super().__init__(message)
        self.apis = apis


def check_usage_flush(value: object) -> float | None:
    """``usage_flush=``: seconds in (0, 3600], or 0 / ``None`` for no usage counting."""
    if value is None or (value == 0 and not isinstance(value, bool)):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
        raise ConfigurationError(
            f"usage_flush must be a number of seconds in (0, 3600], or 0 or None to turn "
            f"usage counting off, got {value!r}"
        )
    return float(value)


class UsageRecorder:
    """Counts per key in memory, in the current hour's bucket; writes them to ``store`` in
    batches.

    The request path's cost is one dict lookup by client id (client ids are unique
    across APIs) and an increment: no clock read, no tuple built. The background task
    closes the bucket at each flush and at each hour boundary, so every count lands in
    the hour it was made in (to the loop's timer precision). A key's ``last_used_at``
    is the time of the write that carried its admitted requests: at most one interval
    after the actual last request (SPEC §8: approximate by design).

    ``clock`` is the wall clock (seconds since the epoch; tests pass their own).
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        interval: float = DEFAULT_USAGE_FLUSH,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.interval = interval
        self._clock = clock
        # The open bucket, of hour _hour: client_id -> [requests, rate_limited, api,
        # client_id] (keyed by (api, client_id) only for an id seen in a second API).
        self._counts: dict[str | tuple[str, str], list[Any]] = {}
        self._hour = _hour_of(clock())
        # Closed buckets not written yet (a write failed, or one is under way):
        # (api, client_id, hour number) -> [requests, rate_limited, last admitted time].
        self._pending: dict[tuple[str, str, int], list[float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._last_prune = -PRUNE_INTERVAL
        self._last_failure_warning = -FAILURE_LOG_INTERVAL

    def __repr__(self) -> str:
        return f"UsageRecorder(interval={self.interval:g}, counted={len(self._counts)})"

    # -- the request path ---------------------------------------------------------------------

    def admitted(self, api: str, client_id: str) -> None:
        """Count one admitted request of the key ``client_id`` of ``api``."""
        entry = self._counts.get(client_id)
        if entry is None or entry[2] != api:
            self._open(api, client_id, 1, 0)
        else:
            entry[0] += 1

    def rate_limited(self, api: str, client_id: str) -> None:
        """Count one request of the key answered 429."""
        entry = self._counts.get(client_id)
        if entry is None or entry[2] != api:
            self._open(api, client_id, 0, 1)
        else:
            entry[1] += 1

    def _open(self, api: str, client_id: str, requests: int, limited: int) -> None:
        """A count not in the open bucket under its client id; makes sure a flush task runs.

        Client ids are generated (R6) and so unique, but a store is not obliged to refuse
        one id in two APIs: the second API's entry is kept under ``(api, client_id)``.
        """
        counts = self._counts
        if not counts and self._live_task() is None:
            # Nothing has kept the bucket's hour current (no task): set it now.
            self._hour = _hour_of(self._clock())
        entry = counts.get(client_id)
        if entry is None:
            counts[client_id] = [requests, limited, api, client_id]
        else:
            other = counts.get((api, client_id))
            if other is None:
                counts[(api, client_id)] = [requests, limited, api, client_id]
            else:
                other[0] += requests
                other[1] += limited
            return
        task = self._live_task()
        if task is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # counted outside a loop: written by the next flush
                return
            self._task = loop.create_task(self._run(), name="keyguard-usage-flush")

    def _live_task(self) -> asyncio.Task[None] | None:
        """The flush task, or ``None`` if it ended or its event loop is closed (a loop
        closed without cancelling its tasks leaves them pending for ever: such a task
        never wakes again, so the next count starts a new one in the running loop)."""
        task = self._task
        if task is not None and (task.done() or task.get_loop().is_closed()):
            self._task = task = None
        return task

    # -- writing ------------------------------------------------------------------------------

    def next_wake(self, now: float) -> float:
        """When the task next closes the bucket: after ``interval``, or at the next hour
        boundary if that comes first (a flush then, so no count crosses an hour); at once
        if the open bucket's hour is over already (a write ran across the boundary)."""
        if _hour_of(now) != self._hour:
            return now
        return min(now + self.interval, (_hour_of(now) + 1) * _HOUR)

    async def _run(self) -> None:
        me = asyncio.current_task()
        try:
            while True:
                now = self._clock()
                await asyncio.sleep(max(0.0, self.next_wake(now) - now))
                await self.flush()
        finally:
            # Cancelled, or the loop is closing: a later request in a running loop starts
            # a new task, which writes these counts (nothing counted is dropped here). A
            # task of a closed loop finalized late must not forget its successor.
            if self._task is me:
                self._task = None
            self._close_bucket()

    def _close_bucket(self) -> None:
        """Move the open bucket into ``_pending`` and open the current hour's."""
        now = self._clock()
        counts, hour = self._counts, self._hour
        self._counts, self._hour = {}, _hour_of(now)
        pending = self._pending
        for requests, limited, api, client_id in counts.values():
            key = (api, client_id, hour)
            held = pending.get(key)
            if held is None:
                pending[key] = [requests, limited, now if requests else 0.0]
            else:
                held[0] += requests
                held[1] += limited
                if requests:
                    held[2] = now

    def batch(self) -> list[UsageCount]:
        """What is counted and not written yet, closed buckets only (for tests and the
        curious)."""
        return _rows(self._pending)

    async def flush(self) -> None:
        """Write everything counted so far in one ``record_usage`` call (none if nothing
        was counted); a failed write is kept for the next one and logged at most once a
        minute. Prunes old buckets at most once an hour."""
        async with self._loop_lock():  # one write at a time: a shutdown flush waits
            self._close_bucket()
            if not self._pending:
                return
            taken, self._pending = self._pending, {}
            try:
                await self.store.record_usage(_rows(taken))
            except asyncio.CancelledError:
                # Cancelled (a timeout around flush or aclose, say): the outcome is
                # unknown, kept like a failed write's rather than dropped.
                self._keep(taken, None)
                raise
            except Exception as exc:
                # After a partial write, only the APIs whose counts were not written.
                self._keep(taken, exc.apis if isinstance(exc, UsageNotWritten) else None)
                self._log_failure(exc)
                return
            await self._prune()

    def _keep(
        self, taken: dict[tuple[str, str, int], list[float]], apis: frozenset[str] | None
    ) -> None:
        """Put counts not written back, merged with anything closed meanwhile (those of
        ``apis`` only, if given)."""
        for key, entry in taken.items():
            if apis is not None and key[0] not in apis:
                continue
            held = self._pending.setdefault(key, [0, 0, 0.0])
            held[0] += entry[0]
            held[1] += entry[1]
            held[2] = max(held[2], entry[2])

    async def _prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < PRUNE_INTERVAL:
            return
        self._last_prune = now
        before = hour_start(datetime.fromtimestamp(self._clock(), timezone.utc)) - RETENTION
        try:
            await self.store.prune_usage(before)
        except Exception as exc:
            self._log_failure(exc)

    def _log_failure(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_failure_warning >= FAILURE_LOG_INTERVAL:
            self._last_failure_warning = now
            logger.warning(
                "usage could not be written to the key store (%s); kept in memory and "
                "retried with the next write (repeats within %d s not logged)",
                type(exc).__name__,
                FAILURE_LOG_INTERVAL,
            )
        else:
            logger.debug("usage write failed: %s", type(exc).__name__)

    def flushing_on_shutdown(self, receive: Receive) -> Receive:
        """A lifespan's ``receive`` that writes the counts when the server announces the
        shutdown, before the app's own shutdown runs (and perhaps closes the store); the
        message itself is passed on unchanged."""

        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.flush()
            return message

        return receiving

    def _loop_lock(self) -> asyncio.Lock:
        """The lock of the writes made in the running event loop."""
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def aclose(self) -> None:
        """Stop the background task and write what is counted, in one write (a later
        request starts the task again).

        The task is stopped between two of its writes, never during one (that write's
        outcome would be unknown), and before the last write, so a store that is down
        costs one timeout here, not two."""
        task = self._live_task()
        if task is not None and task.get_loop() is asyncio.get_running_loop():
            async with self._loop_lock():  # a write under way ends first
                task.cancel()
            await asyncio.wait([task])  # its finally closes the open bucket
        await self.flush()


def _hour_of(timestamp: float) -> int:
    return int(timestamp // _HOUR)


def _rows(counts: dict[tuple[str, str, int], list[float]]) -> list[UsageCount]:
    rows = []
    for (api, client_id, hour), (requests, limited, used) in sorted(counts.items()):
        rows.append(
            UsageCount(
                api=api,
                client_id=client_id,
                hour=datetime.fromtimestamp(hour * _HOUR, timezone.utc),
                requests=int(requests),
                rate_limited=int(limited),
                last_used_at=datetime.fromtimestamp(used, timezone.utc) if requests else None,
            )
        )
    return rows


def merge_hours(
    rows: Sequence[UsageCount], first_hour: datetime, hours: int
) -> list[tuple[datetime, int, int]]:
    """``hours`` consecutive buckets from ``first_hour``, with the rows' counts summed in."""
    totals = {first_hour + timedelta(hours=n): [0, 0] for n in range(hours)}
    for row in rows:
        slot = totals.get(row.hour)
        if slot is not None:
            slot[0] += row.requests
            slot[1] += row.rate_limited
    return [(hour, requests, limited) for hour, (requests, limited) in totals.items()]
