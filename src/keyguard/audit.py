"""The audit log (SPEC §10, R12): who changed what, recorded with the change itself.

``KeyManager`` builds one :class:`AuditEvent` per change and hands it to the
store's changing method (``audit=``), which writes it atomically with the
change: in the same transaction on SQL, in the same Lua script on Redis,
under the same lock in memory. A change that fails leaves no event, and no
event exists without its change.

An event's ``changes`` maps each field the change set to its new value, as
JSON. It never holds a secret or a secret hash: a secret change records only
``previous_secret_expires_at``.

Event ids sort as the events happened: 14 hex digits of microseconds since
the epoch, then 12 random hex digits (26 characters in all). Listings are
newest first, and an id is the cursor of the next page (``before=``).
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any, Final

from keyguard.errors import ConfigurationError, InvalidRequest
from keyguard.models import EMPTY_META, KeyRecord, RateLimit, rfc3339, thaw, utcnow

__all__ = [
    "ACTIONS",
    "DEFAULT_AUDIT_LIMIT",
    "DEFAULT_AUDIT_RETENTION",
    "MAX_AUDIT_LIMIT",
    "AuditEvent",
    "AuditPage",
    "check_actor",
    "check_audit_query",
    "check_retention",
    "cutoff_id",
    "json_value",
    "key_fields",
    "load_changes",
    "new_event",
]

DEFAULT_AUDIT_RETENTION: Final = timedelta(days=400)
"""How long stores keep audit events unless told otherwise (``audit_retention=``)."""
DEFAULT_AUDIT_LIMIT: Final = 50
MAX_AUDIT_LIMIT: Final = 1000
MAX_ACTOR_LENGTH: Final = 200

ACTIONS: Final = (
    "api.expose",
    "api.unexpose",
    "api.update",
    "api.delete",
    "key.create",
    "key.update",
    "key.secret",
    "key.delete",
)

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
_ID = re.compile(r"[0-9a-f]{26}")
_last_micros = 0
_id_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One change, as the audit log keeps it (SPEC §10)."""

    id: str
    at: datetime
    actor: str
    action: str
    api: str
    client_id: str | None = None
    name: str | None = None
    """The key's name when the change was made (a rename's new name is in ``changes``)."""
    changes: Mapping[str, Any] = field(default_factory=lambda: EMPTY_META)
    """Each field the change set, with its new value as JSON; never a secret or hash."""

    def as_json(self) -> dict[str, Any]:
        """The event as SPEC §5's JSON object."""
        return {
            "id": self.id,
            "at": rfc3339(self.at),
            "actor": self.actor,
            "action": self.action,
            "api": self.api,
            "client_id": self.client_id,
            "name": self.name,
            "changes": thaw(self.changes),
        }

    def dumps(self) -> str:
        """The event as compact JSON text (how the Redis store keeps it)."""
        return json.dumps(self.as_json(), ensure_ascii=False, separators=(",", ":"))

    def dump_changes(self) -> str:
        """``changes`` as compact JSON text (how the SQL store keeps it)."""
        return json.dumps(thaw(self.changes), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def loads(cls, text: str | bytes) -> AuditEvent:
        """The event from :meth:`dumps`' text."""
        data = json.loads(text)
        return cls(
            id=data["id"],
            at=_at(data["id"]),
            actor=data["actor"],
            action=data["action"],
            api=data["api"],
            client_id=data.get("client_id"),
            name=data.get("name"),
            changes=load_changes(json.dumps(data.get("changes") or {})),
        )


@dataclass(frozen=True, slots=True)
class AuditPage:
    """A page of events, newest first, and the cursor of the next (``None``: no more)."""

    events: list[AuditEvent]
    next: str | None

    def as_json(self) -> dict[str, Any]:
        """``{"events": [...], "next": cursor or null}`` (SPEC §5)."""
        return {"events": [event.as_json() for event in self.events], "next": self.next}


def load_changes(text: str | None) -> Mapping[str, Any]:
    """``changes`` from its JSON text, read-only."""
    if not text:
        return EMPTY_META
    return MappingProxyType(json.loads(text))


def new_event(
    *,
    actor: str,
    action: str,
    api: str,
    client_id: str | None = None,
    name: str | None = None,
    changes: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """A new event, with a fresh id that sorts after every id this process made before."""
    global _last_micros
    now = (utcnow() - _EPOCH) // _MICROSECOND
    with _id_lock:
        micros = _last_micros = max(now, _last_micros + 1)
    return AuditEvent(
        id=f"{micros:014x}{secrets.token_hex(6)}",
        at=_EPOCH + micros * _MICROSECOND,
        actor=actor,
        action=action,
        api=api,
        client_id=client_id,
        name=name,
        changes=MappingProxyType(dict(changes or {})),
    )


def key_fields(record: KeyRecord) -> dict[str, Any]:
    """A new key's fields as ``changes`` holds them (no secret, no hash)."""
    return {
        "kind": record.kind.value,
        "name": record.name,
        "enabled": record.enabled,
        "expires_at": json_value(record.expires_at),
        "meta": thaw(record.meta),
        "rate_limits": json_value(record.rate_limits),
    }


def json_value(value: Any) -> Any:
    """A changed field's new value as JSON: times as RFC 3339, rate limits as objects."""
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, tuple) and all(isinstance(item, RateLimit) for item in value):
        return [item.as_json() for item in value]
    if isinstance(value, Mapping):
        return thaw(value)
    return value


def _at(event_id: str) -> datetime:
    return _EPOCH + int(event_id[:14], 16) * _MICROSECOND


def cutoff_id(retention: timedelta, now: datetime | None = None) -> str:
    """The id prefix below which events are older than ``retention`` (for ``id < cutoff``).

    Counted in microseconds, never as a datetime: a retention reaching back before the
    epoch (years past 1970, or ``timedelta.max`` for "keep everything") is the lowest id,
    not an ``OverflowError`` on every change."""
    micros = ((now or utcnow()) - _EPOCH) // _MICROSECOND - retention // _MICROSECOND
    return f"{max(0, micros):014x}"


def check_retention(value: object) -> timedelta:
    """``audit_retention`` as a ``timedelta``: a positive ``timedelta`` or number of days
    (at most ``timedelta``'s 999,999,999 days), else ``ConfigurationError``."""
    if isinstance(value, timedelta):
        if value > timedelta(0):
            return value
    elif isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        try:
            return timedelta(days=value)
        except (OverflowError, ValueError):  # infinity, or past what a timedelta holds
            pass
    raise ConfigurationError(
        f"audit_retention must be a positive timedelta or number of days, got {value!r}"
    )


def check_actor(actor: object) -> str:
    """An actor: 1-200 printable characters."""
    if not isinstance(actor, str) or not actor.strip() or len(actor) > MAX_ACTOR_LENGTH:
        raise InvalidRequest(f"actor must be 1-{MAX_ACTOR_LENGTH} characters")
    if not actor.isprintable():
        raise InvalidRequest("actor must hold printable characters only")
    return actor


def check_audit_query(limit: object, before: object) -> tuple[int, str | None]:
    """``limit`` (1-1000) and ``before`` (an event id or ``None``) of an audit listing."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_AUDIT_LIMIT:
        raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_AUDIT_LIMIT}")
    if before is not None and (not isinstance(before, str) or not _ID.fullmatch(before)):
        raise InvalidRequest("before must be the next cursor of an audit listing")
    return limit, before
