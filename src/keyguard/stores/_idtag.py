"""What every store shares about its client id tag key (``IdTagKeys``): its text form."""

from __future__ import annotations

import logging
import secrets

from keyguard.errors import StoreUnavailable
from keyguard.stores.base import ID_TAG_KEY_BYTES

__all__ = ["ID_TAG_LOST_ROW", "ID_TAG_ROW", "new_tag_key_text", "parse_tag_key", "report_lost"]

logger = logging.getLogger("keyguard")

ID_TAG_ROW = "id_tag_key"
"""The key's name where a store names it (SQL: a row of ``<prefix>meta``)."""

ID_TAG_LOST_ROW = "id_tag_key_lost"
"""The mark a store keeps once its tag key was found missing while it held tagged client
ids (SQL: a row of ``<prefix>meta``; Redis: ``<prefix>idtag:lost``): the ids tagged
under the lost key cannot be checked by their tag any more, so from then on an id whose
tag does not verify is looked up rather than refused (``IdTags``)."""


def report_lost(where: str, *, found_now: bool) -> None:
    """Log that ``where``'s tag key was lost (``found_now``: by this call, an ERROR; else
    a WARNING as each store object reads the mark). Never a key's value."""
    what = (
        "the client id tag key was missing while the store held tagged client ids; a new "
        "one was made"
        if found_now
        else "the client id tag key was lost once and made anew"
    )
    logger.log(
        logging.ERROR if found_now else logging.WARNING,
        "%s: %s. Ids issued before cannot be checked by their tag, so every well-formed "
        "client id is now looked up in the store (made-up ids cost reads, bounded by the "
        "cache, as before tags); see docs/security.md, 'Keeping the tag key'",
        where,
        what,
    )


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
