"""Every error keyguard raises, each with a stable machine-readable ``code``.

The tree::

    KeyGuardError                 code
    ├── ConfigurationError        configuration_error  (bad option or URL, missing extra)
    ├── InvalidRequest            invalid_request      (bad API name, key name, kind, limit)
    ├── ApiNotFound               api_not_found        (an API nobody has created)
    ├── KeyNotFound               key_not_found        (no such key in this API)
    ├── RuleViolation             (one of SPEC §3's rules would be broken; no code of its own)
    │   ├── ApiNotExposed         api_not_exposed      (R1)
    │   ├── KeyLimitReached       key_limit_reached    (R2)
    │   ├── DuplicateName         duplicate_name       (R3)
    │   ├── KeyImmutable          key_immutable        (R4)
    │   └── ApiHasKeys            api_has_keys         (deleting an API that has keys)
    └── StoreUnavailable          store_unavailable    (the store cannot be reached or is failing)
        └── StoreClosed           store_unavailable    (the store was closed with aclose())

``InvalidRequest`` is also a ``ValueError``. Front doors translate them: the
management API into problem details with the same ``code``, the command line
into exit code 1 and one line on stderr.
Messages never contain a secret or a hash.
"""

from __future__ import annotations

__all__ = [
    "ApiHasKeys",
    "ApiNotExposed",
    "ApiNotFound",
    "ConfigurationError",
    "DuplicateName",
    "InvalidRequest",
    "KeyGuardError",
    "KeyImmutable",
    "KeyLimitReached",
    "KeyNotFound",
    "RuleViolation",
    "StoreClosed",
    "StoreUnavailable",
]


class KeyGuardError(Exception):
    """Base class of every keyguard error; ``code`` names the kind of failure."""

    code: str = "keyguard_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigurationError(KeyGuardError):
    """keyguard was set up wrongly: a bad option, an unknown store URL, a missing extra."""

    code = "configuration_error"


class InvalidRequest(KeyGuardError, ValueError):
    """A value given to keyguard is not acceptable (API name, key name, kind, limit)."""

    code = "invalid_request"


class ApiNotFound(KeyGuardError):
    """The API has never been created in this store."""

    code = "api_not_found"


class KeyNotFound(KeyGuardError):
    """No key with this client id belongs to this API."""

    code = "key_not_found"


class RuleViolation(KeyGuardError):
    """The operation would break one of keyguard's rules (SPEC §3)."""


class ApiNotExposed(RuleViolation):
    """R1: keys can be created only for an exposed API."""

    code = "api_not_exposed"


class KeyLimitReached(RuleViolation):
    """R2: the API already has its maximum number of keys of this kind."""

    code = "key_limit_reached"


class DuplicateName(RuleViolation):
    """R3: another key of this API already has this name (compared casefolded)."""

    code = "duplicate_name"


class KeyImmutable(RuleViolation):
    """R4: internal keys never change; their secret cannot be set or replaced."""

    code = "key_immutable"


class ApiHasKeys(RuleViolation):
    """The API still has keys: deleting it needs ``force`` (which deletes them too)."""

    code = "api_has_keys"

    @classmethod
    def holding(cls, api: str, count: int) -> ApiHasKeys:
        """The refusal for ``api``, which holds ``count`` keys ("1 key", "2 keys")."""
        return cls(f"API {api!r} has {count} key{'' if count == 1 else 's'}")


class StoreUnavailable(KeyGuardError):
    """The key store could not be reached or failed; the cause is chained."""

    code = "store_unavailable"


class StoreClosed(StoreUnavailable):
    """The store was closed (``aclose``): it answers nothing more, and a change feed
    being watched ends. A ``StoreUnavailable`` (503 at the front doors) that retrying
    will not cure."""
