"""The Lua scripts that make each write atomic on one API's hash, and their rule errors."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from keyguard.errors import (
    ApiNotExposed,
    DuplicateName,
    InvalidRequest,
    KeyLimitReached,
)

_Closer = AsyncGenerator[None, None]

# -- Lua ---------------------------------------------------------------------------------
# The audit log (SPEC §10): each write script ends, when its change is made, by adding the
# event to the API's audit sorted set (KEYS[2], ``<prefix>{<api>}:audit``) and, for a key's
# change, to the key's (KEYS[3], ``<prefix>{<api>}:audit:<client_id>``): the same hash tag,
# so one script still touches one slot.  Members are the event id (26 characters that sort
# by time) followed by the event's JSON, all with score 0, so they sort by id and a page is
# one ZREVRANGEBYLEX.  The last three ARGV of every write script are the member ('' for no
# event), the id below which events are past retention, and the retention in seconds.
_AUDIT_LUA = """
local function record_audit(first)
  local member, cutoff, ttl = ARGV[#ARGV - 2], ARGV[#ARGV - 1], ARGV[#ARGV]
  if member == '' then return end
  for i = first or 2, #KEYS do
    redis.call('ZADD', KEYS[i], 0, member)
    redis.call('ZREMRANGEBYLEX', KEYS[i], '-', '(' .. cutoff)
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
"""
# Every script touches the API's hash (KEYS[1]) and keys of its hash tag only, so it is
# atomic and legal on Redis Cluster.  The scripts that add or remove keys also keep the
# API's listing order (KEYS[2], ``<prefix>{<api>}:order``, see ``_pages.py``) and record
# their audit event from KEYS[3] on.  Key records are JSON arrays (see _RECORD_LENGTH); scripts only
# read them (cjson.decode), never re-encode them: Lua's JSON encoder would round a
# microsecond timestamp to 14 digits.  A changed record is encoded in Python and written
# by a script only if the stored one is still the one it was computed from.

# ARGV: default max, exposed ('' to keep), max ('' to keep), change channel, change notice,
# rate limits JSON ('' to keep).  Answers the API's fields and whether it was created.
_UPSERT_API_LUA = """
local api = KEYS[1]
local created = 0
if redis.call('HEXISTS', api, 'exposed') == 0 then
  redis.call('HSET', api, 'exposed', '0', 'max', ARGV[1],
             'c:internal', 0, 'c:external', 0, 'seq', 0, 'ordered', 0)
  created = 1
end
if ARGV[2] ~= '' then redis.call('HSET', api, 'exposed', ARGV[2]) end
if ARGV[3] ~= '' then redis.call('HSET', api, 'max', ARGV[3]) end
if ARGV[6] ~= '' then redis.call('HSET', api, 'rate_limits', ARGV[6]) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
record_audit()
local row = redis.call('HMGET', api, 'exposed', 'max', 'c:internal', 'c:external', 'rate_limits')
row[6] = created
return row
"""

# ARGV: client id, kind, casefolded name, record JSON without its seq, has-secret flag,
# secret hash, change channel, change notice, previous-secret JSON ('' for none), created_at
# in µs as 16 digits.  R1, R2, R3 are checked against the stored state, then the key, its
# name entry, its secret hashes, its place in the listing order and the count are written
# and the change announced: nothing can run in between.
_INSERT_KEY_LUA = """
local api = KEYS[1]
local id, kind, folded = ARGV[1], ARGV[2], ARGV[3]
local state = redis.call('HMGET', api, 'exposed', 'max', 'c:' .. kind,
                         'n:' .. folded, 'k:' .. id)
if state[1] ~= '1' then return 'api_not_exposed' end
if tonumber(state[3] or 0) >= tonumber(state[2]) then return 'key_limit_reached' end
if state[4] then return 'duplicate_name' end
if state[5] then return 'duplicate_client_id' end
local seq = redis.call('HINCRBY', api, 'seq', 1)
redis.call('HINCRBY', api, 'c:' .. kind, 1)
redis.call('HSET', api, 'k:' .. id, '[' .. seq .. ',' .. string.sub(ARGV[4], 2),
           'n:' .. folded, id)
if ARGV[5] == '1' then redis.call('HSET', api, 's:' .. id, ARGV[6]) end
if ARGV[9] ~= '' then redis.call('HSET', api, 'p:' .. id, ARGV[9]) end
redis.call('ZADD', KEYS[2], 0, ARGV[10] .. string.format('%012d', seq) .. id)
local marks = redis.call('HMGET', api, 'ordered', 'rebuild')
if marks[1] == tostring(seq - 1) then
  redis.call('HSET', api, 'ordered', seq)
elseif marks[2] then
  -- A rebuild of the order under way (_pages.py): this key has its member, so the
  -- rebuild catches up with this seq too.
  local target, at = string.match(marks[2], '^(%d+):(%d+)$')
  if target == tostring(seq - 1) then redis.call('HSET', api, 'rebuild', seq .. ':' .. at) end
end
redis.call('PUBLISH', ARGV[7], ARGV[8])
record_audit(3)
return 'ok'
"""

# ARGV: client id, the record as read, the record to write, its casefolded name as read,
# the new casefolded name, change channel, change notice.  Compare-and-set: if another
# writer changed the record since it was read, nothing is written ('stale', the caller
# reads again).  R3 on a rename is checked against the name index, which changes with
# the record.  Answers the record, its secret hash and its previous secret as stored.
_UPDATE_KEY_LUA = """
local api, id = KEYS[1], ARGV[1]
local raw = redis.call('HGET', api, 'k:' .. id)
if not raw then return 'missing' end
if raw ~= ARGV[2] then return 'stale' end
local old_name, new_name = 'n:' .. ARGV[4], 'n:' .. ARGV[5]
if new_name ~= old_name then
  local holder = redis.call('HGET', api, new_name)
  if holder and holder ~= id then return 'duplicate_name' end
  if redis.call('HGET', api, old_name) == id then redis.call('HDEL', api, old_name) end
  redis.call('HSET', api, new_name, id)
end
redis.call('HSET', api, 'k:' .. id, ARGV[3])
redis.call('PUBLISH', ARGV[6], ARGV[7])
record_audit()
return redis.call('HMGET', api, 'k:' .. id, 's:' .. id, 'p:' .. id, 'u:' .. id)
"""

# ARGV: client id, secret hash, previous secret's end in µs ('' to keep none), change
# channel, change notice.  Only an external key takes a secret (R4).  The hash being
# replaced is read here, so a roll racing another roll keeps a whole pair: its new hash,
# and as previous the hash that was current when it ran.
_SET_HASH_LUA = """
local api, id = KEYS[1], ARGV[1]
local raw = redis.call('HGET', api, 'k:' .. id)
if not raw or cjson.decode(raw)[2] ~= 'external' then return false end
local current = redis.call('HGET', api, 's:' .. id)
if ARGV[3] ~= '' and current then
  redis.call('HSET', api, 'p:' .. id, '[' .. ARGV[3] .. ',' .. cjson.encode(current) .. ']')
else
  redis.call('HDEL', api, 'p:' .. id)
end
redis.call('HSET', api, 's:' .. id, ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[5])
record_audit()
return redis.call('HMGET', api, 'k:' .. id, 's:' .. id, 'p:' .. id, 'u:' .. id)
"""

# ARGV: client id, change channel, change notice.  The key, its secret hashes, its name
# entry, its place in the listing order and its count go together.
_DELETE_KEY_LUA = """
local api, id = KEYS[1], ARGV[1]
local raw = redis.call('HGET', api, 'k:' .. id)
if not raw then return 0 end
local record = cjson.decode(raw)
local name_field = 'n:' .. record[4]
if redis.call('HGET', api, name_field) == id then redis.call('HDEL', api, name_field) end
redis.call('HDEL', api, 'k:' .. id, 's:' .. id, 'p:' .. id, 'u:' .. id)
redis.call('HINCRBY', api, 'c:' .. record[2], -1)
redis.call('ZREM', KEYS[2], string.format('%016.0f%012.0f', record[5], record[1]) .. id)
redis.call('PUBLISH', ARGV[2], ARGV[3])
record_audit(3)
return 1
"""

# ARGV: force flag, change channel, change notice.  The check for keys and the delete of
# the whole hash (state, keys, hashes, names) and of the listing order are one step.
_DELETE_API_LUA = """
local api = KEYS[1]
local state = redis.call('HMGET', api, 'exposed', 'c:internal', 'c:external')
if not state[1] then return 0 end
local held = tonumber(state[2] or 0) + tonumber(state[3] or 0)
if held > 0 and ARGV[1] ~= '1' then return -held end
redis.call('DEL', api, KEYS[2])
redis.call('PUBLISH', ARGV[2], ARGV[3])
record_audit(3)
return 1
"""

# KEYS: the API's hash, then one usage hash per hour written.  ARGV: for each usage hash
# its expiry (Unix seconds), then five values per count: the usage hash's number (1 for
# KEYS[2]), client id, requests, rate-limited, last admitted time in µs ('' for none).
# Counts are added (HINCRBY), so processes flushing the same hour sum up; a key's
# ``u:<client_id>`` (its last_used_at) only ever rises, and only for a key that exists.
_RECORD_USAGE_LUA = """
local api = KEYS[1]
local hours = #KEYS - 1
local i = hours + 1
while i <= #ARGV do
  local bucket, id = KEYS[tonumber(ARGV[i]) + 1], ARGV[i + 1]
  if ARGV[i + 2] ~= '0' then redis.call('HINCRBY', bucket, 'r:' .. id, ARGV[i + 2]) end
  if ARGV[i + 3] ~= '0' then redis.call('HINCRBY', bucket, 'l:' .. id, ARGV[i + 3]) end
  local used = ARGV[i + 4]
  if used ~= '' and redis.call('HEXISTS', api, 'k:' .. id) == 1 then
    local old = redis.call('HGET', api, 'u:' .. id)
    if not old or tonumber(old) < tonumber(used) then
      redis.call('HSET', api, 'u:' .. id, used)
    end
  end
  i = i + 5
end
for h = 1, hours do redis.call('EXPIREAT', KEYS[h + 1], ARGV[h]) end
return 1
"""

# ARGV: the most keys to answer.  A read, not a write: the API's fields (HMGET) and, when
# it holds at most ARGV[1] keys in all, its whole hash (HGETALL) read in the same atomic
# step, so the keys belong to the very state they are answered with (one round trip).
_SNAPSHOT_LUA = """
local row = redis.call('HMGET', KEYS[1], 'exposed', 'max', 'c:internal', 'c:external',
                       'rate_limits')
if not row[1] then return {row} end
if tonumber(row[3] or 0) + tonumber(row[4] or 0) > tonumber(ARGV[1]) then return {row} end
return {row, redis.call('HGETALL', KEYS[1])}
"""

_RULE_ERRORS = {
    "api_not_exposed": (ApiNotExposed, "API {api!r} is not exposed"),
    "key_limit_reached": (KeyLimitReached, "API {api!r} has no room for another {kind} key"),
    "duplicate_name": (DuplicateName, "API {api!r} already has a key named {name!r}"),
    "duplicate_client_id": (InvalidRequest, "API {api!r} already has a key with this client id"),
}
