"""The SQL store's APIs and keys: the ``KeyStore`` reads (the request path's ``lookup``
and ``snapshot`` among them) and the writes, each one transaction that also writes its
audit event and, on PostgreSQL, announces the change.

How the rules hold across processes is in the package's docstring.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Column, bindparam, case, delete, insert, or_, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from keyguard.audit import AuditEvent
from keyguard.errors import (
    ApiHasKeys,
    ApiNotExposed,
    DuplicateName,
    KeyGuardError,
    KeyLimitReached,
)
from keyguard.models import (
    Api,
    KeyChanges,
    KeyKind,
    KeyRecord,
    RateLimit,
    dump_meta,
    dump_rate_limits,
    load_rate_limits,
    name_key,
)
from keyguard.stores._paging import (
    DEFAULT_PAGE_SIZE,
    SCAN_BUDGET,
    KeyPage,
    check_page,
    decode_cursor,
    encode_cursor,
    from_micros,
    name_filter,
    to_micros,
)
from keyguard.stores.sql._activity import _Activity, _write_audit
from keyguard.stores.sql._schema import (
    _NAME_KEY_LENGTH,
    _NAME_LENGTH,
    _api,
    _fits,
    _record,
    _Schema,
    _stored_key,
    _UTCDateTime,
)


class _Keys(_Activity):
    """The ``KeyStore`` calls on APIs and keys. A change writes its audit event in its
    transaction and prunes old events after it (``_Activity._changed``)."""

    #: The most rows of an API one filtered page call looks at.
    scan_budget: int = SCAN_BUDGET

    async def lookup(self, api: str, client_id: str | None) -> tuple[bool, KeyRecord | None]:
        """Whether ``api`` exists and is exposed, and its key ``client_id``: one query."""
        if not _fits(api, _NAME_LENGTH):
            return False, None
        if client_id is None or not _fits(client_id, _NAME_LENGTH):
            rows = await self._hot_rows("lookup_api", {"api": api})
            return bool(rows and rows[0].exposed), None
        rows = await self._hot_rows("lookup_key", {"api": api, "client_id": client_id})
        if not rows:
            return False, None
        row = rows[0]
        return bool(row.exposed), None if row.client_id is None else _record(row)

    async def get_api(self, api: str) -> Api | None:
        """The API with its key counts, or ``None`` if it was never created."""
        if not _fits(api, _NAME_LENGTH):
            return None

        async def work(conn: AsyncConnection, schema: _Schema) -> Api | None:
            stmt = select(*schema.api_columns).where(schema.apis.c.name == api)
            row = (await conn.execute(stmt)).first()
            return None if row is None else _api(row)

        return await self._run(work, write=False)

    async def snapshot(
        self, api: str, *, max_keys: int
    ) -> tuple[Api | None, list[KeyRecord] | None]:
        """The API and, if it holds at most ``max_keys`` keys, all of them: one statement
        (the API's row left-joined with its keys, joined only when it holds that few)."""
        if not _fits(api, _NAME_LENGTH):
            return None, None

        rows = await self._hot_rows("snapshot", {"api": api, "max_keys": int(max_keys)})
        if not rows:
            return None, None
        first = rows[0]
        found = Api(
            name=first.api_name,
            exposed=bool(first.api_exposed),
            max_keys_per_kind=first.api_max,
            internal_keys=first.api_internal,
            external_keys=first.api_external,
            rate_limits=load_rate_limits(first.api_rate_limits) or (),
        )
        if found.internal_keys + found.external_keys > max_keys:
            return found, None
        return found, [_record(row) for row in rows if row.client_id is not None]

    async def list_apis(self) -> list[Api]:
        """Every API, ordered by name (by code point, as Python sorts), with key counts."""

        async def work(conn: AsyncConnection, schema: _Schema) -> list[Api]:
            rows = (await conn.execute(select(*schema.api_columns))).all()
            return sorted((_api(row) for row in rows), key=lambda found: found.name)

        return await self._run(work, write=False)

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
        """Create ``api`` if missing, then set the fields given; keys are never touched."""

        async def work(conn: AsyncConnection, schema: _Schema) -> Api:
            apis = schema.apis
            await conn.execute(
                schema.insert_ignore(
                    apis,
                    {
                        "name": api,
                        "exposed": False,
                        "max_keys_per_kind": default_max_keys_per_kind,
                        "internal_count": 0,
                        "external_count": 0,
                        "rate_limits": dump_rate_limits(()),
                    },
                )
            )
            changes: dict[str, Any] = {}
            if exposed is not None:
                changes["exposed"] = exposed
            if max_keys_per_kind is not None:
                changes["max_keys_per_kind"] = max_keys_per_kind
            if rate_limits is not None:
                changes["rate_limits"] = dump_rate_limits(rate_limits)
            if changes:
                await conn.execute(update(apis).where(apis.c.name == api).values(changes))
            row = (await conn.execute(select(*schema.api_columns).where(apis.c.name == api))).one()
            await _write_audit(conn, schema, audit)
            await self._announce(conn, api, None)
            return _api(row)

        return await self._changed(await self._run(work, write=True), audit)

    async def insert_key(self, record: KeyRecord, *, audit: AuditEvent | None = None) -> None:
        """Add ``record`` atomically (R1, R2, R3 checked by the database), or raise."""

        async def work(conn: AsyncConnection, schema: _Schema) -> None:
            apis = schema.apis
            count = schema.count_column(record.kind)
            # Take a place first: the row lock makes check-and-increment atomic (R2).
            taken = await conn.execute(
                update(apis)
                .where(
                    apis.c.name == record.api,
                    apis.c.exposed.is_(True),
                    count < apis.c.max_keys_per_kind,
                )
                .values({count: count + 1})
            )
            if taken.rowcount != 1:
                why = select(apis.c.exposed, apis.c.max_keys_per_kind).where(
                    apis.c.name == record.api
                )
                row = (await conn.execute(why)).first()
                if row is None or not row.exposed:
                    raise ApiNotExposed(f"API {record.api!r} is not exposed")
                raise KeyLimitReached(
                    f"API {record.api!r} has no room for another {record.kind.value} key "
                    f"(at most {row.max_keys_per_kind} per kind)"
                )
            # Before the insert, so the event (and the notice) is rolled back with a
            # refused one.
            await _write_audit(conn, schema, audit)
            await self._announce(conn, record.api, record.client_id)
            try:
                await conn.execute(
                    insert(schema.keys).values(
                        client_id=record.client_id,
                        api=record.api,
                        name=record.name,
                        name_key=name_key(record.name),
                        kind=record.kind.value,
                        secret_hash=record.secret_hash,
                        created_at=record.created_at,
                        enabled=record.enabled,
                        expires_at=record.expires_at,
                        meta=dump_meta(record.meta),
                        previous_secret_hash=record.previous_secret_hash,
                        previous_secret_expires_at=record.previous_secret_expires_at,
                        last_used_at=record.last_used_at,
                        rate_limits=dump_rate_limits(record.rate_limits),
                    )
                )
            except sa_exc.IntegrityError:
                # UNIQUE (api, name_key): leaving the block rolls the counter back too.
                # Not chained: the driver's error quotes the row, secret hash included,
                # whenever the engine does not hide parameters (an app's own engine).
                raise DuplicateName(
                    f"API {record.api!r} already has a key named {record.name!r}"
                ) from None

        await self._run(work, write=True)
        await self._changed(None, audit)

    async def get_key(self, api: str, client_id: str) -> KeyRecord | None:
        """The key ``client_id`` of ``api``, or ``None``; client ids compare exactly."""
        if not (_fits(api, _NAME_LENGTH) and _fits(client_id, _NAME_LENGTH)):
            return None

        async def work(conn: AsyncConnection, schema: _Schema) -> KeyRecord | None:
            return await _stored_key(conn, schema, api, client_id)

        return await self._run(work, write=False)

    async def list_keys(self, api: str) -> list[KeyRecord]:
        """The keys of ``api``, oldest first (insertion order within one microsecond)."""
        if not _fits(api, _NAME_LENGTH):
            return []

        async def work(conn: AsyncConnection, schema: _Schema) -> list[KeyRecord]:
            keys = schema.keys
            stmt = (
                select(*schema.key_columns)
                .where(keys.c.api == api)
                .order_by(keys.c.created_at, keys.c.id)
            )
            return [_record(row) for row in (await conn.execute(stmt)).all()]

        return await self._run(work, write=False)

    async def page_keys(
        self,
        api: str,
        *,
        limit: int = DEFAULT_PAGE_SIZE,
        after: str | None = None,
        name: str | None = None,
    ) -> KeyPage:
        """One keyset query on the index ``(api, created_at, id)``: the rows after the
        cursor's ``(created_at, id)``, ``limit + 1`` of them (the extra one says whether a
        next page exists).

        With ``name``, one call looks at most at ``scan_budget`` rows, as on Redis: a first
        query finds the ``scan_budget``-th row after the cursor (one index walk), a second
        the rows up to it whose ``name_key`` contains the filter (``LIKE '%…%'``, wildcards
        escaped). When those are fewer than ``limit`` the page is short and its cursor is
        that row, so a filter matching few keys of a huge API costs many short calls,
        never one that walks every row. (The range is fixed by a position, not a count,
        so a row deleted or added between the two queries moves nothing.)
        """
        check_page(limit)
        start = None if after is None else decode_cursor(after)
        needle = name_filter(name)
        if not _fits(api, _NAME_LENGTH) or (needle is not None and len(needle) > _NAME_KEY_LENGTH):
            return KeyPage([], None)
        budget = self.scan_budget

        async def work(conn: AsyncConnection, schema: _Schema) -> KeyPage:
            keys = schema.keys
            where: list[Any] = [keys.c.api == api]
            if start is not None:
                moment, number = from_micros(start[0]), start[1]
                # A range on the index's second column, then the tie-break: every database
                # turns this into one index range scan (row values are not everywhere).
                where += [
                    keys.c.created_at >= moment,
                    or_(keys.c.created_at > moment, keys.c.id > number),
                ]
            order = (keys.c.created_at, keys.c.id)
            edge = None
            if needle is not None:
                last_looked_at = (
                    select(keys.c.created_at, keys.c.id)
                    .where(*where)
                    .order_by(*order)
                    .offset(budget - 1)
                    .limit(1)
                )
                edge = (await conn.execute(last_looked_at)).first()
                if edge is not None:
                    where += [
                        keys.c.created_at <= edge.created_at,
                        or_(keys.c.created_at < edge.created_at, keys.c.id <= edge.id),
                    ]
                where.append(keys.c.name_key.contains(needle, autoescape=True))
            stmt = (
                select(keys.c.id, *schema.key_columns)
                .where(*where)
                .order_by(*order)
                .limit(limit + 1)
            )
            rows = (await conn.execute(stmt)).all()
            found = [_record(row) for row in rows[:limit]]
            if len(rows) > limit:
                last = rows[limit - 1]
                return KeyPage(found, encode_cursor(to_micros(last.created_at), last.id))
            if edge is None:
                return KeyPage(found, None)
            return KeyPage(found, encode_cursor(to_micros(edge.created_at), edge.id))

        return await self._run(work, write=False)

    async def update_key(
        self,
        api: str,
        client_id: str,
        changes: KeyChanges,
        *,
        audit: AuditEvent | None = None,
    ) -> KeyRecord | None:
        """Change the given fields in one ``UPDATE`` and return the key as stored afterwards;
        ``None`` if there is no such key. A rename clashing (casefolded) with another key of
        the API is refused by ``UNIQUE (api, name_key)``: ``DuplicateName``, nothing changed.
        """
        if not (_fits(api, _NAME_LENGTH) and _fits(client_id, _NAME_LENGTH)):
            return None
        given = changes.given()
        values: dict[str, Any] = {}
        if "name" in given:
            values["name"] = given["name"]
            values["name_key"] = name_key(given["name"])
        if "enabled" in given:
            values["enabled"] = given["enabled"]
        if "expires_at" in given:
            values["expires_at"] = given["expires_at"]
        if "meta" in given:
            values["meta"] = dump_meta(given["meta"])
        if "rate_limits" in given:
            values["rate_limits"] = dump_rate_limits(given["rate_limits"])

        async def work(conn: AsyncConnection, schema: _Schema) -> KeyRecord | None:
            keys = schema.keys
            if values:
                which = (keys.c.api == api) & (keys.c.client_id == client_id)
                if audit is not None:
                    # Before the change, so a refused rename rolls the event back with it;
                    # only for a key that exists (the UPDATE below would find none).
                    exists = await conn.execute(select(keys.c.id).where(which))
                    if exists.first() is None:
                        return None
                    await _write_audit(conn, schema, audit)
                try:
                    changed = await conn.execute(update(keys).where(which).values(values))
                except sa_exc.IntegrityError:
                    if "name" not in values:
                        raise
                    # UNIQUE (api, name_key); not chained, as in insert_key.
                    raise DuplicateName(
                        f"API {api!r} already has a key named {values['name']!r}"
                    ) from None
                if changed.rowcount != 1:
                    # Deleted since it was seen: leaving by an error rolls the event back.
                    raise _Vanished()
                await self._announce(conn, api, client_id)
            # The same transaction: the row lock taken by the UPDATE is still held.
            return await _stored_key(conn, schema, api, client_id)

        try:
            updated = await self._run(work, write=bool(values))
        except _Vanished:
            return None
        return await self._changed(updated, audit if updated is not None else None)

    async def set_secret_hash(
        self,
        api: str,
        client_id: str,
        secret_hash: str,
        *,
        previous_until: datetime | None = None,
        audit: AuditEvent | None = None,
    ) -> KeyRecord | None:
        """Replace the hash of the *external* key ``client_id`` in one ``UPDATE`` (keeping the
        old hash as the previous one until ``previous_until``, if given and there was one)
        and return the key afterwards; ``None`` if there is no such external key.
        """
        if not (_fits(api, _NAME_LENGTH) and _fits(client_id, _NAME_LENGTH)):
            return None

        async def work(conn: AsyncConnection, schema: _Schema) -> KeyRecord | None:
            keys = schema.keys
            previous: list[tuple[Column[Any], Any]]
            if previous_until is None:
                previous = [(keys.c.previous_secret_expires_at, None)]
                previous.append((keys.c.previous_secret_hash, None))
            else:
                # The old hash and the roll's end come from the row as this statement finds
                # it, so a roll racing another keeps one whole pair. MariaDB/MySQL assign
                # left to right, each later expression seeing the earlier ones' new values:
                # every expression reading secret_hash comes before it is set.
                previous = [
                    (
                        keys.c.previous_secret_expires_at,
                        case(
                            (keys.c.secret_hash.is_(None), None),
                            else_=bindparam("previous_until", previous_until, _UTCDateTime()),
                        ),
                    ),
                    (keys.c.previous_secret_hash, keys.c.secret_hash),
                ]
            result = await conn.execute(
                update(keys)
                .where(
                    keys.c.api == api,
                    keys.c.client_id == client_id,
                    keys.c.kind == KeyKind.EXTERNAL.value,
                )
                .ordered_values(*previous, (keys.c.secret_hash, secret_hash))
            )
            if result.rowcount != 1:
                return None
            await _write_audit(conn, schema, audit)
            await self._announce(conn, api, client_id)
            return await _stored_key(conn, schema, api, client_id)

        updated = await self._run(work, write=True)
        return await self._changed(updated, audit if updated is not None else None)

    async def delete_key(
        self, api: str, client_id: str, *, audit: AuditEvent | None = None
    ) -> bool:
        """Delete the key and give its place back, in one transaction; ``False`` if none."""
        if not (_fits(api, _NAME_LENGTH) and _fits(client_id, _NAME_LENGTH)):
            return False

        async def work(conn: AsyncConnection, schema: _Schema) -> bool:
            apis, keys = schema.apis, schema.keys
            which = (keys.c.api == api) & (keys.c.client_id == client_id)
            kind = (await conn.execute(select(keys.c.kind).where(which))).scalar()
            if kind is None:
                return False
            # The API row first, as insert_key does: one lock order, no deadlock.
            count = schema.count_column(KeyKind(kind))
            await conn.execute(update(apis).where(apis.c.name == api).values({count: count - 1}))
            if (await conn.execute(delete(keys).where(which))).rowcount == 1:
                await _write_audit(conn, schema, audit)
                await self._announce(conn, api, client_id)
                return True
            # Another call deleted it since we read its kind: give the place back.
            await conn.execute(update(apis).where(apis.c.name == api).values({count: count + 1}))
            return False

        deleted = await self._run(work, write=True)
        return await self._changed(deleted, audit if deleted else None)

    async def delete_api(self, api: str, *, force: bool, audit: AuditEvent | None = None) -> bool:
        """Delete the API (and, with ``force``, its keys) in one transaction; ``False`` if none."""
        if not _fits(api, _NAME_LENGTH):
            return False

        async def work(conn: AsyncConnection, schema: _Schema) -> bool:
            apis, keys = schema.apis, schema.keys
            # Lock the API row first, as insert_key does: its counters cannot change
            # until this transaction ends, so the check below and the delete are one step.
            locked = await conn.execute(
                update(apis).where(apis.c.name == api).values(name=apis.c.name)
            )
            if locked.rowcount != 1:
                return False
            counts = (
                await conn.execute(
                    select(apis.c.internal_count, apis.c.external_count).where(apis.c.name == api)
                )
            ).one()
            held = counts.internal_count + counts.external_count
            if held and not force:
                raise ApiHasKeys.holding(api, held)
            await conn.execute(delete(keys).where(keys.c.api == api))
            await conn.execute(delete(apis).where(apis.c.name == api))
            await _write_audit(conn, schema, audit)
            await self._announce(conn, api, None)
            return True

        deleted = await self._run(work, write=True)
        return await self._changed(deleted, audit if deleted else None)


class _Vanished(KeyGuardError):
    """Leaves a transaction (rolling it back) when the key to change has gone meanwhile.
    A ``KeyGuardError``, so the connection is rolled back and kept, not cut."""

    def __init__(self) -> None:
        super().__init__("the key is gone")
