-- A real redis-server for the specs: started in the foreground as a child of this Lua
-- process (like stella.nginx does with nginx), on a free 127.0.0.1 port (and ::1 when the
-- machine has it), in a temporary directory; stopped with stop(), killed with kill(),
-- started again on the same port and data directory with start(). Runs under Lua 5.4 and
-- LuaJIT; needs luasocket.
--
--   local redis_server = require "support.redis"
--   local srv = redis_server.start{
--     requirepass = "secret",                        -- the default user's password
--     users = { { name = "app", password = "pw", rules = "~* &* +@all" } },   -- ACL users
--     appendonly = true, appendfsync = "everysec",   -- AOF (default: off; save "" always)
--     extra = { "unixsocket @DIR@/redis.sock" },      -- more redis.conf lines
--   }
--   srv.host, srv.port, srv.dir, srv:url{ user =, password =, db = }, srv:running(),
--   srv:stop() (SHUTDOWN by SIGTERM), srv:kill() (SIGKILL), srv:start() (again, same
--   port and dir), srv:log(), srv:remove() (stop and delete the directory)
--   redis_server.resp(...)  a command in RESP, for a spec's own raw connection
local socket = require "socket"
local nginx = require "stella.nginx"   -- the shell, file, port and wait helpers

local M = {}

M.SERVER = os.getenv("STELLA_REDIS_SERVER") or "/usr/bin/redis-server"
local START_TIMEOUT = 10
local STOP_TIMEOUT = 10

local Server = {}
Server.__index = Server

