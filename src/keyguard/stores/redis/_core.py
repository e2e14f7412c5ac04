"""The Redis stores' shared core, :class:`RedisCore`: its calls on APIs and keys
(``_keys.py``), audit events and usage (``_activity.py``), the change feed (``_feed.py``)
and the client id tag key, on the plumbing of ``_base.py``.
"""

from __future__ import annotations

from typing import Any, cast

from keyguard.secrets import CLIENT_ID_LENGTH
from keyguard.stores._idtag import new_tag_key_text, parse_tag_key, report_lost
from keyguard.stores.redis._common import ClientT, _text
from keyguard.stores.redis._feed import _Feed
from keyguard.stores.redis._keys import _Keys


class RedisCore(_Keys[ClientT], _Feed[ClientT]):
    """What every Redis store shares, whatever client it runs on: the data model, the
    scripts, the record encoding, the change feed and the event-loop binding.

    :class:`RedisStore` runs it on a standalone ``redis.asyncio.Redis``,
    :class:`~keyguard.stores.redis_cluster.RedisClusterStore` on a
    ``redis.asyncio.RedisCluster``: every Redis key of one API (its hash, its listing
    order, its audit sets, its usage) carries the API's hash tag, so every script
    touches one slot and works alike on both. Not to be used directly.
    """

    _id_tag_key: bytes | None = None
    #: Whether the tag key was once lost (``<prefix>idtag:lost``), read with the key.
    id_tag_lost: bool = False

    async def id_tag_key(self) -> bytes:
        """The client id tag key (``IdTagKeys``): the Redis key ``<prefix>idtag``, written
        by the first process that needs it with ``SET NX`` and read back, so racing
        processes agree; then kept in memory. It never expires (keep Redis on a
        ``noeviction`` policy, as for the keys themselves).

        A missing ``<prefix>idtag`` while an API holds tagged ids means the key they were
        tagged under is gone (evicted, deleted): the mark ``<prefix>idtag:lost`` is set
        before the new key, so every process that reads the new key reads the mark too
        (``id_tag_lost``)."""
        key = self._id_tag_key
        if key is not None:
            return key
        name, mark = f"{self.prefix}idtag", f"{self.prefix}idtag:lost"
        candidate = new_tag_key_text()
        found_now = False

        async def create(redis: ClientT) -> tuple[Any, bool]:
            nonlocal found_now
            # GET, not EXISTS: the commands docs/redis-store.md's ACL grants.
            if await redis.get(name) is None:
                found_now = await self._holds_tagged_ids(redis)
                if found_now:
                    await redis.set(mark, "1")
                await redis.set(name, candidate, nx=True)
            return await redis.get(name), await redis.get(mark) is not None

        text, lost = await self._call(create)
        key = parse_tag_key(text, self.description)
        if lost:
            report_lost(self.description, found_now=found_now)
        self.id_tag_lost = lost
        self._id_tag_key = key
        return key

    async def _holds_tagged_ids(self, redis: ClientT) -> bool:
        """Whether any API's hash holds a key whose client id is tagged (``CLIENT_ID_LENGTH``
        characters): ``HSCAN`` of each API, stopping at the first such id. Untagged (legacy)
        ids alone mean a store from before tags, not a lost key."""
        pattern = "k:" + "?" * CLIENT_ID_LENGTH
        for api in cast("list[bytes | str]", await redis.zrange(self._index, 0, -1)):
            async for _ in redis.hscan_iter(self._api_key(_text(api)), match=pattern, count=1000):
                return True
        return False
