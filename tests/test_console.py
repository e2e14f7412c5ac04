"""How ``management_app`` serves the web console: what is public, with which headers.

The page's behaviour in a browser is tested in ``test_console_browser.py``;
this module pins the server side through httpx, without a browser.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from importlib.resources import files

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from keyguard import MemoryStore, management_app
from keyguard.console import CONSOLE_PATHS, CONTENT_SECURITY_POLICY, SCRIPT_MODULES

pytestmark = pytest.mark.anyio

TOKEN = "console-unit-token-0123456789-abc"
STATIC = files("keyguard") / "static"
MEDIA_TYPES = {
    "/": "text/html; charset=utf-8",
    "/console.css": "text/css; charset=utf-8",
    **{f"/{module}": "text/javascript; charset=utf-8" for module in SCRIPT_MODULES},
}
CONSOLE_FILES = ("console.html", "console.css", *SCRIPT_MODULES)
IMPORT = re.compile(r'^import\b[^;]*?\bfrom "\./([\w-]+\.js)";', re.MULTILINE | re.DOTALL)


def client_for(app: Starlette, prefix: str = "") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=f"http://testserver{prefix}"
    )


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(management_app(MemoryStore(), token=TOKEN)) as opened:
        yield opened


def test_the_console_paths_are_the_page_and_its_files() -> None:
    """Exactly these paths are public: the page, its stylesheet and its script modules."""
    assert set(MEDIA_TYPES) == CONSOLE_PATHS


def test_the_script_modules_are_every_script_shipped_and_each_is_imported() -> None:
    """Every ``.js`` file in ``static/`` is served, and every module but ``console.js`` is
    imported by another one by relative URL (a module left out would break the page only in a
    browser; a file left over would be served for nothing)."""
    shipped = sorted(item.name for item in STATIC.iterdir() if item.name.endswith(".js"))
    assert shipped == sorted(SCRIPT_MODULES)
    imported: set[str] = set()
    for module in SCRIPT_MODULES:
        text = (STATIC / module).read_text(encoding="utf-8")
        found = IMPORT.findall(text)
        assert set(found) <= set(SCRIPT_MODULES), module
        imported.update(found)
    assert imported == set(SCRIPT_MODULES) - {"console.js"}


@pytest.mark.parametrize("path", sorted(MEDIA_TYPES))
async def test_console_files_are_served_without_a_token(
    client: httpx.AsyncClient, path: str
) -> None:
    """Each console file is 200 to a GET with no token, with its media type and the CSP."""
    response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == MEDIA_TYPES[path]
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    # Not kept by any cache (the back-forward one included, which would bring back a page
    # that showed a secret), so an upgraded keyguard never runs yesterday's script either.
    assert response.headers["cache-control"] == "no-store"
    filename = "console.html" if path == "/" else path.lstrip("/")
    assert response.content == (STATIC / filename).read_bytes()


async def test_head_of_the_page_answers_without_a_body(client: httpx.AsyncClient) -> None:
    """HEAD / is public too, as GET is, and sends the headers without the page."""
    response = await client.head("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == MEDIA_TYPES["/"]
    assert response.content == b""


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_other_methods_on_the_page_need_the_token(
    client: httpx.AsyncClient, method: str
) -> None:
    """Only reading is public: any other method on ``/`` is 401 without a token, 405 with."""
    response = await client.request(method, "/")
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"
    response = await client.request(method, "/", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    "path",
    [
        "/apis",
        "/openapi.json",
        "/console.js/",
        "/console.html",
        "/console.css/x",
        "/static/console.js",
        "/keys.js/",
        "/times.mjs",
    ],
)
async def test_every_other_path_still_needs_the_token(client: httpx.AsyncClient, path: str) -> None:
    """The exemption is for the exact paths: the JSON routes and look-alikes are 401."""
    response = await client.get(path)
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"


async def test_console_works_under_a_mount() -> None:
    """Mounted at ``/keyguard``, the page is public at ``/keyguard/`` and the API is not."""
    app = Starlette(routes=[Mount("/keyguard", management_app(MemoryStore(), token=TOKEN))])
    async with client_for(app) as client:
        page = await client.get("/keyguard/")
        script = await client.get("/keyguard/console.js")
        apis = await client.get("/keyguard/apis")
    assert page.status_code == 200
    assert page.headers["content-type"] == MEDIA_TYPES["/"]
    assert script.status_code == 200
    assert apis.status_code == 401


async def test_console_can_be_turned_off() -> None:
    """With ``console=False`` there is no page: 401 without a token, 404 with one."""
    app = management_app(MemoryStore(), token=TOKEN, console=False)
    async with client_for(app) as client:
        anonymous = await client.get("/")
        signed_in = await client.get("/", headers={"Authorization": f"Bearer {TOKEN}"})
        script = await client.get("/console.js", headers={"Authorization": f"Bearer {TOKEN}"})
    assert anonymous.status_code == 401
    assert signed_in.status_code == 404
    assert script.status_code == 404


async def test_page_says_whether_it_must_ask_for_a_token() -> None:
    """The page is marked ``data-auth="token"`` normally and ``"none"`` under allow_no_auth."""
    async with client_for(management_app(MemoryStore(), token=TOKEN)) as client:
        guarded = (await client.get("/")).text
    async with client_for(management_app(MemoryStore(), allow_no_auth=True)) as client:
        open_page = (await client.get("/")).text
    assert '<body data-auth="token">' in guarded
    assert '<body data-auth="none">' in open_page


def test_console_files_fetch_nothing_from_elsewhere() -> None:
    """No absolute URL in the page, its stylesheet or its scripts: it works offline."""
    for filename in CONSOLE_FILES:
        text = (STATIC / filename).read_text(encoding="utf-8")
        assert re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}", text) == [], filename
        assert "@import" not in text, filename


def test_the_sign_in_form_never_puts_the_token_in_a_url() -> None:
    """Were the form ever submitted by the browser itself (before the script took it over,
    or without the CSP's form-action), the token would not land in a URL, where access logs,
    history and Referer keep it: its field has no name, and the form is a POST."""
    page = (STATIC / "console.html").read_text(encoding="utf-8")
    form = re.search(r'<form id="sign-in-form"[^>]*>(.*?)</form>', page, re.DOTALL)
    assert form is not None
    assert 'method="post"' in form.group(0)
    field = re.search(r'<input id="token"[^>]*>', form.group(1), re.DOTALL)
    assert field is not None
    assert 'type="password"' in field.group(0)
    assert re.search(r"\bname=", field.group(0)) is None


def test_page_loads_only_its_own_files() -> None:
    """The page's script and stylesheet are console files, by relative URL; the script is a
    module, so that it can import the others."""
    page = (STATIC / "console.html").read_text(encoding="utf-8")
    assert re.findall(r'<script type="module" src="([^"]+)"></script>', page) == ["console.js"]
    assert re.findall(r'<script[^>]*src="([^"]+)"', page) == ["console.js"]
    assert re.findall(r'<link rel="stylesheet" href="([^"]+)"', page) == ["console.css"]
    # No inline script or style: the CSP would block it, and it would weaken the policy.
    assert re.search(r"<script(?![^>]*\bsrc=)", page) is None
    assert "<style" not in page
    assert " style=" not in page
    assert re.search(r"<[^>]+\son[a-z]+=", page) is None


@pytest.mark.parametrize("module", SCRIPT_MODULES)
def test_script_never_writes_markup_from_data(module: str) -> None:
    """The scripts build the page with textContent and values only, never innerHTML & co."""
    script = (STATIC / module).read_text(encoding="utf-8")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    assert "localStorage" not in script  # the token lives in sessionStorage only
    assert "import(" not in script  # imports are static, all listed in SCRIPT_MODULES


async def test_a_server_set_root_path_is_honoured_exactly() -> None:
    """Under a server's root_path, ``/kg/`` is the public page, while ``/kg`` itself and
    look-alike prefixes stay behind the token."""
    app = management_app(MemoryStore(), token=TOKEN)
    transport = httpx.ASGITransport(app=app, root_path="/kg")
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        page = await client.get("/kg/")
        bare = await client.get("/kg")
        lookalike = await client.get("/kgconsole.js")
        apis = await client.get("/kg/apis")
    assert page.status_code == 200
    assert page.headers["content-type"] == MEDIA_TYPES["/"]
    assert bare.status_code == 401
    assert lookalike.status_code == 401
    assert apis.status_code == 401
