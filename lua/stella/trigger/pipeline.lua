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
  -- out: the batches decided and on the wire, not completed yet, oldest first; held: their events
  return setmetatable({ trigger = trigger, sink = on_outcomes, out = {}, held = 0, started = false }, Pipeline)
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

-- Completes the oldest batch on the wire (taken off the list first: completed once).
local function complete_oldest(p)
  local b = table.remove(p.out, 1)
  p.held = p.held - #b.events
  complete(p, b)
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
  local now = t.clock()
  retention.when_due(t, now)
  -- decided while the batches before it have their requests on the wire
  local dok, outcomes, batch, written = pcall(decide.batch, t, events, now)
  if not dok then
    -- the batches before it are on the wire: complete them, then let the error go on
    while #self.out > 0 do complete_oldest(self) end
    error(outcomes, 0)
  end
  local b = { events = events, tag = tag, outcomes = outcomes, batch = batch, now = now }
  -- this batch's sends go to the lanes behind the earlier batches', which may still be
  -- out: the lanes go straight on from one to the next; the earlier batches are then
  -- completed (their results collected, settled) while this one is on the wire
  if written then b.finish = send.start(t, send.sends_of(outcomes), now) end
  local out = self.out
  out[#out + 1] = b
  self.held = self.held + #events
  -- the oldest are completed once they hold as many events as this batch: batches of one
  -- size leave two out at once, the one before completed right after this one is added;
  -- growing batches (`stella trigger`'s first ones) stay out together until the batches
  -- are at full size, so that a slow answer in a small first batch does not hold up the
  -- lanes behind it
  while #out > 1 and self.held - #events >= #events do complete_oldest(self) end
end

function Pipeline:finish()
  while #self.out > 0 do complete_oldest(self) end
  local t = self.trigger
  if t.unsettled_plans and #t.unsettled_plans > 0 then settle.reconcile(t, true) end
end

return M
