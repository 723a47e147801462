"""The Lua scripts behind `state.py` (and the event delivery), each an atomic step over keys
of one shard.

Each script's comment names its KEYS, ARGV and result; each result code has a name, in one
IntEnum per script that both sides use: `script()` defines the names as Lua locals before
the script's body, so the Lua returns `OFFSET_MISMATCH` and Python compares with
`Commit.OFFSET_MISMATCH`. One prelude gives every script `argv_from` (the pairs at the end
of ARGV) and `append_event`. `state.UploadState` and the delivery register them once.
"""

from __future__ import annotations

from enum import IntEnum

EVENTS_MAXLEN = 100_000  # entries kept per shard's event stream (approximate trimming)

PRELUDE = f"""
local EVENTS_MAXLEN = {EVENTS_MAXLEN}
-- ARGV[first..last] (last: the end of ARGV) as a list: the field pairs a caller passes last
local function argv_from(first, last)
  local out = {{}}
  for i = first, last or #ARGV do out[#out + 1] = ARGV[i] end
  return out
end
-- append an entry to a shard's event stream, trimmed to about EVENTS_MAXLEN
local function append_event(stream, fields)
  return redis.call('XADD', stream, 'MAXLEN', '~', EVENTS_MAXLEN, '*', unpack(fields))
end
-- Locks, requests to their holders and acknowledgements are volatile: from here on this
-- script's writes stay out of the AOF (and replicas): they need no fsync, and under
-- `appendfsync always` (an external Redis may run it) each would cost one. After a Redis
-- restart no lock exists, which is right: a holder that still runs loses its lock at its
-- next renewal and stops.
local function volatile_writes_from_here()
  redis.set_repl(redis.REPL_NONE)
end
-- the writes from here on are propagated again
local function durable_writes_from_here()
  redis.set_repl(redis.REPL_ALL)
end
"""


# Batches (store/batches.py): a member's completion or removal, in the step that changes it.
PRELUDE += """
-- the value of `name` among field pairs {name, value, ...}, or ""
local function field_of(pairs_list, name)
  for i = 1, #pairs_list - 1, 2 do
    if pairs_list[i] == name then return pairs_list[i + 1] end
  end
  return ''
end
-- The keys of an upload's batch, when the caller passed them from KEYS[first] on: the batch's
-- record, paths, completed members and the shard's batch expiry index (records.BATCH_KINDS).
-- A batch's members lie in its shard, so these steps are atomic with the member's own.
local function batch_keys(first)
  if #KEYS < first then return {} end
  return {KEYS[first], KEYS[first + 1], KEYS[first + 2], KEYS[first + 3]}
end
-- Complete the batch if it is due: every path it knows has a completed member, and it is
-- sealed or has all it expected: the files and the bytes, when it expects both (the bytes
-- alone would complete a batch whose last files are empty before they join). Then, once,
-- its status and its `batch.completed` event listing every member. True if this call
-- completed it.
local function batch_settle(b, stream, now, request_id)
  local h = redis.call('HMGET', b[1], 'status', 'files', 'done', 'files_expected',
    'bytes_expected', 'done_bytes', 'retain', 'name', 'owner', 'metadata', 'url')
  if not h[1] or h[1] == 'completed' then return false end
  local files, done = tonumber(h[2]), tonumber(h[3])
  if done < files then return false end
  local has_files = h[4] == '' or done >= tonumber(h[4])
  local has_bytes = h[5] == '' or tonumber(h[6]) >= tonumber(h[5])
  local full = h[1] == 'sealed' or ((h[4] ~= '' or h[5] ~= '') and has_files and has_bytes)
  if not full then return false end
  local id = string.match(b[1], ':batch:(.*)$')
  local expires = ''
  if h[7] ~= '' then expires = string.format('%.3f', tonumber(now) + tonumber(h[7])) end
  redis.call('HSET', b[1], 'status', 'completed', 'completed', now, 'expires', expires)
  if expires == '' then redis.call('ZREM', b[4], id) else redis.call('ZADD', b[4], expires, id) end
  local members = '[' .. table.concat(redis.call('HVALS', b[3]), ',') .. ']'
  append_event(stream, {'type', 'batch.completed', 'batch', h[8], 'owner', h[9],
    'files', tostring(done), 'bytes', h[6], 'metadata', h[10], 'url', h[11],
    'members', members, 'time', now, 'request_id', request_id})
  return true
end
-- A batch member (upload hash `u`) completed: record it once (a path that a retry gave a
-- newer upload counts only that one), then settle the batch.
local function batch_member_done(u, b, stream, now, event)
  if #b == 0 then return end
  local m = redis.call('HMGET', u, 'bpath', 'length', 'sha256', 'metadata', 'url')
  if not m[1] then return end  -- (a record without its path: nothing to count)
  local id = string.match(u, ':upload:(.*)$')
  local current = redis.call('HGET', b[2], m[1])
  if not current or string.sub(current, 1, #id) ~= id then return end
  local member = cjson.encode({id = id, path = m[1], length = m[2], sha256 = m[3],
    metadata = m[4], url = m[5]})
  if redis.call('HSETNX', b[3], m[1], member) == 0 then return end
  redis.call('HINCRBY', b[1], 'done', 1)
  redis.call('HINCRBY', b[1], 'done_bytes', m[2])
  batch_settle(b, stream, now, field_of(event, 'request_id'))
end
-- A batch member was removed (terminated, expired): while the batch is not complete, its
-- path waits for a new upload again.
local function batch_member_removed(path, id, length, b)
  if #b == 0 or not path or redis.call('HGET', b[1], 'status') == 'completed' then return end
  local current = redis.call('HGET', b[2], path)
  if not current or string.sub(current, 1, #id) ~= id then return end
  if redis.call('HDEL', b[3], path) == 1 then
    redis.call('HINCRBY', b[1], 'done', -1)
    redis.call('HINCRBY', b[1], 'done_bytes', -tonumber(length))
  end
end
"""


