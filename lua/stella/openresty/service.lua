-- stella.openresty.service: events accepted into a bounded queue, drained by a fixed pool
-- of consumers per worker through a stella.trigger, spooled to a file when nginx stops.
-- The machinery of examples/openresty/webhook.lua, usable by any handler:
--
--   local service = require "stella.openresty.service"
--   local svc = service.new{
--     queue = require("stella.openresty.queue").new("stella_queue", { capacity = 10000 }),
--     store_dict = "stella",           -- the store's lua_shared_dict (marks, outbox, ledger)
--     store = function() return store end,       -- built on first use, per worker
--     trigger = function() return trigger end,   -- idem
--     consumers = 8, batch = 1, poll = 0.5,      -- per worker
--     reserve = 1048576,               -- bytes the store's dict keeps free: below, refuse
--     spool = "/var/lib/stella/spool.jsonl",     -- nil: a stop loses the queue (logged)
--     shared_store = false,            -- true: the store outlives nginx and other nodes use
--                                      -- it (Redis): a stop spools the queue, not the outbox
--     retry_after = 30, flush_every = 60, check_every = 5, warn_at = 0.8,
--     on_outcome = function(outcome) end,
--   }
--   init_worker_by_lua:  svc:init_worker()
--   exit_worker_by_lua:  svc:exit_worker()
--   content_by_lua:      local status, body, headers = svc:accept({ json, ... })
--                        local body = svc:health()
--
-- accept() answers 202 only for events it has put in the queue. It answers 503 with
-- Retry-After when the queue is at its capacity, when its dict has no memory left, or when
-- the store's dict has less than `reserve` bytes free (whole free pages, as
-- ngx.shared.DICT:free_space() counts them): the events already queued need room there for
-- their marks and outbox items, and a helpdesk retries a 503 later.
--
-- The queue is any object with push(payloads, now) -> true | nil, err; pop([n]); restore(entries);
-- depth(); oldest_age(now); and optionally memory() -> { capacity, free } (see
-- stella.openresty.queue). A Redis-backed queue plugs in there; with a queue that outlives
-- nginx, leave `spool` out and exit_worker spools only the outbox.
--
-- A durable queue (queue.durable: stella.openresty.redis_queue, the work queue's Redis
-- Stream) keeps what is queued when nginx stops, and handles its entries itself
-- (queue:consume(entries, service): acknowledged once settled; what a consumer held when
-- its worker died is taken over after a lease): exit_worker spools nothing of it, and it
-- needs shared_store (the outbox must outlive nginx as the queue does) and no spool.
-- consumers = 0 starts no consumer: other processes (`stella worker`) read that queue.
--
-- A trigger with a gate (the fleet's rate limit, stella.rate_limit) may hand requests back
-- to the outbox, due at their slot: the worker whose send call did replays the outbox when
-- the first is due, rather than at the next flush_every.
local cjson = require "cjson.safe"
local consumers_mod = require "stella.openresty.consumers"
local spool_mod = require "stella.openresty.spool"

local ngx = rawget(_G, "ngx")
local error, ipairs, pairs, next, pcall, tonumber, tostring, type, setmetatable, floor, concat =
      error, ipairs, pairs, next, pcall, tonumber, tostring, type, setmetatable, math.floor, table.concat

local M = {}

local Service = {}
Service.__index = Service

local FAR = 10 * 365 * 86400   -- claim every queued outbox item, due or not
local REQUEUE_PAUSE = 1        -- seconds before a consumer takes events its store refused
local MAX_IDS_LOGGED = 200     -- event ids named in one log line
local REPLAY_MIN = 0.2         -- seconds: the soonest replay of requests the rate limit held back

local function positive(v, name, default)
  if v == nil then return default end
  if type(v) ~= "number" or not (v > 0) then
    error("stella.openresty.service: " .. name .. " must be a positive number", 3)
  end
  return v
end

function M.new(opts)
  if type(opts) ~= "table" then error("stella.openresty.service: options table expected", 2) end
  local q = opts.queue
  if type(q) ~= "table" or type(q.push) ~= "function" or type(q.pop) ~= "function" then
    error("stella.openresty.service: queue must have push() and pop()", 2)
  end
  if type(opts.store) ~= "function" or type(opts.trigger) ~= "function" then
    error("stella.openresty.service: store and trigger must be functions returning them", 2)
  end
  local store_dict = opts.store_dict
  if type(store_dict) == "string" then
    store_dict = ngx.shared[store_dict] or error("stella.openresty.service: no lua_shared_dict \""
      .. opts.store_dict .. "\"", 2)
  end
  if opts.spool ~= nil and type(opts.spool) ~= "string" then
    error("stella.openresty.service: spool must be a file name or nil", 2)
  end
  local reserve = opts.reserve
  if reserve == nil then
    reserve = store_dict and floor(store_dict:capacity() / 20) or 0   -- 5%
  elseif type(reserve) ~= "number" or reserve < 0 then
    error("stella.openresty.service: reserve must be a number of bytes >= 0", 2)
  end
  local warn_at = positive(opts.warn_at, "warn_at", 0.8)
  if q.durable and not opts.shared_store then
    error("stella.openresty.service: a durable queue needs shared_store = true (a store that outlives nginx)", 2)
  end
  if q.durable and opts.spool then
    error("stella.openresty.service: a durable queue keeps what is queued itself: leave spool out", 2)
  end
  return setmetatable({
    queue = q, store_dict = store_dict, get_store = opts.store, get_trigger = opts.trigger,
    consumers = opts.consumers, batch = opts.batch, poll = opts.poll,
    reserve = reserve, spool_path = opts.spool,
    spool = opts.spool and spool_mod.new{ path = opts.spool, dict = opts.lock_dict or q.dict or store_dict },
    retry_after = floor(positive(opts.retry_after, "retry_after", 30)),
    flush_every = positive(opts.flush_every, "flush_every", 60),
    check_every = positive(opts.check_every, "check_every", 5),
    warn_at = warn_at < 1 and warn_at or 0.8,
    on_outcome = opts.on_outcome, shared_store = opts.shared_store and true or false,
    pool = nil, refused = 0, last_refusal_log = 0,
    replay_at = nil,     -- when this worker's replay of rate-limited requests is due (replay_held)
    replay_last = nil,   -- the latest due time of those requests
  }, Service)
end

---------------------------------------------------------------------------------------
-- Accepting
---------------------------------------------------------------------------------------

local function refuse(self, k, why)
  self.refused = self.refused + k
  local now = ngx.now()
  if now - self.last_refusal_log >= 1 then   -- one line a second per worker under a burst
    ngx.log(ngx.WARN, "stella: answering 503 (", why, "); ", self.refused,
      " event(s) refused by this worker so far")
    self.last_refusal_log = now
  end
  return 503, { error = "busy: " .. why .. "; try again later", retry_after = self.retry_after },
    { ["Retry-After"] = tostring(self.retry_after) }
end

-- accept(payload or { payloads }) -> status, body (a table to encode), headers (or nil).
-- payloads: the events' JSON texts, checked by the caller as far as it wants to answer
-- 400 for (a consumer ledgers one that does not decode to an object as invalid,
-- malformed_input).
function Service:accept(payloads)
  local k = type(payloads) == "string" and 1 or #payloads
  local sd = self.store_dict
  if sd and self.reserve > 0 and sd:free_space() < self.reserve then
    return refuse(self, k, "the store's shared dict is nearly full")
  end
  local ok, err = self.queue:push(payloads, ngx.now())
  if not ok then return refuse(self, k, tostring(err)) end
  if self.pool then self.pool:wake(k) end
  return 202, { accepted = k }
end

---------------------------------------------------------------------------------------
-- Consuming
---------------------------------------------------------------------------------------

local function event_id_of(event)
  local id = type(event) == "table" and (event.event_id or event.id)
  return id ~= nil and tostring(id) or nil
end

-- Entries' ids for a log line, at most MAX_IDS_LOGGED of them.
local function listing(ids)
  if #ids <= MAX_IDS_LOGGED then return concat(ids, ",") end
  local first = {}
  for i = 1, MAX_IDS_LOGGED do first[i] = ids[i] end
  return concat(first, ",") .. ",... (" .. #ids .. " in all)"
end

-- The consumers' work: decide and send a batch; events the store could not take (its dict
-- full) go back to the queue, never dropped.
function Service:handle(entries)
  local events, kept, malformed = {}, {}, {}
  for _, e in ipairs(entries) do
    local ev, derr = cjson.decode(e.payload)
    if type(ev) == "table" and ev[1] == nil and next(ev) ~= nil then
      events[#events + 1] = ev
      kept[#kept + 1] = e
    else
      -- accepted unread (the accept path checks only the braces): invalid, in the ledger
      malformed[#malformed + 1] = { time = ngx.time(), status = "invalid", reason = "malformed_input",
        detail = "not a JSON object with fields (" .. (derr or "decoded to " .. type(ev)) .. "): "
          .. e.payload:sub(1, 200) }
    end
  end
  if #malformed > 0 then
    local ok, res, err = pcall(self.get_store().record_many, self.get_store(), malformed)
    if not ok or not res then
      ngx.log(ngx.ERR, "stella: cannot ledger ", #malformed, " malformed event(s): ", tostring(ok and err or res))
    end
    for _, m in ipairs(malformed) do
      if self.on_outcome then self.on_outcome(m) else ngx.log(ngx.WARN, "stella: ", m.detail) end
    end
  end
  if #events == 0 then return end
  local outcomes = self.get_trigger():process_many(events)
  local again, again_ids = {}, {}
  for i, o in ipairs(outcomes) do
    if o.status == "failed" and o.reason == "store_error" then
      again[#again + 1] = kept[i]
      again_ids[#again_ids + 1] = o.event_id or tostring(kept[i].id)
    elseif self.on_outcome then
      self.on_outcome(o)
    end
  end
  if #again > 0 then
    ngx.log(ngx.WARN, "stella: the store refused event(s) ", listing(again_ids), " (",
      tostring(outcomes[1] and outcomes[1].detail), "); queued again")
    ngx.sleep(REQUEUE_PAUSE)
    local n, err = self.queue:restore(again)
    if n < #again then
      local lost = {}
      for i = n + 1, #again do lost[#lost + 1] = again_ids[i] end
      ngx.log(ngx.ERR, "stella: LOST event(s) ", listing(lost), ": neither the store nor the queue could keep them: ",
        tostring(err))
    end
  end
end

---------------------------------------------------------------------------------------
-- Health
---------------------------------------------------------------------------------------

local function dict_use(d)
  if not d then return nil end
  local cap, free = d:capacity(), d:free_space()
  return { capacity = cap, free = free, used = cap - free }
end

function Service:health()
  local q, now = self.queue, ngx.now()
  local depth, derr = q:depth()
  local h = {
    queue = {
      depth = depth,
      capacity = q.capacity,
      oldest_age = q:oldest_age(now),
      dict = q.memory and q:memory() or nil,
    },
    store = { dict = dict_use(self.store_dict), reserve = self.reserve },
    worker = {
      id = ngx.worker.id(), consumers = self.pool and self.pool.size or 0,
      busy = self.pool and self.pool:busy() or 0, refused = self.refused,
    },
    spool = self.spool_path,
  }
  local okc, counts = pcall(function() return self.get_store():outbox_counts() end)
  h.outbox = okc and counts or { error = tostring(counts) }
  local warnings = {}
  if not depth then warnings[#warnings + 1] = "the queue cannot be read: " .. tostring(derr) end
  if q.capacity and depth and depth >= self.warn_at * q.capacity then
    warnings[#warnings + 1] = ("the queue holds %d of %d events"):format(depth, q.capacity)
  end
  local qd = h.queue.dict
  if qd and qd.free < (1 - self.warn_at) * qd.capacity then
    warnings[#warnings + 1] = ("the queue's dict has %d of %d bytes free"):format(qd.free, qd.capacity)
  end
  local sd = h.store.dict
  if sd and sd.free < self.reserve + (1 - self.warn_at) * (sd.capacity - self.reserve) then
    warnings[#warnings + 1] = ("the store's dict has %d of %d bytes free (events are refused below %d)")
      :format(sd.free, sd.capacity, self.reserve)
  end
  h.warnings = warnings
  h.status = #warnings > 0 and "warn" or "ok"
  return h
end

---------------------------------------------------------------------------------------
-- Worker life: consumers, the outbox timer, the spool
---------------------------------------------------------------------------------------

local replay_held

local function flush(self)
  local ok, summary = pcall(function() return self.get_trigger():flush() end)
  if not ok then
    ngx.log(ngx.ERR, "stella: outbox flush failed: ", tostring(summary))
  elseif summary and (summary.sent + summary.recorded + summary.queued + summary.failed) > 0 then
    ngx.log(ngx.NOTICE, "stella: outbox: ", summary.sent, " sent, ", summary.recorded, " recorded, ",
      summary.queued, " still queued, ", summary.failed, " failed")
  end
  replay_held(self)
end

-- After a send call of this coroutine that the fleet's rate limit held back (the
-- trigger's gate, stella.rate_limit: no slot soon, the round's budget spent, the key
-- paused after a 429): those requests wait in the outbox, due within seconds; the outbox
-- is replayed when the first is due, not at the next flush_every. One timer per worker,
-- for the earliest due time; when it has run, another for the latest one not yet due
-- (replay_last); a replay held back again schedules its own.
local function schedule_replay(self, at)
  local now = ngx.now()
  if at < now + REPLAY_MIN then at = now + REPLAY_MIN end
  if self.replay_at and self.replay_at <= at then return end
  self.replay_at = at
  local okt, err = ngx.timer.at(at - now, function(premature)
    if self.replay_at == at then self.replay_at = nil end
    if premature then return end
    flush(self)
    local last = self.replay_last
    if last and last > ngx.now() then schedule_replay(self, last) else self.replay_last = nil end
  end)
  if not okt then
    self.replay_at = nil
    ngx.log(ngx.ERR, "stella: cannot schedule the outbox replay of rate-limited requests: ", tostring(err))
  end
end

replay_held = function(self)
  local ok, trigger = pcall(self.get_trigger)
  local gate = ok and type(trigger) == "table" and trigger.gate
  if not gate then return end
  local held, due = gate:held_back_here()
  if not held then return end
  local at = (due or ngx.now() + 1) + 0.05   -- due: the trigger's clock (ngx.time, whole seconds)
  if not (self.replay_last and self.replay_last >= at) then self.replay_last = at end
  schedule_replay(self, at)
end

-- What earlier workers spooled, back into the queue and the outbox. -> true when the
-- outbox got items (so that a flush is due).
local function restore(self)
  local records, err = self.spool:take()
  if not records then
    ngx.log(ngx.ERR, "stella: cannot read the spool ", self.spool_path, ": ", tostring(err))
    return false
  end
  if #records == 0 then return false end
  local entries, items, rest = {}, {}, {}
  for _, rec in ipairs(records) do
    if type(rec.q) == "table" and type(rec.q.payload) == "string" then
      entries[#entries + 1] = { at = tonumber(rec.q.at) or ngx.now(), payload = rec.q.payload }
    elseif type(rec.o) == "table" then
      items[#items + 1] = rec.o
    else
      ngx.log(ngx.ERR, "stella: spool line not understood, kept aside: ", tostring(rec.bad))
      rest[#rest + 1] = rec
    end
  end
  local n, qerr = self.queue:restore(entries)
  for i = n + 1, #entries do rest[#rest + 1] = { q = entries[i] } end
  local store, m = self.get_store(), 0
  for _, it in ipairs(items) do
    local ok, id = pcall(store.enqueue, store, it)
    if ok and id then m = m + 1 else rest[#rest + 1] = { o = it } end
  end
  if #rest > 0 then
    local w, werr = self.spool:append(rest)
    if not w then
      ngx.log(ngx.ERR, "stella: ", #rest, " spooled record(s) could not be restored nor kept: ", tostring(werr))
    else
      ngx.log(ngx.WARN, "stella: ", #rest, " spooled record(s) did not fit (", tostring(qerr),
        "); kept in the spool for the next try")
    end
  end
  self.spool:done()
  ngx.log(ngx.NOTICE, "stella: restored ", n, " queued event(s) and ", m, " outbox item(s) from ", self.spool_path)
  if self.pool then self.pool:wake(n) end
  return m > 0
end

local function housekeeping(premature, self, first)
  if premature then return end
  if self.spool then
    local ok, had_items = pcall(restore, self)
    if not ok then ngx.log(ngx.ERR, "stella: restoring the spool failed: ", tostring(had_items)) end
    if ok and had_items then flush(self) end
  end
  if first then return end
  local sd = self.store_dict
  if sd and sd:free_space() < 2 * self.reserve + 65536 then
    -- expired marks hold their memory until the dict frees them: free it before refusing
    local okp, perr = pcall(function() return self.get_store():purge_marks(ngx.time()) end)
    if not okp then ngx.log(ngx.ERR, "stella: purging expired marks failed: ", tostring(perr)) end
  end
  local okh, h = pcall(self.health, self)
  if okh and h.status ~= "ok" then
    ngx.log(ngx.WARN, "stella: ", concat(h.warnings, "; "), " (queue depth ", h.queue.depth,
      ", oldest ", h.queue.oldest_age and ("%.1f s"):format(h.queue.oldest_age) or "?", ")")
  end
end

function Service:init_worker()
  if self.spool then
    local ok, err = self.spool:join()
    if not ok then ngx.log(ngx.ERR, "stella: cannot register this worker for the spool: ", tostring(err)) end
  end
  local q = self.queue
  local handle, on_error
  if q.durable then
    -- entries a consumer could not handle stay pending in the queue: taken again after its lease
    handle = function(entries)
      q:consume(entries, self)
      replay_held(self)
    end
  else
    handle = function(entries)
      self:handle(entries)
      replay_held(self)
    end
    on_error = function(entries)
      -- a bug in the rules or the store: keep the events rather than lose them
      ngx.sleep(REQUEUE_PAUSE)
      q:restore(entries)
    end
  end
  if not (q.durable and self.consumers == 0) then
    local pool, err = consumers_mod.start{
      queue = q, size = self.consumers, batch = self.batch, poll = self.poll, handle = handle, on_error = on_error,
    }
    if not pool then ngx.log(ngx.ERR, "stella: ", err) end
    self.pool = pool
  end
  if ngx.worker.id() == 0 then
    ngx.timer.at(0, housekeeping, self, true)
    local ok, terr = ngx.timer.every(self.check_every, housekeeping, self, false)
    if not ok then ngx.log(ngx.ERR, "stella: cannot start the health timer: ", terr) end
    ok, terr = ngx.timer.every(self.flush_every, function(premature)
      if not premature then flush(self) end
    end)
    if not ok then ngx.log(ngx.ERR, "stella: cannot start the outbox timer: ", terr) end
  end
end

-- exit_worker_by_lua (no cosockets, no sleeping here). A reload leaves the queue and the
-- outbox in shared memory for the new workers; a stop spools them.
function Service:exit_worker()
  local flight = self.pool and self.pool:in_flight() or {}
  if self.queue.durable then
    -- no cosockets here: nothing is asked of the queue; it keeps what is queued
    local held = 0
    for _ in pairs(flight) do held = held + 1 end
    if held > 0 then
      ngx.log(ngx.WARN, "stella: worker ", ngx.worker.pid(), " stops holding ", held, " queue entry(ies) not ",
        "acknowledged: pending in the queue, another consumer takes them over after the lease")
    else
      ngx.log(ngx.NOTICE, "stella: worker ", ngx.worker.pid(), " stops; what is queued stays in ", tostring(self.queue))
    end
    return
  end
  local held = {}
  for _, e in pairs(flight) do held[#held + 1] = e end
  local fate = self.spool and self.spool:leave() or { reload = false, last = true }
  if fate.reload and #held == 0 then
    ngx.log(ngx.NOTICE, "stella: worker ", ngx.worker.pid(), " leaves for a reload; ", self.queue:depth(),
      " queued event(s) stay for the new workers")
    return
  end
  local records, ids = {}, {}
  -- events a consumer held when nginx stopped at once (SIGTERM): spooled unless the
  -- outbox has them (decided, and maybe on the wire: at least once, as after a crash)
  if #held > 0 then
    local in_outbox = {}
    local ok, items = pcall(function() return self.get_store():outbox("queued") end)
    for _, it in ipairs(ok and items or {}) do
      if it.event_id then in_outbox[it.event_id] = true end
    end
    for _, e in ipairs(held) do
      local id = event_id_of(cjson.decode(e.payload))
      if not (id and in_outbox[id]) then
        records[#records + 1] = { q = { at = e.at, payload = e.payload } }
        ids[#ids + 1] = id or ("entry " .. tostring(e.id))
      end
    end
  end
  if not fate.reload then
    -- stopping: every queued entry (each worker takes what it pops; none is taken twice)
    local q = self.queue
    if self.spool then
      for _ = 1, q:depth() + 1000 do
        local got = q:pop()
        if not got then break end
        for _, e in ipairs(got) do
          records[#records + 1] = { q = { at = e.at, payload = e.payload } }
          ids[#ids + 1] = event_id_of(cjson.decode(e.payload)) or ("entry " .. tostring(e.id))
        end
      end
    end
  end
  local nout, out_ids = 0, {}
  if not fate.reload and fate.last and self.spool and not self.shared_store then
    -- the last worker of a stopping nginx: the outbox goes too
    local ok, err = pcall(function()
      local store = self.get_store()
      local originals = {}
      for _, it in ipairs(store:outbox("queued")) do originals[it.id] = it end
      local now = ngx.now()
      for _, c in ipairs(store:claim(now + FAR, 60, 1000000)) do
        local it = originals[c.id] or c
        records[#records + 1] = { o = {
          kind = it.kind, body = it.body, brand = it.brand, event_id = it.event_id,
          interaction_id = it.interaction_id, customer_hash = it.customer_hash,
          created_at = it.created_at, next_at = it.next_at, attempts = it.attempts,
        } }
        out_ids[#out_ids + 1] = it.event_id or ("item " .. tostring(c.id))
        nout = nout + 1
        store:finish(c.id)
      end
    end)
    if not ok then ngx.log(ngx.ERR, "stella: cannot read the outbox to spool it: ", tostring(err)) end
  end
  if #records == 0 then
    if not self.spool and self.queue:depth() > 0 and not fate.reload then
      ngx.log(ngx.ERR, "stella: stopping without a spool: ", self.queue:depth(), " queued event(s) are LOST")
    end
    return
  end
  local n, err = self.spool and self.spool:append(records)
  if not n then
    ngx.log(ngx.ERR, "stella: stopping: ", #ids, " event(s) and ", nout, " outbox item(s) are LOST (",
      tostring(err or "no spool configured"), "): events ", listing(ids), "; outbox ", listing(out_ids))
    return
  end
  ngx.log(ngx.NOTICE, "stella: stopping: spooled ", #ids, " event(s) and ", nout, " outbox item(s) to ",
    self.spool_path, ": events ", listing(ids), (nout > 0 and ("; outbox " .. listing(out_ids)) or ""))
end

return M
