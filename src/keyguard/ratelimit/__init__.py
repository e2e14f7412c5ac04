"""Rate limits per key (SPEC §9), counted through the ``limits`` library's moving window.

``RateLimiter(url)`` counts in the counter storage ``url`` names: ``memory://``
(this process only), ``redis://…``, ``rediss://…``, ``redis+cluster://…``, or
any other storage ``limits`` has a moving window for (``mongodb://…``,
``valkey://…``; not ``memcached://…``, refused at start-up). Counting uses
``limits``' *moving window*: each admitted request is an entry that lives ``per``
seconds, and a request is admitted only while fewer than ``limit`` entries are
alive. Unlike fixed windows, which admit up to twice the limit across a window's
edge, this holds in *every* window of that length, across
every process sharing the storage, at the price of one entry per admitted request
(``limit`` entries per key and limit at most).

A request is checked against all of its key's limits, and either hits them all or,
when one is used up, is refused without consuming anything:

* ``memory://`` — :mod:`keyguard.ratelimit.local`, an exact in-process counter with
  ``limits``' items and semantics (``limits``' own ``MemoryStorage`` costs many times
  more per check; docs/rate-limits.md has the figures);
* Redis, Redis Cluster, Sentinel (redis-py) — :mod:`keyguard.ratelimit.redis`, one Lua
  script over ``limits``' key layout on ``limits``' client: one round trip, atomic,
  exact across processes and machines (the server's clock);
* any other storage — ``limits``' moving-window calls: the windows of all limits are
  read, then each limit is hit atomically (a hit that would exceed its limit does not
  count); only when two requests race for the last place of one limit while another
  still has room can the loser consume a place of that other one.

If the counter storage fails, requests are counted in this process's memory
until it answers again (the limits still hold, per process), with one
WARNING a minute; with ``fail="closed"`` they are refused instead
(``RateLimiterUnavailable``, answered 503 by the middleware). Once it is back,
a key that still has entries in the windows of memory must have room there and
in the storage (and is counted in both) until they have left: a limit used up
in memory is not a fresh limit at the storage's return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
from collections.abc import Awaitable, Sequence
from typing import Any, Literal, TypeVar

from keyguard.errors import ConfigurationError, StoreUnavailable
from keyguard.models import RateLimit
from keyguard.ratelimit.items import limits_item
from keyguard.ratelimit.local import LocalCounter
from keyguard.ratelimit.redis import ScriptedWindows, scripted
from keyguard.ratelimit.verdict import Verdict, VerdictTuple, tightest
from keyguard.stores._redact import redact

__all__ = [
    "DEFAULT_RATE_LIMIT_TIMEOUT",
    "RateLimiter",
    "RateLimiterUnavailable",
    "Verdict",
    "VerdictTuple",
    "tightest",
]

logger = logging.getLogger("keyguard")

DEFAULT_RATE_LIMIT_TIMEOUT = 1.0
WARNING_INTERVAL = 60.0  # seconds between two WARNINGs of a failing counter storage
_RETRY_FIRST = 0.5  # seconds before the failed storage is tried again, doubling …
_RETRY_MAX = 5.0  # … up to this
_PREFIX = "keyguard-rl"


class RateLimiterUnavailable(StoreUnavailable):
    """The counter storage failed and ``rate_limit_fail="closed"``: answer 503."""


_verdict = Verdict._make
_T = TypeVar("_T")

if sys.version_info >= (3, 11):

    async def _within(awaitable: Awaitable[_T], seconds: float) -> _T:
        async with asyncio.timeout(seconds):  # no task, unlike wait_for on 3.11
            return await awaitable

else:

    async def _within(awaitable: Awaitable[_T], seconds: float) -> _T:
        return await asyncio.wait_for(awaitable, seconds)


def _storage_uri(url: str) -> tuple[str, dict[str, Any]]:
    """The ``limits`` async storage URI for ``url``, and the options it needs."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"rate_limiter must be a counter storage URL such as memory:// or redis://host:6379, "
            f"got {url!r}"
        )
    scheme = url.split("://", 1)[0].lower()
    uri = url if scheme.startswith("async+") else f"async+{url}"
    base = uri.split("://", 1)[0].lower()
    options: dict[str, Any] = {}
    if base == "async+rediss+cluster":
        # limits names a TLS cluster by its option, not its scheme.
        uri = "async+redis+cluster" + uri[len(base) :]
        options["ssl"] = True
    if base.startswith(("async+redis", "async+rediss")):
        options["implementation"] = "redispy"  # redis-py, keyguard's Redis client
    return uri, options