def script(codes: type[IntEnum] | None, body: str) -> str:
    """A script's text: the prelude, its result codes as Lua locals, then `body`."""
    names = "".join(f"local {code.name} = {code.value}\n" for code in codes or ())
    return PRELUDE + names + body


# The result codes of each script (ACQUIRE and READ share `Owned`).
Create = IntEnum("Create", {"ID_TAKEN": 0, "CREATED": 1})
Commit = IntEnum(
    "Commit",
    {
        "COMMITTED": 0,
        "LOCK_NOT_HELD": -1,
        "NO_UPLOAD": -2,
        "OFFSET_MISMATCH": -3,
        "PAST_LENGTH": -4,
    },
)
Complete = IntEnum("Complete", {"NOT_RECEIVED": 0, "COMPLETED": 1})
Remove = IntEnum(
    "Remove", {"REMOVED": 1, "NO_UPLOAD": 0, "LOCK_NOT_HELD": -1, "NOT_EXPIRED": -2, "HELD": -3}
)
Owned = IntEnum("Owned", {"NOT_FOUND": 0, "FOUND": 1, "LOCKED": 2, "GONE": 3})
# Renew: a negative code, otherwise the pending request (a string)
Renew = IntEnum("Renew", {"LOCK_NOT_HELD": -1})
Release = IntEnum("Release", {"NOT_OURS": 0, "RELEASED": 1})
AskHolder = IntEnum("AskHolder", {"LOCK_FREE": 0, "ASKED": 1})
Answered = IntEnum("Answered", {"WAITING": 0, "ANSWERED": 1})
DeclareLength = IntEnum(
    "DeclareLength",
    {
        "SET": 1,
        "ALREADY_SET": 0,
        "LOCK_NOT_HELD": -1,
        "NO_UPLOAD": -2,
        "OTHER_LENGTH": -3,
        "BELOW_OFFSET": -4,
    },
)

