-- stella.trigger.alert: after each batch, its outcomes are counted (trigger:stats) and,
-- when one of them is a failed or retried send, the failure rate of the last window is
-- checked: above alert.threshold, on_alert is called, at most once per window across
-- every process sharing the store.
local store_rows = require "stella.store.rows"

local ipairs, tostring, tonumber, pcall = ipairs, tostring, tonumber, pcall
local is_rate_error = store_rows.is_rate_error

local M = {}

M.DEFAULTS = { threshold = 0.05, min_sends = 20, window = 3600, check_every = 10 }

local function count(self, outcome)
  self.counts[outcome.status] = (self.counts[outcome.status] or 0) + 1
  local key = outcome.status .. "/" .. tostring(outcome.reason or "")
  self.reasons[key] = (self.reasons[key] or 0) + 1
end

-- Calls on_alert when more than alert.threshold of the last window's sends failed (at
-- least alert.min_sends of them), at most once per window, shared across processes
-- through the store's meta table. Returns what it passed to on_alert, or nil.
function M.check(self, now)
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
local check = M.check

-- Counts a batch's outcomes, checks the alert once, returns them.
function M.conclude(self, outcomes, now)
  local checking = false
  for _, o in ipairs(outcomes) do
    count(self, o)
    if is_rate_error(o.status, o.reason) then checking = true end
  end
  if checking and not self.dry_run then check(self, now) end
  return outcomes
end

return M
