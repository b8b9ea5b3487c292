-- stella.trigger.flush: replays the outbox (trigger:flush, `stella retry`). Claims what is
-- due, a leased batch at a time, sends it (send.start: first attempts over the brand's
-- connections, then in line) and settles it (settle.claimed), until nothing is due.
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
  retention.when_due(self, self.clock())
  while true do
    local done, rerr = settle.reconcile(self)
    if not done then return nil, rerr end
    if done > 0 then summary.reconciled = (summary.reconciled or 0) + done end
    local now = self.clock()
    local items, err = self.store:claim(now, o.lease, size)
    if not items then return nil, err end
    if #items == 0 then break end
    local claimed = #items
    -- a batch only for the ledger's hash of e-mails: claimed items carry their hashes
    local batch = decide.new_batch(self)
    -- requests decided inside Redis are validated first; the invalid ones settled there
    local invalid
    items, invalid = unvalidated.check(self, items, batch, now, summary)
    if #invalid > 0 then alert.conclude(self, invalid, now) end
    local results, errs = send.start(self, items, now)()
    local outcomes, serr = settle.claimed(self, items, batch, now, results, errs, summary)
    alert.conclude(self, outcomes, now)
    if serr then return summary, serr end
    if claimed < size or send.halted(outcomes) then break end   -- halted: interrupted, circuit_open
    if self.gate and self.gate.held_back then break end   -- the rate limit has no slot for more now
  end
  return summary
end

return M