# KEYS: upload hash, owner index, expiry zset, events stream, lock, then for a batch member
#       its batch's keys (records.BATCH_KINDS)
# ARGV: upload id, created (score), expires (score or ""), lock token or "" (a creation with
#       upload takes the lock in the same step), lock ttl (ms), event count n, n*2 event
#       fields, then the upload hash's fields as pairs. A created upload whose status is
#       `completed` (Upload-Length: 0) also gets its `completed` event (and counts in its
#       batch).
# Result: Create.CREATED, or Create.ID_TAKEN.
CREATE = script(
    Create,
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return ID_TAKEN end
local n = tonumber(ARGV[6])
local event = argv_from(7, 6 + n * 2)
redis.call('HSET', KEYS[1], unpack(argv_from(7 + n * 2)))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1]) end
if ARGV[4] ~= '' then
  volatile_writes_from_here()
  redis.call('SET', KEYS[5], ARGV[4], 'PX', ARGV[5])
  durable_writes_from_here()
end
append_event(KEYS[4], {'type', 'created', unpack(event)})
if redis.call('HGET', KEYS[1], 'status') == 'completed' then
  append_event(KEYS[4], {'type', 'completed', unpack(event)})
  batch_member_done(KEYS[1], batch_keys(6), KEYS[4], ARGV[2], event)
end
return CREATED
""",
)

# KEYS: upload hash, lock, expiry zset, events stream, release-request key, then for a batch
#       member its batch's keys (records.BATCH_KINDS)
# ARGV: lock token, expected offset, new offset, now, expires (score or ""), sha256 hex or "",
#       commit-ack nonce or "", "1" to release the lock after committing, "1" for a durable
#       commit (a checkpoint) else "", then the `completed` event's fields as pairs.
# Result: {COMMITTED, offset, status}; {LOCK_NOT_HELD}; {NO_UPLOAD};
#         {OFFSET_MISMATCH, stored offset}; {PAST_LENGTH} (the names: `Commit`).
# Reaching the length makes the upload `received`, or `completed` when the sha256 is known,
# in which case the event is appended in this same step.
COMMIT = script(
    Commit,
    """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {LOCK_NOT_HELD} end
local h = redis.call('HMGET', KEYS[1], 'offset', 'length', 'status')
if not h[1] then return {NO_UPLOAD} end
if h[1] ~= ARGV[2] then return {OFFSET_MISMATCH, tonumber(h[1])} end
local new = tonumber(ARGV[3])
if h[2] ~= '' and new > tonumber(h[2]) then return {PAST_LENGTH} end
local id = string.match(KEYS[1], ':upload:(.*)$')
-- An offset may lag behind the bytes on disk (the client then sends some again), so only a
-- checkpoint, or the commit that reaches the length, goes to the AOF (docs/architecture.md).
if ARGV[9] == '1' or (h[2] ~= '' and new == tonumber(h[2])) then
  redis.call('HSET', KEYS[1], 'checkpoint', ARGV[4])
else
  volatile_writes_from_here()
end
redis.call('HSET', KEYS[1], 'offset', ARGV[3], 'activity', ARGV[4])
local status = h[3]
if h[2] ~= '' and new == tonumber(h[2]) and status == 'uploading' then
  if ARGV[6] ~= '' then
    status = 'completed'
    redis.call('HSET', KEYS[1], 'status', status, 'sha256', ARGV[6], 'completed', ARGV[4])
    append_event(KEYS[4], argv_from(10))
    batch_member_done(KEYS[1], batch_keys(6), KEYS[4], ARGV[4], argv_from(10))
  else
    status = 'received'
    redis.call('HSET', KEYS[1], 'status', status)
  end
end
if status ~= 'uploading' and ARGV[5] == '' then
  redis.call('HSET', KEYS[1], 'expires', '')
  redis.call('ZREM', KEYS[3], id)
elseif ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'expires', ARGV[5])
  redis.call('ZADD', KEYS[3], ARGV[5], id)
end
volatile_writes_from_here()
if ARGV[7] ~= '' and redis.call('GET', KEYS[5]) == 'commit:' .. ARGV[7] then
  redis.call('DEL', KEYS[5])
end
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'ack', ARGV[7]) end
if ARGV[8] == '1' then
  redis.call('DEL', KEYS[2])
  local request = redis.call('GET', KEYS[5])
  if request and string.sub(request, 1, 7) == 'commit:' then redis.call('DEL', KEYS[5]) end
