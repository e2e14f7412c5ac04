"""keyguard's OpenTelemetry metrics (SPEC §10), recorded through the API only.

Where ``opentelemetry-api`` is installed (``pip install 'keyguard[otel]'``),
keyguard gets one Meter, ``keyguard`` (with keyguard's version), and records
three instruments; the application chooses the SDK, the readers and the
exporters (see docs/observability.md):

* ``keyguard.requests`` — counter of requests the middleware decided on,
  attributes ``api`` and ``outcome`` (one of :data:`OUTCOMES`);
* ``keyguard.store.duration`` — histogram of store calls in seconds (unit
  ``s``), attributes ``operation`` (the ``KeyStore`` method) and ``store``
  (``memory``, ``sqlite``, ``postgresql``, ``mysql``, ``redis``,
  ``redis+cluster``; another store class by its lowercased class name);
* ``keyguard.cache.lookups`` — counter of ``CachedStore`` lookups, attribute
  ``result`` (``hit``: the API's entry — its snapshot, or a large API's state — was
  fresh; ``miss``: it was not). A large API's key entries are not counted apart: a
  key read for one shows as a ``lookup`` in ``keyguard.store.duration``.

No client id, key name or secret is ever an attribute. ``api`` is bounded:
with a fixed ``api="orders"`` it is that name; with an ``api=`` callable it is
the name the callable returned only once the store has shown that API to be
exposed (a request for it got past the API check), for at most
:data:`MAX_API_NAMES` names per process; any other name — made up, unknown,
unexposed, or not yet resolved (a 400 comes before the API is asked for) — is
recorded as :data:`UNKNOWN_API`. So a flood of invented API names adds no
attribute sets.

The Meter comes from OpenTelemetry's global provider as it is when a
``KeyGuard``, ``KeyManager`` or ``CachedStore`` is made (set it up first, at
startup), or from the provider given to :func:`use_meter_provider` (tests, or
an app keeping keyguard's metrics apart).

Recording costs nothing where it could not count: without
``opentelemetry-api`` (nothing is imported; the import is tried once), and
while no provider is set up — the API's placeholder before any
``set_meter_provider``, or its ``NoOpMeterProvider`` (the API alone is in many
apps: FastAPI depends on it). The objects made then hold a no-op: the request
path calls a function that returns at once and builds no attributes, and the
store is used as it is, without a timing wrapper.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter, Histogram, MeterProvider

    from keyguard.manager import Denial
    from keyguard.stores.base import KeyStore

__all__ = [
    "ADMITTED",
    "API_NOT_AVAILABLE",
    "BAD_REQUEST",
    "CLIENT_ID_MISSING",
    "DISABLED",
    "DURATION_BUCKETS",
    "EXPIRED",
    "INVALID_SECRET",
    "MAX_API_NAMES",
    "NOT_REGISTERED",
    "OPERATIONS",
    "OUTCOMES",
    "RATE_LIMITED",
    "STORE_UNAVAILABLE",
    "UNKNOWN_API",
    "count_lookup",
    "counts",
    "request_counter",
    "store_name",
    "timed_store",
    "use_meter_provider",
]

METER_NAME = "keyguard"

ADMITTED = "admitted"
CLIENT_ID_MISSING = "client_id_missing"
NOT_REGISTERED = "not_registered"
INVALID_SECRET = "invalid_secret"  # noqa: S105 - an outcome, not a secret
DISABLED = "disabled"
EXPIRED = "expired"
RATE_LIMITED = "rate_limited"
API_NOT_AVAILABLE = "api_not_available"
BAD_REQUEST = "bad_request"
STORE_UNAVAILABLE = "store_unavailable"
OUTCOMES = (
    ADMITTED,
    CLIENT_ID_MISSING,
    NOT_REGISTERED,
    INVALID_SECRET,
    DISABLED,
    EXPIRED,
    RATE_LIMITED,
    API_NOT_AVAILABLE,
    BAD_REQUEST,
    STORE_UNAVAILABLE,
)
"""Every value of ``keyguard.requests``' ``outcome`` attribute (SPEC §10)."""

