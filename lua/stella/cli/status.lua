-- stella.cli.status: `stella status`, a status page from the local store: outcomes by
-- reason, the error rate per hour, the outbox, the latest invalid and failed events.
local ipairs, pcall, setmetatable, tostring, type = ipairs, pcall, setmetatable, tostring, type
local sort = table.sort
local floor = math.floor
local args = require "stella.cli.args"
local setup = require "stella.cli.setup"
local tables = require "stella.cli.table"
local retention = require "stella.trigger.retention"

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

-- --json: the same data as one object
function M.json(ctx, store, db, since, window)
  local cjson = require "cjson.safe"
  local output = require "stella.cli.output"
  local function array(t) return setmetatable(t, cjson.array_mt) end
  local counts, total = array{}, 0
  for _, c in ipairs(store:counts{ since = since } or {}) do
    counts[#counts + 1] = { status = tostring(c.status), reason = c.reason or cjson.null, count = c.count }
    total = total + c.count
  end
  local rate, alert = array{}, false
  for _, r in ipairs(store:rate{ since = since, bucket = 3600 } or {}) do
    local t, e = r.total or 0, r.errors or 0
    local share = t > 0 and e / t or 0
    if share > 0.05 then alert = true end
    rate[#rate + 1] = { start = r.start, total = t, errors = e, rate = share }
  end
  local oc = store:outbox_counts() or {}
  local latest = {}
  for _, st in ipairs{ "invalid", "failed" } do
    for _, e in ipairs(store:ledger{ since = since, status = st, limit = 10 } or {}) do latest[#latest + 1] = e end
  end
  sort(latest, function(a, b) return (a.time or 0) > (b.time or 0) end)
  local events = array{}
  for i = 1, math.min(10, #latest) do
    local e = latest[i]
    local id = e.event_id or e.interaction_id
    events[i] = { time = e.time or cjson.null, status = tostring(e.status), event_id = id ~= nil and tostring(id) or cjson.null,
                  reason = e.reason or cjson.null, error_kind = e.error_kind or cjson.null,
                  message = tostring(e.error_message or e.detail or e.reason or "") }
  end
  local purge = last_purge(store)
  ctx:say("%s", output.encode{ command = "status", db = db, since = since, window = window, now = since + window,
    counts = counts, total = total, rate = rate, alert = alert,
    outbox = { queued = oc.queued or 0, dead = oc.dead or 0 }, latest = events,
    retention = purge and { days = purge.days == math.huge and "forever" or purge.days, last_purge = purge.at,
                            ledger = purge.ledger, dead = purge.dead } or nil })
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
    if mode == "json" then return M.json(ctx, store, setup.label(db), since, window) end
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

    local oc = need(store:outbox_counts())
    ctx:say("outbox: %d queued, %d dead", oc.queued or 0, oc.dead or 0)
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
