-- stella.queue.redis_lib: the Redis 7 Function library of the work queue (library
-- "stella_queue", loaded by stella.queue's append with stella.redis's load_library,
-- versioned as the store's library "stella" is). A library of its own: the queue's keys
-- have no hash tag (README, "Work queue"), and FUNCTION LOAD REPLACE of one library
-- never touches the other.
--
--   stella_enqueue   KEYS[1] the stream (P events); ARGV[1] the consumer group, ARGV[2]
--                    the capacity (0: none), ARGV[3..] the events' JSON texts.
--                    Appends one entry { event = text } per text, all of them or none:
--                    none when the group's backlog (entries not yet read by the group,
--                    its lag, plus those read and not acknowledged, its pending count)
--                    and the new ones would exceed the capacity; then the error reply
--                    "FULL the queue holds N of its capacity of C events". With a
--                    capacity, makes the group (from the stream's start) when there is
--                    none, as stella.queue's ensure_group does. -> the new entries' ids
--
-- When Redis cannot tell the group's lag (entries deleted with XDEL inside the range not
-- yet read), the backlog counted is the stream's length, done entries not yet trimmed
-- included: an over-count, so a refusal too early rather than a queue over its capacity.
local M = {}

M.name = "stella_queue"
M.version = 1

M.code = [==[#!lua name=stella_queue
local function fields(list)
  local f = {}
  for i = 1, #list - 1, 2 do f[list[i]] = list[i + 1] end
  return f
end

-- the group's backlog: lag + pending (false when Redis cannot tell the lag)
local function backlog(stream, group)
  local found = false
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local f = fields(g)
    if f['name'] == group then
      found = true
      if f['lag'] then return f['lag'] + f['pending'] end
    end
  end
  if not found then redis.call('XGROUP', 'CREATE', stream, group, '0') end
  return false
end

local function stella_enqueue(keys, args)
  local stream, group, capacity = keys[1], args[1], tonumber(args[2])
  local n = #args - 2
  if capacity > 0 then
    local waiting
    if redis.call('EXISTS', stream) == 0 then
      redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
      waiting = 0
    else
      waiting = backlog(stream, group) or redis.call('XLEN', stream)
    end
    if waiting + n > capacity then
      return redis.error_reply('FULL the queue holds ' .. waiting .. ' of its capacity of ' .. capacity
        .. ' events')
    end
  end
  local ids = {}
  for i = 3, #args do ids[#ids + 1] = redis.call('XADD', stream, '*', 'event', args[i]) end
  return ids
end

redis.register_function('stella_enqueue', stella_enqueue)
]==]

return M