# The outcomes that only a request for an existing, exposed API can have: they make
# an ``api=`` callable's name one worth an attribute.
_EXPOSED_OUTCOMES = frozenset(OUTCOMES) - {API_NOT_AVAILABLE, BAD_REQUEST, STORE_UNAVAILABLE}

UNKNOWN_API = "_unknown"
"""The ``api`` attribute of a request whose API is not known to exist and be exposed
(it cannot be an API's name: those start with a letter or digit)."""

MAX_API_NAMES = 200
"""How many API names an ``api=`` callable's middleware records, per process."""

OPERATIONS = (
    "lookup",
    "snapshot",
    "page_keys",
    "get_api",
    "list_apis",
    "upsert_api",
    "insert_key",
    "get_key",
    "list_keys",
    "update_key",
    "set_secret_hash",
    "delete_key",
    "delete_api",
    "list_audit",
    "record_usage",
    "read_usage",
    "prune_usage",
)
"""The ``KeyStore`` methods timed in ``keyguard.store.duration`` (``aclose`` is not)."""

DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""The histogram's suggested bucket bounds in seconds, from 100 µs (a memory store) to
10 s (a store past its timeout); an SDK View may choose others."""

# The SQL dialects and store classes of keyguard.stores, by the ``store`` attribute.
_STORE_NAMES = {
    "MemoryStore": "memory",
    "RedisStore": "redis",
    "RedisClusterStore": "redis+cluster",
}
_SQL_NAMES = {"sqlite": "sqlite", "postgresql": "postgresql", "mysql": "mysql", "mariadb": "mysql"}


class _Instruments:
    """The three instruments of one provider's Meter."""

    def __init__(self, provider: MeterProvider) -> None:
        from keyguard import __version__

        meter = provider.get_meter(METER_NAME, __version__)
        self.requests: Counter = meter.create_counter(
            "keyguard.requests",
            unit="{request}",
            description="Requests KeyGuard decided on, by API and outcome.",
        )
        name, unit = "keyguard.store.duration", "s"
        description = "Duration of key store calls, by operation and store."
        try:
            self.store_duration: Histogram = meter.create_histogram(
                name, unit, description, explicit_bucket_boundaries_advisory=DURATION_BUCKETS
            )
        except TypeError:  # opentelemetry-api before 1.30: no advice; an SDK View may set them
            self.store_duration = meter.create_histogram(name, unit, description)
        self.cache_lookups: Counter = meter.create_counter(
            "keyguard.cache.lookups",
            unit="{lookup}",
            description="CachedStore lookups, by result (hit or miss).",
        )
        self.hit = {"result": "hit"}
        self.miss = {"result": "miss"}


_api_missing = False  # opentelemetry-api could not be imported (tried once)
_provider: MeterProvider | None = None  # use_meter_provider's
_made: tuple[MeterProvider, _Instruments] | None = None  # the last provider's instruments


def use_meter_provider(provider: MeterProvider | None) -> None:
    """Record the metrics of keyguard objects made from now on through ``provider``;
    ``None`` goes back to OpenTelemetry's global provider (the default).

    Objects made earlier keep the instruments they were given. Does nothing where
    ``opentelemetry-api`` is not installed.
    """
    global _provider
    _provider = provider


def _instruments() -> _Instruments | None:
    """The instruments to record into, or ``None``: without ``opentelemetry-api``, or while
    no provider that records is set up (the API's placeholder or its no-op provider).

    Called when a keyguard object is made, never per request; the import is tried once.
    """
    global _api_missing, _made
    if _api_missing:
        return None
    try:
        from opentelemetry import metrics
    except ImportError:
        _api_missing = True
        return None
    provider = _provider if _provider is not None else metrics.get_meter_provider()
    if not _records(provider):
        return None
    if _made is None or _made[0] is not provider:
        _made = (provider, _Instruments(provider))
    return _made[1]


