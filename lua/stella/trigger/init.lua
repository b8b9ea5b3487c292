-- stella.trigger: event -> rules -> request -> send, with the store keeping
-- suppression and dedupe marks, the ledger, unsubscribes and the outbox.
-- This file makes a trigger and wires its public methods to the stages, one file each:
--   decide.lua    rules, encoding, outbox items and marks written (one transaction)
--   send.lua      the requests sent, in line or on a background thread
--   settle.lua    sent, requeued or failed; marks confirmed or released; the ledger
--                 (one transaction)
--   rows.lua      a sent request's ledger status; an outcome's ledger entry
--   pipeline.lua  batches overlapped: one decided while another is sent
--   flush.lua     the outbox replayed
--   alert.lua     outcomes counted; the failure-rate alert
--   retention.lua the ledger and dead outbox items purged after a window (90 days)
--
-- Crash safety: a request to send is first written to the outbox, together
-- with its suppression/dedupe marks, in one transaction (the marks are
-- "reserved" by the outbox item). Only then is it sent. Success confirms the
-- marks and removes the item; a permanent failure releases the marks; a
-- retryable one leaves the item queued for flush(). A process killed at any
-- point leaves each event sent, still queued (leased, then retried), or dead.
local rules_mod = require "stella.rules"
local store_mod = require "stella.store"
local keys = require "stella.keys"
local decide = require "stella.trigger.decide"
local send = require "stella.trigger.send"
local settle = require "stella.trigger.settle"
local pipeline = require "stella.trigger.pipeline"
local flush = require "stella.trigger.flush"
local unsettled = require "stella.trigger.unsettled"
local alert = require "stella.trigger.alert"
local retention = require "stella.trigger.retention"
local zones = require "stella.zones"

local type, pairs, ipairs, tostring, error, setmetatable =
      type, pairs, ipairs, tostring, error, setmetatable
local random = math.random

local M = {}

local Trigger = {}
Trigger.__index = Trigger

local DEFAULT_OUTBOX = { lease = 300, max_attempts = 10, max_age = 86400, base_delay = 60,
                         max_delay = 3600, batch = 100 }

local function merged(defaults, given)
  local t = {}
  for k, v in pairs(defaults) do t[k] = v end
  for k, v in pairs(given or {}) do t[k] = v end
  return t
end

local function connections_of(n)
  if n == nil then return 1 end
  if type(n) ~= "number" or n < 1 or n > 64 or n % 1 ~= 0 then
    error("stella.trigger: connections must be a whole number from 1 to 64", 3)
  end
  return n
end

-- stella.trigger{ rules = FILE|TABLE|COMPILED, client = CLIENT|options, store = STORE,
--                 clock = fn, dry_run = bool, allow = {...}, outbox = {...}, alert = {...},
--                 connections = n (a pipeline's sends per brand at once; default 1),
--                 stop = fn (() -> true once nothing more may be sent: send.lua),
--                 gate = the fleet's rate limit (stella.rate_limit.gate; sends go through it),
--                 retention = { days = 90, every = 3600 } (retention.lua) }
-- rules: a rules file's name, a rules table, or what stella.rules.load returned (used as
-- it is: not compiled again). client: see stella.keys.clients.
function M.new(opts)
  if type(opts) ~= "table" then error("stella.trigger: options table expected", 2) end
  if opts.rules == nil then error("stella.trigger: rules (a file name or a table) is required", 2) end
  local compiled, err = rules_mod.load(opts.rules, { allow = opts.allow })
  if not compiled then error("stella.trigger: " .. tostring(err), 2) end
  local spec = compiled.source
  local quiet = compiled.schedule and compiled.schedule.quiet
  if quiet and not zones.offset(quiet.fallback, 0) then   -- the rules cannot read zone files
    error("stella.trigger: quiet_hours.fallback_zone: unknown time zone " .. quiet.fallback, 2)
  end
  local connections = connections_of(opts.connections)
  if opts.client ~= nil and type(opts.client) ~= "table" then
    error("stella.trigger: client must be a client or a table of client options", 2)
  end
  if opts.stop ~= nil and type(opts.stop) ~= "function" then
    error("stella.trigger: stop must be a function", 2)
  end
  if opts.gate ~= nil and (type(opts.gate) ~= "table" or type(opts.gate.send) ~= "function") then
    error("stella.trigger: gate must be a rate limit's gate (stella.rate_limit.gate)", 2)
  end
  return setmetatable({
    stop = opts.stop,        -- () -> true once the run must end (see send.lua)
    gate = opts.gate,        -- the fleet's rate limit, or nil (send.lua)
    rules = compiled,
    store = opts.store or store_mod.memory(),
    clock = opts.clock or os.time,
    dry_run = opts.dry_run and true or false,
    dry_marks = {},          -- a dry run's marks (key -> until): see decide.new_batch
    outbox_opts = merged(merged(DEFAULT_OUTBOX, spec.outbox), opts.outbox),
    alert_opts = merged(merged(alert.DEFAULTS, spec.alert), opts.alert),
    retention = retention.settings(opts.retention, compiled.retention_days),
    next_purge = nil,        -- when the next purge is due (retention.lua); nil: at once
    on_alert = opts.on_alert or compiled.on_alert,
    clients = keys.clients(compiled, opts.client, connections),   -- per brand, with their lanes
    connections = connections,
    counts = {}, reasons = {},
    last_alert_check = nil,
    random = opts.random or random,
  }, Trigger)
