-- examples/openresty/webhook.lua: the Lua side of nginx.conf in this directory.
--
--   POST /events         a helpdesk event (a JSON object) or a batch (a JSON array of them).
--                        Answers 202 at once; the events go through stella.trigger in a
--                        timer (ngx.timer.at(0, ...)), so the helpdesk never waits for the
--                        Requests API and the worker never blocks (cosocket transport).
--   GET  /events/status  outbox and ledger counts from the shared dict (loopback only)
--
-- Each worker builds one trigger on first use and keeps it: the store is the shared dict
-- (suppression, dedupe marks and the outbox are shared by all workers), the client talks
-- through cosockets. Worker 0 replays the outbox every FLUSH_EVERY seconds (requests
-- that failed with a retryable error: 429, 5xx, timeouts, network).
--
-- Optional: STELLA_WEBHOOK_TOKEN in the environment makes /events require
-- "Authorization: Bearer <token>".
local cjson = require "cjson.safe"
local stella = require "stella"
local shdict = require "stella.store.shdict"
local cosocket = require "stella.transport.cosocket"

local ngx = ngx
local getenv, io_open, pcall, type, tostring, ipairs, next =
      os.getenv, io.open, pcall, type, tostring, ipairs, next

local M = {}

local DICT = "stella"           -- lua_shared_dict in nginx.conf
local FLUSH_EVERY = 60          -- seconds
local HERE = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
local RULES = HERE .. "/rules.lua"

-- Per worker, built on first use (in a request or a timer, never in init_by_lua).
local store, trigger

local function get_store()
  if not store then store = assert(shdict.new(DICT)) end
  return store
end

local function env(name)
  local v = getenv(name)
  if v == "" then return nil end
  return v
end

local function get_trigger()
  if trigger then return trigger end
  local keys
  if env("STELLA_TEST_KEY") or env("STELLA_PRODUCTION_KEY") then
    keys = { test = env("STELLA_TEST_KEY"), production = env("STELLA_PRODUCTION_KEY") }
  end
  trigger = stella.trigger{
    rules = RULES,
    store = get_store(),
    clock = ngx.time,
    client = {
      keys = keys,                          -- nil: the rules file's keys
      mode = env("STELLA_MODE"),            -- nil: the rules file's mode
      base_url = env("STELLA_BASE_URL"),    -- nil: the rules file's, else the service's
      transport = cosocket,                 -- what stella.new picks here anyway
    },
    on_alert = function(info)
      ngx.log(ngx.ALERT, "stella: ", info.errors, " of the last ", info.total,
        " requests failed (threshold ", info.threshold * 100, "%)")
    end,
  }
  return trigger
end

local function reply(status, value)
  local body = cjson.encode(value)
  ngx.status = status
  ngx.header["Content-Type"] = "application/json"
  ngx.header["Content-Length"] = #body + 1
  ngx.say(body)
  return ngx.exit(ngx.HTTP_OK)
end

local function log_outcome(o)
  local failed = o.status == "failed" or o.status == "invalid" or o.status == "queued"
  ngx.log(failed and ngx.WARN or ngx.INFO, "stella: event ", tostring(o.event_id), ": ", o.status,
    o.reason and (" (" .. o.reason .. ")") or "", o.request_id and (" request " .. o.request_id) or "",
    o.detail and failed and (": " .. o.detail) or "")
end

-- The timer: decide, reserve, send, settle. Runs even when premature (nginx is
-- stopping or reloading): the events exist nowhere else.
local function handle(_premature, events)
  local ok, outcomes = pcall(function() return get_trigger():process_many(events) end)
  if not ok then
    ngx.log(ngx.ERR, "stella: ", #events, " event(s) not processed: ", tostring(outcomes))
    return
  end
  for _, o in ipairs(outcomes) do log_outcome(o) end
end

local function flush(premature)
  if premature then return end
  local ok, summary = pcall(function() return get_trigger():flush() end)
  if not ok then
    ngx.log(ngx.ERR, "stella: outbox flush failed: ", tostring(summary))
  elseif summary and (summary.sent + summary.recorded + summary.queued + summary.failed) > 0 then
    ngx.log(ngx.NOTICE, "stella: outbox: ", summary.sent, " sent, ", summary.recorded, " recorded, ",
      summary.queued, " still queued, ", summary.failed, " failed")
  end
end

local function request_body()
  ngx.req.read_body()
  local body = ngx.req.get_body_data()
  if body then return body end
  local path = ngx.req.get_body_file()   -- larger than client_body_buffer_size
  if not path then return nil end
  local f = io_open(path, "rb")
  if not f then return nil end
  body = f:read("*a")
  f:close()
  return body
end

-- POST /events
function M.receive()
  if ngx.req.get_method() ~= "POST" then
    ngx.header["Allow"] = "POST"
    return reply(405, { error = "POST a JSON event" })
  end
  local token = env("STELLA_WEBHOOK_TOKEN")
  if token and ngx.var.http_authorization ~= "Bearer " .. token then
    return reply(401, { error = "missing or wrong bearer token" })
  end
  local value = cjson.decode(request_body() or "")
  if type(value) ~= "table" or next(value) == nil then
    return reply(400, { error = "expected a JSON object (one event) or an array of events" })
  end
  local events = value[1] ~= nil and value or { value }
  for i, e in ipairs(events) do
    if type(e) ~= "table" then
      return reply(400, { error = "event " .. i .. " is not a JSON object" })
    end
  end
  local ok, err = ngx.timer.at(0, handle, events)
  if not ok then   -- lua_max_pending_timers reached, or nginx is exiting
    ngx.log(ngx.ERR, "stella: cannot schedule ", #events, " event(s): ", err)
    return reply(503, { error = "busy, try again" })
  end
  return reply(202, { accepted = #events })
end

-- GET /events/status
function M.status()
  local s = get_store()
  return reply(200, {
    outbox = s:outbox_counts(),
    ledger = s:counts(),
    recent = s:ledger{ limit = 20 },
    unsubscribed = s:unsubscribed_count(),
  })
end

-- init_worker_by_lua
function M.init_worker()
  if ngx.worker.id() == 0 then
    local ok, err = ngx.timer.every(FLUSH_EVERY, flush)
    if not ok then ngx.log(ngx.ERR, "stella: cannot start the outbox timer: ", err) end
  end
end

return M
