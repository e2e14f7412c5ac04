"""The values keyguard hands out: APIs, keys and freshly issued keys, and their checks.

All are frozen dataclasses; none of them can show a secret hash, and an
``IssuedKey``'s secret is left out of its ``repr``. The lifecycle fields of
SPEC §8 (``enabled``, ``expires_at``, ``meta``, ``previous_secret_expires_at``,
``last_used_at``, ``rate_limits``) are here too, with the one validation of
each that every front door shares.
"""

from __future__ import annotations

import enum
import json
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any, Final, Literal

from keyguard.errors import InvalidRequest

__all__ = [
    "API_NAME_PATTERN",
    "EMPTY_META",
    "KEY_NAME_PATTERN",
    "MAX_GRACE",
    "MAX_META_BYTES",
    "MAX_META_DEPTH",
    "MAX_NAME_LENGTH",
    "MAX_RATE_LIMITS",
    "RATE_LIMIT_UNITS",
    "UNCHANGED",
    "Api",
    "IssuedKey",
    "IssuedSecret",
    "KeyChanges",
    "KeyInfo",
    "KeyKind",
    "KeyRecord",
    "RateLimit",
    "Unchanged",
    "dump_meta",
    "dump_rate_limits",
    "load_meta",
    "load_rate_limits",
    "name_key",
    "normalize_name",
    "parse_duration",
    "parse_grace",
    "parse_meta",
    "parse_rate_limits",
    "parse_time",
    "rfc3339",
    "thaw",
    "utcnow",
    "validate_api_name",
]

API_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_NAME_LENGTH = 100
# Characters a key name may not contain, as a regular expression class for JSON
# Schema documents: C0/C1 controls, the common format characters (soft hyphen,
# zero-width and bidi controls, BOM), line and paragraph separators, and lone
# surrogates (which no database or Redis could store). ``normalize_name`` checks
# the whole Unicode categories Cc, Cf, Zl, Zp and Cs.
NAME_FORBIDDEN = (
    "\\u0000-\\u001f\\u007f-\\u009f\\u00ad\\u061c\\u180e\\u200b-\\u200f"
    "\\u2028-\\u202e\\u2060-\\u206f\\ufeff\\ud800-\\udfff"
)
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
KEY_NAME_PATTERN = f"^[^{NAME_FORBIDDEN}]*[^\\s{NAME_FORBIDDEN}][^{NAME_FORBIDDEN}]*$"
"""A key name (before trimming) as a regular expression, for JSON Schema documents."""
_FORBIDDEN_IN_NAME = re.compile(f"[{NAME_FORBIDDEN}]")


class KeyKind(str, enum.Enum):
    """The two kinds of key (SPEC §2)."""

    INTERNAL = "internal"
    """For the API owner's organization: id and secret generated together, never changed."""

    EXTERNAL = "external"
    """For customers: an id only at first; a secret can be set (and replaced) later."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: object) -> KeyKind:
        """The kind named by ``value`` (a ``KeyKind`` or its string), else ``InvalidRequest``."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value)
            except ValueError:
                pass
        raise InvalidRequest("kind must be 'internal' or 'external'")


