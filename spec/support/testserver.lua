-- Fault-injecting loopback HTTP server for the specs: a real nginx with its Lua
-- module, started on a free 127.0.0.1 port and driven through /_control/ endpoints.
-- Runs under Lua 5.4 and LuaJIT; needs luasocket and lua-cjson.
--
--   local testserver = require "support.testserver"
--   local server = testserver.start()
--   server:script{ { status = 503, headers = { ["Retry-After"] = "2" } }, { drop = true } }
--   ... point the client at server.url ...
--   local reqs = server:requests()
--   server:reset()
--   server:stop()
--
-- Script items (each field optional):
--   status   HTTP status (default 200)
--   body     string sent as is, or a table sent as JSON. When absent, a 200/201 answer
--            carries the default {"request_id":"req-N"} and anything else is empty.
--   headers  { ["Name"] = "value" }; applied last, so they can override Content-Length
--            and Content-Type (application/json whenever the body is not empty)
--   delay    seconds to wait before answering (or dropping)
--   drop     close the connection without sending any response
--   close    answer with "Connection: close", then close the connection
--   body_bytes  a body of this many "x" bytes (made by the server: larger than a script
--            item may carry)
--   chunked  send the body without Content-Length (chunked), so its size is not announced
--
-- Recorded request fields: method, path (URI with query string), headers (lowercased
-- names; a repeated header gives an array of values), body (raw string), connection
-- (nginx connection serial number), connection_requests (how many requests this
-- connection has carried, this one included), time (ngx.now() at arrival), answer (the
-- script item it was answered with, {} for the default answer).

local http = require "socket.http"
local ltn12 = require "ltn12"
local cjson = require "cjson"
local nginx = require "stella.nginx"

local testserver = {}

local START_TIMEOUT = 5    -- seconds to wait for nginx to accept requests
local CONTROL_TIMEOUT = 5  -- seconds for one control request

local ITEM_FIELDS = { status = true, body = true, headers = true, delay = true, drop = true, close = true,
                      body_bytes = true, chunked = true }

-- Absolute directory of this file, so the specs can run from any working directory.
local function support_dir()
  local source = debug.getinfo(1, "S").source
  return nginx.absolute(source:match("^@(.*)/[^/]*$") or ".")
end

---------------------------------------------------------------------------
-- Control requests
---------------------------------------------------------------------------

-- Sends one control request; returns the decoded JSON answer or raises.
local function control(self, method, path, body, timeout)
  local chunks = {}
  local headers = { ["Content-Length"] = body and tostring(#body) or nil,
                    ["Content-Type"] = body and "application/json" or nil }
  -- socket.http takes its timeout from a module field (it overrides any timeout
  -- set by a custom create function), so swap it in for this one call.
  local saved = http.TIMEOUT
  http.TIMEOUT = timeout or CONTROL_TIMEOUT
  local ok, res, status = pcall(http.request, {
    url = self.url .. path,
    method = method,
    headers = headers,
    source = body and ltn12.source.string(body) or nil,
    sink = ltn12.sink.table(chunks),
  })
  http.TIMEOUT = saved
  if not ok then res, status = nil, res end
  if not res then
    error("testserver: " .. method .. " " .. path .. " failed: " .. tostring(status), 3)
  end
  local text = table.concat(chunks)
  if status ~= 200 then
    error("testserver: " .. method .. " " .. path .. " answered " .. tostring(status)
      .. ": " .. text, 3)
  end
  return cjson.decode(text)
end

---------------------------------------------------------------------------
-- Server object
---------------------------------------------------------------------------

local Server = {}
Server.__index = Server

-- Queues items (see the top of the file) for the next non-control requests, in order.
-- Accepts a list of items or a single item.
function Server:script(list)
  if type(list) ~= "table" then error("script: expected a list of items", 2) end
  if list[1] == nil and next(list) ~= nil then list = { list } end
  local items = {}
  for i, item in ipairs(list) do
    if type(item) ~= "table" then error("script: item " .. i .. " is not a table", 2) end
    for key in pairs(item) do
      if not ITEM_FIELDS[key] then
        error("script: item " .. i .. " has unknown field '" .. tostring(key) .. "'", 2)
      end
    end
    local copy = {}
    for k, v in pairs(item) do copy[k] = v end
    if type(copy.body) == "table" then copy.body = cjson.encode(copy.body) end
    if copy.headers then
      local headers = {}
      for name, value in pairs(copy.headers) do
        headers[name] = type(value) == "table" and value or tostring(value)
      end
      copy.headers = headers
    end
    items[i] = copy
  end
  if #items == 0 then return self end
  control(self, "POST", "/_control/script", cjson.encode(items))
  return self
end

-- Recorded requests, in arrival order.
function Server:requests()
  return control(self, "GET", "/_control/requests")
end

-- Forgets recorded requests, queued script items and the request counter.
function Server:reset()
  control(self, "POST", "/_control/reset")
  return self
end

-- Stops nginx and removes the prefix directory. Safe to call more than once.
function Server:stop()
  if self.stopped then return end
  self.stopped = true
  if self.process then self.process:stop() end
end

-- Error log contents, for diagnostics.
function Server:error_log()
  return nginx.read_file(self.prefix .. "/error.log") or ""
end

---------------------------------------------------------------------------
-- Start-up
---------------------------------------------------------------------------

-- Starts a server. opts (all optional): nginx = path of the nginx binary (or
-- $STELLA_NGINX), module_dirs = list of directories holding the two .so modules.
function testserver.start(opts)
  opts = opts or {}
  local function need(v, err)
    if not v then error("testserver: " .. err, 3) end
    return v
  end
  local binary = need(nginx.find_nginx(opts))
  local dir = support_dir()
  local template = need(nginx.read_file(dir .. "/nginx/nginx.conf"), "cannot read " .. dir .. "/nginx/nginx.conf")
  local vars = {
    HANDLER_DIR = dir .. "/nginx",
    NDK_MODULE = need(nginx.find_module("ndk_http_module.so", opts)),
    LUA_MODULE = need(nginx.find_module("ngx_http_lua_module.so", opts)),
    -- A root master would run its worker as "nobody", which may not be able to read the
    -- handler in the checkout or the 0700 prefix; keep it as root. Non-root nginx ignores
    -- "user" with a warning, so only emit it for root.
    USER_DIRECTIVE = nginx.is_root() and "user root;" or "",
  }
  local prefix = need(nginx.temp_dir("stella-test"))
  -- a failed start removes the prefix (temporary) and leaves no nginx behind
  local process, log = nginx.start{
    nginx = binary, prefix = prefix, temporary = true, who = "testserver",
    config = template, vars = vars, ports = { "PORT" }, timeout = START_TIMEOUT,
    ready = function(n) return (pcall(control, n, "GET", "/_control/ping", nil, 0.5)) end,
  }
  if not process then
    error("testserver: nginx failed to start. Last lines of its error log:\n" .. nginx.tail(log, 15), 2)
  end
  return setmetatable({ process = process, prefix = prefix, pid = process.pid, port = process.port,
                        url = process.url }, Server)
end

return testserver
