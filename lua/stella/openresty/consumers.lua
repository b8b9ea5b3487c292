-- stella.openresty.consumers: a fixed pool of long-running timers per nginx worker that
-- take entries off a queue (stella.openresty.queue or anything with its pop(), which
-- returns a list of entries) and hand them to a function. Never one timer per event: the work a worker does at once is the
-- pool's size, whatever arrives.
--
--   local consumers = require "stella.openresty.consumers"
--   local pool = consumers.start{
--     queue = q, size = 8, batch = 1, poll = 0.5,
--     handle = function(entries) ... end,   -- in a timer: cosockets, ngx.sleep work
--   }
--   pool:wake(n)       -- entries were pushed in this worker: wake up to n idle consumers
--   pool:in_flight()   -- { [entry] = entry } taken and not yet handled (this worker)
--   pool:busy()        -- consumers handling entries now (this worker)
--
-- An idle consumer waits on a semaphore that wake() posts, for at most `poll` seconds, so
-- entries pushed by another worker are taken within `poll`. When nginx stops or reloads
-- (ngx.worker.exiting()), each consumer finishes the entries it holds and returns: what
-- is still queued stays queued (the caller's exit_worker decides what to spool). A handle
-- that raises is logged with the entries' ids, which are then given to on_error
-- (default: logged only).
local ngx = rawget(_G, "ngx")
local error, pcall, tostring, type, setmetatable, floor, concat =
      error, pcall, tostring, type, setmetatable, math.floor, table.concat

local M = {}

local Pool = {}
Pool.__index = Pool

local function whole(v, name, default, max)
  if v == nil then return default end
  if type(v) ~= "number" or v < 1 or v ~= floor(v) or v > max then
    error("stella.openresty.consumers: " .. name .. " must be a whole number from 1 to " .. max, 3)
  end
  return v
end

local function ids_of(entries)
  local ids = {}
  for i = 1, #entries do ids[i] = tostring(entries[i].id) end
  return concat(ids, ",")
end

local function run(self)
  local queue, batch, handle, sema = self.queue, self.batch, self.handle, self.sema
  local exiting = ngx.worker.exiting
  while not exiting() do
    local entries, n = {}, 0
    while n < batch do
      -- one push's entries (a batch may bring more than `batch`), or up to batch - n of a
      -- queue that counts (stella.openresty.redis_queue)
      local got = queue:pop(batch - n)
      if not got then break end
      for i = 1, #got do
        local e = got[i]
        n = n + 1
        entries[n] = e
        self.flight[e] = e
      end
    end
    if #entries == 0 then
      sema:wait(self.poll)
    else
      self.nbusy = self.nbusy + 1
      local ok, err = pcall(handle, entries)
      self.nbusy = self.nbusy - 1
      for i = 1, #entries do self.flight[entries[i]] = nil end
      if not ok then
        ngx.log(ngx.ERR, "stella: consumer failed on queue entries ", ids_of(entries), ": ", tostring(err))
        if self.on_error then pcall(self.on_error, entries, err) end
      end
    end
  end
end

local function consumer(premature, self)
  if premature then return end
  local ok, err = pcall(run, self)
  if not ok then ngx.log(ngx.ERR, "stella: a consumer stopped: ", tostring(err)) end
  -- a consumer that died of a bug is replaced, unless nginx is going away
  if not ok and not ngx.worker.exiting() then
    local tok, terr = ngx.timer.at(1, consumer, self)
    if not tok then ngx.log(ngx.ERR, "stella: cannot restart a consumer: ", tostring(terr)) end
  end
end

-- start{ queue, handle, size (8), batch (1), poll (0.5 s), on_error } -> pool
function M.start(opts)
  if type(opts) ~= "table" then error("stella.openresty.consumers: options table expected", 2) end
  if type(opts.handle) ~= "function" then error("stella.openresty.consumers: handle must be a function", 2) end
  if type(opts.queue) ~= "table" or type(opts.queue.pop) ~= "function" then
    error("stella.openresty.consumers: queue must have a pop() method", 2)
  end
  local poll = opts.poll or 0.5
  if type(poll) ~= "number" or not (poll > 0) then
    error("stella.openresty.consumers: poll must be a positive number of seconds", 2)
  end
  local semaphore = require "ngx.semaphore"
  local self = setmetatable({
    queue = opts.queue, handle = opts.handle, on_error = opts.on_error,
    size = whole(opts.size, "size", 8, 256), batch = whole(opts.batch, "batch", 1, 1000),
    poll = poll, sema = assert(semaphore.new(0)), flight = {}, nbusy = 0,
  }, Pool)
  for _ = 1, self.size do
    local ok, err = ngx.timer.at(0, consumer, self)
    if not ok then return nil, "cannot start a consumer: " .. tostring(err) end
  end
  return self
end

function Pool:wake(n)
  local idle = self.size - self.nbusy
  if n > idle then n = idle end
  local waiting = -self.sema:count()   -- a negative count: that many are waiting
  if n > waiting then n = waiting end
  if n > 0 then self.sema:post(n) end
end

function Pool:in_flight()
  return self.flight
end

function Pool:busy()
  return self.nbusy
end

return M