MAX_META_BYTES: Final = 4096
"""The largest ``meta`` a key may carry, as compact UTF-8 JSON (SPEC §8)."""
MAX_META_DEPTH: Final = 32
"""The most levels of objects and arrays a key's ``meta`` may nest (the top object is one):
deeper, reading it back would exhaust Python's recursion limit."""
MAX_GRACE: Final = timedelta(days=30)
"""The longest grace period of a rolled secret (SPEC §8)."""
MAX_RATE_LIMITS: Final = 4
"""The most rate limits an API or a key may have (SPEC §9)."""
RATE_LIMIT_UNITS: Final[Mapping[str, int]] = MappingProxyType(
    {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
)
"""The periods a rate limit may count over, with their length in seconds."""

RateUnit = Literal["second", "minute", "hour", "day"]


class Unchanged(enum.Enum):
    """The type of :data:`UNCHANGED`: "leave this field as it is" (``None`` can be a value)."""

    UNCHANGED = "unchanged"

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged.UNCHANGED
"""Marks a field of ``KeyManager.update_key`` / ``KeyChanges`` that is not to change."""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``limit`` requests per ``per`` (SPEC §9), written ``100/minute``."""

    limit: int
    per: RateUnit

    @property
    def seconds(self) -> int:
        """The length of the period in seconds."""
        return RATE_LIMIT_UNITS[self.per]

    def __str__(self) -> str:
        return f"{self.limit}/{self.per}"

    def as_json(self) -> dict[str, object]:
        """``{"limit": n, "per": unit}``."""
        return {"limit": self.limit, "per": self.per}


@dataclass(frozen=True, slots=True)
class Api:
    """An API as the store knows it, with how many keys of each kind it holds."""

    name: str
    exposed: bool
    max_keys_per_kind: int
    internal_keys: int = 0
    external_keys: int = 0
    rate_limits: tuple[RateLimit, ...] = ()
    """The limits applying to each key of the API that has none of its own (SPEC §9)."""

    def key_count(self, kind: KeyKind) -> int:
        """How many keys of ``kind`` this API holds."""
        return self.internal_keys if kind is KeyKind.INTERNAL else self.external_keys


EMPTY_META: Final[Mapping[str, Any]] = MappingProxyType({})
"""The ``meta`` of a key that has none."""


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What anyone may know about a key (R9): never its secret, never its hash.

    ``meta`` is read-only (nested objects are read-only mappings, arrays are
    tuples); :func:`thaw` turns it back into plain JSON values.
    ``previous_secret_expires_at`` is set while a rolled secret's previous
    secret still verifies (SPEC §8); ``rate_limits`` ``None`` means the API's.
    """

    api: str
    client_id: str
    name: str
    kind: KeyKind
    has_secret: bool
    created_at: datetime
    enabled: bool = True
    expires_at: datetime | None = None
    meta: Mapping[str, Any] = field(default_factory=lambda: EMPTY_META)
    last_used_at: datetime | None = None
    previous_secret_expires_at: datetime | None = None
    rate_limits: tuple[RateLimit, ...] | None = None

    def expired(self, now: datetime | None = None) -> bool:
        """Whether ``expires_at`` has passed at ``now`` (default: this instant)."""
        return self.expires_at is not None and self.expires_at <= (now or utcnow())


@dataclass(frozen=True, slots=True)
class IssuedKey(KeyInfo):
    """A key at the moment it is created: the only time its secret is shown.

    ``secret`` is ``None`` for external keys, which have none at creation.
    """

    secret: str | None = field(default=None, repr=False)


class IssuedSecret(str):
    """A secret just set on an external key: a ``str`` (the secret, shown this once)
    that also tells which key it belongs to and until when the previous secret
    still verifies (``None``: not at all). Its ``repr`` hides the secret."""

    client_id: str
    previous_secret_expires_at: datetime | None

    def __new__(
        cls, secret: str, *, client_id: str, previous_secret_expires_at: datetime | None
    ) -> IssuedSecret:
        issued = super().__new__(cls, secret)
        issued.client_id = client_id
        issued.previous_secret_expires_at = previous_secret_expires_at
        return issued

    def __repr__(self) -> str:
        return f"IssuedSecret(client_id={self.client_id!r}, secret=<hidden>)"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as stores keep it: the public fields plus the secret's hash (never the secret),
    and the hash of the previous secret while its grace period lasts."""

    api: str
    client_id: str
    name: str
    kind: KeyKind
    secret_hash: str | None = field(repr=False)
    created_at: datetime
    enabled: bool = True
    expires_at: datetime | None = None
    meta: Mapping[str, Any] = field(default_factory=lambda: EMPTY_META)
    previous_secret_hash: str | None = field(default=None, repr=False)
    previous_secret_expires_at: datetime | None = None
    last_used_at: datetime | None = None
    rate_limits: tuple[RateLimit, ...] | None = None

    @property
    def has_secret(self) -> bool:
        """Whether the key has a secret that callers must send."""
        return self.secret_hash is not None

    def previous_hash(self, now: datetime) -> str | None:
        """The previous secret's hash if its grace period lasts at ``now``, else ``None``."""
        until = self.previous_secret_expires_at
        if self.previous_secret_hash is None or until is None or until <= now:
            return None
        return self.previous_secret_hash

    def info(self, now: datetime | None = None) -> KeyInfo:
        """The public view of this record (a grace period over at ``now`` shows as none)."""
        until = self.previous_secret_expires_at
        if until is not None and (self.previous_secret_hash is None or until <= (now or utcnow())):
            until = None
        return KeyInfo(
            api=self.api,
            client_id=self.client_id,
            name=self.name,
            kind=self.kind,
            has_secret=self.secret_hash is not None,
            created_at=self.created_at,
            enabled=self.enabled,
            expires_at=self.expires_at,
            meta=self.meta,
            last_used_at=self.last_used_at,
            previous_secret_expires_at=until,
            rate_limits=self.rate_limits,
        )


@dataclass(frozen=True, slots=True)
class KeyChanges:
    """The fields of a key an update changes (R11); a field left ``UNCHANGED`` keeps its value.

    Values are already validated (``KeyManager`` builds this): ``name``
    normalized, ``expires_at`` in UTC or ``None``, ``meta`` frozen,
    ``rate_limits`` a tuple or ``None`` (inherit the API's).
    """

    name: str | Unchanged = UNCHANGED
    enabled: bool | Unchanged = UNCHANGED
    expires_at: datetime | Unchanged | None = UNCHANGED
    meta: Mapping[str, Any] | Unchanged = UNCHANGED
    rate_limits: tuple[RateLimit, ...] | Unchanged | None = UNCHANGED

    def given(self) -> dict[str, Any]:
        """The fields to change, by name, with their new values."""
        return {
            name: value
            for name in ("name", "enabled", "expires_at", "meta", "rate_limits")
            if (value := getattr(self, name)) is not UNCHANGED
        }

    def apply(self, record: KeyRecord) -> KeyRecord:
        """``record`` with these changes made (how stores without SQL apply them)."""
        return replace(record, **self.given())


def validate_api_name(api: object) -> str:
    """``api`` if it is a valid API name (SPEC §2), else ``InvalidRequest``."""
    if not isinstance(api, str) or not API_NAME_PATTERN.fullmatch(api):
        raise InvalidRequest(
            "API name must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return api


def normalize_name(name: object) -> str:
    """The key name trimmed, NFC-normalized and checked (R3), else ``InvalidRequest``.

    A name holds no control, format (bidi overrides, zero-width), line or
    paragraph separator characters (Unicode categories Cc, Cf, Zl, Zp), nor
    lone surrogates, so that no two names that look alike, and no name that
    displays differently from what it is, can be stored.
    """
    if not isinstance(name, str):
        raise InvalidRequest("name must be a string")
    if _FORBIDDEN_IN_NAME.search(name.strip()) is None:
        # (Lone surrogates are checked first: NFC cannot take them.)
        trimmed = unicodedata.normalize("NFC", name).strip()
    else:
        trimmed = ""
    if trimmed and not any(unicodedata.category(char) in _FORBIDDEN_CATEGORIES for char in trimmed):
        if len(trimmed) > MAX_NAME_LENGTH:
            raise InvalidRequest(f"name must be at most {MAX_NAME_LENGTH} characters")
        return trimmed
    if not name.strip():
        raise InvalidRequest("name is required and cannot be blank")
    raise InvalidRequest(
        "name cannot contain control, format (such as bidi or zero-width), "
        "line or paragraph separator characters, or surrogates"
    )


def name_key(name: str) -> str:
    """The form in which names are compared for uniqueness (R3)."""
    return name.casefold()


def utcnow() -> datetime:
    """Now, in UTC, to the microsecond (what every store can keep)."""
    return datetime.now(timezone.utc)


def rfc3339(moment: datetime) -> str:
    """``moment`` as an RFC 3339 UTC timestamp, e.g. ``2026-11-26T21:37:54.123456Z``."""
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


# -- the lifecycle fields' checks (SPEC §8, §9), shared by every front door ---------------------

_DURATION = re.compile(r"([0-9]{1,9})([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_DURATION_SECONDS = 100 * 365 * 86400
# RFC 3339's date-time (any number of second-fraction digits), and the space that its
# section 5.6 allows for the T; ASCII digits only.
_RFC3339 = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ]([0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]+))?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def parse_time(value: object, field_name: str = "expires_at") -> datetime | None:
    """``value`` (an aware ``datetime`` or an RFC 3339 string with a zone, or ``None``)
    as a UTC datetime to the microsecond, else ``InvalidRequest`` naming ``field_name``."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        found = _RFC3339.fullmatch(text)
        if found is None:
            raise InvalidRequest(
                f"{field_name} must be an RFC 3339 time with a zone, "
                f"such as 2026-12-31T23:59:59Z, got {value[:40]!r}"
            )
        day, clock, fraction, zone = found.groups()
        # Microseconds as the stores keep them: more digits (Go's and Java's nanoseconds)
        # are cut, fewer padded, in the one form every fromisoformat (3.10's too) reads.
        micros = (fraction or "")[:6].ljust(6, "0")
        offset = "+00:00" if zone in ("Z", "z") else zone
        try:
            value = datetime.fromisoformat(f"{day}T{clock}.{micros}{offset}")
        except ValueError:
            raise InvalidRequest(f"{field_name} is not a valid time: {text[:40]!r}") from None
    if not isinstance(value, datetime):
        raise InvalidRequest(f"{field_name} must be an RFC 3339 time with a zone, or null")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidRequest(f"{field_name} must have a time zone (such as Z or +02:00)")
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise InvalidRequest(f"{field_name} is out of range") from None


def parse_duration(value: object, field_name: str = "duration") -> timedelta:
    """A duration written ``30d``, ``12h``, ``90m`` or ``45s`` (or a number of seconds),
    else ``InvalidRequest`` naming ``field_name``. Never negative."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        # An int past any float is out of range, not an OverflowError from float().
        too_far = abs(value) > _MAX_DURATION_SECONDS
        seconds = (math.inf if value > 0 else -math.inf) if too_far else float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip().lower())):
        seconds = float(int(match[1]) * _DURATION_UNITS[match[2]])
    else:
        raise InvalidRequest(
            f"{field_name} must be a duration such as 30d, 12h, 90m or 45s, got {str(value)[:40]!r}"
        )
    if math.isnan(seconds):
        raise InvalidRequest(f"{field_name} must be a number of seconds, not NaN")
    if seconds < 0:
        raise InvalidRequest(f"{field_name} cannot be negative")
    if seconds > _MAX_DURATION_SECONDS:
        raise InvalidRequest(f"{field_name} is too long")
    return timedelta(seconds=seconds)


