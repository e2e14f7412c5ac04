"""What a request's rate limits decided (SPEC §9), for the response and its headers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from keyguard.models import RateLimit

__all__ = ["Verdict", "VerdictTuple", "tightest"]


class Verdict(NamedTuple):
    """What a request's rate limits decided, for the response and its headers.

    ``limit`` and ``remaining`` are those of the tightest limit (the fewest
    requests remaining after this one; on a tie the shortest period);
    ``retry_after`` is the whole number of seconds until a refused request
    would pass (0 when admitted). A named tuple: immutable, and cheap to make on
    every request (a frozen dataclass costs ~1 µs).
    """

    admitted: bool
    limit: int
    remaining: int
    retry_after: int


VerdictTuple = tuple[bool, int, int, int]
"""A :class:`Verdict`'s fields as a plain tuple (a ``Verdict`` is one too), where making
the named tuple would cost more than the rest of the check: ``(admitted, limit,
remaining, retry_after)``."""


def tightest(states: Sequence[tuple[RateLimit, int]]) -> tuple[RateLimit, int]:
    """Of ``(limit, remaining)`` pairs, the one with the fewest remaining, then the
    shortest period (SPEC §9's "tightest limit")."""
    return min(states, key=lambda state: (state[1], state[0].seconds))