def _records(provider: MeterProvider) -> bool:
    """Whether ``provider`` is one an application set up, so that recording can count.

    The API's global placeholder (no ``set_meter_provider`` yet) and ``NoOpMeterProvider``
    record nothing: keyguard then records nothing either, and its objects pay nothing —
    opentelemetry-api is installed in many apps that set up no SDK (FastAPI depends on it).
    """
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.metrics import _internal as api_internals

    placeholder = getattr(api_internals, "_ProxyMeterProvider", None)  # None: record
    return not isinstance(provider, NoOpMeterProvider) and not (
        isinstance(placeholder, type) and isinstance(provider, placeholder)
    )


# -- keyguard.requests --------------------------------------------------------------------


def _no_request(api: str | None, outcome: str | Denial) -> None:
    """Metrics off: nothing to record."""


def counts(count: Callable[[str | None, str | Denial], None] | Callable[[bool], None]) -> bool:
    """Whether ``count``, from :func:`request_counter` or :func:`count_lookup`, records
    anything (so that the busiest path may skip calling a no-op)."""
    return count is not _no_request and count is not _no_lookup


class _RequestCounter:
    """Counts one middleware's requests; ``count(api, outcome)`` is one dict read and an
    ``add`` once an attribute set exists."""

    __slots__ = ("_add", "_attributes", "_fixed", "_known", "_outcomes", "_unknown")

    def __init__(self, instruments: _Instruments, fixed_api: str | None) -> None:
        from keyguard.manager import Denial

        self._add = instruments.requests.add
        self._fixed = fixed_api
        self._known: set[str] = set()
        outcomes: dict[str | Denial, str] = {outcome: outcome for outcome in OUTCOMES}
        outcomes.update(
            {
                Denial.API_NOT_AVAILABLE: API_NOT_AVAILABLE,
                Denial.CLIENT_ID_MISSING: CLIENT_ID_MISSING,
                Denial.CLIENT_ID_NOT_REGISTERED: NOT_REGISTERED,
                Denial.INVALID_SECRET: INVALID_SECRET,
                Denial.DISABLED: DISABLED,
                Denial.EXPIRED: EXPIRED,
            }
        )
        self._unknown = {key: _request_attributes(UNKNOWN_API, o) for key, o in outcomes.items()}
        self._attributes: dict[tuple[str | None, str | Denial], Mapping[str, str]] = {}
        if fixed_api is not None:
            for key, outcome in outcomes.items():
                attributes = _request_attributes(fixed_api, outcome)
                self._attributes[fixed_api, key] = self._attributes[None, key] = attributes
        self._outcomes = outcomes

    def count(self, api: str | None, outcome: str | Denial) -> None:
        attributes = self._attributes.get((api, outcome))
        if attributes is None:
            attributes = self._attributes_for(api, outcome)
        self._add(1, attributes)

    def _attributes_for(self, api: str | None, outcome: str | Denial) -> Mapping[str, str]:
        name = self._outcomes[outcome]  # KeyError: not an outcome (a bug, not a request)
        if api is None or self._fixed is not None:
            # Another name than the fixed one cannot happen; count it as unknown anyway.
            return self._unknown[outcome]
        if api not in self._known:
            if name not in _EXPOSED_OUTCOMES or len(self._known) >= MAX_API_NAMES:
                return self._unknown[outcome]
            self._known.add(api)
        attributes = self._attributes[api, outcome] = _request_attributes(api, name)
        return attributes


def _request_attributes(api: str, outcome: str) -> Mapping[str, str]:
    return {"api": api, "outcome": outcome}


def request_counter(fixed_api: str | None) -> Callable[[str | None, str | Denial], None]:
    """``count(api, outcome)`` for one middleware (``fixed_api``: its ``api=`` name, or
    ``None`` for a callable): records into ``keyguard.requests``, or does nothing
    without ``opentelemetry-api`` or a provider set up. ``outcome`` is one of :data:`OUTCOMES` or a
    :class:`~keyguard.Denial`; ``api`` is the request's API name, ``None`` when not
    resolved."""
    instruments = _instruments()
    if instruments is None:
        return _no_request
    return _RequestCounter(instruments, fixed_api).count


