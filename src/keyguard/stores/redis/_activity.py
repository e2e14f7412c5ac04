"""The Redis stores' audit events and usage counts: listing events, the hourly usage
hashes (recorded, read; they expire by themselves), and what every write script is given
to write its change's event.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar, cast

from keyguard.audit import AuditEvent, cutoff_id
from keyguard.errors import ConfigurationError
from keyguard.usage import RETENTION, UsageCount, UsageNotWritten, hour_start

try:
    from redis.asyncio import Redis
except ImportError as exc:  # pragma: no cover - exercised by a test that hides redis
    raise ConfigurationError("redis:// needs: pip install 'keyguard[redis]'") from exc

from keyguard.stores.redis._base import _RedisBase
from keyguard.stores.redis._common import (
    _AUDIT_ID_LENGTH,
    _FAILURES,
    ClientT,
    _micros,
    _text,
)


class _Activity(_RedisBase[ClientT]):
    """Audit events (listed; written by each change's script) and usage counts."""

    #: Whether usage is written by one call per API (a cluster) rather than one pipeline.
    _usage_per_api: ClassVar[bool] = False

    # -- audit events ---------------------------------------------------------------------

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

    # -- usage ----------------------------------------------------------------------------

    async def record_usage(self, counts: Sequence[UsageCount]) -> None:
        """One script per API, all in one pipeline (one round trip; on a cluster, the scripts
        run concurrently, one per API, each within the timeout): each hour's counts go
        to the hash ``<prefix>{<api>}:usage:<hour>`` (``HINCRBY`` of ``r:``/``l:<client_id>``),
        which expires 35 days after its hour; each key's ``u:<client_id>`` rises to its
        latest use. The ``{<api>}`` hash tag keeps an API's usage in its Cluster slot.

        Each API's script is atomic, not the whole write: when some APIs' scripts ran and
        others failed, ``UsageNotWritten`` names the others (writing all again would add
        the first ones twice)."""
        by_api: dict[str, list[UsageCount]] = {}
        for count in counts:
            by_api.setdefault(count.api, []).append(count)
        if not by_api:
            return
        calls: list[tuple[str, list[str], list[Any]]] = []
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
            calls.append((api, keys, args))

        outcomes: list[BaseException | None]
        if self._usage_per_api:
            # A cluster: one call per API, all at once (each API's keys are in its own
            # slot, perhaps on another node, which may be down while the others answer).
            async def one(keys: list[str], args: list[Any]) -> None:
                async def write(redis: ClientT) -> None:
                    await self._record_usage(keys=keys, args=args, client=redis)

                await self._call(write)

            gathered = await asyncio.gather(
                *(one(keys, args) for _, keys, args in calls), return_exceptions=True
            )
            outcomes = [r if isinstance(r, BaseException) else None for r in gathered]
        else:

            async def pipelined(redis: ClientT) -> list[Any]:
                assert isinstance(redis, Redis)  # one server's client (not _usage_per_api)
                async with redis.pipeline(transaction=False) as pipe:
                    for _, keys, args in calls:
                        await self._record_usage(keys=keys, args=args, client=pipe)
                    replies: list[Any] = await pipe.execute(raise_on_error=False)
                    return replies

            replies = await self._call(pipelined)
            outcomes = [r if isinstance(r, Exception) else None for r in replies]
        failed = [
            (api, exc) for (api, _, _), exc in zip(calls, outcomes, strict=True) if exc is not None
        ]
        if not failed:
            return
        for _, exc in failed:
            if not isinstance(exc, Exception):
                raise exc  # cancelled
        first = failed[0][1]
        if len(failed) == len(calls):
            if isinstance(first, _FAILURES):  # a script's error in the pipeline, say
                raise self._unavailable(first) from first
            raise first
        raise UsageNotWritten(
            f"usage of {len(failed)} of {len(calls)} APIs not written ({first})",
            frozenset(api for api, _ in failed),
        ) from first

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

    def _usage_key(self, api: str, hour: datetime) -> str:
        """The hash of ``api``'s usage in the hour starting at ``hour`` (Unix seconds)."""
        return f"{self.prefix}{{{api}}}:usage:{int(hour.timestamp())}"
