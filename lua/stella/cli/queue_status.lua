-- stella.cli.queue_status: the work queue's part of `stella status` on a Redis --db
-- (stella.queue: the stream, the consumer group, the dead letters, the workers'
-- heartbeats), as text and as the "queue" field of --json.
local error, ipairs, tostring = error, ipairs, tostring

local output = require "stella.cli.output"

local M = {}

-- The queue's status at now, or nil (no stream and no worker ever: no queue in use), or
-- raises a Redis error.
function M.collect(db, now)
  local q, err = require("stella.queue").open(db)
  if not q then error(err, 0) end
  local st, serr = q:status(now)
  q:close()
  if not st then error(serr, 0) end
  return M.in_use(st) and st or nil
end

-- Is a queue in use: a stream, a dead letter, a worker or a consumer.
function M.in_use(st)
  return not (st.length == 0 and st.dead == 0 and #st.workers == 0 and #st.consumers == 0)
end

-- The status as JSON values (README, "Work queue"): nil -> null.
function M.to_json(st)
  local cjson = require "cjson.safe"
  local null = cjson.null
  if not st then return null end
  local function v(x) if x == nil then return null end return x end
  local consumers, workers = output.array(), output.array()
  for i, c in ipairs(st.consumers) do consumers[i] = { name = c.name, pending = c.pending, idle = c.idle } end
  for i, w in ipairs(st.workers) do
    workers[i] = { name = w.name, state = w.state, heartbeat = w.beat, age = w.age, pid = v(w.pid), host = v(w.host),
                   started = v(w.started), processed = v(w.processed) }
  end
  return { group = st.group, length = st.length, pending = st.pending, lag = v(st.lag), oldest = v(st.oldest),
           dead = st.dead, consumers = consumers, workers = workers }
end

M.DASHBOARD_DEAD = 20   -- the dead letters the dashboard lists, newest first

-- The dashboard's sources (stella.dashboard.new{ sources = ... }) for a Redis --db:
-- queue(now) is `stella status --json`'s "queue" with depth (the lag) and dead_letters
-- (the newest 20: { id, time, entry, deliveries, worker, reason }); workers(now) its
-- workers, each with its consumer's pending count and busy (live). Both nil when no
-- queue is in use. One read of Redis for both: queue(now) takes the read of the
-- workers(now) call just before it (a dashboard request calls both), else reads.
function M.sources(db)
  local queue = require "stella.queue"
  local cjson = require "cjson.safe"
  local function read(now)
    local q = queue.open(db)
    if not q then return nil end
    local st = q:status(now)
    if st and not M.in_use(st) then st = nil end   -- null, as in `stella status --json`
    local dead = st and q:dead(M.DASHBOARD_DEAD, true)
    q:close()
    return { at = now, st = st, dead = dead }
  end
  local kept   -- the workers' read, for the queue call of the same request (and now)
  return {
    workers = function(now)
      kept = read(now)
      local s = kept and kept.st
      if not s then return nil end
      local pending = {}
      for _, c in ipairs(s.consumers) do pending[c.name] = c.pending end
      local list = M.to_json(s).workers
      for _, w in ipairs(list) do
        w.busy, w.pending = w.state == "live", pending[w.name] or 0
      end
      return list
    end,
    queue = function(now)
      local r = kept
      kept = nil
      if not (r and r.at == now) then r = read(now) end
      local s = r and r.st
      if not s then return nil end
      local obj = M.to_json(s)
      obj.depth = obj.lag
      local letters = output.array()
      for i, l in ipairs(r.dead or {}) do
        letters[i] = { id = l.id, time = l.time or cjson.null, entry = l.entry or cjson.null,
                       deliveries = l.deliveries or cjson.null, worker = l.worker or cjson.null, reason = l.reason or "" }
      end
      obj.dead_letters = letters
      return obj
    end,
  }
end

-- The rate limits in use on a Redis --db (stella.rate_limit: the keys senders used within
-- the hour, by their id, never the key), or raises a Redis error.
function M.collect_rate(db)
  local limiter, err = require("stella.rate_limit").open(db)
  if not limiter then error(err, 0) end
  local list, serr = limiter:status()
  limiter:close()
  if not list then error(serr, 0) end
  return list
end

-- The rate limits as JSON values: [{ key_id, label, per_second (null: pause only), burst,
-- paused (seconds left, 0: none), pauses, backlog, seen }]
function M.rate_to_json(list)
  local cjson = require "cjson.safe"
  local out = output.array()
  for i, r in ipairs(list or {}) do
    out[i] = { key_id = r.id, label = r.label, per_second = r.rate == nil and cjson.null or r.rate, burst = r.burst,
               paused = r.paused, pauses = r.pauses, backlog = r.backlog, seen = r.seen }
  end
  return out
end

function M.print_rate(ctx, list)
  for _, r in ipairs(list or {}) do
    ctx:say("rate limit %s (key %s): %s, burst %d; %s; %d pause%s after a 429; last used %.0f s ago",
      r.label, r.id, r.rate and ("%g/s"):format(r.rate) or "no rate (pause on 429 only)", r.burst,
      r.paused > 0 and ("paused for %.1f s more"):format(r.paused)
        or (r.backlog > 0 and ("slots taken %.2f s ahead"):format(r.backlog) or "not paused"),
      r.pauses, r.pauses == 1 and "" or "s", r.seen)
  end
end

local function fmt_time(t) return t and os.date("%Y-%m-%d %H:%M:%S", math.floor(t)) or "-" end

function M.print(ctx, st)
  if not st then return end
  ctx:say("work queue: %d waiting (lag), %d being processed (pending), %d dead letters; the oldest not done from %s",
    st.lag or st.length, st.pending, st.dead, fmt_time(st.oldest))
  for _, c in ipairs(st.consumers) do
    ctx:say("  consumer %s: %d pending, idle %.1f s", c.name, c.pending, c.idle)
  end
  for _, w in ipairs(st.workers) do
    ctx:say("  worker %s: %s, last heartbeat %s (%d s ago)%s", w.name, w.state, fmt_time(w.beat), w.age,
      w.pid and (", pid " .. tostring(w.pid) .. (w.host and (" on " .. w.host) or "")) or "")
  end
end

return M
