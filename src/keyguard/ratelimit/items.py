"""keyguard's rate limits as ``limits``' own items: the model every counter counts by."""

from __future__ import annotations

from typing import Any

from keyguard.models import RateLimit

__all__ = ["limits_item"]

_items: dict[RateLimit, Any] = {}


def limits_item(limit: RateLimit) -> Any:
    """``limits``' ``RateLimitItem`` for ``limit`` (namespace ``k``), made once and kept
    (10,000 distinct limits at most, then forgotten and made again)."""
    item = _items.get(limit)
    if item is None:
        from limits import (
            RateLimitItemPerDay,
            RateLimitItemPerHour,
            RateLimitItemPerMinute,
            RateLimitItemPerSecond,
        )

        kinds = {
            "second": RateLimitItemPerSecond,
            "minute": RateLimitItemPerMinute,
            "hour": RateLimitItemPerHour,
            "day": RateLimitItemPerDay,
        }
        item = kinds[limit.per](limit.limit, namespace="k")
        if len(_items) >= 10_000:
            _items.clear()
        _items[limit] = item
    return item
