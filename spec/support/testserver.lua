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
--
-- Recorded request fields: method, path (URI with query string), headers (lowercased
-- names; a repeated header gives an array of values), body (raw string), connection
-- (nginx connection serial number), connection_requests (how many requests this
-- connection has carried, this one included), time (ngx.now() at arrival).

local socket = require "socket"
local http = require "socket.http"
local ltn12 = require "ltn12"
local cjson = require "cjson"

local testserver = {}

local START_TIMEOUT = 5    -- seconds to wait for nginx to accept requests
local STOP_TIMEOUT = 5     -- seconds to wait for nginx to exit
local CONTROL_TIMEOUT = 5  -- seconds for one control request
local BIND_ATTEMPTS = 5    -- fresh ports to try when another process takes ours

local MODULE_DIRS = { "/usr/lib/nginx/modules", "/usr/share/nginx/modules" }
local NGINX_CANDIDATES = { "/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx" }

local ITEM_FIELDS = { status = true, body = true, headers = true, delay = true, drop = true, close = true }

---------------------------------------------------------------------------
-- Shell helpers
---------------------------------------------------------------------------

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Runs a shell command; returns its exit code and combined stdout/stderr. Goes
-- through io.popen because os.execute returns different things in 5.1 and 5.4.
local function run(cmd)
  local p = assert(io.popen("(" .. cmd .. ") 2>&1; echo \"@exit=$?\""))
  local out = p:read("*a")
  p:close()
  local code = tonumber(out:match("@exit=(%d+)%s*$"))
  return code, (out:gsub("@exit=%d+%s*$", ""))
end

local function file_exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

local function write_file(path, contents)
  local f = assert(io.open(path, "wb"))
  assert(f:write(contents))
  assert(f:close())
end

