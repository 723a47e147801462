"""The Lua scripts of the webhook delivery (events/delivery.py): hold, acknowledge, bury and
forget entries of a shard's event stream, each an atomic step on that stream."""

from __future__ import annotations

from enum import IntEnum

from tusserver.store.lua import script

# WebhookHold: NOT_HELD, otherwise the entry's tries so far
WebhookHold = IntEnum("WebhookHold", {"NOT_HELD": 0})
WebhookBury = IntEnum("WebhookBury", {"NOT_HELD": 0, "BURIED": 1})
WebhookForget = IntEnum("WebhookForget", {"BUSY": 0, "FORGOTTEN": 1})

# KEYS: events stream. ARGV: group, consumer, stream id, 1 to count a new try (else 0).
# Result: the entry's tries so far, with its idle time reset, if this consumer holds it;
#         WebhookHold.NOT_HELD if not (delivered, claimed by another process, trimmed away).
WEBHOOK_HOLD = script(
    WebhookHold,
    """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return NOT_HELD end
if #redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3]) == 0 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
  return NOT_HELD
end
local tries = p[1][4] + tonumber(ARGV[4])
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'RETRYCOUNT', tries, 'JUSTID')
return tries
""",
)

# KEYS: events stream. ARGV: group, stream id. Result: 1 if the entry was deleted.
WEBHOOK_ACKNOWLEDGE = script(
    None,
    """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XDEL', KEYS[1], ARGV[2])
""",
)

# KEYS: events stream, dead-letter stream. ARGV: group, consumer, stream id, dead-letter
#       maxlen, then the dead-letter entry's fields as pairs.
# Result: WebhookBury.BURIED, or NOT_HELD when this consumer does not hold the entry any more.
WEBHOOK_BURY = script(
    WebhookBury,
    """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return NOT_HELD end
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], '*', unpack(argv_from(5)))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return BURIED
""",
)

# KEYS: events stream. ARGV: group, consumer.
# Result: WebhookForget.FORGOTTEN if the consumer held nothing and was removed from the
#         group, else BUSY.
WEBHOOK_FORGET = script(
    WebhookForget,
    """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return BUSY end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return FORGOTTEN
""",
)
