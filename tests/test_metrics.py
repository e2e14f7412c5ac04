"""keyguard's OpenTelemetry metrics (SPEC §10), read back through the SDK's in-memory reader.

Each test gives keyguard a MeterProvider of its own (``keyguard.metrics.use_meter_provider``)
and takes it back afterwards, so no global provider is set and nothing leaks between tests.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Scope

from keyguard import KeyGuard, KeyManager, KeyStore, MemoryStore, metrics, open_store
from keyguard.errors import StoreUnavailable
from keyguard.models import utcnow
from keyguard.secrets import new_client_id
from keyguard.stores.base import KeyStore as KeyStoreProtocol
from keyguard.stores.base import Snapshots
from tests.backends import open_test_store
from tests.helpers import CountingStore, run_asgi

pytestmark = pytest.mark.anyio

ID = "X-IBM-Client-Id"
SECRET = "X-IBM-Client-Secret"
ROOT = Path(__file__).parent.parent


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    """An in-memory reader of a MeterProvider that keyguard objects made in the test use."""
    memory = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[memory])
    metrics.use_meter_provider(provider)
    try:
        yield memory
    finally:
        metrics.use_meter_provider(None)
        provider.shutdown()


@pytest.fixture(params=["memory", "sqlite"])
async def raw_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KeyStore]:
    """An empty memory or SQLite store, with no cache in front."""
    async with open_test_store(request.param, tmp_path) as opened:
        yield opened


Point = tuple[dict[str, Any], Any]


def points(reader: InMemoryMetricReader) -> dict[str, list[Point]]:
    """Every data point read now, by metric name: (attributes, value or histogram point)."""
    found: dict[str, list[Point]] = {}
    data = reader.get_metrics_data()
    if data is None:
        return found
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value: Any = point.value if isinstance(point, NumberDataPoint) else point
                    found.setdefault(metric.name, []).append((dict(point.attributes or {}), value))
    return found


def requests_by(reader: InMemoryMetricReader) -> dict[tuple[str, str], int]:
    """keyguard.requests as {(api, outcome): count}."""
    return {
        (attributes["api"], attributes["outcome"]): value
        for attributes, value in points(reader).get("keyguard.requests", [])
    }


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


def path_api(scope: Scope) -> str | None:
    """The API named by the path's first segment (``/orders/x`` → ``orders``)."""
    segment: str = scope["path"].split("/")[1]
    return segment or None


def app_for(store: KeyStore, api: str | Callable[[Scope], str | None] = path_api) -> KeyGuard:
    starlette = Starlette(routes=[Route("/{path:path}", hello)])
    return KeyGuard(starlette, store=store, api=api, usage_flush=None)


def client(app: KeyGuard) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def every_outcome(store: CountingStore) -> list[str]:
    """Send ``orders`` one request of each outcome of SPEC §10 through an ``api=`` callable's
    middleware over ``store``; the client ids, names and secrets used."""
    manager = KeyManager(store)
    await manager.expose("orders")
    good = await manager.create_key("orders", name="Acme Good", kind="internal")
    off = await manager.create_key("orders", name="Acme Off", kind="internal", enabled=False)
    old = await manager.create_key(
        "orders", name="Acme Old", kind="internal", expires_at=utcnow() - timedelta(days=1)
    )
    busy = await manager.create_key(
        "orders", name="Acme Busy", kind="internal", rate_limits=["1/hour"]
    )
    unknown = new_client_id()
    app = app_for(store)

    def creds(key: Any, secret: str | None = None) -> dict[str, str]:
        return {ID: key.client_id, SECRET: secret or key.secret}

    async with client(app) as http:
        expected = {
            200: [
                await http.get("/orders/a", headers=creds(good)),
                await http.get("/orders/b", headers=creds(busy)),
            ],
            401: [
                await http.get("/orders/a"),
                await http.get("/orders/a", headers={ID: unknown}),
                await http.get("/orders/a", headers=creds(good, "wrong-secret-value")),
                await http.get("/orders/a", headers=creds(off)),
                await http.get("/orders/a", headers=creds(old)),
            ],
            429: [await http.get("/orders/b", headers=creds(busy))],
            404: [await http.get("/ghost/a", headers=creds(good)), await http.get("/")],
            400: [await http.get("/orders/a", headers=[(ID, good.client_id), (ID, unknown)])],
        }
        store.fail_with = StoreUnavailable("store down")
        try:
            expected[503] = [await http.get("/orders/a", headers=creds(good))]
        finally:
            store.fail_with = None
    for status, responses in expected.items():
        assert [r.status_code for r in responses] == [status] * len(responses)
    used = [unknown, "wrong-secret-value"]
    for key in (good, off, old, busy):
        assert key.secret is not None
        used += [key.client_id, key.name, key.secret]
    return used


