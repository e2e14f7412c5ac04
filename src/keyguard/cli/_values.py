"""The command line's option values (SPEC §6): ``WHEN``, ``DURATION``, ``N/UNIT`` and JSON.

Each is checked by the models' shared validation (the rules every front door
applies) and turned into the value ``KeyManager`` takes, before any store is
opened. A bad one raises ``InvalidRequest`` naming the option: exit 1, one line.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from keyguard.audit import MAX_AUDIT_LIMIT
from keyguard.errors import InvalidRequest
from keyguard.manager import MAX_KEYS_PER_KIND_LIMIT
from keyguard.models import (
    RateLimit,
    parse_duration,
    parse_grace,
    parse_meta,
    parse_rate_limits,
    parse_time,
    utcnow,
)
from keyguard.stores._paging import MAX_PAGE_SIZE
from keyguard.usage import MAX_USAGE_HOURS

__all__ = ["grace", "hours", "manager_arguments", "meta", "rate_limits", "when"]

# A number and letters: meant as a duration (a wrong unit is then a duration's error).
_LOOKS_LIKE_DURATION = re.compile(r"\s*\d+\s*[A-Za-z]*\s*")
# Starts like a date: meant as a time (a missing zone is then a time's error).
_LOOKS_LIKE_TIME = re.compile(r"\s*\d{4}-")


def when(text: str, option: str) -> datetime:
    """``WHEN``: an RFC 3339 time with a zone, or a duration from now (``30d``, ``12h``, ``90m``).

    A time in the past is allowed (SPEC §8: the key is expired at once).
    """
    if _LOOKS_LIKE_DURATION.fullmatch(text):
        return utcnow() + parse_duration(text, option)
    if _LOOKS_LIKE_TIME.match(text):
        return _time(text, option)
    raise InvalidRequest(
        f"{option} must be an RFC 3339 time with a zone (such as 2026-12-31T23:59:59Z) "
        f"or a duration from now (such as 30d, 12h or 90m), got {text[:40]!r}"
    )


def grace(text: str) -> timedelta:
    """``DURATION`` of ``--grace``: ``12h``-style, or the RFC 3339 time it lasts until;
    at most 30 days (SPEC §8)."""
    if _LOOKS_LIKE_TIME.match(text):
        period = _time(text, "--grace") - utcnow()
        if period < timedelta(0):
            raise InvalidRequest(f"--grace: {text.strip()} has already passed")
    else:
        period = parse_duration(text, "--grace")
    try:
        return parse_grace(period)
    except InvalidRequest as exc:
        raise InvalidRequest(f"--grace: {exc.message}") from None


def _time(text: str, option: str) -> datetime:
    moment = parse_time(text, option)
    if moment is None:  # only for None, which argv never holds
        raise InvalidRequest(f"{option} needs a time")
    return moment


def rate_limits(texts: Sequence[str], option: str) -> tuple[RateLimit, ...]:
    """``N/UNIT`` values, such as ``100/minute`` (SPEC §9): at most four."""
    return parse_rate_limits(list(texts), option)


def meta(text: str) -> Mapping[str, Any]:
    """``--meta``: a JSON object of at most 4,096 bytes, replacing the key's whole ``meta``."""
    try:
        return parse_meta(text)
    except InvalidRequest as exc:
        raise InvalidRequest(f"--meta: {exc.message}") from None


def manager_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The checked keyword arguments of the ``KeyManager`` call a command makes, from its
    options' text: only what the operator gave (``update_key`` changes nothing else)."""
    command = (args.command, getattr(args, "action", None))
    given: dict[str, Any] = {}
    if command in (("keys", "create"), ("keys", "update")):
        if args.expires is not None:
            given["expires_at"] = when(args.expires, "--expires")
        if args.meta is not None:
            given["meta"] = meta(args.meta)
    if command == ("keys", "update"):
        if args.rename is not None:
            given["name"] = args.rename
        if args.enabled is not None:
            given["enabled"] = args.enabled
        if args.no_expiry:
            given["expires_at"] = None
        if args.limits is not None:
            given["rate_limits"] = rate_limits(args.limits, "--limits")
        elif args.inherit_limits:
            given["rate_limits"] = None
        elif args.no_limits:
            given["rate_limits"] = ()
    elif command == ("keys", "set-secret") and args.grace is not None:
        given["grace"] = grace(args.grace)
    elif command == ("apis", "expose") and args.max_keys is not None:
        if not 0 <= args.max_keys <= MAX_KEYS_PER_KIND_LIMIT:
            raise InvalidRequest(
                f"--max-keys: a whole number from 0 to {MAX_KEYS_PER_KIND_LIMIT:,} "
                f"(keys of each kind), got {args.max_keys}"
            )
    elif command == ("apis", "limits"):
        given["rate_limits"] = () if args.clear else rate_limits(args.limits, "--set")
    elif command == ("usage", "show"):
        given["hours"] = hours(args.hours)
    elif command == ("keys", "list") and args.limit is not None:
        _check_limit(args.limit, MAX_PAGE_SIZE)
    elif command[0] == "audit":
        _check_limit(args.limit, MAX_AUDIT_LIMIT)
    return given


def _check_limit(value: int, most: int) -> None:
    """``--limit N`` of ``keys list`` and ``audit``, named as the operator typed it."""
    if not 1 <= value <= most:
        raise InvalidRequest(f"--limit: a whole number from 1 to {most:,}, got {value}")


def hours(text: str) -> int:
    """``--hours N`` of ``usage``: a whole number from 1 to 840 (the 35 days kept)."""
    value = text.strip()
    if not (
        value.isascii()
        and value.isdigit()
        and len(value) <= 6
        and 1 <= int(value) <= MAX_USAGE_HOURS
    ):
        raise InvalidRequest(
            f"--hours must be a whole number from 1 to {MAX_USAGE_HOURS}, got {text[:20]!r}"
        )
    return int(value)
