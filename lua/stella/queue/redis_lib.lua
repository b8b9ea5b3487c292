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
--   stella_enqueue_many   the same for several pushes in one call (the pushes of a
--                    worker's concurrent requests, stella.openresty.redis_queue): ARGV[3..]
--                    for each push its count k, then its k texts. Each push all or none,
--                    in order, against the capacity left by the ones before it.
--                    -> per push, its ids or the error "FULL ..."
--
-- When Redis cannot tell the group's lag (entries deleted with XDEL inside the range not
-- yet read), the backlog counted is the stream's length, done entries not yet trimmed
-- included: an over-count, so a refusal too early rather than a queue over its capacity.
local M = {}

M.name = "stella_queue"
M.version = 2

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

-- what the group has not done yet (0 without a capacity: not counted)
local function waiting_now(stream, group, capacity)
  if capacity <= 0 then return 0 end
  if redis.call('EXISTS', stream) == 0 then
    redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
    return 0
  end
  return backlog(stream, group) or redis.call('XLEN', stream)
end

local function full(waiting, capacity)
  return redis.error_reply('FULL the queue holds ' .. waiting .. ' of its capacity of ' .. capacity .. ' events')
end

-- args[from .. to] appended -> their ids
local function append(stream, args, from, to)
  local ids = {}
  for i = from, to do ids[#ids + 1] = redis.call('XADD', stream, '*', 'event', args[i]) end
  return ids
end

local function stella_enqueue(keys, args)
  local stream, capacity = keys[1], tonumber(args[2])
  local waiting = waiting_now(stream, args[1], capacity)
  if capacity > 0 and waiting + #args - 2 > capacity then return full(waiting, capacity) end
  return append(stream, args, 3, #args)
end

local function stella_enqueue_many(keys, args)
  local stream, capacity = keys[1], tonumber(args[2])
  local waiting = waiting_now(stream, args[1], capacity)
  local out, i = {}, 3
  while i <= #args do
    local k = tonumber(args[i])
    if capacity > 0 and waiting + k > capacity then
      out[#out + 1] = full(waiting, capacity)
    else
      out[#out + 1] = append(stream, args, i + 1, i + k)
      waiting = waiting + k
    end
    i = i + k + 1
  end
  return out
end

redis.register_function('stella_enqueue', stella_enqueue)
redis.register_function('stella_enqueue_many', stella_enqueue_many)
]==]

return M