async def test_every_outcome_is_counted_by_api_and_outcome(
    reader: InMemoryMetricReader, raw_store: KeyStore
) -> None:
    """keyguard.requests counts each request once under its outcome: every value SPEC §10
    lists, on the memory and the SQLite store; an ``api=`` callable's API is named once the
    store has shown it exposed, and requests for an unknown API or none are ``_unknown``."""
    await every_outcome(CountingStore(raw_store))
    assert requests_by(reader) == {
        ("orders", "admitted"): 2,
        ("orders", "client_id_missing"): 1,
        ("orders", "not_registered"): 1,
        ("orders", "invalid_secret"): 1,
        ("orders", "disabled"): 1,
        ("orders", "expired"): 1,
        ("orders", "rate_limited"): 1,
        ("orders", "store_unavailable"): 1,
        ("_unknown", "api_not_available"): 2,
        ("_unknown", "bad_request"): 1,
    }
    assert {outcome for _, outcome in requests_by(reader)} == set(metrics.OUTCOMES)


async def test_no_attribute_holds_a_client_id_a_name_or_a_secret(
    reader: InMemoryMetricReader, raw_store: KeyStore
) -> None:
    """No data point of any keyguard metric carries a client id, key name or secret among
    its attributes, and the attribute keys are exactly SPEC §10's."""
    used = await every_outcome(CountingStore(raw_store))
    found = points(reader)
    assert set(found) >= {"keyguard.requests", "keyguard.store.duration"}
    keys = {
        "keyguard.requests": {"api", "outcome"},
        "keyguard.store.duration": {"operation", "store"},
    }
    for name, data in found.items():
        for attributes, _ in data:
            assert set(attributes) == keys[name]
            for value in attributes.values():
                assert not any(secret in str(value) for secret in used), (name, attributes)


async def test_a_fixed_api_names_its_requests(reader: InMemoryMetricReader) -> None:
    """With ``api="orders"`` every outcome carries that name, a 400 too; a middleware for an
    API never created records its configured name with api_not_available."""
    store = MemoryStore()
    await KeyManager(store).expose("orders")
    async with client(app_for(store, "orders")) as http:
        await http.get("/x")
        await http.get("/x", headers=[(ID, "a"), (ID, "b")])
    async with client(app_for(store, "ghost")) as http:
        await http.get("/x")
    assert requests_by(reader) == {
        ("orders", "client_id_missing"): 1,
        ("orders", "bad_request"): 1,
        ("ghost", "api_not_available"): 1,
    }


async def test_websocket_handshakes_and_excluded_paths(reader: InMemoryMetricReader) -> None:
    """A websocket handshake is counted like an HTTP request; a request to an excluded
    path passes without a decision and is not counted."""
    store = MemoryStore()
    await KeyManager(store).expose("orders")
    starlette = Starlette(routes=[Route("/{path:path}", hello)])
    guard = KeyGuard(
        starlette, store=store, api="orders", exclude_paths=["/health"], usage_flush=None
    )
    handshake: Scope = {"type": "websocket", "path": "/ws", "root_path": "", "headers": []}
    handshake.update(query_string=b"", scheme="ws", subprotocols=[])
    sent = await run_asgi(guard, handshake, [{"type": "websocket.connect"}])
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": ""}]
    async with client(guard) as http:
        assert (await http.get("/health")).status_code == 200
    assert requests_by(reader) == {("orders", "client_id_missing"): 1}


