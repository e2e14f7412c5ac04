"""The Redis stores' change feed and its callbacks: what a callback raises is its own.

``ChangeFeed.watch``: an exception raised by ``on_ready`` (or ``on_change``) ends the
watch as it is, never disguised as an outage (``StoreUnavailable``), even when it is of a
kind a failing connection raises too.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from keyguard.errors import StoreUnavailable
from keyguard.stores import ChangeFeed
from tests.backends import open_test_store
from tests.helpers import expose

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("backend", ["redis", "cluster"])
@pytest.mark.parametrize("error", [TimeoutError, ConnectionResetError])
async def test_what_on_ready_raises_ends_the_watch_as_it_is(
    backend: str, error: type[OSError], tmp_path: Path
) -> None:
    """An ``on_ready`` raising TimeoutError or ConnectionResetError (a callback's bug) ends
    the watch with that very exception; it came out as StoreUnavailable, so a cache
    logged an outage of the store instead of the bug with its traceback."""
    async with open_test_store(backend, tmp_path) as store:
        assert isinstance(store, ChangeFeed)

        def on_ready() -> None:
            raise error("a callback's bug")

        with anyio.fail_after(30), pytest.raises(error, match="a callback's bug"):
            await store.watch(lambda api, client_id: None, on_ready=on_ready)


@pytest.mark.parametrize("backend", ["redis", "cluster"])
async def test_what_on_change_raises_ends_the_watch_as_it_is(backend: str, tmp_path: Path) -> None:
    """An ``on_change`` raising TimeoutError ends the watch with it, not StoreUnavailable."""
    async with open_test_store(backend, tmp_path) as store:
        assert isinstance(store, ChangeFeed)
        ready = anyio.Event()

        def on_change(api: str, client_id: str | None) -> None:
            raise TimeoutError("a callback's bug")

        async def watch() -> None:
            with pytest.raises(TimeoutError, match="a callback's bug") as raised:
                await store.watch(on_change, on_ready=ready.set)
            assert not isinstance(raised.value, StoreUnavailable)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await ready.wait()
                await expose(store)
