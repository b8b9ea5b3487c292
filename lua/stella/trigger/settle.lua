-- stella.trigger.settle: the last stage of a batch. After the sends, in one transaction:
-- a sent item's marks are confirmed and the item leaves the outbox; a retryable failure
-- goes back in line with a backoff (or dies after too many tries or too long); a
-- rejected request releases its marks; every outcome gets its ledger entry. Used both
-- after a decided batch (process_many, the pipeline) and after flush's claimed items.
local rows = require "stella.trigger.rows"
local send = require "stella.trigger.send"

local pairs, ipairs, tostring = pairs, ipairs, tostring
local floor, min = math.floor, math.min
local sent_status, ledger_entry = rows.sent_status, rows.ledger_entry
local DEFERRED = send.DEFERRED
local DEFERRED_DETAIL = "not sent yet: the batch ran past half of its outbox lease; flush() sends it"

local M = {}

local function backoff(self, attempts)
  local o = self.outbox_opts
  local cap = min(o.max_delay, o.base_delay * 2 ^ (attempts - 1))
  return floor(cap / 2 + cap / 2 * self.random())   -- half fixed, half jitter
end

-- Settles one item after its send (the caller holds the transaction): the outcome
-- fields to merge. A sent item only joins `sent` (settle_sent confirms and finishes those
-- together); a failure is written here. A DEFERRED item goes back to the outbox, due at
-- once, attempts unchanged.
local function settle(self, item, res, err, now, attempts_before, sent)
  local store = self.store
  if err == DEFERRED or (err and err.handed_back) then   -- not sent (deferred, interrupted, circuit_open)
    store:reschedule(item.id, now, attempts_before, item.last_error)
    return { status = "queued", reason = err.kind, detail = err == DEFERRED and DEFERRED_DETAIL or tostring(err) }
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

-- Settles a decided batch after its sends: confirms or requeues each item, writes the
-- ledger. The outcomes get their final status (and lose their bodies).
function M.batch(self, outcomes, batch, now, results, errs)
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

-- Settles the outbox items flush claimed after their sends; adds each to summary (counts
-- by status). Returns their outcomes.
function M.claimed(self, items, batch, now, results, errs, summary)
  local outcomes = {}
  self.store:atomic(function()
    local sent, entries = {}, {}
    for i, item in ipairs(items) do
      local r = settle(self, item, results[i], errs[i], now, item.attempts or 0, sent)
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
  return outcomes
end

return M
