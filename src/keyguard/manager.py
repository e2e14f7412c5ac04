"""``KeyManager``: keyguard's rules (SPEC §3), in the one place every front door calls.

The middleware, the management API and the command line all go through a
``KeyManager``; none of them talks to a store directly. What must be atomic
across processes (R1-R3 at creation, R4 at secret change) is delegated to the
store's atomic operations; everything else is checked here.
"""

from __future__ import annotations

import enum
import logging

from keyguard.errors import (
    ApiNotFound,
    InvalidRequest,
    KeyImmutable,
    KeyNotFound,
)
from keyguard.models import (
    Api,
    IssuedKey,
    KeyInfo,
    KeyKind,
    KeyRecord,
    normalize_name,
    utcnow,
    validate_api_name,
)
from keyguard.secrets import SecretHasher, could_be_client_id, new_client_id, new_secret
from keyguard.stores.base import KeyStore

__all__ = ["DEFAULT_MAX_KEYS_PER_KIND", "MAX_KEYS_PER_KIND_LIMIT", "Denial", "KeyManager"]

DEFAULT_MAX_KEYS_PER_KIND = 5
MAX_KEYS_PER_KIND_LIMIT = 1000
_MAX_MEMO = 10_000
DEFAULT_STORE_TIMEOUT = 3.0

logger = logging.getLogger("keyguard")


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


