-- Starts an nginx (with its Lua module) from a config template, for spec/openresty_spec.lua:
-- the webhook of examples/openresty/ plus whatever server blocks a spec adds. Same way of
-- running nginx as spec/support/testserver.lua: in the foreground, as a child of this Lua
-- process (io.popen), on free 127.0.0.1 ports, in a temporary prefix removed by stop().
-- Runs under Lua 5.4 and LuaJIT; needs luasocket.
--
--   local harness = require "support.openresty.harness"
--   local n = harness.start{
--     template = "examples/openresty/nginx.conf",     -- @NAME@ placeholders
--     vars = { STELLA_ROOT = ..., ... },             -- PREFIX and the ports are added
--     ports = { "PORT", "SELFTEST_PORT" },           -- a free port for each name
--     http = "server { ... }",                       -- appended inside the http block
--     env = { STELLA_TEST_KEY = "..." },             -- environment of nginx
--     probe = { port = "SELFTEST_PORT", path = "/selftest?case=ping" },
--   }
--   n.ports.PORT, n.url (http://127.0.0.1:PORT), n:error_log(), n:pids(), n:stop()
local socket = require "socket"

local M = {}

local START_TIMEOUT = 10
local STOP_TIMEOUT = 5
local BIND_ATTEMPTS = 5
local MODULE_DIRS = { "/usr/lib/nginx/modules", "/usr/share/nginx/modules" }

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function run(cmd)
  local p = assert(io.popen("(" .. cmd .. ") 2>&1; echo \"@exit=$?\""))
  local out = p:read("*a")
  p:close()
  return tonumber(out:match("@exit=(%d+)%s*$")), (out:gsub("@exit=%d+%s*$", ""))
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

local function write_file(path, text)
  local f = assert(io.open(path, "wb"))
  assert(f:write(text))
  assert(f:close())
end

M.read_file, M.write_file, M.run, M.shell_quote = read_file, write_file, run, shell_quote

function M.find_module(name)
  for _, dir in ipairs(MODULE_DIRS) do
    if read_file(dir .. "/" .. name) then return dir .. "/" .. name end
  end
  error("harness: " .. name .. " not found (install libnginx-mod-http-lua)", 0)
end

function M.nginx()
  local explicit = os.getenv("STELLA_NGINX")
  if explicit then return explicit end
  for _, p in ipairs{ "/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx" } do
    if read_file(p) then return p end
  end
  error("harness: nginx not found (install nginx, or set STELLA_NGINX)", 0)
end

function M.is_root()
  local _, out = run("id -u")
  return out:match("^%s*0%s*$") ~= nil
end

function M.free_port()
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

-- True while pid exists and is not a zombie.
function M.alive(pid)
  local stat = read_file("/proc/" .. pid .. "/stat")
  if stat then return stat:match("^%d+ %b() (%a)") ~= "Z" end
  return false
end

local function wait_until(timeout, pred)
  local deadline = socket.gettime() + timeout
  repeat
    if pred() then return true end
    socket.sleep(0.02)
  until socket.gettime() > deadline
  return pred()
end
M.wait_until = wait_until

-- The children of pid (nginx workers).
local function children(pid)
  local _, out = run("pgrep -P " .. pid)
  local list = {}
  for p in out:gmatch("%d+") do list[#list + 1] = tonumber(p) end
  return list
end

local function render(template, vars)
  return (template:gsub("@([%u_]+)@", function(name)
    local v = vars[name]
    if v == nil then error("harness: the template has an unknown placeholder @" .. name .. "@", 0) end
    return tostring(v)
  end))
end

-- One HTTP GET with luasocket; returns status, body or nil, err.
local function probe(port, path, timeout)
  local c = socket.tcp()
  c:settimeout(timeout)
  local ok, err = c:connect("127.0.0.1", port)
  if not ok then c:close() return nil, err end
  c:send("GET " .. path .. " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
  local data = c:receive("*a")
  c:close()
  local status = data and tonumber(data:match("^HTTP/1%.%d (%d%d%d)"))
  return status
end

local Nginx = {}
Nginx.__index = Nginx

function Nginx:error_log()
  return read_file(self.prefix .. "/error.log") or ""
end

-- The master and its workers, while they run.
function Nginx:pids()
  local list = {}
  if self.pid and M.alive(self.pid) then
    list[1] = self.pid
    for _, c in ipairs(children(self.pid)) do list[#list + 1] = c end
  end
  return list
end

function Nginx:stop()
  if self.stopped then return end
  self.stopped = true
  local pid = self.pid
  if pid and M.alive(pid) then
    local workers = children(pid)
    run("kill -TERM " .. pid)
    if not wait_until(STOP_TIMEOUT, function() return not M.alive(pid) end) then
      for _, w in ipairs(workers) do run("kill -KILL " .. w) end
      run("kill -KILL " .. pid)
      wait_until(STOP_TIMEOUT, function() return not M.alive(pid) end)
    end
  end
  if self.proc then self.proc:close() self.proc = nil end
  if self.prefix and not os.getenv("STELLA_KEEP_PREFIX") then run("rm -rf " .. shell_quote(self.prefix)) end
end

local function launch(self, opts, vars, template)
  local text = render(template, vars)
  if opts.http then
    local head = text:match("^(.*)}%s*$")
    if not head then error("harness: the template does not end with the http block's }", 0) end
    text = head .. render(opts.http, vars) .. "\n}\n"
  end
  write_file(self.prefix .. "/nginx.conf", text)
  run("rm -f " .. shell_quote(self.prefix .. "/error.log"))
  local envs = {}
  for k, v in pairs(opts.env or {}) do envs[#envs + 1] = k .. "=" .. shell_quote(v) end
  local globals = "daemon off; master_process on;" .. (M.is_root() and " user root;" or "")
  self.proc = assert(io.popen("echo $$; unset LD_PRELOAD; exec env " .. table.concat(envs, " ")
    .. " " .. shell_quote(M.nginx())
    .. " -p " .. shell_quote(self.prefix .. "/")
    .. " -c " .. shell_quote(self.prefix .. "/nginx.conf")
    .. " -e " .. shell_quote(self.prefix .. "/error.log")
    .. " -g " .. shell_quote(globals)
    .. " >" .. shell_quote(self.prefix .. "/nginx.out") .. " 2>&1"))
  self.pid = tonumber(self.proc:read("*l"))
  local p = opts.probe
  local ready = wait_until(START_TIMEOUT, function()
    return not M.alive(self.pid) or probe(self.ports[p.port], p.path, 0.5) ~= nil
  end) and M.alive(self.pid)
  if ready then return true end
  local workers = children(self.pid)
  for _, w in ipairs(workers) do run("kill -KILL " .. w) end
  run("kill -KILL " .. self.pid)
  self.proc:close()
  self.proc, self.pid = nil, nil
  local log = self:error_log()
  if not log:match("%S") then log = read_file(self.prefix .. "/nginx.out") or "(nothing logged)" end
  return false, log, log:find("Address already in use", 1, true) ~= nil
end

local function gc_guard(n)
  local function finalise() pcall(Nginx.stop, n) end
  if newproxy then
    local g = newproxy(true)
    getmetatable(g).__gc = finalise
    return g
  end
  return setmetatable({}, { __gc = finalise })
end

function M.start(opts)
  local template = assert(read_file(opts.template), "harness: cannot read " .. opts.template)
  local code, out = run("mktemp -d \"${TMPDIR:-/tmp}/stella-openresty-XXXXXX\"")
  if code ~= 0 then error("harness: mktemp failed: " .. out, 2) end
  local self = setmetatable({ prefix = (out:gsub("%s+$", "")), ports = {} }, Nginx)
  local ok, err = pcall(function()
    local started, log, retry
    for _ = 1, BIND_ATTEMPTS do
      local vars = {}
      for k, v in pairs(opts.vars or {}) do vars[k] = v end
      vars.PREFIX = self.prefix
      for _, name in ipairs(opts.ports) do
        self.ports[name] = M.free_port()
        vars[name] = self.ports[name]
      end
      self.vars = vars
      started, log, retry = launch(self, opts, vars, template)
      if started or not retry then break end
    end
    if not started then
      local lines = {}
      for line in log:gmatch("[^\n]+") do lines[#lines + 1] = line end
      error("harness: nginx failed to start:\n" .. table.concat(lines, "\n", math.max(1, #lines - 15)), 0)
    end
  end)
  if not ok then
    self:stop()
    error(err, 2)
  end
  self.url = "http://127.0.0.1:" .. self.ports[opts.ports[1]]
  self.gc_guard = gc_guard(self)
  return self
end

return M
