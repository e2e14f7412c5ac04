"""The SQL store's audit events and usage counts: events listed and pruned (after a
change, at most once an hour), and the hourly usage buckets recorded, read and pruned.

:class:`_Activity` holds the calls; ``_write_audit`` inserts a change's event inside the
change's own transaction (the writes of ``_keys.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import bindparam, delete, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from keyguard.audit import AuditEvent, cutoff_id
from keyguard.errors import StoreUnavailable
from keyguard.stores.sql._core import T, _SQLCore
from keyguard.stores.sql._schema import _NAME_LENGTH, _event, _fits, _Schema, _UTCDateTime
from keyguard.usage import UsageCount

logger = logging.getLogger("keyguard")


_PRUNE_EVERY = 3600.0  # seconds between two prunings of old audit events by one store
_DEADLOCK_ATTEMPTS = 4  # tries of a usage write the database chose as a deadlock's victim


class _Activity(_SQLCore):
    """Audit events (listed, pruned) and usage counts (recorded, read, pruned)."""

    # -- audit events ---------------------------------------------------------------------

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

    # -- usage ----------------------------------------------------------------------------

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
            if not (_fits(c.api, _NAME_LENGTH) and _fits(c.client_id, _NAME_LENGTH)):
                continue  # no key has it; PostgreSQL would refuse the whole write (NUL)
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
