"""Client id tags: a made-up client id is refused without a store read (SPEC §4, §11).

Every client id keyguard issues ends in a *tag*: the first 40 bits (10 hex
characters) of HMAC-SHA256, under the store's tag key, of the API name and
the id's 128 random bits (:func:`keyguard.secrets.client_id_tag`). The tag
key is 32 random bytes kept in the store itself (``IdTagKeys.id_tag_key``),
so every process and machine sharing a store issues and checks the same tags,
and it is read once per store object, then kept in memory.

Before asking the store for a key, the request path checks the id's tag
(:meth:`IdTags.worth_a_read`). An id whose tag does not verify cannot be a
key of this API — not of this store, not of another API of it — so it is
answered "not registered" with no read of the key: a flood of made-up
well-formed ids costs each process no reads at all beyond the API's state,
except for the one id in 2**40 whose tag happens to verify. Real callers are
not slowed: their ids verify with one HMAC.

Ids issued before tags existed (*legacy* ids: 32 hex characters, no tag)
keep working; they are looked up as before, so a flood of made-up
legacy-shaped ids costs what it cost before tags: reads bounded by the cache
(``CachedStore``). docs/security.md argues the choice.

A store without a tag key (a custom ``KeyStore`` that does not implement
``IdTagKeys``) keeps working too: keys are then issued with untagged ids, and
every well-formed id is looked up.

A store whose tag key went missing while it held tagged ids (a Redis key
evicted or deleted, a meta row deleted) makes a new one and keeps a mark that
the old one was lost (``id_tag_lost``, logged): ids tagged under the old key
cannot be checked, so an id whose tag fails is looked up, as a legacy id is,
instead of every key issued before the loss being refused.
"""

from __future__ import annotations

import hmac

from keyguard.errors import StoreUnavailable
from keyguard.secrets import (
    LEGACY_CLIENT_ID_LENGTH,
    client_id_tag,
    could_be_client_id,
    new_client_id,
)
from keyguard.stores.base import ID_TAG_KEY_BYTES, IdTagKeys

__all__ = ["IdTags", "tag_key_source"]

_MAX_VERIFIED = 10_000  # ids remembered as verified, then forgotten all at once


def tag_key_source(store: object) -> IdTagKeys | None:
    """Where ``store``'s tag key comes from: the store itself, or the store a wrapper such
    as ``CachedStore`` wraps (its ``store`` attribute); ``None`` if neither keeps one."""
    for candidate in (store, getattr(store, "store", None)):
        if isinstance(candidate, IdTagKeys):
            return candidate
    return None


class IdTags:
    """The tag key of one store, for issuing tagged client ids and checking presented ones.

    The key is fetched from the store on first need (``StoreUnavailable`` if that
    read fails; the next call tries again) and kept for the object's lifetime.
    """

    __slots__ = ("_key", "_lost", "_source", "verified")

    def __init__(self, store: object) -> None:
        self._source = tag_key_source(store)
        self._key: bytes | None = None
        # The store's tag key was once lost (``id_tag_lost``): ids tagged under the old
        # key fail their tag, so a failed tag is looked up rather than refused.
        self._lost = False
        self.verified: dict[str, str] = {}
        """Ids whose tag verified, with their API (read it first: ``verified.get(id) ==
        api`` needs no call). An HMAC costs more than the rest of a cache hit together,
        and a caller sends the same id again and again. Only ids that verify are kept,
        so made-up ids (which never do) cannot fill it."""

    def __repr__(self) -> str:
        state = "no tag key" if self._source is None else "tag key hidden"
        return f"IdTags({state})"

    async def _load(self) -> bytes | None:
        if self._key is not None or self._source is None:
            return self._key
        key = await self._source.id_tag_key()
        if not isinstance(key, bytes) or len(key) != ID_TAG_KEY_BYTES:
            # Never the value: only that it is unusable.
            raise StoreUnavailable("the store's client id tag key is damaged")
        self._lost = getattr(self._source, "id_tag_lost", False) is True
        self._key = key
        return key

    async def new_client_id(self, api: str) -> str:
        """A fresh client id for a key of ``api``: tagged when the store keeps a tag key."""
        key = await self._load()
        return new_client_id(key, api) if key is not None else new_client_id()

    @property
    def ready(self) -> bool:
        """Whether :meth:`plausible` answers without a read: the tag key has been read, or
        the store keeps none."""
        return self._key is not None or self._source is None

    def plausible(self, api: str, client_id: str) -> bool | None:
        """:meth:`worth_a_read` without waiting: ``None`` only while the store's tag key has
        not been read yet (then await ``worth_a_read``, which reads it)."""
        if self.verified.get(client_id) == api:
            return True
        if not could_be_client_id(client_id):
            return False
        if len(client_id) == LEGACY_CLIENT_ID_LENGTH:
            return True
        key = self._key
        if key is None:
            return True if self._source is None else None
        expected = client_id_tag(key, api, client_id[:LEGACY_CLIENT_ID_LENGTH])
        if not hmac.compare_digest(expected.encode(), client_id[LEGACY_CLIENT_ID_LENGTH:].encode()):
            return self._lost  # not remembered: it did not verify
        verified = self.verified
        if len(verified) >= _MAX_VERIFIED:
            verified.clear()
        verified[client_id] = api
        return True

    async def worth_a_read(self, api: str, client_id: str) -> bool:
        """Whether the store could hold a key ``client_id`` of ``api``, without asking it.

        ``False`` for an id keyguard could never have issued (wrong length or alphabet)
        and for a tagged-length id whose tag does not verify for ``api`` (compared in
        constant time); ``True`` for an id whose tag verifies, for a legacy id (32 hex
        characters, issued before tags) and, on a store without a tag key or one whose
        tag key was once lost (``id_tag_lost``: ids tagged under the old key), for any
        well-formed id. An id that verified once is remembered (10,000 of them at most),
        so a caller's repeat requests cost a dict lookup, not an HMAC.
        """
        found = self.plausible(api, client_id)
        if found is None:
            await self._load()
            found = self.plausible(api, client_id)
        return bool(found)
