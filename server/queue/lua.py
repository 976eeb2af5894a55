"""The Redis backend's atomic steps, as Lua scripts (each runs alone on the server: no races between them).

Writes of a worker are fenced: they apply only while the job's lease still holds the worker's token, so a
worker presumed dead (its lease expired and the job went to another) cannot write into the job again.
"""

# Jobs discovered inside a script get their keys from prefixes (keys.Keys.lua_prefixes()).
_PREFIXES = """
local P = cjson.decode(ARGV[1])
local function expire_job(id, ttl)
  redis.call('EXPIRE', P.job .. id, ttl)
  redis.call('EXPIRE', P.events .. id, ttl)
  redis.call('EXPIRE', P.tries .. id, ttl)
  for k = 1, P.max_rounds do redis.call('EXPIRE', P.image .. id .. ':' .. k, ttl) end
end
"""

# KEYS queue, job, events, wake | ARGV id, max waiting, pending ttl, wake maxlen, field, value, ...
# -> {1, position} created | {0, position or -1} exists already | {-1, depth} full
SUBMIT = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  local pos = redis.call('LPOS', KEYS[1], ARGV[1])
  return {0, pos and pos + 1 or -1}
end
local depth = redis.call('LLEN', KEYS[1])
if depth >= tonumber(ARGV[2]) then return {-1, depth} end
redis.call('HSET', KEYS[2], unpack(ARGV, 5))
local pos = redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[3], '*', 'type', 'queued', 'data',
  '{"job_id":' .. cjson.encode(ARGV[1]) .. ',"position":' .. pos .. '}')
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'job', ARGV[1])
return {1, pos}
"""

# KEYS queue, running | ARGV prefixes, token, lease ms, now, worker, pending ttl
# -> false | {attempt, {field, value, ...}}
CLAIM = (
    _PREFIXES
    + """
while true do
  local id = redis.call('LPOP', KEYS[1])
  if not id then return false end
  local job = P.job .. id
  if redis.call('HGET', job, 'status') == 'queued' then
    redis.call('SADD', KEYS[2], id)
    redis.call('SET', P.lease .. id, ARGV[2], 'PX', ARGV[3])
    local attempt = redis.call('INCR', P.tries .. id)
    redis.call('EXPIRE', P.tries .. id, ARGV[6])
    redis.call('HSET', job, 'status', 'running', 'worker', ARGV[5], 'attempt', attempt, 'started_at', ARGV[4],
      'texts', '[]', 'images', '[]')
    redis.call('XADD', P.events .. id, '*', 'type', 'started', 'data', '{"job_id":' .. cjson.encode(id) ..
      ',"worker":' .. cjson.encode(ARGV[5]) .. ',"attempt":' .. attempt .. '}')
    return {attempt, redis.call('HGETALL', job)}
  end
end
"""
)

# KEYS lease, job, events | ARGV token, type, data, seq, field, value, ... -> the event id
# `seq` (token/n) makes a write retried after a lost reply land once.
EMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('LEASE_LOST') end
local seq = ARGV[1] .. '/' .. ARGV[4]
if redis.call('HGET', KEYS[2], 'seq') == seq then return redis.call('HGET', KEYS[2], 'seq_id') end
local id = redis.call('XADD', KEYS[3], '*', 'type', ARGV[2], 'data', ARGV[3])
redis.call('HSET', KEYS[2], 'seq', seq, 'seq_id', id, unpack(ARGV, 5))
return id
"""

# KEYS lease, running, job, events, tries, images... | ARGV token, type, data, ttl, id, field, value, ...
FINISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('LEASE_LOST') end
redis.call('XADD', KEYS[4], '*', 'type', ARGV[2], 'data', ARGV[3])
redis.call('HSET', KEYS[3], unpack(ARGV, 6))
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[5])
for i = 3, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return 1
"""

# KEYS lease, running, job, tries, queue, wake | ARGV token, id, wake maxlen -> 1 handed back | 0 not ours
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('DECR', KEYS[4])
redis.call('HSET', KEYS[3], 'status', 'queued', 'worker', '')
redis.call('LPUSH', KEYS[5], ARGV[2])
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[3], '*', 'job', ARGV[2])
return 1
"""

# KEYS lease | ARGV token, lease ms -> 1 | 0 lost
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS queue, job, events, tries, images... | ARGV id, now, ttl -> the job's fields | false (no such job)
CANCEL = """
local status = redis.call('HGET', KEYS[2], 'status')
if not status then return false end
if status == 'queued' then
  redis.call('LREM', KEYS[1], 0, ARGV[1])
  redis.call('HSET', KEYS[2], 'status', 'cancelled', 'finished_at', ARGV[2])
  redis.call('XADD', KEYS[3], '*', 'type', 'cancelled', 'data', '{"job_id":' .. cjson.encode(ARGV[1]) .. '}')
  for i = 2, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
elseif status == 'running' then
  redis.call('HSET', KEYS[2], 'cancel', '1')
end
return redis.call('HGETALL', KEYS[2])
"""

# KEYS running, queue, wake | ARGV prefixes, max attempts, now, ttl, error JSON, wake maxlen -> jobs recovered
# A claimed job whose lease expired goes back to the head of the queue, or fails past max attempts, or ends
# cancelled when a cancellation was asked for.
RECOVER = (
    _PREFIXES
    + """
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', P.lease .. id) == 0 then
    redis.call('SREM', KEYS[1], id)
    local job = P.job .. id
    if redis.call('HGET', job, 'status') == 'running' then
      local events = P.events .. id
      local tries = tonumber(redis.call('GET', P.tries .. id) or '0')
      local jid = cjson.encode(id)
      if redis.call('HGET', job, 'cancel') == '1' then
        redis.call('HSET', job, 'status', 'cancelled', 'finished_at', ARGV[3])
        redis.call('XADD', events, '*', 'type', 'cancelled', 'data', '{"job_id":' .. jid .. '}')
        expire_job(id, ARGV[4])
      elseif tries >= tonumber(ARGV[2]) then
        redis.call('HSET', job, 'status', 'failed', 'finished_at', ARGV[3], 'error', ARGV[5])
        redis.call('XADD', events, '*', 'type', 'failed', 'data',
          '{"job_id":' .. jid .. ',"error":' .. ARGV[5] .. '}')
        expire_job(id, ARGV[4])
      else
        redis.call('HSET', job, 'status', 'queued', 'worker', '')
        redis.call('LPUSH', KEYS[2], id)
        redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'job', id)
      end
      n = n + 1
    end
  end
end
return n
"""
)