end
return {COMMITTED, new, status}
""",
)

# KEYS: upload hash, expiry zset, events stream, then for a batch member its batch's keys
# ARGV: sha256 hex, now, expires (score or ""), then the `completed` event's fields as pairs.
# Result: Complete.COMPLETED if the upload went from `received` to `completed`, else
#         Complete.NOT_RECEIVED.
COMPLETE = script(
    Complete,
    """
if redis.call('HGET', KEYS[1], 'status') ~= 'received' then return NOT_RECEIVED end
local id = string.match(KEYS[1], ':upload:(.*)$')
redis.call('HSET', KEYS[1], 'status', 'completed', 'sha256', ARGV[1], 'completed', ARGV[2],
           'expires', ARGV[3])
if ARGV[3] == '' then redis.call('ZREM', KEYS[2], id)
else redis.call('ZADD', KEYS[2], ARGV[3], id) end
append_event(KEYS[3], argv_from(4))
batch_member_done(KEYS[1], batch_keys(4), KEYS[3], ARGV[2], argv_from(4))
return COMPLETED
""",
)

# KEYS: upload hash, lock, owner index, expiry zset, events stream, tombstone, then for a
#       batch member its batch's keys
# ARGV: lock token ("" when the caller checked the expiry instead), now, tombstone ttl (ms),
#       reason ("terminated"/"expired"), require-expired-before (score or ""),
#       then the event's fields as pairs.
# Result: Remove.REMOVED, NO_UPLOAD, LOCK_NOT_HELD, NOT_EXPIRED (not any more), or HELD
#         by a request (expiry never removes an upload a request holds).
REMOVE = script(
    Remove,
    """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return NO_UPLOAD end
local lock = redis.call('GET', KEYS[2])
if ARGV[1] ~= '' and lock ~= ARGV[1] then return LOCK_NOT_HELD end
if ARGV[5] ~= '' then
  if lock then return HELD end
  local expires = redis.call('HGET', KEYS[1], 'expires')
  if expires == '' or tonumber(expires) > tonumber(ARGV[5]) then return NOT_EXPIRED end
end
local id = string.match(KEYS[1], ':upload:(.*)$')
local m = redis.call('HMGET', KEYS[1], 'bpath', 'offset')
batch_member_removed(m[1], id, m[2], batch_keys(7))
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], id)
redis.call('ZREM', KEYS[4], id)
redis.call('SET', KEYS[6], cjson.encode({owner, tonumber(ARGV[2]), ARGV[4]}), 'PX', ARGV[3])
append_event(KEYS[5], argv_from(6))
return REMOVED
""",
)

# The start of ACQUIRE and READ, whose KEYS are: upload hash, tombstone, lock, release-request
# key, the shard's ask counter (READ's; see ASK_HOLDER), and ARGV[1] the owner. Returns
# {NOT_FOUND} unless the upload exists and is the owner's, or {GONE, reason} for its owner once
# it was terminated or expired (while its tombstone lasts). The names: `Owned`.
_OWNED = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
  local tomb = redis.call('GET', KEYS[2])
  if tomb then
    local t = cjson.decode(tomb)
    if t[1] == ARGV[1] then return {GONE, t[3]} end
  end
  return {NOT_FOUND}
end
if owner ~= ARGV[1] then return {NOT_FOUND} end
"""

# KEYS as _OWNED. ARGV: owner, lock token, ttl (ms).
# Result: {FOUND, fields...} locked (an old request to the previous holder is cleared) with
#         the upload's hash; {LOCKED} another request holds it; else as _OWNED.
ACQUIRE = script(
    Owned,
    _OWNED
    + """
volatile_writes_from_here()
if not redis.call('SET', KEYS[3], ARGV[2], 'NX', 'PX', ARGV[3]) then return {LOCKED} end
redis.call('DEL', KEYS[4])
return {FOUND, redis.call('HGETALL', KEYS[1])}
""",
)

