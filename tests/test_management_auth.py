"""The bearer check of the management API, probed at the edges (SPEC §5).

Every route of the app's own route table, and every method on it, is tried with a
read-only token; ``Authorization`` headers are sent as raw ASGI bytes, so that names in
any case, non-ASCII bytes and huge values reach the check exactly as given.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.routing import Route

from keyguard import MemoryStore, ReadOnly, management_app
from keyguard.errors import ConfigurationError

pytestmark = pytest.mark.anyio

OPS = "ops-token-0123456789-abcdefghijklmnop"
VIEWER = "viewer-token-0123456789-abcdefghijkl"
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND")


def _app() -> Any:
    return management_app(MemoryStore(), tokens={"ops": OPS, "dashboard": ReadOnly(VIEWER)})


def _client(app: Any, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://t",
        headers={"Authorization": f"Bearer {token}"},
    )


async def _raw(app: Any, headers: list[tuple[bytes, bytes]], method: str = "GET") -> int:
    """The status ``app`` answers ``method /apis`` with, given exactly these headers."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/apis",
        "raw_path": b"/apis",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "server": ("t", 80),
        "client": ("c", 1),
    }
    await app(scope, receive, send)
    status: int = sent[0]["status"]
    return status


async def test_a_read_only_token_changes_nothing_on_any_route_of_the_table() -> None:
    """Every route the app has, console files included, and every method other than GET and
    HEAD: a read-only token is 403 ``forbidden``, and nothing changes; GET and HEAD are never
    403. The routes come from the app itself, so a route added later is covered too."""
    app = _app()
    async with _client(app, OPS) as ops, _client(app, VIEWER) as viewer:
        assert (await ops.put("/apis/orders", json={"exposed": True})).status_code == 200
        made = await ops.post("/apis/orders/keys", json={"name": "Acme", "kind": "external"})
        client_id = made.json()["client_id"]
        before = (await ops.get("/audit")).json()
        routes = [route for route in app.routes if isinstance(route, Route)]
        assert len(routes) >= 10
        for route in routes:
            path = route.path.replace("{api}", "orders").replace("{client_id}", client_id)
            for method in METHODS:
                body = {"exposed": False, "name": "X", "kind": "internal"}
                answer = await viewer.request(method, path, json=body)
                if method in ("GET", "HEAD"):
                    assert answer.status_code != 403, (method, path)
                    continue
                assert answer.status_code == 403, (method, path)
                assert answer.headers["content-type"] == "application/problem+json"
                assert answer.json()["code"] == "forbidden"
                assert VIEWER not in answer.text
        assert (await ops.get("/audit")).json() == before
        assert (await ops.get(f"/apis/orders/keys/{client_id}")).json()["name"] == "Acme"


async def test_two_authorization_headers_are_refused_whatever_their_spelling() -> None:
    """A second ``Authorization`` header is refused even when its name is not lowercase (an
    app or middleware in front may pass names as they were sent); one header in any case is
    read."""
    app = _app()
    good = b"Bearer " + OPS.encode()
    for names in ((b"authorization", b"Authorization"), (b"AUTHORIZATION", b"authorization")):
        headers = [(names[0], good), (names[1], b"Bearer wrong-token")]
        assert await _raw(app, headers) == 401, names
        assert await _raw(app, list(reversed(headers))) == 401, names
    assert await _raw(app, [(b"Authorization", good)]) == 200


async def test_a_method_in_lowercase_is_not_a_read() -> None:
    """HTTP methods are case-sensitive: ``get`` or ``delete`` as sent is not ``GET``, so a
    read-only token is refused (403) rather than let through."""
    app = _app()
    viewer = [(b"authorization", b"Bearer " + VIEWER.encode())]
    for method in ("get", "head", "delete", "Put"):
        assert await _raw(app, viewer, method) == 403, method


