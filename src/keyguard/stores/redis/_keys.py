"""The Redis stores' APIs and keys: the ``KeyStore`` reads (the request path's ``lookup``
and ``snapshot`` among them, one round trip each) and the writes, each one Lua script on
the API's hash that checks the rules, writes its audit event and publishes the change.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, cast

from keyguard.audit import AuditEvent
from keyguard.errors import ApiHasKeys, DuplicateName
from keyguard.models import (
    Api,
    KeyChanges,
    KeyRecord,
    RateLimit,
    dump_rate_limits,
    name_key,
)
from keyguard.stores._paging import (
    DEFAULT_PAGE_SIZE,
    KeyPage,
    check_page,
    decode_cursor,
    name_filter,
)
from keyguard.stores.redis._activity import _Activity
from keyguard.stores.redis._common import (
    _API_FIELDS,
    _RECORD_LENGTH,
    _TRUE,
    ClientT,
    _api,
    _body,
    _decoded,
    _dump_previous,
    _dumps,
    _key_fields,
    _micros,
    _notice,
    _record,
    _records_of,
    _stored_keys,
    _text,
)
from keyguard.stores.redis._lua import _RULE_ERRORS
from keyguard.stores.redis._pages import (
    REBUILD_STEP,
    REBUILDING,
    SCAN_BUDGET,
    lower_bound,
    next_cursor,
)


class _Keys(_Activity[ClientT]):
    """The ``KeyStore`` calls on APIs and keys. A write script also writes the change's
    audit event (``_Activity._audit_args``) and publishes it on the change feed."""

    #: The most members of an API's listing order one filtered page call looks at.
    scan_budget: int = SCAN_BUDGET
    #: The most entries of an API's hash one script looks at while rebuilding its order.
    rebuild_step: int = REBUILD_STEP

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
        ``scan_budget`` members looked at per call. An order to rebuild first (data of
        older code) takes more calls, each at most ``rebuild_step`` hash entries."""
        check_page(limit)
        start = None if after is None else decode_cursor(after)
        needle = name_filter(name)
        keys = [self._api_key(api), self._order_key(api)]
        args: list[str | int] = [
            lower_bound(start),
            limit,
            needle or "",
            self.scan_budget,
            self.rebuild_step,
        ]

        async def read(redis: ClientT) -> Any:
            while True:  # each call a bounded step of a rebuild of the order, if one is due
                answer = await self._page_keys(keys=keys, args=args, client=redis)
                if _text(answer[1]) != REBUILDING:
                    return answer

        rows, position = await self._call(read)
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
            raise ApiHasKeys.holding(api, -outcome)
        return bool(outcome)
