-- stella.trigger: event -> rules -> request -> send, with the store keeping
-- suppression and dedupe marks, the ledger, unsubscribes and the outbox.
-- This file makes a trigger and wires its public methods to the stages, one file each:
--   decide.lua    rules, encoding, outbox items and marks written (one transaction)
--   send.lua      the requests sent, in line or on a background thread
--   settle.lua    sent, requeued or failed; marks confirmed or released; the ledger
--                 (one transaction)
--   rows.lua      the rows those two transactions write, and how a batch of them is written
--   pipeline.lua  batches overlapped: one decided while another is sent
--   flush.lua     the outbox replayed
--   alert.lua     outcomes counted; the failure-rate alert
--
-- Crash safety: a request to send is first written to the outbox, together
-- with its suppression/dedupe marks, in one transaction (the marks are
-- "reserved" by the outbox item). Only then is it sent. Success confirms the
-- marks and removes the item; a permanent failure releases the marks; a
-- retryable one leaves the item queued for flush(). A process killed at any
-- point leaves each event sent, still queued (leased, then retried), or dead.
local rules_mod = require "stella.rules"
local store_mod = require "stella.store"
local client_mod = require "stella.client"
local decide = require "stella.trigger.decide"
local send = require "stella.trigger.send"
local settle = require "stella.trigger.settle"
local pipeline = require "stella.trigger.pipeline"
local flush = require "stella.trigger.flush"
local alert = require "stella.trigger.alert"

local type, pairs, ipairs, tostring, error, setmetatable =
      type, pairs, ipairs, tostring, error, setmetatable
local random = math.random

local M = {}

local Trigger = {}
Trigger.__index = Trigger

local DEFAULT_OUTBOX = { lease = 300, max_attempts = 10, max_age = 86400, base_delay = 60,
                         max_delay = 3600, batch = 100 }
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
    alert_opts = merged(merged(alert.DEFAULTS, spec.alert), opts.alert),
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
  local outcomes, batch, written = decide.batch(self, events, now)
  if written then
    local results, errs = send.in_line(self, send.sends_of(outcomes), now)
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

function Trigger:close()
  for _, c in ipairs(self.owned) do c:close() end
  self.owned, self.clients, self.lanes = {}, {}, {}
end

return M
