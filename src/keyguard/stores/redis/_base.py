"""What every Redis store call stands on: the set-up (the scripts, the Redis key names),
one client per event loop, each call within the timeout with its failures turned into
``StoreUnavailable``, and closing the clients the store made.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, ClassVar, Generic

import anyio

from keyguard.audit import DEFAULT_AUDIT_RETENTION, check_retention
from keyguard.errors import ConfigurationError, StoreClosed, StoreUnavailable

try:
    from redis.asyncio import Redis, RedisCluster
    from redis.commands.core import AsyncScript
except ImportError as exc:  # pragma: no cover - exercised by a test that hides redis
    raise ConfigurationError("redis:// needs: pip install 'keyguard[redis]'") from exc

from keyguard.stores.redis._common import _FAILURES, ClientT, T, _check_timeout, _running_loop
from keyguard.stores.redis._lua import (
    _AUDIT_LUA,
    _DELETE_API_LUA,
    _DELETE_KEY_LUA,
    _INSERT_KEY_LUA,
    _RECORD_USAGE_LUA,
    _SET_HASH_LUA,
    _SNAPSHOT_LUA,
    _UPDATE_KEY_LUA,
    _UPSERT_API_LUA,
    _Closer,
)
from keyguard.stores.redis._pages import PAGE_LUA


class _RedisBase(Generic[ClientT]):
    """The set-up, the clients and the call plumbing under :class:`RedisCore`'s calls."""

    #: What the store is on, for log lines and errors ("Redis at …").
    _server: ClassVar[str] = "Redis"

    def _setup(
        self,
        client: ClientT,
        prefix: str,
        timeout: float,
        *,
        factory: Callable[[], ClientT] | None,
        location: str,
        audit_retention: timedelta | float = DEFAULT_AUDIT_RETENTION,
    ) -> None:
        if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
            raise ConfigurationError("prefix must be a string without '{' or '}'")
        _check_timeout(timeout)
        self.audit_retention = check_retention(audit_retention)
        self.prefix = prefix
        self.timeout = float(timeout)
        self._index = f"{prefix}apis"
        self._audit_index = f"{prefix}audit:apis"
        self._channel = f"{prefix}changes"
        self._location = location
        self._url: str | None = None
        self._factory: Callable[[], ClientT] | None = factory
        self._closed = False
        # A client the caller passed in is used as it is, in whatever loop they use it.
        self._shared: ClientT | None = None if factory else client
        # Our own clients: one per event loop (redis-py's connections belong to the
        # loop that opened them).  ``_current`` is the last (loop, client) used, read in
        # one step on the hot path; a call from another loop (or after aclose) finds
        # its loop differs and goes through ``_redis``.
        self._fresh: ClientT | None = client if factory else None
        self._current: tuple[asyncio.AbstractEventLoop | None, ClientT] = (None, client)
        self._by_loop: dict[asyncio.AbstractEventLoop, tuple[ClientT, _Closer]] = {}
        self._bind_lock = threading.Lock()
        #: The change feeds being watched (``_feed.py``), each by its cancel scope: closing
        #: the store ends them before it closes the clients they read from.
        self._watches: dict[anyio.CancelScope, tuple[asyncio.AbstractEventLoop, anyio.Event]] = {}
        self._upsert_api = AsyncScript(client, _AUDIT_LUA + _UPSERT_API_LUA)
        self._insert_key = AsyncScript(client, _AUDIT_LUA + _INSERT_KEY_LUA)
        self._update_key = AsyncScript(client, _AUDIT_LUA + _UPDATE_KEY_LUA)
        self._set_secret_hash = AsyncScript(client, _AUDIT_LUA + _SET_HASH_LUA)
        self._delete_key = AsyncScript(client, _AUDIT_LUA + _DELETE_KEY_LUA)
        self._delete_api = AsyncScript(client, _AUDIT_LUA + _DELETE_API_LUA)
        self._record_usage = AsyncScript(client, _RECORD_USAGE_LUA)
        self._page_keys = AsyncScript(client, PAGE_LUA)
        self._snapshot = AsyncScript(client, _SNAPSHOT_LUA)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._location!r}, prefix={self.prefix!r})"

    @property
    def counter_url(self) -> str | None:
        """The URL this store was opened with (password included: never log it), for a
        rate limiter counting on the same server (SPEC §9's default); ``None`` for a
        store made from a client."""
        return self._url

    @property
    def description(self) -> str:
        """Where the keys are, for log lines (no credentials)."""
        return f"{self._server} at {self._location} (prefix {self.prefix!r})"

    @property
    def client(self) -> ClientT:
        """The redis-py client the store last used (its own, or the one passed in)."""
        return self._shared if self._shared is not None else self._current[1]

    async def aclose(self) -> None:
        """Close the connections of a client the store created; a passed-in one stays open."""
        self._closed = True
        self._current = (None, self._current[1])  # every call now takes the slow path
        if self._factory is None:
            return
        for loop, (_client, closer) in list(self._by_loop.items()):
            if _running_loop() is loop:
                await closer.aclose()
            elif loop.is_running():
                # Another thread's loop: close there (its shutdown would, but later).
                asyncio.run_coroutine_threadsafe(_finish(closer), loop)
        if self._fresh is not None:
            fresh, self._fresh = self._fresh, None
            await fresh.aclose()

    # -- plumbing -------------------------------------------------------------------------

    def _api_key(self, api: str) -> str:
        return f"{self.prefix}{{{api}}}"

    def _order_key(self, api: str) -> str:
        """The API's listing order, a sorted set in its slot (see ``_pages.py``)."""
        return f"{self.prefix}{{{api}}}:order"

    async def _call(self, operation: Callable[[ClientT], Awaitable[T]]) -> T:
        """``operation`` on this loop's client within ``timeout``; failures: StoreUnavailable."""
        loop, client = self._current
        if loop is not asyncio.get_running_loop():
            client = await self._redis()
        try:
            with anyio.fail_after(self.timeout):
                return await operation(client)
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc

    async def _redis(self) -> ClientT:
        """The client for the running event loop."""
        if self._closed:
            raise StoreClosed(f"the {self._server} store is closed")
        loop = asyncio.get_running_loop()
        current_loop, client = self._current
        if current_loop is loop:
            return client
        if self._shared is not None:
            self._current = (loop, self._shared)
            return self._shared
        return await self._bind(loop)

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
        return StoreUnavailable(f"{self._server} at {self._location} unavailable ({reason})")

    async def _bind(self, loop: asyncio.AbstractEventLoop) -> ClientT:
        """This loop's own client: the first loop gets the one built in ``from_url``."""
        bound = self._by_loop.get(loop)
        if bound is None:
            assert self._factory is not None
            with self._bind_lock:  # loops in two threads must not share the first client
                client, self._fresh = self._fresh or self._factory(), None
            closer = _close_with_loop(client, self._by_loop, loop)
            # Started here, the generator belongs to this loop: when the loop shuts down
            # (asyncio.run, anyio.run, a test client's portal), ``shutdown_asyncgens``
            # finalizes it, closing the client's connections while the loop still runs.
            await closer.asend(None)
            bound = self._by_loop[loop] = (client, closer)
        self._current = (loop, bound[0])
        return bound[0]


async def _close_with_loop(
    client: Redis | RedisCluster,
    registry: dict[asyncio.AbstractEventLoop, Any],
    loop: asyncio.AbstractEventLoop,
) -> _Closer:
    try:
        yield
    finally:
        registry.pop(loop, None)
        with contextlib.suppress(*_FAILURES):  # a connection that already broke
            await client.aclose()


async def _finish(closer: _Closer) -> None:
    await closer.aclose()
