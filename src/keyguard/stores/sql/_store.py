"""The SQL store's operations: the ``KeyStore`` contract on SQLAlchemy Core.

How the rules hold across processes is in the package's docstring.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Column,
    bindparam,
    case,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from keyguard.audit import (
    DEFAULT_AUDIT_RETENTION,
    AuditEvent,
    check_retention,
    cutoff_id,
)
from keyguard.errors import (
    ApiHasKeys,
    ApiNotExposed,
    DuplicateName,
    KeyGuardError,
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
    load_rate_limits,
    name_key,
)
from keyguard.stores._paging import (
    DEFAULT_PAGE_SIZE,
    KeyPage,
    check_page,
    decode_cursor,
    encode_cursor,
    from_micros,
    name_filter,
    to_micros,
)
from keyguard.usage import UsageCount

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeAlias

    # A result row. Row's type parameters differ between SQLAlchemy 2.0 (a tuple TypeVar)
    # and 2.1 (a TypeVarTuple), and no spelling suits both; its columns are Any either way.
    _Row: TypeAlias = Any

from keyguard.stores._idtag import ID_TAG_ROW, new_tag_key_text, parse_tag_key
from keyguard.stores.sql._core import T, _SQLCore
from keyguard.stores.sql._engine import (
    _create_engine,
    _engine_options,
    _parse_url,
    _validate_prefix,
    _validate_timeout,
)
from keyguard.stores.sql._feed import PgFeed, feed_connector, listens
from keyguard.stores.sql._schema import (
    _NAME_KEY_LENGTH,
    _NAME_LENGTH,
    _api,
    _event,
    _fits,
    _record,
    _Schema,
    _stored_key,
    _UTCDateTime,
)

logger = logging.getLogger("keyguard")


_PRUNE_EVERY = 3600.0  # seconds between two prunings of old audit events by one store
_DEADLOCK_ATTEMPTS = 4  # tries of a usage write the database chose as a deadlock's victim


class SQLStore(_SQLCore):
    """A ``KeyStore`` in a SQL database: SQLite, PostgreSQL or MariaDB/MySQL.

    Usually opened by URL, ``open_store("sqlite:///keys.db")`` (see
    :meth:`from_url`); apps that already have an ``AsyncEngine`` pass it in,
    and then keep ownership of it: ``aclose`` leaves it open.

    ``table_prefix`` names the tables (``keyguard_apis``, ``keyguard_keys``,
    ``keyguard_meta``), so they can live in an app's existing database. They
    are created on first use. ``timeout`` (seconds) bounds how long a call
    can take, as a whole, before it gives up with ``StoreUnavailable``: the
    pool checkout, connecting, the retry and the statements together, on
    any engine.
    """

    def __new__(cls, engine: AsyncEngine, **options: Any) -> SQLStore:
        # On PostgreSQL (asyncpg, psycopg) the store is also a ChangeFeed (LISTEN/NOTIFY), as
        # pathlib.Path() gives a PosixPath: isinstance(store, ChangeFeed) tells a cache so.
        if cls is SQLStore and listens(engine):
            return object.__new__(_PostgreSQLStore)
        return object.__new__(cls)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        table_prefix: str = "keyguard_",
        timeout: float = 3.0,
        audit_retention: timedelta | float = DEFAULT_AUDIT_RETENTION,
        **engine_options: Any,
    ) -> SQLStore:
        """The store for a database URL. Does no I/O; connects on first use.

        ``sqlite:///rel.db`` (relative to the current folder),
        ``sqlite:////abs/path.db``, ``postgresql://`` or ``postgres://``
        (asyncpg), ``mysql://`` or ``mariadb://`` (asyncmy); a URL naming
        its driver (``postgresql+psycopg://``, ``mysql+aiomysql://``) uses
        that driver. ``engine_options`` go to SQLAlchemy's
        ``create_async_engine`` (``pool_size``, ``connect_args``, ``echo``…)
        over this store's defaults. Raises ``ConfigurationError`` for a bad
        URL or option, or a missing driver (naming the extra to install).
        """
        timeout = _validate_timeout(timeout)
        _validate_prefix(table_prefix)
        check_retention(audit_retention)
        parsed = _parse_url(url)
        options = _engine_options(parsed, timeout, engine_options)
        engine = _create_engine(parsed, options)
        store: SQLStore = cls(
            engine, table_prefix=table_prefix, timeout=timeout, audit_retention=audit_retention
        )
        store._factory = lambda: _create_engine(parsed, options)
        store._connect_args = dict(options["connect_args"])
        return store

    # -- KeyStore -------------------------------------------------------------------------

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
                    f"API {record.api!r} already has {row.max_keys_per_kind} "
                    f"{record.kind.value} keys"
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
        next page exists). ``name`` adds ``name_key LIKE '%…%'`` (wildcards escaped) on the
        casefolded names; the database then walks the API's rows in order until the page
        is full, so a filter matching few keys of a huge API reads many rows.
        """
        check_page(limit)
        start = None if after is None else decode_cursor(after)
        needle = name_filter(name)
        if not _fits(api, _NAME_LENGTH) or (needle is not None and len(needle) > _NAME_KEY_LENGTH):
            return KeyPage([], None)

        async def work(conn: AsyncConnection, schema: _Schema) -> KeyPage:
            keys = schema.keys
            stmt = select(keys.c.id, *schema.key_columns).where(keys.c.api == api)
            if start is not None:
                moment, number = from_micros(start[0]), start[1]
                # A range on the index's second column, then the tie-break: every database
                # turns this into one index range scan (row values are not everywhere).
                stmt = stmt.where(
                    keys.c.created_at >= moment,
                    or_(keys.c.created_at > moment, keys.c.id > number),
                )
            if needle is not None:
                stmt = stmt.where(keys.c.name_key.contains(needle, autoescape=True))
            stmt = stmt.order_by(keys.c.created_at, keys.c.id).limit(limit + 1)
            rows = (await conn.execute(stmt)).all()
            found = [_record(row) for row in rows[:limit]]
            if len(rows) <= limit:
                return KeyPage(found, None)
            last = rows[limit - 1]
            return KeyPage(found, encode_cursor(to_micros(last.created_at), last.id))

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
                raise ApiHasKeys(f"API {api!r} has {held} keys")
            await conn.execute(delete(keys).where(keys.c.api == api))
            await conn.execute(delete(apis).where(apis.c.name == api))
            await _write_audit(conn, schema, audit)
            await self._announce(conn, api, None)
            return True

        deleted = await self._run(work, write=True)
        return await self._changed(deleted, audit if deleted else None)

    async def list_audit(
        self,
        *,
        api: str | None = None,
        client_id: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[AuditEvent]:
        """Audit events newest first, by the primary key (ids sort by time); an index on
        ``(api, id)`` and one on ``(client_id, id)`` serve the filtered listings."""
        if (api is not None and not _fits(api, _NAME_LENGTH)) or (
            client_id is not None and not _fits(client_id, _NAME_LENGTH)
        ):
            return []
        cutoff = cutoff_id(self.audit_retention)

        async def work(conn: AsyncConnection, schema: _Schema) -> list[AuditEvent]:
            audit = schema.audit
            stmt = select(audit).where(audit.c.id >= cutoff)
            if api is not None:
                stmt = stmt.where(audit.c.api == api)
            if client_id is not None:
                stmt = stmt.where(audit.c.client_id == client_id)
            if before is not None:
                stmt = stmt.where(audit.c.id < before)
            stmt = stmt.order_by(audit.c.id.desc()).limit(limit)
            return [_event(row) for row in (await conn.execute(stmt)).all()]

        return await self._run(work, write=False)

    async def prune_audit(self) -> int:
        """Delete the audit events older than ``audit_retention``; how many were deleted.
        Run by the store itself after a change, at most once an hour."""
        cutoff = cutoff_id(self.audit_retention)

        async def work(conn: AsyncConnection, schema: _Schema) -> int:
            result = await conn.execute(delete(schema.audit).where(schema.audit.c.id < cutoff))
            return int(result.rowcount or 0)

        return await self._run(work, write=True)

    async def _changed(self, result: T, audit: AuditEvent | None) -> T:
        """``result`` of a change that wrote ``audit``, after pruning old events if due.

        Pruning is a transaction of its own, after the change's: the change is made
        whatever happens to it, so a failure is only logged.
        """
        now = time.monotonic()
        if audit is None or (self._pruned_at is not None and now - self._pruned_at < _PRUNE_EVERY):
            return result
        self._pruned_at = now
        try:
            pruned = await self.prune_audit()
        except StoreUnavailable as exc:
            logger.warning("SQL store %s: old audit events not pruned (%s)", self.url, exc)
        else:
            if pruned:
                logger.info("SQL store %s: %d audit events past retention pruned", self.url, pruned)
        return result

    async def record_usage(self, counts: Sequence[UsageCount]) -> None:
        """Add the counts to their buckets (one upsert per bucket, adding to what it holds)
        and raise the keys' ``last_used_at``, all in one transaction.

        Rows are written in one order (API, client id, hour) by every process, so two
        flushes never wait on each other's rows in a cycle; a deadlock the database
        reports anyway (MariaDB's gap locks) is retried: it rolled everything back.
        """
        buckets = [
            {
                "api": c.api,
                "client_id": c.client_id,
                "hour": c.hour,
                "requests": c.requests,
                "rate_limited": c.rate_limited,
            }
            for c in sorted(counts, key=lambda c: (c.api, c.client_id, c.hour))
            if (c.requests or c.rate_limited)
            and _fits(c.api, _NAME_LENGTH)
            and _fits(c.client_id, _NAME_LENGTH)
        ]
        latest: dict[tuple[str, str], datetime] = {}
        for c in counts:
            key = (c.api, c.client_id)
            if c.last_used_at is not None and (key not in latest or latest[key] < c.last_used_at):
                latest[key] = c.last_used_at
        used = [
            {"b_api": api, "b_client_id": client_id, "b_at": at}
            for (api, client_id), at in sorted(latest.items())
        ]
        if not buckets and not used:
            return

        async def work(conn: AsyncConnection, schema: _Schema) -> None:
            if buckets:
                await conn.execute(schema.add_usage(), buckets)
            if used:
                keys = schema.keys
                at = bindparam("b_at", type_=_UTCDateTime())
                await conn.execute(
                    update(keys)
                    .where(
                        keys.c.api == bindparam("b_api"),
                        keys.c.client_id == bindparam("b_client_id"),
                        or_(keys.c.last_used_at.is_(None), keys.c.last_used_at < at),
                    )
                    .values(last_used_at=at),
                    used,
                )

        for attempt in range(1, _DEADLOCK_ATTEMPTS + 1):
            try:
                await self._run(work, write=True)
                return
            except StoreUnavailable as exc:
                if attempt == _DEADLOCK_ATTEMPTS or "deadlock" not in str(exc).lower():
                    raise
                await asyncio.sleep(0.01 * attempt)

    async def read_usage(
        self, api: str, client_id: str | None, since: datetime
    ) -> list[UsageCount]:
        """The buckets of ``api`` (or of its key ``client_id``) from ``since`` on: one query."""
        if not _fits(api, _NAME_LENGTH) or (
            client_id is not None and not _fits(client_id, _NAME_LENGTH)
        ):
            return []

        async def work(conn: AsyncConnection, schema: _Schema) -> list[UsageCount]:
            usage = schema.usage
            stmt = select(
                usage.c.client_id, usage.c.hour, usage.c.requests, usage.c.rate_limited
            ).where(usage.c.api == api, usage.c.hour >= since)
            if client_id is not None:
                stmt = stmt.where(usage.c.client_id == client_id)
            return [
                UsageCount(api, row.client_id, row.hour, int(row.requests), int(row.rate_limited))
                for row in (await conn.execute(stmt)).all()
            ]

        return await self._run(work, write=False)

    async def prune_usage(self, before: datetime) -> None:
        """Delete the buckets of hours before ``before``."""

        async def work(conn: AsyncConnection, schema: _Schema) -> None:
            await conn.execute(delete(schema.usage).where(schema.usage.c.hour < before))

        await self._run(work, write=True)

    _id_tag_key: bytes | None = None

    async def id_tag_key(self) -> bytes:
        """The client id tag key (``IdTagKeys``): a row of ``<prefix>meta``, inserted by the
        first process that needs it (an insert that does nothing if the row exists), read
        back in a later transaction so racing processes agree, then kept in memory."""
        key = self._id_tag_key
        if key is not None:
            return key

        async def read(conn: AsyncConnection, schema: _Schema) -> str | None:
            stmt = select(schema.meta.c.value).where(schema.meta.c.name == ID_TAG_ROW)
            value: str | None = (await conn.execute(stmt)).scalar_one_or_none()
            return value

        async def create(conn: AsyncConnection, schema: _Schema) -> None:
            await conn.execute(
                schema.insert_ignore(schema.meta, {"name": ID_TAG_ROW, "value": new_tag_key_text()})
            )

        text = await self._run(read, write=False)
        if text is None:
            await self._run(create, write=True)
            text = await self._run(read, write=False)
        key = self._id_tag_key = parse_tag_key(text, f"SQL store {self.url}")
        return key


class _PostgreSQLStore(SQLStore):
    """The SQL store on PostgreSQL: also a ``ChangeFeed`` (LISTEN/NOTIFY).

    ``SQLStore(engine)`` and ``SQLStore.from_url`` give one whenever the engine is
    PostgreSQL's through asyncpg or psycopg; it is a ``SQLStore`` in every other respect.
    """

    _feed: PgFeed | None = None

    async def watch(
        self,
        on_change: Callable[[str, str | None], None],
        *,
        on_ready: Callable[[], None],
    ) -> None:
        """The change feed (:class:`~keyguard.stores.base.ChangeFeed`): every change
        NOTIFYs ``<api>`` or ``<api>\\n<client_id>`` on ``<table prefix>changes``, at its
        commit. One listening connection per event loop, outside the pool, shared by
        every ``watch`` in that loop; ``StoreUnavailable`` when it drops.
        """
        if self._closed:
            raise StoreUnavailable(f"SQL store {self.url} is closed")
        feed = self._feed
        if feed is None:
            assert self._channel is not None
            feed = self._feed = PgFeed(
                channel=self._channel,
                connect=feed_connector(self._engine, self._connect_args),
                timeout=self._timeout,
                unavailable=self._unavailable,
            )
        await feed.watch(on_change, on_ready=on_ready)

    async def aclose(self) -> None:
        """Stop listening (in this loop), then release the connections as ``SQLStore`` does."""
        if self._feed is not None:
            self._feed.aclose()
        await super().aclose()


class _Vanished(KeyGuardError):
    """Leaves a transaction (rolling it back) when the key to change has gone meanwhile.
    A ``KeyGuardError``, so the connection is rolled back and kept, not cut."""

    def __init__(self) -> None:
        super().__init__("the key is gone")


async def _write_audit(conn: AsyncConnection, schema: _Schema, audit: AuditEvent | None) -> None:
    """Insert ``audit`` in the transaction of ``conn`` (nothing if ``None``)."""
    if audit is None:
        return
    await conn.execute(
        insert(schema.audit).values(
            id=audit.id,
            at=audit.at,
            actor=audit.actor,
            action=audit.action,
            api=audit.api,
            client_id=audit.client_id,
            name=audit.name,
            changes=audit.dump_changes(),
        )
    )
