-- stella.trigger.decide: the first stage of a batch. Runs the rules on each event (with
-- the store's marks and unsubscribes as their view of the world), encodes the requests
-- to send, and writes them to the outbox with the suppression and dedupe marks they
-- reserve, all in one transaction. Nothing is sent here (send.lua does that).
local stella = require "stella"
local rules_mod = require "stella.rules"
local errors_mod = require "stella.error"
local rows = require "stella.trigger.rows"
local zones = require "stella.zones"
local outcome_mod = require "stella.trigger.outcome"

local type, tostring = type, tostring
local sent_status = rows.sent_status
local outcome_of, event_id_of = outcome_mod.of, outcome_mod.event_id
local do_not_send_reason = outcome_mod.do_not_send_reason

local M = {}

-- A batch: what one process_many (or flush) call shares across its events.
--   hash(email)  the store's salted hash, computed once per address in the batch
--   marks        key -> until of the marks this batch puts, seen by its later events
--                before they reach the store (a dry-run trigger keeps one such table for
--                its whole life instead, so that it suppresses as a real run would)
--   pending ...  the requests to enqueue (enqueue_pending writes them)
function M.new_batch(self)
  local store, memo = self.store, {}
  return {
    hash = function(email)
      local h = memo[email]
      if not h then
        h = store:hash_email(email)
        memo[email] = h
      end
      return h
    end,
    marks = self.dry_run and self.dry_marks or {},
    pending = {},    -- outcomes of the requests to enqueue, in event order
    phash = {},      -- their customers' hashes (false for none), by index in pending
    pmarks = {},     -- their marks, flat: key, until, index in pending
    npmarks = 0,     -- values in pmarks
    env = nil,   -- the rules' environment, made by env_for on first use
  }
end
local new_batch = M.new_batch

-- Store keys for rule marks (stella.trigger.outcome: the same keys as the rules inside
-- Redis). E-mails become salted hashes there, never stored in clear.
local function mark_key(batch, mark)
  local key = mark._key   -- a mark looked up and then put is keyed once
  if key then return key end
  key = outcome_mod.mark_key(mark, batch.hash)
  mark._key = key
  return key
end

-- The rules' view of the store for the events of a batch (all decided at `now`).
local function env_for(self, now, batch)
  local env = batch.env
  if env and env.now == now then return env end
  local store, marks = self.store, batch.marks
  env = {
    now = now,
    lookup = function(mark)
      local key = mark_key(batch, mark)
      local until_ = marks[key]   -- put earlier in this batch: not in the store yet
      if until_ ~= nil then return until_ > now and until_ or nil end
      local fetched = batch.fetched_marks and batch.fetched_marks[key]
      if fetched ~= nil then return fetched or nil end
      return (store:get_mark(key, now))
    end,
    unsubscribed = function(email)
      if batch.no_unsubscribes then return false end
      local h = batch.hash(email)
      local fetched = batch.fetched_unsubs and batch.fetched_unsubs[h]
      if fetched ~= nil then return fetched end
      return store:is_unsubscribed(h)
    end,
    zone_offset = zones.offset,   -- quiet hours: IANA zones from the system's zone files
  }
  batch.env = env
  return env
end

-- A networked store (store.remote: Redis) answers many look-ups in one round trip: a
-- first, speculative pass of the rules over the batch collects the marks and addresses
-- they look up (every look-up answering "none", so each event goes as far as it can),
-- and one get_marks and one unsubscribed_many fetch them all; the real pass reads them
-- from the batch (a look-up the first pass did not make still goes to the store).
-- Inside the decide transaction, so the store sees them as read by it.
local function prefetch(self, events, now, batch)
  local keys, seen, hashes, hseen = {}, {}, {}, {}
  local env = {
    now = now,
    lookup = function(mark)
      local key = mark_key(batch, mark)
      if not seen[key] then
        seen[key] = true
        keys[#keys + 1] = key
      end
      return nil
    end,
    unsubscribed = function(email)
      if batch.no_unsubscribes then return false end
      local h = batch.hash(email)
      if not hseen[h] then
        hseen[h] = true
        hashes[#hashes + 1] = h
      end
      return false
    end,
  }
  for i = 1, #events do pcall(rules_mod.evaluate, self.rules, events[i], env, false) end
  local store = self.store
  if #keys > 0 then
    local untils = store:get_marks(keys, now)
    if not untils then return end   -- the transaction has failed: it ends there
    local fetched = {}
    for i = 1, #keys do fetched[keys[i]] = untils[i] or false end
    batch.fetched_marks = fetched
  end
  if #hashes > 0 then
    local flags = store:unsubscribed_many(hashes)
    if not flags then return end
    local fetched = {}
    for i = 1, #hashes do fetched[hashes[i]] = flags[i] end
    batch.fetched_unsubs = fetched
  end
end

-- Decides one event. A request to send joins batch.pending (enqueue_pending writes them)
-- and its marks join batch.marks, where the batch's later events see them.
local function decide(self, event, now, explain, batch)
  local d = rules_mod.evaluate(self.rules, event, env_for(self, now, batch), explain)
  local outcome = outcome_of(d, event)
  outcome.dry_run = self.dry_run or nil
  if outcome.status then return outcome end   -- skipped, suppressed, invalid
  local body, errs = stella.encode(d.request, "request")
  if explain and d.verdicts then
    d.verdicts[#d.verdicts + 1] = { rule = "validate", verdict = body and "pass" or "invalid",
                                    reason = not body and "invalid_request" or nil,
                                    detail = errs and errors_mod.summarize(errs) or nil }
  end
  if not body then
    outcome.status, outcome.reason = "invalid", "invalid_request"
    outcome.detail = errors_mod.summarize(errs)
    outcome.errors = errs
    return outcome
  end
  outcome.body = body
  outcome.status = sent_status(body)
  outcome.reason = do_not_send_reason(d)
  if d.send_at then   -- to go later: queued, not sent now (flush sends it once due)
    outcome.status, outcome.reason, outcome.send_at = "queued", rows.SCHEDULED, d.send_at
    outcome.detail = "will send at " .. rules_mod.iso_utc(d.send_at) .. " (" .. d.schedule .. ")"
  end
  if explain then return outcome end
  local bmarks, dmarks = batch.marks, d.marks
  if self.dry_run then
    for i = 1, #dmarks do
      local mark = dmarks[i]
      bmarks[mark_key(batch, mark)] = mark["until"]
    end
    return outcome
  end
  local pending = batch.pending
  local np = #pending + 1
  local pm, k = batch.pmarks, batch.npmarks
  for i = 1, #dmarks do
    local mark = dmarks[i]
    local key, until_ = mark_key(batch, mark), mark["until"]
    bmarks[key] = until_
    pm[k + 1], pm[k + 2], pm[k + 3] = key, until_, np
    k = k + 3
  end
  batch.npmarks = k
  pending[np] = outcome
  local c = d.request.customer
  batch.phash[np] = type(c) == "table" and type(c.email) == "string" and batch.hash(c.email) or false
  return outcome
end

-- Writes the batch's pending requests to the outbox and their marks, reserved by them
-- (inside the decide transaction). true, or nil, err.
local function enqueue_pending(self, batch, now)
  local pending = batch.pending
  local n = #pending
  if n == 0 then return true end
  local store, hashes = self.store, batch.phash
  local next_at = now + self.outbox_opts.lease   -- leased to this run, which sends it now
  local items = {}
  for i = 1, n do
    local o = pending[i]
    items[i] = { kind = "request", body = o.body, brand = o.brand, event_id = o.event_id,
                 interaction_id = o.interaction_id, customer_hash = hashes[i] or nil,
                 created_at = now, next_at = o.send_at or next_at, attempts = 0 }
  end
  local ids, err = store:enqueue_many(items)
  if not ids then return nil, err end
  for i = 1, n do
    local o = pending[i]
    if o.send_at then
      -- a scheduled item waits for flush(): no outbox_id on the outcome, so this run
      -- neither sends nor settles it; it is marked as scheduled (rows.SCHEDULED)
      local ok, rerr = store:reschedule(ids[i], o.send_at, 0, rows.SCHEDULED)
      if ok == nil then return nil, rerr end
    else
      o.outbox_id = ids[i]
    end
  end
  local pm, count = batch.pmarks, batch.npmarks
  if count == 0 then return true end
  local marks = {}
  for j = 1, count, 3 do
    marks[#marks + 1] = { key = pm[j], ["until"] = pm[j + 1], outbox_id = ids[pm[j + 2]] }
  end
  return store:put_mark_many(marks)
end

-- explain(event): the decision with every rule's verdict; writes nothing.
function M.explain(self, event, now)
  local outcome = decide(self, event, now, true, new_batch(self))
  outcome.body = nil
  return outcome
end

local DECIDE_TRIES = 3
-- A conflict (err.conflict: the Redis store found that another writer changed a mark
-- this batch read) means that writer made progress: decide again, a few more times.
local CONFLICT_TRIES = 10

-- Decides a batch of events at `now` in one transaction: rules, then the outbox items
-- and marks of the requests to send. Returns the outcomes, the batch, and whether it was
-- written (false: a dry run, or a store error and every outcome failed). An outcome to
-- send carries its outbox_id and its encoded body.
function M.batch(self, events, now)
  if self.dry_run then
    local outcomes, batch = {}, new_batch(self)
    for i = 1, #events do
      local o = decide(self, events[i], now, false, batch)
      o.body = nil
      outcomes[i] = o
    end
    return outcomes, batch, false
  end
  local store = self.store
  local outcomes, batch, ok, serr
  -- a retryable failure (another writer took a mark this batch looked at: the shared-dict
  -- store's cross-worker race) rolled everything back: decide again, now seeing what the
  -- other writer wrote (its customer is then suppressed here, not failed)
  local tries, conflicts = 0, 0
  while true do
    outcomes, batch = {}, new_batch(self)
    -- a failure inside (returned or not) rolls the whole batch back: nil, err
    ok, serr = store:atomic(function()
      -- inside the transaction nothing else writes the store: with no unsubscribes at its
      -- start, none of this batch's events is unsubscribed (the rules cannot add one)
      if store:unsubscribed_count() == 0 then batch.no_unsubscribes = true end
      if store.remote then prefetch(self, events, now, batch) end
      for i = 1, #events do outcomes[i] = decide(self, events[i], now, false, batch) end
      return enqueue_pending(self, batch, now)
    end)
    if ok or not (type(serr) == "table" and serr.retryable) then break end
    if serr.conflict then conflicts = conflicts + 1 else tries = tries + 1 end
    if tries >= DECIDE_TRIES or conflicts >= CONFLICT_TRIES then break end
  end
  if not ok then   -- rolled back: nothing was reserved or queued
    outcomes = {}
    for i = 1, #events do
      outcomes[i] = { status = "failed", reason = "store_error", detail = tostring(serr),
                      error = serr, event_id = event_id_of(events[i]) }
    end
    return outcomes, batch, false
  end
  return outcomes, batch, true
end

return M
