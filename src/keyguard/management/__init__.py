"""``management_app``: the management HTTP API (SPEC §5): HTTP in, ``KeyManager`` calls, HTTP out.

``app.mount("/keyguard", management_app(store, token=os.environ["KEYGUARD_TOKEN"]))``

Every route needs ``Authorization: Bearer <token>``, checked before routing so
that nothing, not even which routes exist, is revealed without it. Every error
is an RFC 9457 problem details object (``application/problem+json``) whose
``code`` member is the ``KeyGuardError.code`` (or one of this package's own:
``unauthorized``, ``forbidden`` (a ``ReadOnly`` token asking for a change),
``not_found``, ``method_not_allowed``, ``request_too_large``,
``unsupported_media_type``, ``internal_error``). The rules themselves live in
``KeyManager``; this package only parses, calls and formats.

The JSON of APIs, keys and secrets is :mod:`keyguard.shapes`, shared with the
command line, so ``keyguard --json`` prints exactly what this API answers (its
names are re-exported here). The modules, by concept: ``problems`` (problem
details, status codes and the no-store responses), ``auth`` (the bearer
tokens: named ones, and ``ReadOnly`` ones), ``bodies`` (reading and checking
request bodies), ``routes`` (one method per route, and the route table),
``openapi`` (the document built from that table) and ``app`` (all of it put
together, with the error handlers).
"""

from __future__ import annotations

from keyguard.management.app import management_app
from keyguard.management.auth import MIN_TOKEN_LENGTH, ReadOnly
from keyguard.management.bodies import MAX_BODY_BYTES, MAX_GRACE_SECONDS
from keyguard.management.openapi import openapi_document
from keyguard.management.problems import PROBLEM_MEDIA_TYPE, problem_json, status_for
from keyguard.shapes import api_json, key_json, rate_limits_json, secret_json

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_GRACE_SECONDS",
    "MIN_TOKEN_LENGTH",
    "PROBLEM_MEDIA_TYPE",
    "ReadOnly",
    "api_json",
    "key_json",
    "management_app",
    "openapi_document",
    "problem_json",
    "rate_limits_json",
    "secret_json",
    "status_for",
]
