-- stella.trigger.pipeline: batches of events in, their outcomes out, with the stages of
-- neighbouring batches overlapped: each batch's sends are on the wire (send.start) while
-- the next batch is decided (decide.lua) and the previous one settled (settle.lua); the
-- next batch's sends join the lanes before the last of this one's are back.
-- Made by trigger:pipeline; what `stella trigger` feeds its files through.
local decide = require "stella.trigger.decide"
local send = require "stella.trigger.send"
local settle = require "stella.trigger.settle"
local alert = require "stella.trigger.alert"
local retention = require "stella.trigger.retention"

local type, error, setmetatable, pcall = type, error, setmetatable, pcall

local M = {}

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
-- When deciding a batch raises, the batch before it is still completed (sent, settled,
-- handed to on_outcomes) before the error goes on to the caller.
-- A settle the store does not take (settle.lua) is written later: after the next batch's
-- settle, at finish(), or by the next run; the first process() also writes those another
-- run left behind.
function M.new(trigger, on_outcomes)
  return setmetatable({ trigger = trigger, sink = on_outcomes, prev = nil, started = false }, Pipeline)
end

-- Completes batch b: waits for the rest of its sends, then settles it and hands its
-- outcomes on.
local function complete(p, b)
  local t = p.trigger
  local results, errs
  if b.finish then results, errs = b.finish() end
  if b.finish then
    -- the settles kept from earlier batches first, so that the ledger keeps their order
    if t.unsettled_plans and #t.unsettled_plans > 0 then settle.reconcile(t, true) end
    settle.batch(t, b.outcomes, b.batch, b.now, results, errs)
  end
  p.sink(alert.conclude(t, b.outcomes, b.now), b.events, b.tag)
end

function Pipeline:process(events, tag)
  if type(events) ~= "table" then error("pipeline:process: list of events expected", 2) end
  for i = 1, #events do
    if type(events[i]) ~= "table" then error("pipeline:process: event " .. i .. " is not a table", 2) end
  end
  local t = self.trigger
  if not self.started then
    self.started = true
    -- what an earlier run sent but could not record: written before anything else
    if not t.dry_run then settle.reconcile(t) end
  end
  local prev = self.prev
  self.prev = nil
  local now = t.clock()
  retention.when_due(t, now)
  -- decided while the previous batch's requests are still on the wire
  local dok, outcomes, batch, written = pcall(decide.batch, t, events, now)
  if not dok then
    -- the previous batch is on the wire: complete it, then let the error go on
    if prev then complete(self, prev) end
    error(outcomes, 0)
  end
  local b = { events = events, tag = tag, outcomes = outcomes, batch = batch, now = now }
  self.prev = b
  -- this batch's sends go to the lanes behind the previous batch's, which may still be
  -- out: the lanes go straight on from one to the other; the previous batch is then
  -- completed (its results collected, settled) while this one is on the wire
  if written then b.finish = send.start(t, send.sends_of(outcomes), now) end
  if prev then complete(self, prev) end
end

function Pipeline:finish()
  local b = self.prev
  self.prev = nil
  if b then complete(self, b) end
  local t = self.trigger
  if t.unsettled_plans and #t.unsettled_plans > 0 then settle.reconcile(t, true) end
end

return M