# KEYS as _OWNED. ARGV: owner, request to a holder ("commit:<nonce>") or "" for none, its
#       ttl (ms).
# Result: {FOUND, fields..., asked} with asked 1 when the upload is uploading and locked,
#         and its holder was asked (unless it already has a request pending); else as _OWNED.
READ = script(
    Owned,
    _OWNED
    + """
volatile_writes_from_here()
local asked = 0
if ARGV[2] ~= '' and redis.call('EXISTS', KEYS[3]) == 1
    and redis.call('HGET', KEYS[1], 'status') == 'uploading' then
  redis.call('SET', KEYS[4], ARGV[2], 'NX', 'PX', ARGV[3])
  redis.call('INCR', KEYS[5])
  asked = 1
end
return {FOUND, redis.call('HGETALL', KEYS[1]), asked}
""",
)

# Renew locks of one shard in one call (what a process holds: one, or thousands of slow
# uploads). Most renewals only read (and no lock write reaches the AOF).
# KEYS: lock and release-request key of each lock, in pairs. ARGV: ttl (ms), time left (ms)
#       below which a lock is extended, then each lock's token in the order of KEYS.
# Result: for each lock, Renew.LOCK_NOT_HELD if it is not ours any more, else the pending
#         request to its holder ("stop" or "commit:<nonce>"), "" for none.
RENEW_MANY = script(
    Renew,
    """
volatile_writes_from_here()
local answers = {}
for i = 1, #KEYS / 2 do
  local lock = KEYS[2 * i - 1]
  if redis.call('GET', lock) ~= ARGV[i + 2] then
    answers[i] = LOCK_NOT_HELD
  else
    if redis.call('PTTL', lock) < tonumber(ARGV[2]) then
      redis.call('PEXPIRE', lock, ARGV[1])
    end
    answers[i] = redis.call('GET', KEYS[2 * i]) or ''
  end
end
return answers
""",
)

# KEYS: lock, release-request key. ARGV: lock token.
# Result: Release.RELEASED, or NOT_OURS. A request to this holder goes with it.
RELEASE = script(
    Release,
    """
volatile_writes_from_here()
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return NOT_OURS end
redis.call('DEL', KEYS[1])
local request = redis.call('GET', KEYS[2])
if request and string.sub(request, 1, 7) == 'commit:' then redis.call('DEL', KEYS[2]) end
return RELEASED
""",
)

# KEYS: lock, release-request key, the shard's ask counter. ARGV: request ("stop" or
#       "commit:<nonce>"), ttl (ms).
# Result: AskHolder.ASKED (a "stop" replaces a pending "commit"), or LOCK_FREE.
# Every request to a holder counts in its shard's ask counter (volatile, as the locks): a
# process that holds thousands of locks looks at their requests only in the shards whose
# counter moved (`Leases`), and renews them all only every ~0.5 s.
ASK_HOLDER = script(
    AskHolder,
    """
volatile_writes_from_here()
if redis.call('EXISTS', KEYS[1]) == 0 then return LOCK_FREE end
if ARGV[1] == 'stop' then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
else
  redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
end
redis.call('INCR', KEYS[3])
return ASKED
""",
)

# KEYS: upload hash, lock. ARGV: nonce of a commit request.
# Result: Answered.ANSWERED if the holder acknowledged that request, or nobody holds the lock
#         any more; else WAITING.
ANSWERED = script(
    Answered,
    """
if redis.call('EXISTS', KEYS[2]) == 0 then return ANSWERED end
if redis.call('HGET', KEYS[1], 'ack') == ARGV[1] then return ANSWERED end
return WAITING
""",
)

# KEYS: upload hash, lock. ARGV: lock token, new length.
# Result: DeclareLength.SET, ALREADY_SET (this length), LOCK_NOT_HELD, NO_UPLOAD,
#         OTHER_LENGTH (another length is set), BELOW_OFFSET (shorter than the offset).
DECLARE_LENGTH = script(
    DeclareLength,
    """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return LOCK_NOT_HELD end
local h = redis.call('HMGET', KEYS[1], 'offset', 'length')
if not h[1] then return NO_UPLOAD end
if h[2] == ARGV[2] then return ALREADY_SET end
if h[2] ~= '' then return OTHER_LENGTH end
if tonumber(ARGV[2]) < tonumber(h[1]) then return BELOW_OFFSET end
redis.call('HSET', KEYS[1], 'length', ARGV[2])
return SET
""",
)
