"""``KeyManager``: keyguard's rules (SPEC §3), in the one place every front door calls.

The middleware, the management API and the command line all go through a
``KeyManager``; none of them talks to a store directly. What must be atomic
across processes (R1-R3 at creation, R4 at secret change) is delegated to the
store's atomic operations; everything else is checked here.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from keyguard import metrics
from keyguard.audit import (
    DEFAULT_AUDIT_LIMIT,
    AuditEvent,
    AuditPage,
    check_actor,
    check_audit_query,
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
    rfc3339,
    utcnow,
    validate_api_name,
)
from keyguard.secrets import SecretHasher, new_secret
from keyguard.stores._paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from keyguard.stores.base import KeyStore
from keyguard.usage import MAX_USAGE_HOURS, hour_start, merge_hours

__all__ = [
    "DEFAULT_MAX_KEYS_PER_KIND",
    "MAX_KEYS_PER_KIND_LIMIT",
    "Denial",
    "KeyInfoPage",
    "KeyManager",
]

DEFAULT_MAX_KEYS_PER_KIND = 5
MAX_KEYS_PER_KIND_LIMIT = 1_000_000
_MAX_MEMO = 10_000
_API_LIMITS_TTL = 1.0  # seconds an uncached API's rate limits are remembered
DEFAULT_STORE_TIMEOUT = 3.0

logger = logging.getLogger("keyguard")


@dataclass(frozen=True)
class KeyInfoPage:
    """A page of an API's keys, oldest first, and the cursor of the next (``None``: no more)."""

    keys: list[KeyInfo]
    next: str | None


class Denial(enum.Enum):
    """Why ``KeyManager.authenticate`` refused a request (SPEC §4's rows, in check order)."""

    API_NOT_AVAILABLE = "api_not_available"
    """The API is unknown or not exposed."""
    CLIENT_ID_MISSING = "client_id_missing"
    """No client id was sent."""
    CLIENT_ID_NOT_REGISTERED = "client_id_not_registered"
    """No key of this API has this client id."""
    INVALID_SECRET = "invalid_secret"  # noqa: S105 - a reason, not a secret
    """The secret is missing or wrong, or a secret was sent for a key that has none."""
    DISABLED = "disabled"
    """The credentials match, but the key is disabled (SPEC §8)."""
    EXPIRED = "expired"
    """The credentials match, but the key's ``expires_at`` has passed (SPEC §8)."""


