-- stella.cli.status: `stella status`, a status page from the local store: outcomes by
-- reason, the error rate per hour, the outbox, the latest invalid and failed events.
local error, ipairs, pairs, pcall, setmetatable, tostring, type = error, ipairs, pairs, pcall, setmetatable, tostring, type
local sort = table.sort
local floor = math.floor
local args = require "stella.cli.args"
local setup = require "stella.cli.setup"
local tables = require "stella.cli.table"
local retention = require "stella.trigger.retention"
local trigger_rows = require "stella.trigger.rows"

local M = {}

M.help = [[
usage: stella status [--db FILE|URL] [--since DURATION] [--json]

A local status page from the store: outcomes by reason, the error rate per hour (the
service alerts above 5% in an hour), what the outbox holds, the latest invalid and
failed events with their messages, and the retention window of the last purge.

  --db FILE|URL     the store (default $STELLA_DB, else stella.db; redis://... a Redis store)
  --since DURATION  how far back: 90m, 24h, 7d, 2w (default 24h)
  --json            the same as one JSON object (fields: see README, "Machine-readable output")
]]

-- its options: "flag" or "value"
M.options = args.with_output{ db = "value", since = "value" }

-- A store call's answer, or raise its error: a damaged or unreadable store must fail the
-- command loudly, never print as an empty one.
local function need(value, err)
  if value == nil then error(tostring(err or "the store gave no answer"), 0) end
  return value
end

local function fmt_time(t)
  if type(t) ~= "number" then return tostring(t) end
  return os.date("%Y-%m-%d %H:%M:%S", floor(t))
end

-- The retention window of the last purge and what it deleted (the trigger's meta), or nil.
local function last_purge(store)
  return retention.parse_meta(store:get_meta("retention"))
end

-- The queued items looked at to tell scheduled, due, retrying and in-flight ones apart
-- (the outbox is listed, not counted: it holds what waits for a send, normally little).
M.SCAN_LIMIT = 10000

-- What the outbox holds at `now`: { queued, dead, due, scheduled, retrying, in_flight,
-- next_due, next_scheduled, oldest, scanned }. due: next_at <= now; scheduled: a rules'
-- delay or quiet hours not yet over; retrying: waiting out a backoff after a failed try;
-- in_flight: leased by a run sending it now. next_due: the earliest next_at after now;
-- oldest: the earliest created_at (nil when empty).
function M.outbox(store, now)
  local counts = need(store:outbox_counts())
  local o = { queued = counts.queued or 0, dead = counts.dead or 0, due = 0, scheduled = 0,
              retrying = 0, in_flight = 0, scanned = 0 }
  if o.queued == 0 then return o end
  local items = need(store:outbox("queued", M.SCAN_LIMIT))
  o.scanned = #items
  for _, item in ipairs(items) do
    local at = item.next_at or now
    if at <= now then
      o.due = o.due + 1
    else
      if not o.next_due or at < o.next_due then o.next_due = at end
      if trigger_rows.is_scheduled(item) then
        o.scheduled = o.scheduled + 1
        if not o.next_scheduled or at < o.next_scheduled then o.next_scheduled = at end
      elseif (item.attempts or 0) > 0 then
        o.retrying = o.retrying + 1
      else
        o.in_flight = o.in_flight + 1
      end
    end
    if item.created_at and (not o.oldest or item.created_at < o.oldest) then o.oldest = item.created_at end
  end
  return o
end

-- The alert threshold the status compares each hour's error rate with (the service
-- alerts above 5% in an hour; a rules file's alert.threshold when given).
M.THRESHOLD = 0.05

-- Everything `stella status` shows, as plain values (nil for absent), read from the store
-- at `now` over the `window` seconds before it; raises on a store error. Also what
-- `stella dashboard` serves (with o.detail: the timeline, the dead items).
--   o = { now, window, threshold, latest = 10, detail, bucket = 3600, dead = 20 }
function M.collect(store, o)
  local now, window = o.now, o.window
  local since = now - window
  local threshold = o.threshold or M.THRESHOLD
  local st = { since = since, now = now, window = window, threshold = threshold }
  local counts, total = {}, 0
  for _, c in ipairs(need(store:counts{ since = since })) do
    counts[#counts + 1] = { status = tostring(c.status), reason = c.reason, count = c.count }
    total = total + c.count
  end
  st.counts, st.total = counts, total
  local rate, alert = {}, false
  for _, r in ipairs(need(store:rate{ since = since, bucket = 3600 })) do
    local t, e = r.total or 0, r.errors or 0
    local share = t > 0 and e / t or 0
    if share > threshold then alert = true end
    rate[#rate + 1] = { start = r.start, total = t, errors = e, rate = share }
  end
  st.rate, st.alert = rate, alert
  st.outbox = M.outbox(store, now)
  local latest = {}
  local n = o.latest or 10
  for _, status in ipairs{ "invalid", "failed" } do
    for _, e in ipairs(need(store:ledger{ since = since, status = status, limit = n })) do latest[#latest + 1] = e end
  end
  sort(latest, function(a, b) return (a.time or 0) > (b.time or 0) end)
  local events = {}
  for i = 1, math.min(n, #latest) do
    local e = latest[i]
    local id = e.event_id or e.interaction_id
    events[i] = { time = e.time, status = tostring(e.status), event_id = id ~= nil and tostring(id) or nil,
                  reason = e.reason, error_kind = e.error_kind,
                  message = tostring(e.error_message or e.detail or e.reason or "") }
  end
  st.latest = events
  st.retention = last_purge(store)
  if o.detail then
    local bucket = o.bucket or 3600
    st.bucket = bucket
    st.timeline = need(store:timeline{ since = since, bucket = bucket })
    local dead = {}
    for i, item in ipairs(need(store:outbox("dead", o.dead or 20))) do
      dead[i] = { id = item.id, event_id = item.event_id, brand = item.brand, attempts = item.attempts,
                  created_at = item.created_at, died_at = item.died_at, error = item.last_error }
    end
    st.dead = dead
  end
  return st
end

-- A status object as JSON values: nil fields become null, lists stay lists.
function M.to_json(st, extra)
  local cjson = require "cjson.safe"
  local null = cjson.null
  local array = require("stella.cli.output").array
  local function v(x) if x == nil then return null end return x end
  local counts = array{}
  for i, c in ipairs(st.counts) do counts[i] = { status = c.status, reason = v(c.reason), count = c.count } end
  local rate = array{}
  for i, r in ipairs(st.rate) do rate[i] = { start = r.start, total = r.total, errors = r.errors, rate = r.rate } end
  local latest = array{}
  for i, e in ipairs(st.latest) do
    latest[i] = { time = v(e.time), status = e.status, event_id = v(e.event_id), reason = v(e.reason),
                  error_kind = v(e.error_kind), message = e.message }
  end
  local ob = st.outbox
  local out = { since = st.since, now = st.now, window = st.window, threshold = st.threshold,
    counts = counts, total = st.total, rate = rate, alert = st.alert, latest = latest,
    outbox = { queued = ob.queued, dead = ob.dead, due = ob.due, scheduled = ob.scheduled,
               retrying = ob.retrying, in_flight = ob.in_flight, next_due = v(ob.next_due),
               next_scheduled = v(ob.next_scheduled), oldest = v(ob.oldest) } }
  if st.timeline then
    local tl = array{}
    for i, g in ipairs(st.timeline) do tl[i] = { start = g.start, status = g.status, reason = v(g.reason), count = g.count } end
    local dead = array{}
    for i, d in ipairs(st.dead) do
      dead[i] = { id = d.id, event_id = v(d.event_id), brand = v(d.brand), attempts = v(d.attempts),
                  created_at = v(d.created_at), died_at = v(d.died_at), error = v(d.error) }
    end
    out.bucket, out.timeline, out.dead = st.bucket, tl, dead
  end
  local purge = st.retention
  if purge then
    out.retention = { days = purge.days == math.huge and "forever" or purge.days, last_purge = purge.at,
                      ledger = purge.ledger, dead = purge.dead }
  end
  for k, x in pairs(extra or {}) do out[k] = x end
  return out
end

-- --json: the same data as one object
function M.json(ctx, store, db, since, window, queue, limits)
  local output = require "stella.cli.output"
  local st = M.collect(store, { now = since + window, window = window })
  local extra = { command = "status", db = db }
  if queue ~= nil then extra.queue = require("stella.cli.queue_status").to_json(queue or nil) end
  if limits ~= nil then extra.rate_limits = require("stella.cli.queue_status").rate_to_json(limits) end
  ctx:say("%s", output.encode(M.to_json(st, extra)))
end

function M.run(ctx, opts, positional)
  if #positional > 0 then return ctx:usage_error("status", "unexpected argument %s", positional[1]) end
  local mode, merr = args.output_mode(opts, false)
  if merr then return ctx:usage_error("status", "%s", merr) end
  local window = args.parse_duration(opts.since or "24h")
  if not window then
    return ctx:usage_error("status", "--since takes a duration like 90m, 24h or 7d, not %s", opts.since)
  end
  local db = setup.db(ctx, opts)
  local store, serr = setup.open_store(db, { must_exist = true })
  if not store then ctx:warn("stella status: %s", serr) return 1 end
  local now = ctx.time()
  local since = now - window

  local ok, err = pcall(function()
    -- a Redis store: the work queue too (stella.cli.queue_status); false: none in use
    local queue = setup.is_url(db) and (require("stella.cli.queue_status").collect(db, now) or false) or nil
    -- and the fleet's rate limits (stella.rate_limit)
    local limits = setup.is_url(db) and require("stella.cli.queue_status").collect_rate(db) or nil
    if mode == "json" then return M.json(ctx, store, setup.label(db), since, window, queue, limits) end
    ctx:say("stella status: %s, since %s (%s)", setup.label(db), fmt_time(since), opts.since or "24h")
    ctx:say("")

    local rows, total = tables.outcome_rows(need(store:counts{ since = since }))
    if #rows == 0 then
      ctx:say("no events")
    else
      rows[#rows + 1] = { "total", "", tostring(total) }
      tables.print(ctx, { "outcome", "reason", "count" }, rows, { [3] = true })
    end
    ctx:say("")

    ctx:say("error rate per hour")
    local rate = need(store:rate{ since = since, bucket = 3600 })
    if #rate == 0 then
      ctx:say("no requests")
    else
      local rrows, alert = {}, false
      for _, r in ipairs(rate) do
        local pct = (r.total or 0) > 0 and (r.errors or 0) * 100 / r.total or 0
        local mark = pct > 5 and "!" or ""
        if pct > 5 then alert = true end
        rrows[#rrows + 1] = { os.date("%Y-%m-%d %H:%M", floor(r.start)), tostring(r.total or 0),
                              tostring(r.errors or 0), ("%.1f%%"):format(pct), mark }
      end
      tables.print(ctx, { "hour", "total", "errors", "rate", "" }, rrows,
                  { [2] = true, [3] = true, [4] = true })
      if alert then ctx:say("! more than 5% errors in the hour: the service e-mails an alert") end
    end
    ctx:say("")

    local ob = M.outbox(store, now)
    ctx:say("outbox: %d queued, %d dead", ob.queued, ob.dead)
    if ob.queued > 0 then
      local parts = { ("%d due now"):format(ob.due) }
      if ob.scheduled > 0 then
        parts[#parts + 1] = ("%d scheduled (the next at %s)"):format(ob.scheduled, fmt_time(ob.next_scheduled))
      end
      if ob.retrying > 0 then parts[#parts + 1] = ("%d waiting out a backoff"):format(ob.retrying) end
      if ob.in_flight > 0 then parts[#parts + 1] = ("%d being sent"):format(ob.in_flight) end
      ctx:say("  %s; the oldest queued at %s%s", table.concat(parts, ", "), fmt_time(ob.oldest),
        ob.scanned < ob.queued and (" (of the first %d looked at)"):format(ob.scanned) or "")
    end
    if queue then require("stella.cli.queue_status").print(ctx, queue) end
    if limits then require("stella.cli.queue_status").print_rate(ctx, limits) end
    local purge = last_purge(store)
    if purge then
      ctx:say("retention: %s; last purge %s: %d ledger entr%s, %d dead item%s", setup.days_text(purge.days),
        fmt_time(purge.at), purge.ledger, purge.ledger == 1 and "y" or "ies", purge.dead, purge.dead == 1 and "" or "s")
    else
      ctx:say("retention: not purged yet")
    end
    ctx:say("")

    local latest = {}
    for _, st in ipairs{ "invalid", "failed" } do
      for _, e in ipairs(need(store:ledger{ since = since, status = st, limit = 10 })) do
        latest[#latest + 1] = e
      end
    end
    sort(latest, function(a, b) return (a.time or 0) > (b.time or 0) end)
    ctx:say("latest invalid and failed events")
    if #latest == 0 then
      ctx:say("none")
    else
      local lrows = {}
      for i = 1, math.min(10, #latest) do
        local e = latest[i]
        local msg = e.error_message or e.detail or e.reason or ""
        if e.error_kind then msg = e.error_kind .. ": " .. msg end
        msg = tostring(msg):gsub("%s+", " ")
        if #msg > 160 then msg = msg:sub(1, 157) .. "..." end
        lrows[i] = { fmt_time(e.time), tostring(e.status), tostring(e.event_id or e.interaction_id or "-"), msg }
      end
      tables.print(ctx, { "time", "outcome", "event", "message" }, lrows)
    end
  end)
  store:close()
  if not ok then ctx:warn("stella status: %s", tostring(err)) return 1 end
  return 0
end

return M
