"""What every store shares about its client id tag key (``IdTagKeys``): its text form."""

from __future__ import annotations

import secrets

from keyguard.errors import StoreUnavailable
from keyguard.stores.base import ID_TAG_KEY_BYTES

__all__ = ["ID_TAG_ROW", "new_tag_key_text", "parse_tag_key"]

ID_TAG_ROW = "id_tag_key"
"""The key's name where a store names it (SQL: a row of ``<prefix>meta``)."""


def new_tag_key_text() -> str:
    """A candidate tag key, as the store keeps it: ``ID_TAG_KEY_BYTES`` random bytes in hex."""
    return secrets.token_hex(ID_TAG_KEY_BYTES)


def parse_tag_key(text: object, where: str) -> bytes:
    """The tag key a store gave back, or ``StoreUnavailable`` naming ``where`` (never the
    value) when it is not ``ID_TAG_KEY_BYTES`` bytes in hex."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    try:
        key = bytes.fromhex(text) if isinstance(text, str) else b""
    except ValueError:
        key = b""
    if len(key) != ID_TAG_KEY_BYTES:
        raise StoreUnavailable(f"{where}: the client id tag key is damaged")
    return key
