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
* the API names are a sorted set, ``<prefix>apis``, so listing never scans; it is
  in a slot of its own, so it is written beside the scripts, never in them;
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

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar, Generic, TypeVar, cast

import anyio

from keyguard.audit import (
    DEFAULT_AUDIT_RETENTION,
    AuditEvent,
    check_retention,
    cutoff_id,
)
from keyguard.errors import (
    ApiHasKeys,
    ApiNotExposed,
    ConfigurationError,
    DuplicateName,
    InvalidRequest,
    KeyLimitReached,
    StoreUnavailable,
)
from keyguard.models import (
    Api,
    KeyChanges,
    KeyKind,
    KeyRecord,
    RateLimit,
    dump_meta,
    dump_rate_limits,
    load_meta,
    load_rate_limits,
    name_key,
)
from keyguard.usage import RETENTION, UsageCount, hour_start

try:
    from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
    from redis.asyncio.client import PubSub
    from redis.asyncio.connection import SSLConnection
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.commands.core import AsyncScript
    from redis.exceptions import RedisClusterException, RedisError
except ImportError as exc:  # pragma: no cover - exercised by a test that hides redis
    raise ConfigurationError("redis:// needs: pip install 'keyguard[redis]'") from exc

__all__ = ["RedisCore", "RedisStore"]

T = TypeVar("T")
# The redis-py client a store runs on: a standalone Redis, or a Cluster (redis_cluster.py).
ClientT = TypeVar("ClientT", bound="Redis | RedisCluster")

DEFAULT_PREFIX = "keyguard:"
DEFAULT_TIMEOUT = 3.0
DEFAULT_MAX_CONNECTIONS = 100

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
# What a failing Redis or network can raise; each becomes StoreUnavailable.  The
# built-in TimeoutError is the overall deadline (anyio.fail_after) running out.
_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError, asyncio.TimeoutError)
_TRUE = (b"1", "1")
_PASSWORD = re.compile(r"(?<=:)[^:@/]*(?=@)")
_Closer = AsyncGenerator[None, None]

# -- Lua ---------------------------------------------------------------------------------
# The audit log (SPEC §10): each write script ends, when its change is made, by adding the
# event to the API's audit sorted set (KEYS[2], ``<prefix>{<api>}:audit``) and, for a key's
# change, to the key's (KEYS[3], ``<prefix>{<api>}:audit:<client_id>``): the same hash tag,
# so one script still touches one slot.  Members are the event id (26 characters that sort
# by time) followed by the event's JSON, all with score 0, so they sort by id and a page is
# one ZREVRANGEBYLEX.  The last three ARGV of every write script are the member ('' for no
# event), the id below which events are past retention, and the retention in seconds.
_AUDIT_LUA = """
local function record_audit()
  local member, cutoff, ttl = ARGV[#ARGV - 2], ARGV[#ARGV - 1], ARGV[#ARGV]
  if member == '' then return end
  for i = 2, #KEYS do
    redis.call('ZADD', KEYS[i], 0, member)
    redis.call('ZREMRANGEBYLEX', KEYS[i], '-', '(' .. cutoff)
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
"""
# Every script touches exactly one key, the API's hash (KEYS[1]), so it is atomic and
# legal on Redis Cluster.  Key records are JSON arrays (see _RECORD_LENGTH); scripts only
# read them (cjson.decode), never re-encode them: Lua's JSON encoder would round a
# microsecond timestamp to 14 digits.  A changed record is encoded in Python and written
# by a script only if the stored one is still the one it was computed from.

# ARGV: default max, exposed ('' to keep), max ('' to keep), change channel, change notice,
# rate limits JSON ('' to keep).  Answers the API's fields and whether it was created.
_UPSERT_API_LUA = """
local api = KEYS[1]
local created = 0
if redis.call('HEXISTS', api, 'exposed') == 0 then
  redis.call('HSET', api, 'exposed', '0', 'max', ARGV[1],
             'c:internal', 0, 'c:external', 0, 'seq', 0)
  created = 1
end
if ARGV[2] ~= '' then redis.call('HSET', api, 'exposed', ARGV[2]) end
if ARGV[3] ~= '' then redis.call('HSET', api, 'max', ARGV[3]) end
if ARGV[6] ~= '' then redis.call('HSET', api, 'rate_limits', ARGV[6]) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
record_audit()
local row = redis.call('HMGET', api, 'exposed', 'max', 'c:internal', 'c:external', 'rate_limits')
row[6] = created
return row
"""

# ARGV: client id, kind, casefolded name, record JSON without its seq, has-secret flag,
# secret hash, change channel, change notice, previous-secret JSON ('' for none).  R1, R2,
# R3 are checked against the stored state, then the key, its name entry, its secret hashes
# and the count are written and the change announced: nothing can run in between.
_INSERT_KEY_LUA = """
local api = KEYS[1]
local id, kind, folded = ARGV[1], ARGV[2], ARGV[3]
local state = redis.call('HMGET', api, 'exposed', 'max', 'c:' .. kind,
                         'n:' .. folded, 'k:' .. id)
if state[1] ~= '1' then return 'api_not_exposed' end
if tonumber(state[3] or 0) >= tonumber(state[2]) then return 'key_limit_reached' end
if state[4] then return 'duplicate_name' end
if state[5] then return 'duplicate_client_id' end
local seq = redis.call('HINCRBY', api, 'seq', 1)
redis.call('HINCRBY', api, 'c:' .. kind, 1)
redis.call('HSET', api, 'k:' .. id, '[' .. seq .. ',' .. string.sub(ARGV[4], 2),
           'n:' .. folded, id)
if ARGV[5] == '1' then redis.call('HSET', api, 's:' .. id, ARGV[6]) end
if ARGV[9] ~= '' then redis.call('HSET', api, 'p:' .. id, ARGV[9]) end
redis.call('PUBLISH', ARGV[7], ARGV[8])
record_audit()
return 'ok'
"""

