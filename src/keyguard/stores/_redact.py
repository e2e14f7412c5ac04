"""Passwords masked in text that may hold a store URL (error messages, log lines).

A URL's password runs from the ``:`` after its user name to the last ``@`` of the URL:
RFC 3986 lets a password hold ``:`` unescaped, and passwords often hold an ``@``, ``/``
or ``?`` that should have been escaped. Masking too much (an ``@`` in a query) only
hides the host; masking too little would show part of a secret.
"""

from __future__ import annotations

import re

__all__ = ["redact"]

# [scheme://]user:password@… — the user has no ":", "/" or "@"; the password runs, over
# anything but whitespace and quotes (a URL quoted in a message ends there), to the URL's
# last "@". Without a scheme too: a URL missing its "scheme://" still carries a secret.
_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)?(?P<user>[^:/@\s'\"]*):(?P<password>[^\s'\"]*)@"
)


def _masked(match: re.Match[str]) -> str:
    scheme, user, password = match.group("scheme", "user", "password")
    if scheme is None and password.startswith("//"):
        return match.group(0)  # "scheme://user@host": no password, the ":" was the scheme's
    return f"{scheme or ''}{user}:***@"


def redact(text: object) -> str:
    """``text`` (``str()`` of it) with the password of every URL in it shown as ``***``."""
    return _USERINFO.sub(_masked, str(text))
