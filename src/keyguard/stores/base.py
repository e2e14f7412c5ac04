"""The ``KeyStore`` protocol: what keyguard asks of a place that keeps keys.

A store is small and dumb on purpose. It validates nothing a caller could
get wrong (``KeyManager`` does that); it only keeps data and performs the
few operations that must be atomic where the data lives, so that every rule
of SPEC §3 holds across processes and machines sharing one store:

* ``insert_key`` checks R1 (exposed), R2 (per-kind limit) and R3 (unique
  casefolded name) *and* inserts, as one atomic step;
* ``update_key`` checks R3 on a rename *and* changes the key, as one step;
* ``set_secret_hash`` changes only an external key (R4), keeping the
  current hash as the previous one when asked to (a roll with a grace
  period, SPEC §8).

Every changing method takes ``audit``, the :class:`~keyguard.audit.AuditEvent`
recording the change (SPEC §10, R12), and writes it *with* the change, in one
atomic step (one transaction, one script): the event exists if and only if
the change was made. A call that changes nothing (``None``/``False``
answers, an error raised) writes no event. ``list_audit`` reads them back,
newest first; a store keeps events ``audit_retention`` (400 days by
default) and prunes older ones.

Stores keep every field of a ``KeyRecord`` and give each back as it was
written: ``meta`` and ``rate_limits`` as the models' helpers dump and load
them (``dump_meta``/``load_meta``, ``dump_rate_limits``/``load_rate_limits``),
times as aware UTC datetimes to the microsecond.

A store also keeps its *client id tag key* (``IdTagKeys``, SPEC §4, §11): 32
random bytes made on first need and kept with the data, under which new client
ids carry a tag (:mod:`keyguard.idtags`), so that a made-up id is refused
without a read. Every store of keyguard has one; a store without one still
works, issuing untagged ids that are always looked up.

Every method may raise :class:`~keyguard.errors.StoreUnavailable` (with the
driver's error chained) when the store cannot be reached or fails; no other
driver exception may escape. Stores connect lazily, in the event loop that
first uses them, and are released with ``aclose``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, cast, runtime_checkable

from keyguard.audit import AuditEvent
from keyguard.models import Api, KeyChanges, KeyRecord, RateLimit
from keyguard.stores._paging import DEFAULT_PAGE_SIZE, KeyPage

if TYPE_CHECKING:
    from keyguard.usage import UsageCount

__all__ = [
    "ChangeFeed",
    "IdTagKeys",
    "KeyPage",
    "KeyStore",
    "LookupNow",
    "Snapshots",
    "lookup_now_of",
]


@runtime_checkable
class KeyStore(Protocol):
    """Persistence for APIs and keys. See the module docstring for the contract."""

    async def lookup(self, api: str, client_id: str | None) -> tuple[bool, KeyRecord | None]:
        """The request path's single read: whether ``api`` exists *and* is exposed, and
        the key ``client_id`` if it belongs to ``api`` (``None`` when ``client_id`` is
        ``None``, unknown, or another API's). One round trip at most.
        """
        ...

    async def get_api(self, api: str) -> Api | None:
        """The API with its key counts, or ``None`` if it was never created."""
        ...

    async def list_apis(self) -> list[Api]:
        """Every API, ordered by name, with key counts."""
        ...

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
        """Create ``api`` if missing (unexposed, limit ``default_max_keys_per_kind``, no
        rate limits), then set whichever of ``exposed``, ``max_keys_per_kind`` and
        ``rate_limits`` is not ``None``. Keys are never touched. Returns the API as stored.
        """
        ...

    async def insert_key(self, record: KeyRecord, *, audit: AuditEvent | None = None) -> None:
        """Add ``record`` atomically, or raise without adding anything:
        ``ApiNotExposed`` if its API is unknown or unexposed, ``KeyLimitReached`` if the
        API already holds ``max_keys_per_kind`` keys of ``record.kind``,
        ``DuplicateName`` if a key of the API has a name equal under ``str.casefold``.
        The checks and the insert are one atomic step, also against other processes.
        """
        ...

    async def get_key(self, api: str, client_id: str) -> KeyRecord | None:
        """The key ``client_id`` of ``api``, or ``None``. Client ids compare exactly."""
        ...

    async def list_keys(self, api: str) -> list[KeyRecord]:
        """Every key of ``api`` ordered by ``created_at`` (then by insertion); empty if none.

        All at once: for an API of many keys, :meth:`page_keys` reads them a page at a time.
        """
        ...

    async def page_keys(
        self,
        api: str,
        *,
        limit: int = DEFAULT_PAGE_SIZE,
        after: str | None = None,
        name: str | None = None,
    ) -> KeyPage:
        """Up to ``limit`` keys of ``api`` (1 to ``MAX_PAGE_SIZE``), in :meth:`list_keys`'s
        order, starting after the position the cursor ``after`` names (from the start
        without one), and the cursor of the next page (``None`` when no key follows).

        ``name`` keeps only the keys whose casefolded name contains it casefolded (see
        ``keyguard.stores._paging.name_filter``); the cursor ``next`` then marks how far the
        store looked, and a store may bound that work per call (SQL and Redis look at a few
        thousand keys at most), so a filtered page may hold fewer keys than ``limit``,
        even none, with ``next`` not ``None``: the caller asks again from there.

        Stable under changes: a key that exists throughout a listing is on exactly one of
        its pages; one created or deleted meanwhile is on at most one. A malformed
        ``after``, a bad ``limit`` or ``name``: ``InvalidRequest``. An API never created
        has one empty page. Efficient for an API of a million keys: a page costs about
        ``limit`` keys' work, not the API's size.
        """
        ...

    async def update_key(
        self,
        api: str,
        client_id: str,
        changes: KeyChanges,
        *,
        audit: AuditEvent | None = None,
    ) -> KeyRecord | None:
        """Change the given fields of the key ``client_id`` of ``api`` (of either kind) and
        return it as stored afterwards; ``None`` (changing nothing) if there is no such key.
        A new ``name`` equal under ``str.casefold`` to another key's of the API raises
        ``DuplicateName`` and changes nothing: the check and the change are one atomic
        step, also against other processes (as at insertion). No change given: the key
        as it is.
        """
        ...

    async def set_secret_hash(
        self,
        api: str,
        client_id: str,
        secret_hash: str,
        *,
        previous_until: datetime | None = None,
        audit: AuditEvent | None = None,
    ) -> KeyRecord | None:
        """Replace the secret hash of the *external* key ``client_id`` of ``api`` and return
        the key as stored afterwards; ``None`` (changing nothing) if there is no such
        external key.

        With ``previous_until``, the hash being replaced (if the key had one) is kept as
        ``previous_secret_hash`` valid until then, dropping any older previous one;
        without it, or when the key had no secret, no previous secret is kept. One
        atomic step: a roll racing another roll keeps one of them whole.
        """
        ...

    async def delete_key(
        self, api: str, client_id: str, *, audit: AuditEvent | None = None
    ) -> bool:
        """Delete the key; ``False`` if ``api`` had no such key."""
        ...

    async def delete_api(self, api: str, *, force: bool, audit: AuditEvent | None = None) -> bool:
        """Delete ``api`` and, with ``force``, every key of it, atomically.

        Returns ``False`` (changing nothing) if ``api`` was never created.
        Without ``force`` an API that has keys raises ``ApiHasKeys`` and is
        kept: the check and the delete are one atomic step, so a key created
        meanwhile is never deleted with it.
        """
        ...

    async def list_audit(
        self,
        *,
        api: str | None = None,
        client_id: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[AuditEvent]:
        """Up to ``limit`` audit events, newest first (by id), of ``api`` and/or of the key
        ``client_id`` if given, with ids below ``before`` if given; events older than the
        store's retention are never returned. Events outlive the API or key they concern.
        """
        ...

    async def record_usage(self, counts: Sequence[UsageCount]) -> None:
        """Add each count to its key's hourly bucket (SPEC §10), creating buckets as needed,
        and raise each existing key's ``last_used_at`` to the count's ``last_used_at`` if that
        is later (never lowering it). Additive: many processes writing the same bucket sum
        up. Counts of a key that no longer exists are kept like any others (they age out);
        its ``last_used_at`` is not. One write, whatever the number of counts.

        A store that cannot write all the counts atomically raises
        :class:`~keyguard.usage.UsageNotWritten` naming the APIs whose counts it did not
        write when it wrote the others: the caller writes only those again.
        """
        ...

    async def read_usage(
        self, api: str, client_id: str | None, since: datetime
    ) -> list[UsageCount]:
        """The buckets of ``api`` (of the key ``client_id`` only, if given) whose hour is
        ``since`` or later, in any order, each with its summed counts and
        ``last_used_at=None``. Hours without traffic may be missing.
        """
        ...

    async def prune_usage(self, before: datetime) -> None:
        """Delete the buckets of hours before ``before`` (a store whose buckets expire by
        themselves may do nothing)."""
        ...

    async def aclose(self) -> None:
        """Release connections. The store must not be used afterwards."""
        ...


@runtime_checkable
class ChangeFeed(Protocol):
    """Optional: a store that can tell other processes about its changes: Redis and Redis
    Cluster (pub/sub), PostgreSQL on asyncpg or psycopg (LISTEN/NOTIFY).

    ``CachedStore`` uses it to drop stale entries as soon as another process
    changes a key or an API, instead of waiting for them to expire.
    """

    async def watch(
        self,
        on_change: Callable[[str, str | None], None],
        *,
        on_ready: Callable[[], None],
    ) -> None:
        """Listen until cancelled: call ``on_ready()`` once listening, then
        ``on_change(api, client_id)`` for each change any process makes through this
        store (``client_id`` is ``None`` when the API itself changed). Raises
        ``StoreUnavailable`` if the feed breaks; the caller listens again later. An
        exception raised by ``on_ready`` ends the watch as it is (the caller's own bug,
        never disguised as an outage), so a caller never believes it listens when it
        could not start afresh.
        """
        ...


@runtime_checkable
class Snapshots(Protocol):
    """Optional, and offered by every store keyguard ships: an API's state and, when it
    is small, all of its keys, in one round trip.

    ``CachedStore`` refreshes an API with it; a store without it is refreshed with
    ``get_api`` and then, for a small API, ``list_keys`` (two round trips).
    """

    async def snapshot(
        self, api: str, *, max_keys: int
    ) -> tuple[Api | None, list[KeyRecord] | None]:
        """``api`` with its key counts (``None`` if it was never created) and, if it holds
        at most ``max_keys`` keys in all, every one of them in any order, read together
        with the API in one consistent step; ``None`` instead of the keys when it holds
        more (nothing of them is read). One round trip at most; the cost does not grow
        with the API's keys beyond ``max_keys``.
        """
        ...


ID_TAG_KEY_BYTES = 32
"""Length of a store's client id tag key."""


@runtime_checkable
class IdTagKeys(Protocol):
    """A store that keeps a client id tag key (every store of keyguard does).

    ``KeyManager`` tags the client ids it issues under it and refuses an id whose tag
    does not verify without a store read (:mod:`keyguard.idtags`).
    """

    async def id_tag_key(self) -> bytes:
        """The store's tag key: ``ID_TAG_KEY_BYTES`` random bytes, made by whichever
        process needs it first and kept in the store (an insert that does nothing if the
        key exists, then a read back, so racing processes agree). Read from the store
        once per store object, then from memory: it never changes. It is never logged,
        never in a repr or an error, and no front door returns it.
        """
        ...


LookupNow = Callable[[str, str | None], tuple[bool, KeyRecord | None, tuple[RateLimit, ...]] | None]
"""Optional, offered by ``MemoryStore`` and ``CachedStore``: ``lookup_now(api, client_id)``,
``lookup``'s answer where the store has it without waiting (in memory), with the API's rate
limits as the same state holds them (``()`` for an API that does not exist), else ``None``
(then await ``lookup``). A ``None`` answer has counted and changed nothing a ``lookup`` would
count or change again. The request path's common case, without a coroutine."""


def lookup_now_of(store: object) -> LookupNow | None:
    """``store.lookup_now`` where it answers as ``store.lookup`` does, else ``None``: only
    when ``store``'s ``lookup`` is the one of the class defining ``lookup_now``, not a
    subclass's or an instance's own (a test's failing store) nor a wrapper's (one timing
    the lookups, whose other attributes are the wrapped store's)."""
    now = getattr(store, "lookup_now", None)
    owner = getattr(now, "__self__", None)
    if owner is not store:
        return None
    defining = next(c for c in type(store).__mro__ if "lookup_now" in vars(c))
    lookup = getattr(store, "lookup", None)
    if getattr(lookup, "__func__", None) is not vars(defining).get("lookup"):
        return None
    return cast("LookupNow", now)
