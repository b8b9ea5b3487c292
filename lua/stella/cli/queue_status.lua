-- stella.cli.queue_status: the work queue's part of `stella status` on a Redis --db
-- (stella.queue: the stream, the consumer group, the dead letters, the workers'
-- heartbeats), as text and as the "queue" field of --json.
local error, ipairs, setmetatable, tostring = error, ipairs, setmetatable, tostring

local M = {}

-- The queue's status at now, or nil (no stream and no worker ever: no queue in use), or
-- raises a Redis error.
function M.collect(db, now)
  local q, err = require("stella.queue").open(db)
  if not q then error(err, 0) end
  local st, serr = q:status(now)
  q:close()
  if not st then error(serr, 0) end
  if st.length == 0 and st.dead == 0 and #st.workers == 0 and #st.consumers == 0 then return nil end
  return st
end

-- The status as JSON values (README, "Work queue"): nil -> null.
function M.to_json(st)
  local cjson = require "cjson.safe"
  local null = cjson.null
  if not st then return null end
  local function v(x) if x == nil then return null end return x end
  local consumers, workers = setmetatable({}, cjson.array_mt), setmetatable({}, cjson.array_mt)
  for i, c in ipairs(st.consumers) do consumers[i] = { name = c.name, pending = c.pending, idle = c.idle } end
  for i, w in ipairs(st.workers) do
    workers[i] = { name = w.name, state = w.state, heartbeat = w.beat, age = w.age, pid = v(w.pid), host = v(w.host),
                   started = v(w.started) }
  end
  return { group = st.group, length = st.length, pending = st.pending, lag = v(st.lag), oldest = v(st.oldest),
           dead = st.dead, consumers = consumers, workers = workers }
end

-- The dashboard's sources (stella.dashboard.new{ sources = ... }) for a Redis --db.
function M.sources(db)
  local queue = require "stella.queue"
  local function status(now)
    local q = queue.open(db)
    if not q then return nil end
    local st = q:status(now)
    q:close()
    return st
  end
  return {
    workers = function(now)
      local st = status(now)
      if not st then return nil end
      local list = {}
      for i, w in ipairs(st.workers) do
        list[i] = { name = w.name, host = w.host, pid = w.pid, heartbeat = w.beat, busy = w.state == "live",
                    processed = w.processed, state = w.state }
      end
      return list
    end,
    queue = function(now)
      local st = status(now)
      if not st then return nil end
      return { depth = st.lag, pending = st.pending, oldest = st.oldest, dead = st.dead }
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
  local out = setmetatable({}, cjson.array_mt)
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
