"""Fixtures shared by the whole suite.

``store`` is parametrized over every backend in ``tests.backends.BACKENDS``:
any test that takes it runs once per store, against the real servers of this
machine (URLs from environment variables, see ``tests/backends/servers.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from keyguard import KeyManager, KeyStore
from tests.backends import BACKENDS, open_test_store


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests (marked ``pytest.mark.anyio``) run on asyncio, which every driver supports."""
    return "asyncio"


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KeyStore]:
    """A fresh, empty store of each kind, closed (and its data removed) afterwards."""
    async with open_test_store(request.param, tmp_path) as opened:
        yield opened


@pytest.fixture
async def manager(store: KeyStore) -> KeyManager:
    """A ``KeyManager`` over each kind of store."""
    return KeyManager(store)
