"""One round trip per request on Redis, Redis Cluster and Sentinel counters: a single
Lua script over ``limits``' own moving-window key layout.

``limits`` opens the storage (URL, TLS, cluster, sentinel, options) and keeps its
keys: one list per key and limit, newest entry first, at most ``limit`` entries, each
an admission time in seconds, the list expiring ``period`` seconds after its last
entry. What it lacks is a call that checks *all* of a request's limits and hits them
*all or none*: its moving window needs a read, then a hit per limit (two round trips,
and a lost race for one limit could consume a place of another). The script here does
both at once, atomically, for up to four limits:

1. read the server's clock (``TIME``: one clock for every process and machine);
2. per limit, drop the entries that have left the window from the list's tail (each
   once, so O(1) amortized) and count the rest;
3. if any limit is full, touch nothing more and answer, per limit, the count and the
   milliseconds until its oldest entry leaves the window;
4. else push the time onto every list and reset its expiry (no trim needed: a list
   only grows while it holds fewer than ``limit`` live entries).

An entry admitted at ``t`` counts while ``now < t + period``, as in
:mod:`keyguard.ratelimit.local`. Should the server's clock step back, a list is no
longer in order and an expired entry behind a live one is dropped late: the count
errs towards refusing, never towards admitting more.
Every key of one client carries the hash tag ``{client_id}``, so on a cluster they
share a slot and the script runs on one node.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from keyguard.models import RateLimit

__all__ = ["SCRIPT", "ScriptedWindows", "scripted"]

SCRIPT = """
local t = redis.call('TIME')
local clock = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = #KEYS
local answer = {1}
for i = 1, n do
  local key = KEYS[i]
  local floor = clock - tonumber(ARGV[2 * i])
  local oldest = redis.call('LINDEX', key, -1)
  while oldest and tonumber(oldest) <= floor do
    redis.call('RPOP', key)
    oldest = redis.call('LINDEX', key, -1)
  end
  local count = redis.call('LLEN', key)
  answer[1 + i] = count
  answer[1 + n + i] = 0
  if count >= tonumber(ARGV[2 * i - 1]) then
    -- full: the oldest entry's leaving makes a place
    answer[1] = 0
    answer[1 + n + i] = math.max(1, math.ceil((tonumber(oldest) - floor) * 1000))
  end
end
if answer[1] == 1 then
  local stamp = string.format('%.6f', clock)
  for i = 1, n do
    redis.call('LPUSH', KEYS[i], stamp)
    redis.call('EXPIRE', KEYS[i], ARGV[2 * i])
  end
end
return table.concat(answer, ' ')
"""


class ScriptedWindows:
    """The script, registered (``EVALSHA``, loaded again on ``NOSCRIPT``) on the redis-py
    client of a ``limits`` Redis storage, under that storage's key prefix."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self._script = client.register_script(SCRIPT)
        self._prefix = prefix

    async def hit(
        self, api: str, client_id: str, limits: Sequence[RateLimit], items: Sequence[Any]
    ) -> tuple[bool, int, int, int]:
        """One round trip: count a request against every one of ``limits`` (``items``
        being their ``limits`` items), or refuse it counting nothing; answers
        ``(admitted, limit, remaining, retry_after)`` for the tightest limit."""
        keys = []
        args: list[int] = []
        for item in items:
            # limits' key for the item, with the client's hash tag first.
            keys.append(f"{self._prefix}:{item.key_for('{' + client_id + '}', api)}")
            args += (int(item.amount), int(item.get_expiry()))
        # One bulk string, "admitted count… wait…": cheaper to parse than an array.
        answer = (await self._script(keys, args)).split()
        n = len(items)
        admitted = int(answer[0]) == 1
        counts = [int(count) for count in answer[1 : 1 + n]]
        if admitted:
            limit, remaining, _ = min(
                [
                    (item.amount, item.amount - count - 1, item.get_expiry())
                    for item, count in zip(items, counts, strict=True)
                ],
                key=_fewest_then_shortest,
            )
            return True, int(limit), int(remaining), 0
        waits = [int(wait) for wait in answer[1 + n : 1 + 2 * n]]
        limit, _, _ = min(
            [
                (item.amount, 0 if wait else item.amount - count, item.get_expiry())
                for item, count, wait in zip(items, counts, waits, strict=True)
            ],
            key=_fewest_then_shortest,
        )
        retry_after = max(1, math.ceil(max(waits) / 1000))
        return False, int(limit), 0, retry_after


def scripted(storage: Any) -> ScriptedWindows | None:
    """The one-round-trip path for ``limits``' ``storage``, when it is one of its Redis
    storages driven by redis-py (or valkey-py); ``None`` for any other (MongoDB,
    coredis), which keep ``limits``' own two-step moving window."""
    bridge = getattr(storage, "bridge", None)
    getter = getattr(bridge, "get_connection", None)
    prefix = getattr(bridge, "key_prefix", None)
    if getter is None or not isinstance(prefix, str):
        return None
    client = getter()
    if not callable(getattr(client, "register_script", None)) or type(bridge).__name__ not in (
        "RedispyBridge",
        "ValkeyBridge",
    ):
        return None
    return ScriptedWindows(client, prefix)


def _fewest_then_shortest(state: tuple[int, int, int]) -> tuple[int, int]:
    return state[1], state[2]
