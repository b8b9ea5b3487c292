-- stella.trigger.settle: the last stage of a batch. After the sends, in one transaction:
-- a sent item's marks are confirmed and the item leaves the outbox; a retryable failure
-- goes back in line with a backoff (or dies after too many tries or too long); a
-- rejected request releases its marks; every outcome gets its ledger entry. Used both
-- after a decided batch (process_many, the pipeline) and after flush's claimed items.
--
-- A settle is first made into a plan (what to write), then the plan is written. A store
-- failure is never ignored: a retryable one (a database locked past its busy timeout) is
-- tried again, SETTLE_TRIES times in all; if the plan still cannot be written, the
-- outcomes say so (a sent request: status sent, reason "unrecorded") and the plan is kept
-- (unsettled.lua: in memory and in a file beside the database) to be written by this
-- process at its next settle, or by the next run before it claims anything from the
-- outbox. The requests are never sent a second time for it.
local rows = require "stella.trigger.rows"
local send = require "stella.trigger.send"
local unsettled = require "stella.trigger.unsettled"

local ipairs, pairs, tostring, type = ipairs, pairs, tostring, type
local floor, min = math.floor, math.min
local tointeger = math.tointeger
local sent_status, ledger_entry = rows.sent_status, rows.ledger_entry
local DEFERRED = send.DEFERRED
local DEFERRED_DETAIL = "not sent yet: the batch ran past half of its outbox lease; flush() sends it"

local M = {}

-- Tries of a settle's transaction while the store says the failure is retryable (each
-- try of SQLite's waits its busy timeout first).
M.SETTLE_TRIES = 3
M.UNRECORDED = "unrecorded"   -- the reason of a request sent whose settle is not in the store yet

local function backoff(self, attempts)
  local o = self.outbox_opts
  local cap = min(o.max_delay, o.base_delay * 2 ^ (attempts - 1))
  return floor(cap / 2 + cap / 2 * self.random())   -- half fixed, half jitter
end

local function new_plan(now)
  return { now = now, sent = {}, requeue = {}, kill = {}, finish = {}, entries = {} }
end