-- A RESP command.
function M.resp(...)
  local parts = { "*" .. select("#", ...) .. "\r\n" }
  for i = 1, select("#", ...) do
    local a = tostring((select(i, ...)))
    parts[#parts + 1] = "$" .. #a .. "\r\n" .. a .. "\r\n"
  end
  return table.concat(parts)
end
local resp = M.resp

-- Ready: PING answers +PONG (after AUTH when there is a password). While it loads its AOF
-- the server answers -LOADING, and before AUTH -NOAUTH even while loading.
local function ready(host, port, password)
  local c = socket.tcp()
  c:settimeout(0.5)
  local ok = c:connect(host, port)
  if not ok then c:close() return false end
  c:send((password and resp("AUTH", password) or "") .. resp("PING"))
  local line = password and c:receive("*l")
  if password and line ~= "+OK" then c:close() return false end
  line = c:receive("*l")
  c:close()
  return line == "+PONG"
end

local function ipv6_loopback()
  if not socket.tcp6 then return false end
  local s = socket.tcp6()
  local ok = s:bind("::1", 0)
  s:close()
  return ok == 1 or ok == true
end

-- A redis.conf argument: double-quoted, with \ and " escaped.
local function conf_quote(s)
  return '"' .. s:gsub('[\\"]', "\\%0") .. '"'
end

function Server:config()
  local o = self.opts
  local lines = {
    "port " .. self.port,
    "bind 127.0.0.1" .. (self.ipv6 and " ::1" or ""),
    "daemonize no",
    "dir " .. self.dir,
    "logfile " .. self.dir .. "/redis.log",
    "pidfile " .. self.dir .. "/redis.pid",
    'save ""',
    "appendonly " .. (o.appendonly and "yes" or "no"),
    "appendfsync " .. (o.appendfsync or "everysec"),
    "databases 16",
    "enable-debug-command local",   -- DEBUG SLEEP: a slow command for the timeout specs
  }
  if o.requirepass then lines[#lines + 1] = "requirepass " .. conf_quote(o.requirepass) end
  for _, u in ipairs(o.users or {}) do
    lines[#lines + 1] = ("user %s on %s %s"):format(u.name, conf_quote(">" .. u.password), u.rules or "~* &* +@all")
  end
  for _, line in ipairs(o.extra or {}) do   -- more lines; @DIR@ is the directory
    lines[#lines + 1] = (line:gsub("@DIR@", function() return self.dir end))
  end
  return table.concat(lines, "\n") .. "\n"
end

function Server:running()
  return self.pid ~= nil and nginx.alive(self.pid)
end

function Server:log()
  return nginx.read_file(self.dir .. "/redis.log") or ""
end

-- Starts (again) on self.port with self.dir. true, or nil and the end of the log.
function Server:launch()
  assert(not self:running(), "redis-server is already running")
  assert(nginx.write_file(self.dir .. "/redis.conf", self:config()))
  -- The shell prints its pid and exec's redis-server (so that pid is the server's); no
  -- LD_PRELOAD (make asan's sanitizer runtime belongs to the Lua interpreter only).
  self.proc = assert(io.popen("echo $$; unset LD_PRELOAD; exec " .. nginx.shell_quote(M.SERVER) .. " "
    .. nginx.shell_quote(self.dir .. "/redis.conf") .. " >>" .. nginx.shell_quote(self.dir .. "/redis.out")
    .. " 2>&1"))
  self.pid = tonumber(self.proc:read("*l"))
  -- Finalisers run newest first: this guard, newer than the popen handle, stops the server
  -- before the handle's own finaliser would wait for it (at the latest when Lua exits). All
  -- guards live as long as the server object: an old one must not stop a newer process.
  self.guards[#self.guards + 1] = nginx.gc_guard(function() self:remove() end)   -- removed when collected
  local up = nginx.wait_until(START_TIMEOUT, function()
    return not nginx.alive(self.pid) or ready("127.0.0.1", self.port, self.opts.requirepass)
  end) and nginx.alive(self.pid)
  if up then return true end
  self:kill()
  local log = self:log() .. (nginx.read_file(self.dir .. "/redis.out") or "")
  return nil, nginx.tail(log, 12)
end

-- Waits for (reaps) the server after a signal.
local function reap(self, signal)
  local pid = self.pid
  if pid and nginx.alive(pid) then
    nginx.run("kill -" .. signal .. " " .. pid)
    if not nginx.wait_until(STOP_TIMEOUT, function() return not nginx.alive(pid) end) then
      nginx.run("kill -KILL " .. pid)
      nginx.wait_until(STOP_TIMEOUT, function() return not nginx.alive(pid) end)
    end
  end
  if self.proc then self.proc:close() end
  self.proc, self.pid = nil, nil
end

function Server:stop() reap(self, "TERM") end   -- redis-server shuts down cleanly (AOF flushed)
function Server:kill() reap(self, "KILL") end   -- as a crash would: nothing flushed

function Server:start()
  return self:launch()
end

function Server:remove()
  self:stop()
  nginx.remove_dir(self.dir)
end

-- redis://[[user]:password@]host:port[/db]; opts.host "::1" gives [::1].
function Server:url(opts)
  opts = opts or {}
  local host = opts.host or self.host
  if host:find(":", 1, true) then host = "[" .. host .. "]" end
  local auth = ""
  if opts.password then auth = (opts.user or "") .. ":" .. opts.password .. "@" end
  return "redis://" .. auth .. host .. ":" .. (opts.port or self.port) .. (opts.db and "/" .. opts.db or "")
end

function M.start(opts)
  opts = opts or {}
  assert(nginx.file_exists(M.SERVER), M.SERVER .. " not found (install redis-server: make deps)")
  local dir = assert(nginx.temp_dir("stella-redis"))
  local srv = setmetatable({ opts = opts, dir = dir, host = "127.0.0.1", ipv6 = ipv6_loopback(), guards = {} },
                           Server)
  local ok, log
  for _ = 1, 5 do   -- another process may take the free port first
    srv.port = opts.port or nginx.free_port()
    ok, log = srv:launch()
    if ok or opts.port or not log:find("Address already in use", 1, true) then break end
  end
  if not ok then
    nginx.remove_dir(dir)
    error("support.redis: redis-server failed to start:\n" .. tostring(log), 2)
  end
  return srv
end

-- A port nothing listens on (bound and released: connecting to it is refused).
function M.closed_port()
  return nginx.free_port()
end

return M
