"""The Lua scripts of batches (store/batches.py): open, join, seal and remove a batch, each
an atomic step over the keys of the batch's shard. A member's completion and removal are
counted by the upload scripts themselves (`lua.batch_member_done` and
`lua.batch_member_removed`, in the prelude every script shares)."""

from __future__ import annotations

from enum import IntEnum

from tusserver.store.lua import script

BatchOpen = IntEnum("BatchOpen", {"EXISTS": 0, "CREATED": 1})
Join = IntEnum(
    "Join",
    {
        "JOINED": 1,
        "NO_BATCH": 0,
        "CLOSED": -1,
        "PATH_DONE": -2,
        "TOO_MANY_FILES": -3,
        "TOO_MANY_BYTES": -4,
        "QUOTA_FILES": -5,
        "QUOTA_BYTES": -6,
        "NEEDS_LENGTH": -7,
    },
)
Seal = IntEnum("Seal", {"NO_BATCH": 0, "SEALED": 1})
BatchRemove = IntEnum("BatchRemove", {"REMOVED": 1, "NO_BATCH": 0, "NOT_EXPIRED": -1})

# The fields a new batch's record starts with, after owner, name, status, url, created,
# retain: its counters (registered paths, completed members and their bytes, declared bytes).
_NEW_BATCH = """
local function new_batch(key, owner, name, url, now, retain)
  redis.call('HSET', key, 'owner', owner, 'name', name, 'status', 'open', 'url', url,
    'created', now, 'activity', now, 'retain', retain, 'completed', '', 'metadata', '',
    'files_expected', '', 'bytes_expected', '', 'files', 0, 'done', 0, 'done_bytes', 0,
    'declared_bytes', 0)
end
"""

# KEYS: batch, bexpiry. ARGV: owner, name, now, expires (score), url, retention (s) or "",
#       files expected or "", bytes expected or "", metadata (Upload-Metadata form).
# Result: BatchOpen.CREATED, or EXISTS (a batch of that name and owner exists).
BATCH_OPEN = script(
    BatchOpen,
    _NEW_BATCH
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return EXISTS end
new_batch(KEYS[1], ARGV[1], ARGV[2], ARGV[5], ARGV[3], ARGV[6])
redis.call('HSET', KEYS[1], 'files_expected', ARGV[7], 'bytes_expected', ARGV[8],
  'metadata', ARGV[9], 'expires', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[4], string.match(KEYS[1], ':batch:(.*)$'))
return CREATED
""",
)

# KEYS: batch, bfiles, bdone, bexpiry (records.BATCH_KINDS).
# ARGV: owner, name, path, upload id, length or "" (deferred), now, "1" to create the batch
#       when there is none (named in Upload-Metadata only), expires (score), url, retention
#       (s) or "", the most files a batch may have (--max-batch-files), the token's most
#       files or "", the token's most bytes or "".
# Result: Join.JOINED (the path now names this upload; a retry replaces an unfinished one),
#         NO_BATCH (none of this owner), CLOSED (sealed or complete), PATH_DONE (the path
#         has a completed member), TOO_MANY_FILES / TOO_MANY_BYTES (more than the batch or
#         the server allows), QUOTA_FILES / QUOTA_BYTES (more than the token allows),
#         NEEDS_LENGTH (a byte budget applies and the length is deferred).
JOIN = script(
    Join,
    _NEW_BATCH
    + """
local h = redis.call('HMGET', KEYS[1], 'owner', 'status', 'files', 'declared_bytes',
  'files_expected', 'bytes_expected')
local exists = h[1] ~= false
if not exists then
  if ARGV[7] ~= '1' then return NO_BATCH end
  h = {ARGV[1], 'open', '0', '0', '', ''}
end
if h[1] ~= ARGV[1] then return NO_BATCH end
if h[2] ~= 'open' then return CLOSED end
if redis.call('HEXISTS', KEYS[3], ARGV[3]) == 1 then return PATH_DONE end
local files, declared = tonumber(h[3]), tonumber(h[4])
local previous = redis.call('HGET', KEYS[2], ARGV[3])
if previous then
  local old_length = string.match(previous, ' (%d+)$')
  if old_length then declared = declared - tonumber(old_length) end
else
  files = files + 1
end
if ARGV[5] == '' and (h[6] ~= '' or ARGV[13] ~= '') then return NEEDS_LENGTH end
if ARGV[5] ~= '' then declared = declared + tonumber(ARGV[5]) end
if files > tonumber(ARGV[11]) or (h[5] ~= '' and files > tonumber(h[5])) then
  return TOO_MANY_FILES
end
if h[6] ~= '' and declared > tonumber(h[6]) then return TOO_MANY_BYTES end
if ARGV[12] ~= '' and files > tonumber(ARGV[12]) then return QUOTA_FILES end
if ARGV[13] ~= '' and declared > tonumber(ARGV[13]) then return QUOTA_BYTES end
if not exists then new_batch(KEYS[1], ARGV[1], ARGV[2], ARGV[9], ARGV[6], ARGV[10]) end
local length = ARGV[5]
if length == '' then length = '-' end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4] .. ' ' .. length)
redis.call('HSET', KEYS[1], 'files', files, 'declared_bytes', declared, 'activity', ARGV[6],
  'expires', ARGV[8])
