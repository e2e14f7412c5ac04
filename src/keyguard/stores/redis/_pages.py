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
script compares it with the hash's ``seq`` and, if they differ, rebuilds the
sorted set from the hash first (one pass over the API's records, in the same
script, so it is atomic; it happens once per API after an upgrade, and again
only after older code inserted). A member whose key is gone (deleted by
older code) is dropped when a page meets it.

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

__all__ = ["PAGE_LUA", "SCAN_BUDGET", "lower_bound", "next_cursor"]

_POSITION_LENGTH = 28  # 16 digits of µs, 12 of insertion number

# KEYS: the API's hash, its listing order.  ARGV: the lower bound ('-' or '[<position>'),
# limit, casefolded name filter ('' for none), scan budget.  Answers {rows, position}: rows
# of {client id, record, secret hash, previous secret, last use}, and the position (28
# digits) of the last member looked at when more members follow, else ''.
PAGE_LUA = """
local api, order = KEYS[1], KEYS[2]
local state = redis.call('HMGET', api, 'exposed', 'seq', 'ordered')
if not state[1] then return {{}, ''} end
local seq = state[2] or '0'
if state[3] ~= seq then
  redis.call('DEL', order)
  local all = redis.call('HGETALL', api)
  local batch = {}
  for i = 1, #all, 2 do
    local field = all[i]
    if string.sub(field, 1, 2) == 'k:' then
      local record = cjson.decode(all[i + 1])
      batch[#batch + 1] = 0
      batch[#batch + 1] = string.format('%016.0f%012.0f', record[5], record[1])
                          .. string.sub(field, 3)
      if #batch >= 1000 then
        redis.call('ZADD', order, unpack(batch))
        batch = {}
      end
    end
  end
  if #batch > 0 then redis.call('ZADD', order, unpack(batch)) end
  redis.call('HSET', api, 'ordered', seq)
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
