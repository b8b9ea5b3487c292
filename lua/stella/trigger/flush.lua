-- stella.trigger.flush: replays the outbox (trigger:flush, `stella retry`). Claims what is
-- due, a leased batch at a time, sends it (send.start: first attempts over the brand's
-- connections, then in line) and settles it (settle.claimed), until nothing is due. The
-- next batch is claimed and handed to the connections while those before it are still out.
-- Items come back here after a retryable failure, a crash, or a batch that ran past half
-- of its lease. Before each claim, the settles some run could not write to the store are
-- written (settle.reconcile): their items were sent already and must not be claimed.
local decide = require "stella.trigger.decide"
local send = require "stella.trigger.send"
local settle = require "stella.trigger.settle"
local alert = require "stella.trigger.alert"
local retention = require "stella.trigger.retention"
local unvalidated = require "stella.trigger.unvalidated"

local M = {}

-- Returns counts by status { sent, recorded, queued, failed, dead [, invalid] }, with, when not 0,
-- unrecorded (sent, of those counted in sent and recorded, whose settle the store did not
-- take, kept for the next run; reconciled: items an earlier run sent or settled whose
-- settle was written now). nil, err when the store cannot claim (or cannot take the
-- settles kept earlier, in which case nothing is claimed). When a batch's settle fails,
-- the flush ends there: summary, err.
function M.run(self)
  local summary = { sent = 0, recorded = 0, queued = 0, failed = 0, dead = 0 }
  if self.dry_run then return summary end
  local o = self.outbox_opts
  -- at least 32 items per connection: a claim and a settle per batch, and the connections
  -- busy for 32 round trips in between rather than one or two (bench/lanes.lua)
  local size = math.max(o.batch, 32 * (self.connections or 1))
  -- the first claim small (two items per connection), each next twice the one before up
  -- to size: nothing is on the wire before the first claim is validated and handed over,
  -- and the next claim is made while the one before is out
  local want = math.min(size, math.max(8, 2 * (self.connections or 1)))
  retention.when_due(self, self.clock())
  -- waits for batch b's sends, settles it; returns its outcomes and a settle's error
  local function complete(b)
    local results, errs = b.finish()
    local outcomes, serr = settle.claimed(self, b.items, b.batch, b.now, results, errs, summary)
    alert.conclude(self, outcomes, b.now)
    return outcomes, serr
  end
  -- Batches claimed and handed to the lanes, not completed yet, oldest first. The next
  -- batch is claimed and handed over while those before it are still on the wire, so that
  -- the connections go straight on from one to the next; the oldest are completed once
  -- they hold as many items as the newest (batches of one size: the one before is
  -- completed right after the next is handed over, two out at once; the small first
  -- claims stay out together until the claims are at full size, so that one slow answer
  -- among them does not hold the lanes up). A batch claimed is always sent (or handed
  -- back) and settled before the flush ends.
  local out, held, more = {}, 0, true
  while true do
    local ferr
    if more then
      local done, rerr = settle.reconcile(self)
      if not done then
        ferr = rerr
      else
        if done > 0 then summary.reconciled = (summary.reconciled or 0) + done end
        local now = self.clock()
        local items, err = self.store:claim(now, o.lease, want)
        if not items then
          ferr = err
        else
          local claimed = #items
          if claimed < want then more = false end   -- nothing more is due
          if claimed > 0 then
            -- a batch only for the ledger's hash of e-mails: claimed items carry their hashes
            local batch = decide.new_batch(self)
            -- requests decided inside Redis are validated first; the invalid ones settled there
            local invalid
            items, invalid = unvalidated.check(self, items, batch, now, summary)
            if #invalid > 0 then alert.conclude(self, invalid, now) end
            out[#out + 1] = { items = items, batch = batch, now = now, claimed = claimed,
                              finish = send.start(self, items, now) }
            held = held + claimed
          end
          want = math.min(size, want * 2)
        end
      end
      if ferr then more = false end
    end
    -- complete the oldest batches: while they hold as many items as the newest, all of
    -- them once nothing more is claimed
    while #out > 0 and (not more or (#out > 1 and held - out[#out].claimed >= out[#out].claimed)) do
      local b = table.remove(out, 1)
      held = held - b.claimed
      local outcomes, serr = complete(b)
      -- halted: interrupted, circuit_open; held back: the rate limit has no slot for more now
      if serr or send.halted(outcomes) or (self.gate and self.gate:held_back_here()) then
        while #out > 0 do
          local _, cerr = complete(table.remove(out, 1))
          serr = serr or cerr
        end
        if ferr then return nil, ferr end
        if serr then return summary, serr end
        return summary
      end
    end
    if ferr then return nil, ferr end
    if not more and #out == 0 then break end
  end
  return summary
end

return M