def parse_grace(value: object) -> timedelta:
    """A secret roll's grace period (seconds, a ``timedelta`` or ``30d``-style text):
    0 to 30 days, else ``InvalidRequest``."""
    grace = parse_duration(value, "grace")
    if grace > MAX_GRACE:
        raise InvalidRequest("grace cannot be longer than 30 days")
    return grace


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    return value


def thaw(value: Any) -> Any:
    """A frozen ``meta`` (or any part of it) as plain JSON values: dicts and lists."""
    if isinstance(value, Mapping):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [thaw(item) for item in value]
    return value


def dump_meta(meta: Mapping[str, Any]) -> str:
    """``meta`` as the compact JSON text stores keep."""
    return json.dumps(thaw(meta), ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def load_meta(text: str | None) -> Mapping[str, Any]:
    """The frozen ``meta`` stored as ``text`` (``None`` or empty: ``{}``)."""
    if not text or text == "{}":
        return EMPTY_META
    loaded = json.loads(text)
    frozen: Mapping[str, Any] = _freeze(loaded) if isinstance(loaded, dict) else EMPTY_META
    return frozen


_TOO_DEEP = f"meta must nest at most {MAX_META_DEPTH} levels of objects and arrays"
_JSON_VALUES_ONLY = (
    "meta must hold only JSON values: objects with string keys, arrays, strings, "
    "numbers, true, false and null"
)


def parse_meta(value: object) -> Mapping[str, Any]:
    """``value`` as a key's ``meta``: a JSON object (a dict, or its JSON text) of at most
    4,096 bytes as compact UTF-8 JSON; ``None`` is ``{}``. Else ``InvalidRequest``."""
    if value is None:
        return EMPTY_META
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except RecursionError:  # nested past the parser's own depth
            raise InvalidRequest(_TOO_DEEP) from None
        except ValueError:
            raise InvalidRequest('meta must be a JSON object, such as {"plan": "gold"}') from None
    if isinstance(value, Mapping) and not isinstance(value, dict):
        value = thaw(value)
    if not isinstance(value, dict):
        raise InvalidRequest('meta must be a JSON object, such as {"plan": "gold"}')
    if _depth(value) > MAX_META_DEPTH:
        raise InvalidRequest(_TOO_DEEP)
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidRequest(
            "meta must be valid Unicode text (a lone surrogate such as \\ud800 is not)"
        ) from None
    except ValueError:
        raise InvalidRequest("meta must hold only JSON numbers (no NaN or infinity)") from None
    except (TypeError, RecursionError):
        raise InvalidRequest(_JSON_VALUES_ONLY) from None
    if size > MAX_META_BYTES:
        raise InvalidRequest(f"meta must be at most {MAX_META_BYTES} bytes as JSON, got {size}")
    return load_meta(text)


def _depth(value: object) -> int:
    """How many levels of objects and arrays ``value`` nests, counted without recursion;
    ``InvalidRequest`` for an object with a key that is not a string (``json.dumps``
    would turn ``1`` into ``"1"`` silently, and ``{1: …, "1": …}`` into one key)."""
    deepest = 0
    pending = [(value, 1)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, Mapping):
            if not all(isinstance(key, str) for key in item):
                raise InvalidRequest(_JSON_VALUES_ONLY)
            children: Iterable[object] = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        pending.extend((child, level + 1) for child in children)
    return deepest


def parse_rate_limits(value: object, field_name: str = "rate_limits") -> tuple[RateLimit, ...]:
    """``value`` (a list of ``{"limit", "per"}`` objects, ``RateLimit``s or ``"n/per"``
    strings) as at most four rate limits, else ``InvalidRequest`` naming ``field_name``.
    A limit given twice is kept once (the same limit twice is that limit)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise InvalidRequest(f'{field_name} must be a list of {{"limit", "per"}} objects')
    if len(value) > MAX_RATE_LIMITS:
        raise InvalidRequest(f"{field_name} can hold at most {MAX_RATE_LIMITS} limits")
    return tuple(dict.fromkeys(_rate_limit(item, field_name) for item in value))


def _rate_limit(item: object, field_name: str) -> RateLimit:
    limit: object
    per: object
    if isinstance(item, RateLimit):
        limit, per = item.limit, item.per
    elif isinstance(item, str):
        count, _, unit = item.strip().partition("/")
        digits = count.strip()
        if not digits.isascii() or not digits.isdigit() or not unit:
            raise InvalidRequest(f"{field_name}: {item[:40]!r} is not a limit such as 100/minute")
        # More digits than the largest limit has is past it (int() refuses 4,300 of them).
        limit = int(digits) if len(digits.lstrip("0")) <= 13 else 10**12 + 1
        per = unit.strip().lower()
    elif isinstance(item, Mapping) and set(item) == {"limit", "per"}:
        limit, per = item["limit"], item["per"]
    else:
        raise InvalidRequest(f'{field_name}: each limit is an object {{"limit": n, "per": unit}}')
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidRequest(f"{field_name}: a limit must be a whole number of at least 1")
    if limit > 10**12:
        raise InvalidRequest(f"{field_name}: a limit can be at most 1000000000000")
    if per == "second" or per == "minute" or per == "hour" or per == "day":
        return RateLimit(limit, per)
    raise InvalidRequest(
        f"{field_name}: the unit must be second, minute, hour or day, got {str(per)[:20]!r}"
    )


def dump_rate_limits(limits: tuple[RateLimit, ...] | None) -> str | None:
    """Rate limits as the JSON text stores keep (``None`` stays ``None``: inherit)."""
    if limits is None:
        return None
    return json.dumps([item.as_json() for item in limits], separators=(",", ":"))


def load_rate_limits(text: str | None) -> tuple[RateLimit, ...] | None:
    """Rate limits stored as ``text`` (``None``: inherit)."""
    if text is None:
        return None
    if text == "[]":
        return ()
    return tuple(RateLimit(item["limit"], item["per"]) for item in json.loads(text))
