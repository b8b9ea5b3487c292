-- stella.sandbox.status: the sandbox's API status, as data (GET /status.json) and as a
-- self-contained HTML page (GET /status). Runs inside nginx; reads two shared dicts
-- (logs, counts) through their get method only.
--
-- What the sandbox keeps (see stella.sandbox.server, which writes it):
--   counts  q:invalid, q:test, q:production   rows logged per tab (also the totals)
--           d:MODE:DELIVERY                    accepted requests by key mode and delivery
--           e:LABEL                            invalid requests by error label
--           m:MINUTE, x:MINUTE                 calls and errors per minute (25 hours)
--           auth                               calls refused with 403
--           seed                               the key of the request ids
--   logs    l:TAB:SLOT, r:TAB:SLOT             the rows, a ring of log_limit per tab (r: the
--                                              body of a request's row, see M.row)
--
-- GET /status.json (?limit=N: at most N rows per tab):
--   company, test_email, generated_at (epoch seconds), threshold (0.05)
--   counts      { total, invalid, test, delivered, auth_failures }
--   deliveries  { test = { test_inbox, suppressed, unsubscribed, do_not_send },
--                 production = { customer, suppressed, unsubscribed, do_not_send } }
--   errors      [ { label, count } ]  processing labels, and "schema:CODE" per schema code
--   last_hour   { total, errors, rate, since }   the 60 minutes up to now
--   hours       [ { start, total, errors, rate, over } ]   clock hours of the last 24, newest first
--   alert       { active, message }   active: more than 5% of the last hour's calls errored
--   invalid     [ { time, mode, call, error | errors, body } ]          newest first
--   test, delivered  [ { time, request_id, mode, call, delivery, to, until, original,
--                        request } ]                                    newest first
local cjson = require "cjson.safe"

local concat, sort = table.concat, table.sort
local floor, min = math.floor, math.min
local fmt, date = string.format, os.date
local ipairs, pairs, tostring, type = ipairs, pairs, tostring, type

local M = {}

M.ALERT_THRESHOLD = 0.05     -- the service alerts when more than 5% of an hour's requests error
M.TABS = {
  { id = "invalid", title = "Invalid Requests", queue = "q:invalid" },
  { id = "test", title = "Test Requests", queue = "q:test" },
  { id = "delivered", title = "Delivered", queue = "q:production" },
}
M.DELIVERIES = { "test_inbox", "customer", "suppressed", "unsubscribed", "do_not_send" }
local MODE_DELIVERIES = {
  test = { "test_inbox", "suppressed", "unsubscribed", "do_not_send" },
  production = { "customer", "suppressed", "unsubscribed", "do_not_send" },
}

local HOUR, DAY_HOURS = 3600, 24

---------------------------------------------------------------------------
-- Data
---------------------------------------------------------------------------

-- The JSON text of the row in slot "TAB:N", or nil. A request's row is kept in two parts
-- (l:SLOT its start, r:SLOT its body; see put_row in stella.sandbox.server).
function M.row(logs, slot)
  local row = logs:get("l:" .. slot)
  if not row then return nil end
  local body = logs:get("r:" .. slot)
  if body then return row .. body .. "}" end
  return row
end
local row_text = M.row

-- The newest `limit` rows of a tab, newest first, as JSON texts.
local function rows(logs, counts, queue, tab, log_limit, limit)
  local n = counts:get(queue) or 0
  local out = {}
  local last = n - min(n, log_limit, limit or log_limit) + 1
  for seq = n, last, -1 do
    local row = row_text(logs, tab .. ":" .. (seq % log_limit))
    if row then out[#out + 1] = row end
  end
  return out, n
end

-- Everything but the rows: counts, deliveries, errors, rates and the alert.
function M.summary(conf, logs, counts, now)
  local s = {
    company = conf.company,
    test_email = conf.test_email,
    generated_at = now,
    threshold = M.ALERT_THRESHOLD,
  }
  local c = {
    invalid = counts:get("q:invalid") or 0,
    test = counts:get("q:test") or 0,
    delivered = counts:get("q:production") or 0,
    auth_failures = counts:get("auth") or 0,
  }
  c.total = c.invalid + c.test + c.delivered
  s.counts = c

  local deliveries = { test = {}, production = {} }
  for mode, t in pairs(deliveries) do
    for _, d in ipairs(MODE_DELIVERIES[mode]) do t[d] = counts:get("d:" .. mode .. ":" .. d) or 0 end
  end
  s.deliveries = deliveries

  local errors = {}
  for label, _ in pairs(conf.error_labels or {}) do
    local n = counts:get("e:" .. label)
    if n and n > 0 then errors[#errors + 1] = { label = label, count = n } end
  end
  for _, key in ipairs(counts.get_keys and counts:get_keys(0) or {}) do
    if key:sub(1, 9) == "e:schema:" then
      errors[#errors + 1] = { label = key:sub(3), count = counts:get(key) or 0 }
    end
  end
  sort(errors, function(a, b)
    if a.count ~= b.count then return a.count > b.count end
    return a.label < b.label
  end)
  s.errors = errors

  -- The last hour (the 60 minutes up to now) and the clock hours of the last day.
  local minute = floor(now / 60)
  local lt, le = 0, 0
  for m = minute - 59, minute do
    lt = lt + (counts:get("m:" .. m) or 0)
    le = le + (counts:get("x:" .. m) or 0)
  end
  s.last_hour = { total = lt, errors = le, rate = lt > 0 and le / lt or 0, since = (minute - 59) * 60 }

  local hours = {}
  local this_hour = floor(now / HOUR)
  for h = this_hour, this_hour - DAY_HOURS + 1, -1 do
    local ht, he = 0, 0
    for m = h * 60, h * 60 + 59 do
      ht = ht + (counts:get("m:" .. m) or 0)
      he = he + (counts:get("x:" .. m) or 0)
    end
    if ht > 0 then
      hours[#hours + 1] = { start = h * HOUR, total = ht, errors = he, rate = he / ht,
                            over = he / ht > M.ALERT_THRESHOLD }
    end
  end
  s.hours = hours

  local active = lt > 0 and le / lt > M.ALERT_THRESHOLD
  s.alert = {
    active = active,
    message = active and fmt("More than 5%% of the last hour's requests errored: %d of %d (%.1f%%). "
      .. "The service e-mails an alert to %s when this happens.", le, lt, le * 100 / lt, conf.test_email)
      or nil,
  }
  return s
end

-- The JSON of GET /status.json: the summary plus each tab's rows, newest first.
function M.json(conf, logs, counts, now, limit)
  local s = M.summary(conf, logs, counts, now)
  if #s.errors == 0 then s.errors = nil end
  if #s.hours == 0 then s.hours = nil end
  local head = cjson.encode(s)
  local parts = { head:sub(1, -2) }
  if not s.errors then parts[#parts + 1] = ',"errors":[]' end
  if not s.hours then parts[#parts + 1] = ',"hours":[]' end
  for _, tab in ipairs(M.TABS) do
    local list = rows(logs, counts, tab.queue, tab.id, conf.log_limit, limit)
    parts[#parts + 1] = ',"' .. tab.id .. '":[' .. concat(list, ",") .. "]"
  end
  parts[#parts + 1] = "}"
  return concat(parts)
end

---------------------------------------------------------------------------
-- HTML
---------------------------------------------------------------------------

local ESCAPES = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }

local function esc(v)
  if v == nil or v == cjson.null then return "" end
  return (tostring(v):gsub("[&<>\"']", ESCAPES))
end
M.escape = esc

local function utc(t)
  if type(t) ~= "number" then return "" end
  return date("!%Y-%m-%d %H:%M:%S", floor(t))
end

local function pct(rate)
  return fmt("%.1f%%", (rate or 0) * 100)
end

local function plural(n, word)
  return fmt("%d %s%s", n, word, n == 1 and "" or "s")
end

-- a field of a decoded request, as text ("" when absent or not a string/number)
local function field(t, a, b)
  if type(t) ~= "table" then return "" end
  local v = t[a]
  if b then v = type(v) == "table" and v[b] or nil end
  if type(v) == "string" or type(v) == "number" then return tostring(v) end
  return ""
end

local function who(t, key)
  local email, id = field(t, key, "email"), field(t, key, "custom_id")
  if key == "customer" then
    local name = field(t, key, "name")
    if name ~= "" and email ~= "" then return esc(name) .. "<br><small>" .. esc(email) .. "</small>" end
    return esc(name ~= "" and name or email)
  end
  if email ~= "" and id ~= "" then return esc(email) .. "<br><small>" .. esc(id) .. "</small>" end
  return esc(email ~= "" and email or id)
end

local DELIVERY_TEXT = {
  test_inbox = "test inbox",
  customer = "customer",
  suppressed = "suppressed",
  unsubscribed = "unsubscribed",
  do_not_send = "do_not_send",
}

local function delivery_cell(r)
  local d = r.delivery
  local text = DELIVERY_TEXT[d] or tostring(d)
  local note
  if d == "customer" then
    note = r.to and ("to " .. esc(r.to)) or nil
  elseif d == "suppressed" then
    note = r["until"] and ("no e-mail until " .. esc(utc(r["until"])) .. " UTC") or "no e-mail"
  elseif d == "unsubscribed" then
    note = "customer unsubscribed: recorded, no e-mail"
  elseif d == "do_not_send" then
    note = "recorded, no e-mail"
  end
  return '<span class="badge d-' .. esc(d) .. '">' .. esc(text) .. "</span>"
    .. (note and ("<br><small>" .. note .. "</small>") or "")
end

local function decode_row(text)
  local r = cjson.decode(text)
  if type(r) ~= "table" then return nil end
  if type(r.request) ~= "table" and type(r.body) == "string" then
    local req = cjson.decode(r.body)
    if type(req) == "table" then r.request = req end
  end
  return r
end

local function table_html(head, body_rows, empty)
  if #body_rows == 0 then return '<p class="empty">' .. empty .. "</p>" end
  local out = { '<div class="scroll"><table><thead><tr>' }
  for _, h in ipairs(head) do out[#out + 1] = "<th>" .. h .. "</th>" end
  out[#out + 1] = "</tr></thead><tbody>"
  for _, row in ipairs(body_rows) do out[#out + 1] = row end
  out[#out + 1] = "</tbody></table></div>"
  return concat(out)
end

local function invalid_rows(list)
  local out = {}
  for _, text in ipairs(list) do
    local r = decode_row(text)
    if r then
      local req = r.request
      local err
      if type(r.error) == "string" then
        err = '<strong class="label">' .. esc(r.error) .. "</strong>"
      else
        local items = {}
        for _, e in ipairs(type(r.errors) == "table" and r.errors or {}) do
          if type(e) == "table" then
            items[#items + 1] = "<li><code>" .. esc(e.path ~= "" and e.path or "(body)") .. "</code> "
              .. esc(e.message) .. ' <span class="code">' .. esc(e.code) .. "</span></li>"
          end
        end
        err = '<strong class="label">Schema validation</strong><ul class="errs">' .. concat(items) .. "</ul>"
      end
      local interaction = field(req, "ext_interaction_id")
      if r.call == "recovery" and field(req, "initial_feedback_request_id") ~= "" then
        interaction = field(req, "initial_feedback_request_id")
      end
      out[#out + 1] = '<tr class="row-invalid"><td class="time">' .. esc(utc(r.time)) .. "</td><td>"
        .. esc(r.mode) .. "</td><td>" .. esc(r.call) .. "</td><td>" .. err .. "</td><td>"
        .. who(req, "employee") .. "</td><td>" .. who(req, "customer") .. "</td><td>"
        .. esc(interaction) .. "</td></tr>"
    end
  end
  return table_html({ "Time (UTC)", "Key", "Call", "Error", "Employee", "Customer", "Interaction" }, out,
    "No invalid requests.")
end

local function accepted_rows(list, empty)
  local out = {}
  for _, text in ipairs(list) do
    local r = decode_row(text)
    if r then
      local req = r.request
      local customer = who(req, "customer")
      local interaction = esc(field(req, "ext_interaction_id"))
      if r.call == "recovery" then
        customer = "<small>see the original request</small>"
        interaction = '<span class="badge">recovery</span> ' .. interaction
          .. '<br><small>of <code>' .. esc(r.original) .. "</code></small>"
      end
      out[#out + 1] = '<tr class="row-' .. esc(r.delivery) .. '"><td class="time">' .. esc(utc(r.time))
        .. '<br><code class="id">' .. esc(r.request_id) .. "</code></td><td>" .. delivery_cell(r)
        .. "</td><td>" .. customer .. "</td><td>" .. who(req, "employee") .. "</td><td>"
        .. esc(field(req, "channel")) .. "</td><td>" .. esc(field(req, "brand")) .. "</td><td>"
        .. interaction .. "</td></tr>"
    end
  end
  return table_html({ "Time (UTC) · request id", "Delivery", "Customer", "Employee", "Channel", "Brand",
                      "Interaction" }, out, empty)
end

local function breakdown(d, order)
  local parts = {}
  for _, k in ipairs(order) do
    if (d[k] or 0) > 0 then parts[#parts + 1] = fmt("%d %s", d[k], DELIVERY_TEXT[k]) end
  end
  return #parts > 0 and concat(parts, " · ") or "none yet"
end

local function fill(template, vars)
  return (template:gsub("{{([%w_]+)}}", function(name) return vars[name] or "" end))
end

-- The HTML page. assets = { html = template, css = ..., js = ... } (files/status.*).
function M.html(conf, logs, counts, now, assets, base_url)
  local s = M.summary(conf, logs, counts, now)
  local c = s.counts
  local lh = s.last_hour

  local alert = ""
  if s.alert.active then
    alert = '<div class="alert" id="alert" role="alert"><strong>Alert:</strong> ' .. esc(s.alert.message) .. "</div>"
  end

  local cards = {
    { "Requests", c.total, "since the sandbox started" },
    { "Invalid", c.invalid, "answered 400" },
    { "Test", c.test, "test key: to the test inbox" },
    { "Delivered", c.delivered, "production key" },
    { "Error rate, last hour", pct(lh.rate), fmt("%d of %d", lh.errors, lh.total),
      lh.total > 0 and lh.rate > M.ALERT_THRESHOLD and "over" or nil },
    { "Refused keys", c.auth_failures, "answered 403 (not counted above)" },
  }
  local summary = { '<section class="cards" aria-label="Counts">' }
  for _, card in ipairs(cards) do
    summary[#summary + 1] = '<div class="card' .. (card[4] and (" " .. card[4]) or "") .. '"><div class="n">'
      .. esc(card[2]) .. '</div><div class="what">' .. esc(card[1]) .. '</div><div class="note">'
      .. esc(card[3]) .. "</div></div>"
  end
  summary[#summary + 1] = "</section>"

  local hour_rows = {}
  for _, h in ipairs(s.hours) do
    hour_rows[#hour_rows + 1] = "<tr" .. (h.over and ' class="over"' or "") .. "><td>"
      .. esc(date("!%Y-%m-%d %H:00", h.start)) .. "</td><td>" .. h.total .. "</td><td>" .. h.errors
      .. "</td><td>" .. pct(h.rate) .. (h.over and " &#9888;" or "") .. "</td></tr>"
  end
  local hours = '<section class="hours"><h2>Error rate per hour</h2>'
    .. table_html({ "Hour (UTC)", "Requests", "Errors", "Rate" }, hour_rows, "No requests in the last 24 hours.")
  if #s.errors > 0 then
    local items = {}
    for _, e in ipairs(s.errors) do
      items[#items + 1] = "<li><span>" .. esc(e.label) .. "</span> <b>" .. e.count .. "</b></li>"
    end
    hours = hours .. '<h3>Errors by cause</h3><ul class="causes">' .. concat(items) .. "</ul>"
  end
  hours = hours .. "</section>"

  local counts_by_tab = { invalid = c.invalid, test = c.test, delivered = c.delivered }
  local tabs = { '<nav class="tabs" role="tablist" aria-label="Requests">' }
  for i, tab in ipairs(M.TABS) do
    tabs[#tabs + 1] = '<button type="button" role="tab" id="tab-' .. tab.id .. '" data-tab="' .. tab.id
      .. '" aria-controls="panel-' .. tab.id .. '" aria-selected="' .. (i == 1 and "true" or "false")
      .. '">' .. esc(tab.title) .. ' <span class="count">' .. counts_by_tab[tab.id] .. "</span></button>"
  end
  tabs[#tabs + 1] = "</nav>"

  local panels = {}
  local inv = rows(logs, counts, "q:invalid", "invalid", conf.log_limit)
  panels[1] = '<p class="hint">Requests the sandbox answered with 400, with the service\'s error label '
    .. "or the schema errors (the same ones <code>stella.validate</code> reports).</p>" .. invalid_rows(inv)
  local tst = rows(logs, counts, "q:test", "test", conf.log_limit)
  panels[2] = '<p class="hint">Accepted with the test key: "delivered" to ' .. esc(conf.test_email)
    .. ", never to the customer. " .. esc(breakdown(s.deliveries.test, M.DELIVERIES)) .. ".</p>"
    .. accepted_rows(tst, "No test requests.")
  local dlv = rows(logs, counts, "q:production", "delivered", conf.log_limit)
  panels[3] = '<p class="hint">Accepted with the production key. '
    .. esc(breakdown(s.deliveries.production, M.DELIVERIES)) .. ".</p>"
    .. accepted_rows(dlv, "No production requests.")
  local panel_html = {}
  for i, tab in ipairs(M.TABS) do
    local shown = counts_by_tab[tab.id]
    local note = shown > conf.log_limit
      and fmt('<p class="hint">Showing the newest %d of %d.</p>', conf.log_limit, shown) or ""
    panel_html[i] = '<section class="panel" role="tabpanel" id="panel-' .. tab.id .. '" aria-labelledby="tab-'
      .. tab.id .. '"><h2>' .. esc(tab.title) .. "</h2>" .. note .. panels[i] .. "</section>"
  end

  return fill(assets.html, {
    company = esc(conf.company),
    css = assets.css,
    js = assets.js,
    generated = esc(utc(now)),
    base_url = esc(base_url or ""),
    test_email = esc(conf.test_email),
    alert = alert,
    summary = concat(summary),
    hours = hours,
    tabs = concat(tabs),
    panels = concat(panel_html),
  })
end

return M
