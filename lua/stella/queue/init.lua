-- stella.queue: the work queue on Redis Streams. Producers append events to one stream;
-- `stella worker` processes read it through one consumer group (stella.queue.worker).
--
--   local queue = require "stella.queue"
--   local q, err = queue.open{ url = "redis://...", prefix = "stella:", group = "stella" }
--   q:submit(event)          -> entry id | nil, err   (an event table, sent as JSON)
--   q:submit_json(text)      -> entry id | nil, err   (JSON text as it is: a worker checks it)
--   q:append(texts, capacity) -> entry ids | nil, err  (JSON texts, all or none; err.code
--                               "FULL" when the group's backlog would pass capacity;
--                               0 or nil: no limit; stella.queue.redis_lib)
--   q:append_many({ texts1, texts2 }, capacity) -> { ids | error value per push } | nil, err
--   q:backlog()              -> { waiting, lag, pending, oldest } | nil, err
--   q:forget_consumers(prefix, min_idle_ms) -> n removed (idle, holding nothing)
--   q:dead_letter(fields)    -> entry id | nil, err   (straight to the dead-letter stream)
--   q:using(conn)            -> the same queue over another connection (not owned)
--   q:close()
--
-- Any Redis client can produce: XADD <prefix>events * event <json> (README, "Work queue").
--
-- Keys (P = prefix, default "stella:"):
--   P events          stream  the queue: entries { event = JSON }
--   P events:dead     stream  dead letters: { event, reason, id (the entry's), deliveries,
--                             worker, time }
--   P events:errors   hash    entry id -> the last error processing it (until acknowledged)
--   P workers         hash    worker name -> JSON { beat, started, pid, state, host, processed };
--                             forgotten after a silence (prune)
-- The consumer group (default "stella") is made on first use (XGROUP CREATE ... MKSTREAM).
local redis = require "stella.redis"
local cjson = require "cjson.safe"
local queue_lib = require "stella.queue.redis_lib"

local error, ipairs, pairs, tonumber, tostring, type, setmetatable =
      error, ipairs, pairs, tonumber, tostring, type, setmetatable
local getmetatable = getmetatable
local floor = math.floor
local unpack_args = table.unpack or unpack   -- luacheck: ignore

local M = {}

local Queue = {}
Queue.__index = Queue
M.Queue = Queue

M.DEFAULT_GROUP = "stella"

local function fail(kind, message)
  return nil, { kind = kind, message = message }
end

-- queue.open(url | { url, prefix, group, timeout } | conn) -> queue | nil, err
function M.open(opts)
  if type(opts) == "string" then opts = { url = opts } end
  if type(opts) ~= "table" then error("stella.queue.open: a URL, an options table or a connection expected", 2) end
  local conn, own = opts, false
  if getmetatable(opts) ~= redis.Conn then
    if opts.group ~= nil and (type(opts.group) ~= "string" or opts.group == "") then
      error("stella.queue.open: group must be a non-empty string", 2)
    end
    local err
    conn, err = redis.connect{ url = opts.url, prefix = opts.prefix, timeout = opts.timeout }
    if not conn then return nil, err end
    own = true
  end
  local p = conn.prefix
  return setmetatable({
    conn = conn, own = own, group = (own and opts.group) or M.DEFAULT_GROUP,
    stream = p .. "events", dead_stream = p .. "events:dead", errors = p .. "events:errors",
    workers_key = p .. "workers", group_made = false, shas = {},
  }, Queue)
end

-- The same queue over another connection (not owned: close() leaves it open). Inside
-- nginx each operation forks a template conn (stella.openresty.redis_queue).
function Queue:using(conn)
  local q = {}
  for k, v in pairs(self) do q[k] = v end
  q.conn, q.own = conn, false
  return setmetatable(q, Queue)
end

-- true when Redis answers (PING on the queue's connection), else nil, err.
function Queue:ping()
  return self.conn:call("PING")
end

function Queue:close()
  if self.own and self.conn then self.conn:close() end
  self.conn = nil
end

function Queue:submit_json(text)
  if type(text) ~= "string" then error("queue:submit_json: a string expected", 2) end
  return self.conn:call("XADD", self.stream, "*", "event", text)
end

function Queue:submit(event)
  if type(event) ~= "table" then error("queue:submit: an event table expected", 2) end
  local text, err = cjson.encode(event)
  if not text then return fail("invalid", "the event cannot be encoded as JSON: " .. tostring(err)) end
  return self:submit_json(text)
end

-- The library of stella_enqueue, loaded on the conn once (its forks share the list of
-- libraries, so a fork's fcall loads it again on a server that lost it): true, or nil, err.
local function load_library(conn)
  for _, l in ipairs(conn.libraries) do
    if l.name == queue_lib.name then return true end
  end
  return conn:load_library(queue_lib.name, queue_lib.code, queue_lib.version)
end

-- What append and append_many start their call's ARGV with (the group, the capacity),
-- the library loaded; or nil, err. A capacity other than nil or a whole number >= 0 is
-- misuse: raised at their caller.
local function enqueue_args(self, capacity, who)
  if capacity ~= nil and (type(capacity) ~= "number" or capacity < 0 or capacity ~= floor(capacity)) then
    error(who .. ": capacity must be a whole number >= 0", 3)
  end
  local ok, err = load_library(self.conn)
  if not ok then return nil, err end
  return { self.group, tostring(capacity or 0) }
end

function Queue:append(texts, capacity)
  if type(texts) ~= "table" then error("queue:append: a list of JSON texts expected", 2) end
  local args, err = enqueue_args(self, capacity, "queue:append")
  if not args then return nil, err end
  for i = 1, #texts do
    if type(texts[i]) ~= "string" then error("queue:append: text " .. i .. " is not a string", 2) end
    args[i + 2] = texts[i]
  end
  return self.conn:fcall("stella_enqueue", { self.stream }, args)
end

-- Several pushes in one call: pushes = { { texts }, ... }, each all or none against the
-- capacity (stella_enqueue_many). -> a result per push: its ids, or an error value
-- (redis.is_error; code "FULL"); or nil, err when the call failed as a whole.
function Queue:append_many(pushes, capacity)
  if type(pushes) ~= "table" then error("queue:append_many: a list of lists of JSON texts expected", 2) end
  local args, err = enqueue_args(self, capacity, "queue:append_many")
  if not args then return nil, err end
  local n = 2
  for i = 1, #pushes do
    local texts = pushes[i]
    n = n + 1
    args[n] = tostring(#texts)
    for j = 1, #texts do
      if type(texts[j]) ~= "string" then error("queue:append_many: push " .. i .. ", text " .. j .. " is not a string", 2) end
      n = n + 1
      args[n] = texts[j]
    end
  end
  return self.conn:fcall("stella_enqueue_many", { self.stream }, args)
end

-- fields: { event = raw text or "", reason = "...", id = entry id or "", deliveries, worker }
function Queue:dead_letter(fields)
  local args = { "XADD", self.dead_stream, "*" }
  for _, k in ipairs{ "event", "reason", "id", "deliveries", "worker" } do
    if fields[k] ~= nil then args[#args + 1] = k args[#args + 1] = tostring(fields[k]) end
  end
  args[#args + 1] = "time"
  args[#args + 1] = tostring(fields.time or os.time())
  return self.conn:call(unpack_args(args))
end

-- Makes the consumer group (from the stream's start) unless it exists.
function Queue:ensure_group()
  if self.group_made then return true end
  local ok, err = self.conn:call("XGROUP", "CREATE", self.stream, self.group, "0", "MKSTREAM")
  if not ok and not (err.code == "BUSYGROUP") then return nil, err end
  self.group_made = true
  return true
end

-- Stream entries as { id, fields = { name = value } }.
local function entries_of(list)
  local out = {}
  for _, e in ipairs(list or {}) do
    if type(e) == "table" and type(e[1]) == "string" then
      local fields, kv = {}, e[2]
      if type(kv) == "table" then
        for i = 1, #kv - 1, 2 do fields[kv[i]] = kv[i + 1] end
      end
      out[#out + 1] = { id = e[1], fields = fields, deliveries = 1 }
    end
  end
  return out
end

-- New entries for consumer: XREADGROUP ... COUNT count BLOCK block_ms. -> entries | nil, err
function Queue:read(consumer, count, block_ms)
  local ok, err = self:ensure_group()
  if not ok then return nil, err end
  local args = { "XREADGROUP", "GROUP", self.group, consumer, "COUNT", count }
  if block_ms and block_ms > 0 then args[#args + 1] = "BLOCK" args[#args + 1] = floor(block_ms) end
  args[#args + 1] = "STREAMS" args[#args + 1] = self.stream args[#args + 1] = ">"
  local res, rerr = self.conn:call(unpack_args(args))
  if res == nil then
    if rerr.code == "NOGROUP" then self.group_made = false end
    return nil, rerr
  end
  if not res then return {} end   -- nil reply: nothing came while it blocked
  return entries_of(res[1] and res[1][2])
end

-- Entries of other consumers idle for min_idle_ms or more, now consumer's (XAUTOCLAIM),
-- each with its delivery count (this delivery included) and last error.
function Queue:reclaim(consumer, min_idle_ms, count)
  local ok, err = self:ensure_group()
  if not ok then return nil, err end
  local res, rerr = self.conn:call("XAUTOCLAIM", self.stream, self.group, consumer, floor(min_idle_ms), "0-0",
                                   "COUNT", count)
  if not res then return nil, rerr end
  local entries = entries_of(res[2])
  if #entries == 0 then return entries end
  local pending, perr = self.conn:call("XPENDING", self.stream, self.group, entries[1].id, entries[#entries].id,
                                       #entries * 2, consumer)
  if not pending then return nil, perr end
  local deliveries = {}
  for _, p in ipairs(pending) do deliveries[p[1]] = tonumber(p[4]) end
  local ids = { "HMGET", self.errors }
  for _, e in ipairs(entries) do
    e.deliveries = deliveries[e.id] or 2
    ids[#ids + 1] = e.id
  end
  local errs = self.conn:call(unpack_args(ids))
  if type(errs) == "table" then
    for i, e in ipairs(entries) do if errs[i] then e.last_error = errs[i] end end
  end
  return entries
end

-- Acknowledges entries (XACK, their noted errors gone). -> true | nil, err
function Queue:ack(ids)
  if #ids == 0 then return true end
  local xack, hdel = { "XACK", self.stream, self.group }, { "HDEL", self.errors }
  for _, id in ipairs(ids) do xack[#xack + 1] = id hdel[#hdel + 1] = id end
  local res, err = self.conn:pipeline{ xack, hdel }
  if not res then return nil, err end
  if redis.is_error(res[1]) then return nil, res[1] end
  return true
end

-- Notes the error of a try that did not end in an acknowledgement.
function Queue:note_error(ids, message)
  if #ids == 0 then return true end
  local args = { "HSET", self.errors }
  for _, id in ipairs(ids) do args[#args + 1] = id args[#args + 1] = tostring(message) end
  return self.conn:call(unpack_args(args))
end

-- An entry to the dead-letter stream and acknowledged, in one MULTI/EXEC.
function Queue:bury(entry, reason, worker)
  local add = { "XADD", self.dead_stream, "*", "event", entry.fields.event or "", "reason", tostring(reason),
                "id", entry.id, "deliveries", tostring(entry.deliveries or 1), "worker", tostring(worker or ""),
                "time", tostring(os.time()) }
  local res, err = self.conn:pipeline{ { "MULTI" }, add, { "XACK", self.stream, self.group, entry.id },
                                       { "HDEL", self.errors, entry.id }, { "EXEC" } }
  if not res then return nil, err end
  local exec = res[5]
  if redis.is_error(exec) or not exec then return nil, redis.is_error(exec) and exec or
    { kind = "redis", message = "the dead letter's transaction was aborted" } end
  return true
end

-- The dead letters, oldest first (newest first with newest): { id, event, reason, entry,
-- deliveries, worker, time }.
function Queue:dead(limit, newest)
  local res, err
  if newest then res, err = self.conn:call("XREVRANGE", self.dead_stream, "+", "-", "COUNT", limit or 100)
  else res, err = self.conn:call("XRANGE", self.dead_stream, "-", "+", "COUNT", limit or 100) end
  if not res then return nil, err end
  local out = {}
  for _, e in ipairs(entries_of(res)) do
    local f = e.fields
    out[#out + 1] = { id = e.id, event = f.event, reason = f.reason, entry = f.id,
                      deliveries = tonumber(f.deliveries), worker = f.worker, time = tonumber(f.time) }
  end
  return out
end

-- Dead letters back into the queue (`stella retry --dead`): each one with an event is
-- appended to the stream again and removed from the dead-letter stream, in one
-- MULTI/EXEC. One without an event (a line `stella submit` could not read) stays.
-- -> { replayed = n, kept = n } | nil, err
function Queue:replay_dead(limit)
  local res, err = self.conn:call("XRANGE", self.dead_stream, "-", "+", "COUNT", limit or 1000)
  if not res then return nil, err end
  local replayed, kept = 0, 0
  for _, e in ipairs(entries_of(res)) do
    local ev = e.fields.event
    if type(ev) == "string" and ev ~= "" then
      local r, rerr = self.conn:pipeline{ { "MULTI" }, { "XADD", self.stream, "*", "event", ev },
                                          { "XDEL", self.dead_stream, e.id }, { "EXEC" } }
      if not r then return nil, rerr end
      if redis.is_error(r[4]) or not r[4] then
        return nil, redis.is_error(r[4]) and r[4] or { kind = "redis", message = "the replay's transaction was aborted" }
      end
      replayed = replayed + 1
    else
      kept = kept + 1
    end
  end
  return { replayed = replayed, kept = kept }
end

-- A worker's heartbeat: info { state = "running"|"stopped", started, pid, host }.
function Queue:beat(name, info, now)
  local doc = { beat = now or os.time() }
  for k, v in pairs(info or {}) do doc[k] = v end
  return self.conn:call("HSET", self.workers_key, name, cjson.encode(doc))
end

-- Workers by name: { name, beat, state ("live", "vanished": no beat for `stale` seconds,
-- "stopped"), age, pid, host, started }.
function Queue:workers(now, stale)
  local res, err = self.conn:call("HGETALL", self.workers_key)
  if not res then return nil, err end
  now, stale = now or os.time(), stale or 15
  local out = {}
  for i = 1, #res - 1, 2 do
    local doc = cjson.decode(res[i + 1]) or {}
    local beat = tonumber(doc.beat) or 0
    local state = doc.state == "stopped" and "stopped" or (now - beat > stale and "vanished" or "live")
    out[#out + 1] = { name = res[i], beat = beat, age = now - beat, state = state, pid = doc.pid,
                      host = doc.host, started = doc.started, processed = doc.processed }
  end
  table.sort(out, function(a, b) return a.name < b.name end)
  return out
end

-- Removes a worker from the heartbeat hash (a stopped or vanished one).
function Queue:forget(name)
  return self.conn:call("HDEL", self.workers_key, name)
end

-- One name's prune, atomic (a worker starting again under that name in between keeps
-- it): the heartbeat goes when its last beat is older than the limit; the consumer of
-- that name when it holds nothing (XGROUP DELCONSUMER would drop what it holds) and has
-- been idle as long, and no heartbeat of it is younger. KEYS: the heartbeat hash, the
-- stream; ARGV: group, name, now (s), after (s). Returns { worker removed, consumer removed }.
local PRUNE_SCRIPT = [==[
local workers, stream = KEYS[1], KEYS[2]
local group, name, now, after = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local gone, fresh = 0, false
local doc = redis.call('HGET', workers, name)
if doc then
  local ok, d = pcall(cjson.decode, doc)
  local beat = ok and type(d) == 'table' and tonumber(d.beat) or 0
  if beat < now - after then
    redis.call('HDEL', workers, name)
    gone = 1
  else
    fresh = true
  end
end
local dropped = 0
if not fresh then
  local list = redis.pcall('XINFO', 'CONSUMERS', stream, group)
  if type(list) == 'table' and not list.err then
    for _, c in ipairs(list) do
      local f = {}
      for i = 1, #c - 1, 2 do f[c[i]] = c[i + 1] end
      if f.name == name and tonumber(f.pending) == 0 and tonumber(f.idle) >= after * 1000 then
        redis.call('XGROUP', 'DELCONSUMER', stream, group, name)
        dropped = 1
      end
    end
  end
end
return { gone, dropped }
]==]

M.FORGET_AFTER = 86400   -- a worker silent (stopped or vanished) this long is forgotten

-- Forgets workers and consumers no longer in use: heartbeats older than `after` seconds
-- (default a day: stopped or vanished that long) leave the heartbeat hash, and consumers
-- of the group that hold nothing and have been idle as long (with no younger heartbeat of
-- their name) leave the group. A consumer that still holds entries stays until another
-- worker has taken them over. -> { workers = n, consumers = n } | nil, err
function Queue:prune(now, after)
  now, after = now or os.time(), after or M.FORGET_AFTER
  local res, err = self.conn:pipeline{ { "HGETALL", self.workers_key },
                                       { "XINFO", "CONSUMERS", self.stream, self.group } }
  if not res then return nil, err end
  if redis.is_error(res[1]) then return nil, res[1] end
  local names, seen = {}, {}
  local function consider(name)
    if not seen[name] then seen[name] = true names[#names + 1] = name end
  end
  local beats = res[1]
  for i = 1, #beats - 1, 2 do
    local doc = cjson.decode(beats[i + 1])
    if not (type(doc) == "table" and tonumber(doc.beat) and tonumber(doc.beat) >= now - after) then consider(beats[i]) end
  end
  if not redis.is_error(res[2]) then
    for _, c in ipairs(res[2]) do
      local f = {}
      for i = 1, #c - 1, 2 do f[c[i]] = c[i + 1] end
      if tonumber(f.pending) == 0 and (tonumber(f.idle) or 0) >= after * 1000 then consider(f.name) end
    end
  end
  local removed = { workers = 0, consumers = 0 }
  for _, name in ipairs(names) do
    local r, serr = self:script(PRUNE_SCRIPT, { self.workers_key, self.stream }, { self.group, name, now, after })
    if not r then return nil, serr end
    removed.workers = removed.workers + (tonumber(r[1]) or 0)
    removed.consumers = removed.consumers + (tonumber(r[2]) or 0)
  end
  return removed
end

-- A script by EVALSHA, loaded (SCRIPT LOAD) on first use and again after NOSCRIPT.
function Queue:script(text, keys, args)
  local shas = self.shas
  for _ = 1, 2 do
    local sha = shas[text]
    if not sha then
      local loaded, lerr = self.conn:call("SCRIPT", "LOAD", text)
      if not loaded then return nil, lerr end
      sha = loaded
      shas[text] = sha
    end
    local argv = { "EVALSHA", sha, #keys }
    for _, k in ipairs(keys) do argv[#argv + 1] = k end
    for _, a in ipairs(args) do argv[#argv + 1] = tostring(a) end
    local res, err = self.conn:call(unpack_args(argv))
    if res ~= nil or err.code ~= "NOSCRIPT" then return res, err end
    shas[text] = nil
  end
  return nil, { kind = "redis", message = "the script could not be loaded" }
end

-- Removes dead letters (an operator's decision: nothing trims them on its own, a dead
-- letter being its event's only record): those with the given stream ids, or those
-- that died before `before` (seconds since the epoch). -> the number removed | nil, err
function Queue:purge_dead(o)
  if type(o) ~= "table" or (o.ids == nil) == (o.before == nil) then
    error("queue:purge_dead: { ids = { id, ... } } or { before = seconds } expected", 2)
  end
  if o.ids then
    if #o.ids == 0 then return 0 end
    local args = { "XDEL", self.dead_stream }
    for _, id in ipairs(o.ids) do args[#args + 1] = tostring(id) end
    return self.conn:call(unpack_args(args))
  end
  return self.conn:call("XTRIM", self.dead_stream, "MINID", ("%d-0"):format(floor(o.before * 1000)))
end

local function id_parts(id)
  local ms, seq = tostring(id):match("^(%d+)-(%d+)$")
  return tonumber(ms) or 0, tonumber(seq) or 0
end

local function id_less(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am < bm or (am == bm and as < bs)
end

-- The group's last delivered id and pending summary: last, pending count, oldest pending id.
local function group_position(self)
  local res, err = self.conn:pipeline{ { "XINFO", "GROUPS", self.stream }, { "XPENDING", self.stream, self.group } }
  if not res then return nil, err end
  if redis.is_error(res[1]) then return nil, res[1] end
  local last
  for _, g in ipairs(res[1]) do
    local f = {}
    for i = 1, #g - 1, 2 do f[g[i]] = g[i + 1] end
    if f.name == self.group then last = f["last-delivered-id"] end
  end
  if not last then return nil, { kind = "redis", message = "no consumer group " .. self.group } end
  local p = res[2]
  if redis.is_error(p) then return nil, p end
  return last, tonumber(p[1]) or 0, p[2] or nil
end

-- The group's backlog: { waiting (lag + pending: accepted, not yet done), lag (not yet
-- read), pending (read, not acknowledged), oldest (the time of the oldest entry not done,
-- s; nil when none) }. No stream yet: all 0; no group yet: the stream's length is the lag;
-- lag unknown to Redis (entries deleted with XDEL): the stream's length, an over-count.
function Queue:backlog()
  local res, err = self.conn:pipeline{ { "XINFO", "GROUPS", self.stream }, { "XLEN", self.stream },
                                       { "XPENDING", self.stream, self.group } }
  if not res then return nil, err end
  local length = tonumber(res[2]) or 0
  if redis.is_error(res[1]) then
    if length == 0 then return { waiting = 0, lag = 0, pending = 0 } end
    return nil, res[1]
  end
  local b, last = { pending = 0 }, nil
  for _, g in ipairs(res[1]) do
    local f = {}
    for i = 1, #g - 1, 2 do f[g[i]] = g[i + 1] end
    if f.name == self.group then
      b.pending, b.lag, last = tonumber(f.pending) or 0, tonumber(f.lag) or length, f["last-delivered-id"]
    end
  end
  b.lag = b.lag or length
  b.waiting = b.lag + b.pending
  local from
  local p = res[3]
  if b.pending > 0 and not redis.is_error(p) and type(p) == "table" then from = p[2] end
  if not from and b.lag > 0 then
    local ms, seq = id_parts(last or "0-0")
    local next_unread = self.conn:call("XRANGE", self.stream, last and ("(" .. ms .. "-" .. seq) or "-", "+",
                                       "COUNT", 1)
    from = type(next_unread) == "table" and next_unread[1] and next_unread[1][1] or nil
  end
  if from then b.oldest = (id_parts(from)) / 1000 end
  return b
end

-- Trims the stream of what is done: entries delivered and acknowledged (before the
-- group's last delivered id and the oldest pending one). Entries stay in a stream after
-- XACK; a worker calls this now and then. -> entries removed | nil, err
function Queue:trim()
  local last, pending, oldest = group_position(self)
  if not last then return nil, pending end
  local minid = last
  if pending > 0 and oldest and id_less(oldest, minid) then minid = oldest end
  return self.conn:call("XTRIM", self.stream, "MINID", minid)
end

-- Removes the group's consumers named prefix.. that hold nothing and were idle for
-- min_idle_ms or more (those of nginx workers gone: a new name at every start). One that
-- holds entries is never removed (XGROUP DELCONSUMER would drop them). -> n | nil, err
function Queue:forget_consumers(prefix, min_idle_ms)
  local list, err = self.conn:call("XINFO", "CONSUMERS", self.stream, self.group)
  if not list then return nil, err end
  local n = 0
  for _, c in ipairs(list) do
    local f = {}
    for i = 1, #c - 1, 2 do f[c[i]] = c[i + 1] end
    if type(f.name) == "string" and f.name:sub(1, #prefix) == prefix and tonumber(f.pending) == 0
       and (tonumber(f.idle) or 0) >= min_idle_ms then
      local ok, derr = self.conn:call("XGROUP", "DELCONSUMER", self.stream, self.group, f.name)
      if ok == nil then return nil, derr end
      n = n + 1
    end
  end
  return n
end

-- The queue at a glance: { length (entries in the stream, done ones until trimmed), group,
-- pending (delivered, not acknowledged), lag (not delivered yet), entries_read, dead,
-- oldest (time of the oldest entry not done, s), consumers = { { name, pending, idle (s) } },
-- workers = Queue:workers }. No group yet: pending 0, lag the length.
function Queue:status(now)
  local res, err = self.conn:pipeline{ { "XLEN", self.stream }, { "XLEN", self.dead_stream },
                                       { "XINFO", "GROUPS", self.stream },
                                       { "XINFO", "CONSUMERS", self.stream, self.group } }
  if not res then return nil, err end
  local st = { length = tonumber(res[1]) or 0, dead = tonumber(res[2]) or 0, group = self.group,
               pending = 0, lag = nil, consumers = {} }
  if not redis.is_error(res[3]) then
    for _, g in ipairs(res[3]) do
      local f = {}
      for i = 1, #g - 1, 2 do f[g[i]] = g[i + 1] end
      if f.name == self.group then
        st.pending = tonumber(f.pending) or 0
        st.lag = tonumber(f.lag)   -- nil when Redis cannot tell (after deletions)
        st.entries_read = tonumber(f["entries-read"])
      end
    end
  else
    st.lag = st.length   -- no stream or no group yet: everything is still to read
  end
  if not redis.is_error(res[4]) then
    for _, c in ipairs(res[4]) do
      local f = {}
      for i = 1, #c - 1, 2 do f[c[i]] = c[i + 1] end
      st.consumers[#st.consumers + 1] = { name = f.name, pending = tonumber(f.pending) or 0,
                                          idle = (tonumber(f.idle) or 0) / 1000 }
    end
  end
  -- the oldest entry not yet done: the oldest pending one, else the first unread one
  local last, pending, oldest = group_position(self)
  if last then
    local from = pending > 0 and oldest or nil
    if not from then
      local ms, seq = id_parts(last)
      local next_unread = self.conn:call("XRANGE", self.stream, "(" .. ms .. "-" .. seq, "+", "COUNT", 1)
      from = type(next_unread) == "table" and next_unread[1] and next_unread[1][1] or nil
    end
    if from then st.oldest = (id_parts(from)) / 1000 end
  end
  local workers, werr = self:workers(now)
  if not workers then return nil, werr end
  st.workers = workers
  return st
end

return M
