"""``KeyManager``: keyguard's rules (SPEC §3), in the one place every front door calls.

The middleware, the management API and the command line all go through a
``KeyManager``; none of them talks to a store directly. What must be atomic
across processes (R1-R3 at creation, R4 at secret change) is delegated to the
store's atomic operations; everything else is checked here.

One class, in three modules: ``_manager`` (the class, and the rules of every change),
``_reads`` (APIs, keys, the audit log and usage, read) and ``_requests`` (the request
path's checks, which the middleware calls step by step).
"""

from keyguard.manager._manager import (
    DEFAULT_MAX_KEYS_PER_KIND,
    MAX_KEYS_PER_KIND_LIMIT,
    KeyManager,
)
from keyguard.manager._reads import KeyInfoPage
from keyguard.manager._requests import DEFAULT_STORE_TIMEOUT, Denial, store_timeout

__all__ = [
    "DEFAULT_MAX_KEYS_PER_KIND",
    "DEFAULT_STORE_TIMEOUT",
    "MAX_KEYS_PER_KIND_LIMIT",
    "Denial",
    "KeyInfoPage",
    "KeyManager",
    "store_timeout",
]