class KeyManager:
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
        self._verify_deadline = store_timeout(store)
        self._tags = IdTags(store)
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
        logger.info("api %s deleted (force=%s)", api, force)

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
        record = KeyRecord(
            api=api,
            client_id=await self._tags.new_client_id(api),
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

    async def delete_key(self, api: str, client_id: str, *, actor: str | None = None) -> None:
        """Delete the key; its next request fails (R7). ``KeyNotFound`` if there is none."""
        who = self._actor(actor)
        record = await self._get_record(api, client_id)
        event = self._event(who, "key.delete", api, client_id=client_id, name=record.name)
        if not await self.store.delete_key(api, client_id, audit=event):
            raise KeyNotFound(f"API {api!r} has no key {client_id!r}")
        logger.info("key %s of api %s deleted", client_id, api)

    async def find_key_by_name(self, api: str, name: str) -> KeyInfo:
        """The key of ``api`` whose name equals ``name`` casefolded; ``KeyNotFound`` if none."""
        wanted = normalize_name(name).casefold()
        async for key in self.iter_keys(api, name=name):
            if key.name.casefold() == wanted:
                return key
        raise KeyNotFound(f"API {api!r} has no key named {name.strip()!r}")

    # -- audit log ----------------------------------------------------------------------

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

    # -- requests -----------------------------------------------------------------------

    async def authenticate(
        self, api: str, client_id: str | None, secret: str | None
    ) -> KeyInfo | Denial:
        """Check one request's credentials for ``api`` (a valid API name), SPEC §4's order.

        Costs one store lookup. An id keyguard could never have issued — wrong
        length or alphabet, or a tag that does not verify for ``api``
        (:mod:`keyguard.idtags`) — is not looked up (the API's state still is: a
        404 comes before a 401). An
        unknown id costs no verification: its refusal already says it is
        unknown. The refusals that share a message cost the same: a wrong
        secret and a secret sent to a secretless key (checked against a dummy
        hash) are each one verification, and each is counted against the id
        (``SecretHasher.failed``), so that a flood of them waits behind other
        callers' verifications. A verification that cannot start within the
        store's timeout raises ``VerificationBusy`` (a ``StoreUnavailable``),
        as may the lookup itself.

        The three steps, for a caller that counts its awaits (the middleware):
        ``exposed, record = await lookup(api, client_id)``, then
        ``judge(client_id, secret, exposed, record)``, then, only where that
        answered ``None``, ``await verified(client_id, secret, record)``.
        """
        exposed, record = await self.lookup(api, client_id)
        result = self.judge(client_id, secret, exposed, record)
        if result is None:
            result = await self.verified(client_id, secret, record)
        return result

    def lookup(self, api: str, client_id: str | None) -> Awaitable[tuple[bool, KeyRecord | None]]:
        """The request's one store lookup: ``(exposed, record)``, the key looked up only
        when ``client_id`` could be one of ``api``'s (:mod:`keyguard.idtags`).

        Not a coroutine function: it hands back the store's own awaitable (no frame of
        its own) once the store's tag key has been read, and an id seen before costs no
        HMAC."""
        if client_id is None:
            return self.store.lookup(api, None)
        tags = self._tags
        plausible = tags.verified.get(client_id) == api or tags.plausible(api, client_id)
        if plausible is None:
            return self._lookup_reading_tag_key(api, client_id)
        return self.store.lookup(api, client_id if plausible else None)

    async def _lookup_reading_tag_key(
        self, api: str, client_id: str
    ) -> tuple[bool, KeyRecord | None]:
        plausible = await self._tags.worth_a_read(api, client_id)
        return await self.store.lookup(api, client_id if plausible else None)

    def judge(
        self,
        client_id: str | None,
        secret: str | None,
        exposed: bool,
        record: KeyRecord | None,
    ) -> KeyInfo | Denial | None:
        """SPEC §4's checks on ``lookup``'s answer, where they need no hashing: the key, or
        why not; ``None`` when the secret needs a verification (then await
        :meth:`verified`). A secret that verified before is checked by its SHA-256."""
        if not exposed:
            return Denial.API_NOT_AVAILABLE
        if client_id is None:
            return Denial.CLIENT_ID_MISSING
        if record is None:
            return Denial.CLIENT_ID_NOT_REGISTERED
        stored_hash = record.secret_hash
        if stored_hash is None:
            if secret is not None:
                return None  # a secret to a secretless key: one (dummy) verification
        elif secret is None:
            return Denial.INVALID_SECRET
        elif not self.hasher.remembered(client_id, secret, stored_hash):
            return None
        # _standing(record), inline: this is every admitted request.
        if not record.enabled:
            return Denial.DISABLED
        if record.expires_at is not None and record.expires_at <= utcnow():
            return Denial.EXPIRED
        memo = self._infos.get(client_id)
        if memo is not None and memo[0] is record:
            return memo[1]
        return self._info(record)

    async def verified(
        self, client_id: str | None, secret: str | None, record: KeyRecord | None
    ) -> KeyInfo | Denial:
        """:meth:`judge`'s answer where it needed a verification of ``secret`` (against the
        key's hash, its previous secret's in a grace period, or a dummy hash for a key
        without a secret); a failure is counted against the id."""
        if client_id is None or secret is None or record is None:
            raise ValueError("verified() follows a judge() that answered None")
        stored_hash = record.secret_hash
        deadline = self._verify_deadline
        if stored_hash is None:
            await self.hasher.verify(client_id, secret, None, deadline=deadline)
            self.hasher.failed(client_id)
            return Denial.INVALID_SECRET
        if not (
            await self.hasher.verify(client_id, secret, stored_hash, deadline=deadline)
            or await self._verify_previous(record, client_id, secret)
        ):
            self.hasher.failed(client_id)
            return Denial.INVALID_SECRET
        return self._standing(record)

    def _standing(self, record: KeyRecord) -> KeyInfo | Denial:
        """The key's info if it is enabled and not expired, else why not (SPEC §8)."""
        if not record.enabled:
            return Denial.DISABLED
        if record.expires_at is not None and record.expires_at <= utcnow():
            return Denial.EXPIRED
        return self._info(record)

    async def _verify_previous(self, record: KeyRecord, client_id: str, secret: str) -> bool:
        """Whether ``secret`` is the key's previous secret, inside its grace period now."""
        if record.previous_secret_hash is None:
            return False
        previous = record.previous_hash(utcnow())
        if previous is None:
            return False
        return self.hasher.remembered(client_id, secret, previous) or await self.hasher.verify(
            client_id, secret, previous, deadline=self._verify_deadline
        )

    def _remembered_api_limits(self, api: str) -> tuple[RateLimit, ...] | None:
        memo = self._api_limits.get(api)
        if memo is not None and memo[0] > time.monotonic():
            return memo[1]
        return None

    def known_rate_limits(self, api: str, key: KeyInfo) -> tuple[RateLimit, ...] | None:
        """:meth:`rate_limits_for` where it needs no store read, else ``None`` (then await
        ``rate_limits_for``): the request path's common case, without an ``await``."""
        if key.rate_limits is not None:
            return key.rate_limits
        cached = self._cached_rate_limits
        if cached is not None:
            limits = cached(api)
            if limits is not None:
                return limits
        return self._remembered_api_limits(api)

    async def rate_limits_for(self, api: str, key: KeyInfo) -> tuple[RateLimit, ...]:
        """The rate limits that apply to ``key`` of ``api`` (SPEC §9): its own, else the
        API's. Read from the cache's snapshot ``authenticate`` just used where there is
        one (or from a memory store itself); otherwise from the API, remembered for a
        second (one read per API per second at most)."""
        known = self.known_rate_limits(api, key)
        if known is not None:
            return known
        now = time.monotonic()
        found = await self.store.get_api(api)
        limits = () if found is None else found.rate_limits
        if len(self._api_limits) >= _MAX_MEMO:
            self._api_limits.clear()
        self._api_limits[api] = (now + _API_LIMITS_TTL, limits)
        return limits

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
        seconds of traffic may be missing. ``ApiNotFound`` / ``KeyNotFound`` for an
        unknown API or key.

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
        await self.get_api(api)
        following: str | None = None
        keys: list[KeyRecord] | list[KeyInfo]
        if client_id is not None:
            keys = [await self._get_record(api, client_id)]
        elif paged:
            page = await self.page_keys(
                api, limit=DEFAULT_PAGE_SIZE if limit is None else limit, after=after, name=name
            )
            keys, following = page.keys, page.next
        else:
            keys = [key async for key in self.iter_keys(api)]
        first = hour_start(utcnow()) - timedelta(hours=hours - 1)
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
            if slot is not None and row.hour >= first:
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

    def _info(self, record: KeyRecord) -> KeyInfo:
        """``record.info()``, reusing the last one made for the same record object."""
        memo = self._infos.get(record.client_id)
        if memo is not None and memo[0] is record:
            return memo[1]
        info = record.info()
        if len(self._infos) >= _MAX_MEMO:
            self._infos.pop(next(iter(self._infos)), None)
        self._infos[record.client_id] = (record, info)
        return info

    async def _get_record(self, api: str, client_id: str) -> KeyRecord:
        validate_api_name(api)
        record = await self.store.get_key(api, client_id) if isinstance(client_id, str) else None
        if record is None:
            raise KeyNotFound(f"API {api!r} has no key {client_id!r}")
        return record


def store_timeout(store: object) -> float:
    """The ``timeout`` of ``store`` (or of the store a cache wraps); 3 s if it has none."""
    for candidate in (store, getattr(store, "store", None)):
        value = getattr(candidate, "timeout", None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return DEFAULT_STORE_TIMEOUT


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