@pytest.mark.parametrize(
    "value",
    [
        b"Bearer \xff\xfe" + b"o" * 40,
        b"Bearer " + "é".encode() * 20,
        b"Bearer " + OPS.encode() + b"\xc3\xa9",
        b"\xffBearer " + OPS.encode(),
        b"Bearer\xa0" + OPS.encode(),
        b"Bearer\t" + OPS.encode(),
        b"Bearer \x00" + OPS.encode(),
        b"Bearer " + OPS.encode() + b" " + OPS.encode(),
        b"Bearer " + b"x" * (1 << 20),
        b"B" * (1 << 20),
        b"",
        b"   ",
    ],
    ids=[
        "latin1",
        "utf8",
        "token-then-utf8",
        "byte-before-scheme",
        "nbsp",
        "tab",
        "nul",
        "two-tokens",
        "huge-token",
        "huge-scheme",
        "empty",
        "spaces",
    ],
)
async def test_odd_authorization_headers_are_401_never_500(value: bytes) -> None:
    """Non-ASCII bytes, other separators, two tokens or a megabyte of header: 401."""
    assert await _raw(_app(), [(b"authorization", value)]) == 401


@pytest.mark.parametrize(
    "value",
    [f"bearer {OPS}", f"BEARER {OPS}", f"Bearer    {OPS}   ", f"  Bearer {OPS}"],
    ids=["lower", "upper", "extra-spaces", "leading-spaces"],
)
async def test_scheme_case_and_spaces_around_the_token_are_accepted(value: str) -> None:
    assert await _raw(_app(), [(b"authorization", value.encode())]) == 200


@pytest.mark.parametrize(
    "tokens",
    [
        {"ops": OPS, "OPS": VIEWER},
        {"Admin": OPS, "admin": ReadOnly(VIEWER)},
    ],
    ids=["two-admins", "admin-and-read-only"],
)
def test_token_names_differing_only_in_case_are_refused(tokens: dict[str, Any]) -> None:
    """A token's name is its actor in the audit log: two that differ only in case would read
    as one person there, so building the app says which two they are."""
    with pytest.raises(ConfigurationError, match="differ only in case") as caught:
        management_app(MemoryStore(), tokens=tokens)
    assert OPS not in str(caught.value)
    assert VIEWER not in str(caught.value)


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
async def test_a_cross_site_form_cannot_change_anything_without_a_token(
    content_type: str,
) -> None:
    """Behind a proxy that authenticates with cookies (``allow_no_auth=True``), another site
    can still make the browser send a "simple" request: a POST with a form's media type and
    no preflight. The only POST route refuses every body that is not JSON (415), so such a
    request creates nothing; the other changes are PUT, PATCH and DELETE, which no form can
    send and which a browser preflights (and this app answers no CORS)."""
    app = management_app(MemoryStore(), allow_no_auth=True)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.put("/apis/orders", json={"exposed": True})).status_code == 200
        body = '{"name": "Mallory", "kind": "internal"}'
        answer = await c.post(
            "/apis/orders/keys",
            content=body,
            headers={"Content-Type": content_type, "Origin": "https://evil.example"},
        )
        assert answer.status_code == 415
        assert answer.json()["code"] == "unsupported_media_type"
        assert "access-control-allow-origin" not in answer.headers
        assert (await c.get("/apis/orders/keys")).json()["keys"] == []
        preflight = await c.options(
            "/apis/orders",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "DELETE"},
        )
        assert "access-control-allow-origin" not in preflight.headers


async def test_no_answer_or_log_line_holds_a_token(caplog: pytest.LogCaptureFixture) -> None:
    """A wrong token, a near miss of a right one, a read-only token asking for a change, an
    unknown route, a 405: no answer (body or headers) and no log line holds the token sent
    or any configured token."""
    caplog.set_level("DEBUG")
    app = _app()
    near = OPS[:-1] + "!"
    answers = []
    for token, method, path in (
        (near, "GET", "/apis"),
        (OPS + OPS, "GET", "/apis"),
        (VIEWER, "DELETE", "/apis/orders"),
        (OPS, "GET", "/no/such/route"),
        (OPS, "POST", "/apis"),
        (OPS, "PUT", "/apis/orders"),
    ):
        async with _client(app, token) as c:
            answers.append(await c.request(method, path, content=b"{not json"))
    assert [a.status_code for a in answers] == [401, 401, 403, 404, 405, 415]
    for answer in answers:
        seen = answer.text + repr(answer.headers.multi_items())
        for secret in (OPS, VIEWER, near, OPS[:16]):
            assert secret not in seen
    for secret in (OPS, VIEWER, near, OPS[:16]):
        assert secret not in caplog.text
