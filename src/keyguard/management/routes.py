"""The routes of the management API: one method per route, and the route table that both
the router and the OpenAPI document are built from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from keyguard.audit import DEFAULT_AUDIT_LIMIT, MAX_AUDIT_LIMIT
from keyguard.errors import InvalidRequest
from keyguard.management.auth import principal
from keyguard.management.bodies import (
    check_fields,
    expires_at_value,
    grace_seconds_value,
    meta_value,
    rate_limits_value,
    read_object,
    whole,
)
from keyguard.management.problems import ANSWER_HEADERS, json_response
from keyguard.manager import KeyManager
from keyguard.shapes import api_json, key_json, key_page_json, secret_json
from keyguard.stores._paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from keyguard.usage import MAX_USAGE_HOURS

DEFAULT_USAGE_HOURS = 24

__all__ = ["OPERATIONS", "Endpoints", "Operation"]


class Endpoints:
    """One method per route; each parses, calls ``KeyManager`` and formats."""

    def __init__(self, manager: KeyManager, document: dict[str, Any]) -> None:
        self.manager = manager
        self.document = document

    async def list_apis(self, request: Request) -> Response:
        apis = await self.manager.list_apis()
        return json_response({"apis": [api_json(api) for api in apis]})

    async def get_api(self, request: Request) -> Response:
        return json_response(api_json(await self.manager.get_api(request.path_params["api"])))

    async def update_api(self, request: Request) -> Response:
        body = await read_object(request, required=True)
        assert body is not None
        check_fields(body, allowed=("exposed", "max_keys_per_kind", "rate_limits"))
        # JSON has one number type: 5.0 and 5e0 are the integer 5 (as in JSON Schema).
        limit = whole(body.get("max_keys_per_kind"))
        api = await self.manager.update_api(
            request.path_params["api"],
            actor=_actor(request),
            exposed=body.get("exposed"),
            max_keys_per_kind=limit,
            # Never null here (checked above): an API's own list has no "inherit".
            rate_limits=rate_limits_value(body["rate_limits"]) if "rate_limits" in body else None,
        )
        return json_response(api_json(api))

    async def delete_api(self, request: Request) -> Response:
        force = request.query_params.getlist("force")
        if force not in ([], ["true"], ["false"]):
            raise InvalidRequest("force: must be given once, as true or false")
        await self.manager.delete_api(
            request.path_params["api"], force=force == ["true"], actor=_actor(request)
        )
        return Response(status_code=204, headers=ANSWER_HEADERS)

    async def list_keys(self, request: Request) -> Response:
        query = _single_query(request, ("limit", "after", "name"))
        page = await self.manager.page_keys(
            request.path_params["api"],
            limit=_page_limit(query.get("limit", str(DEFAULT_PAGE_SIZE))),
            after=query.get("after") or None,
            name=query.get("name") or None,
        )
        return json_response(key_page_json(page.keys, page.next))

    async def create_key(self, request: Request) -> Response:
        body = await read_object(request, required=True)
        assert body is not None
        check_fields(
            body,
            allowed=_CREATE_FIELDS,
            required=("name", "kind"),
            nullable=("expires_at", "rate_limits"),
        )
        key = await self.manager.create_key(
            request.path_params["api"],
            name=body["name"],
            kind=body["kind"],
            expires_at=expires_at_value(body.get("expires_at")),
            enabled=body.get("enabled", True),
            meta=meta_value(body["meta"]) if "meta" in body else None,
            rate_limits=rate_limits_value(body.get("rate_limits")),
            actor=_actor(request),
        )
        # Built from this app's own mount point (root_path), not with url_for: that resolves
        # through the outermost router, which cannot see inside a wrapped mount. Both parts
        # are URL-safe by construction (API names and client ids are restricted).
        root_path = request.scope.get("root_path", "")
        location = request.url.replace(
            path=f"{root_path}/apis/{key.api}/keys/{key.client_id}", query=""
        )
        return json_response(key_json(key), 201, {"Location": str(location)})

    async def get_key(self, request: Request) -> Response:
        params = request.path_params
        return json_response(
            key_json(await self.manager.get_key(params["api"], params["client_id"]))
        )

    async def update_key(self, request: Request) -> Response:
        body = await read_object(request, required=True)
        assert body is not None
        check_fields(body, allowed=_UPDATE_FIELDS, nullable=("expires_at", "rate_limits"))
        # Only the fields present change; an absent one stays UNCHANGED (null is a value).
        changes: dict[str, Any] = {}
        if "name" in body:
            changes["name"] = body["name"]
        if "enabled" in body:
            changes["enabled"] = body["enabled"]
        if "expires_at" in body:
            changes["expires_at"] = expires_at_value(body["expires_at"])
        if "meta" in body:
            changes["meta"] = meta_value(body["meta"])
        if "rate_limits" in body:
            changes["rate_limits"] = rate_limits_value(body["rate_limits"])
        params = request.path_params
        key = await self.manager.update_key(
            params["api"], params["client_id"], **changes, actor=_actor(request)
        )
        return json_response(key_json(key))

    async def set_secret(self, request: Request) -> Response:
        body = await read_object(request, required=False)
        grace = 0
        if body is not None:
            check_fields(body, allowed=("grace_seconds",))
            if "grace_seconds" in body:
                grace = grace_seconds_value(body["grace_seconds"])
        params = request.path_params
        secret = await self.manager.set_secret(
            params["api"], params["client_id"], grace=grace, actor=_actor(request)
        )
        return json_response(secret_json(secret))

    async def delete_key(self, request: Request) -> Response:
        params = request.path_params
        await self.manager.delete_key(params["api"], params["client_id"], actor=_actor(request))
        return Response(status_code=204, headers=ANSWER_HEADERS)

    async def audit(self, request: Request) -> Response:
        query = _single_query(request, ("api", "client_id", "limit", "before"))
        limit = query.get("limit", str(DEFAULT_AUDIT_LIMIT))
        if not limit.isascii() or not limit.isdigit() or len(limit) > 4:
            raise InvalidRequest(f"limit: a whole number from 1 to {MAX_AUDIT_LIMIT}")
        page = await self.manager.audit(
            query.get("api") or None,
            query.get("client_id") or None,
            limit=int(limit),
            before=query.get("before") or None,
        )
        return json_response(page.as_json())

    async def whoami(self, request: Request) -> Response:
        return json_response(principal(request.scope).as_json())

    async def api_usage(self, request: Request) -> Response:
        query = _single_query(request, ("hours", "limit", "after", "name"))
        limit = query.get("limit")
        usage = await self.manager.usage(
            request.path_params["api"],
            hours=_hours(request),
            limit=None if limit is None else _page_limit(limit),
            # Empty is not given, as GET …/keys reads them: "?after=" is the first page, not a
            # bad cursor, and "?name=" filters nothing (nor turns the answer into one page).
            after=query.get("after") or None,
            name=query.get("name") or None,
        )
        return json_response(usage)

    async def key_usage(self, request: Request) -> Response:
        _single_query(request, ("hours",))
        params = request.path_params
        usage = await self.manager.usage(params["api"], params["client_id"], hours=_hours(request))
        return json_response(usage)

    async def openapi(self, request: Request) -> Response:
        document = self.document
        root_path = request.scope.get("root_path", "")
        if root_path:
            document = {**document, "servers": [{"url": root_path}]}
        return json_response(document)


def _actor(request: Request) -> str:
    """The audit log's actor for this request: its token's name (``token:<name>``)."""
    return principal(request.scope).actor


def _single_query(request: Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query parameters, each at most once and each one of ``allowed``."""
    params = request.query_params
    for name in params:
        if name not in allowed:
            raise InvalidRequest(f"unknown query parameter {name[:40]!r}")
        if len(params.getlist(name)) > 1:
            raise InvalidRequest(f"{name}: give it at most once")
    return {name: params[name] for name in params}