async def test_made_up_api_names_add_no_attribute_sets(
    reader: InMemoryMetricReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood of invented API names through an ``api=`` callable is counted under one
    ``_unknown`` attribute set; only exposed APIs are named, at most MAX_API_NAMES of them
    (further ones are ``_unknown`` too), and a named API keeps its name during an outage."""
    monkeypatch.setattr(metrics, "MAX_API_NAMES", 2)
    store = CountingStore(MemoryStore())
    manager = KeyManager(store)
    for api in ("one", "two", "three"):
        await manager.expose(api)
    async with client(app_for(store)) as http:
        for n in range(50):
            assert (await http.get(f"/made-up-{n}/x")).status_code == 404
        for api in ("one", "two", "three", "one"):
            assert (await http.get(f"/{api}/x")).status_code == 401
        store.fail_with = StoreUnavailable("store down")
        for api in ("one", "three", "made-up-0"):
            assert (await http.get(f"/{api}/x")).status_code == 503
    assert requests_by(reader) == {
        ("_unknown", "api_not_available"): 50,
        ("one", "client_id_missing"): 2,
        ("two", "client_id_missing"): 1,
        ("_unknown", "client_id_missing"): 1,
        ("one", "store_unavailable"): 1,
        ("_unknown", "store_unavailable"): 2,
    }


def durations(reader: InMemoryMetricReader) -> dict[tuple[str, str], HistogramDataPoint]:
    """keyguard.store.duration as {(operation, store): histogram point}."""
    return {
        (attributes["operation"], attributes["store"]): point
        for attributes, point in points(reader).get("keyguard.store.duration", [])
    }


async def test_store_calls_are_timed_by_operation_and_store(
    reader: InMemoryMetricReader, raw_store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Management calls and the request path's lookups are recorded in
    keyguard.store.duration, in seconds, named by the store method and the store's kind;
    a failing call is recorded too."""
    kind = "memory" if isinstance(raw_store, MemoryStore) else "sqlite"
    manager = KeyManager(raw_store)
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="internal")
    await manager.list_keys("orders")
    assert key.secret is not None
    headers = {ID: key.client_id, SECRET: key.secret}
    async with client(app_for(raw_store, "orders")) as http:
        for _ in range(3):
            assert (await http.get("/", headers=headers)).is_success

        async def failing(api: str, client_id: str | None) -> Any:
            raise StoreUnavailable("store down")

        monkeypatch.setattr(raw_store, "lookup", failing)
        assert (await http.get("/", headers=headers)).status_code == 503
    found = durations(reader)
    assert {"upsert_api", "insert_key", "list_keys", "lookup"} <= {op for op, _ in found}
    assert {name for _, name in found} == {kind}
    # Three lookups answered and one failed, each a positive number of seconds far below
    # a minute (the unit is seconds, not milliseconds).
    lookup = found["lookup", kind]
    assert lookup.count == 4
    assert 0 < lookup.min <= lookup.max < 60
    assert found["insert_key", kind].count == 1


async def test_a_cache_counts_hits_and_misses_and_times_its_reads(
    reader: InMemoryMetricReader, tmp_path: Path
) -> None:
    """Behind a CachedStore, a request without a fresh snapshot is a miss and later ones
    are hits; the reads that refresh the snapshot are timed under the wrapped store's
    kind, and the cache's own lookup is not timed (it is not a store call)."""
    store = open_store(f"sqlite:///{tmp_path / 'keys.db'}", cache_ttl=600)
    try:
        manager = KeyManager(store)
        await manager.expose("orders")
        key = await manager.create_key("orders", name="Acme", kind="internal")
        assert key.secret is not None
        before = durations(reader)
        async with client(app_for(store, "orders")) as http:
            for _ in range(4):
                headers = {ID: key.client_id, SECRET: key.secret}
                assert (await http.get("/", headers=headers)).is_success
            assert (await http.get("/")).status_code == 401
    finally:
        await store.aclose()
    lookups = {a["result"]: v for a, v in points(reader)["keyguard.cache.lookups"]}
    assert lookups == {"miss": 1, "hit": 4}
    after = durations(reader)
    assert ("lookup", "sqlite") not in after
    for operation in ("snapshot", "list_apis"):  # a refresh is one snapshot read
        earlier = before.get((operation, "sqlite"))
        assert after[operation, "sqlite"].count == (0 if earlier is None else earlier.count) + 1


async def test_store_names_follow_the_url_scheme(tmp_path: Path) -> None:
    """The ``store`` attribute names the kind of store, through a cache too: memory, sqlite,
    postgresql, mysql (MariaDB as well), redis, redis+cluster."""
    expected = {
        "memory://": "memory",
        f"sqlite:///{tmp_path / 'keys.db'}": "sqlite",
        "postgresql://u:p@127.0.0.1:1/db": "postgresql",
        "mysql://u:p@127.0.0.1:1/db": "mysql",
        "mariadb://u:p@127.0.0.1:1/db": "mysql",
        "redis://127.0.0.1:1": "redis",
        "redis+cluster://127.0.0.1:1,127.0.0.1:2": "redis+cluster",
    }
    for url, name in expected.items():
        store = open_store(url)
        try:
            assert metrics.store_name(store) == name, url
        finally:
            await store.aclose()


