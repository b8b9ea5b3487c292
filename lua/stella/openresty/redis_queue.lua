-- stella.openresty.redis_queue: the queue of stella.openresty.service on Redis: the work
-- queue's stream (stella.queue: P events, entries { event = JSON }, consumer group
-- "stella"), over cosockets. An event answered 202 is in Redis, and `stella worker`
-- processes, the in-nginx consumers, or both read it, as members of one group.
--
--   local redis_queue = require "stella.openresty.redis_queue"
--   local q = redis_queue.new{
--     url = "redis://127.0.0.1:6379/0", prefix = "stella:",
--     capacity = 100000,     -- entries accepted and not yet done (lag + pending); then
--                            -- push fails (503); 0: no limit but Redis' memory
--     timeout = 1,           -- seconds: connecting, and each command (a push included)
--     lease = 30,            -- an entry unacknowledged that long is taken over (XAUTOCLAIM)
--     max_deliveries = 5,    -- then it goes to the dead-letter stream
--   }
--   q:push(payload or { payloads }, now) -> true | nil, err   (stella_enqueue: all or none,
--                            refused over the capacity; err.full then)
--   q:pop(n)              -> up to n entries { id, fields, deliveries } | nil: a consumer's
--                            read (XREADGROUP, not blocking), or a dead consumer's entries
--                            taken over (every lease/2 s); the stream trimmed every 10 s,
--                            and the group rid of idle nginx-... consumers holding nothing
--   q:consume(entries, service) -> decides, sends, settles and acknowledges them as
--                            `stella worker` does (stella.queue.worker's process)
--   q:restore(entries)    -> n   (entries { payload } of a spool file, appended again)
--   q:depth()             -> entries accepted and not yet done | nil, err
--   q:oldest_age(now)     -> seconds the oldest of them has waited | nil, err
--   q.durable             true: what is queued outlives nginx (service: nothing to spool)
--
-- Pushes share calls (a group commit): a request's push waits in the worker's list, and
-- a flusher (one timer per worker, started by the first push) sends every push waiting
-- in one stella_enqueue_many call, each push all or none against the capacity, then
-- wakes each request with its own result. Under load a call carries the pushes that came
-- while the one before was under way; alone, a push has a call to itself.
--
-- One object per worker (stella.openresty.service keeps it). Inside nginx a cosocket
-- belongs to the request or timer that opened it: the object keeps one connection as a
-- template (made on first use, in a phase with cosockets) and each operation forks it,
-- taking a connection from nginx's keep-alive pool and giving it back when it is done.
-- Each nginx worker is one consumer of the group, named nginx-HOST-PID.
local queue_mod = require "stella.queue"
local worker = require "stella.queue.worker"
local redis = require "stella.redis"
local failure = require("stella.openresty.queue").failure

local ngx = rawget(_G, "ngx")
local error, ipairs, pairs, pcall, setmetatable, tostring, type, floor, concat =
      error, ipairs, pairs, pcall, setmetatable, tostring, type, math.floor, table.concat

local M = {}

local Queue = {}
Queue.__index = Queue
M.Queue = Queue

local TRIM_EVERY = 10        -- seconds between trims of the stream (per worker)
local LOG_EVERY = 5          -- seconds between two log lines of a failing read
local RESTORE_CHUNK = 100    -- entries appended by one call when restoring a spool
local FLUSHER_IDLE = 0.5     -- seconds the idle flusher waits before looking at exiting()
local CONSUMER_PREFIX = "nginx-"
local FORGET_IDLE = 3600     -- seconds: a consumer named nginx-... idle that long, holding
                             -- nothing, is a worker gone (live ones read every `poll` s)

local function positive(opts, name, default)
  local v = opts[name]
  if v == nil then return default end
  if type(v) ~= "number" or not (v > 0) then
    error("stella.openresty.redis_queue: " .. name .. " must be a positive number", 3)
  end
  return v
end

local function host_name()
  local f = io.open("/proc/sys/kernel/hostname", "r")
  local h = f and f:read("*l")
  if f then f:close() end
  return h or "host"
end

local KNOWN = { url = true, prefix = true, capacity = true, timeout = true, lease = true, max_deliveries = true }

function M.new(opts)
  if type(opts) ~= "table" then error("stella.openresty.redis_queue: options table expected", 2) end
  for k in pairs(opts) do
    if not KNOWN[k] then error("stella.openresty.redis_queue: unknown option " .. tostring(k), 2) end
  end
  if type(opts.url) ~= "string" then
    error("stella.openresty.redis_queue: url (a redis:// or unix:// URL) expected", 2)
  end
  local capacity = opts.capacity or 100000
  if type(capacity) ~= "number" or capacity < 0 or capacity ~= floor(capacity) then
    error("stella.openresty.redis_queue: capacity must be a whole number >= 0 (0: no limit)", 2)
  end
  local max_deliveries = opts.max_deliveries or 5
  if type(max_deliveries) ~= "number" or max_deliveries < 1 or max_deliveries ~= floor(max_deliveries) then
    error("stella.openresty.redis_queue: max_deliveries must be a whole number >= 1", 2)
  end
  local _, perr = redis.parse_url(opts.url)
  if perr then error("stella.openresty.redis_queue: " .. perr, 2) end
  local prefix = opts.prefix or "stella:"
  return setmetatable({
    url = opts.url, prefix = prefix, capacity = capacity > 0 and capacity or nil,
    timeout = positive(opts, "timeout", 1), lease = positive(opts, "lease", 30),
    max_deliveries = max_deliveries, durable = true,
    name = nil,               -- this worker's consumer name, on first use
    conn = nil,               -- the template connection, on first use
    proto = nil,              -- a stella.queue over it, copied for each operation
    group_made = false, last_reclaim = 0, last_trim = 0, last_log = 0,
    cached = nil, cached_at = nil,
    waiting = {},             -- pushes for the flusher's next call
    flushing = false,         -- the flusher runs
    work = nil,               -- its semaphore (ngx.semaphore), on first push
  }, Queue)
end

-- A stella.queue object over a connection of its own (a fork of the template), or nil, err.
local function open(self)
  local conn = self.conn
  if not conn then
    local err
    conn, err = redis.connect{ url = self.url, prefix = self.prefix, connect_timeout = self.timeout,
                               timeout = self.timeout }
    if not conn then return nil, err end
    conn:close()   -- back to nginx's pool: every operation takes its own
    self.conn, self.proto = conn, assert(queue_mod.open(conn))
    self.name = CONSUMER_PREFIX .. host_name() .. "-" .. tostring(ngx.worker.pid())
  end
  local q = self.proto:using(conn:fork())
  q.group_made = self.group_made
  return q
end

local function done(self, q)
  self.group_made = q.group_made
  q.conn:close()
end

local function as_failure(err)
  local full = type(err) == "table" and err.code == "FULL"
  local message = tostring(err)
  if full then message = message:gsub("^FULL ", "") end
  return failure("redis queue: " .. message, full)
end

-- One call for the pushes waiting: each gets ok = true or err, and its semaphore posted.
local function send(self, batch)
  local pushes = {}
  for i, p in ipairs(batch) do pushes[i] = p.texts end
  local results, err
  local q, oerr = open(self)
  if q then
    local ok
    ok, results, err = pcall(q.append_many, q, pushes, self.capacity or 0)
    if not ok then results, err = nil, results end
    done(self, q)
  else
    err = oerr
  end
  for i, p in ipairs(batch) do
    local r = results and results[i]
    if type(r) == "table" and not redis.is_error(r) then p.ok = true
    else p.err = as_failure(r or err or "no answer for this push") end
    p.sema:post(1)
  end
end

local function flusher(premature, self)
  local exiting = ngx.worker.exiting
  while not premature do
    local batch = self.waiting
    if #batch > 0 then
      self.waiting = {}
      local live = {}
      for _, p in ipairs(batch) do
        if not p.gone then live[#live + 1] = p end   -- gone: its request stopped waiting
      end
      if #live > 0 then
        local ok, err = pcall(send, self, live)
        if not ok then
          ngx.log(ngx.ERR, "stella: the Redis queue's flusher failed: ", tostring(err))
          for _, p in ipairs(live) do
            if p.ok == nil and not p.err then p.err = failure("redis queue: " .. tostring(err)) p.sema:post(1) end
          end
        end
      end
    elseif exiting() then
      break
    else
      self.work:wait(FLUSHER_IDLE)
    end
  end
  self.flushing = false
  for _, p in ipairs(self.waiting) do   -- nginx stopping: no call for these
    p.err = failure("redis queue: nginx is stopping")
    p.sema:post(1)
  end
  self.waiting = {}
end

function Queue:push(payloads, _)
  local texts = payloads
  if type(payloads) == "string" then texts = { payloads }
  elseif type(payloads) ~= "table" then error("queue:push: a string or a list of strings expected", 2) end
  if #texts == 0 then return true end
  local semaphore = require "ngx.semaphore"
  if not self.work then self.work = semaphore.new(0) end
  if not self.flushing then
    local ok, terr = ngx.timer.at(0, flusher, self)
    if not ok then return nil, failure("redis queue: cannot start the flusher: " .. tostring(terr)) end
    self.flushing = true
  end
  local me = { texts = texts, sema = semaphore.new(0) }
  local w = self.waiting
  w[#w + 1] = me
  -- wake the flusher if it waits (a negative count); busy, it looks at the list after its call
  if self.work:count() < 0 then self.work:post(1) end
  -- connecting, authenticating and the call, after the call under way
  local ok = me.sema:wait(4 * self.timeout + 0.1)
  if not ok then
    me.gone = true   -- dropped unless a call has taken it already (then as ambiguous as a timeout)
    return nil, failure("redis queue: no answer within " .. (4 * self.timeout + 0.1) .. " s")
  end
  if me.ok then return true end
  return nil, me.err
end

local function log_failure(self, what, err)
  local now = ngx.now()
  if now - self.last_log >= LOG_EVERY then
    ngx.log(ngx.ERR, "stella: ", what, ": ", tostring(err))
    self.last_log = now
  end
end

function Queue:pop(n)
  n = n or 1
  local q, err = open(self)
  if not q then log_failure(self, "cannot reach the Redis queue", err) return nil end
  local now, entries = ngx.now(), nil
  -- a dead consumer's entries first (looked for every half lease)
  if now - self.last_reclaim >= self.lease / 2 then
    self.last_reclaim = now
    entries, err = q:reclaim(self.name, self.lease * 1000, n)
    if entries and #entries == n then self.last_reclaim = 0 end   -- more may wait
  end
  if not err and (not entries or #entries == 0) then
    entries, err = q:read(self.name, n)
  end
  if not err and now - self.last_trim >= TRIM_EVERY then
    self.last_trim = now
    q:trim()   -- done entries out of the stream (failure: the next time)
    q:forget_consumers(CONSUMER_PREFIX, FORGET_IDLE * 1000)   -- the names of workers gone
  end
  done(self, q)
  if err then log_failure(self, "cannot read the Redis queue", err) return nil end
  if #entries == 0 then return nil end
  return entries
end

local function ids_of(entries)
  local ids = {}
  for i, e in ipairs(entries) do ids[i] = tostring(e.id) end
  return ids
end

-- The consumers' work: as `stella worker` does with a batch. Entries not acknowledged
-- (the store failed, Redis went away) stay pending and come back after the lease.
function Queue:consume(entries, service)
  local q, err = open(self)
  if not q then
    ngx.log(ngx.ERR, "stella: entries ", concat(ids_of(entries), ","), " stay pending (taken again after the ",
      "lease): ", tostring(err))
    return
  end
  local ok, trigger = pcall(service.get_trigger)
  if not ok then
    q:note_error(ids_of(entries), trigger)
    done(self, q)
    error(trigger, 0)
  end
  local report = { read = #entries, acked = 0, dead = 0, retried = 0, outcomes = {} }
  local pok, res, perr = pcall(worker.process, { queue = q, trigger = trigger, name = self.name,
    max_deliveries = self.max_deliveries, on_outcome = service.on_outcome }, entries, report)
  done(self, q)
  if not pok or not res then
    ngx.log(ngx.ERR, "stella: entries ", concat(ids_of(entries), ","), " stay pending (taken again after the ",
      "lease): ", tostring(pok and perr or res))
  elseif report.retried > 0 then
    ngx.log(ngx.WARN, "stella: ", report.retried, " entry(ies) not decided (the store failed): pending, taken again ",
      "after the lease")
  end
end

function Queue:restore(entries)
  local q, err = open(self)
  if not q then return 0, as_failure(err) end
  local n = 0
  for from = 1, #entries, RESTORE_CHUNK do
    local texts = {}
    for i = from, math.min(#entries, from + RESTORE_CHUNK - 1) do texts[#texts + 1] = entries[i].payload end
    local ids, aerr = q:append(texts, 0)
    if not ids then
      done(self, q)
      return n, as_failure(aerr)
    end
    n = n + #texts
  end
  done(self, q)
  return n
end

-- The backlog, read at most once per moment (health asks for depth, then oldest_age).
local function backlog(self)
  local now = ngx.now()
  if self.cached and self.cached_at == now then return self.cached end
  local q, err = open(self)
  if not q then return nil, err end
  local b, berr = q:backlog()
  done(self, q)
  if not b then return nil, berr end
  self.cached, self.cached_at = b, now
  return b
end

function Queue:depth()
  local b, err = backlog(self)
  if not b then return nil, err end
  return b.waiting
end

function Queue:oldest_age(now)
  local b, err = backlog(self)
  if not b then return nil, err end
  if not b.oldest then return 0 end
  local age = (now or ngx.now()) - b.oldest
  return age > 0 and age or 0
end

Queue.__tostring = function(self)
  local shown = self.conn and tostring(self.conn) or "stella.redis(not connected)"
  return "stella.openresty.redis_queue (" .. shown .. ")"
end

return M
