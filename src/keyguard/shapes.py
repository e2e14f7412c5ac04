"""The JSON objects of SPEC §5 (an API, a key, a newly set secret), built in one place.

The management API answers with them and ``keyguard --json`` prints them, so
both front doors show exactly the same fields. Times are RFC 3339 UTC or
``null``; a key's ``rate_limits`` is ``null`` when it inherits its API's.
None of them ever holds a hash; only ``key_json`` of an ``IssuedKey`` and
``secret_json`` hold a secret, the one time it is shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from keyguard.models import Api, IssuedKey, IssuedSecret, KeyInfo, RateLimit, rfc3339, thaw

__all__ = [
    "api_json",
    "key_json",
    "key_page_json",
    "rate_limits_json",
    "secret_json",
    "time_json",
]


def time_json(moment: datetime | None) -> str | None:
    """``moment`` as RFC 3339 UTC text, ``None`` as ``null``."""
    return None if moment is None else rfc3339(moment)


def rate_limits_json(limits: Sequence[RateLimit] | None) -> list[dict[str, object]] | None:
    """Rate limits as ``[{"limit": n, "per": unit}, …]``; ``None`` (inherit) stays ``null``."""
    return None if limits is None else [limit.as_json() for limit in limits]


def api_json(api: Api) -> dict[str, Any]:
    """The JSON object of an API: name, exposed, its limits and its key counts per kind."""
    return {
        "name": api.name,
        "exposed": api.exposed,
        "max_keys_per_kind": api.max_keys_per_kind,
        "rate_limits": rate_limits_json(api.rate_limits),
        "keys": {"internal": api.internal_keys, "external": api.external_keys},
    }


def key_json(key: KeyInfo) -> dict[str, Any]:
    """The JSON object of a key (R9's and SPEC §8's fields); for a just-issued key also its
    ``secret``.

    ``secret`` is present exactly when ``key`` is an ``IssuedKey``: a string for
    an internal key, ``null`` for an external one (which has no secret yet).
    """
    result: dict[str, Any] = {
        "client_id": key.client_id,
        "name": key.name,
        "kind": key.kind.value,
        "has_secret": key.has_secret,
        "created_at": rfc3339(key.created_at),
        "enabled": key.enabled,
        "expires_at": time_json(key.expires_at),
        "meta": thaw(key.meta),
        "last_used_at": time_json(key.last_used_at),
        "previous_secret_expires_at": time_json(key.previous_secret_expires_at),
        "rate_limits": rate_limits_json(key.rate_limits),
    }
    if isinstance(key, IssuedKey):
        result["secret"] = key.secret
    return result


def key_page_json(keys: Sequence[KeyInfo], next_cursor: str | None) -> dict[str, Any]:
    """A page of keys: ``{"keys": [key, …], "next": cursor or null}`` (SPEC §5); the next
    page is the listing again with ``after`` set to ``next``."""
    return {"keys": [key_json(key) for key in keys], "next": next_cursor}


def secret_json(secret: IssuedSecret) -> dict[str, Any]:
    """The answer to setting a secret: ``{"client_id", "secret", "previous_secret_expires_at"}``."""
    return {
        "client_id": secret.client_id,
        "secret": str(secret),
        "previous_secret_expires_at": time_json(secret.previous_secret_expires_at),
    }
