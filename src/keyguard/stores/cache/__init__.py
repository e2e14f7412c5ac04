"""``CachedStore``: a bounded, short-lived cache of the request path's lookups.

A remote store costs a network round trip per request. ``CachedStore`` wraps
any store and answers ``lookup`` from what it read a moment ago. What it keeps
depends on the size of the API:

* a **small** API (at most ``snapshot_keys`` keys in all, 1,000 by default) is
  kept whole, as a *snapshot*: whether it is exposed, its rate limits and all
  of its keys, read in **one** store round trip (``snapshot``). A lookup is
  answered from it whatever the client id, so a flood of made-up ids costs at
  most one refresh per API per ``ttl``;
* a **large** API (up to 1,000,000 keys of each kind) is kept as an API entry
  (exposed, rate limits: one round trip, no key read) plus one entry per
  client id asked for, filled by the store's ``lookup`` (one round trip),
  *negative* entries included: an id found to have no key is answered "not
  registered" from the cache for the TTL. A request's cost does not grow with
  the number of keys in its API, and neither does the cache's memory.

A flood of made-up, well-formed client ids against a large API misses the
cache by design (every id is new). Such misses are bounded by a per-process
budget, ``miss_reads_per_second`` (1,000 by default): beyond it, a miss of an id
the cache holds nothing of is answered "not registered" *without* a store
read (and not cached). A caller whose key is cached (even past its TTL, while
the entry is still held) is never affected: its entry is refreshed or re-read
outside the budget. A real caller whose key is *not* cached, during a flood
that uses up the budget, may be answered "not registered" until one of its
requests gets a read; from then on it is cached and unaffected. ``precheck``,
a callable ``(api, client_id) -> bool``, runs in front of every such read:
an id it refuses is answered "not registered" without a read or a budget
token (the place for a check that tells made-up ids from issued ones).

Made-up API names (an ``api=`` callable reading the host or the path) are
bounded too: the cache keeps the set of existing API names, read with one
``list_apis`` at most once per ``ttl`` when a name it has no entry for is
asked for. A name not in that set is answered "unknown" from it, so a flood
of invented names costs at most one store read per ``ttl``, and never fills
the cache.

Everything else (management reads and every write) goes straight to the
wrapped store. Staleness is bounded three ways:

* a write made through this ``CachedStore`` (so through any ``KeyManager``,
  middleware or management app sharing it) drops what it changed before it
  returns: the key's entry, the API's snapshot, or for a change of the API
  itself everything cached of the API: this process sees its own changes at once;
* where the wrapped store has a change feed (``ChangeFeed``: Redis pub/sub,
  PostgreSQL LISTEN/NOTIFY), a change made by another process drops the same
  entries as soon as the notice arrives;
* in every case an entry is used for at most ``ttl`` seconds from when its
  read *started*: the documented bound for a change made elsewhere (R7), e.g.
  if a notice is lost, and it holds while the store is slow. A read under way
  when a change is made is not kept, nor shared with later lookups.

An entry used in the last quarter of its TTL is refreshed in the background
while it keeps answering (negative entries excepted: they simply expire), so
a busy API's requests never wait on the store; a request waits only when no
valid entry exists. Concurrent misses of one entry share one read.

Memory is bounded by ``max_entries``: the entries together hold at most that
many keys (an API entry counting one more), least recently used dropped
first; negative entries hold at most a quarter of them and go first.
"""

from keyguard.stores.cache._store import (
    DEFAULT_CACHE_TTL,
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MISS_READS_PER_SECOND,
    DEFAULT_SNAPSHOT_KEYS,
    REFRESH_AHEAD,
    CachedStore,
    check_cache_ttl,
)

__all__ = [
    "DEFAULT_CACHE_TTL",
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_MISS_READS_PER_SECOND",
    "DEFAULT_SNAPSHOT_KEYS",
    "REFRESH_AHEAD",
    "CachedStore",
    "check_cache_ttl",
]
