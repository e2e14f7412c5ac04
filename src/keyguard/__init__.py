"""keyguard: managed API keys in front of any ASGI app.

``app.add_middleware(KeyGuard, store=open_store("sqlite:///keys.db"), api="orders")``
"""

from keyguard import errors
from keyguard.errors import KeyGuardError
from keyguard.management import ReadOnly, management_app
from keyguard.manager import Denial, KeyManager
from keyguard.middleware import KeyGuard
from keyguard.models import Api, IssuedKey, KeyInfo, KeyKind
from keyguard.secrets import SecretHasher
from keyguard.stores import KeyStore, MemoryStore, open_store

__version__ = "0.1.0.dev0"

__all__ = [
    "Api",
    "Denial",
    "IssuedKey",
    "KeyGuard",
    "KeyGuardError",
    "KeyInfo",
    "KeyKind",
    "KeyManager",
    "KeyStore",
    "MemoryStore",
    "ReadOnly",
    "SecretHasher",
    "errors",
    "management_app",
    "open_store",
]
