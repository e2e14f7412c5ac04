"""``KeyGuard``: the ASGI middleware on every request (SPEC §4), and nothing else.

Pure ASGI. Options are validated and responses precomputed in ``__init__``
so that ``__call__`` does one pass over the headers, one store lookup through
``KeyManager`` (``authenticate``'s steps; usually answered by the store's cache),
for a key with rate limits one hit of its counters (SPEC §9), one increment of
the in-memory usage counts (SPEC §10) and, when a secret must be stripped, one
scope copy.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Literal
from urllib.parse import parse_qsl, unquote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keyguard import metrics
from keyguard.errors import ApiNotFound, ConfigurationError, InvalidRequest
from keyguard.manager import Denial, KeyManager
from keyguard.models import API_NAME_PATTERN, KeyInfo, RateLimit, validate_api_name
from keyguard.ratelimit import RateLimiter, RateLimiterUnavailable, VerdictTuple
from keyguard.secrets import SecretHasher, VerificationBusy
from keyguard.stores.base import KeyStore
from keyguard.usage import DEFAULT_USAGE_FLUSH, UsageRecorder, check_usage_flush

__all__ = ["KeyGuard"]

logger = logging.getLogger("keyguard")

DEFAULT_CLIENT_ID_HEADER = "X-IBM-Client-Id"
DEFAULT_CLIENT_SECRET_HEADER = "X-IBM-Client-Secret"  # noqa: S105 - a header name
RETRY_AFTER_SECONDS = 2
FAILURE_LOG_INTERVAL = 10  # seconds between two WARNING records of store failures
NOT_FOUND_LOG_INTERVAL = 60  # seconds between two WARNING records of one API's 404s
_MAX_NOT_FOUND_WARNINGS = 20  # distinct APIs warned about per interval (made-up names)

_NOT_FOUND = "No resources match requested URI"
_MISSING = "Client id missing."
_NOT_REGISTERED = "Client id not registered."
_INVALID = "Invalid client id or secret."
_DISABLED = "Client id disabled."
_EXPIRED = "Client id expired."
_MULTIPLE = "Multiple client id or secret values in the request."
_UNAVAILABLE = "Key store unavailable."

_RATE_LIMITED = "Rate Limit exceeded"

_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    503: "Service Unavailable",
}

# A refusal: status, raw headers, body, and the websocket close code used when
# the server cannot send an HTTP response to a websocket handshake.
_Refusal = tuple[int, list[tuple[bytes, bytes]], bytes, int]


def _refusal(status: int, message: str, api: str | None = None) -> _Refusal:
    body = json.dumps(
        {"httpCode": str(status), "httpMessage": _REASONS[status], "moreInformation": message},
        separators=(", ", ": "),
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if status == 401:
        headers.append((b"www-authenticate", f'APIKey realm="{api}"'.encode()))
    if status == 503:
        headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
    return status, headers, body, 1013 if status in (429, 503) else 1008


_BAD_REQUEST = _refusal(400, _MULTIPLE)
_API_NOT_AVAILABLE = _refusal(404, _NOT_FOUND)
_STORE_UNAVAILABLE = _refusal(503, _UNAVAILABLE)
_TOO_MANY = _refusal(429, _RATE_LIMITED)


_RATE_LIMIT = b"x-ratelimit-limit"
_RATE_REMAINING = b"x-ratelimit-remaining"
# Header values of the small numbers, made once: most requests of a rate-limited key
# find theirs here rather than formatting it.
_NUMBERS = tuple(b"%d" % n for n in range(1024))
_RATE_LIMIT_PAIRS: dict[int, tuple[bytes, bytes]] = {}


def _rate_limit_pair(limit: int) -> tuple[bytes, bytes]:
    """The ``X-RateLimit-Limit`` header of ``limit``, kept for the next request."""
    if len(_RATE_LIMIT_PAIRS) >= 1024:
        _RATE_LIMIT_PAIRS.clear()
    pair = _RATE_LIMIT_PAIRS[limit] = (_RATE_LIMIT, b"%d" % limit)
    return pair


def _too_many(limit: int, remaining: int, retry_after: int) -> _Refusal:
    """The 429 of a limit used up: ``Retry-After``, and the headers of every response to a
    rate-limited key."""
    status, headers, body, close = _TOO_MANY
    extra = [
        (b"retry-after", b"%d" % retry_after),
        _RATE_LIMIT_PAIRS.get(limit) or _rate_limit_pair(limit),
        (_RATE_REMAINING, b"%d" % remaining),
    ]
    return status, [*headers, *extra], body, close


class _ApiRefusals:
    """The 401 refusals of one API (they name it in ``WWW-Authenticate``)."""

    __slots__ = ("by_denial",)

    def __init__(self, api: str) -> None:
        self.by_denial: dict[Denial, _Refusal] = {
            Denial.API_NOT_AVAILABLE: _API_NOT_AVAILABLE,
            Denial.CLIENT_ID_MISSING: _refusal(401, _MISSING, api),
            Denial.CLIENT_ID_NOT_REGISTERED: _refusal(401, _NOT_REGISTERED, api),
            Denial.INVALID_SECRET: _refusal(401, _INVALID, api),
            Denial.DISABLED: _refusal(401, _DISABLED, api),
            Denial.EXPIRED: _refusal(401, _EXPIRED, api),
        }


class KeyGuard:
    """Require a valid API key (client id, plus secret where the key has one) on every request.

    ``app.add_middleware(KeyGuard, store=open_store("sqlite:///keys.db"), api="orders")``

    Options (keyword-only):

    * ``store`` — the :class:`~keyguard.KeyStore` holding the keys.
    * ``api`` — the API's name, or a callable of the ASGI scope returning one
      (``None`` or an invalid name answers 404).
    * ``client_id_header`` / ``client_secret_header`` — header names
      (case-insensitive), IBM's ``X-IBM-Client-Id`` / ``X-IBM-Client-Secret`` by default.
    * ``query_credentials`` — also read ``client_id`` / ``client_secret`` from the
      query string (off by default: query strings end up in access logs).
    * ``exclude_paths`` — paths that need no key: exact paths, or a prefix written
      with a trailing ``/*`` (``"/docs/*"`` opens ``/docs`` and ``/docs/…``, never
      ``/docs-admin``).
    * ``strip_secret`` — remove the secret header (and query parameter) before the
      app sees the request, excluded paths included (default ``True``).
    * ``allow_preflight`` — let a CORS preflight (``OPTIONS`` with ``Origin`` and
      ``Access-Control-Request-Method``) through without credentials (default
      ``False``: anyone can send those headers; put ``CORSMiddleware`` outside
      ``KeyGuard`` instead).
    * ``hasher`` — a :class:`~keyguard.secrets.SecretHasher` for a non-default
      passlib context; it must match the one keys were created with.
    * ``rate_limiter`` — where rate-limit counters live (SPEC §9): a URL the
      ``limits`` library has a moving window for (``memory://``, ``redis://…``,
      ``redis+cluster://…``, ``mongodb://…``) or a
      :class:`~keyguard.ratelimit.RateLimiter`. Default: the key store's own Redis
      (or Redis Cluster) when the store was opened from a URL, else ``memory://``
      (counted per process).
    * ``rate_limit_fail`` — ``"open"`` (default: while the counter storage fails,
      count in this process's memory) or ``"closed"`` (answer 503).
    * ``usage_flush`` — seconds between two writes of the per-key usage counts (SPEC
      §10; default 10): admitted requests and 429s are counted in memory and written
      in one store call per interval, on the lifespan's shutdown and in ``aclose``.
      ``0`` or ``None`` turns usage counting off. ``guard.usage`` is the
      :class:`~keyguard.usage.UsageRecorder` (``None`` when off).

    Exclusions match the path the app routes on (``scope["path"]`` less
    ``scope["root_path"]``). On success the app finds a :class:`~keyguard.KeyInfo`
    in ``scope["state"]["keyguard"]`` (``request.state.keyguard`` in Starlette),
    set in the request's own state dict so middleware outside sees it too.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: KeyStore,
        api: str | Callable[[Scope], str | None] = "default",
        client_id_header: str = DEFAULT_CLIENT_ID_HEADER,
        client_secret_header: str = DEFAULT_CLIENT_SECRET_HEADER,
        query_credentials: bool = False,
        exclude_paths: Iterable[str] = (),
        strip_secret: bool = True,
        allow_preflight: bool = False,
        hasher: SecretHasher | None = None,
        rate_limiter: str | RateLimiter | None = None,
        rate_limit_fail: Literal["open", "closed"] = "open",
        usage_flush: float | None = DEFAULT_USAGE_FLUSH,
    ) -> None:
        self.app = app
        self.manager = KeyManager(store, hasher=hasher)
        interval = check_usage_flush(usage_flush)
        # The manager's store: its calls are timed where metrics are on (keyguard.metrics).
        usage_store = self.manager.store
        self.usage = None if interval is None else UsageRecorder(usage_store, interval=interval)
        self.rate_limiter = _rate_limiter(store, rate_limiter, rate_limit_fail)
        self._api_rate_limits_now = self.manager.api_rate_limits_now
        self._told_per_process = not self.rate_limiter.local
        if callable(api):
            self._api_name: str | None = None
            self._api_func: Callable[[Scope], str | None] | None = api
        else:
            try:
                self._api_name = validate_api_name(api)
            except InvalidRequest as exc:
                raise ConfigurationError(f"api: {exc}") from None
            self._api_func = None
        self._id_header = _header_name(client_id_header, "client_id_header")
        self._secret_header = _header_name(client_secret_header, "client_secret_header")
        if self._id_header == self._secret_header:
            raise ConfigurationError("client_id_header and client_secret_header must differ")
        self._query = bool(query_credentials)
        self._strip = bool(strip_secret)
        self._preflight = bool(allow_preflight)
        exact: set[str] = set()
        prefixes: list[str] = []
        for path in [exclude_paths] if isinstance(exclude_paths, str) else exclude_paths:
            if not isinstance(path, str) or not path.startswith("/"):
                raise ConfigurationError(f"exclude_paths entries must start with '/': {path!r}")
            if path.endswith("/*"):
                prefixes.append(path[:-2])
            else:
                exact.add(path)
        self._exclude_exact = frozenset(exact)
        self._exclude_prefixes = tuple(prefixes)
        # Whether any request can pass without credentials (else that check is skipped).
        self._screening = bool(exact or prefixes or self._preflight)
        self._refusals: dict[str, _ApiRefusals] = {}
        self._last_failure_warning = -float(FAILURE_LOG_INTERVAL)
        self._not_found_warned: dict[str, float] = {}
        if self._api_name is not None:
            self._refusals[self._api_name] = _ApiRefusals(self._api_name)
        # keyguard.requests, one call per decided request; a no-op when metrics are off.
        self._count = metrics.request_counter(self._api_name)
        self._counting = metrics.counts(self._count)  # admitted requests skip a no-op call

    def __repr__(self) -> str:
        api = self._api_name if self._api_func is None else self._api_func
        return f"KeyGuard(store={self.manager.store!r}, api={api!r})"

    async def aclose(self) -> None:
        """Write the usage counted so far and release what this middleware opened itself
        (its rate limiter's client); done on the lifespan's shutdown too. The store is the
        caller's to close."""
        try:
            if self.usage is not None:
                await self.usage.aclose()
        finally:
            await self.rate_limiter.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            if scope["type"] == "lifespan":
                send = self._closing_on_shutdown(send)
                if self.usage is not None:
                    receive = self.usage.flushing_on_shutdown(receive)
            await self.app(scope, receive, send)
            return
        if self._screening and self._passes_unchecked(scope):
            await self.app(self._stripped(scope) if self._strip else scope, receive, send)
            return

        id_header = self._id_header
        secret_header = self._secret_header
        client_id = None
        secret_pair: tuple[bytes, bytes] | None = None
        ids = secrets = 0
        for pair in scope["headers"]:
            name = pair[0]
            if name == id_header:
                ids += 1
                client_id = pair[1]
            elif name == secret_header:
                secrets += 1
                secret_pair = pair
        # Empty or blank values count as absent.
        client_id_text = client_id.decode("latin-1").strip() or None if client_id else None
        secret = None if secret_pair is None else secret_pair[1]
        secret_text = secret.decode("latin-1").strip() or None if secret else None
        query_secret = False
        if self._query and scope.get("query_string"):
            for name_text, value_text in parse_qsl(
                scope["query_string"].decode("latin-1"), keep_blank_values=True
            ):
                if name_text == "client_id":
                    ids += 1
                    client_id_text = value_text.strip() or None
                elif name_text == "client_secret":
                    secrets += 1
                    query_secret = True
                    secret_text = value_text.strip() or None
        if ids > 1 or secrets > 1:
            self._count(self._api_name, metrics.BAD_REQUEST)
            await _refuse(scope, receive, send, _BAD_REQUEST)
            return

        api = self._api_name if self._api_func is None else self._resolve_api(scope)
        if api is None:
            self._count(None, metrics.API_NOT_AVAILABLE)
            await _refuse(scope, receive, send, _API_NOT_AVAILABLE)
            return
        # KeyManager.authenticate, step by step: no await on a cache hit (nor on a memory
        # store), whose answer brings the API's rate limits along.
        manager = self.manager
        api_limits: tuple[RateLimit, ...] | None = None
        try:
            lookup_now = manager.lookup_now
            hit = None if lookup_now is None else lookup_now(api, client_id_text)
            if hit is None:
                exposed, record = await manager.lookup(api, client_id_text)
            else:
                exposed, record, api_limits = hit
            result = manager.judge(client_id_text, secret_text, exposed, record)
            if result is None:
                result = await manager.verified(client_id_text, secret_text, record)
                api_limits = None  # read again, after the wait
        except Exception as exc:
            self._count(api, metrics.STORE_UNAVAILABLE)
            await self._unavailable(scope, receive, send, exc)
            return
        if not isinstance(result, KeyInfo):
            self._count(api, result)
            if result is Denial.API_NOT_AVAILABLE:
                await self._log_not_found(api)
            refusals = self._refusals.get(api)
            if refusals is None:
                refusals = self._remember_refusals(api)
            await _refuse(scope, receive, send, refusals.by_denial[result])
            return

        # The request's own state dict, changed in place: middleware outside KeyGuard
        # (an access logger) sees who called. Servers copy the lifespan state per request.
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["keyguard"] = result
        # Read without an await where no store read is needed (the key's own limits, the
        # API's from lookup_now, a cache's snapshot, a memory store), as is the verdict of
        # an in-process counter.
        verdict: VerdictTuple | None = None
        try:
            limits = result.rate_limits
            if limits is None:
                limits = api_limits if api_limits is not None else self._api_rate_limits_now(api)
                if limits is None:
                    limits = await self.manager.rate_limits_for(api, result)
            if limits:
                limiter = self.rate_limiter
                verdict = limiter.hit_now(api, result.client_id, limits)
                if verdict is None:
                    verdict = await limiter.hit(api, result.client_id, limits)
        except Exception as exc:
            self._count(api, metrics.STORE_UNAVAILABLE)
            await self._unavailable(scope, receive, send, exc)
            return
        if verdict is not None:
            if not self._told_per_process:
                self._tell_per_process()
            admitted, limit, remaining, retry_after = verdict
            if not admitted:
                self._count(api, metrics.RATE_LIMITED)
                if self.usage is not None:
                    self.usage.rate_limited(api, result.client_id)
                await _refuse(scope, receive, send, _too_many(limit, remaining, retry_after))
                return
            send = partial(
                _send_with_rate_headers,
                send,
                (
                    _RATE_LIMIT_PAIRS.get(limit) or _rate_limit_pair(limit),
                    (
                        _RATE_REMAINING,
                        _NUMBERS[remaining] if 0 <= remaining < 1024 else b"%d" % remaining,
                    ),
                ),
            )
        usage = self.usage
        if usage is not None:
            usage.admitted(api, result.client_id)  # a dict increment (keyguard.usage)
        if self._counting:
            self._count(api, metrics.ADMITTED)
        if self._strip and (secret_pair is not None or query_secret):
            child = dict(scope)
            if secret_pair is not None:
                headers = list(scope["headers"])
                headers.remove(secret_pair)
                child["headers"] = headers
            else:
                child["query_string"] = _without_secret(scope["query_string"])
            scope = child
        await self.app(scope, receive, send)

    async def _unavailable(
        self, scope: Scope, receive: Receive, send: Send, exc: Exception
    ) -> None:
        """Answer 503: a verification that could not start in time, a failing counter
        storage with ``rate_limit_fail="closed"`` (both expected under load, logged at
        DEBUG), or a failing store (logged at WARNING, at most every few seconds)."""
        if isinstance(exc, (VerificationBusy, RateLimiterUnavailable)):
            logger.debug("answering 503: %s", exc)
        else:
            self._log_store_failure(exc)
        await _refuse(scope, receive, send, _STORE_UNAVAILABLE)

    def _tell_per_process(self) -> None:
        self._told_per_process = True
        logger.info(
            "rate limits are counted per process (memory://): pass "
            "rate_limiter='redis://…' to share the counters between processes"
        )

    def _passes_unchecked(self, scope: Scope) -> bool:
        """Whether the request needs no credentials: an excluded path, or a preflight
        with ``allow_preflight``. Exclusions match the path the app routes on."""
        path = scope["path"]
        root_path = scope.get("root_path")
        if root_path and path.startswith(root_path):
            # The path the app routes on, as Starlette's router sees it.
            path = path[len(root_path) :] or "/"
        return (
            path in self._exclude_exact
            or (bool(self._exclude_prefixes) and self._excluded_prefix(path))
            or (self._preflight and scope.get("method") == "OPTIONS" and _is_preflight(scope))
        )

    def _closing_on_shutdown(self, send: Send) -> Send:
        async def sending(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await self.aclose()
            await send(message)

        return sending

    def _stripped(self, scope: Scope) -> Scope:
        """``scope`` without the secret header (or query parameter), for excluded paths."""
        secret_header = self._secret_header
        headers = scope["headers"]
        if any(name == secret_header for name, _ in headers):
            scope = dict(scope)
            scope["headers"] = [pair for pair in headers if pair[0] != secret_header]
        if self._query and scope.get("query_string"):
            stripped = _without_secret(scope["query_string"])
            if stripped != scope["query_string"]:
                scope = dict(scope)
                scope["query_string"] = stripped
        return scope

    async def _log_not_found(self, api: str) -> None:
        # A forgotten expose() or a wrong database file shows up in the log: once per
        # API per minute, and for at most a few APIs per minute (made-up names).
        now = time.monotonic()
        warned = self._not_found_warned
        last = warned.get(api)
        if last is not None and now - last < NOT_FOUND_LOG_INTERVAL:
            return
        for name, at in list(warned.items()):
            if now - at >= NOT_FOUND_LOG_INTERVAL:
                del warned[name]
        if len(warned) >= _MAX_NOT_FOUND_WARNINGS:
            logger.debug("api %s is unknown or not exposed, answering 404", api)
            return
        warned[api] = now
        try:
            reason = "not exposed" if not (await self.manager.get_api(api)).exposed else None
        except ApiNotFound:
            reason = "unknown"
        except Exception:
            reason = "unknown or not exposed"
        if reason is None:  # exposed meanwhile
            return
        logger.warning(
            "api %s is %s in %s: answering 404 (repeats within %d s not logged)",
            api,
            reason,
            _describe(self.manager.store),
            NOT_FOUND_LOG_INTERVAL,
        )

    def _log_store_failure(self, exc: Exception) -> None:
        # An outage fails every request: one warning (with the traceback) per
        # interval, the rest at DEBUG, so the log says what happened without drowning.
        now = time.monotonic()
        if now - self._last_failure_warning >= FAILURE_LOG_INTERVAL:
            self._last_failure_warning = now
            logger.warning(
                "key store failed, answering 503 (repeats within %d s logged at DEBUG): %s",
                FAILURE_LOG_INTERVAL,
                type(exc).__name__,
                exc_info=exc,
            )
        else:
            logger.debug("key store failed, answering 503: %s", type(exc).__name__)

    def _excluded_prefix(self, path: str) -> bool:
        for prefix in self._exclude_prefixes:
            if (path == prefix or path.startswith(prefix + "/")) and "/.." not in path:
                return True
        return False

    def _resolve_api(self, scope: Scope) -> str | None:
        assert self._api_func is not None
        try:
            name = self._api_func(scope)
        except Exception:
            logger.exception("the api= callable failed; answering 404")
            return None
        if not isinstance(name, str) or not API_NAME_PATTERN.fullmatch(name):
            return None
        return name

    def _remember_refusals(self, api: str) -> _ApiRefusals:
        if len(self._refusals) >= 1024:
            self._refusals.clear()
        refusals = self._refusals[api] = _ApiRefusals(api)
        return refusals


def _rate_limiter(store: KeyStore, given: object, fail: Literal["open", "closed"]) -> RateLimiter:
    if isinstance(given, RateLimiter):
        return given
    if given is None:
        inner = getattr(store, "store", store)
        url = getattr(inner, "counter_url", None)
        given = url if isinstance(url, str) else "memory://"
    if not isinstance(given, str):
        raise ConfigurationError("rate_limiter must be a counter storage URL or a RateLimiter")
    return RateLimiter(given, fail=fail)


_STARTS = frozenset({"http.response.start", "websocket.accept"})


def _send_with_rate_headers(
    send: Send, extra: tuple[tuple[bytes, bytes], ...], message: Message
) -> Awaitable[None]:
    """``send(message)``, adding ``extra`` (``X-RateLimit-Limit`` and
    ``X-RateLimit-Remaining``) to a response start (or websocket accept) in a copy of it,
    every other message, and so the body and its streaming, untouched. Bound to a request's
    ``send`` and headers with ``functools.partial`` (made in C, no frame of its own), it
    hands back ``send``'s own awaitable: one frame per message."""
    if message["type"] in _STARTS:
        message = {**message}
        message["headers"] = [*message.get("headers", ()), *extra]
    return send(message)


def _header_name(value: object, option: str) -> bytes:
    if (
        not isinstance(value, str)
        or not value
        or not value.isascii()
        or not all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in value)
    ):
        raise ConfigurationError(f"{option} must be a valid HTTP header name, got {value!r}")
    return value.lower().encode("ascii")


def _describe(store: object) -> str:
    description = getattr(store, "description", None)
    return description if isinstance(description, str) else repr(store)


def _is_preflight(scope: Scope) -> bool:
    names = {name for name, _ in scope["headers"]}
    return b"origin" in names and b"access-control-request-method" in names


def _without_secret(query_string: bytes) -> bytes:
    """The raw query string less its ``client_secret`` parameters, every other byte kept."""
    # Names are compared decoded, as parse_qsl read them: ``client%5Fsecret`` is the secret too.
    kept = [part for part in query_string.split(b"&") if _param_name(part) != "client_secret"]
    return b"&".join(kept)


def _param_name(part: bytes) -> str:
    return unquote(part.split(b"=", 1)[0].replace(b"+", b" ").decode("latin-1"), "latin-1")


async def _refuse(scope: Scope, receive: Receive, send: Send, refusal: _Refusal) -> None:
    status, headers, body, close_code = refusal
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": status, "headers": headers})
        # A HEAD refusal: the same status and headers (Content-Length too), no body.
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )
        return
    # A websocket handshake: read the connect event, then refuse.
    message: Message = await receive()
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": close_code, "reason": ""})