class KeyManager:
    """Manage APIs and keys, and check credentials, over one ``KeyStore``.

    ``max_keys_per_kind`` is the limit given to APIs this manager creates; an
    existing API keeps the limit stored with it, so every front door over
    one store enforces the same one. ``hasher`` chooses how secrets are
    hashed and checked (see :class:`keyguard.secrets.SecretHasher`).
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        max_keys_per_kind: int = DEFAULT_MAX_KEYS_PER_KIND,
        hasher: SecretHasher | None = None,
    ) -> None:
        self.store = store
        self.max_keys_per_kind = _validate_limit(max_keys_per_kind)
        self.hasher = SecretHasher() if hasher is None else hasher
        self._infos: dict[str, tuple[KeyRecord, KeyInfo]] = {}
        self._verify_deadline = store_timeout(store)

    def __repr__(self) -> str:
        return f"KeyManager({self.store!r}, max_keys_per_kind={self.max_keys_per_kind})"

    # -- APIs ---------------------------------------------------------------------------

    async def expose(self, api: str, *, max_keys_per_kind: int | None = None) -> Api:
        """Expose ``api`` (creating it if needed) so keys can be issued and used (R1, R8)."""
        return await self.update_api(api, exposed=True, max_keys_per_kind=max_keys_per_kind)

    async def unexpose(self, api: str) -> Api:
        """Stop ``api``'s keys from working, keeping them (R8).

        ``ApiNotFound`` for an API never created: a typo must not make an API.
        """
        await self.get_api(api)
        return await self.update_api(api, exposed=False)

    async def update_api(
        self, api: str, *, exposed: bool | None = None, max_keys_per_kind: int | None = None
    ) -> Api:
        """Create ``api`` if needed and set whichever of the fields is given.

        Lowering ``max_keys_per_kind`` below the current count deletes nothing;
        it only blocks new keys until the count is below the limit.
        """
        validate_api_name(api)
        if exposed is not None and not isinstance(exposed, bool):
            raise InvalidRequest("exposed must be true or false")
        limit = None if max_keys_per_kind is None else _validate_limit(max_keys_per_kind)
        result = await self.store.upsert_api(
            api,
            exposed=exposed,
            max_keys_per_kind=limit,
            default_max_keys_per_kind=self.max_keys_per_kind,
        )
        logger.info(
            "api %s updated: exposed=%s max_keys_per_kind=%s",
            api,
            result.exposed,
            result.max_keys_per_kind,
        )
        return result

    async def delete_api(self, api: str, *, force: bool = False) -> None:
        """Delete ``api``; ``ApiNotFound`` if it was never created.

        An API that has keys raises ``ApiHasKeys`` unless ``force``, which
        deletes its keys with it (their next request fails, R7).
        """
        validate_api_name(api)
        if not isinstance(force, bool):
            raise InvalidRequest("force must be true or false")
        if not await self.store.delete_api(api, force=force):
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

    async def create_key(self, api: str, *, name: str, kind: KeyKind | str) -> IssuedKey:
        """Issue a new key named ``name`` (R1-R3, R5, R6).

        An internal key gets its secret now; this is the only time it is shown.
        An external key has no secret until ``set_secret``.
        """
        validate_api_name(api)
        clean_name = normalize_name(name)
        key_kind = KeyKind.parse(kind)
        secret = new_secret() if key_kind is KeyKind.INTERNAL else None
        record = KeyRecord(
            api=api,
            client_id=new_client_id(),
            name=clean_name,
            kind=key_kind,
            secret_hash=None if secret is None else await self.hasher.ahash(secret),
            created_at=utcnow(),
        )
        await self.store.insert_key(record)
        logger.info("key %s (%s) created for api %s", record.client_id, key_kind.value, api)
        info = record.info()
        return IssuedKey(
            api=info.api,
            client_id=info.client_id,
            name=info.name,
            kind=info.kind,
            has_secret=info.has_secret,
            created_at=info.created_at,
            secret=secret,
        )

    async def set_secret(self, api: str, client_id: str) -> str:
        """Generate a secret for the external key ``client_id``, replacing any previous one.

        Returns the secret; it is never shown again. Internal keys are
        immutable (R4, ``KeyImmutable``).
        """
        record = await self._get_record(api, client_id)
        if record.kind is KeyKind.INTERNAL:
            raise KeyImmutable("internal keys are immutable: their secret cannot be changed")
        secret = new_secret()
        if not await self.store.set_secret_hash(api, client_id, await self.hasher.ahash(secret)):
            # Deleted between the read and the write.
            raise KeyNotFound(f"API {api!r} has no key {client_id!r}")
        logger.info("secret set for key %s of api %s", client_id, api)
        return secret

    async def get_key(self, api: str, client_id: str) -> KeyInfo:
        """The key ``client_id`` of ``api``; ``KeyNotFound`` if there is none."""
        return (await self._get_record(api, client_id)).info()

    async def list_keys(self, api: str) -> list[KeyInfo]:
        """The keys of ``api``, oldest first; empty for an API never created (R9)."""
        validate_api_name(api)
        return [record.info() for record in await self.store.list_keys(api)]

    async def delete_key(self, api: str, client_id: str) -> None:
        """Delete the key; its next request fails (R7). ``KeyNotFound`` if there is none."""
        validate_api_name(api)
        if not isinstance(client_id, str) or not await self.store.delete_key(api, client_id):
            raise KeyNotFound(f"API {api!r} has no key {client_id!r}")
        logger.info("key %s of api %s deleted", client_id, api)

    async def find_key_by_name(self, api: str, name: str) -> KeyInfo:
        """The key of ``api`` whose name equals ``name`` casefolded; ``KeyNotFound`` if none."""
        wanted = normalize_name(name).casefold()
        for key in await self.list_keys(api):
            if key.name.casefold() == wanted:
                return key
        raise KeyNotFound(f"API {api!r} has no key named {name.strip()!r}")

    # -- requests -----------------------------------------------------------------------

    async def authenticate(
        self, api: str, client_id: str | None, secret: str | None
    ) -> KeyInfo | Denial:
        """Check one request's credentials for ``api`` (a valid API name), SPEC §4's order.

        Costs one store lookup. An id keyguard could never have issued is not
        looked up (the API's state still is: a 404 comes before a 401). An
        unknown id costs no verification: its refusal already says it is
        unknown. The refusals that share a message cost the same: a wrong
        secret and a secret sent to a secretless key (checked against a dummy
        hash) are each one verification. A verification that cannot start
        within the store's timeout raises ``VerificationBusy`` (a
        ``StoreUnavailable``), as may the lookup itself.
        """
        plausible = client_id is not None and could_be_client_id(client_id)
        exposed, record = await self.store.lookup(api, client_id if plausible else None)
        if not exposed:
            return Denial.API_NOT_AVAILABLE
        if client_id is None:
            return Denial.CLIENT_ID_MISSING
        if record is None:
            return Denial.CLIENT_ID_NOT_REGISTERED
        stored_hash = record.secret_hash
        deadline = self._verify_deadline
        if stored_hash is None:
            if secret is not None:
                await self.hasher.verify(client_id, secret, None, deadline=deadline)
                return Denial.INVALID_SECRET
        elif secret is None or not (
            self.hasher.remembered(client_id, secret, stored_hash)
            or await self.hasher.verify(client_id, secret, stored_hash, deadline=deadline)
        ):
            return Denial.INVALID_SECRET
        return self._info(record)

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


def _validate_limit(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest("max_keys_per_kind must be a whole number")
    if not 0 <= value <= MAX_KEYS_PER_KIND_LIMIT:
        raise InvalidRequest(f"max_keys_per_kind must be between 0 and {MAX_KEYS_PER_KIND_LIMIT}")
    return value