redis.call('ZADD', KEYS[4], ARGV[8], string.match(KEYS[1], ':batch:(.*)$'))
return JOINED
""",
)

# KEYS: batch, bfiles, bdone, bexpiry, events stream. ARGV: owner, now, request id.
# Result: Seal.SEALED (no more paths may join; it completes once every path it knows has a
#         completed member, which may be now), or NO_BATCH. Sealing twice, or a complete
#         batch, changes nothing.
SEAL = script(
    Seal,
    """
local h = redis.call('HMGET', KEYS[1], 'owner', 'status')
if h[1] ~= ARGV[1] then return NO_BATCH end
if h[2] == 'open' then redis.call('HSET', KEYS[1], 'status', 'sealed', 'activity', ARGV[2]) end
batch_settle({KEYS[1], KEYS[2], KEYS[3], KEYS[4]}, KEYS[5], ARGV[2], ARGV[3])
return SEALED
""",
)

# KEYS: batch, bfiles, bdone, bexpiry, events stream.
# ARGV: owner ("" for the sweeper), reason ("terminated"/"expired"), now, require expired
#       before (score) or "", request id.
# Result: {BatchRemove.REMOVED, {upload id, ...}} (the members, for the caller to remove)
#         with the `batch.<reason>` event appended; {NO_BATCH}; {NOT_EXPIRED}.
BATCH_REMOVE = script(
    BatchRemove,
    """
local h = redis.call('HMGET', KEYS[1], 'owner', 'expires', 'name', 'url', 'status')
if not h[1] then  -- (a key the expiry index still names is dropped from it)
  redis.call('ZREM', KEYS[4], string.match(KEYS[1], ':batch:(.*)$'))
  return {NO_BATCH}
end
if ARGV[1] ~= '' and h[1] ~= ARGV[1] then return {NO_BATCH} end
if ARGV[4] ~= '' and (h[2] == '' or tonumber(h[2]) > tonumber(ARGV[4])) then
  return {NOT_EXPIRED}
end
local ids, listed = {}, {}
local paths = redis.call('HGETALL', KEYS[2])
for i = 1, #paths, 2 do
  local id = string.match(paths[i + 1], '^(%S+)')
  ids[#ids + 1] = id
  listed[#listed + 1] = cjson.encode({id = id, path = paths[i]})
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], string.match(KEYS[1], ':batch:(.*)$'))
append_event(KEYS[5], {'type', 'batch.' .. ARGV[2], 'batch', h[3], 'owner', h[1],
  'url', h[4], 'members', '[' .. table.concat(listed, ',') .. ']', 'time', ARGV[3],
  'request_id', ARGV[5]})
return {REMOVED, ids}
""",
)
