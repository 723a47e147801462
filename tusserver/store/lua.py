"""The Lua scripts behind `state.py`, each an atomic step over keys of one shard.

Each script's comment names its KEYS, ARGV and result. `state.UploadState` registers them
once and is their only caller.
"""

from __future__ import annotations

EVENTS_MAXLEN = 100_000  # entries kept per shard's event stream (approximate trimming)

# KEYS: upload hash, owner index, expiry zset, events stream, lock
# ARGV: upload id, created (score), expires (score or ""), lock token or "" (a creation with
#       upload takes the lock in the same step), lock ttl (ms), event count n, n*2 event
#       fields, then the upload hash's fields as pairs. A created upload whose status is
#       `completed` (Upload-Length: 0) also gets its `completed` event.
# Result: 1 if created, 0 if the id was taken.
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = tonumber(ARGV[6])
local event = {}
for i = 7, 6 + n * 2 do event[#event + 1] = ARGV[i] end
local fields = {}
for i = 7 + n * 2, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1]) end
if ARGV[4] ~= '' then redis.call('SET', KEYS[5], ARGV[4], 'PX', ARGV[5]) end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'type', 'created', unpack(event))
if redis.call('HGET', KEYS[1], 'status') == 'completed' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'type', 'completed', unpack(event))
end
return 1
""".replace("EVENTS_MAXLEN", str(EVENTS_MAXLEN))

# KEYS: upload hash, lock, expiry zset, events stream, release-request key
# ARGV: lock token, expected offset, new offset, now, expires (score or ""), sha256 hex or "",
#       commit-ack nonce or "", "1" to release the lock after committing, then the
#       `completed` event's fields as pairs.
# Result: {0, offset, status} committed; {-1} lock not held; {-2} no upload;
#         {-3, offset} offset mismatch; {-4} past Upload-Length.
# Reaching the length makes the upload `received`, or `completed` when the sha256 is known,
# in which case the event is appended in this same step.
COMMIT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {-1} end
local h = redis.call('HMGET', KEYS[1], 'offset', 'length', 'status')
if not h[1] then return {-2} end
if h[1] ~= ARGV[2] then return {-3, tonumber(h[1])} end
local new = tonumber(ARGV[3])
if h[2] ~= '' and new > tonumber(h[2]) then return {-4} end
local id = string.match(KEYS[1], ':upload:(.*)$')
redis.call('HSET', KEYS[1], 'offset', ARGV[3], 'activity', ARGV[4])
local status = h[3]
if h[2] ~= '' and new == tonumber(h[2]) and status == 'uploading' then
  if ARGV[6] ~= '' then
    status = 'completed'
    redis.call('HSET', KEYS[1], 'status', status, 'sha256', ARGV[6], 'completed', ARGV[4])
    local event = {}
    for i = 9, #ARGV do event[#event + 1] = ARGV[i] end
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', EVENTS_MAXLEN, '*', unpack(event))
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
if ARGV[7] ~= '' and redis.call('GET', KEYS[5]) == 'commit:' .. ARGV[7] then
  redis.call('DEL', KEYS[5])
end
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'ack', ARGV[7]) end
if ARGV[8] == '1' then
  redis.call('DEL', KEYS[2])
  local request = redis.call('GET', KEYS[5])
  if request and string.sub(request, 1, 7) == 'commit:' then redis.call('DEL', KEYS[5]) end
end
return {0, new, status}
""".replace("EVENTS_MAXLEN", str(EVENTS_MAXLEN))

# KEYS: upload hash, expiry zset, events stream
# ARGV: sha256 hex, now, expires (score or ""), then the `completed` event's fields as pairs.
# Result: 1 if the upload went from `received` to `completed`, else 0.
COMPLETE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'received' then return 0 end
local id = string.match(KEYS[1], ':upload:(.*)$')
redis.call('HSET', KEYS[1], 'status', 'completed', 'sha256', ARGV[1], 'completed', ARGV[2],
           'expires', ARGV[3])
if ARGV[3] == '' then redis.call('ZREM', KEYS[2], id)
else redis.call('ZADD', KEYS[2], ARGV[3], id) end
local event = {}
for i = 4, #ARGV do event[#event + 1] = ARGV[i] end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', EVENTS_MAXLEN, '*', unpack(event))
return 1
""".replace("EVENTS_MAXLEN", str(EVENTS_MAXLEN))

# KEYS: upload hash, lock, owner index, expiry zset, events stream, tombstone
# ARGV: lock token ("" when the caller checked the expiry instead), now, tombstone ttl (ms),
#       reason ("terminated"/"expired"), require-expired-before (score or ""),
#       then the event's fields as pairs.
# Result: 1 if removed, 0 if there was no such upload, -1 lock not held, -2 not expired (any
#         more), -3 held by someone (expiry never removes an upload a request holds).
REMOVE = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return 0 end
local lock = redis.call('GET', KEYS[2])
if ARGV[1] ~= '' and lock ~= ARGV[1] then return -1 end
if ARGV[5] ~= '' then
  if lock then return -3 end
  local expires = redis.call('HGET', KEYS[1], 'expires')
  if expires == '' or tonumber(expires) > tonumber(ARGV[5]) then return -2 end
end
local id = string.match(KEYS[1], ':upload:(.*)$')
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], id)
redis.call('ZREM', KEYS[4], id)
redis.call('SET', KEYS[6], cjson.encode({owner, tonumber(ARGV[2]), ARGV[4]}), 'PX', ARGV[3])
local event = {}
for i = 6, #ARGV do event[#event + 1] = ARGV[i] end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', EVENTS_MAXLEN, '*', unpack(event))
return 1
""".replace("EVENTS_MAXLEN", str(EVENTS_MAXLEN))

