"""The management API fuzzed against its own OpenAPI document (schemathesis).

Every operation, with generated paths, bodies and headers: no 5xx ever, and
every response conforms to the document (status, content type, schema). The
key routes are fuzzed a second time on keys that exist (generated client ids
are all unknown), so that PATCH and the secret roll are exercised beyond 404.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from keyguard import KeyManager, MemoryStore, management_app

TOKEN = "fuzz-token-0123456789-abcdefghijk"

AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
schema = schemathesis.openapi.from_asgi(
    "/openapi.json", management_app(MemoryStore(), token=TOKEN), headers=AUTH
)


async def _seed(store: MemoryStore) -> list[str]:
    manager = KeyManager(store, max_keys_per_kind=1000)
    await manager.expose("orders")
    internal = await manager.create_key("orders", name="Staff", kind="internal")
    external = await manager.create_key("orders", name="Acme", kind="external")
    await manager.set_secret("orders", external.client_id)
    return [internal.client_id, external.client_id]


KEYED_STORE = MemoryStore()
KEY_IDS = itertools.cycle(asyncio.run(_seed(KEYED_STORE)))
keyed = (
    schemathesis.openapi.from_asgi(
        "/openapi.json", management_app(KEYED_STORE, token=TOKEN), headers=AUTH
    )
    .include(path_regex=r"\{client_id\}")
    .exclude(method="DELETE")
)


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_management_api_conforms(case: schemathesis.Case[Any]) -> None:
    """No generated request makes the management API fail or answer off its document."""
    # Not checked: "schema-valid data accepted". Schemathesis's generator does not always
    # honour the key-name `pattern` (it sends control characters the document excludes),
    # so it would report correct 422s as failures.
    case.call_and_validate(headers=AUTH, checks=CHECKS)


@keyed.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_key_routes_conform_on_existing_keys(case: schemathesis.Case[Any]) -> None:
    """GET, PATCH and PUT …/secret of keys that exist (internal and external in turn), with
    generated bodies: never a 5xx, every answer as documented."""
    case.path_parameters = {**(case.path_parameters or {}), "api": "orders"}
    case.path_parameters["client_id"] = next(KEY_IDS)
    case.call_and_validate(headers=AUTH, checks=CHECKS)
