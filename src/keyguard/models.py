"""The values keyguard hands out: APIs, keys and freshly issued keys.

All are frozen dataclasses; none of them can show a secret hash, and an
``IssuedKey``'s secret is left out of its ``repr``.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone

from keyguard.errors import InvalidRequest

__all__ = [
    "API_NAME_PATTERN",
    "KEY_NAME_PATTERN",
    "MAX_NAME_LENGTH",
    "Api",
    "IssuedKey",
    "KeyInfo",
    "KeyKind",
    "KeyRecord",
    "name_key",
    "normalize_name",
    "rfc3339",
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


@dataclass(frozen=True, slots=True)
class Api:
    """An API as the store knows it, with how many keys of each kind it holds."""

    name: str
    exposed: bool
    max_keys_per_kind: int
    internal_keys: int = 0
    external_keys: int = 0

    def key_count(self, kind: KeyKind) -> int:
        """How many keys of ``kind`` this API holds."""
        return self.internal_keys if kind is KeyKind.INTERNAL else self.external_keys


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What anyone may know about a key (R9): never its secret, never its hash."""

    api: str
    client_id: str
    name: str
    kind: KeyKind
    has_secret: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class IssuedKey(KeyInfo):
    """A key at the moment it is created: the only time its secret is shown.

    ``secret`` is ``None`` for external keys, which have none at creation.
    """

    secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as stores keep it: the public fields plus the secret's hash (never the secret)."""

    api: str
    client_id: str
    name: str
    kind: KeyKind
    secret_hash: str | None = field(repr=False)
    created_at: datetime

    @property
    def has_secret(self) -> bool:
        """Whether the key has a secret that callers must send."""
        return self.secret_hash is not None

    def info(self) -> KeyInfo:
        """The public view of this record."""
        return KeyInfo(
            api=self.api,
            client_id=self.client_id,
            name=self.name,
            kind=self.kind,
            has_secret=self.secret_hash is not None,
            created_at=self.created_at,
        )


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
