"""The Lua scripts of the Redis Streams bus (each runs atomically on the server)."""

__all__ = ["ACK_DELETE", "DEAD_LETTER", "PUBLISH", "REPLAY"]

# Two XADDs in one script: the type stream and the all-events stream hold an
# event together or not at all.
PUBLISH = """
local a = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[2])
local b = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[2])
return {a, b}
"""
# The XACK comes first: an entry that another consumer already acknowledged is
# not dead-lettered as well. Its attempts go with it.
DEAD_LETTER = """
redis.call('HDEL', KEYS[3], ARGV[9])
if redis.call('XACK', KEYS[2], ARGV[2], ARGV[3]) == 0 then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[4], 'error', ARGV[5],
  'group', ARGV[2], 'deliveries', ARGV[6], 'failed_at', ARGV[7])
if ARGV[8] == '1' then redis.call('XDEL', KEYS[2], ARGV[3]) end
return 1
"""
REPLAY = """
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return 0 end
local fields, envelope = found[1][2], nil
for i = 1, #fields, 2 do if fields[i] == 'e' then envelope = fields[i + 1] end end
if envelope == nil then return 0 end
redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[2], '0', 'MKSTREAM')
local added = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'e', envelope)
redis.call('XDEL', KEYS[1], ARGV[1])
return added
"""
# Retried entries are deleted once acknowledged: the retry stream has one group.
ACK_DELETE = """
redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
return redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
"""
