"""``redis+cluster://`` and ``rediss+cluster://``: keys in a Redis Cluster.

The same store as ``keyguard.stores.redis`` (:class:`~keyguard.stores.redis.RedisCore`: one
data model, the same Lua scripts, the same record encoding), run on redis-py's
asyncio ``RedisCluster`` client. What makes it work on a cluster, in short (the
whole story is in ``docs/redis-store.md``):

* everything of one API is in one slot: its hash, ``<prefix>{<api>}``, and the keys
  beside it (listing order, audit sets, usage) all carry the hash tag ``{<api>}``, so
  every script touches one slot and stays atomic;
* the index of API names, ``<prefix>apis``, is in a slot of its own and is never
  part of a script: a name is indexed before its hash is created, and readers
  skip a name whose hash does not exist;
* the change feed is plain ``PUBLISH``, from inside each script, which a cluster
  broadcasts to every node: the feed subscribes on any one node, moving to the
  next one when that node fails.

Every call ends within ``timeout`` seconds, a failover in progress included:
past it, :class:`~keyguard.errors.StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import unquote

from keyguard.audit import DEFAULT_AUDIT_RETENTION, check_retention
from keyguard.errors import ConfigurationError

try:
    from redis.asyncio import RedisCluster
    from redis.asyncio.client import PubSub
    from redis.asyncio.cluster import ClusterNode
    from redis.asyncio.connection import SSLConnection
    from redis.exceptions import RedisClusterException, RedisError
except ImportError as exc:  # pragma: no cover - exercised by a test that hides redis
    raise ConfigurationError("redis+cluster:// needs: pip install 'keyguard[redis]'") from exc

from keyguard.stores._redact import redact
from keyguard.stores.redis._common import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PREFIX,
    DEFAULT_TIMEOUT,
    _check_timeout,
)
from keyguard.stores.redis._core import RedisCore

__all__ = ["RedisClusterStore", "parse_cluster_url"]

T = TypeVar("T")

SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_PORT = 6379


class RedisClusterStore(RedisCore[RedisCluster]):
    """A :class:`~keyguard.KeyStore` in a Redis Cluster; see ``docs/redis-store.md``.

    Open one with :meth:`from_url` (``open_store("redis+cluster://…")`` does) or
    wrap a ``redis.asyncio.RedisCluster`` client you already have. ``prefix`` and
    ``timeout`` mean what they mean for :class:`~keyguard.stores.redis.RedisStore`.
    """

    _server = "Redis Cluster"
    _usage_per_api = True

    def __init__(
        self,
        client: RedisCluster,
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
        self._setup_feed()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        audit_retention: timedelta | float = DEFAULT_AUDIT_RETENTION,
        **client_options: Any,
    ) -> RedisClusterStore:
        """A store on the cluster at ``url``
        (``redis+cluster://[[user]:password@]host:port[,host:port…]``, or
        ``rediss+cluster://…`` for TLS), with a client the store creates and closes.

        The nodes listed are where the client starts: it learns the others from the
        cluster. ``client_options`` go to ``redis.asyncio.RedisCluster`` (for example
        ``ssl_ca_certs``, ``max_connections`` per node) and override the store's
        defaults: connect and read timeouts of ``timeout``. Does no I/O: the client
        connects on first use, in the event loop using it.
        """
        _check_timeout(timeout)
        check_retention(audit_retention)
        nodes, url_options = parse_cluster_url(url)
        options: dict[str, Any] = {
            "socket_connect_timeout": timeout,
            "socket_timeout": timeout,
            "max_connections": DEFAULT_MAX_CONNECTIONS,
            **url_options,
            **client_options,
        }
        gate = options["max_connections"]
        if isinstance(gate, bool) or not isinstance(gate, int) or gate < 1:
            raise ConfigurationError(
                f"max_connections must be a whole number, at least 1: {gate!r}"
            )
        # One connection per node beyond the gate's places: the change feed's.
        options["max_connections"] = gate + 1

        def factory() -> RedisCluster:
            startup = [ClusterNode(host, port) for host, port in nodes]
            return _GatedCluster(gate, startup_nodes=startup, **options)

        try:
            client = factory()
        except (ValueError, TypeError, RedisError, RedisClusterException) as exc:
            reason = redact(exc)
            raise ConfigurationError(
                f"invalid Redis Cluster store URL or option: {reason}"
            ) from None
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
        store._setup_feed()
        return store

    def _setup_feed(self) -> None:
        # Where the feed listens: processes start on different nodes, spreading the
        # subscriptions; each new subscription takes the next node.
        self._feed_turn = random.randrange(1 << 16)  # noqa: S311 - load spreading, not a secret
        #: The node (``host:port``) the change feed last subscribed on.
        self.feed_node: str | None = None

    async def _call(self, operation: Callable[[RedisCluster], Awaitable[T]]) -> T:
        try:
            return await super()._call(lambda client: _started(client, operation))
        except AttributeError as exc:
            if not _torn_down_in_redis(exc):
                raise
            raise self._unavailable(exc) from exc

    async def _subscriber(self, client: RedisCluster) -> PubSub:
        """A pub/sub connection to one node: a cluster broadcasts ``PUBLISH`` to every
        node, so any one hears every change.  Each call takes the next node, so a feed
        that broke with its node listens on another one next time."""
        await client.initialize()
        nodes = sorted(client.get_nodes(), key=lambda node: node.name)
        if not nodes:  # pragma: no cover - initialize() fails first
            raise RedisClusterException("the cluster has no nodes")
        node = nodes[self._feed_turn % len(nodes)]
        self._feed_turn += 1
        self.feed_node = node.name
        return client.pubsub(node=node)


class _GatedCluster(RedisCluster):
    """A ``RedisCluster`` with a limit on the store's calls in flight.

    redis-py's cluster client fails a command at once (``MaxConnectionsError``) when
    a node's connections are all in use; the store's calls wait for a place instead
    (within the store's timeout), as the standalone store's blocking pool does, so
    a burst of requests queues briefly rather than turning into 503s.  Each call
    holds at most one connection per node.
    """

    def __init__(self, places: int, **options: Any) -> None:
        super().__init__(**options)
        self.gate = asyncio.Semaphore(places)


async def _started(client: RedisCluster, operation: Callable[[RedisCluster], Awaitable[T]]) -> T:
    """``operation`` on ``client`` once the client knows the cluster, within its gate.

    The client learns the cluster (``initialize()``: ``CLUSTER SLOTS``, the command
    table) before the first command is sent, whoever's it is: when several first
    commands went out together on a client still learning it, redis-py (8.1) could
    recycle a connection one of them was still opening, failing it with an
    ``AttributeError``. ``initialize()`` is redis-py's own, idempotent and locked, so
    racing first calls wait for one start-up; once started it returns at once.
    """
    await client.initialize()
    if not isinstance(client, _GatedCluster):  # a client the caller passed in: as it is
        return await operation(client)
    async with client.gate:
        return await operation(client)


def _torn_down_in_redis(exc: AttributeError) -> bool:
    """Whether ``exc`` is redis-py finding a connection closed under it (its reader or
    writer gone, ``'NoneType' object has no attribute …``), raised in redis-py's own
    code: a connection failure, so ``StoreUnavailable``, not a crash of the caller."""
    trace = exc.__traceback__
    if trace is None or not str(exc).startswith("'NoneType' object has no attribute"):
        return False
    while trace.tb_next is not None:
        trace = trace.tb_next
    module = trace.tb_frame.f_globals.get("__name__", "")
    return isinstance(module, str) and module.startswith("redis.")


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The startup nodes of ``redis+cluster://[[user]:password@]host[:port][,…]`` and the
    client options the URL itself sets (credentials, TLS for ``rediss+cluster://``).

    Raises ``ConfigurationError`` for anything else: another scheme, no host, a bad
    port, a database other than 0 (a cluster has only database 0), a query string.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(f"not a Redis Cluster URL: {redact(url)!r}")
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    shown = redact(url)
    if scheme not in SCHEMES:
        raise ConfigurationError(f"a Redis Cluster URL starts with redis+cluster://, got {shown!r}")
    netloc, slash, path = rest.partition("/")
    if "?" in netloc or "#" in netloc or "?" in path or "#" in path:
        raise ConfigurationError(
            f"a Redis Cluster URL takes no query; pass options as keywords: {shown!r}"
        )
    if slash and path not in ("", "0"):
        raise ConfigurationError(f"a Redis Cluster has only database 0: {shown!r}")
    credentials, at, hosts = netloc.rpartition("@")
    options: dict[str, Any] = {}
    if at:
        user, colon, password = credentials.partition(":")
        if user:
            options["username"] = unquote(user)
        if colon:
            options["password"] = unquote(password)
    if scheme == "rediss+cluster":
        options["ssl"] = True
    nodes = [_node(item, shown) for item in hosts.split(",")]
    return nodes, options


def _node(item: str, shown: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [IPv6]:port
        host, bracket, tail = item[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ConfigurationError(f"bad node {item!r} in Redis Cluster URL {shown!r}")
        port_text = tail[1:]
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise ConfigurationError(f"a node without a host in Redis Cluster URL {shown!r}")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigurationError(f"bad port {port_text!r} in Redis Cluster URL {shown!r}")
    return host, int(port_text)


def _location(client: RedisCluster) -> str:
    """The startup nodes of ``client`` as a URL without credentials (for repr and errors)."""
    kwargs = client.nodes_manager.connection_kwargs
    tls = issubclass(kwargs.get("connection_class", object), SSLConnection)
    names = ",".join(
        f"[{node.host}]:{node.port}" if ":" in node.host else f"{node.host}:{node.port}"
        for node in client.startup_nodes
    )
    return f"{'rediss' if tls else 'redis'}+cluster://{names}"