# The start of ACQUIRE and READ, whose KEYS are: upload hash, tombstone, lock, release-request
# key, and ARGV[1] the owner. Returns {0} unless the upload exists and is the owner's, or
# {3, reason} for its owner once it was terminated or expired (while its tombstone lasts).
_OWNED = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
  local tomb = redis.call('GET', KEYS[2])
  if tomb then
    local t = cjson.decode(tomb)
    if t[1] == ARGV[1] then return {3, t[3]} end
  end
  return {0}
end
if owner ~= ARGV[1] then return {0} end
"""

# KEYS as _OWNED. ARGV: owner, lock token, ttl (ms).
# Result: {1, fields...} locked (an old request to the previous holder is cleared) with the
#         upload's hash; {2} another request holds it; {0} and {3, reason} as _OWNED.
ACQUIRE = (
    _OWNED
    + """
if not redis.call('SET', KEYS[3], ARGV[2], 'NX', 'PX', ARGV[3]) then return {2} end
redis.call('DEL', KEYS[4])
return {1, redis.call('HGETALL', KEYS[1])}
"""
)

# KEYS as _OWNED. ARGV: owner, request to a holder ("commit:<nonce>") or "" for none, its
#       ttl (ms).
# Result: {1, fields..., asked} with asked 1 when the upload is uploading and locked, and its
#         holder was asked (unless it already has a request pending); {0} and {3, reason} as
#         _OWNED.
READ = (
    _OWNED
    + """
local asked = 0
if ARGV[2] ~= '' and redis.call('EXISTS', KEYS[3]) == 1
    and redis.call('HGET', KEYS[1], 'status') == 'uploading' then
  redis.call('SET', KEYS[4], ARGV[2], 'NX', 'PX', ARGV[3])
  asked = 1
end
return {1, redis.call('HGETALL', KEYS[1]), asked}
"""
)

# KEYS: lock, release-request key. ARGV: lock token, ttl (ms), time left (ms) below which
#       the lock is extended back to its ttl.
# Result: -1 if the lock is not ours any more; else the pending release request
#         ("stop" or "commit:<nonce>") or "" for none. Most renewals only read: a write goes
#         to the AOF, which `appendfsync always` fsyncs, and every reply of that turn of
#         Valkey's loop waits for that fsync.
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local request = redis.call('GET', KEYS[2])
if not request then return '' end
return request
"""

# KEYS: lock, release-request key. ARGV: lock token.
# Result: 1 if released; 0 if it was not ours. A request to stop this holder goes with it.
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
local request = redis.call('GET', KEYS[2])
if request and string.sub(request, 1, 7) == 'commit:' then redis.call('DEL', KEYS[2]) end
return 1
"""

# KEYS: lock, release-request key. ARGV: request ("stop" or "commit:<nonce>"), ttl (ms).
# Result: 1 if a holder was asked (a "stop" replaces a pending "commit"), 0 if the lock is free.
ASK_HOLDER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] == 'stop' then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
else
  redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
end
return 1
"""

# KEYS: upload hash, lock. ARGV: nonce of a commit request.
# Result: 1 if the holder acknowledged that request, or nobody holds the lock any more; else 0.
ANSWERED = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 1 end
if redis.call('HGET', KEYS[1], 'ack') == ARGV[1] then return 1 end
return 0
"""

# KEYS: upload hash, lock. ARGV: lock token, new length.
# Result: 1 set, 0 already this length, -1 lock not held, -2 no upload, -3 another length
#         is set, -4 shorter than the committed offset.
DECLARE_LENGTH = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
local h = redis.call('HMGET', KEYS[1], 'offset', 'length')
if not h[1] then return -2 end
if h[2] == ARGV[2] then return 0 end
if h[2] ~= '' then return -3 end
if tonumber(ARGV[2]) < tonumber(h[1]) then return -4 end
redis.call('HSET', KEYS[1], 'length', ARGV[2])
return 1
"""


# -- the webhook delivery's steps (events.py) --------------------------------------------

# KEYS: events stream. ARGV: group, consumer, stream id, 1 to count a new try (else 0).
# Result: the entry's tries so far, with its idle time reset, if this consumer holds it;
#         0 if it does not (delivered, claimed by another process, or trimmed away).
WEBHOOK_HOLD = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
if #redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3]) == 0 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
  return 0
end
local tries = p[1][4] + tonumber(ARGV[4])
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'RETRYCOUNT', tries, 'JUSTID')
return tries
"""

# KEYS: events stream. ARGV: group, stream id. Result: 1 if the entry was deleted.
WEBHOOK_ACKNOWLEDGE = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XDEL', KEYS[1], ARGV[2])
"""

# KEYS: events stream, dead-letter stream. ARGV: group, consumer, stream id, dead-letter
#       maxlen, then the dead-letter entry's fields as pairs.
# Result: 1 if moved; 0 if this consumer does not hold the entry any more.
WEBHOOK_BURY = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""

# KEYS: events stream. ARGV: group, consumer.
# Result: 1 if the consumer held nothing and was removed from the group, else 0.
WEBHOOK_FORGET = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
