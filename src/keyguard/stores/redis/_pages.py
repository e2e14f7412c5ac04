"""Pages of an API's keys on Redis: the listing order, its upkeep and the page script.

The API's hash cannot be read in order, so each API also has a sorted set,
``<prefix>{<api>}:order`` (the API's hash tag: the same Cluster slot), whose
members all score 0 and sort by their text::

    <created_at in µs, 16 digits><insertion number (the hash's seq), 12 digits><client id>

so a page is one ``ZRANGEBYLEX`` from the cursor's position, in the same
order as ``list_keys`` (``created_at``, then insertion). The insert, delete
and delete-API scripts keep it in the same step as the keys (``_lua.py``).

Upkeep of data written before it existed, or by older code during a rolling
deploy: the API's hash field ``ordered`` holds the insertion number up to
which the sorted set is known complete. Each insert by this code moves it
along if it was complete; older code inserts without moving it. The page
script compares it with the hash's ``seq`` and, if they differ, first adds
the member of every key to the sorted set, by steps: each call looks at most
at ``REBUILD_STEP`` entries of the hash (``HSCAN``, resumed from the cursor
kept in the hash field ``rebuild``, beside the ``seq`` it catches up with) and
answers ``REBUILDING`` until the scan is through; the caller calls again, so
Redis serves other clients between the steps (one script over a whole hash of
200,000 keys blocked it for 10 s). An insert by this code during a rebuild
adds its own member and moves the rebuild's ``seq`` along; one by older code
(which a scan under way may miss) makes the next step start over. It happens
once per API after an upgrade, and again only after older code inserted. A
member whose key is gone (deleted by older code, or during a rebuild) is
dropped when a page meets it.

Bounded work: a page script looks at ``limit + 1`` members without a name
filter. With one, it looks at most at ``SCAN_BUDGET`` members per call; when
those hold fewer matches than ``limit`` it answers the partial page with the
cursor of the last member it looked at, and the caller asks again from there.
So a filter that matches few keys of a million-key API costs many short calls,
never one that blocks Redis for long.
"""

from __future__ import annotations

from typing import Any

from keyguard.stores._paging import SCAN_BUDGET, encode_cursor

__all__ = ["PAGE_LUA", "REBUILDING", "REBUILD_STEP", "SCAN_BUDGET", "lower_bound", "next_cursor"]

_POSITION_LENGTH = 28  # 16 digits of µs, 12 of insertion number

REBUILD_STEP = 1000
"""The most entries of an API's hash one page call looks at while rebuilding its order."""
REBUILDING = "~"
"""The page script's position when it made a step of a rebuild and must be called again."""

# KEYS: the API's hash, its listing order.  ARGV: the lower bound ('-' or '[<position>'),
# limit, casefolded name filter ('' for none), scan budget, rebuild step (hash entries).
# Answers {rows, position}: rows of {client id, record, secret hash, previous secret, last
# use}, and the position (28 digits) of the last member looked at when more members
# follow, else ''; or {{}, '~'} when it added a step of a rebuild of the order that is
# not done yet (the caller calls again).
PAGE_LUA = """
local api, order = KEYS[1], KEYS[2]
local state = redis.call('HMGET', api, 'exposed', 'seq', 'ordered', 'rebuild')
if not state[1] then return {{}, ''} end
local seq = state[2] or '0'
if state[3] ~= seq then
  -- The order lags the keys: add every key's member, at most ARGV[5] hash entries
  -- looked at per call, resuming where the last call stopped ('rebuild' holds the seq
  -- being caught up with and the HSCAN cursor; a seq moved on by older code, whose
  -- insert may be missed by a scan under way, starts over).
  local cursor = '0'
  if state[4] then
    local target, at = string.match(state[4], '^(%d+):(%d+)$')
    if target == seq then cursor = at end
  end
  local budget, looked = tonumber(ARGV[5]), 0
  repeat
    local reply = redis.call('HSCAN', api, cursor, 'MATCH', 'k:*', 'COUNT', 100)
    cursor = reply[1]
    local found, batch = reply[2], {}
    for i = 1, #found, 2 do
      local record = cjson.decode(found[i + 1])
      batch[#batch + 1] = 0
      batch[#batch + 1] = string.format('%016.0f%012.0f', record[5], record[1])
                          .. string.sub(found[i], 3)
    end
    if #batch > 0 then redis.call('ZADD', order, unpack(batch)) end
    looked = looked + 100
  until cursor == '0' or looked >= budget
  if cursor ~= '0' then
    redis.call('HSET', api, 'rebuild', seq .. ':' .. cursor)
    return {{}, '~'}
  end
  redis.call('HSET', api, 'ordered', seq)
  redis.call('HDEL', api, 'rebuild')
end
local lower, limit, needle = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local budget = tonumber(ARGV[4])
if needle == '' then budget = limit + 1 end
local rows, looked, last = {}, 0, nil
while true do
  local chunk = math.min(budget - looked, limit + 1)
  if chunk <= 0 then break end
  local members = redis.call('ZRANGEBYLEX', order, lower, '+', 'LIMIT', 0, chunk)
  for _, member in ipairs(members) do
    if #rows == limit then
      return {rows, string.sub(last, 1, 28)}
    end
    looked = looked + 1
    last = member
    local id = string.sub(member, 29)
    local row = redis.call('HMGET', api, 'k:' .. id, 's:' .. id, 'p:' .. id, 'u:' .. id)
    if not row[1] then
      redis.call('ZREM', order, member)
    elseif needle == '' or string.find(cjson.decode(row[1])[4], needle, 1, true) then
      rows[#rows + 1] = {id, row[1], row[2], row[3], row[4]}
    end
  end
  if #members < chunk then return {rows, ''} end
  lower = '(' .. last
end
return {rows, string.sub(last, 1, 28)}
"""


def lower_bound(start: tuple[int, int] | None) -> str:
    """The ``ZRANGEBYLEX`` lower bound of the members after the position ``start``."""
    if start is None:
        return "-"
    micros, number = start
    return f"[{micros:016d}{number + 1:012d}"


def next_cursor(position: Any) -> str | None:
    """The cursor of the page script's answered position (``''``: none follows)."""
    text = position.decode() if isinstance(position, bytes) else str(position)
    if not text:
        return None
    return encode_cursor(int(text[:16]), int(text[16:_POSITION_LENGTH]))
