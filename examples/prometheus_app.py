"""A Starlette app behind KeyGuard, with keyguard's metrics served to Prometheus at /metrics.

Install:  pip install 'keyguard[otel]' opentelemetry-sdk opentelemetry-exporter-prometheus
Run it:   uvicorn examples.prometheus_app:app
Then call the curl line it prints at startup, and look at http://127.0.0.1:8000/metrics
(``keyguard_requests_total``, ``keyguard_store_duration_seconds``,
``keyguard_cache_lookups_total``; docs/observability.md has queries for them).

keyguard records through the OpenTelemetry API; this app chooses the SDK and its
Prometheus reader, once, before serving. The store comes from KEYGUARD_STORE
(default: memory://, gone when the app stops).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from keyguard import KeyGuard, KeyInfo, KeyManager, open_store

# The application's choice, made once per process: an SDK provider whose reader
# answers Prometheus' scrapes from prometheus_client's default registry.
metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))

store = open_store(os.environ.get("KEYGUARD_STORE", "memory://"))


async def orders(request: Request) -> JSONResponse:
    """Only callers with a valid key get here; KeyGuard says who they are."""
    caller: KeyInfo = request.state.keyguard
    return JSONResponse({"orders": [], "caller": caller.name})


async def prometheus_metrics(request: Request) -> Response:
    """Prometheus' text format. Excluded from key checks: let only the scraper reach it
    (a private port or network policy)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    manager = KeyManager(store)
    await manager.expose("orders")
    if not await manager.list_keys("orders"):
        key = await manager.create_key("orders", name="example", kind="internal")
        print(  # the secret is shown once, here
            "\nTry:\n  curl -i http://127.0.0.1:8000/orders"
            f" -H 'X-IBM-Client-Id: {key.client_id}' -H 'X-IBM-Client-Secret: {key.secret}'\n"
            "  curl http://127.0.0.1:8000/metrics\n",
            flush=True,
        )
    yield
    await store.aclose()


app = Starlette(
    routes=[Route("/orders", orders), Route("/metrics", prometheus_metrics)],
    lifespan=lifespan,
)
app.add_middleware(KeyGuard, store=store, api="orders", exclude_paths=["/metrics"])
