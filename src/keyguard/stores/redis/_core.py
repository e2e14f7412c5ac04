"""The Redis stores' shared core: data model, scripts, change feed, loop binding."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar, Generic, cast

import anyio

from keyguard.audit import (
    DEFAULT_AUDIT_RETENTION,
    AuditEvent,
    check_retention,
    cutoff_id,
)
from keyguard.errors import (
    ApiHasKeys,
    ConfigurationError,
    DuplicateName,
    StoreUnavailable,
)
from keyguard.models import (
    Api,
    KeyChanges,
    KeyRecord,
    RateLimit,
    dump_rate_limits,
    name_key,
)
from keyguard.stores._idtag import new_tag_key_text, parse_tag_key
from keyguard.stores._paging import (
    DEFAULT_PAGE_SIZE,
    KeyPage,
    check_page,
    decode_cursor,
    name_filter,
)
from keyguard.usage import RETENTION, UsageCount, hour_start

try:
    from redis.asyncio import Redis, RedisCluster
    from redis.asyncio.client import PubSub
    from redis.commands.core import AsyncScript
except ImportError as exc:  # pragma: no cover - exercised by a test that hides redis
    raise ConfigurationError("redis:// needs: pip install 'keyguard[redis]'") from exc

from keyguard.stores.redis._common import (
    _API_FIELDS,
    _AUDIT_ID_LENGTH,
    _FAILURES,
    _RECORD_LENGTH,
    _TRUE,
    ClientT,
    T,
    _api,
    _body,
    _check_timeout,
    _decoded,
    _dump_previous,
    _dumps,
    _key_fields,
    _micros,
    _notice,
    _record,
    _records_of,
    _running_loop,
    _stored_keys,
    _text,
)
from keyguard.stores.redis._lua import (
    _AUDIT_LUA,
    _DELETE_API_LUA,
    _DELETE_KEY_LUA,
    _INSERT_KEY_LUA,
    _RECORD_USAGE_LUA,
    _RULE_ERRORS,
    _SET_HASH_LUA,
    _SNAPSHOT_LUA,
    _UPDATE_KEY_LUA,
    _UPSERT_API_LUA,
    _Closer,
)
from keyguard.stores.redis._pages import PAGE_LUA, SCAN_BUDGET, lower_bound, next_cursor


class RedisCore(Generic[ClientT]):
    """What every Redis store shares, whatever client it runs on: the data model, the
    scripts, the record encoding, the change feed and the event-loop binding.

    :class:`RedisStore` runs it on a standalone ``redis.asyncio.Redis``,
    :class:`~keyguard.stores.redis_cluster.RedisClusterStore` on a
    ``redis.asyncio.RedisCluster``: every Redis key of one API (its hash, its listing
    order, its audit sets, its usage) carries the API's hash tag, so every script
    touches one slot and works alike on both. Not to be used directly.
    """

    #: What the store is on, for log lines and errors ("Redis at …").
    _server: ClassVar[str] = "Redis"
    #: The most members of an API's listing order one filtered page call looks at.
    scan_budget: int = SCAN_BUDGET

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
        self._page_keys = AsyncScript(client, PAGE_LUA)
        self._snapshot = AsyncScript(client, _SNAPSHOT_LUA)

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

    async def snapshot(
        self, api: str, *, max_keys: int
    ) -> tuple[Api | None, list[KeyRecord] | None]:
        """The API and, if it holds at most ``max_keys`` keys, all of them: one script
        (``HMGET`` of its fields, then ``HGETALL`` of its hash only if it is that small)."""
        key = self._api_key(api)

        async def read(redis: ClientT) -> Any:
            return await self._snapshot(keys=[key], args=[int(max_keys)], client=redis)

        answer = await self._call(read)
        found = _api(api, answer[0])
        if found is None or len(answer) < 2:
            return found, None
        flat = answer[1]
        fields = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
        return found, _records_of(api, fields)

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
            f"{_micros(record.created_at):016d}",
            *self._audit_args(audit),
        ]
        keys = [
            self._api_key(record.api),
            self._order_key(record.api),
            *self._audit_keys(record.api, record.client_id),
        ]

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
        found = sorted(_stored_keys(api, fields), key=lambda entry: (entry[0][4], entry[0][0]))
        return [record for _, record in found]

    async def page_keys(
        self,
        api: str,
        *,
        limit: int = DEFAULT_PAGE_SIZE,
        after: str | None = None,
        name: str | None = None,
    ) -> KeyPage:
        """One script on the API's hash and its listing order (see ``_pages.py``): the
        members after the cursor's position, and their keys; with ``name``, at most
        ``scan_budget`` members looked at per call."""
        check_page(limit)
        start = None if after is None else decode_cursor(after)
        needle = name_filter(name)
        keys = [self._api_key(api), self._order_key(api)]
        args: list[str | int] = [lower_bound(start), limit, needle or "", self.scan_budget]
        rows, position = await self._call(
            lambda redis: self._page_keys(keys=keys, args=args, client=redis)
        )
        found = [_record(api, _text(row[0]), *row[1:]) for row in rows]
        return KeyPage(found, next_cursor(position))

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
        """Remove the key, its secret hash, its name entry, its place in the listing order
        and its count in one script."""
        keys = [self._api_key(api), self._order_key(api), *self._audit_keys(api, client_id)]
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
        keys = [key, self._order_key(api), *self._audit_keys(api, None)]
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

    def _order_key(self, api: str) -> str:
        """The API's listing order, a sorted set in its slot (see ``_pages.py``)."""
        return f"{self.prefix}{{{api}}}:order"

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
