"""open_store: URL in, store out, no I/O, clear errors (SPEC §7)."""

from __future__ import annotations

import pytest

from keyguard import MemoryStore, open_store
from keyguard.errors import ConfigurationError
from keyguard.stores._redact import redact


def test_memory_stores_are_independent() -> None:
    """Each memory:// call gives a new, independent store, without an event loop."""
    a, b = open_store("memory://"), open_store("memory://")
    assert isinstance(a, MemoryStore)
    assert a is not b


@pytest.mark.parametrize("url", ["ftp://host/x", "mongodb://localhost", "keys.db", "", "memory:"])
def test_unknown_or_malformed_url(url: str) -> None:
    """An unknown scheme or a string that is no URL is a ConfigurationError listing the schemes."""
    with pytest.raises(ConfigurationError, match=r"memory://") as info:
        open_store(url)
    assert info.value.code == "configuration_error"


def test_password_not_echoed_in_errors() -> None:
    """A URL's password never appears in the error about it."""
    with pytest.raises(ConfigurationError) as info:
        open_store("nosuch://user:hunter2@host/db")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        open_store("user:hunter2@host")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "nosuch://user:top:hunter2@host/db",  # ":" unescaped in a password (RFC 3986)
        "nosuch://user:top@hunter2@host/db",  # an "@" that should have been escaped
        "redis+cluster://user:top:hunter2@127.0.0.1:1/3",  # a cluster has database 0 only
        "redis+cluster://user:top:hunter2@127.0.0.1:1?x=1",  # no query on a cluster URL
        "redis+cluster://user:top:hunter2@127.0.0.1:99999",  # a bad port
    ],
)
def test_no_part_of_a_password_is_echoed(url: str) -> None:
    """Every part of a password holding ``:`` or ``@`` is masked in the error about its
    URL: the mask runs from the user's ``:`` to the URL's last ``@``."""
    with pytest.raises(ConfigurationError) as info:
        open_store(url)
    message = str(info.value)
    assert "hunter2" not in message
    assert "top" not in message
    if "user" in message:  # (an unknown scheme's error does not repeat the URL)
        assert "user:***@" in message


def test_redact_masks_every_url_in_a_text() -> None:
    """``redact`` masks each URL's password in a message holding several, quoted or not,
    and leaves URLs without one as they are."""
    text = "a 'postgresql://a:p:1@h/db' and mysql://c:p@2@e, then redis://h:6379/0"
    assert redact(text) == "a 'postgresql://a:***@h/db' and mysql://c:***@e, then redis://h:6379/0"


def test_memory_takes_no_options() -> None:
    """Options a store does not understand are refused, not ignored."""
    with pytest.raises(ConfigurationError, match="options"):
        open_store("memory://", timeout=3)


@pytest.mark.parametrize("url", ["memory://", "sqlite:///never-created.db"])
@pytest.mark.parametrize("ttl", [-1, -0.5, 3601, float("nan"), "1", True])
def test_bad_cache_ttl_is_refused_by_every_store(url: str, ttl: object) -> None:
    """A cache TTL out of range is a ConfigurationError for memory:// as for SQLite."""
    with pytest.raises(ConfigurationError, match="cache ttl"):
        open_store(url, cache_ttl=ttl)  # type: ignore[arg-type]


def test_memory_accepts_the_cache_ttl_values_that_mean_no_cache() -> None:
    """memory:// accepts 0, None and an in-range TTL (it needs no cache)."""
    for ttl in (0, None, 1.0):
        assert isinstance(open_store("memory://", cache_ttl=ttl), MemoryStore)