-- Plans one item's settle after its send: the outcome fields (returned), the store's
-- writes (added to plan). A DEFERRED or handed-back item goes back to the outbox, due at
-- once, attempts unchanged.
local function plan_item(self, plan, item, res, err, now, attempts_before)
  if err == DEFERRED or (err and err.handed_back) then   -- not sent (deferred, interrupted, circuit_open)
    plan.requeue[#plan.requeue + 1] = { id = item.id, next_at = err.next_at or now, attempts = attempts_before,
                                        last_error = item.last_error }
    return { status = "queued", reason = err.kind, detail = err == DEFERRED and DEFERRED_DETAIL or tostring(err),
             next_at = err.next_at }
  end
  if res then
    plan.sent[#plan.sent + 1] = item.id
    return { status = sent_status(item.body), request_id = res.request_id, attempts = res.attempts }
  end
  local attempts = attempts_before + 1
  local o = self.outbox_opts
  if err.retryable and attempts < o.max_attempts and now - (item.created_at or now) < o.max_age then
    local next_at = err.next_at or now + backoff(self, attempts)   -- next_at: a paused key's (rate_limit.lua)
    plan.requeue[#plan.requeue + 1] = { id = item.id, next_at = next_at, attempts = attempts,
                                        last_error = tostring(err) }
    return { status = "queued", reason = err.kind, detail = tostring(err), error = err,
             next_at = next_at, attempts = err.attempts }
  end
  if err.retryable then   -- gave up: kept as dead, every try counted
    plan.kill[#plan.kill + 1] = { id = item.id, last_error = tostring(err), attempts = attempts }
  else                    -- rejected: nothing to retry
    plan.finish[#plan.finish + 1] = item.id
  end
  return { status = "failed", reason = err.retryable and "dead" or err.kind, detail = tostring(err),
           error = err, attempts = err.attempts }
end

local function id_of(v)   -- an id read back from JSON (a float under 5.4's cjson)
  return tointeger and type(v) == "number" and tointeger(v) or v
end

-- Writes a plan (the caller's transaction: store:atomic). true, or "done" for a plan
-- with a token that was applied already.
local function apply(store, plan)
  local token = plan.token
  if token and store:get_meta(unsettled.META .. token) then return "done" end
  local now = plan.now
  for _, r in ipairs(plan.requeue) do
    store:reschedule(id_of(r.id), r.next_at, r.attempts, r.last_error)
  end
  for _, r in ipairs(plan.kill) do
    local id = id_of(r.id)
    store:release_marks(id)
    store:kill(id, r.last_error, now, r.attempts)
  end
  for _, id in ipairs(plan.finish) do
    id = id_of(id)
    store:release_marks(id)
    store:finish(id)
  end
  local sent = plan.sent
  if #sent > 0 then
    local ids = {}
    for i = 1, #sent do ids[i] = id_of(sent[i]) end
    store:confirm_marks_many(ids)
    store:finish_many(ids)
  end
  store:record_many(plan.entries)
  if token then store:set_meta(unsettled.META .. token, tostring(now)) end
  return true
end

-- Writes a plan in a transaction of its own, trying again while the failure is
-- retryable. true (or "done"), or nil, err.
local function commit(self, plan, tries)
  local store = self.store
  local ok, err
  for _ = 1, tries or M.SETTLE_TRIES do
    ok, err = store:atomic(apply, store, plan)
    if ok or not (type(err) == "table" and err.retryable) then break end
  end
  return ok, err
end

-- A plan the store did not take: kept in memory and in the file (when the store has
-- one). Returns the file's path, or nil when the plan is only in memory.
local function keep(self, plan)
  plan.token = unsettled.token()
  local list = self.unsettled_plans
  if not list then
    list = {}
    self.unsettled_plans = list
  end
  list[#list + 1] = plan
  local path = unsettled.path_of(self.store)
  if path and unsettled.write(path, plan) then return path end
  return nil
end

-- The outcomes of a plan that was not written say so: a sent request is "sent" (or
-- "recorded") with reason "unrecorded"; the others keep their status and reason (the
-- plan makes them so once it is written), with a note in their detail.
local function mark_unrecorded(outcomes, planned, err, path)
  local later = path and ("kept in " .. path .. ": the next `stella retry` or `stella trigger` records it, "
    .. "and it is not sent again") or "kept in memory: this process records it at its next settle"
  for i = 1, #outcomes do
    local o = outcomes[i]
    if planned[i] then
      o.unrecorded = true
      if o.status == "sent" or o.status == "recorded" then
        o.reason = M.UNRECORDED
        o.detail = "sent, but not yet in the store (" .. tostring(err) .. "); " .. later
      else
        o.detail = (o.detail and (o.detail .. "; ") or "") .. "not yet in the store (" .. tostring(err) .. "); " .. later
      end
    end
  end
end

-- Settles a decided batch after its sends: confirms or requeues each item, writes the
-- ledger. The outcomes get their final status (and lose their bodies). true, or nil, err
-- when the store did not take it (the outcomes then say "unrecorded").
function M.batch(self, outcomes, batch, now, results, errs)
  local plan, planned = new_plan(now), {}
  local entries = plan.entries
  for i = 1, #outcomes do
    local o = outcomes[i]
    local id = o.outbox_id
    if id then
      planned[i] = true
      local res = results[i]
      if res then   -- plan_item's success case, without its table
        plan.sent[#plan.sent + 1] = id
        o.status, o.request_id, o.attempts = sent_status(o.body), res.request_id, res.attempts
      else
        local item = { id = id, kind = "request", body = o.body, brand = o.brand, created_at = now }
        for key, v in pairs(plan_item(self, plan, item, nil, errs[i], now, 0)) do o[key] = v end
      end
    end
    o.body = nil
    entries[i] = ledger_entry(batch, o, now)
  end
  local ok, err = commit(self, plan)
  if ok then return true end
  mark_unrecorded(outcomes, planned, err, keep(self, plan))
  return nil, err
end

-- Settles the outbox items flush claimed after their sends; adds each to summary (counts
-- by status, once the store has them; sent but not recorded: summary.unrecorded too).
-- Returns their outcomes, and nil, err when the store did not take them.
function M.claimed(self, items, batch, now, results, errs, summary)
  local outcomes, planned = {}, {}
  local plan = new_plan(now)
  for i, item in ipairs(items) do
    local r = plan_item(self, plan, item, results[i], errs[i], now, item.attempts or 0)
    r.event_id, r.brand, r.interaction_id = item.event_id, item.brand, item.interaction_id
    r.customer_hash = item.customer_hash   -- for the ledger: flush has no request table
    if r.status == "sent" or r.status == "recorded" then r.reason = "outbox" end
    plan.entries[i] = ledger_entry(batch, r, now)
    outcomes[i] = r
    planned[i] = true
  end
  local ok, err = commit(self, plan)
  if not ok then mark_unrecorded(outcomes, planned, err, keep(self, plan)) end
  for _, r in ipairs(outcomes) do
    if r.status == "failed" and r.reason == "dead" then summary.dead = summary.dead + 1 end
    summary[r.status] = summary[r.status] + 1
    if r.reason == M.UNRECORDED then summary.unrecorded = (summary.unrecorded or 0) + 1 end
  end
  if not ok then return outcomes, err end
  return outcomes
end

-- How many items this trigger settled but could not write yet.
function M.pending(self)
  local n = 0
  for _, plan in ipairs(self.unsettled_plans or {}) do n = n + unsettled.items_of(plan) end
  return n
end

-- Writes the plans kept earlier: this trigger's own (in memory), then, unless own_only,
-- those in the store's file (any process's). Returns how many items were recorded now
-- (not counting plans some process had written already), or nil, err when a plan still
-- cannot be written (then nothing must be claimed from the outbox).
function M.reconcile(self, own_only)
  local n = 0
  local list = self.unsettled_plans
  if list and #list > 0 then
    local left = {}
    local first_err
    for _, plan in ipairs(list) do
      local ok, err = commit(self, plan, 1)
      if not ok then
        left[#left + 1] = plan
        first_err = first_err or err
      elseif ok == true then
        n = n + unsettled.items_of(plan)
      end
    end
    self.unsettled_plans = left
    if first_err then return nil, first_err end
  end
  if own_only then return n end
  local path = unsettled.path_of(self.store)
  if not path then return n end
  local plans, size = unsettled.read(path)
  if size == 0 then return n end
  for _, plan in ipairs(plans) do
    local ok, err = commit(self, plan, 1)
    if not ok then return nil, err end
    if ok == true then n = n + unsettled.items_of(plan) end
  end
  unsettled.remove_if(path, size)
  return n
end

return M
