"""``redis://`` and ``rediss://``: keys in Redis, shared by many app instances.

Built on redis-py's asyncio client. The data model, the Lua scripts and the
failure behaviour are documented in ``docs/redis-store.md``; in short:

* each API is **one hash**, ``<prefix>{<api>}``, holding the API's state
  (``exposed``, ``max``, ``rate_limits``, per-kind counts, an insertion
  counter), its keys (``k:<client_id>``, laid out at ``_RECORD_LENGTH``),
  their secret hashes (``s:<client_id>``), the previous secret of a roll
  (``p:<client_id>``) and a name index (``n:<casefolded name>`` → client id).
  The ``{<api>}`` hash tag keeps everything of one API in one Cluster slot, so
  every script stays legal on Redis Cluster (``redis_cluster.py`` runs this same
  code, :class:`RedisCore`, on a ``RedisCluster`` client);
* each API's listing order is a sorted set in its slot, ``<prefix>{<api>}:order``
  (members ``<created_at µs><insertion number><client id>``), kept by the insert and
  delete scripts in their step and rebuilt by the page script for data written
  before it existed (see ``_pages.py``): a page of keys is one ``ZRANGEBYLEX``;
* each API's audit events are sorted sets in its slot (``<prefix>{<api>}:audit`` and
  one per key), written by the change's own script, and its usage is one hash per
  hour (``<prefix>{<api>}:usage:<hour>``);
* the API names are a sorted set, ``<prefix>apis``, so listing never scans; it is
  in a slot of its own, so it is written beside the scripts, never in them (as is
  ``<prefix>audit:apis``, the APIs that have audit events);
* the client id tag key is the string ``<prefix>idtag``, written once with ``SET NX``;
* every script also publishes its change on ``<prefix>changes`` (the change feed,
  ``watch``), so other processes' caches drop what it changed at once;
* the request path (``lookup``) is one ``HMGET``: the API's state, the key
  and its secret hashes in a single round trip;
* every write that must be atomic (R1 + R2 + R3 with the insert, R3 with a
  rename, R4 and the roll of a secret, delete) is one Lua script on the API's
  hash. A key record written by the first layout (five fields) is read as it
  is, the later fields taking their defaults: no upgrade step, no rewrite.

Every call ends within ``timeout`` seconds: any Redis or network failure
(refused, timed out, wrong password, a failover in progress) is raised as
:class:`~keyguard.errors.StoreUnavailable` with the driver's error chained.
"""

from keyguard.stores.redis._core import RedisCore
from keyguard.stores.redis._store import RedisStore

__all__ = ["RedisCore", "RedisStore"]
