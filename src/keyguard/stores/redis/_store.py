"""``redis://`` and ``rediss://``: the store on a standalone Redis."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

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
        check_redis_url(url)
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


# The path of a redis:// URL: none, "/", or the database number.
_DATABASE_PATH = re.compile(r"/?[0-9]*")


def check_redis_url(url: str, what: str = "Redis store URL") -> None:
    """Refuse what redis-py would misread, silently or in an error quoting a password
    (``what`` names the URL in the error: the store's, or a rate limiter's).

    An ``@`` after the host (outside a query's ``name=value``) means a user name or
    password holding an unescaped ``/``, ``?`` or ``#``: the URL parser ends the host
    there, reads part of the password as the port (and quotes it in its error) or, if
    that part is a number, connects elsewhere without it. A path that is not a
    database number would be ignored (database 0), and ``/1/2`` read as 12.
    """
    if not isinstance(url, str):
        return  # redis-py's own error
    shown = redact(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unclosed "[" of an IPv6 host, say ("Invalid IPv6 URL")
        raise ConfigurationError(f"invalid {what} {shown!r}: {redact(str(exc))}") from None
    socket = parts.scheme.lower() == "unix"  # its path is the socket's, not a database
    names = [item.partition("=")[0] for item in parts.query.split("&")]
    if any("@" in text for text in ("" if socket else parts.path, parts.fragment, *names)):
        raise ConfigurationError(
            f"invalid {what} {shown!r}: an '@' after the host; a '/', '?' or '#' "
            "in the user name or password must be percent-encoded (%2F, %3F, %23)"
        )
    try:
        parts.port  # noqa: B018 - parsed here to word the error without quoting the URL
    except ValueError:
        raise ConfigurationError(
            f"invalid {what} {shown!r}: the port must be a number from 0 to 65535"
        ) from None
    if not socket and not _DATABASE_PATH.fullmatch(unquote(parts.path)):
        raise ConfigurationError(
            f"invalid {what} {shown!r}: the path is the database number, as in /0"
        )
