-- stella.queue.worker: one consumer of the work queue (what `stella worker` runs).
--
--   local worker = require "stella.queue.worker"
--   local summary = worker.run{ queue = q, trigger = t, name = "w1", batch = 100,
--                               lease = 30, max_deliveries = 5, block = 1, flush_every = 1,
--                               stop = fn, on_batch = fn(report), on_error = fn(message),
--                               on_notice = fn(message), clock = fn() -> seconds }
--
-- Each round: the heartbeat; entries of a dead consumer, idle for `lease` seconds, taken
-- over (XAUTOCLAIM), else new ones read (XREADGROUP, blocking up to `block` s); each
-- entry's JSON decoded (a malformed one goes to the dead-letter stream with the reason);
-- the events decided, sent and settled by the trigger's pipeline (the same atomic store
-- calls and overlapped batches as `stella trigger`), then acknowledged. An entry
-- delivered more than max_deliveries times goes to the dead-letter stream with its last
-- error instead.
-- Entries whose decision failed (the store could not be written) are not acknowledged:
-- their error is noted and they come back after the lease.
--
-- Retries are never slept on: a retryable send failure leaves the request queued in the
-- store's outbox with its next_at, and between rounds (every flush_every seconds) the
-- worker runs trigger:flush(), which sends what is due. The outbox's due-time index is
-- the retry schedule, shared by every worker.
--
-- Reprocessing a reclaimed entry is safe with once_per_interaction (the default of the
-- rules' examples): an interaction decided before is `skipped/duplicate`, and its request,
-- if it was left queued in the outbox by the dead worker, goes out with a flush once the
-- outbox lease is over. Only a request that was on the wire, not yet settled, when its
-- worker died may go twice: at most a batch, and the first requests of the next one (its
-- sends start while that batch is settled).
--
-- Redis away (a restart, a failover, the network): every call fails until it is back. The
-- worker neither exits nor logs each failure: the first failure of an outage is reported
-- once (on_error), the worker waits between rounds with a backoff (0.1 s, doubling, at
-- most max_backoff s, default 2; stop() is looked at every 0.1 s), the connections connect
-- again on their next call, and the first round that reaches Redis reports the outage's
-- end (on_notice) with its length. What was in hand when Redis went is safe: an entry
-- not acknowledged comes back after the lease, a request whose settle was not written is
-- settled by the trigger's next flush (its reconcile), which runs in the round that finds
-- Redis back; an outage longer than the outbox lease lets another worker send it again. A failure of the store during a
-- flush or a batch is told apart from an outage by a PING on the queue's connection.
-- Stopped while Redis is away with such settles in hand, the worker waits up to
-- settle_grace seconds (5) for Redis to take them before it ends.
--
-- Every prune_every seconds (60) it forgets workers silent for forget_after seconds (a
-- day; stopped or vanished) and the group's consumers that hold nothing and have been idle
-- as long (queue:prune), so that neither grows with every worker name ever used.
--
-- stop() -> true ends the loop: no new read; a batch already read is decided, its sends
-- in flight finish (the trigger's own stop ends the rest: they wait in the outbox), and it
-- is acknowledged. Nothing read is left pending.
local decode = require("stella.core").decode_json

local ipairs, pairs, pcall, tostring, type = ipairs, pairs, pcall, tostring, type
local remove = table.remove

local M = {}

M.DEFAULTS = { batch = 100, lease = 30, max_deliveries = 5, block = 1, flush_every = 1, beat_every = 2,
                trim_every = 10, max_backoff = 2, prune_every = 60, forget_after = 86400, settle_grace = 5 }

local function now_s()
  local ok, socket = pcall(require, "socket")
  if ok and type(socket) == "table" and socket.gettime then return socket.gettime end
  return os.time
end
local clock = now_s()

local function sleep(seconds)
  local ok, socket = pcall(require, "socket")
  if ok and type(socket) == "table" and socket.sleep then socket.sleep(seconds) end
end

-- An error of Redis being away (rather than of a command): the connection's network
-- errors and the replies that say "not now" (LOADING, BUSY, ...).
local function away(err)
  return type(err) == "table" and (err.kind == "network" or (err.kind ~= "store" and err.retryable == true))
end

-- The outage tracker of a run: failures of one outage reported once, a backoff between
-- rounds while it lasts.
local function outages(o, warn, notice)
  local t = { down = nil, failures = 0, backoff = 0 }
  -- a failure of Redis or of the store (what): true when it belongs to an outage
  function t.failed(what, err)
    if not t.down and not away(err) then
      if err == nil or (type(err) == "table" and err.kind ~= "store") then return false end
      local ok, perr = o.queue:ping()   -- the store failed: is Redis there?
      if ok then return false end
      err = perr
    end
    t.failures = t.failures + 1
    if not t.down then
      t.down = clock()
      t.backoff = 0.1
      warn(("Redis unreachable (%s: %s); trying again, every %g s at most"):format(what, tostring(err), o.max_backoff))
    end
    return true
  end
  -- Redis answered: true when that ends an outage
  function t.reached()
    if not t.down then return false end
    notice(("Redis reachable again after %.1f s (%d failed calls)"):format(clock() - t.down, t.failures))
    t.down, t.failures = nil, 0
    return true
  end
  -- between rounds while Redis is away: the backoff, in slices that look at stop()
  function t.wait(stop)
    if not t.down then return end
    local till = clock() + t.backoff
    while not stop() and clock() < till do sleep(math.min(0.1, till - clock())) end
    t.backoff = math.min(t.backoff * 2, o.max_backoff)
  end
  return t
end

-- The decision failed for want of a store: try again later, not a verdict on the event.
local function retry_later(outcome)
  return type(outcome) ~= "table" or outcome.reason == "store_error"
end

local function message_of(outcome)
  local err = outcome.error
  if type(err) == "table" then err = err.message end
  return tostring(err or outcome.detail or outcome.reason or outcome.status)
end

-- Whether trigger:flush() has work: an outbox item due (its next_at passed: a retry, a
-- scheduled send, a dead run's lease over), or settles kept for the store to take.
-- When the outbox cannot be read: true (the flush says why).
local function flush_due(t)
  if t.unsettled_plans and #t.unsettled_plans > 0 then return true end
  local ok, items = pcall(t.store.outbox, t.store, "queued", 1)
  if not ok or type(items) ~= "table" then return true end
  return items[1] ~= nil and (items[1].next_at or 0) <= t.clock()
end

-- The entries of a round as events for the trigger: an entry delivered too often, or
-- malformed, goes to the dead-letter stream (report.dead). -> events, their entries | nil, err
local function prepare(o, entries, report)
  local q, name = o.queue, o.name
  local events, taken = {}, {}
  for _, e in ipairs(entries) do
    if e.deliveries > o.max_deliveries then
      local ok, err = q:bury(e, ("delivered %d times; last error: %s"):format(e.deliveries,
                                 tostring(e.last_error or "none noted (its worker died)")), name)
      if not ok then return nil, err end
      report.dead = report.dead + 1
    else
      local text = e.fields.event
      local event, derr
      if type(text) ~= "string" then derr = "the entry has no event field"
      else
        event, derr = decode(text)
        if type(derr) == "table" then
          derr = "invalid JSON" .. (derr.column and (" at column " .. derr.column) or "") .. ": " .. tostring(derr.message)
        end
      end
      if type(event) ~= "table" or (not derr and not text:find("^%s*{")) then
        local ok, err = q:bury(e, "malformed: " .. tostring(derr or "the event is not a JSON object"), name)
        if not ok then return nil, err end
        report.dead = report.dead + 1
      else
        events[#events + 1] = event
        taken[#taken + 1] = e
      end
    end
  end
  return events, taken
end

-- A batch the trigger could not process (it raised): its entries' error noted, for another try after the lease.
local function not_processed(o, taken, err, report)
  local ids = {}
  for i, e in ipairs(taken) do ids[i] = e.id end
  o.queue:note_error(ids, err)
  report.retried = report.retried + #ids
end

-- A batch decided, sent and settled: each entry acknowledged, dead-lettered (invalid) or
-- left for another try (store_error). -> report | nil, err
local function conclude(o, taken, outcomes, report)
  local q, name = o.queue, o.name
  local acks, later, later_err = {}, {}, nil
  for i, e in ipairs(taken) do
    local out = outcomes[i]
    if retry_later(out) then
      later[#later + 1] = e.id
      later_err = type(out) == "table" and message_of(out) or "no outcome"
    elseif out.status == "invalid" then
      -- decided (the ledger has it) and dead-lettered, so that it is seen with its reason
      local bok, berr = q:bury(e, "invalid: " .. message_of(out), name)
      if not bok then return nil, berr end
      report.dead = report.dead + 1
    else
      acks[#acks + 1] = e.id
    end
    if type(out) == "table" then
      local key = tostring(out.status) .. "/" .. tostring(out.reason or "")
      report.outcomes[key] = (report.outcomes[key] or 0) + 1
      if o.on_outcome then o.on_outcome(out) end
    end
  end
  if #later > 0 then
    q:note_error(later, later_err)
    report.retried = report.retried + #later
  end
  local aok, aerr = q:ack(acks)
  if not aok then return nil, aerr end
  report.acked = report.acked + #acks
  return report
end

-- Processes entries in one go: decided, sent and settled (trigger:process_many), then
-- acknowledged, dead-lettered or left for another try. The in-nginx consumers' way
-- (stella.openresty.redis_queue), so that an entry is handled alike whoever reads it.
-- o: { queue, trigger, name, max_deliveries, on_outcome (optional: each decided event's
-- outcome) }. Returns the round's report { read, acked, dead, retried, outcomes =
-- { status/reason -> n } } | nil, err
function M.process(o, entries, report)
  local events, taken = prepare(o, entries, report)
  if not events then return nil, taken end
  if #events == 0 then return report end
  local ok, outcomes = pcall(o.trigger.process_many, o.trigger, events)
  if not ok then
    not_processed(o, taken, outcomes, report)
    return report
  end
  return conclude(o, taken, outcomes, report)
end

-- Runs until stop(). Returns { rounds, read, acked, dead, retried, flushed, outcomes, errors, outages }.
-- The batches go through the trigger's pipeline (trigger:pipeline): while one batch's
-- requests are on the wire (every connection busy), the next is read (without blocking)
-- and decided, then its sends start as soon as the previous batch's end, and the previous
-- batch is settled and acknowledged meanwhile. Nothing new to read: the batch on the wire
-- is completed before the worker blocks on the stream; the same before a flush that has
-- something due (it sends with the same connections) and at the end. So up to two
-- batches are pending (unacknowledged) at once: the one on the wire and the next.
function M.run(o)
  for k, v in pairs(M.DEFAULTS) do if o[k] == nil then o[k] = v end end
  local q, t, name, stop = o.queue, o.trigger, o.name, o.stop or function() return false end
  local time = o.clock or clock   -- when to beat, reclaim, flush and trim (a spec's clock: the trigger's)
  local total = { rounds = 0, read = 0, acked = 0, dead = 0, retried = 0, flushed = 0, errors = 0, outages = 0,
                  outcomes = {} }
  local info = { state = "running", started = os.time(), pid = o.pid, host = o.host }
  local last_beat, last_flush, last_reclaim, last_trim = -math.huge, -math.huge, -math.huge, time()
  local last_prune = -math.huge
  local function warn(msg) total.errors = total.errors + 1 if o.on_error then o.on_error(msg) end end
  local function notice(msg) if o.on_notice then o.on_notice(msg) end end
  local trouble = outages(o, function(msg) total.outages = total.outages + 1 warn(msg) end, notice)
  -- a failure: part of an outage (reported once), else reported as it is
  local function failed(what, err)
    if not trouble.failed(what, err) then warn(what .. ": " .. tostring(err)) end
  end
  local function account(report)
    total.rounds = total.rounds + 1
    for _, k in ipairs{ "acked", "dead", "retried" } do total[k] = total[k] + report[k] end
    for k, n in pairs(report.outcomes) do total.outcomes[k] = (total.outcomes[k] or 0) + n end
    if o.on_batch then o.on_batch(report) end
  end
  -- a batch in the pipeline: { taken = entries, report = report, outcomes = set once settled }
  local pipe = t:pipeline(function(outcomes, _, b) b.outcomes = outcomes end)
  local held = {}   -- batches given to the pipeline, oldest first, not yet acknowledged
  -- acknowledges the batches the pipeline has completed (all of them, `all`: after a
  -- failure, the ones it did not complete have their error noted)
  local function conclude_held(all, err)
    while held[1] and (held[1].outcomes or all) do
      local b = remove(held, 1)
      if b.outcomes then
        local res, cerr = conclude(o, b.taken, b.outcomes, b.report)
        if not res then failed("redis", cerr) end
      else
        not_processed(o, b.taken, err or "the batch was not completed", b.report)
      end
      account(b.report)
    end
  end
  -- completes the batch on the wire (cause: why, when a batch failed)
  local function drain(cause)
    if #held == 0 then return end
    local ok, err = pcall(pipe.finish, pipe)
    if not ok then warn("batch: " .. tostring(err)) end
    conclude_held(true, not ok and err or cause)
  end
  -- requests due again (retries, scheduled sends, a dead worker's leased ones), sent with
  -- the same connections: the batch on the wire is completed first
  local function flush()
    drain()
    local ok, summary, ferr = pcall(t.flush, t)
    if not ok then warn("flush: " .. tostring(summary))
    elseif not summary then failed("flush", ferr)
    else total.flushed = total.flushed + (summary.sent or 0) end
    last_flush = time()
  end
  while not stop() do
    local now = time()
    if now - last_beat >= o.beat_every then
      info.processed = total.read
      local ok, berr = q:beat(name, info)
      if not ok then failed("heartbeat", berr) end
      last_beat = now
    end
    local entries, err
    -- a dead consumer's entries first (looked for every half lease)
    if now - last_reclaim >= o.lease / 2 then
      entries, err = q:reclaim(name, o.lease * 1000, o.batch)
      last_reclaim = now
      if entries and #entries == o.batch then last_reclaim = -math.huge end   -- more may wait
      if err then last_reclaim = -math.huge end                              -- again once Redis is back
    end
    if not err and (not entries or #entries == 0) and not stop() then
      -- a batch on the wire: no waiting for new entries (it is completed first, below)
      entries, err = q:read(name, o.batch, #held == 0 and o.block * 1000 or 0)
    end
    if err then
      drain()
      if not trouble.failed("read", err) then
        warn("redis: " .. tostring(err))
        sleep(o.block)   -- a command refused: not in a loop
      end
    else
      -- back after an outage: flush first, so that the settles Redis missed are written
      -- (the flush's reconcile) before the outbox lease lets another worker send them
      if trouble.reached() and not stop() then flush() end
      if entries and #entries > 0 then
        total.read = total.read + #entries
        local report = { read = #entries, acked = 0, dead = 0, retried = 0, outcomes = {} }
        local events, taken = prepare(o, entries, report)
        if not events then
          failed("redis", taken)
          account(report)
        elseif #events == 0 then
          account(report)
        else
          local b = { taken = taken, report = report }
          held[#held + 1] = b
          -- decides b and starts its sends; completes (settles) the batch before it
          local ok, perr = pcall(pipe.process, pipe, events, b)
          if ok then
            conclude_held(false)
          else
            warn("batch: " .. tostring(perr))
            drain(perr)
          end
        end
      else
        drain()   -- nothing new: the batch on the wire completed, acknowledged
      end
    end
    -- requests due again; with a batch on the wire, only when the outbox has one
    -- (completing the batch first would leave the connections idle while the next is
    -- read and decided)
    if not stop() and not trouble.down and time() - last_flush >= o.flush_every then
      if #held == 0 or flush_due(t) then flush() else last_flush = time() end
    end
    if not trouble.down and time() - last_trim >= o.trim_every then
      q:trim()   -- done entries out of the stream (failure: the next time)
      last_trim = time()
    end
    if not trouble.down and time() - last_prune >= o.prune_every then
      q:prune(os.time(), o.forget_after)   -- workers silent for forget_after out (failure: the next time)
      last_prune = time()
    end
    trouble.wait(stop)
  end
  drain()   -- the batch on the wire completed and acknowledged (or noted) first
  -- settles Redis missed (requests sent while it was away), written before leaving: for
  -- at most settle_grace seconds (a second signal ends the process at once)
  local kept = t.unsettled and t:unsettled() or 0
  if kept > 0 then
    local till = clock() + o.settle_grace
    while true do
      pcall(t.settle_kept, t)
      local left = t:unsettled()
      if left == 0 or clock() >= till then
        if left == 0 then notice(("settled %d request(s) sent while Redis was away"):format(kept))
        else notice(("%d request(s) sent while Redis was away left unsettled: the outbox sends them again "
          .. "after their lease"):format(left)) end
        break
      end
      sleep(0.2)
    end
  end
  info.state, info.processed = "stopped", total.read
  q:beat(name, info)
  return total
end

return M
