-- stella.trigger: event -> rules -> request -> send, with the store keeping
-- suppression and dedupe marks, the ledger, unsubscribes and the outbox.
--
-- Crash safety: a request to send is first written to the outbox, together
-- with its suppression/dedupe marks, in one transaction (the marks are
-- "reserved" by the outbox item). Only then is it sent. Success confirms the
-- marks and removes the item; a permanent failure releases the marks; a
-- retryable one leaves the item queued for flush(). A process killed at any
-- point leaves each event sent, still queued (leased, then retried), or dead.
local stella = require "stella"
local rules_mod = require "stella.rules"
local store_mod = require "stella.store"
local store_rows = require "stella.store.rows"
local client_mod = require "stella.client"
local errors_mod = require "stella.error"

local type, pairs, ipairs, tostring, tonumber, error, setmetatable, pcall, select =
      type, pairs, ipairs, tostring, tonumber, error, setmetatable, pcall, select
local floor, random, min = math.floor, math.random, math.min

local M = {}

local Trigger = {}
Trigger.__index = Trigger

local DEFAULT_OUTBOX = { lease = 300, max_attempts = 10, max_age = 86400, base_delay = 60,
                         max_delay = 3600, batch = 100 }
local DEFAULT_ALERT = { threshold = 0.05, min_sends = 20, window = 3600, check_every = 10 }
local CLIENT_KEYS = { "api_key", "keys", "mode", "base_url" }

local function merged(defaults, given)
  local t = {}
  for k, v in pairs(defaults) do t[k] = v end
  for k, v in pairs(given or {}) do t[k] = v end
  return t
end

local function is_client(v)
  return type(v) == "table" and type(v.post) == "function"
end

local function connections_of(n)
  if n == nil then return 1 end
  if type(n) ~= "number" or n < 1 or n > 64 or n % 1 ~= 0 then
    error("stella.trigger: connections must be a whole number from 1 to 64", 3)
  end
  return n
end

