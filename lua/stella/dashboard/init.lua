-- stella.dashboard: a read-only page of the integration's own pipeline (outcomes over
-- time, the error rate against the alert threshold, the outbox, dead letters, the latest
-- failed and invalid events, workers), served over HTTP by a small luasocket server in
-- the stella command's own Lua. `stella dashboard` runs it (stella.cli.dashboard).
--
--   local dashboard = require "stella.dashboard"
--   local d = assert(dashboard.new{ store = store, db = "stella.db", bind = "127.0.0.1",
--                                   port = 8788, token = nil, threshold = 0.05,
--                                   sources = { workers = fn(now), queue = fn(now) } })
--   d:url()                 -- "http://127.0.0.1:8788/"
--   d:serve(stop)           -- answers requests until stop() returns true
--   d:close()
--
-- GET /             the page (HTML with its CSS and script inline: no other request but
--                   GET /status.json, which it polls every 5 s)
-- GET /status.json  what the page shows: `stella status --json`'s object (built by the
--                   same code: stella.cli.status.collect) with the timeline of outcomes,
--                   the dead items, and `workers` / `queue` (null on a store without a
--                   queue: sources.workers(now) -> { { name, state, host, pid, heartbeat,
--                   busy, processed, pending }, ... } and sources.queue(now) -> { depth,
--                   lag, pending, length, oldest, dead, dead_letters, ... } fill them, for
--                   a Redis queue: stella.cli.queue_status.sources). ?since=24h|7d|30d,
--                   ?bucket=hour|day.
-- Read-only: GET and HEAD only; the store is only read. Bound to loopback by default;
-- with a token (required for any other address) every request must carry it, as
-- `Authorization: Bearer TOKEN` or `?token=TOKEN` (the page passes it on). On loopback the
-- Host header must name a loopback host (no DNS rebinding from a web page).
local socket = require "socket"
local status = require "stella.cli.status"
local output = require "stella.cli.output"

local byte, concat, format, pcall, setmetatable, tonumber, tostring, type =
      string.byte, table.concat, string.format, pcall, setmetatable, tonumber, tostring, type

local M = {}

local Dashboard = {}
Dashboard.__index = Dashboard

local MAX_HEADER_LINES, MAX_LINE = 100, 8192
local CLIENT_TIMEOUT = 5   -- seconds a client may take to send its request

local RANGES = { ["24h"] = 86400, ["7d"] = 7 * 86400, ["30d"] = 30 * 86400 }
local BUCKETS = { hour = 3600, day = 86400 }

-- The page: its three files joined once.
local function here()
  local src = debug.getinfo(1, "S").source
  return src:sub(1, 1) == "@" and (src:sub(2):match("^(.*)/[^/]*$") or ".") or "."
end