def _page_limit(given: str) -> int:
    """``?limit=`` of a page of keys, as a number (``page_keys`` checks the range)."""
    if not given.isascii() or not given.isdigit() or len(given) > 4:
        raise InvalidRequest(f"limit: a whole number from 1 to {MAX_PAGE_SIZE}")
    return int(given)


def _hours(request: Request) -> int:
    """``?hours=`` of the usage routes: given at most once, a whole number (default 24);
    ``KeyManager.usage`` checks the range."""
    given = request.query_params.getlist("hours")
    if not given:
        return DEFAULT_USAGE_HOURS
    if len(given) > 1 or not given[0].isascii() or not given[0].isdigit() or len(given[0]) > 6:
        raise InvalidRequest(
            f"hours: must be given once, as a whole number from 1 to {MAX_USAGE_HOURS}"
        )
    return int(given[0])


_CREATE_FIELDS = ("name", "kind", "expires_at", "enabled", "meta", "rate_limits")
_UPDATE_FIELDS = ("name", "enabled", "expires_at", "meta", "rate_limits")


@dataclass(frozen=True)
class Operation:
    """One route: what the router needs and what the OpenAPI document says about it."""

    method: str
    path: str
    name: str
    summary: str
    status: int
    response: str | None  # a schema in components, or None for an empty body
    request: str | None = None  # the body's schema, if the route takes one
    request_required: bool = True
    errors: tuple[int, ...] = ()


