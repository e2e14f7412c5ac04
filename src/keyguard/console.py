"""The web console: the "Sharing & keys" page, served by ``management_app`` at its root.

The page is static files shipped in the package (``static/``): HTML, CSS and
plain JavaScript modules (``console.js`` imports the others), with no build
step and nothing fetched from anywhere else, so it works offline and behind a
firewall. In the browser it calls the
management API's JSON routes (SPEC §5) with the bearer token the operator
types in once; the page keeps the token in ``sessionStorage`` (that tab only).

These files hold no data, and a browser's address bar cannot send a bearer
token, so they are the only answers given without one: ``GET`` and ``HEAD`` of
exactly these paths. Every JSON route still needs the token. The page is
served with a strict Content-Security-Policy (its own scripts, styles and
origin only; no framing), so a key name such as ``<script>`` could not run
even if the page ever inserted it as markup, which it does not.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["CONSOLE_PATHS", "CONTENT_SECURITY_POLICY", "SCRIPT_MODULES", "console_routes"]

_JAVASCRIPT = "text/javascript; charset=utf-8"

# The page's script modules: console.js, and the modules it imports (by relative URL).
SCRIPT_MODULES = (
    "actions.js",
    "console.js",
    "core.js",
    "dialogs.js",
    "edits.js",
    "keys.js",
    "limits.js",
    "pages.js",
    "times.js",
    "usage.js",
)

# Route path inside the management app -> (file in keyguard/static, media type).
_FILES = {
    "/": ("console.html", "text/html; charset=utf-8"),
    "/console.css": ("console.css", "text/css; charset=utf-8"),
    **{f"/{module}": (module, _JAVASCRIPT) for module in SCRIPT_MODULES},
}

CONSOLE_PATHS = frozenset(_FILES)
"""The paths (inside the management app) answered without a bearer token, to GET and HEAD."""

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        # The script never writes markup, so the DOM's HTML sinks can be shut entirely.
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    ]
)
"""The page may load only its own files and call only its own origin; nobody may frame it."""

_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Kept by no cache, the back-forward one included: an upgraded keyguard never runs
    # yesterday's script, and a page that showed a secret is not brought back from memory.
    "Cache-Control": "no-store",
}


def _serve(body: bytes, media_type: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return Response(body, media_type=media_type, headers=_HEADERS)

    return endpoint


def console_routes(*, token_required: bool = True) -> list[Route]:
    """The console's routes, its files read from the package once, here.

    ``token_required=False`` (an app built with ``allow_no_auth``) marks the
    page so that it does not ask for a token.
    """
    static = files("keyguard") / "static"
    contents = {filename: (static / filename).read_bytes() for filename, _ in _FILES.values()}
    if not token_required:
        page = contents["console.html"]
        contents["console.html"] = page.replace(b'data-auth="token"', b'data-auth="none"', 1)
    return [
        Route(
            path,
            _serve(contents[filename], media_type),
            methods=["GET"],
            name=f"console:{filename}",
            include_in_schema=False,
        )
        for path, (filename, media_type) in _FILES.items()
    ]
