"""Fixtures shared by the whole suite.

``store`` is parametrized over every backend in ``tests.backends.BACKENDS``:
any test that takes it runs once per store, against the real servers of this
machine (URLs from environment variables, see ``tests/backends/servers.py``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from keyguard import KeyManager, KeyStore
from tests.backends import BACKENDS, open_test_store

GROUP = "KEYGUARD_TEST_GROUP"  # set by scripts/test: "serial" or "parallel"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``KEYGUARD_TEST_GROUP=serial``, only the tests marked ``serial`` run; with
    ``parallel``, only the others. ``scripts/test`` runs the first group in one process,
    then the second on two workers; without the variable every test runs."""
    group = os.environ.get(GROUP)
    if group is None:
        return
    if group not in ("serial", "parallel"):
        raise pytest.UsageError(f"{GROUP} must be 'serial' or 'parallel', not {group!r}")
    wanted = group == "serial"
    kept = [item for item in items if (item.get_closest_marker("serial") is not None) == wanted]
    left = [item for item in items if (item.get_closest_marker("serial") is not None) != wanted]
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = kept


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
