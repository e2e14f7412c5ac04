"""Constants and the record encoding every Redis store shares: fields, micros, JSON."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from keyguard.errors import (
    ConfigurationError,
)
from keyguard.models import (
    Api,
    KeyKind,
    KeyRecord,
    dump_meta,
    dump_rate_limits,
    load_meta,
    load_rate_limits,
)

try:
    from redis.asyncio import Redis, RedisCluster
    from redis.asyncio.connection import SSLConnection
    from redis.exceptions import RedisClusterException, RedisError
except ImportError as exc:  # pragma: no cover - exercised by a test that hides redis
    raise ConfigurationError("redis:// needs: pip install 'keyguard[redis]'") from exc


T = TypeVar("T")
# The redis-py client a store runs on: a standalone Redis, or a Cluster (redis_cluster.py).
ClientT = TypeVar("ClientT", bound="Redis | RedisCluster")

DEFAULT_PREFIX = "keyguard:"
DEFAULT_TIMEOUT = 3.0
DEFAULT_MAX_CONNECTIONS = 100

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
# What a failing Redis or network can raise; each becomes StoreUnavailable.  The
# built-in TimeoutError is the overall deadline (anyio.fail_after) running out.
_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError, asyncio.TimeoutError)
_TRUE = (b"1", "1")


_API_FIELDS = ["exposed", "max", "c:internal", "c:external", "rate_limits"]


def _api(name: str, row: list[Any]) -> Api | None:
    exposed, limit, internal, external, rate_limits = row
    if exposed is None:
        return None
    return Api(
        name=name,
        exposed=exposed in _TRUE,
        max_keys_per_kind=int(limit),
        internal_keys=int(internal or 0),
        external_keys=int(external or 0),
        # An API written before rate limits existed has none.
        rate_limits=load_rate_limits(None if rate_limits is None else _text(rate_limits)) or (),
    )


# A key record ``k:<client_id>`` is the JSON array
#   [seq, kind, name, casefolded name, created_at,                 <- the first layout
#    enabled, expires_at, meta, last_used_at, rate_limits]         <- appended (issue 14)
# with times in whole µs since the epoch (or null), meta as dump_meta's text and
# rate_limits as dump_rate_limits' text (null: the API's).  A record of the first layout
# has only the first five: the rest read as their defaults, so old records need no
# rewrite.  The secret hash is ``s:<client_id>``; the previous secret of a roll is
# ``p:<client_id>``, the JSON array [valid until in µs, hash], written by the roll script.
# ``u:<client_id>`` is the key's last use in µs, raised by the usage writes (a field of
# its own, so a flush never rewrites records); last_used_at is the later of it and the
# record's own.
_RECORD_LENGTH = 10
_AUDIT_ID_LENGTH = 26
_APPENDED_DEFAULTS: tuple[Any, ...] = (True, None, None, None, None)


def _key_fields(client_id: str) -> list[str]:
    """The hash fields of one key: its record, its secret hash, its previous secret, and
    its last use as the usage writes keep it."""
    return [f"k:{client_id}", f"s:{client_id}", f"p:{client_id}", f"u:{client_id}"]


def _body(record: KeyRecord, folded: str) -> list[Any]:
    """The record's array without its seq."""
    return [
        record.kind.value,
        record.name,
        folded,
        _micros(record.created_at),
        record.enabled,
        _optional_micros(record.expires_at),
        dump_meta(record.meta),
        _optional_micros(record.last_used_at),
        dump_rate_limits(record.rate_limits),
    ]


def _dump_previous(record: KeyRecord) -> str:
    """The ``p:`` field of ``record`` ('' when it has no previous secret)."""
    if record.previous_secret_hash is None and record.previous_secret_expires_at is None:
        return ""
    return _dumps(
        [_optional_micros(record.previous_secret_expires_at), record.previous_secret_hash]
    )


def _record(
    api: str,
    client_id: str,
    raw: bytes | str,
    secret_hash: bytes | str | None,
    previous: bytes | str | None = None,
    used: bytes | str | None = None,
) -> KeyRecord:
    return _decoded(api, client_id, json.loads(raw), secret_hash, previous, used)


def _decoded(
    api: str,
    client_id: str,
    stored: list[Any],
    secret_hash: bytes | str | None,
    previous: bytes | str | None,
    used: bytes | str | None,
) -> KeyRecord:
    """The key from its decoded record array and its ``s:``, ``p:`` and ``u:`` fields."""
    _seq, kind, name, _folded, created = stored[:5]
    appended = stored[5:_RECORD_LENGTH]
    enabled, expires, meta, last_used, limits = (
        *appended,
        *_APPENDED_DEFAULTS[len(appended) :],
    )
    previous_until, previous_hash = (None, None) if previous is None else json.loads(previous)
    return KeyRecord(
        api=api,
        client_id=client_id,
        name=name,
        kind=KeyKind(kind),
        secret_hash=None if secret_hash is None else _text(secret_hash),
        created_at=_EPOCH + created * _MICROSECOND,
        enabled=bool(enabled),
        expires_at=_from_micros(expires),
        meta=load_meta(meta),
        previous_secret_hash=previous_hash,
        previous_secret_expires_at=_from_micros(previous_until),
        # The record's own (as written at creation) or the usage writes', the later.
        last_used_at=_from_micros(last_used if used is None else max(int(used), last_used or 0)),
        rate_limits=load_rate_limits(limits),
    )


def _stored_keys(api: str, fields: Mapping[str, Any]) -> Iterator[tuple[list[Any], KeyRecord]]:
    """Every key of ``api`` from its hash's fields (as ``HGETALL`` reads them), in no
    particular order: its stored layout (``[seq, …, created micros, …]``) and its record."""
    for name, value in fields.items():
        if name.startswith("k:"):
            client_id = name[2:]
            stored = json.loads(value)
            yield (
                stored,
                _decoded(
                    api,
                    client_id,
                    stored,
                    fields.get(f"s:{client_id}"),
                    fields.get(f"p:{client_id}"),
                    fields.get(f"u:{client_id}"),
                ),
            )


def _records_of(api: str, fields: Mapping[str, Any]) -> list[KeyRecord]:
    """Every key of ``api`` from its hash's fields, in no particular order."""
    return [record for _, record in _stored_keys(api, fields)]


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _notice(api: str, client_id: str) -> str:
    """The change-feed message for one key of ``api``."""
    return f"{api}\n{client_id}"


def _micros(moment: datetime) -> int:
    """``moment`` as whole microseconds since the epoch (naive means UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - _EPOCH) // _MICROSECOND


def _optional_micros(moment: datetime | None) -> int | None:
    return None if moment is None else _micros(moment)


def _from_micros(micros: int | None) -> datetime | None:
    return None if micros is None else _EPOCH + micros * _MICROSECOND


def _text(value: bytes | str) -> str:
    """A reply as text, whether or not the client decodes responses itself."""
    return value.decode() if isinstance(value, bytes) else value


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _check_timeout(timeout: object) -> None:
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ConfigurationError(f"timeout must be a positive number of seconds, got {timeout!r}")


def _location(client: Redis) -> str:
    """Where ``client`` connects, as a URL without credentials (for repr and errors)."""
    pool = getattr(client, "connection_pool", None)
    if pool is None:  # not a plain client (a cluster client, say): say no more than that
        return type(client).__name__
    kwargs: Mapping[str, Any] = pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    scheme = "rediss" if issubclass(pool.connection_class, SSLConnection) else "redis"
    host = kwargs.get("host", "localhost")
    return f"{scheme}://{host}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