local function read(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local text = f:read("*a")
  f:close()
  return text
end

local function page()
  local d = here() .. "/files/"
  local html = assert(read(d .. "dashboard.html"))
  local css, js = assert(read(d .. "dashboard.css")), assert(read(d .. "dashboard.js"))
  -- functions as replacements: no % patterns in the files are interpreted
  html = html:gsub("{{css}}", function() return css end):gsub("{{js}}", function() return js end)
  return html
end

function M.is_loopback(addr)
  return addr == "localhost" or addr == "::1" or addr:match("^127%.%d+%.%d+%.%d+$") ~= nil
end

-- Equal strings in a time that does not depend on where they first differ.
local function same(a, b)
  if type(a) ~= "string" or #a ~= #b then return false end
  local diff = 0
  for i = 1, #a do
    if byte(a, i) ~= byte(b, i) then diff = diff + 1 end
  end
  return diff == 0
end

local function unescape(s)
  return (s:gsub("+", " "):gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

local function query_of(target)
  local path, q = target:match("^([^?]*)%??(.*)$")
  local params = {}
  for k, v in q:gmatch("([^&=]+)=?([^&]*)") do params[unescape(k)] = unescape(v) end
  return path, params
end

-- dashboard.new(o) -> dashboard | nil, message
function M.new(o)
  if type(o) ~= "table" or o.store == nil then error("stella.dashboard: options with a store expected", 2) end
  local bind, port = o.bind or "127.0.0.1", o.port or 8788
  local token = o.token
  if token ~= nil and (type(token) ~= "string" or #token < 16 or token:find("[^%w%-%._~+/=]")) then
    return nil, "the token must be at least 16 characters (letters, digits, -._~+/=)"
  end
  if not M.is_loopback(bind) and not token then
    return nil, "a dashboard on " .. bind .. " (not loopback) needs a token: --token or STELLA_DASHBOARD_TOKEN"
  end
  local server, err = socket.bind(bind, port)
  if not server then return nil, ("cannot listen on %s:%s: %s"):format(bind, tostring(port), tostring(err)) end
  server:settimeout(0.2)   -- accept() wakes up this often to look at stop()
  local _, bound_port = server:getsockname()
  return setmetatable({
    store = o.store, db = o.db, bind = bind, port = tonumber(bound_port), token = token,
    threshold = o.threshold, sources = o.sources or {}, server = server, html = page(),
    clock = o.clock or os.time, log = o.log,
  }, Dashboard)
end

function Dashboard:url()
  local host = self.bind:find(":", 1, true) and ("[" .. self.bind .. "]") or self.bind
  if host == "0.0.0.0" or host == "[::]" then host = "127.0.0.1" end
  return ("http://%s:%d/"):format(host, self.port)
end

local REASONS = { [200] = "OK", [204] = "No Content", [400] = "Bad Request", [401] = "Unauthorized",
                  [403] = "Forbidden", [404] = "Not Found", [405] = "Method Not Allowed",
                  [500] = "Internal Server Error" }

local CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; "
  .. "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

local function respond(client, code, ctype, body, head_only, extra)
  local lines = {
    format("HTTP/1.1 %d %s", code, REASONS[code] or ""),
    "Content-Type: " .. ctype,
    "Content-Length: " .. #body,
    "Cache-Control: no-store",
    "X-Content-Type-Options: nosniff",
    "Referrer-Policy: no-referrer",
    "Content-Security-Policy: " .. CSP,
    "Connection: close",
  }
  if extra then lines[#lines + 1] = extra end
  client:send(concat(lines, "\r\n") .. "\r\n\r\n" .. (head_only and "" or body))
end

local function json_error(client, code, message, head_only, extra)
  respond(client, code, "application/json", output.encode{ error = message }, head_only, extra)
end

-- The object of GET /status.json at `now`.
function Dashboard:status_object(params)
  local now = self.clock()
  local range = RANGES[params.since or "24h"] or RANGES["24h"]
  local bucket = BUCKETS[params.bucket or (range > 86400 and "day" or "hour")] or 3600
  local st = status.collect(self.store, { now = now, window = range, threshold = self.threshold,
                                          detail = true, bucket = bucket })
  local cjson = require "cjson.safe"
  local sources = self.sources
  local workers = sources.workers and sources.workers(now) or nil
  local queue = sources.queue and sources.queue(now) or nil
  if workers then output.array(workers) end
  local name = tostring(self.store):match("^stella%.store%.(%w+)") or tostring(self.store)
  return status.to_json(st, { command = "dashboard", db = self.db, backend = name,
                              workers = workers or cjson.null, queue = queue or cjson.null })
end

-- Reads one request from client and answers it.
function Dashboard:handle(client)
  client:settimeout(CLIENT_TIMEOUT)
  local line = client:receive("*l")
  if not line or #line > MAX_LINE then return end
  local method, target = line:match("^(%u+) (%S+) HTTP/1%.[01]$")
  if not method then return json_error(client, 400, "bad request line") end
  local headers = {}
  for _ = 1, MAX_HEADER_LINES + 1 do
    local h = client:receive("*l")
    if h == nil then return end
    if h == "" then break end
    if #h > MAX_LINE then return json_error(client, 400, "header too long") end
    local k, v = h:match("^([^:]+):%s*(.-)%s*$")
    if k then headers[k:lower()] = v end
  end
  local head_only = method == "HEAD"
  if method ~= "GET" and not head_only then
    return json_error(client, 405, "read-only: GET and HEAD only", false, "Allow: GET, HEAD")
  end
  if M.is_loopback(self.bind) then
    local host = (headers.host or ""):gsub(":%d+$", "")
    if host ~= "127.0.0.1" and host ~= "localhost" and host ~= "[::1]" and not host:match("^127%.%d+%.%d+%.%d+$") then
      return json_error(client, 403, "a loopback dashboard answers loopback host names only", head_only)
    end
  end
  local path, params = query_of(target)
  if self.token then
    local given = params.token or (headers.authorization or ""):match("^Bearer%s+(%S+)$")
    if not same(given, self.token) then
      return json_error(client, 401, "a token is required: ?token=... or Authorization: Bearer ...", head_only,
                        "WWW-Authenticate: Bearer")
    end
  end
  if path == "/" or path == "/index.html" then
    return respond(client, 200, "text/html; charset=utf-8", self.html, head_only)
  elseif path == "/status.json" then
    local ok, obj = pcall(self.status_object, self, params)
    if not ok then return json_error(client, 500, "the store could not be read: " .. tostring(obj), head_only) end
    return respond(client, 200, "application/json", output.encode(obj), head_only)
  end
  return json_error(client, 404, "no such page: / and /status.json", head_only)
end

-- Answers requests, one at a time, until stop() returns true.
function Dashboard:serve(stop)
  while not (stop and stop()) do
    local client = self.server:accept()
    if client then
      local ok, err = pcall(self.handle, self, client)
      if not ok and self.log then self.log("stella dashboard: " .. tostring(err)) end
      client:close()
    end
  end
end

function Dashboard:close()
  if self.server then self.server:close() self.server = nil end
end

M.RANGES, M.BUCKETS = RANGES, BUCKETS

return M
