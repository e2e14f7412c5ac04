"""Pages of an API's keys (SPEC §5 ``GET /apis/{api}/keys``): the page, its cursor, its checks.

Every store lists keys in one stable order, oldest first: by ``created_at``,
then by a number the store gives each key at insertion (an autoincrement id
on SQL, the API's insertion counter on Redis, a counter in memory). A page
ends at a *position*, that pair, and the cursor of the next page is the
position encoded: the next page starts strictly after it, so a key created
or deleted between two pages never makes another key appear twice or be
skipped (a key deleted meanwhile is simply not there; a key created meanwhile
is newer than every position handed out, so it shows up on a later page).

A cursor is opaque to callers: ``base64url("1:<µs>:<number>")``. A cursor that
does not decode to that shape is ``InvalidRequest`` (422 ``invalid_request``),
never a 500; one that decodes is a position like any other, so a changed one
only moves where the page starts (every key it could show is the caller's to
see anyway).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from keyguard.errors import InvalidRequest
from keyguard.models import KeyRecord, normalize_name

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "SCAN_BUDGET",
    "KeyPage",
    "check_page",
    "decode_cursor",
    "encode_cursor",
    "from_micros",
    "name_filter",
    "to_micros",
]

DEFAULT_PAGE_SIZE = 100
"""Keys per page unless a caller asks for another number (SPEC §5)."""
MAX_PAGE_SIZE = 1000
"""The most keys one page holds (SPEC §5)."""
SCAN_BUDGET = 5000
"""The most keys of an API one page call with a name filter looks at (Redis and SQL)."""

_CURSOR_TEXT = re.compile(r"[A-Za-z0-9_-]{4,64}")
_POSITION = re.compile(r"1:(0|[1-9][0-9]{0,15}):(0|[1-9][0-9]{0,18})")
_MAX_MICROS = 10**16  # year 2286: any real created_at fits (16 digits on Redis)
_MAX_NUMBER = 2**63 - 1  # a BIGINT autoincrement


@dataclass(frozen=True)
class KeyPage:
    """One page of an API's keys, oldest first, and the cursor of the next page.

    ``next`` is ``None`` when the listing is done. With a ``name`` filter a page may
    hold fewer keys than asked (even none) while ``next`` is not ``None``: a store
    bounds the work one call does (see ``KeyStore.page_keys``).
    """

    keys: list[KeyRecord]
    next: str | None


def encode_cursor(micros: int, number: int) -> str:
    """The opaque cursor of the position (``created_at`` in µs since the epoch, insertion
    number) that a page ended at."""
    raw = f"1:{micros}:{number}".encode("ascii")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, int]:
    """The position ``(µs, number)`` of a cursor ``encode_cursor`` made; ``InvalidRequest``
    for anything else."""
    if not isinstance(cursor, str) or not _CURSOR_TEXT.fullmatch(cursor):
        raise InvalidRequest("after: not a cursor this listing gave (pass its 'next' as is)")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            "after: not a cursor this listing gave (pass its 'next' as is)"
        ) from None
    found = _POSITION.fullmatch(raw)
    if found is None:
        raise InvalidRequest("after: not a cursor this listing gave (pass its 'next' as is)")
    micros, number = int(found[1]), int(found[2])
    if micros >= _MAX_MICROS or number > _MAX_NUMBER:
        raise InvalidRequest("after: not a cursor this listing gave (pass its 'next' as is)")
    return micros, number


def name_filter(name: str | None) -> str | None:
    """The casefolded text a key's casefolded name must contain, or ``None`` for no filter
    (``None``, empty or blank). It is read as a key name is (trimmed, NFC-normalized, at
    most 100 characters, no control or format characters), else ``InvalidRequest``."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise InvalidRequest("name: must be text")
    if not name.strip():
        return None
    try:
        return normalize_name(name).casefold()
    except InvalidRequest as exc:
        raise InvalidRequest(f"name filter: {exc}") from None


def check_page(limit: int) -> int:
    """``limit`` if it is a whole number from 1 to ``MAX_PAGE_SIZE``; else ``InvalidRequest``."""
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise InvalidRequest(f"limit: a whole number from 1 to {MAX_PAGE_SIZE}")
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidRequest(f"limit: a whole number from 1 to {MAX_PAGE_SIZE}")
    return limit


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def to_micros(moment: datetime) -> int:
    """``moment`` in whole µs since the epoch (naive means UTC): a position's first part."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - _EPOCH) // _MICROSECOND


def from_micros(micros: int) -> datetime:
    """The aware UTC datetime ``micros`` µs after the epoch."""
    return _EPOCH + micros * _MICROSECOND
