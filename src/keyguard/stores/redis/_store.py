"""``redis://`` and ``rediss://``: the store on a standalone Redis."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from keyguard.audit import (
    DEFAULT_AUDIT_RETENTION,
    check_retention,
)
from keyguard.errors import (
    ConfigurationError,
)

try:
    from redis.asyncio import BlockingConnectionPool, Redis
    from redis.asyncio.client import PubSub
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - exercised by a test that hides redis
    raise ConfigurationError("redis:// needs: pip install 'keyguard[redis]'") from exc

from keyguard.stores._redact import redact
from keyguard.stores.redis._common import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT,
    _check_timeout,
    _location,
)
from keyguard.stores.redis._core import RedisCore


class RedisStore(RedisCore[Redis]):
    """A :class:`~keyguard.KeyStore` in Redis; the data model is in ``docs/redis-store.md``.

    Open one with :meth:`from_url` (``open_store("redis://…")`` does) or wrap a
    ``redis.asyncio.Redis`` client you already have. ``prefix`` starts every
    Redis key the store writes, so several apps can share one Redis; ``timeout``
    (seconds) bounds every call: past it, the call raises ``StoreUnavailable``.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        audit_retention: timedelta | float = DEFAULT_AUDIT_RETENTION,
    ) -> None:
        self._setup(
            client,
            prefix,
            timeout,
            factory=None,
            location=_location(client),
            audit_retention=audit_retention,
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        audit_retention: timedelta | float = DEFAULT_AUDIT_RETENTION,
        **client_options: Any,
    ) -> RedisStore:
        """A store on the Redis at ``url`` (``redis://[[user]:password@]host[:port][/db]``,
        or ``rediss://…`` for TLS), with a client the store creates and closes itself.

        ``client_options`` go to ``redis.asyncio.Redis.from_url`` (for example
        ``ssl_ca_certs``, ``max_connections``) and override the store's defaults:
        connect and read timeouts of ``timeout`` and a single immediate retry.
        Does no I/O: the client connects on first use, in the event loop using it.
        """
        _check_timeout(timeout)
        check_retention(audit_retention)
        options: dict[str, Any] = {
            "socket_connect_timeout": timeout,
            "socket_timeout": timeout,
            # One immediate retry replaces a pooled connection that died with a
            # restarted or failed-over server; more would only delay the answer.
            "retry": Retry(NoBackoff(), retries=1),
            **client_options,
        }

        def factory() -> Redis:
            # A blocking pool: past max_connections, a call waits (up to ``timeout``)
            # for a connection to come free instead of failing at once, so a burst of
            # requests queues briefly rather than turning into 503s.
            pool_options = {"max_connections": DEFAULT_MAX_CONNECTIONS, "timeout": timeout}
            pool = BlockingConnectionPool.from_url(url, **{**pool_options, **options})
            return Redis.from_pool(pool)

        try:
            client = factory()
            pool = client.connection_pool
            # The pool only stores its options; building one connection object (no
            # I/O) surfaces a misspelt option now rather than on the first request.
            pool.connection_class(**pool.connection_kwargs)
        except (ValueError, TypeError, RedisError) as exc:
            reason = redact(exc)
            raise ConfigurationError(f"invalid Redis store URL or option: {reason}") from None
        store = cls.__new__(cls)
        store._setup(
            client,
            prefix,
            timeout,
            factory=factory,
            location=_location(client),
            audit_retention=audit_retention,
        )
        store._url = url
        return store

    async def _subscriber(self, client: Redis) -> PubSub:
        return client.pubsub()