_ON_API = (422, 503)  # every route with {api} validates the name and reads the store
_WITH_BODY = (413, 415)

OPERATIONS = (
    Operation("GET", "/apis", "list_apis", "List every API", 200, "ApiList", errors=(503,)),
    Operation("GET", "/apis/{api}", "get_api", "Get one API", 200, "Api", errors=(404, *_ON_API)),
    Operation(
        "PUT",
        "/apis/{api}",
        "update_api",
        "Create an API if needed and expose or un-expose it, or change its key limit",
        200,
        "Api",
        request="ApiUpdate",
        errors=(*_WITH_BODY, *_ON_API),
    ),
    Operation(
        "DELETE",
        "/apis/{api}",
        "delete_api",
        "Delete an API; while it has keys only with ?force=true, which deletes them too",
        204,
        None,
        errors=(404, 409, *_ON_API),
    ),
    Operation(
        "GET",
        "/apis/{api}/keys",
        "list_keys",
        "List an API's keys, a page at a time, oldest first (optionally by part of their name)",
        200,
        "KeyList",
        errors=_ON_API,
    ),
    Operation(
        "POST",
        "/apis/{api}/keys",
        "create_key",
        "Create a key; an internal key's secret is in this answer and never again",
        201,
        "IssuedKey",
        request="KeyCreate",
        errors=(409, *_WITH_BODY, *_ON_API),
    ),
    Operation(
        "GET",
        "/apis/{api}/keys/{client_id}",
        "get_key",
        "Get one key",
        200,
        "Key",
        errors=(404, *_ON_API),
    ),
    Operation(
        "PATCH",
        "/apis/{api}/keys/{client_id}",
        "update_key",
        "Change a key's name, enabled, expires_at, meta or rate_limits (either kind); "
        "only the fields given change",
        200,
        "Key",
        request="KeyUpdate",
        errors=(404, 409, *_WITH_BODY, *_ON_API),
    ),
    Operation(
        "PUT",
        "/apis/{api}/keys/{client_id}/secret",
        "set_secret",
        "Generate a new secret for an external key, replacing the previous one at once or "
        "after a grace period",
        200,
        "Secret",
        request="SecretRequest",
        request_required=False,
        errors=(404, 409, *_WITH_BODY, *_ON_API),
    ),
    Operation(
        "DELETE",
        "/apis/{api}/keys/{client_id}",
        "delete_key",
        "Delete a key; its next request fails",
        204,
        None,
        errors=(404, *_ON_API),
    ),
    Operation(
        "GET",
        "/audit",
        "audit",
        "The audit log, newest first: every change, who made it, what it changed",
        200,
        "AuditPage",
        errors=(422, 503),
    ),
    Operation(
        "GET",
        "/whoami",
        "whoami",
        "The token this request carries: its name, its audit actor, whether it is read-only",
        200,
        "WhoAmI",
    ),
    Operation(
        "GET",
        "/apis/{api}/usage",
        "api_usage",
        "Requests and 429s of an API per hour, and of each of its keys in total, over the "
        "last ?hours=24 hours",
        200,
        "ApiUsage",
        errors=(404, *_ON_API),
    ),
    Operation(
        "GET",
        "/apis/{api}/keys/{client_id}/usage",
        "key_usage",
        "Requests and 429s of one key per hour over the last ?hours=24 hours",
        200,
        "KeyUsage",
        errors=(404, *_ON_API),
    ),
    Operation("GET", "/openapi.json", "openapi", "This OpenAPI document", 200, "OpenApiDocument"),
)
