"""What a ``redis://`` URL may hold: refused at once when redis-py would misread it.

No server is needed: opening a store does no I/O.
"""

from __future__ import annotations

import pytest

from keyguard.errors import ConfigurationError
from keyguard.stores.redis import RedisStore


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cr3t/tail@127.0.0.1:6379/0",
        "redis://app:s3cr3t?tail@127.0.0.1:6379/0",
        "redis://:s3cr3t#tail@127.0.0.1:6379/0",
        # The part before the "?" is a number: read as a port on localhost, no password.
        "redis://:6380?tail@127.0.0.1:6379/0",
    ],
)
def test_a_password_with_an_unescaped_slash_or_question_mark_is_refused_unshown(url: str) -> None:
    """A password holding a raw '/', '?' or '#' is a ConfigurationError saying to
    percent-encode it, quoting no part of it (redis-py's parser quoted the part before
    the '/' as a bad port, or silently connected to that 'port' without the password)."""
    with pytest.raises(ConfigurationError, match="percent-encoded") as raised:
        RedisStore.from_url(url)
    message = str(raised.value)
    for part in ("s3cr3t", "tail", "6380"):
        assert part not in message


@pytest.mark.parametrize("path", ["/l", "/1/2", "/0x1", "/db1"])
def test_a_database_path_that_is_not_a_number_is_refused(path: str) -> None:
    """A path other than a database number is a ConfigurationError: redis-py ignored it
    (database 0, another app's, for a mistyped '/l') or read '/1/2' as database 12."""
    with pytest.raises(ConfigurationError, match="database number"):
        RedisStore.from_url(f"redis://127.0.0.1:6379{path}")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:p%2Fw%3Fx@127.0.0.1:6379/3", {"password": "p/w?x", "db": 3}),
        ("redis://:p@ss@127.0.0.1:6379/", {"password": "p@ss"}),
        ("redis://127.0.0.1:6379/0?client_name=me@home", {"client_name": "me@home", "db": 0}),
        ("redis://127.0.0.1:6379/%31", {"db": 1}),
        ("redis://127.0.0.1:6379", {"host": "127.0.0.1", "port": 6379}),
        ("unix:///run/redis@1/redis.sock?db=2", {"path": "/run/redis@1/redis.sock", "db": 2}),
    ],
)
def test_escaped_and_unambiguous_urls_are_read_as_written(
    url: str, expected: dict[str, object]
) -> None:
    """Percent-encoded characters, a raw '@' in a password (the host follows the last one),
    an '@' in a query value and a ``unix://`` socket's path are still read as they mean."""
    kwargs = RedisStore.from_url(url).client.connection_pool.connection_kwargs
    assert {name: kwargs.get(name) for name in expected} == expected
