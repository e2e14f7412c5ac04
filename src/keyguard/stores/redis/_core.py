"""The Redis stores' shared core, :class:`RedisCore`: its calls on APIs and keys
(``_keys.py``), audit events and usage (``_activity.py``), the change feed (``_feed.py``)
and the client id tag key, on the plumbing of ``_base.py``.
"""

from __future__ import annotations

from typing import Any

from keyguard.stores._idtag import new_tag_key_text, parse_tag_key
from keyguard.stores.redis._common import ClientT
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

    async def id_tag_key(self) -> bytes:
        """The client id tag key (``IdTagKeys``): the Redis key ``<prefix>idtag``, written
        by the first process that needs it with ``SET NX`` and read back, so racing
        processes agree; then kept in memory. It never expires (keep Redis on a
        ``noeviction`` policy, as for the keys themselves)."""
        key = self._id_tag_key
        if key is not None:
            return key
        name = f"{self.prefix}idtag"
        candidate = new_tag_key_text()

        async def create(redis: ClientT) -> Any:
            await redis.set(name, candidate, nx=True)
            return await redis.get(name)

        key = self._id_tag_key = parse_tag_key(await self._call(create), self.description)
        return key
