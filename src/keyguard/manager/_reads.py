"""``KeyManager``'s reads: APIs, keys (whole, by page, by name), the audit log and usage
(SPEC §5, §10). Nothing here changes a store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from keyguard.audit import (
    DEFAULT_AUDIT_LIMIT,
    AuditPage,
    check_audit_query,
)
from keyguard.errors import (
    ApiNotFound,
    InvalidRequest,
    KeyNotFound,
)
from keyguard.models import (
    Api,
    KeyInfo,
    KeyRecord,
    normalize_name,
    rfc3339,
    utcnow,
    validate_api_name,
)
from keyguard.stores._paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from keyguard.stores.base import KeyStore
from keyguard.usage import MAX_USAGE_HOURS, hour_start, merge_hours

__all__ = ["KeyInfoPage", "Reads"]


@dataclass(frozen=True)
class KeyInfoPage:
    """A page of an API's keys, oldest first, and the cursor of the next (``None``: no more)."""

    keys: list[KeyInfo]
    next: str | None


class Reads:
    """The reads of ``KeyManager`` (see its docstring)."""

    store: KeyStore

    async def get_api(self, api: str) -> Api:
        """The API with its key counts; ``ApiNotFound`` if it was never created."""
        validate_api_name(api)
        found = await self.store.get_api(api)
        if found is None:
            raise ApiNotFound(f"API {api!r} does not exist")
        return found

    async def list_apis(self) -> list[Api]:
        """Every API, ordered by name."""
        return await self.store.list_apis()

    async def get_key(self, api: str, client_id: str) -> KeyInfo:
        """The key ``client_id`` of ``api``; ``KeyNotFound`` if there is none."""
        return (await self._get_record(api, client_id)).info(utcnow())

    async def list_keys(self, api: str) -> list[KeyInfo]:
        """Every key of ``api``, oldest first, read at once; empty for an API never created
        (R9). For an API of many keys, :meth:`page_keys` and :meth:`iter_keys` read a page
        at a time."""
        validate_api_name(api)
        now = utcnow()
        return [record.info(now) for record in await self.store.list_keys(api)]

    async def page_keys(
        self,
        api: str,
        *,
        limit: int = DEFAULT_PAGE_SIZE,
        after: str | None = None,
        name: str | None = None,
    ) -> KeyInfoPage:
        """A page of the keys of ``api`` (SPEC §5): up to ``limit`` (1 to 1000), oldest first,
        after the cursor ``after`` (a previous page's ``next``), only those whose name
        contains ``name`` case-insensitively if given; ``next`` is ``None`` when no key
        follows. A filtered page may hold fewer keys than ``limit`` while ``next`` is set
        (the store bounds its work per call): ask again with it. Stable: a key that exists
        throughout a listing is on exactly one of its pages. ``InvalidRequest`` for a bad
        ``limit``, ``after`` or ``name``; an API never created has one empty page (R9).
        """
        validate_api_name(api)
        page = await self.store.page_keys(api, limit=limit, after=after, name=name)
        now = utcnow()
        return KeyInfoPage([record.info(now) for record in page.keys], page.next)

    async def iter_keys(
        self, api: str, *, name: str | None = None, page_size: int = MAX_PAGE_SIZE
    ) -> AsyncIterator[KeyInfo]:
        """Every key of ``api`` (whose name contains ``name``, if given), oldest first, read
        a page of ``page_size`` at a time: a million keys never sit in memory at once."""
        after: str | None = None
        while True:
            page = await self.page_keys(api, limit=page_size, after=after, name=name)
            for key in page.keys:
                yield key
            if page.next is None:
                return
            after = page.next

    async def find_key_by_name(self, api: str, name: str) -> KeyInfo:
        """The key of ``api`` whose name equals ``name`` casefolded; ``KeyNotFound`` if none."""
        wanted = normalize_name(name).casefold()
        async for key in self.iter_keys(api, name=name):
            if key.name.casefold() == wanted:
                return key
        raise KeyNotFound(f"API {api!r} has no key named {name.strip()!r}")

    async def audit(
        self,
        api: str | None = None,
        client_id: str | None = None,
        *,
        limit: int = DEFAULT_AUDIT_LIMIT,
        before: str | None = None,
    ) -> AuditPage:
        """The audit log (SPEC §10), newest first: every change, or those of ``api`` and/or
        of the key ``client_id``, ``limit`` (at most 1000) at a time; pass a page's
        ``next`` as ``before`` for the following one. Events outlive what they concern:
        a deleted API's or key's history stays readable for the store's retention."""
        if api is not None:
            validate_api_name(api)
        if client_id is not None and not isinstance(client_id, str):
            raise InvalidRequest("client_id must be text")
        limit, before = check_audit_query(limit, before)
        events = await self.store.list_audit(
            api=api, client_id=client_id, limit=limit + 1, before=before
        )
        page = events[:limit]
        return AuditPage(page, page[-1].id if len(events) > limit else None)

    # -- usage (SPEC §10) ----------------------------------------------------------------

    async def usage(
        self,
        api: str,
        client_id: str | None = None,
        *,
        hours: int = 24,
        limit: int | None = None,
        after: str | None = None,
        name: str | None = None,
    ) -> dict[str, Any]:
        """The traffic of ``api``'s key ``client_id`` (or of the whole API) over the last
        ``hours`` hours (1 to 840, 35 days), as SPEC §10's JSON object.

        A key's: ``{"client_id", "hours": [{"start", "requests", "rate_limited"}, …]}``,
        oldest first, every hour present (zeros for none), the last one the current
        hour. An API's: ``{"api", "hours": [...], "keys": [{"client_id", "name",
        "requests", "rate_limited"}, …]}``, every key of the API with its totals over the
        range, zeros included; its hours count all of the API's traffic, keys deleted
        since included. ``requests`` counts admitted requests, ``rate_limited`` 429s.
        Counts reach the store in batches (``KeyGuard(usage_flush=…)``), so the last
        seconds of traffic may be missing. An API never created answers as one with no
        keys (SPEC §2); ``KeyNotFound`` for an unknown key (its API never created
        included, as ``get_key`` answers).

        An API's keys are read a page at a time, never in one store call. For an API
        too large to list whole, ``limit`` / ``after`` / ``name`` (as ``page_keys`` takes
        them) ask for one page of its keys instead, and the answer gains ``"next"``:
        the cursor of the page after, or ``None``. ``hours`` still counts all of the
        API's traffic.
        """
        if isinstance(hours, bool) or not isinstance(hours, int):
            raise InvalidRequest("hours must be a whole number")
        if not 1 <= hours <= MAX_USAGE_HOURS:
            raise InvalidRequest(f"hours must be between 1 and {MAX_USAGE_HOURS} (35 days)")
        paged = limit is not None or after is not None or name is not None
        if paged and client_id is not None:
            raise InvalidRequest("limit, after and name apply to an API's usage, not a key's")
        following: str | None = None
        keys: list[KeyRecord] | list[KeyInfo]
        if client_id is not None:
            # A key's: an API never created has no such key (SPEC §5's key routes), as
            # get_key answers; a key that exists says that its API does.
            keys = [await self._get_record(api, client_id)]
        else:
            # An API never created answers like one with no keys (SPEC §2): its hours
            # are zeros, or what a deleted API of that name left within the 35 days.
            validate_api_name(api)
            if paged:
                page = await self.page_keys(
                    api,
                    limit=DEFAULT_PAGE_SIZE if limit is None else limit,
                    after=after,
                    name=name,
                )
                keys, following = page.keys, page.next
            else:
                keys = [key async for key in self.iter_keys(api)]
        last = hour_start(utcnow())
        first = last - timedelta(hours=hours - 1)
        rows = await self.store.read_usage(api, client_id, first)
        series = [
            {"start": rfc3339(start), "requests": requests, "rate_limited": limited}
            for start, requests, limited in merge_hours(rows, first, hours)
        ]
        if client_id is not None:
            return {"client_id": client_id, "hours": series}
        totals = {record.client_id: [0, 0] for record in keys}
        for row in rows:
            slot = totals.get(row.client_id)
            # The hours listed only: a bucket after the current hour (written by a process
            # whose clock runs ahead) is in neither the series nor the totals.
            if slot is not None and first <= row.hour <= last:
                slot[0] += row.requests
                slot[1] += row.rate_limited
        answer: dict[str, Any] = {
            "api": api,
            "hours": series,
            "keys": [
                {
                    "client_id": record.client_id,
                    "name": record.name,
                    "requests": totals[record.client_id][0],
                    "rate_limited": totals[record.client_id][1],
                }
                for record in keys
            ],
        }
        if paged:
            answer["next"] = following
        return answer

    async def _get_record(self, api: str, client_id: str) -> KeyRecord:
        validate_api_name(api)
        record = await self.store.get_key(api, client_id) if isinstance(client_id, str) else None
        if record is None:
            raise KeyNotFound(f"API {api!r} has no key {client_id!r}")
        return record