# ARGV: client id, the record as read, the record to write, its casefolded name as read,
# the new casefolded name, change channel, change notice.  Compare-and-set: if another
# writer changed the record since it was read, nothing is written ('stale', the caller
# reads again).  R3 on a rename is checked against the name index, which changes with
# the record.  Answers the record, its secret hash and its previous secret as stored.
_UPDATE_KEY_LUA = """
local api, id = KEYS[1], ARGV[1]
local raw = redis.call('HGET', api, 'k:' .. id)
if not raw then return 'missing' end
if raw ~= ARGV[2] then return 'stale' end
local old_name, new_name = 'n:' .. ARGV[4], 'n:' .. ARGV[5]
if new_name ~= old_name then
  local holder = redis.call('HGET', api, new_name)
  if holder and holder ~= id then return 'duplicate_name' end
  if redis.call('HGET', api, old_name) == id then redis.call('HDEL', api, old_name) end
  redis.call('HSET', api, new_name, id)
end
redis.call('HSET', api, 'k:' .. id, ARGV[3])
redis.call('PUBLISH', ARGV[6], ARGV[7])
record_audit()
return redis.call('HMGET', api, 'k:' .. id, 's:' .. id, 'p:' .. id, 'u:' .. id)
"""

# ARGV: client id, secret hash, previous secret's end in µs ('' to keep none), change
# channel, change notice.  Only an external key takes a secret (R4).  The hash being
# replaced is read here, so a roll racing another roll keeps a whole pair: its new hash,
# and as previous the hash that was current when it ran.
_SET_HASH_LUA = """
local api, id = KEYS[1], ARGV[1]
local raw = redis.call('HGET', api, 'k:' .. id)
if not raw or cjson.decode(raw)[2] ~= 'external' then return false end
local current = redis.call('HGET', api, 's:' .. id)
if ARGV[3] ~= '' and current then
  redis.call('HSET', api, 'p:' .. id, '[' .. ARGV[3] .. ',' .. cjson.encode(current) .. ']')
else
  redis.call('HDEL', api, 'p:' .. id)
end
redis.call('HSET', api, 's:' .. id, ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[5])
record_audit()
return redis.call('HMGET', api, 'k:' .. id, 's:' .. id, 'p:' .. id, 'u:' .. id)
"""

# ARGV: client id, change channel, change notice.  The key, its secret hashes, its name
# entry and its count go together.
_DELETE_KEY_LUA = """
local api, id = KEYS[1], ARGV[1]
local raw = redis.call('HGET', api, 'k:' .. id)
if not raw then return 0 end
local record = cjson.decode(raw)
local name_field = 'n:' .. record[4]
if redis.call('HGET', api, name_field) == id then redis.call('HDEL', api, name_field) end
redis.call('HDEL', api, 'k:' .. id, 's:' .. id, 'p:' .. id, 'u:' .. id)
redis.call('HINCRBY', api, 'c:' .. record[2], -1)
redis.call('PUBLISH', ARGV[2], ARGV[3])
record_audit()
return 1
"""

# ARGV: force flag, change channel, change notice.  The check for keys and the delete of
# the whole hash (state, keys, hashes, names) are one step.
_DELETE_API_LUA = """
local api = KEYS[1]
local state = redis.call('HMGET', api, 'exposed', 'c:internal', 'c:external')
if not state[1] then return 0 end
local held = tonumber(state[2] or 0) + tonumber(state[3] or 0)
if held > 0 and ARGV[1] ~= '1' then return -held end
redis.call('DEL', api)
redis.call('PUBLISH', ARGV[2], ARGV[3])
record_audit()
return 1
"""

# KEYS: the API's hash, then one usage hash per hour written.  ARGV: for each usage hash
# its expiry (Unix seconds), then five values per count: the usage hash's number (1 for
# KEYS[2]), client id, requests, rate-limited, last admitted time in µs ('' for none).
# Counts are added (HINCRBY), so processes flushing the same hour sum up; a key's
# ``u:<client_id>`` (its last_used_at) only ever rises, and only for a key that exists.
_RECORD_USAGE_LUA = """
local api = KEYS[1]
local hours = #KEYS - 1
local i = hours + 1
while i <= #ARGV do
  local bucket, id = KEYS[tonumber(ARGV[i]) + 1], ARGV[i + 1]
  if ARGV[i + 2] ~= '0' then redis.call('HINCRBY', bucket, 'r:' .. id, ARGV[i + 2]) end
  if ARGV[i + 3] ~= '0' then redis.call('HINCRBY', bucket, 'l:' .. id, ARGV[i + 3]) end
  local used = ARGV[i + 4]
  if used ~= '' and redis.call('HEXISTS', api, 'k:' .. id) == 1 then
    local old = redis.call('HGET', api, 'u:' .. id)
    if not old or tonumber(old) < tonumber(used) then
      redis.call('HSET', api, 'u:' .. id, used)
    end
  end
  i = i + 5
end
for h = 1, hours do redis.call('EXPIREAT', KEYS[h + 1], ARGV[h]) end
return 1
"""

