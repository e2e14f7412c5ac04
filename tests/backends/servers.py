"""The real servers the suite talks to, and what to do when one is down.

URLs come from environment variables, defaulting to this machine's servers:

* ``KEYGUARD_TEST_POSTGRES_URL`` — ``postgresql://postgres@127.0.0.1:5432/test``
* ``KEYGUARD_TEST_MYSQL_URL`` — ``mysql://root@127.0.0.1:3306/test``
* ``KEYGUARD_TEST_REDIS_URL`` — ``redis://127.0.0.1:6379/0``

Locally an unreachable server skips its tests with the reason; with
``CI=true`` it fails them, so a CI run can never pass by skipping a store.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest

DEFAULT_URLS = {
    "postgres": "postgresql://postgres@127.0.0.1:5432/test",
    "mysql": "mysql://root@127.0.0.1:3306/test",
    "redis": "redis://127.0.0.1:6379/0",
}

_ENV = {
    "postgres": "KEYGUARD_TEST_POSTGRES_URL",
    "mysql": "KEYGUARD_TEST_MYSQL_URL",
    "redis": "KEYGUARD_TEST_REDIS_URL",
}


def in_ci() -> bool:
    """Whether this run is CI's (``CI=true``), where nothing may be skipped for lack of a server."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def server_url(name: str) -> str:
    """The URL of the test server ``name`` (postgres, mysql, redis)."""
    return os.environ.get(_ENV[name], DEFAULT_URLS[name])


def require_server(name: str) -> str:
    """``server_url(name)`` if the server accepts TCP connections, else skip (fail in CI)."""
    url = server_url(name)
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or {"postgres": 5432, "mysql": 3306, "redis": 6379}[name]
    try:
        with socket.create_connection((host, port), timeout=2):
            pass
    except OSError as exc:
        reason = f"{name} server at {host}:{port} unreachable ({exc}); set {_ENV[name]}"
        if in_ci():
            pytest.fail(f"CI=true and {reason}")
        pytest.skip(f"SKIPPED STORE: {reason}")
    return url
