"""What ``CachedStore`` keeps: API entries, per-key entries, their LRU, the reads in flight
and the miss budget."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from keyguard.models import KeyRecord, RateLimit

__all__ = ["ApiEntry", "Entries", "InFlight", "KeyEntry", "MissBudget", "Names"]


@dataclass(frozen=True, slots=True)
class ApiEntry:
    """An API as read at ``expires - ttl``: whether it is exposed, its rate limits and,
    for a small API (a *snapshot*), all of its keys; ``keys`` is ``None`` for a large API,
    whose keys are cached one by one (``KeyEntry``). ``gen`` is the API's generation when
    its read started (bumped by each change of the API itself)."""

    expires: float
    exposed: bool
    rate_limits: tuple[RateLimit, ...]
    keys: dict[str, KeyRecord] | None
    gen: int

    @property
    def size(self) -> int:
        return 1 + (0 if self.keys is None else len(self.keys))


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One client id of a large API as read at ``expires - ttl``: its key, or ``None``
    (a *negative* entry: no such key then). Valid only while the API's generation is
    still ``gen``."""

    expires: float
    record: KeyRecord | None
    gen: int

    size = 1


Entry = ApiEntry | KeyEntry
E = TypeVar("E", ApiEntry, KeyEntry)


@dataclass(frozen=True, slots=True)
class Names:
    """The names of the APIs that exist, as read at ``expires`` - the TTL."""

    expires: float
    existing: frozenset[str]


@dataclass(frozen=True, slots=True)
class InFlight(Generic[E]):
    """A read under way, started at ``started`` under the API's generation ``gen``. A
    lookup arriving ``ttl`` or more after ``started`` does not wait for it: its answer
    would be expired before it lands (valid-from-read-start, SPEC §11)."""

    started: float
    gen: int
    task: asyncio.Task[E]


Slot = str | tuple[str, str]
"""An API entry's place is the API's name; a key entry's, (API, client id)."""


class Entries:
    """Every entry, at most ``limit`` in all (an API entry counts 1 + its keys), least
    recently used dropped first.

    Negative key entries live in a separate LRU holding at most a quarter of ``limit``,
    and are dropped before any other: a flood of made-up ids can fill that part only,
    never push out the APIs and keys real callers use.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.negative_limit = max(1, limit // 4)
        self.size = 0
        self.known: OrderedDict[Slot, Entry] = OrderedDict()
        """Every entry but the negative key entries, least recently used first: where an
        API entry always is (``CachedStore.lookup`` reads it there, without a call of
        :meth:`get`)."""
        self._negative: OrderedDict[Slot, Entry] = OrderedDict()

    def get(self, slot: Slot) -> Entry | None:
        """The entry at ``slot`` (marked as just used), or ``None``."""
        entry = self.known.get(slot)
        if entry is not None:
            self.known.move_to_end(slot)
            return entry
        entry = self._negative.get(slot)
        if entry is not None:
            self._negative.move_to_end(slot)
        return entry

    def peek(self, slot: Slot) -> Entry | None:
        """The entry at ``slot``, or ``None``, leaving the order of use as it is (for a
        second read of an entry a request has just used)."""
        entry = self.known.get(slot)
        return entry if entry is not None else self._negative.get(slot)

    def put(self, slot: Slot, entry: Entry) -> None:
        """Keep ``entry`` at ``slot`` (replacing what was there), dropping the least
        recently used entries to make room; an entry larger than the limit is not kept."""
        self.pop(slot)
        if entry.size > self.limit:
            return
        negative = isinstance(entry, KeyEntry) and entry.record is None
        if negative:
            while len(self._negative) >= self.negative_limit:
                self._drop_oldest(self._negative)
        while self.size + entry.size > self.limit:
            self._drop_oldest(self._negative if self._negative else self.known)
        (self._negative if negative else self.known)[slot] = entry
        self.size += entry.size

    def pop(self, slot: Slot) -> Entry | None:
        """Forget the entry at ``slot``; the entry, or ``None`` if there was none."""
        entry = self.known.pop(slot, None) or self._negative.pop(slot, None)
        if entry is not None:
            self.size -= entry.size
        return entry

    def clear(self) -> None:
        """Forget every entry."""
        self.known.clear()
        self._negative.clear()
        self.size = 0

    def __len__(self) -> int:
        """How many entries are kept (an API entry counting one; see ``size``)."""
        return len(self.known) + len(self._negative)

    def _drop_oldest(self, part: OrderedDict[Slot, Entry]) -> None:
        _, entry = part.popitem(last=False)
        self.size -= entry.size


class MissBudget:
    """A token bucket: at most ``rate`` store reads per second for cache misses (bursts
    of up to one second's worth)."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self._tokens = rate
        self._at = now

    def take(self, now: float) -> bool:
        """Spend one read if the budget allows it now."""
        self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
