"""A FastAPI app behind KeyGuard with ``document_keyguard``, fuzzed against its own document.

Issue 12 item 11: before ``document_keyguard`` stated KeyGuard's refusals,
schemathesis reported every 401 as an undocumented status (ST103). Here every
answer KeyGuard gives (400, 401, 429, …) must be in the document, with its
headers, and no generated request may make the app fail.
"""

from __future__ import annotations

import asyncio
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    status_code_conformance,
)

from keyguard import KeyManager, MemoryStore
from keyguard.fastapi import document_keyguard
from tests.test_fastapi_helper import build

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
]
STORE = MemoryStore()


async def _seed() -> str:
    manager = KeyManager(STORE)
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external", rate_limits=["1/hour"])
    return key.client_id


CLIENT_ID = asyncio.run(_seed())
APP = build(STORE)
document_keyguard(APP)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP).include(
    path_regex="^/(whoami|guarded|plan)$"
)
SEEN: set[int] = set()


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_refusal_is_documented(case: schemathesis.Case[Any]) -> None:
    """Generated credentials (and, every other case, the real key, which is soon rate
    limited): every status and header conforms to the document."""
    if len(SEEN) % 2 == 0:
        headers = case.headers
        headers["X-IBM-Client-Id"] = CLIENT_ID
        headers.pop("X-IBM-Client-Secret", None)
    response = case.call_and_validate(checks=CHECKS)
    SEEN.add(response.status_code)
