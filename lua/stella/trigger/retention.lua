-- stella.trigger.retention: the ledger and the dead outbox items are kept for a window
-- (default 90 days), then purged, with the expired suppression and dedupe marks; so a
-- store stops growing once it holds one window of events.
--
-- The window: the trigger's option retention = { days = N, every = S }, else the rules
-- file's retention = { days = N }, else 90 days (days = math.huge keeps everything). One
-- window for both: a ledger entry (an event's outcome) and a dead item (a request given up
-- on, kept for inspection; it holds the customer's name and address) go at the same age.
--
-- trigger:purge([now]) purges now, in steps of STEP rows of each kind, each step its own
-- transaction (SQLite lets go of the write lock between them, so a first purge of a large
-- store does not hold other processes back for long). A trigger also purges by itself
-- when `every` seconds (default 3600; 0: never by itself) of its clock have passed since
-- its last purge, at the start of a batch or a flush (the first one included), so a
-- long-running process needs no timer; `stella trigger` and `stella retry` purge once per
-- run. A failed purge (a locked database) is left for the next time: it fails no event.
local huge, floor, type, pairs, error, pcall, tostring, tonumber =
      math.huge, math.floor, type, pairs, error, pcall, tostring, tonumber

local M = {}

M.DAY = 86400
M.DEFAULTS = { days = 90, every = 3600 }
M.STEP = 10000   -- rows of each kind per store:purge (one transaction)

-- The retention settings of a trigger: opts.retention over the rules' over the defaults;
-- raises on a bad option (the rules' were checked by stella.rules).
function M.settings(given, rules_days)
  if given ~= nil and type(given) ~= "table" then error("stella.trigger: retention must be a table", 3) end
  local r = { days = rules_days or M.DEFAULTS.days, every = M.DEFAULTS.every }
  for k, v in pairs(given or {}) do
    if k ~= "days" and k ~= "every" then
      error("stella.trigger: retention." .. tostring(k) .. " is not a retention setting (days, every)", 3)
    end
    if type(v) ~= "number" or not (v >= 0) or (k == "days" and v == 0) or (k == "every" and v == huge) then
      error("stella.trigger: retention." .. k .. (k == "days" and " must be a number of days above 0"
        or " must be a number of seconds (0: only trigger:purge)"), 3)
    end
    r[k] = v
  end
  return r
end

-- The time before which ledger entries and dead items go, or nil when everything is kept.
function M.cutoff(settings, now)
  if settings.days == huge then return nil end
  return now - settings.days * M.DAY
end

-- The meta value "retention" a purge leaves (for `stella status`): the window and what
-- the last purge deleted, "days=90 at=1700000000 ledger=12 dead=0" (days=forever).
function M.meta_text(days, now, total)
  return ("days=%s at=%d ledger=%d dead=%d"):format(days == huge and "forever" or tostring(days),
    floor(now), total.ledger, total.dead)
end

-- The meta value read back: { days = n (math.huge: forever), at, ledger, dead } | nil.
function M.parse_meta(text)
  if type(text) ~= "string" then return nil end
  local t = {}
  for k, v in text:gmatch("(%a+)=(%S+)") do t[k] = v == "forever" and huge or tonumber(v) end
  if not (t.days and t.at and t.ledger and t.dead) then return nil end
  return t
end

-- trigger:purge([now]) -> { ledger = n, dead = n, marks = n } | nil, err (a dry run's
-- trigger writes nothing: all 0)
function M.purge(self, now)
  now = now or self.clock()
  self.next_purge = now + (self.retention.every > 0 and self.retention.every or huge)
  if self.dry_run then return { ledger = 0, dead = 0, marks = 0 } end
  local store = self.store
  local marks, err = store:purge_marks(now)
  if not marks then return nil, err end
  local total = { ledger = 0, dead = 0, marks = marks }
  local before = M.cutoff(self.retention, now)
  local step = M.STEP
  while before do
    local n
    n, err = store:purge(before, step)
    if not n then return nil, err end
    total.ledger, total.dead = total.ledger + n.ledger, total.dead + n.dead
    if n.ledger < step and n.dead < step then break end
  end
  local ok
  ok, err = store:set_meta("retention", M.meta_text(self.retention.days, now, total))
  if not ok then return nil, err end
  return total
end

-- Purges when it is due (see the top); called at the start of a batch or flush.
function M.when_due(self, now)
  local next_purge = self.next_purge
  if self.dry_run or (next_purge and now < next_purge) or (not next_purge and self.retention.every == 0) then
    return
  end
  pcall(M.purge, self, now)   -- a failure waits for the next time (purge set next_purge first)
end

return M
