"""The request path's checks (SPEC §4's order, §8's key states, §9's rate limits), the
part of ``KeyManager`` the middleware calls on every request: kept apart from the rules of
changes so that it reads top to bottom, and counts its awaits."""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable

from keyguard.idtags import IdTags
from keyguard.models import (
    KeyInfo,
    KeyRecord,
    RateLimit,
    utcnow,
)
from keyguard.secrets import SecretHasher
from keyguard.stores.base import KeyStore, LookupNow

__all__ = ["DEFAULT_STORE_TIMEOUT", "Denial", "RequestChecks", "store_timeout"]

_MAX_MEMO = 10_000
_API_LIMITS_TTL = 1.0  # seconds an uncached API's rate limits are remembered
DEFAULT_STORE_TIMEOUT = 3.0


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


class RequestChecks:
    """``KeyManager``'s request path: see :meth:`authenticate`."""

    store: KeyStore
    hasher: SecretHasher
    _infos: dict[str, tuple[KeyRecord, KeyInfo]]
    _api_limits: dict[str, tuple[float, tuple[RateLimit, ...]]]
    _cached_rate_limits: Callable[[str], tuple[RateLimit, ...] | None] | None
    _store_lookup_now: LookupNow | None
    lookup_now: LookupNow | None
    _verify_deadline: float
    _tags: IdTags

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
        ``exposed, record = await lookup(api, client_id)`` (or, without an await where
        the store allows, ``exposed, record, _ = lookup_now(api, client_id)`` when that
        is not ``None`` and answers so), then
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
        self._note_tag_key()
        return await self.store.lookup(api, client_id if plausible else None)

    def _note_tag_key(self) -> None:
        """Once the store's tag key has been read, ``lookup_now`` may look an id up before
        its tag is checked (by :meth:`judge`, without a read)."""
        if self._tags.ready:
            self.lookup_now = self._store_lookup_now

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
        memo = self._infos.get(client_id)
        if memo is None or memo[0] is not record:
            memo = None
            # Not this very record admitted before (whose tag verified then): an id
            # keyguard never issued for this API, found by a lookup_now (which, in memory,
            # looks up first; lookup checks first, and never finds one), is not registered.
            tags = self._tags
            if (
                tags.verified.get(client_id) != record.api
                and tags.plausible(record.api, client_id) is False
            ):
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
        if memo is None or memo[1].previous_secret_expires_at is not None:
            return self._info(record)  # (a grace period shown is checked there: it may be over)
        return memo[1]

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

    def _info(self, record: KeyRecord) -> KeyInfo:
        """``record.info()``, reusing the last one made for the same record object."""
        memo = self._infos.get(record.client_id)
        if memo is not None and memo[0] is record and _grace_shown_right(memo[1]):
            return memo[1]
        info = record.info(utcnow())
        if len(self._infos) >= _MAX_MEMO:
            self._infos.pop(next(iter(self._infos)), None)
        self._infos[record.client_id] = (record, info)
        return info


def _grace_shown_right(info: KeyInfo) -> bool:
    """Whether ``info``, made earlier from an unchanged record, still shows its grace period
    as it is: one that has ended since must show as none (``KeyRecord.info``)."""
    until = info.previous_secret_expires_at
    return until is None or until > utcnow()


def store_timeout(store: object) -> float:
    """The ``timeout`` of ``store`` (or of the store a cache wraps); 3 s if it has none."""
    for candidate in (store, getattr(store, "store", None)):
        value = getattr(candidate, "timeout", None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return DEFAULT_STORE_TIMEOUT