def test_every_store_method_is_timed() -> None:
    """OPERATIONS is every method of the KeyStore protocol but aclose, and the optional
    Snapshots one: a method added to a protocol is timed, or this test says it is not."""
    methods = {
        name
        for protocol in (KeyStoreProtocol, Snapshots)
        for name, member in inspect.getmembers(protocol)
        if inspect.iscoroutinefunction(member)
    }
    assert set(metrics.OPERATIONS) == methods - {"aclose"}


async def test_a_timed_store_is_not_timed_twice(reader: InMemoryMetricReader) -> None:
    """A manager's store handed to KeyGuard (or to another manager) is used as it is, so
    each call is recorded once; its attributes and repr are the wrapped store's."""
    inner = MemoryStore()
    manager = KeyManager(inner)
    assert manager.store is not inner
    assert repr(manager.store) == repr(inner)
    assert KeyManager(manager.store).store is manager.store
    assert app_for(manager.store, "orders").manager.store is manager.store
    await manager.expose("orders")
    assert durations(reader)["upsert_api", "memory"].count == 1


async def test_with_no_provider_set_up_nothing_is_wrapped_or_recorded(tmp_path: Path) -> None:
    """With opentelemetry-api installed but no provider set up (the API's placeholder, as
    in an app that only has the API through FastAPI) or a no-op provider, keyguard's
    objects record nothing and pay nothing: the store is not wrapped, the counters are
    no-ops."""
    from opentelemetry import metrics as otel
    from opentelemetry.metrics import NoOpMeterProvider

    assert type(otel.get_meter_provider()).__name__ == "_ProxyMeterProvider"  # none set
    for given in (None, NoOpMeterProvider()):
        metrics.use_meter_provider(given)
        try:
            store = MemoryStore()
            assert KeyManager(store).store is store
            guard = app_for(store, "orders")
            assert guard.manager.store is store
            assert guard._count is metrics._no_request
            cached = open_store(f"sqlite:///{tmp_path / 'keys.db'}")
            try:
                assert getattr(cached, "_count_lookup", None) is metrics._no_lookup
            finally:
                await cached.aclose()
        finally:
            metrics.use_meter_provider(None)


BLOCKED_RUN = """
import asyncio, json, sys

class Blocker:
    attempts = 0

    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            Blocker.attempts += 1
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
        return None

sys.meta_path.insert(0, Blocker())

import keyguard
from keyguard import KeyGuard, KeyManager, MemoryStore, metrics
from tests.helpers import run_asgi

async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})

async def main():
    store = MemoryStore()
    manager = KeyManager(store)
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="internal")
    guard = KeyGuard(app, store=store, api="orders", usage_flush=None)
    headers = [(b"x-ibm-client-id", key.client_id.encode()),
               (b"x-ibm-client-secret", key.secret.encode())]
    def scope(headers):
        return {"type": "http", "method": "GET", "path": "/", "root_path": "",
                "query_string": b"", "headers": headers}
    statuses = []
    for _ in range(20):
        sent = await run_asgi(guard, scope(headers))
        statuses.append(sent[0]["status"])
    sent = await run_asgi(guard, scope([]))
    statuses.append(sent[0]["status"])
    return {
        "statuses": sorted(set(statuses)),
        "attempts": Blocker.attempts,
        "imported": sorted(m for m in sys.modules if m.startswith("opentelemetry")),
        "raw_store": manager.store is store and guard.manager.store is store,
        "no_op": guard._count is metrics._no_request,
    }

print(json.dumps(asyncio.run(main())))
"""


def test_without_opentelemetry_nothing_is_imported_or_wrapped() -> None:
    """Where ``opentelemetry`` cannot be imported, ``import keyguard`` and requests through
    KeyGuard work, import nothing of it, try the import once (not per request), and leave
    the store unwrapped and the request counter a no-op."""
    import importlib.util

    assert importlib.util.find_spec("opentelemetry.metrics") is not None  # really installed
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {
        "statuses": [204, 401],
        "attempts": 1,
        "imported": [],
        "raw_store": True,
        "no_op": True,
    }
