"""The Redis stores' change feed: ``watch``, on the channel every write script publishes to."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, cast

import anyio

from keyguard.errors import ConfigurationError, StoreClosed

try:
    from redis.asyncio.client import PubSub
except ImportError as exc:  # pragma: no cover - exercised by a test that hides redis
    raise ConfigurationError("redis:// needs: pip install 'keyguard[redis]'") from exc

from keyguard.stores.redis._base import _RedisBase
from keyguard.stores.redis._common import _FAILURES, ClientT, _running_loop, _text


class _Feed(_RedisBase[ClientT]):
    """The change feed (``ChangeFeed``); each store says how it subscribes (``_subscriber``)."""

    async def watch(
        self,
        on_change: Callable[[str, str | None], None],
        *,
        on_ready: Callable[[], None],
    ) -> None:
        """The change feed (:class:`~keyguard.stores.base.ChangeFeed`): every write script
        publishes ``<api>`` or ``<api>\\n<client_id>`` on ``<prefix>changes``.

        ``on_ready`` is called whenever the subscription is (re)confirmed, including
        after redis-py silently reconnects, since notices may have been missed.
        """
        client = await self._redis()
        loop = asyncio.get_running_loop()
        done = anyio.Event()
        with anyio.CancelScope() as scope:
            self._watches[scope] = (loop, done)
            try:
                await self._listen(client, on_change, on_ready)
            finally:
                del self._watches[scope]
                done.set()
        if scope.cancelled_caught:  # only aclose cancels this scope
            raise StoreClosed(f"the {self._server} store is closed")

    async def _listen(
        self,
        client: ClientT,
        on_change: Callable[[str, str | None], None],
        on_ready: Callable[[], None],
    ) -> None:
        pubsub: PubSub | None = None
        try:
            try:
                with anyio.fail_after(self.timeout):
                    pubsub = await self._subscriber(client)
                    await pubsub.subscribe(self._channel)
            except _FAILURES as exc:
                raise self._unavailable(exc) from exc
            while True:
                message = await self._next_message(pubsub)
                # The callbacks run outside the translation of failures: what they raise
                # is their own bug, never disguised as an outage (ChangeFeed.watch).
                kind = _text(message["type"])
                if kind == "subscribe":
                    on_ready()
                elif kind == "message":
                    api, newline, client_id = _text(message["data"]).partition("\n")
                    on_change(api, client_id if newline else None)
        finally:
            if pubsub is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(*_FAILURES):
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # bare before redis-py 8.2

    async def _next_message(self, pubsub: PubSub) -> dict[str, Any]:
        """The next message heard; StoreUnavailable when the feed's server is gone."""
        pinged = False
        try:
            while True:
                # An explicit read timeout answers None when nothing came, on every
                # redis-py version (a blocking read may inherit the socket timeout).
                message = await pubsub.get_message(timeout=self.timeout)
                if message is not None:
                    return cast("dict[str, Any]", message)  # anything heard: it lives
                # Quiet for a timeout: a connection cut without a goodbye (or a frozen
                # server) raises nothing, ever. Ask; no answer by the next quiet
                # timeout means the feed is gone, not merely idle.
                if pinged:
                    raise ConnectionError("the change feed's server stopped answering")
                with anyio.fail_after(self.timeout):
                    await pubsub.ping()
                pinged = True
        except _FAILURES as exc:
            raise self._unavailable(exc) from exc

    async def aclose(self) -> None:
        """End the change feeds being watched, then close the clients (a feed left
        reading would have redis-py reconnect it, on a closed client, to resubscribe)."""
        # Closed from now on: a watch starting while this waits for the others to end
        # (a cache's watcher retrying just then) raises StoreClosed instead of listening.
        self._closed = True
        running = _running_loop()
        waits = []
        for scope, (loop, done) in list(self._watches.items()):
            if loop is running:
                scope.cancel()
                waits.append(done)
            elif not loop.is_closed():
                loop.call_soon_threadsafe(scope.cancel)
        with anyio.move_on_after(self.timeout):
            for done in waits:
                await done.wait()
        await super().aclose()

    async def _subscriber(self, client: ClientT) -> PubSub:
        """A pub/sub connection for the change feed (not yet subscribed)."""
        raise NotImplementedError