end

-- The client for a brand: the brand's own keys if it has them, else the default.
function Trigger:client_for(brand_name)
  return self.clients:for_brand(brand_name)
end

-- The clients a brand's background sends spread over (connections of them).
function Trigger:lanes_for(brand_name)
  return self.clients:lanes(brand_name)
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
  retention.when_due(self, now)
  local outcomes, batch, written = decide.batch(self, events, now)
  if written then
    local results, errs = send.in_line(self, send.sends_of(outcomes), now)
    -- settles the store did not take earlier first (settle.lua), then this one's
    if self.unsettled_plans and #self.unsettled_plans > 0 then settle.reconcile(self, true) end
    settle.batch(self, outcomes, batch, now, results, errs)
  end
  return alert.conclude(self, outcomes, now)
end

-- process(event) -> outcome { status, reason, detail, request_id, request, error, ... }
function Trigger:process(event)
  if type(event) ~= "table" then error("trigger:process: event table expected", 2) end
  return self:process_many({ event })[1]
end

-- explain(event): the decision with every rule's verdict; sends and writes nothing.
function Trigger:explain(event)
  if type(event) ~= "table" then error("trigger:explain: event table expected", 2) end
  return decide.explain(self, event, self.clock())
end

-- pipeline(on_outcomes): see pipeline.lua.
function Trigger:pipeline(on_outcomes)
  if type(on_outcomes) ~= "function" then error("trigger:pipeline: function expected", 2) end
  return pipeline.new(self, on_outcomes)
end

-- flush(): replay what is due in the outbox. Returns counts by status.
function Trigger:flush()
  return flush.run(self)
end

-- unsettled() -> the outbox items of settles the store did not take, kept in this
-- process (its requests were sent: a flush applies them before claiming anything).
-- settle_kept() -> those applied now: items settled | nil, err (Redis still away).
function Trigger:unsettled()
  local n = 0
  for _, plan in ipairs(self.unsettled_plans or {}) do n = n + unsettled.items_of(plan) end
  return n
end

function Trigger:settle_kept()
  return settle.reconcile(self, true)
end

-- purge([now]) -> { ledger = n, dead = n, marks = n } | nil, err: the ledger entries and
-- dead outbox items older than the retention window, and the expired marks, deleted now
-- (retention.lua; a trigger also does it by itself every retention.every seconds).
function Trigger:purge(now)
  if now ~= nil and (type(now) ~= "number" or now - now ~= 0) then
    error("trigger:purge: now must be a finite number or nil", 2)
  end
  return retention.purge(self, now)
end

-- check_alert([now]): see alert.lua.
function Trigger:check_alert(now)
  return alert.check(self, now)
end

-- Counters of this trigger: { counts = { sent = n, ... }, reasons = { ["skipped/duplicate"] = n } }
function Trigger:stats()
  local c, r = {}, {}
  for k, v in pairs(self.counts) do c[k] = v end
  for k, v in pairs(self.reasons) do r[k] = v end
  return { counts = c, reasons = r }
end

-- Closes the clients the trigger made (not a client object it was given, nor the store).
function Trigger:close()
  send.close(self)   -- the lanes first: they use the clients
  self.clients:close()
end

return M