# -- keyguard.cache.lookups -----------------------------------------------------------------


def _no_lookup(hit: bool) -> None:
    """Metrics off: nothing to record."""


def count_lookup() -> Callable[[bool], None]:
    """``count(hit)`` for one ``CachedStore``: records a hit or a miss into
    ``keyguard.cache.lookups``, or does nothing without ``opentelemetry-api`` or a
    provider set up."""
    instruments = _instruments()
    if instruments is None:
        return _no_lookup
    add, hit_attributes, miss_attributes = (
        instruments.cache_lookups.add,
        instruments.hit,
        instruments.miss,
    )

    def count(hit: bool) -> None:
        add(1, hit_attributes if hit else miss_attributes)

    return count


# -- keyguard.store.duration ----------------------------------------------------------------


def store_name(store: object) -> str:
    """The ``store`` attribute of ``store``: ``memory``, ``sqlite``, ``postgresql``,
    ``mysql`` (MariaDB too), ``redis``, ``redis+cluster``; a cache is named by the store
    it wraps, any other store by its lowercased class name."""
    from keyguard.stores.cache import CachedStore

    while isinstance(store, (CachedStore, _TimedStore)):
        store = store.store if isinstance(store, CachedStore) else store.timed
    for cls in type(store).__mro__:
        if cls.__module__.startswith("keyguard.stores."):
            if cls.__name__ == "SQLStore":
                dialect = getattr(getattr(store, "engine", None), "dialect", None)
                name = getattr(dialect, "name", "")
                return _SQL_NAMES.get(name, name or "sql")
            if cls.__name__ in _STORE_NAMES:
                return _STORE_NAMES[cls.__name__]
    return type(store).__name__.lower()


class _TimedStore:
    """``store`` with each :data:`OPERATIONS` call timed into ``keyguard.store.duration``,
    failures included; every other attribute is the store's own."""

    def __init__(self, store: KeyStore, histogram: Histogram, skip: frozenset[str]) -> None:
        # Not ``store``: that name is the wrapped store's own (a cache's inner store).
        self.timed = store
        name = store_name(store)
        record = histogram.record
        for operation in OPERATIONS:
            if operation not in skip and hasattr(store, operation):
                attributes = {"operation": operation, "store": name}
                setattr(self, operation, _timed(store, operation, record, attributes))

    def __getattr__(self, name: str) -> Any:
        # Only reached for what __init__ did not set: the store's own attributes.
        if name == "timed":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.timed, name)

    def __repr__(self) -> str:
        return repr(self.timed)


def _timed(
    store: KeyStore,
    operation: str,
    record: Callable[[float, Mapping[str, str]], None],
    attributes: Mapping[str, str],
) -> Callable[..., Any]:
    clock = time.perf_counter

    async def call(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            # Looked up at each call: a method replaced on the store (a test's) is used.
            return await getattr(store, operation)(*args, **kwargs)
        finally:
            record(clock() - start, attributes)

    call.__name__ = call.__qualname__ = operation
    return call


def timed_store(store: KeyStore) -> KeyStore:
    """``store`` with its calls timed into ``keyguard.store.duration``, or ``store`` itself
    without ``opentelemetry-api`` or a provider set up (or when it is timed already).

    A ``CachedStore``'s ``lookup`` is not timed here: it times its own reads of the store
    it wraps (what a lookup costs when it waits), and counts hits and misses.
    """
    from keyguard.stores.cache import CachedStore

    instruments = _instruments()
    if instruments is None or isinstance(store, _TimedStore):
        return store
    skip = frozenset({"lookup"}) if isinstance(store, CachedStore) else frozenset()
    return cast("KeyStore", _TimedStore(store, instruments.store_duration, skip))
