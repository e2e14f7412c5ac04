"""``KeyManager`` itself: the rules of every change (SPEC §3, §8, §9's limits, §10's
audit events), on top of its reads (``_reads``) and the request path's checks
(``_requests``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from keyguard import metrics
from keyguard.audit import (
    AuditEvent,
    check_actor,
    json_value,
    key_fields,
    new_event,
)
from keyguard.errors import (
    ApiNotFound,
    InvalidRequest,
    KeyImmutable,
    KeyNotFound,
)
from keyguard.idtags import IdTags
from keyguard.manager._reads import Reads
from keyguard.manager._requests import RequestChecks, store_timeout
from keyguard.models import (
    UNCHANGED,
    Api,
    IssuedKey,
    IssuedSecret,
    KeyChanges,
    KeyInfo,
    KeyKind,
    KeyRecord,
    RateLimit,
    Unchanged,
    normalize_name,
    parse_grace,
    parse_meta,
    parse_rate_limits,
    parse_time,
    utcnow,
    validate_api_name,
)
from keyguard.secrets import SecretHasher, new_secret
from keyguard.stores.base import KeyStore, lookup_now_of

__all__ = ["DEFAULT_MAX_KEYS_PER_KIND", "MAX_KEYS_PER_KIND_LIMIT", "KeyManager"]

DEFAULT_MAX_KEYS_PER_KIND = 5
MAX_KEYS_PER_KIND_LIMIT = 1_000_000

logger = logging.getLogger("keyguard")


class KeyManager(Reads, RequestChecks):
    """Manage APIs and keys, and check credentials, over one ``KeyStore``.

    ``max_keys_per_kind`` is the limit given to APIs this manager creates (0 to
    ``MAX_KEYS_PER_KIND_LIMIT``, 1,000,000; default 5); an existing API keeps the limit
    stored with it, so every front door over
    one store enforces the same one. ``hasher`` chooses how secrets are
    hashed and checked (see :class:`keyguard.secrets.SecretHasher`).
    ``actor`` names who makes the changes in the audit log (SPEC §10) unless
    a call names another with its own ``actor=``.
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        max_keys_per_kind: int = DEFAULT_MAX_KEYS_PER_KIND,
        hasher: SecretHasher | None = None,
        actor: str = "python",
    ) -> None:
        # Every call timed into keyguard.store.duration where metrics are on; else ``store``.
        self.store = metrics.timed_store(store)
        self.actor = check_actor(actor)
        self.max_keys_per_kind = _validate_limit(max_keys_per_kind)
        self.hasher = SecretHasher() if hasher is None else hasher
        self._infos: dict[str, tuple[KeyRecord, KeyInfo]] = {}
        self._api_limits: dict[str, tuple[float, tuple[RateLimit, ...]]] = {}
        # A cache's fresh snapshot answers an API's rate limits without a round trip.
        self._cached_rate_limits: Callable[[str], tuple[RateLimit, ...] | None] | None = getattr(
            store, "cached_rate_limits", None
        )
        # The store's lookup without a coroutine (a memory store, a cache's hits), unless
        # the lookups go through something else (timed: keyguard.metrics).
        now = lookup_now_of(store)
        self._store_lookup_now = (
            now if now is not None and self.store.lookup == store.lookup else None
        )
        self._verify_deadline = store_timeout(store)
        self._tags = IdTags(store)
        self.lookup_now = self._store_lookup_now if self._tags.ready else None
        """The store's ``lookup_now`` (``keyguard.stores.base.LookupNow``: ``lookup``'s
        answer and the API's rate limits where the store has them in memory, else
        ``None``), or ``None`` for a store without one and until the store's tag key has
        been read (by a first ``lookup``). It looks the id up before its tag is checked,
        which :meth:`judge` does then: the request path's common case, one call."""
        self.api_rate_limits_now: Callable[[str], tuple[RateLimit, ...] | None] = (
            self._cached_rate_limits or self._remembered_api_limits
        )
        """``api``'s own rate limits where no store read is needed, else ``None`` (then
        await :meth:`rate_limits_for`): the store's own reader where it has one (a cache,
        a memory store), else what was read in the last second. For the request path."""

    def __repr__(self) -> str:
        return f"KeyManager({self.store!r}, max_keys_per_kind={self.max_keys_per_kind})"

    # -- APIs ---------------------------------------------------------------------------

    async def expose(
        self, api: str, *, max_keys_per_kind: int | None = None, actor: str | None = None
    ) -> Api:
        """Expose ``api`` (creating it if needed) so keys can be issued and used (R1, R8)."""
        return await self.update_api(
            api, exposed=True, max_keys_per_kind=max_keys_per_kind, actor=actor
        )

    async def set_rate_limits(
        self, api: str, rate_limits: object, *, actor: str | None = None
    ) -> Api:
        """Replace ``api``'s rate limits (SPEC §9; ``[]`` for none). ``ApiNotFound`` if it
        was never created: a typo must not make an API."""
        await self.get_api(api)
        return await self.update_api(api, rate_limits=rate_limits, actor=actor)

    async def unexpose(self, api: str, *, actor: str | None = None) -> Api:
        """Stop ``api``'s keys from working, keeping them (R8).

        ``ApiNotFound`` for an API never created: a typo must not make an API.
        """
        await self.get_api(api)
        return await self.update_api(api, exposed=False, actor=actor)

    async def update_api(
        self,
        api: str,
        *,
        exposed: bool | None = None,
        max_keys_per_kind: int | None = None,
        rate_limits: object = None,
        actor: str | None = None,
    ) -> Api:
        """Create ``api`` if needed and set whichever of the fields is given.

        With none given, an existing API is returned as it is, and nothing is recorded
        in the audit log; a new one is created (an ``api.update`` event with no changes).
        Lowering ``max_keys_per_kind`` below the current count deletes nothing;
        it only blocks new keys until the count is below the limit.
        ``rate_limits`` (up to four ``{"limit", "per"}``, ``RateLimit`` or
        ``"100/minute"``; ``[]`` for none) apply to each key without its own.
        """
        validate_api_name(api)
        if exposed is not None and not isinstance(exposed, bool):
            raise InvalidRequest("exposed must be true or false")
        limit = None if max_keys_per_kind is None else _validate_limit(max_keys_per_kind)
        limits = None if rate_limits is None else parse_rate_limits(rate_limits)
        given = {"exposed": exposed, "max_keys_per_kind": limit, "rate_limits": limits}
        if all(value is None for value in given.values()):
            # Nothing to set (``PUT /apis/{api}`` with ``{}``): an API that exists is left
            # as it is, and the audit log records no change that was not made.
            self._actor(actor)
            existing = await self.store.get_api(api)
            if existing is not None:
                return existing
        action = {True: "api.expose", False: "api.unexpose", None: "api.update"}[exposed]
        event = self._event(
            actor,
            action,
            api,
            changes={name: json_value(value) for name, value in given.items() if value is not None},
        )
        result = await self.store.upsert_api(
            api,
            exposed=exposed,
            max_keys_per_kind=limit,
            default_max_keys_per_kind=self.max_keys_per_kind,
            rate_limits=limits,
            audit=event,
        )
        # The request path's memo of the API's limits is this process's old news now.
        self._api_limits.pop(api, None)
        logger.info(
            "api %s updated: exposed=%s max_keys_per_kind=%s rate_limits=%s",
            api,
            result.exposed,
            result.max_keys_per_kind,
            ",".join(map(str, result.rate_limits)) or "none",
        )
        return result

    async def delete_api(self, api: str, *, force: bool = False, actor: str | None = None) -> None:
        """Delete ``api``; ``ApiNotFound`` if it was never created.

        An API that has keys raises ``ApiHasKeys`` unless ``force``, which
        deletes its keys with it (their next request fails, R7).
        """
        validate_api_name(api)
        if not isinstance(force, bool):
            raise InvalidRequest("force must be true or false")
        event = self._event(actor, "api.delete", api)
        if not await self.store.delete_api(api, force=force, audit=event):
            raise ApiNotFound(f"API {api!r} does not exist")
        self._api_limits.pop(api, None)
        logger.info("api %s deleted (force=%s)", api, force)

    # -- keys ---------------------------------------------------------------------------

    async def create_key(
        self,
        api: str,
        *,
        name: str,
        kind: KeyKind | str,
        expires_at: datetime | str | None = None,
        enabled: bool = True,
        meta: Mapping[str, Any] | None = None,
        rate_limits: object = None,
        actor: str | None = None,
    ) -> IssuedKey:
        """Issue a new key named ``name`` (R1-R3, R5, R6), with the lifecycle fields of
        SPEC §8: ``expires_at`` (an aware time or RFC 3339 text; in the past is allowed),
        ``enabled``, ``meta`` (a JSON object of at most 4 KB) and ``rate_limits``
        (``None``: the API's).

        An internal key gets its secret now; this is the only time it is shown.
        An external key has no secret until ``set_secret``.
        """
        validate_api_name(api)
        clean_name = normalize_name(name)
        key_kind = KeyKind.parse(kind)
        expiry = parse_time(expires_at)
        frozen_meta = parse_meta(meta)
        limits = None if rate_limits is None else parse_rate_limits(rate_limits)
        secret = new_secret() if key_kind is KeyKind.INTERNAL else None
        client_id = await self._tags.new_client_id(api)
        self._note_tag_key()
        record = KeyRecord(
            api=api,
            client_id=client_id,
            name=clean_name,
            kind=key_kind,
            secret_hash=None if secret is None else await self.hasher.ahash(secret),
            created_at=utcnow(),
            enabled=_check_bool(enabled, "enabled"),
            expires_at=expiry,
            meta=frozen_meta,
            rate_limits=limits,
        )
        event = self._event(
            actor,
            "key.create",
            api,
            client_id=record.client_id,
            name=record.name,
            changes=key_fields(record),
        )
        await self.store.insert_key(record, audit=event)
        logger.info("key %s (%s) created for api %s", record.client_id, key_kind.value, api)
        info = record.info()
        return IssuedKey(
            **{name: getattr(info, name) for name in _INFO_FIELDS},
            secret=secret,
        )

    async def update_key(
        self,
        api: str,
        client_id: str,
        *,
        name: str | Unchanged = UNCHANGED,
        enabled: bool | Unchanged = UNCHANGED,
        expires_at: datetime | str | Unchanged | None = UNCHANGED,
        meta: Mapping[str, Any] | Unchanged | None = UNCHANGED,
        rate_limits: object = UNCHANGED,
        actor: str | None = None,
    ) -> KeyInfo:
        """Change only the given fields of a key of either kind (R11) and return it.

        ``name`` is checked like a new one (R3, ``DuplicateName`` atomically in
        the store); ``expires_at=None`` clears the expiry; ``meta`` replaces the
        whole object (``None`` or ``{}`` empties it); ``rate_limits=None``
        inherits the API's, ``[]`` is unlimited. A disabled or expired key
        admits nothing from the next request on (R10, within the cache bound
        elsewhere). ``KeyNotFound`` if there is no such key.
        """
        validate_api_name(api)
        changes = KeyChanges(
            name=UNCHANGED if name is UNCHANGED else normalize_name(name),
            enabled=UNCHANGED if enabled is UNCHANGED else _check_bool(enabled, "enabled"),
            expires_at=UNCHANGED if expires_at is UNCHANGED else parse_time(expires_at),
            meta=UNCHANGED if meta is UNCHANGED else parse_meta(meta),
            rate_limits=(
                UNCHANGED
                if rate_limits is UNCHANGED
                else None
                if rate_limits is None
                else parse_rate_limits(rate_limits)
            ),
        )
        given = changes.given()
        event: AuditEvent | None = None
        if given:
            # Read first: the event names the key as it was (a rename's new name is a change).
            current = await self._get_record(api, client_id)
            event = self._event(
                actor,
                "key.update",
                api,
                client_id=client_id,
                name=current.name,
                changes={field: json_value(value) for field, value in given.items()},
            )
        else:
            self._actor(actor)
        updated = (
            await self.store.update_key(api, client_id, changes, audit=event)
            if isinstance(client_id, str)
            else None
        )
        if updated is None:
            raise KeyNotFound(f"API {api!r} has no key {client_id!r}")
        logger.info(
            "key %s of api %s updated: %s", client_id, api, ", ".join(changes.given()) or "nothing"
        )
        return updated.info(utcnow())

    async def set_secret(
        self,
        api: str,
        client_id: str,
        *,
        grace: float | timedelta | str = 0,
        actor: str | None = None,
    ) -> IssuedSecret:
        """Generate a secret for the external key ``client_id``, replacing any previous one.

        Returns the secret (an :class:`~keyguard.models.IssuedSecret`, a ``str``);
        it is never shown again. With ``grace`` (seconds, a ``timedelta`` or
        ``"12h"``; at most 30 days) the secret being replaced keeps verifying
        until ``previous_secret_expires_at``; only one previous secret is kept.
        Internal keys are immutable (R4, ``KeyImmutable``).
        """
        period = parse_grace(grace)
        record = await self._get_record(api, client_id)
        if record.kind is KeyKind.INTERNAL:
            raise KeyImmutable("internal keys are immutable: their secret cannot be changed")
        secret = new_secret()
        until = utcnow() + period if period and record.secret_hash is not None else None
        # Never the secret or its hash: only when the previous one stops working.
        event = self._event(
            actor,
            "key.secret",
            api,
            client_id=client_id,
            name=record.name,
            changes={"previous_secret_expires_at": json_value(until)},
        )
        updated = await self.store.set_secret_hash(
            api, client_id, await self.hasher.ahash(secret), previous_until=until, audit=event
        )
        if updated is None:
            # Deleted between the read and the write.
            raise KeyNotFound(f"API {api!r} has no key {client_id!r}")
        logger.info(
            "secret set for key %s of api %s (previous secret valid until %s)",
            client_id,
            api,
            "now"
            if updated.previous_secret_expires_at is None
            else updated.previous_secret_expires_at,
        )
        return IssuedSecret(
            secret,
            client_id=client_id,
            previous_secret_expires_at=updated.previous_secret_expires_at,
        )

    async def delete_key(self, api: str, client_id: str, *, actor: str | None = None) -> None:
        """Delete the key; its next request fails (R7). ``KeyNotFound`` if there is none."""
        who = self._actor(actor)
        record = await self._get_record(api, client_id)
        event = self._event(who, "key.delete", api, client_id=client_id, name=record.name)
        if not await self.store.delete_key(api, client_id, audit=event):
            raise KeyNotFound(f"API {api!r} has no key {client_id!r}")
        logger.info("key %s of api %s deleted", client_id, api)

    # -- audit log ----------------------------------------------------------------------

    def _actor(self, actor: str | None) -> str:
        return self.actor if actor is None else check_actor(actor)

    def _event(
        self,
        actor: str | None,
        action: str,
        api: str,
        *,
        client_id: str | None = None,
        name: str | None = None,
        changes: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        return new_event(
            actor=self._actor(actor),
            action=action,
            api=api,
            client_id=client_id,
            name=name,
            changes=changes,
        )


_INFO_FIELDS = tuple(KeyInfo.__dataclass_fields__)


def _check_bool(value: object, field_name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"{field_name} must be true or false")
    return value


def _validate_limit(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest("max_keys_per_kind must be a whole number")
    if not 0 <= value <= MAX_KEYS_PER_KIND_LIMIT:
        raise InvalidRequest(f"max_keys_per_kind must be between 0 and {MAX_KEYS_PER_KIND_LIMIT}")
    return value