-- stella.trigger{ rules = FILE|TABLE, client = CLIENT|options, store = STORE,
--                 clock = fn, dry_run = bool, allow = {...}, outbox = {...}, alert = {...},
--                 connections = n (a pipeline's sends per brand at once; default 1) }
function M.new(opts)
  if type(opts) ~= "table" then error("stella.trigger: options table expected", 2) end
  if opts.rules == nil then error("stella.trigger: rules (a file name or a table) is required", 2) end
  local compiled, err = rules_mod.load(opts.rules, { allow = opts.allow })
  if not compiled then error("stella.trigger: " .. tostring(err), 2) end
  local spec = compiled.source
  local self = setmetatable({
    rules = compiled,
    store = opts.store or store_mod.memory(),
    clock = opts.clock or os.time,
    dry_run = opts.dry_run and true or false,
    dry_marks = {},          -- a dry run's marks (key -> until): see new_batch
    outbox_opts = merged(merged(DEFAULT_OUTBOX, spec.outbox), opts.outbox),
    alert_opts = merged(merged(DEFAULT_ALERT, spec.alert), opts.alert),
    on_alert = opts.on_alert or compiled.on_alert,
    clients = {},            -- brand name ("" for none) -> client
    lanes = {},              -- client -> the clients its background sends spread over
    connections = connections_of(opts.connections),
    owned = {},              -- clients this trigger created (and closes)
    counts = {}, reasons = {},
    last_alert_check = nil,
    random = opts.random or random,
  }, Trigger)
  if is_client(opts.client) then
    self.default_client = opts.client
  else
    if opts.client ~= nil and type(opts.client) ~= "table" then
      error("stella.trigger: client must be a client or a table of client options", 2)
    end
    local co = merged({}, opts.client)
    for _, k in ipairs(CLIENT_KEYS) do   -- the rules file may carry keys and host
      if co[k] == nil and not (k == "api_key" and co.keys) and not (k == "keys" and co.api_key) then
        co[k] = spec[k]
      end
    end
    self.client_options = co
  end
  return self
end

-- The clients a brand's background sends spread over: its client and connections - 1
-- clones of it (each its own connection). A client that cannot be cloned sends alone.
function Trigger:lanes_for(brand_name)
  local c = self:client_for(brand_name)
  local lanes = self.lanes[c]
  if lanes then return lanes end
  lanes = { c }
  if type(c.clone) == "function" then
    for j = 2, self.connections do
      lanes[j] = c:clone()
      self.owned[#self.owned + 1] = lanes[j]
    end
  end
  self.lanes[c] = lanes
  return lanes
end

-- The client for a brand: the brand's own keys if it has them, else the default.
function Trigger:client_for(brand_name)
  local key = brand_name or ""
  local c = self.clients[key]
  if c then return c end
  local brands = self.rules.brands
  local b = brands and brand_name and brands[brand_name]
  if b and (b.api_key or b.keys) then
    -- given a client object: the brand's client still goes to that client's host
    local co = merged(self.client_options or { base_url = self.default_client.base_url }, {})
    co.api_key, co.keys = b.api_key, b.keys
    if b.mode then co.mode = b.mode end
    c = client_mod.new(co)
    self.owned[#self.owned + 1] = c
  elseif self.default_client then
    c = self.default_client
  elseif key ~= "" then
    c = self:client_for(nil)   -- brands without keys of their own share the default client
  else
    c = client_mod.new(self.client_options)
    self.owned[#self.owned + 1] = c
  end
  self.clients[key] = c
  return c
end

-- A batch: what one process_many (or flush) call shares across its events.
--   hash(email)  the store's salted hash, computed once per address in the batch
--   marks        key -> until of the marks this batch puts, seen by its later events
--                before they reach the store (a dry-run trigger keeps one such table for
--                its whole life instead, so that it suppresses as a real run would)
--   pending      { outcome, item, marks } of each request to enqueue, in event order
local function new_batch(self)
  local store, memo = self.store, {}
  return {
    hash = function(email)
      local h = memo[email]
      if not h then
        h = store:hash_email(email)
        memo[email] = h
      end
      return h
    end,
    marks = self.dry_run and self.dry_marks or {},
    pending = {},    -- outcomes of the requests to enqueue, in event order
    phash = {},      -- their customers' hashes (false for none), by index in pending
    pmarks = {},     -- their marks, flat: key, until, index in pending
    npmarks = 0,     -- values in pmarks
    env = nil,   -- the rules' environment, made by env_for on first use
  }
end

-- Store keys for rule marks. E-mails become salted hashes here, never stored in clear.
local function mark_key(batch, mark)
  local key = mark._key   -- a mark looked up and then put is keyed once
  if key then return key end
  if mark.type == "suppress" then
    key = "suppress|" .. mark.scope .. "|" .. batch.hash(mark.email)
  else
    key = "once|" .. mark.scope .. "|" .. mark.id
  end
  mark._key = key
  return key
end

-- The rules' view of the store for the events of a batch (all decided at `now`).
local function env_for(self, now, batch)
  local env = batch.env
  if env and env.now == now then return env end
  local store, marks = self.store, batch.marks
  env = {
    now = now,
    lookup = function(mark)
      local key = mark_key(batch, mark)
      local until_ = marks[key]   -- put earlier in this batch: not in the store yet
      if until_ ~= nil then return until_ > now and until_ or nil end
      return (store:get_mark(key, now))
    end,
    unsubscribed = function(email)
      if batch.no_unsubscribes then return false end
      return store:is_unsubscribed(batch.hash(email))
    end,
  }
  batch.env = env
  return env
end

local function event_id_of(event, request)
  local id = type(event) == "table" and (event.event_id or event.id)
  if id == nil and type(request) == "table" then id = request.ext_interaction_id end
  -- no request (map raised): a request-shaped event still names its interaction
  if id == nil and type(event) == "table" then id = event.ext_interaction_id end
  if id == nil then return nil end
  return tostring(id)
end

local function count(self, outcome)
  self.counts[outcome.status] = (self.counts[outcome.status] or 0) + 1
  local key = outcome.status .. "/" .. tostring(outcome.reason or "")
  self.reasons[key] = (self.reasons[key] or 0) + 1
end

-- The ledger entry of an outcome (stella.store.rows.entry).
local function ledger_entry(batch, outcome, now)
  local req = outcome.request
  local channel, hash = nil, outcome.customer_hash
  if type(req) == "table" then
    if type(req.channel) == "string" then channel = req.channel end
    local c = req.customer
    if type(c) == "table" and type(c.email) == "string" then hash = batch.hash(c.email) end
  end
  local err = outcome.error
  local error_kind, error_message
  if err then error_kind, error_message = err.kind, tostring(err) end
  return {
    time = now, status = outcome.status, reason = outcome.reason, event_id = outcome.event_id,
    interaction_id = outcome.interaction_id, brand = outcome.brand, channel = channel,
    detail = outcome.detail, request_id = outcome.request_id, error_kind = error_kind,
    error_message = error_message, customer_hash = hash, attempts = outcome.attempts,
  }
end

local function interaction_of(request)
  local id = type(request) == "table" and request.ext_interaction_id
  if type(id) == "number" then   -- "%d" raises in 5.4 on 1.5, NaN, 2^63 (invalid anyway)
    if id == floor(id) and id > -2^53 and id < 2^53 then return ("%d"):format(id) end
    return tostring(id)
  end
  return type(id) == "string" and id or nil
end

local function sent_status(body)
  -- the body is our own canonical JSON: this byte sequence can only be the field
  return body:find('"do_not_send":true', 1, true) and "recorded" or "sent"
end

local function backoff(self, attempts)
  local o = self.outbox_opts
  local cap = min(o.max_delay, o.base_delay * 2 ^ (attempts - 1))
  return floor(cap / 2 + cap / 2 * self.random())   -- half fixed, half jitter
end

-- Decides one event. A request to send joins batch.pending (enqueue_pending writes them)
-- and its marks join batch.marks, where the batch's later events see them.
local function decide(self, event, now, explain, batch)
  local d = rules_mod.evaluate(self.rules, event, env_for(self, now, batch), explain)
  local outcome = {
    event_id = event_id_of(event, d.request), brand = d.brand, request = d.request,
    interaction_id = interaction_of(d.request), verdicts = d.verdicts,
    dry_run = self.dry_run or nil,
  }
  if d.action == "skip" then
    outcome.status, outcome.reason, outcome.detail = "skipped", d.reason, d.detail
    return outcome
  elseif d.action == "suppressed" then
    outcome.status, outcome.reason, outcome.detail = "suppressed", d.reason, d.detail
    outcome["until"] = d["until"]
    return outcome
  elseif d.action == "invalid" then
    outcome.status, outcome.reason, outcome.detail = "invalid", d.reason, d.detail
    return outcome
  end
  local body, errs = stella.encode(d.request, "request")
  if explain and d.verdicts then
    d.verdicts[#d.verdicts + 1] = { rule = "validate", verdict = body and "pass" or "invalid",
                                    reason = not body and "invalid_request" or nil,
                                    detail = errs and errors_mod.summarize(errs) or nil }
  end
  if not body then
    outcome.status, outcome.reason = "invalid", "invalid_request"
    outcome.detail = errors_mod.summarize(errs)
    outcome.errors = errs
    return outcome
  end
  outcome.body = body
  outcome.status = sent_status(body)
  outcome.reason = d.request.do_not_send == true and (d.do_not_send_reason or "do_not_send") or nil
  if explain then return outcome end
  local bmarks, dmarks = batch.marks, d.marks
  if self.dry_run then
    for i = 1, #dmarks do
      local mark = dmarks[i]
      bmarks[mark_key(batch, mark)] = mark["until"]
    end
    return outcome
  end
  local pending = batch.pending
  local np = #pending + 1
  local pm, k = batch.pmarks, batch.npmarks
  for i = 1, #dmarks do
    local mark = dmarks[i]
    local key, until_ = mark_key(batch, mark), mark["until"]
    bmarks[key] = until_
    pm[k + 1], pm[k + 2], pm[k + 3] = key, until_, np
    k = k + 3
  end
  batch.npmarks = k
  pending[np] = outcome
  local c = d.request.customer
  batch.phash[np] = type(c) == "table" and type(c.email) == "string" and batch.hash(c.email) or false
  return outcome
end

-- Writes the batch's pending requests to the outbox and their marks, reserved by them
-- (inside the decide transaction). true, or nil, err.
local function enqueue_pending(self, batch, now)
  local pending = batch.pending
  local n = #pending
  if n == 0 then return true end
  local store, hashes = self.store, batch.phash
  local next_at = now + self.outbox_opts.lease
  local items = {}
  for i = 1, n do
    local o = pending[i]
    items[i] = { kind = "request", body = o.body, brand = o.brand, event_id = o.event_id,
                 interaction_id = o.interaction_id, customer_hash = hashes[i] or nil,
                 created_at = now, next_at = next_at, attempts = 0 }
  end
  local ids, err = store:enqueue_many(items)
  if not ids then return nil, err end
  for i = 1, n do pending[i].outbox_id = ids[i] end
  local pm, count = batch.pmarks, batch.npmarks
  if count == 0 then return true end
  local marks = {}
  for j = 1, count, 3 do
    marks[#marks + 1] = { key = pm[j], ["until"] = pm[j + 1], outbox_id = ids[pm[j + 2]] }
  end
  return store:put_mark_many(marks)
end

-- The API path of an outbox item or of an outcome to send (outcomes are requests).
local function path_of(item)
  return item.kind == "recovery" and "/v1/recoveries" or "/v1/requests"
end

-- Sends one outbox item or outcome, with the client's retries (network only; the store is
-- not touched here).
local function send_item(self, item)
  return self:client_for(item.brand):post(path_of(item), item.body)
end

-- Settles one item after its send (the caller holds the transaction): the outcome
-- fields to merge. A sent item only joins `sent` (settle_sent confirms and finishes those
-- together); a failure is written here.
-- A request not sent because its batch ran past half of its outbox lease: sending
-- on could overlap a flush() in another process that may claim it once the lease
-- ends (a duplicate). It goes back to the outbox, due at once, attempts unchanged.
local DEFERRED = { kind = "deferred", retryable = true }
local DEFERRED_DETAIL = "not sent yet: the batch ran past half of its outbox lease; flush() sends it"

-- Sends the items of a batch in order, stopping (DEFERRED) once half the lease has
-- passed; at least the first item is always tried. results[i], errs[i] per item.
-- (from, tried, results, errs): go on from item `from` of a batch partly sent already.
local function send_batch(self, list, now, send, from, tried, results, errs)
  results, errs = results or {}, errs or {}
  local deadline = now + self.outbox_opts.lease / 2
  for i = from or 1, #list do
    if list[i] then
      if tried and self.clock() >= deadline then
        errs[i] = DEFERRED
      else
        results[i], errs[i] = send(list[i])
        tried = true
      end
    end
  end
  return results, errs
end

local function settle(self, item, res, err, now, attempts_before, sent)
  local store = self.store
  if err == DEFERRED then
    store:reschedule(item.id, now, attempts_before, item.last_error)
    return { status = "queued", reason = "deferred", detail = DEFERRED_DETAIL }
  end
  if res then
    sent[#sent + 1] = item.id
    return { status = sent_status(item.body), request_id = res.request_id, attempts = res.attempts }
  end
  local attempts = attempts_before + 1
  local o = self.outbox_opts
  if err.retryable and attempts < o.max_attempts and now - (item.created_at or now) < o.max_age then
    local next_at = now + backoff(self, attempts)
    store:reschedule(item.id, next_at, attempts, tostring(err))
    return { status = "queued", reason = err.kind, detail = tostring(err), error = err,
             next_at = next_at, attempts = err.attempts }
  end
  store:release_marks(item.id)
  if err.retryable then
    store:kill(item.id, tostring(err), now, attempts)  -- gave up: kept as dead, every try counted
  else
    store:finish(item.id)                               -- rejected: nothing to retry
  end
  return { status = "failed", reason = err.retryable and "dead" or err.kind, detail = tostring(err),
           error = err, attempts = err.attempts }
end

-- Confirms the marks of the sent items and removes them from the outbox, then writes the
-- ledger entries (the caller holds the transaction).
local function settle_sent(self, sent, entries)
  local store = self.store
  if #sent > 0 then
    store:confirm_marks_many(sent)
    store:finish_many(sent)
  end
  store:record_many(entries)
end

-- Counts the outcomes, checks the alert once, returns them.
local function conclude(self, outcomes, now)
  local check = false
  for _, o in ipairs(outcomes) do
    count(self, o)
    if store_rows.is_rate_error(o.status, o.reason) then check = true end
  end
  if check and not self.dry_run then self:check_alert(now) end
  return outcomes
end

-- Starts sending a batch's requests (list[i]: an outcome or outbox item to send, or false)
-- in order,
-- as send_batch does, on a background thread of the C core when every client uses the
-- libcurl transport: the caller goes on with its store work (the next batch's decisions,
-- the previous batch's settling) while they are on the wire. finish() waits and returns
-- results, errs like send_batch. The thread makes first attempts on the happy path only
-- and stops at the first failure or once half the lease has passed; what it did not
-- send, finish() sends as send_batch does (with the client's retries, or DEFERRED).
local function start_sends(self, list, now)
  local n = #list
  local deadline = now + self.outbox_opts.lease / 2
  local flat, index, clients, turn = {}, {}, {}, {}
  for i = 1, n do
    local o = list[i]
    if o then
      local k = #index + 1
      local lanes = self:lanes_for(o.brand)
      local t = (turn[lanes] or 0) % #lanes + 1   -- round robin over the brand's connections
      turn[lanes] = t
      local c = lanes[t]
      index[k], clients[k] = i, c
      flat[3 * k - 2], flat[3 * k - 1], flat[3 * k] = c, path_of(o), o.body
    end
  end
  local bg = #index > 0 and client_mod.send_many(flat, deadline - self.clock()) or nil

  return function()   -- finish
    local results, errs = {}, {}
    local rest, tried = list, false   -- what goes in line: the items the threads did not try
    if bg then
      rest = {}
      for i = 1, #list do rest[i] = list[i] end
      if bg:wait() > 0 then
        tried = true
        for k = 1, #index do
          local i = index[k]
          if select("#", bg:result(k)) > 0 then
            results[i], errs[i] = clients[k]:complete(path_of(list[i]), list[i].body, bg:result(k))
            rest[i] = false
          end
        end
      end
      bg:close()
    end
    return send_batch(self, rest, now, function(o) return send_item(self, o) end,
                      1, tried, results, errs)
  end
end

local DECIDE_TRIES = 3

-- Decides a batch of events at `now` in one transaction: rules, then the outbox items
-- and marks of the requests to send. Returns the outcomes, the batch, and whether it was
-- written (false: a dry run, or a store error and every outcome failed).
local function decide_batch(self, events, now)
  if self.dry_run then
    local outcomes, batch = {}, new_batch(self)
    for i = 1, #events do
      local o = decide(self, events[i], now, false, batch)
      o.body = nil
      outcomes[i] = o
    end
    return outcomes, batch, false
  end
  local store = self.store
  local outcomes, batch, ok, serr
  -- a retryable failure (another writer took a mark this batch looked at: the shared-dict
  -- store's cross-worker race) rolled everything back: decide again, now seeing what the
  -- other writer wrote (its customer is then suppressed here, not failed)
  for _ = 1, DECIDE_TRIES do
    outcomes, batch = {}, new_batch(self)
    -- a failure inside (returned or not) rolls the whole batch back: nil, err
    ok, serr = store:atomic(function()
      -- inside the transaction nothing else writes the store: with no unsubscribes at its
      -- start, none of this batch's events is unsubscribed (the rules cannot add one)
      if store:unsubscribed_count() == 0 then batch.no_unsubscribes = true end
      for i = 1, #events do outcomes[i] = decide(self, events[i], now, false, batch) end
      return enqueue_pending(self, batch, now)
    end)
    if ok or not (type(serr) == "table" and serr.retryable) then break end
  end
  if not ok then   -- rolled back: nothing was reserved or queued
    outcomes = {}
    for i = 1, #events do
      outcomes[i] = { status = "failed", reason = "store_error", detail = tostring(serr),
                      error = serr, event_id = event_id_of(events[i]) }
    end
    return outcomes, batch, false
  end
  return outcomes, batch, true
end

-- The outcomes' sends, in event order (false where an outcome sends nothing).
local function sends_of(outcomes)
  local list = {}
  for i = 1, #outcomes do list[i] = outcomes[i].outbox_id ~= nil and outcomes[i] or false end
  return list
end

-- Settles a decided batch after its sends, in one transaction: confirms or requeues each
-- item, writes the ledger.
local function settle_batch(self, outcomes, batch, now, results, errs)
  -- if this transaction fails, sent items stay leased in the outbox and a later
  -- flush() sends them again: at least once, never lost
  self.store:atomic(function()
    local n = #outcomes
    local sent, entries = {}, {}
    for i = 1, n do
      local o = outcomes[i]
      local id = o.outbox_id
      if id then
        local res = results[i]
        if res then   -- settle's success case, without its table
          sent[#sent + 1] = id
          o.status, o.request_id, o.attempts = sent_status(o.body), res.request_id, res.attempts
        else
          local item = { id = id, kind = "request", body = o.body, brand = o.brand, created_at = now }
          for key, v in pairs(settle(self, item, nil, errs[i], now, 0, sent)) do o[key] = v end
        end
      end
      o.body = nil
      entries[i] = ledger_entry(batch, o, now)
    end
    settle_sent(self, sent, entries)
  end)
end

-- A pipeline: batches of events in, their outcomes out, each batch's sends on the wire
-- (start_sends) while the next batch is decided and the previous one settled. Made by
-- trigger:pipeline.
local Pipeline = {}
Pipeline.__index = Pipeline

-- trigger:pipeline(on_outcomes) -> pipeline
--   pipeline:process(events [, tag])  decides the batch and starts its sends, then
--                                      completes the batch before it; on_outcomes(outcomes,
--                                      events, tag) is called for each batch, in order,
--                                      once it is complete
--   pipeline:finish()                  completes the last batch (always call it; a batch
--                                      left unfinished stays in the outbox for flush())
-- The same decisions, writes and sends as process_many on each batch: a batch's
-- requests, marks and outbox items are written before any of them is sent; the next
-- batch is decided while they are on the wire and sees their marks as a later event of
-- the same batch would.
function Trigger:pipeline(on_outcomes)
  if type(on_outcomes) ~= "function" then error("trigger:pipeline: function expected", 2) end
  return setmetatable({ trigger = self, sink = on_outcomes, prev = nil }, Pipeline)
end

-- Completes batch b: waits for the rest of its sends, then (after `between`, if given)
-- settles it and hands its outcomes on.
local function complete(p, b, between)
  local t = p.trigger
  local results, errs
  if b.finish then results, errs = b.finish() end
  if between then between() end
  if b.finish then settle_batch(t, b.outcomes, b.batch, b.now, results, errs) end
  p.sink(conclude(t, b.outcomes, b.now), b.events, b.tag)
end

function Pipeline:process(events, tag)
  if type(events) ~= "table" then error("pipeline:process: list of events expected", 2) end
  for i = 1, #events do
    if type(events[i]) ~= "table" then error("pipeline:process: event " .. i .. " is not a table", 2) end
  end
  local t = self.trigger
  local prev = self.prev
  self.prev = nil
  local now = t.clock()
  -- decided while the previous batch's requests are still on the wire
  local outcomes, batch, written = decide_batch(t, events, now)
  local b = { events = events, tag = tag, outcomes = outcomes, batch = batch, now = now }
  self.prev = b
  local function start()
    if written then b.finish = start_sends(t, sends_of(outcomes), now) end
  end
  -- a client sends one request at a time: the previous batch's sends end before this
  -- batch's start; the previous batch's settling then overlaps them
  if prev then complete(self, prev, start) else start() end
end

function Pipeline:finish()
  local b = self.prev
  self.prev = nil
  if b then complete(self, b) end
end

-- process_many(events) -> outcomes, in order. Two transactions for the whole
-- batch: decide + reserve (outbox items and their marks), then send every
-- request, then settle + ledger. A batch is how the command line feeds files.
-- A later event of the batch sees the marks of an earlier one as if each had been
-- processed on its own. A dry run writes nothing but remembers, for the trigger's
-- life, the marks its requests would have put, so it reports what a real run would.
function Trigger:process_many(events)
  if type(events) ~= "table" then error("trigger:process_many: list of events expected", 2) end
  for i = 1, #events do
    if type(events[i]) ~= "table" then error("trigger:process_many: event " .. i .. " is not a table", 2) end
  end
  local now = self.clock()
  local outcomes, batch, written = decide_batch(self, events, now, nil)
  if written then
    local results, errs = send_batch(self, sends_of(outcomes), now,
                                     function(o) return send_item(self, o) end)
    settle_batch(self, outcomes, batch, now, results, errs, nil)
  end
  return conclude(self, outcomes, now)
end

-- process(event) -> outcome { status, reason, detail, request_id, request, error, ... }
function Trigger:process(event)
  if type(event) ~= "table" then error("trigger:process: event table expected", 2) end
  return self:process_many({ event })[1]
end

-- explain(event): the decision with every rule's verdict; sends and writes nothing.
function Trigger:explain(event)
  if type(event) ~= "table" then error("trigger:explain: event table expected", 2) end
  local outcome = decide(self, event, self.clock(), true, new_batch(self))
  outcome.body = nil
  return outcome
end

-- flush(): replay what is due in the outbox. Returns counts by status.
function Trigger:flush()
  local summary = { sent = 0, recorded = 0, queued = 0, failed = 0, dead = 0 }
  if self.dry_run then return summary end
  local o = self.outbox_opts
  while true do
    local now = self.clock()
    local items, err = self.store:claim(now, o.lease, o.batch)
    if not items then return nil, err end
    if #items == 0 then break end
    -- first attempts on background threads (over `connections` per brand), then in line
    local results, errs = start_sends(self, items, now)()
    for i, item in ipairs(items) do item.res, item.err = results[i], errs[i] end
    local outcomes = {}
    local batch = new_batch(self)
    self.store:atomic(function()
      local sent, entries = {}, {}
      for i, item in ipairs(items) do
        local r = settle(self, item, item.res, item.err, now, item.attempts or 0, sent)
        r.event_id, r.brand, r.interaction_id = item.event_id, item.brand, item.interaction_id
        r.customer_hash = item.customer_hash   -- for the ledger: flush has no request table
        if r.status == "sent" or r.status == "recorded" then r.reason = "outbox" end
        if r.status == "failed" and r.reason == "dead" then summary.dead = summary.dead + 1 end
        summary[r.status] = summary[r.status] + 1
        entries[i] = ledger_entry(batch, r, now)
        outcomes[i] = r
      end
      settle_sent(self, sent, entries)
    end)
    conclude(self, outcomes, now)
    if #items < o.batch then break end
  end
  return summary
end

-- Calls on_alert when more than alert.threshold of the last hour's sends
-- failed (at least alert.min_sends of them), at most once per window, shared
-- across processes through the store's meta table.
function Trigger:check_alert(now)
  now = now or self.clock()
  local a = self.alert_opts
  if not self.on_alert then return nil end
  if self.last_alert_check and now - self.last_alert_check < a.check_every then return nil end
  self.last_alert_check = now
  local buckets = self.store:rate{ since = now - a.window, bucket = a.window }
  local total, errors = 0, 0
  for _, b in ipairs(buckets or {}) do total, errors = total + b.total, errors + b.errors end
  if total < a.min_sends or errors / total <= a.threshold then return nil end
  local last = tonumber(self.store:get_meta("last_alert") or "")
  if last and now - last < a.window then return nil end
  self.store:set_meta("last_alert", tostring(now))
  local info = { rate = errors / total, errors = errors, total = total, threshold = a.threshold,
                 window = a.window, time = now }
  pcall(self.on_alert, info)
  return info
end

-- Counters of this trigger: { counts = { sent = n, ... }, reasons = { ["skipped/duplicate"] = n } }
function Trigger:stats()
  local c, r = {}, {}
  for k, v in pairs(self.counts) do c[k] = v end
  for k, v in pairs(self.reasons) do r[k] = v end
  return { counts = c, reasons = r }
end

function Trigger:close()
  for _, c in ipairs(self.owned) do c:close() end
  self.owned, self.clients, self.lanes = {}, {}, {}
end

return M