class RateLimiter:
    """Counts requests per key against their rate limits, in the storage ``url`` names.

    ``fail`` is ``"open"`` (default: count in this process's memory while the
    storage fails) or ``"closed"`` (refuse with ``RateLimiterUnavailable``).
    ``timeout`` bounds each check against the storage, in seconds.
    Creating one does no I/O; the storage connects on first use.
    """

    def __init__(
        self,
        url: str = "memory://",
        *,
        fail: Literal["open", "closed"] = "open",
        timeout: float = DEFAULT_RATE_LIMIT_TIMEOUT,
        **options: Any,
    ) -> None:
        if fail not in ("open", "closed"):
            raise ConfigurationError(f"rate_limit_fail must be 'open' or 'closed', got {fail!r}")
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not 0 < timeout <= 60
        ):
            raise ConfigurationError(
                f"rate limiter timeout must be in (0, 60] seconds, got {timeout!r}"
            )
        self.uri, self._options = _storage_uri(url)
        self._options.update(options)
        if self.uri.startswith(("async+redis", "async+rediss")):
            self._options.setdefault("socket_timeout", timeout)
            self._options.setdefault("socket_connect_timeout", timeout)
        self.url = url
        self.fail = fail
        self.timeout = float(timeout)
        self.local = self.uri.startswith("async+memory")
        self._remote: Any = None
        self._scripted: ScriptedWindows | None = None
        self._remote_loop: asyncio.AbstractEventLoop | None = None
        self._fallback: LocalCounter | None = None
        self._down_until = 0.0
        self._retry = _RETRY_FIRST
        self._last_warning = -math.inf
        self._said_down = False  # a failure WARNING logged, its "is back" not yet
        # Until when (monotonic) requests counted in memory during a failure may still be
        # in a window: until then, a key's entries there count next to the storage's.
        self._counted_until = -math.inf
        # Fail at start-up on an unknown scheme, a missing driver or a URL redis-py would
        # misread, not on a request.
        if not self.local:
            if self.uri.startswith(("async+redis://", "async+rediss://")):
                from keyguard.stores.redis._store import check_redis_url

                check_redis_url(self.uri.removeprefix("async+"), "rate_limiter URL")
            self._make_limiter(self.uri, self._options)
        self._counter = LocalCounter(limits_item)  # memory://, and the fallback
        # hit_now answers for hit only where hit is this class's (a subclass's own hit is
        # always awaited); for memory:// it is the counter's own method, one call.
        self._sync = type(self).hit is RateLimiter.hit
        if self.local and self._sync and type(self).hit_now is RateLimiter.hit_now:
            self.hit_now = self._counter.count  # type: ignore[method-assign]

    def __repr__(self) -> str:
        return f"RateLimiter({redact(self.url)!r}, fail={self.fail!r})"

    @staticmethod
    def _make_limiter(uri: str, options: dict[str, Any]) -> Any:
        from limits.aio.strategies import MovingWindowRateLimiter
        from limits.errors import ConfigurationError as LimitsConfigurationError
        from limits.storage import storage_from_string

        if not uri.startswith("async+memory"):
            options = {"key_prefix": _PREFIX, **options}
        try:
            storage = storage_from_string(uri, wrap_exceptions=True, **options)
            return MovingWindowRateLimiter(storage)
        except NotImplementedError:
            # limits' memcached storage, for one: no moving window, no exact limit.
            raise ConfigurationError(
                f"rate_limiter {redact(uri)!r}: this storage has no moving window in limits, "
                "which keyguard's exact limits need"
            ) from None
        except (LimitsConfigurationError, ValueError, TypeError) as exc:
            # limits' own errors, and those of the URL's parsing (urllib's ValueError on
            # a bad port or host, a driver's TypeError on an option).
            raise ConfigurationError(f"rate_limiter {redact(uri)!r}: {redact(exc)}") from None

    def _limiter(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._remote is None or self._remote_loop is not loop:
            # A client is bound to the event loop it first ran in: one per loop (the one
            # of a loop that is gone cannot be closed from this one, and is dropped).
            self._remote = self._make_limiter(self.uri, dict(self._options))
            self._scripted = scripted(self._remote.storage)
            self._remote_loop = loop
        return self._remote

    async def _drop_remote(self) -> None:
        remote, loop = self._remote, self._remote_loop
        self._remote = self._remote_loop = self._scripted = None
        if remote is None or loop is not asyncio.get_running_loop():
            return
        client = getattr(getattr(remote.storage, "bridge", None), "storage", None)
        closing = getattr(client, "aclose", None)
        if closing is not None:
            with contextlib.suppress(Exception):
                await closing()

    def hit_now(self, api: str, client_id: str, limits: Sequence[RateLimit]) -> VerdictTuple | None:
        """What :meth:`hit` would answer, as a plain tuple, where it needs no ``await``:
        counting in this process (``memory://``, or while a failed storage is given time
        to come back); else ``None``, and the caller awaits ``hit``. (For ``memory://``
        this is the in-process counter's own ``count``, bound at construction.)"""
        if self.local and self._sync:
            return self._counter.count(api, client_id, limits)
        if self._sync and self.fail == "open" and time.monotonic() < self._down_until:
            return self._in_memory(api, client_id, limits)
        return None  # (failing closed, a pause after a failure is hit's to refuse)

    async def hit(self, api: str, client_id: str, limits: Sequence[RateLimit]) -> Verdict:
        """Count one request of key ``client_id`` of ``api`` against ``limits`` (non-empty),
        or refuse it without counting it. See the module docstring."""
        if self.local:
            return self._counter.hit(api, client_id, limits)
        if time.monotonic() < self._down_until:
            # The storage failed a moment ago: not asked again before the pause ends.
            if self.fail == "closed":
                raise RateLimiterUnavailable("rate-limit counter storage unavailable")
            return _verdict(self._in_memory(api, client_id, limits))
        local = None
        if time.monotonic() < self._counted_until:
            # The storage is back, but requests it did not see (counted in memory while
            # it failed) may still be in a window: a key with such entries must have room
            # in both, else right after the storage's return it could make a limit's
            # worth of requests more than its limit. Its admissions count in both.
            local = self._counter.peek(api, client_id, limits)
            if local is not None and not local[0]:
                return _verdict(local)  # the storage is not asked: nothing counted
        try:
            shared = await _within(self._shared(api, client_id, limits), self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the storage failed: StorageError, a timeout, …
            return await self._failed(exc, api, client_id, limits)
        if self._retry != _RETRY_FIRST:
            self._retry = _RETRY_FIRST
            if self._said_down:  # (a storage failing again within the minute: no WARNING)
                self._said_down = False
                logger.warning("rate-limit counter storage %s is back", redact(self.url))
        if local is None or not shared[0]:
            return _verdict(shared)
        counted = self._counter.count(api, client_id, limits)
        # (Refused here after all — another request of the key counted in memory during
        # the storage's answer — it is admitted still: the storage has counted it.)
        return _verdict(counted if counted[0] and counted[2] < shared[2] else shared)

    async def _failed(
        self, exc: Exception, api: str, client_id: str, limits: Sequence[RateLimit]
    ) -> Verdict:
        now = time.monotonic()
        self._down_until = now + self._retry
        self._retry = min(self._retry * 2, _RETRY_MAX)
        await self._drop_remote()  # a new client next time
        if now - self._last_warning >= WARNING_INTERVAL:
            self._last_warning = now
            self._said_down = True
            logger.warning(
                "rate-limit counter storage %s failed (%s); %s",
                redact(self.url),
                type(exc).__name__,
                "refusing rate-limited requests with 503 until it is back"
                if self.fail == "closed"
                else "counting in this process's memory until it is back",
            )
        if self.fail == "closed":
            raise RateLimiterUnavailable("rate-limit counter storage unavailable") from None
        return _verdict(self._in_memory(api, client_id, limits))

    def _in_memory(self, api: str, client_id: str, limits: Sequence[RateLimit]) -> VerdictTuple:
        """Count in this process while the storage fails, remembering for how long what is
        counted here stays in a window."""
        self._counted_until = max(
            self._counted_until, time.monotonic() + max(limit.seconds for limit in limits)
        )
        return self._counter.count(api, client_id, limits)

    async def _shared(
        self, api: str, client_id: str, limits: Sequence[RateLimit]
    ) -> tuple[bool, int, int, int]:
        if len(limits) > 1 and len(set(limits)) < len(limits):
            # One limit listed twice (stored before parse_rate_limits merged them) is one
            # counter: counted twice in it, it would admit half its limit.
            limits = tuple(dict.fromkeys(limits))
        limiter = self._limiter()
        windows = self._scripted
        if windows is not None:  # Redis: one script, one round trip
            return await windows.hit(api, client_id, limits, [limits_item(x) for x in limits])
        return await self._check(limiter, api, client_id, limits)

    async def _check(
        self, limiter: Any, api: str, client_id: str, limits: Sequence[RateLimit]
    ) -> tuple[bool, int, int, int]:
        # The moving-window storage calls of ``limits`` (what its MovingWindowRateLimiter's
        # get_window_stats and hit do), each key built once.
        storage = limiter.storage
        entries = [
            (item.key_for(api, client_id), item.amount, item.get_expiry())
            for item in map(limits_item, limits)
        ]
        if len(entries) == 1:  # the common case, without the cost of tasks
            windows = [await storage.get_moving_window(*entries[0])]
        else:
            windows = await asyncio.gather(
                *(storage.get_moving_window(*entry) for entry in entries)
            )
        now = time.time()
        # (remaining, when the oldest entry leaves the window) per limit
        states = [
            (amount - count, start + expiry)
            for (_, amount, expiry), (start, count) in zip(entries, windows, strict=True)
        ]
        full = [remaining <= 0 for remaining, _ in states]
        if any(full):
            return self._refused(limits, states, now, full)
        if len(entries) == 1:
            hits = [await storage.acquire_entry(*entries[0])]
        else:
            hits = await asyncio.gather(*(storage.acquire_entry(*entry) for entry in entries))
        if not all(hits):
            # Lost a race for the last place of a limit.
            return self._refused(limits, states, now, [not hit for hit in hits])
        limit, remaining = tightest(
            [
                (limit, max(remaining - 1, 0))
                for limit, (remaining, _) in zip(limits, states, strict=True)
            ]
        )
        return True, limit.limit, remaining, 0

    @staticmethod
    def _refused(
        limits: Sequence[RateLimit],
        states: Sequence[tuple[int, float]],
        now: float,
        refusing: Sequence[bool],
    ) -> tuple[bool, int, int, int]:
        # Every refusing limit must have a free place again: the longest wait of theirs.
        wait = max(
            max(1, math.ceil(reset - now))
            for (_, reset), refused in zip(states, refusing, strict=True)
            if refused
        )
        limit, _ = tightest(
            [
                (limit, 0 if refused else remaining)
                for limit, (remaining, _), refused in zip(limits, states, refusing, strict=True)
            ]
        )
        return False, limit.limit, 0, wait

    async def aclose(self) -> None:
        """Close the counter storage's client (a later check makes a new one)."""
        await self._drop_remote()