_RULE_ERRORS = {
    "api_not_exposed": (ApiNotExposed, "API {api!r} is not exposed"),
    "key_limit_reached": (KeyLimitReached, "API {api!r} already has its limit of {kind} keys"),
    "duplicate_name": (DuplicateName, "API {api!r} already has a key named {name!r}"),
    "duplicate_client_id": (InvalidRequest, "API {api!r} already has a key with this client id"),
}


class RedisCore(Generic[ClientT]):
    """What every Redis store shares, whatever client it runs on: the data model, the
    scripts, the record encoding, the change feed and the event-loop binding.

    :class:`RedisStore` runs it on a standalone ``redis.asyncio.Redis``,
    :class:`~keyguard.stores.redis_cluster.RedisClusterStore` on a
    ``redis.asyncio.RedisCluster``: every key of one API is one Redis key, so every
    script touches one slot and works alike on both. Not to be used directly.
    """

    #: What the store is on, for log lines and errors ("Redis at …").
    _server: ClassVar[str] = "Redis"

    def _setup(
        self,
        client: ClientT,
        prefix: str,
        timeout: float,
        *,
        factory: Callable[[], ClientT] | None,
        location: str,
        audit_retention: timedelta | float = DEFAULT_AUDIT_RETENTION,
    ) -> None:
        if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
            raise ConfigurationError("prefix must be a string without '{' or '}'")
        _check_timeout(timeout)
        self.audit_retention = check_retention(audit_retention)
        self.prefix = prefix
        self.timeout = float(timeout)
        self._index = f"{prefix}apis"
        self._audit_index = f"{prefix}audit:apis"
        self._channel = f"{prefix}changes"
        self._location = location
        self._url: str | None = None
        self._factory: Callable[[], ClientT] | None = factory
        self._closed = False
        # A client the caller passed in is used as it is, in whatever loop they use it.
        self._shared: ClientT | None = None if factory else client
        # Our own clients: one per event loop (redis-py's connections belong to the
        # loop that opened them).  ``_current`` is the last (loop, client) used, read in
        # one step on the hot path; a call from another loop (or after aclose) finds
        # its loop differs and goes through ``_redis``.
        self._fresh: ClientT | None = client if factory else None
        self._current: tuple[asyncio.AbstractEventLoop | None, ClientT] = (None, client)
        self._by_loop: dict[asyncio.AbstractEventLoop, tuple[ClientT, _Closer]] = {}
        self._bind_lock = threading.Lock()
        self._upsert_api = AsyncScript(client, _AUDIT_LUA + _UPSERT_API_LUA)
        self._insert_key = AsyncScript(client, _AUDIT_LUA + _INSERT_KEY_LUA)
        self._update_key = AsyncScript(client, _AUDIT_LUA + _UPDATE_KEY_LUA)
        self._set_secret_hash = AsyncScript(client, _AUDIT_LUA + _SET_HASH_LUA)
        self._delete_key = AsyncScript(client, _AUDIT_LUA + _DELETE_KEY_LUA)
        self._delete_api = AsyncScript(client, _AUDIT_LUA + _DELETE_API_LUA)
        self._record_usage = AsyncScript(client, _RECORD_USAGE_LUA)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._location!r}, prefix={self.prefix!r})"

    @property
    def counter_url(self) -> str | None:
        """The URL this store was opened with (password included: never log it), for a
        rate limiter counting on the same server (SPEC §9's default); ``None`` for a
        store made from a client."""
        return self._url

    @property
    def description(self) -> str:
        """Where the keys are, for log lines (no credentials)."""
        return f"{self._server} at {self._location} (prefix {self.prefix!r})"

    @property
    def client(self) -> ClientT:
        """The redis-py client the store last used (its own, or the one passed in)."""
        return self._shared if self._shared is not None else self._current[1]

    # -- the KeyStore protocol --------------------------------------------------------------

    async def lookup(self, api: str, client_id: str | None) -> tuple[bool, KeyRecord | None]:
        """Whether ``api`` is exposed, and the key ``client_id`` of it: one ``HMGET``."""
        key = self._api_key(api)
        if client_id is None:
            (exposed,) = await self._call(lambda redis: redis.hmget(key, ["exposed"]))
            return exposed in _TRUE, None
        fields = ["exposed", *_key_fields(client_id)]
        exposed, raw, secret_hash, previous, used = await self._call(
            lambda redis: redis.hmget(key, fields)
        )
        record = None if raw is None else _record(api, client_id, raw, secret_hash, previous, used)
        return exposed in _TRUE, record

    async def get_api(self, api: str) -> Api | None:
        """The API and its key counts (one ``HMGET``), or ``None`` if never created."""
        key = self._api_key(api)
        row = await self._call(lambda redis: redis.hmget(key, _API_FIELDS))
        return _api(api, row)

    async def list_apis(self) -> list[Api]:
        """Every API by name: the name index, then one pipelined ``HMGET`` per API."""

        async def read(redis: ClientT) -> list[Api]:
            members = cast("list[bytes | str]", await redis.zrange(self._index, 0, -1))
            names = [_text(member) for member in members]
            if not names:
                return []
            async with redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hmget(self._api_key(name), _API_FIELDS)
                rows = await pipe.execute()
            # A name whose hash is missing was indexed by an upsert that never finished.
            return [a for a in map(_api, names, rows) if a is not None]

        apis = await self._call(read)
        return sorted(apis, key=lambda a: a.name)

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
        """Index the name, then create or update the API's hash in one script (and index
        the name again if the script created the hash: see ``docs/redis-store.md``)."""
        key = self._api_key(api)
        keys = [key, *self._audit_keys(api, None)]
        args = [
            int(default_max_keys_per_kind),
            "" if exposed is None else ("1" if exposed else "0"),
            "" if max_keys_per_kind is None else int(max_keys_per_kind),
            self._channel,
            api,
            dump_rate_limits(rate_limits) or "",
            *self._audit_args(audit),
        ]

        async def write(redis: ClientT) -> Any:
            # The index lives in another slot, so it cannot join the script.  It is written
            # first (a crash after it leaves a name without a hash, which readers skip),
            # and again after a script that created the hash: a delete_api racing this
            # call may have taken the name out in between.
            await redis.zadd(self._index, {api: 0})
            await self._index_audit(redis, api, audit)
            row = await self._upsert_api(keys=keys, args=args, client=redis)
            if row[5]:
                await redis.zadd(self._index, {api: 0})
            return row

        row = await self._call(write)
        upserted = _api(api, row[:5])
        assert upserted is not None  # the script has just created it
        return upserted

    async def insert_key(self, record: KeyRecord, *, audit: AuditEvent | None = None) -> None:
        """Check R1, R2, R3 and insert, atomically, in one Lua script (one round trip)."""
        folded = name_key(record.name)
        body = _dumps(_body(record, folded))
        has_secret = record.secret_hash is not None
        args = [
            record.client_id,
            record.kind.value,
            folded,
            body,
            "1" if has_secret else "0",
            record.secret_hash or "",
            self._channel,
            _notice(record.api, record.client_id),
            _dump_previous(record),
            *self._audit_args(audit),
        ]
        keys = [self._api_key(record.api), *self._audit_keys(record.api, record.client_id)]

        async def write(redis: ClientT) -> Any:
            await self._index_audit(redis, record.api, audit)
            return await self._insert_key(keys=keys, args=args, client=redis)

        outcome = _text(await self._call(write))
        if outcome != "ok":
            error, message = _RULE_ERRORS[outcome]
            raise error(message.format(api=record.api, kind=record.kind.value, name=record.name))

    async def get_key(self, api: str, client_id: str) -> KeyRecord | None:
        """The key ``client_id`` of ``api`` with its secret hash (one ``HMGET``), or ``None``."""
        key = self._api_key(api)
        fields = _key_fields(client_id)
        raw, secret_hash, previous, used = await self._call(lambda redis: redis.hmget(key, fields))
        return None if raw is None else _record(api, client_id, raw, secret_hash, previous, used)

    async def list_keys(self, api: str) -> list[KeyRecord]:
        """The keys of ``api`` from one ``HGETALL`` of its hash, by ``created_at``, then seq."""
        key = self._api_key(api)
        raw_fields = await self._call(lambda redis: redis.hgetall(key))
        fields = {_text(name): value for name, value in raw_fields.items()}
        found: list[tuple[int, int, KeyRecord]] = []
        for name, value in fields.items():
            if name.startswith("k:"):
                client_id = name[2:]
                stored = json.loads(value)
                record = _decoded(
                    api,
                    client_id,
                    stored,
                    fields.get(f"s:{client_id}"),
                    fields.get(f"p:{client_id}"),
                    fields.get(f"u:{client_id}"),
                )
                found.append((stored[4], stored[0], record))
        found.sort(key=lambda entry: entry[:2])
        return [record for _, _, record in found]

    async def update_key(
        self,
        api: str,
        client_id: str,
        changes: KeyChanges,
        *,
        audit: AuditEvent | None = None,
    ) -> KeyRecord | None:
        """Change the given fields of the key: read it, then write the changed record in one
        script that checks R3 on a rename and that the record is still the one read
        (otherwise it is read again), moving the name entry with it."""
        if not changes.given():
            return await self.get_key(api, client_id)
        key = self._api_key(api)
        keys = [key, *self._audit_keys(api, client_id)]
        notice = _notice(api, client_id)
        audit_args = self._audit_args(audit)

        async def change(redis: ClientT) -> KeyRecord | None:
            await self._index_audit(redis, api, audit)
            while True:
                raw = await redis.hget(key, f"k:{client_id}")
                if raw is None:
                    return None
                stored = json.loads(raw)
                current = _decoded(api, client_id, stored, None, None, None)
                updated = changes.apply(current)
                old_folded: str = stored[3]
                # The index holds the folded name as written; a name kept keeps its entry.
                new_folded = old_folded if updated.name == current.name else name_key(updated.name)
                # Fields a later layout appended, unknown here, are kept as they are.
                rewritten = _dumps(
                    [stored[0], *_body(updated, new_folded), *stored[_RECORD_LENGTH:]]
                )
                args = [client_id, raw, rewritten, old_folded, new_folded, self._channel, notice]
                args += audit_args
                reply = await self._update_key(keys=keys, args=args, client=redis)
                if isinstance(reply, list):
                    return _record(api, client_id, *reply)
                outcome = _text(reply)
                if outcome == "missing":
                    return None
                if outcome == "duplicate_name":
                    raise DuplicateName(f"API {api!r} already has a key named {updated.name!r}")
                # "stale": another writer changed the key since it was read; read it again.

        return await self._call(change)

    async def set_secret_hash(
        self,
        api: str,
        client_id: str,
        secret_hash: str,
        *,
        previous_until: datetime | None = None,
        audit: AuditEvent | None = None,
    ) -> KeyRecord | None:
        """Set the hash of an external key, atomically checking its kind (R4) and keeping the
        hash it replaces as the previous one until ``previous_until``, in one script."""
        keys = [self._api_key(api), *self._audit_keys(api, client_id)]
        until = "" if previous_until is None else str(_micros(previous_until))
        args = [client_id, secret_hash, until, self._channel, _notice(api, client_id)]
        args += self._audit_args(audit)

        async def write(redis: ClientT) -> Any:
            await self._index_audit(redis, api, audit)
            return await self._set_secret_hash(keys=keys, args=args, client=redis)

        reply = await self._call(write)
        return None if reply is None else _record(api, client_id, *reply)

    async def delete_key(
        self, api: str, client_id: str, *, audit: AuditEvent | None = None
    ) -> bool:
        """Remove the key, its secret hash, its name entry and its count in one script."""
        keys = [self._api_key(api), *self._audit_keys(api, client_id)]
        args = [client_id, self._channel, _notice(api, client_id), *self._audit_args(audit)]

        async def write(redis: ClientT) -> Any:
            await self._index_audit(redis, api, audit)
            return await self._delete_key(keys=keys, args=args, client=redis)

        deleted = await self._call(write)
        return bool(int(deleted))

    async def delete_api(self, api: str, *, force: bool, audit: AuditEvent | None = None) -> bool:
        """Delete the API's hash in one script (refused while it has keys unless ``force``),
        then its name from the index, unless an upsert has created the API again. Its
        audit events stay (other Redis keys)."""
        key = self._api_key(api)
        keys = [key, *self._audit_keys(api, None)]
        args = ["1" if force else "0", self._channel, api, *self._audit_args(audit)]

        async def remove(redis: ClientT) -> int:
            await self._index_audit(redis, api, audit)
            outcome = int(await self._delete_api(keys=keys, args=args, client=redis))
            if outcome > 0:
                # Another slot, so not in the script.  An upsert_api that re-created the
                # API since the script may have indexed it before this ZREM: index it again.
                await redis.zrem(self._index, api)
                if await redis.hexists(key, "exposed"):
                    await redis.zadd(self._index, {api: 0})
            return outcome

        outcome = await self._call(remove)
        if outcome < 0:
            raise ApiHasKeys(f"API {api!r} has {-outcome} keys")
        return bool(outcome)

    async def list_audit(
        self,
        *,
        api: str | None = None,
        client_id: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[AuditEvent]:
        """Events newest first: one ZREVRANGEBYLEX of the API's (or the key's) sorted set;
        across APIs, one per API named in the audit index, pipelined and merged."""
        cutoff = cutoff_id(self.audit_retention)
        upper = "+" if before is None else f"({before}"
        lower = f"[{cutoff}"

        async def read(redis: ClientT) -> list[AuditEvent]:
            if api is not None:
                names = [api]
            else:
                oldest = time.time() - self.audit_retention.total_seconds()
                await redis.zremrangebyscore(self._audit_index, "-inf", f"({oldest}")
                members = cast("list[bytes | str]", await redis.zrange(self._audit_index, 0, -1))
                names = [_text(member) for member in members]
            if not names:
                return []
            async with redis.pipeline(transaction=False) as pipe:
                for name in names:
                    zset = self._audit_keys(name, client_id)[-1]
                    pipe.zrevrangebylex(zset, upper, lower, start=0, num=limit)
                pages = await pipe.execute()
            members = sorted((_text(m) for page in pages for m in page), reverse=True)
            return [AuditEvent.loads(member[_AUDIT_ID_LENGTH:]) for member in members[:limit]]

        return await self._call(read)

    async def record_usage(self, counts: Sequence[UsageCount]) -> None:
        """One script per API, all in one pipeline (one round trip; on a cluster, the scripts
        run concurrently, one per API): each hour's counts go
        to the hash ``<prefix>{<api>}:usage:<hour>`` (``HINCRBY`` of ``r:``/``l:<client_id>``),
        which expires 35 days after its hour; each key's ``u:<client_id>`` rises to its
        latest use. The ``{<api>}`` hash tag keeps an API's usage in its Cluster slot."""
        by_api: dict[str, list[UsageCount]] = {}
        for count in counts:
            by_api.setdefault(count.api, []).append(count)
        if not by_api:
            return
        calls: list[tuple[list[str], list[Any]]] = []
        for api, rows in sorted(by_api.items()):
            hours = sorted({row.hour for row in rows})
            number = {hour: n for n, hour in enumerate(hours, start=1)}
            keys = [self._api_key(api), *(self._usage_key(api, hour) for hour in hours)]
            args: list[Any] = [int((hour + RETENTION).timestamp()) for hour in hours]
            for row in rows:
                args += [
                    number[row.hour],
                    row.client_id,
                    int(row.requests),
                    int(row.rate_limited),
                    "" if row.last_used_at is None else _micros(row.last_used_at),
                ]
            calls.append((keys, args))

        async def write(redis: ClientT) -> None:
            if not isinstance(redis, Redis):
                # A cluster client: one script call per API, all at once (each API's keys
                # are in its own slot, perhaps on another node).
                await asyncio.gather(
                    *(
                        self._record_usage(keys=keys, args=args, client=redis)
                        for keys, args in calls
                    )
                )
                return
            async with redis.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    await self._record_usage(keys=keys, args=args, client=pipe)
                await pipe.execute()

        await self._call(write)

    async def read_usage(
        self, api: str, client_id: str | None, since: datetime
    ) -> list[UsageCount]:
        """Every hour's hash from ``since`` to now in one pipeline: ``HGETALL`` for an API,
        ``HMGET`` of the key's two fields for one key."""
        first = hour_start(since)
        if first < since:
            first += timedelta(hours=1)
        last = hour_start(datetime.now(timezone.utc))
        first = max(first, last - RETENTION)  # older hashes have expired
        hours: list[datetime] = []
        while first <= last:
            hours.append(first)
            first += timedelta(hours=1)
        if not hours:
            return []

        async def read(redis: ClientT) -> list[Any]:
            async with redis.pipeline(transaction=False) as pipe:
                for hour in hours:
                    key = self._usage_key(api, hour)
                    if client_id is None:
                        pipe.hgetall(key)
                    else:
                        pipe.hmget(key, [f"r:{client_id}", f"l:{client_id}"])
                replies: list[Any] = await pipe.execute()
                return replies

        replies = await self._call(read)
        found = []
        for hour, reply in zip(hours, replies, strict=True):
            if client_id is not None:
                requests, limited = reply
                if requests is not None or limited is not None:
                    found.append(
                        UsageCount(api, client_id, hour, int(requests or 0), int(limited or 0))
                    )
                continue
            per_key: dict[str, list[int]] = {}
            for name, value in reply.items():
                field = _text(name)
                slot = per_key.setdefault(field[2:], [0, 0])
                slot[0 if field.startswith("r:") else 1] += int(value)
            found += [UsageCount(api, key_id, hour, r, n) for key_id, (r, n) in per_key.items()]
        return found

    async def prune_usage(self, before: datetime) -> None:
        """Nothing to do: each hour's hash expires by itself 35 days after its hour."""

    async def watch(
        self,
        on_change: Callable[[str, str | None], None],
        *,
        on_ready: Callable[[], None],
    ) -> None:
        """The change feed (:class:`~keyguard.stores.base.ChangeFeed`): every write script
        publishes ``<api>`` or ``<api>\\n<client_id>`` on ``<prefix>changes``.

        ``on_ready`` is called whenever the subscription is (re)confirmed, including
        after redis-py silently reconnects, since notices may have been missed.
        """
        client = await self._redis()
        pubsub: PubSub | None = None
        try:
            with anyio.fail_after(self.timeout):
                pubsub = await self._subscriber(client)
                await pubsub.subscribe(self._channel)
            while True:
                # An explicit read timeout answers None when nothing came, on every
                # redis-py version (a blocking read may inherit the socket timeout).
                message = await pubsub.get_message(timeout=self.timeout)
                if message is None:
                    continue
                kind = _text(message["type"])
                if kind == "subscribe":
                    on_ready()
                elif kind == "message":
                    api, newline, client_id = _text(message["data"]).partition("\n")
                    on_change(api, client_id if newline else None)
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc
        finally:
            if pubsub is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(*_FAILURES):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it bare

    async def aclose(self) -> None:
        """Close the connections of a client the store created; a passed-in one stays open."""
        self._closed = True
        self._current = (None, self._current[1])  # every call now takes the slow path
        if self._factory is None:
            return
        for loop, (_client, closer) in list(self._by_loop.items()):
            if _running_loop() is loop:
                await closer.aclose()
            elif loop.is_running():
                # Another thread's loop: close there (its shutdown would, but later).
                asyncio.run_coroutine_threadsafe(_finish(closer), loop)
        if self._fresh is not None:
            fresh, self._fresh = self._fresh, None
            await fresh.aclose()

    # -- plumbing -------------------------------------------------------------------------

    def _api_key(self, api: str) -> str:
        return f"{self.prefix}{{{api}}}"

    def _audit_keys(self, api: str, client_id: str | None) -> list[str]:
        """The API's audit sorted set and, for a key, the key's: in the API's slot."""
        api_events = f"{self.prefix}{{{api}}}:audit"
        return [api_events] if client_id is None else [api_events, f"{api_events}:{client_id}"]

    def _audit_args(self, audit: AuditEvent | None) -> list[str]:
        """The last three arguments of every write script (see ``_AUDIT_LUA``)."""
        member = "" if audit is None else audit.id + audit.dumps()
        ttl = math.ceil(self.audit_retention.total_seconds())
        return [member, cutoff_id(self.audit_retention), str(ttl)]

    async def _index_audit(self, redis: ClientT, api: str, audit: AuditEvent | None) -> None:
        """Name ``api`` in the index of APIs with audit events, before its script runs.

        Another slot, so not in the script: an API indexed whose change was then refused
        costs an empty read. The score is when it was last indexed, so names whose events
        have all passed retention are dropped (the sorted sets themselves expire).
        """
        if audit is not None:
            await redis.zadd(self._audit_index, {api: time.time()})

    def _usage_key(self, api: str, hour: datetime) -> str:
        """The hash of ``api``'s usage in the hour starting at ``hour`` (Unix seconds)."""
        return f"{self.prefix}{{{api}}}:usage:{int(hour.timestamp())}"

    async def _subscriber(self, client: ClientT) -> PubSub:
        """A pub/sub connection for the change feed (not yet subscribed)."""
        raise NotImplementedError

    async def _call(self, operation: Callable[[ClientT], Awaitable[T]]) -> T:
        """``operation`` on this loop's client within ``timeout``; failures: StoreUnavailable."""
        loop, client = self._current
        if loop is not asyncio.get_running_loop():
            client = await self._redis()
        try:
            with anyio.fail_after(self.timeout):
                return await operation(client)
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc

    async def _redis(self) -> ClientT:
        """The client for the running event loop."""
        if self._closed:
            raise StoreUnavailable(f"the {self._server} store is closed")
        loop = asyncio.get_running_loop()
        current_loop, client = self._current
        if current_loop is loop:
            return client
        if self._shared is not None:
            self._current = (loop, self._shared)
            return self._shared
        return await self._bind(loop)

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
        return StoreUnavailable(f"{self._server} at {self._location} unavailable ({reason})")

    async def _bind(self, loop: asyncio.AbstractEventLoop) -> ClientT:
        """This loop's own client: the first loop gets the one built in ``from_url``."""
        bound = self._by_loop.get(loop)
        if bound is None:
            assert self._factory is not None
            with self._bind_lock:  # loops in two threads must not share the first client
                client, self._fresh = self._fresh or self._factory(), None
            closer = _close_with_loop(client, self._by_loop, loop)
            # Started here, the generator belongs to this loop: when the loop shuts down
            # (asyncio.run, anyio.run, a test client's portal), ``shutdown_asyncgens``
            # finalizes it, closing the client's connections while the loop still runs.
            await closer.asend(None)
            bound = self._by_loop[loop] = (client, closer)
        self._current = (loop, bound[0])
        return bound[0]


class RedisStore(RedisCore[Redis]):
    """A :class:`~keyguard.KeyStore` in Redis; the data model is in ``docs/redis-store.md``.

    Open one with :meth:`from_url` (``open_store("redis://…")`` does) or wrap a
    ``redis.asyncio.Redis`` client you already have. ``prefix`` starts every
    Redis key the store writes, so several apps can share one Redis; ``timeout``
    (seconds) bounds every call: past it, the call raises ``StoreUnavailable``.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        audit_retention: timedelta | float = DEFAULT_AUDIT_RETENTION,
    ) -> None:
        self._setup(
            client,
            prefix,
            timeout,
            factory=None,
            location=_location(client),
            audit_retention=audit_retention,
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        audit_retention: timedelta | float = DEFAULT_AUDIT_RETENTION,
        **client_options: Any,
    ) -> RedisStore:
        """A store on the Redis at ``url`` (``redis://[[user]:password@]host[:port][/db]``,
        or ``rediss://…`` for TLS), with a client the store creates and closes itself.

        ``client_options`` go to ``redis.asyncio.Redis.from_url`` (for example
        ``ssl_ca_certs``, ``max_connections``) and override the store's defaults:
        connect and read timeouts of ``timeout`` and a single immediate retry.
        Does no I/O: the client connects on first use, in the event loop using it.
        """
        _check_timeout(timeout)
        check_retention(audit_retention)
        options: dict[str, Any] = {
            "socket_connect_timeout": timeout,
            "socket_timeout": timeout,
            # One immediate retry replaces a pooled connection that died with a
            # restarted or failed-over server; more would only delay the answer.
            "retry": Retry(NoBackoff(), retries=1),
            **client_options,
        }

        def factory() -> Redis:
            # A blocking pool: past max_connections, a call waits (up to ``timeout``)
            # for a connection to come free instead of failing at once, so a burst of
            # requests queues briefly rather than turning into 503s.
            pool_options = {"max_connections": DEFAULT_MAX_CONNECTIONS, "timeout": timeout}
            pool = BlockingConnectionPool.from_url(url, **{**pool_options, **options})
            return Redis.from_pool(pool)

        try:
            client = factory()
            pool = client.connection_pool
            # The pool only stores its options; building one connection object (no
            # I/O) surfaces a misspelt option now rather than on the first request.
            pool.connection_class(**pool.connection_kwargs)
        except (ValueError, TypeError, RedisError) as exc:
            reason = _PASSWORD.sub("***", str(exc))
            raise ConfigurationError(f"invalid Redis store URL or option: {reason}") from None
        store = cls.__new__(cls)
        store._setup(
            client,
            prefix,
            timeout,
            factory=factory,
            location=_location(client),
            audit_retention=audit_retention,
        )
        store._url = url
        return store

    async def _subscriber(self, client: Redis) -> PubSub:
        return client.pubsub()


async def _close_with_loop(
    client: Redis | RedisCluster,
    registry: dict[asyncio.AbstractEventLoop, Any],
    loop: asyncio.AbstractEventLoop,
) -> _Closer:
    try:
        yield
    finally:
        registry.pop(loop, None)
        with contextlib.suppress(*_FAILURES):  # a connection that already broke
            await client.aclose()


async def _finish(closer: _Closer) -> None:
    await closer.aclose()


_API_FIELDS = ["exposed", "max", "c:internal", "c:external", "rate_limits"]


def _api(name: str, row: list[Any]) -> Api | None:
    exposed, limit, internal, external, rate_limits = row
    if exposed is None:
        return None
    return Api(
        name=name,
        exposed=exposed in _TRUE,
        max_keys_per_kind=int(limit),
        internal_keys=int(internal or 0),
        external_keys=int(external or 0),
        # An API written before rate limits existed has none.
        rate_limits=load_rate_limits(None if rate_limits is None else _text(rate_limits)) or (),
    )


# A key record ``k:<client_id>`` is the JSON array
#   [seq, kind, name, casefolded name, created_at,                 <- the first layout
#    enabled, expires_at, meta, last_used_at, rate_limits]         <- appended (issue 14)
# with times in whole µs since the epoch (or null), meta as dump_meta's text and
# rate_limits as dump_rate_limits' text (null: the API's).  A record of the first layout
# has only the first five: the rest read as their defaults, so old records need no
# rewrite.  The secret hash is ``s:<client_id>``; the previous secret of a roll is
# ``p:<client_id>``, the JSON array [valid until in µs, hash], written by the roll script.
# ``u:<client_id>`` is the key's last use in µs, raised by the usage writes (a field of
# its own, so a flush never rewrites records); last_used_at is the later of it and the
# record's own.
_RECORD_LENGTH = 10
_AUDIT_ID_LENGTH = 26
_APPENDED_DEFAULTS: tuple[Any, ...] = (True, None, None, None, None)


def _key_fields(client_id: str) -> list[str]:
    """The hash fields of one key: its record, its secret hash, its previous secret, and
    its last use as the usage writes keep it."""
    return [f"k:{client_id}", f"s:{client_id}", f"p:{client_id}", f"u:{client_id}"]


def _body(record: KeyRecord, folded: str) -> list[Any]:
    """The record's array without its seq."""
    return [
        record.kind.value,
        record.name,
        folded,
        _micros(record.created_at),
        record.enabled,
        _optional_micros(record.expires_at),
        dump_meta(record.meta),
        _optional_micros(record.last_used_at),
        dump_rate_limits(record.rate_limits),
    ]


def _dump_previous(record: KeyRecord) -> str:
    """The ``p:`` field of ``record`` ('' when it has no previous secret)."""
    if record.previous_secret_hash is None and record.previous_secret_expires_at is None:
        return ""
    return _dumps(
        [_optional_micros(record.previous_secret_expires_at), record.previous_secret_hash]
    )


def _record(
    api: str,
    client_id: str,
    raw: bytes | str,
    secret_hash: bytes | str | None,
    previous: bytes | str | None = None,
    used: bytes | str | None = None,
) -> KeyRecord:
    return _decoded(api, client_id, json.loads(raw), secret_hash, previous, used)


def _decoded(
    api: str,
    client_id: str,
    stored: list[Any],
    secret_hash: bytes | str | None,
    previous: bytes | str | None,
    used: bytes | str | None,
) -> KeyRecord:
    """The key from its decoded record array and its ``s:``, ``p:`` and ``u:`` fields."""
    _seq, kind, name, _folded, created = stored[:5]
    appended = stored[5:_RECORD_LENGTH]
    enabled, expires, meta, last_used, limits = (
        *appended,
        *_APPENDED_DEFAULTS[len(appended) :],
    )
    previous_until, previous_hash = (None, None) if previous is None else json.loads(previous)
    return KeyRecord(
        api=api,
        client_id=client_id,
        name=name,
        kind=KeyKind(kind),
        secret_hash=None if secret_hash is None else _text(secret_hash),
        created_at=_EPOCH + created * _MICROSECOND,
        enabled=bool(enabled),
        expires_at=_from_micros(expires),
        meta=load_meta(meta),
        previous_secret_hash=previous_hash,
        previous_secret_expires_at=_from_micros(previous_until),
        # The record's own (as written at creation) or the usage writes', the later.
        last_used_at=_from_micros(last_used if used is None else max(int(used), last_used or 0)),
        rate_limits=load_rate_limits(limits),
    )


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _notice(api: str, client_id: str) -> str:
    """The change-feed message for one key of ``api``."""
    return f"{api}\n{client_id}"


def _micros(moment: datetime) -> int:
    """``moment`` as whole microseconds since the epoch (naive means UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - _EPOCH) // _MICROSECOND


def _optional_micros(moment: datetime | None) -> int | None:
    return None if moment is None else _micros(moment)


def _from_micros(micros: int | None) -> datetime | None:
    return None if micros is None else _EPOCH + micros * _MICROSECOND


def _text(value: bytes | str) -> str:
    """A reply as text, whether or not the client decodes responses itself."""
    return value.decode() if isinstance(value, bytes) else value


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _check_timeout(timeout: object) -> None:
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ConfigurationError(f"timeout must be a positive number of seconds, got {timeout!r}")


def _location(client: Redis) -> str:
    """Where ``client`` connects, as a URL without credentials (for repr and errors)."""
    pool = getattr(client, "connection_pool", None)
    if pool is None:  # not a plain client (a cluster client, say): say no more than that
        return type(client).__name__
    kwargs: Mapping[str, Any] = pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    scheme = "rediss" if issubclass(pool.connection_class, SSLConnection) else "redis"
    host = kwargs.get("host", "localhost")
    return f"{scheme}://{host}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