local function tail(text, n)
  local lines = {}
  for line in (text or ""):gmatch("[^\n]+") do lines[#lines + 1] = line end
  return table.concat(lines, "\n", math.max(1, #lines - n + 1))
end

---------------------------------------------------------------------------
-- Locating nginx, its modules and our files
---------------------------------------------------------------------------

local function find_nginx(opts)
  local explicit = opts.nginx or os.getenv("STELLA_NGINX")
  if explicit then return explicit end
  for _, path in ipairs(NGINX_CANDIDATES) do
    if file_exists(path) then return path end
  end
  local code, out = run("command -v nginx")
  if code == 0 and out:match("%S") then return (out:gsub("%s+$", "")) end
  error("testserver: nginx not found (install nginx, or set STELLA_NGINX)", 0)
end

local function find_module(name, opts)
  local dirs = opts.module_dirs or MODULE_DIRS
  for _, dir in ipairs(dirs) do
    local path = dir .. "/" .. name
    if file_exists(path) then return path end
  end
  error("testserver: " .. name .. " not found in " .. table.concat(dirs, ", ")
    .. " (install libnginx-mod-http-lua)", 0)
end

-- Absolute directory of this file, so the specs can run from any working directory.
local function support_dir()
  local source = debug.getinfo(1, "S").source
  local dir = source:match("^@(.*)/[^/]*$") or "."
  if dir:sub(1, 1) ~= "/" then
    local _, cwd = run("pwd")
    dir = cwd:gsub("%s+$", "") .. "/" .. dir
  end
  return dir
end

local function is_root()
  local _, out = run("id -u")
  return out:match("^%s*0%s*$") ~= nil
end

-- Asks the kernel for an unused port: bind to port 0, read it back, release it.
-- Another process may grab it before nginx binds; start() retries in that case.
local function free_port()
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

---------------------------------------------------------------------------
-- Processes
---------------------------------------------------------------------------

-- A pid counts as gone when it no longer exists or is a zombie: nginx is our child
-- and stays a zombie until stop() closes its popen handle.
local function alive(pid)
  local stat = read_file("/proc/" .. pid .. "/stat")
  if stat then
    return stat:match("^%d+ %b() (%a)") ~= "Z"
  end
  return run("kill -0 " .. pid) == 0
end

-- SIGKILLs an nginx master and its worker, which would outlive a killed master.
local function kill_hard(pid)
  run("pkill -KILL -P " .. pid .. "; kill -KILL " .. pid)
end

local function wait_until(timeout, pred)
  local deadline = socket.gettime() + timeout
  repeat
    if pred() then return true end
    socket.sleep(0.02)
  until socket.gettime() > deadline
  return pred()
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

-- Servers not yet stopped. Keeps them (and their gc guards) alive as long as this
-- module is, even if a spec drops its reference.
local running = {}

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
  running[self] = nil
  local pid = self.pid
  if pid and alive(pid) then
    -- TERM is nginx's fast shutdown: it does not wait for idle keep-alive clients.
    run("kill -TERM " .. pid)
    if not wait_until(STOP_TIMEOUT, function() return not alive(pid) end) then
      kill_hard(pid)
      wait_until(STOP_TIMEOUT, function() return not alive(pid) end)
    end
  end
  if self.proc then
    self.proc:close()  -- waits for (reaps) the nginx master, our child
    self.proc = nil
  end
  run("rm -rf " .. shell_quote(self.prefix))
end

-- Error log contents, for diagnostics.
function Server:error_log()
  return read_file(self.prefix .. "/error.log") or ""
end

---------------------------------------------------------------------------
-- Start-up
---------------------------------------------------------------------------

local function render(template, vars)
  return (template:gsub("@([%u_]+)@", function(name)
    local v = vars[name]
    if v == nil then error("testserver: template has unknown placeholder @" .. name .. "@") end
    return v
  end))
end

-- Tries one port. Returns true on success, or false, the error log and whether the
-- port was taken by someone else (so a fresh one is worth trying).
local function launch(self, nginx, vars, template)
  vars.PORT = tostring(self.port)
  write_file(self.prefix .. "/nginx.conf", render(template, vars))
  run("rm -f " .. shell_quote(self.prefix .. "/error.log"))  -- from a previous attempt

  -- nginx runs in the foreground ("daemon off") as a child of this Lua process,
  -- through io.popen: closing the handle in stop() reaps it. A daemonised nginx is
  -- re-parented to PID 1, which in some containers never reaps it and leaves a
  -- zombie behind. As a bonus nginx shares our process group, so Ctrl-C stops it too.
  -- The shell prints its pid, then exec's nginx, so that pid is nginx's.
  -- -e makes nginx log errors from before the config is read to error.log too;
  -- anything else it prints (e.g. a bad command line) goes to nginx.out.
  -- LD_PRELOAD is dropped for nginx: `make asan` preloads libasan into the Lua
  -- interpreter, and nginx must not inherit it.
  self.proc = assert(io.popen("echo $$; unset LD_PRELOAD; exec " .. shell_quote(nginx)
    .. " -p " .. shell_quote(self.prefix .. "/")
    .. " -c " .. shell_quote(self.prefix .. "/nginx.conf")
    .. " -e " .. shell_quote(self.prefix .. "/error.log")
    .. " >" .. shell_quote(self.prefix .. "/nginx.out") .. " 2>&1"))
  self.pid = tonumber(self.proc:read("*l"))

  -- Wait until the worker answers, or nginx exits (a bind failure, a config error).
  local ready = wait_until(START_TIMEOUT, function()
    return not alive(self.pid) or pcall(control, self, "GET", "/_control/ping", nil, 0.5)
  end) and alive(self.pid)
  if ready then return true end

  kill_hard(self.pid)
  self.proc:close()
  self.proc, self.pid = nil, nil
  local text = self:error_log()
  if not text:match("%S") then text = read_file(self.prefix .. "/nginx.out") or "" end
  if not text:match("%S") then text = "(nothing logged)" end
  return false, text, text:find("Address already in use", 1, true) ~= nil
end

-- Stops the server when it is garbage-collected (at the latest when busted closes the
-- Lua state on exit), in case a spec forgot to. The guard must be created after the
-- popen handle: finalisers run newest first, and the handle's own finaliser would
-- otherwise block waiting for a still-running nginx. Lua 5.4 runs __gc on tables;
-- LuaJIT (5.1) only on userdata, hence newproxy.
local function gc_guard(server)
  local function finalise() pcall(Server.stop, server) end
  if newproxy then
    local guard = newproxy(true)
    getmetatable(guard).__gc = finalise
    return guard
  end
  return setmetatable({}, { __gc = finalise })
end

-- Starts a server. opts (all optional): nginx = path of the nginx binary (or
-- $STELLA_NGINX), module_dirs = list of directories holding the two .so modules.
function testserver.start(opts)
  opts = opts or {}
  local nginx = find_nginx(opts)
  local dir = support_dir()
  local template = assert(read_file(dir .. "/nginx/nginx.conf"),
    "testserver: cannot read " .. dir .. "/nginx/nginx.conf")

  local code, out = run("mktemp -d \"${TMPDIR:-/tmp}/stella-test-XXXXXX\"")
  if code ~= 0 then error("testserver: mktemp failed: " .. out, 2) end
  local prefix = out:gsub("%s+$", "")

  local self = setmetatable({ prefix = prefix }, Server)
  -- From here on, any failure must not leave the prefix (or an nginx) behind.
  local ok, err = pcall(function()
    local vars = {
      PREFIX = prefix,
      HANDLER_DIR = dir .. "/nginx",
      NDK_MODULE = find_module("ndk_http_module.so", opts),
      LUA_MODULE = find_module("ngx_http_lua_module.so", opts),
      -- A root master would run its worker as "nobody", which may not be able to
      -- read the handler in the checkout or the 0700 prefix; keep it as root.
      -- Non-root nginx ignores "user" with a warning, so only emit it for root.
      USER_DIRECTIVE = is_root() and "user root;" or "",
    }
    local started, log, retry
    for _ = 1, BIND_ATTEMPTS do
      self.port = free_port()
      self.url = "http://127.0.0.1:" .. self.port
      started, log, retry = launch(self, nginx, vars, template)
      if started or not retry then break end
    end
    if not started then
      error("testserver: nginx failed to start. Last lines of its error log:\n" .. tail(log, 15), 0)
    end
  end)
  if not ok then
    self:stop()
    error(err, 2)
  end
  self.gc_guard = gc_guard(self)
  running[self] = true
  return self
end

return testserver
