-- stella.nginx: runs nginx with its Lua module from a config template, the way the sandbox
-- (stella.sandbox) and the specs' servers (spec/support/) do: in the foreground, as a child
-- of this Lua process, in a prefix directory, on loopback ports; waits until it answers;
-- stops it. Also the small shell and file helpers those need. Runs under Lua 5.4 and
-- LuaJIT; free ports and sub-second waits need luasocket.
--
--   local nginx = require "stella.nginx"
--   local prefix = assert(nginx.temp_dir("stella-x"))
--   local n, log, in_use = nginx.start{
--     nginx = assert(nginx.find_nginx()), prefix = prefix, temporary = true,
--     config = "... listen 127.0.0.1:@PORT@; ...",   -- @NAME@ placeholders, or function(vars)
--     vars = { ... }, ports = { "PORT" },             -- a free port for each name
--     ready = function(n) return ... end,             -- is it answering on n.url?
--   }
--   n.url, n.port, n.ports.PORT, n.pid, n:running(), n:error_log(), n:pids(), n:stop()
--
-- nginx runs in the foreground ("daemon off" in the config, or globals below) through
-- io.popen, so closing the handle in stop() reaps it: a daemonised nginx is re-parented to
-- PID 1, which in some containers never reaps it. It shares our process group, so Ctrl-C
-- stops it too.
local ok_socket, socket = pcall(require, "socket")

local M = {}

local START_TIMEOUT = 10   -- seconds for nginx to answer
local STOP_TIMEOUT = 5     -- seconds for nginx to exit after TERM (then KILL)
local BIND_ATTEMPTS = 5    -- fresh ports to try when another process takes ours
local MODULE_DIRS = { "/usr/lib/nginx/modules", "/usr/share/nginx/modules" }
local NGINX_CANDIDATES = { "/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx" }

---------------------------------------------------------------------------
-- Shell and file helpers
---------------------------------------------------------------------------

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Runs a shell command; returns its exit code and combined stdout/stderr. Goes through
-- io.popen because os.execute returns different things in 5.1 and 5.4.
local function run(cmd)
  local p = assert(io.popen("(" .. cmd .. ") 2>&1; echo \"@exit=$?\""))
  local out = p:read("*a")
  p:close()
  return tonumber(out:match("@exit=(%d+)%s*$")), (out:gsub("@exit=%d+%s*$", ""))
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

-- true, or nil and a message
local function write_file(path, text)
  local f, err = io.open(path, "wb")
  if not f then return nil, err end
  local ok, werr = f:write(text)
  f:close()
  if not ok then return nil, werr end
  return true
end

-- The last n lines of text.
local function tail(text, n)
  local lines = {}
  for line in (text or ""):gmatch("[^\n]+") do lines[#lines + 1] = line end
  return table.concat(lines, "\n", math.max(1, #lines - n + 1))
end

local function absolute(path)
  if path:sub(1, 1) == "/" then return path end
  local _, cwd = run("pwd")
  return cwd:gsub("%s+$", "") .. "/" .. path:gsub("^%./", "")
end

local function is_root()
  local _, out = run("id -u")
  return out:match("^%s*0%s*$") ~= nil
end

-- A new directory under $TMPDIR (or /tmp) named NAME-XXXXXX; or nil and a message.
local function temp_dir(name)
  local code, out = run("mktemp -d \"${TMPDIR:-/tmp}/" .. name .. "-XXXXXX\"")
  if code ~= 0 then return nil, "mktemp failed: " .. out end
  return (out:gsub("%s+$", ""))
end

local function remove_dir(path)
  run("rm -rf " .. shell_quote(path))
end

M.shell_quote, M.run, M.file_exists, M.read_file, M.write_file = shell_quote, run, file_exists, read_file, write_file
M.tail, M.absolute, M.is_root, M.temp_dir, M.remove_dir = tail, absolute, is_root, temp_dir, remove_dir

---------------------------------------------------------------------------
-- Time and processes
---------------------------------------------------------------------------

local function sleep(s)
  if ok_socket then socket.sleep(s) else run("sleep " .. s) end
end

local function clock()
  if ok_socket then return socket.gettime() end
  return os.time()
end

-- Calls pred() every 20 ms until it is true or timeout seconds have passed.
local function wait_until(timeout, pred)
  local deadline = clock() + timeout
  repeat
    if pred() then return true end
    sleep(0.02)
  until clock() > deadline
  return pred()
end

-- A pid counts as gone when it no longer exists or is a zombie: nginx is our child and
-- stays a zombie until stop() closes its popen handle.
local function alive(pid)
  local stat = read_file("/proc/" .. pid .. "/stat")
  if stat then return stat:match("^%d+ %b() (%a)") ~= "Z" end
  return run("kill -0 " .. pid .. " 2>/dev/null") == 0
end

-- SIGKILLs an nginx master and its workers, which would outlive a killed master.
local function kill_hard(pid)
  run("pkill -KILL -P " .. pid .. "; kill -KILL " .. pid)
end

-- The children of pid (an nginx master's workers).
local function children(pid)
  local _, out = run("pgrep -P " .. pid)
  local list = {}
  for p in out:gmatch("%d+") do list[#list + 1] = tonumber(p) end
  return list
end

-- Asks the kernel for an unused port: bind to port 0, read it back, release it. Another
-- process may grab it before nginx binds; start() retries in that case.
local function free_port()
  if not ok_socket then error("stella.nginx: a free port needs luasocket", 2) end
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

M.sleep, M.clock, M.wait_until, M.alive, M.kill_hard, M.free_port = sleep, clock, wait_until, alive, kill_hard, free_port

---------------------------------------------------------------------------
-- Finding nginx and its modules
---------------------------------------------------------------------------

-- opts.nginx, $STELLA_NGINX, the usual places, then $PATH. The path, or nil and a message.
function M.find_nginx(opts)
  local explicit = opts and opts.nginx or os.getenv("STELLA_NGINX")
  if explicit then return explicit end
  for _, path in ipairs(NGINX_CANDIDATES) do
    if file_exists(path) then return path end
  end
  local code, out = run("command -v nginx")
  if code == 0 and out:match("%S") then return (out:gsub("%s+$", "")) end
  return nil, "nginx not found (install nginx and libnginx-mod-http-lua: make deps; or set STELLA_NGINX)"
end

-- A dynamic module (ndk_http_module.so, ngx_http_lua_module.so) in opts.module_dirs or
-- Debian's directories. The path, or nil and a message.
function M.find_module(name, opts)
  local dirs = opts and opts.module_dirs or MODULE_DIRS
  for _, dir in ipairs(dirs) do
    if file_exists(dir .. "/" .. name) then return dir .. "/" .. name end
  end
  return nil, name .. " not found in " .. table.concat(dirs, ", ") .. " (install libnginx-mod-http-lua)"
end

-- LuaJIT's own module directories (as its luaconf.h and Debian's packages lay them out),
-- those that exist: where nginx's Lua finds resty.core, cjson and the like.
local LUAJIT_SHARE = { "/usr/local/share/lua/5.1", "/usr/share/lua/5.1" }
local LUAJIT_LIB = { "/usr/local/lib/lua/5.1", "/usr/lib/lua/5.1" }

-- The values of lua_package_path and lua_package_cpath for an nginx whose Lua is LuaJIT:
-- the given directories first (opts.lua_dirs: ?.lua and ?/init.lua; opts.lib_dirs: ?.so),
-- then LuaJIT's own. Complete paths, without ";;": nginx's ";;" stands for LuaJIT's
-- default, which is $LUA_PATH/$LUA_CPATH when the caller has them set, and a LUA_CPATH
-- meant for Lua 5.4 (eval "$(luarocks path)") would load 5.4 modules into LuaJIT.
function M.lua_paths(opts)
  local share, lib = {}, {}
  for _, d in ipairs(opts.lua_dirs or {}) do share[#share + 1] = d end
  for _, d in ipairs(opts.lib_dirs or {}) do lib[#lib + 1] = d end
  for _, d in ipairs(LUAJIT_SHARE) do share[#share + 1] = d end
  lib[#lib + 1] = LUAJIT_LIB[1]
  local _, multiarch = run("ls -d /usr/lib/*/lua/5.1 2>/dev/null")   -- Debian's multiarch directory
  for d in multiarch:gmatch("[^\n]+") do lib[#lib + 1] = d end
  lib[#lib + 1] = LUAJIT_LIB[2]
  local path, cpath, seen = {}, {}, {}
  for _, d in ipairs(share) do
    if not seen[d] then
      seen[d] = true
      path[#path + 1] = d .. "/?.lua;" .. d .. "/?/init.lua"
    end
  end
  for _, d in ipairs(lib) do
    if not seen[d] then
      seen[d] = true
      cpath[#cpath + 1] = d .. "/?.so"
    end
  end
  return table.concat(path, ";"), table.concat(cpath, ";")
end

-- Replaces each @NAME@ with tostring(vars.NAME); an unknown name raises "WHO: ...".
function M.render(template, vars, who)
  return (template:gsub("@([%u_]+)@", function(name)
    local v = vars[name]
    if v == nil then
      error((who or "stella.nginx") .. ": the nginx.conf template has an unknown placeholder @" .. name .. "@", 0)
    end
    return tostring(v)
  end))
end

---------------------------------------------------------------------------
-- A running nginx
---------------------------------------------------------------------------

local Nginx = {}
Nginx.__index = Nginx

-- Started and not yet stopped: keeps them (and their gc guards) alive as long as this
-- module is, even if the caller drops its reference.
local running = {}

function Nginx:running()
  return self.pid ~= nil and not self.stopped and alive(self.pid)
end

function Nginx:error_log()
  return read_file(self.prefix .. "/error.log") or ""
end

-- The master and its workers, while they run.
function Nginx:pids()
  local list = {}
  if self.pid and alive(self.pid) then
    list[1] = self.pid
    for _, c in ipairs(children(self.pid)) do list[#list + 1] = c end
  end
  return list
end

-- Stops nginx (TERM, its fast shutdown, which does not wait for idle keep-alive clients;
-- KILL after stop_timeout), reaps it and removes a temporary prefix. Safe to call more
-- than once, and after nginx was stopped from elsewhere.
function Nginx:stop()
  if self.stopped then return end
  self.stopped = true
  running[self] = nil
  local pid = self.pid
  if pid and alive(pid) then
    run("kill -TERM " .. pid)
    if not wait_until(self.stop_timeout, function() return not alive(pid) end) then
      kill_hard(pid)
      wait_until(self.stop_timeout, function() return not alive(pid) end)
    end
  end
  if self.proc then
    self.proc:close()   -- waits for (reaps) the nginx master, our child
    self.proc = nil
  end
  if self.temporary then remove_dir(self.prefix) end
end

-- Blocks until nginx exits, calling on_line(line) for each line of its standard output
-- (started with stdout = true); then stop().
function Nginx:wait(on_line)
  if self.proc and not self.stopped then
    for line in self.proc:lines() do
      if on_line then on_line(line) end
    end
  end
  self:stop()
end

-- A value that calls finalise() when it is garbage-collected (at the latest when the Lua
-- state closes): kept beside a child process (nginx here, redis-server and the bench's
-- delay API in the specs) so that the process is stopped. Create it after the popen handle:
-- finalisers run newest first, and the handle's own finaliser would otherwise block waiting
-- for a still-running child. Lua 5.4 runs __gc on tables; LuaJIT (5.1) only on userdata,
-- hence newproxy. Errors in finalise are ignored.
local function gc_guard(finalise)
  local function run() pcall(finalise) end
  if newproxy then
    local guard = newproxy(true)
    getmetatable(guard).__gc = run
    return guard
  end
  return setmetatable({}, { __gc = run })
end
M.gc_guard = gc_guard

-- One try with the ports in vars. true, or false, the log and whether the port was taken
-- by someone else (so that fresh ports are worth a try).
local function launch(self, opts, vars)
  local okr, text = pcall(function()
    if type(opts.config) == "function" then return opts.config(vars) end
    return M.render(opts.config, vars, opts.who)
  end)
  if not okr then return false, tostring(text), false end
  local conf = self.prefix .. "/nginx.conf"
  local okw, werr = write_file(conf, text)
  if not okw then return false, "cannot write " .. conf .. ": " .. tostring(werr), false end
  os.remove(self.prefix .. "/error.log")   -- from a previous try

  local envs = {}
  for k, v in pairs(opts.env or {}) do envs[#envs + 1] = k .. "=" .. shell_quote(v) end
  -- The shell prints its pid, then exec's nginx, so that pid is nginx's. -e makes nginx
  -- log errors from before the config is read to error.log too; anything else it prints
  -- (a bad command line) goes to nginx.out, as does its standard output unless the caller
  -- reads it (stdout = true: the access log, and EOF when nginx exits). LD_PRELOAD is
  -- dropped: `make asan` preloads libasan into the Lua interpreter, not into nginx.
  local out = shell_quote(self.prefix .. "/nginx.out")
  self.proc = assert(io.popen("echo $$; unset LD_PRELOAD; exec "
    .. (#envs > 0 and "env " .. table.concat(envs, " ") .. " " or "") .. shell_quote(opts.nginx)
    .. " -p " .. shell_quote(self.prefix .. "/")
    .. " -c " .. shell_quote(conf)
    .. " -e " .. shell_quote(self.prefix .. "/error.log")
    .. (opts.globals and " -g " .. shell_quote(opts.globals) or "")
    .. (opts.stdout and " 2>>" .. out or " >" .. out .. " 2>&1")))
  self.pid = tonumber(self.proc:read("*l"))

  -- Wait until it answers, or exits (a bind failure, a config error).
  local ready = opts.ready or function() return true end
  local up = wait_until(opts.timeout or START_TIMEOUT, function()
    return not alive(self.pid) or ready(self)
  end) and alive(self.pid)
  if up then return true end

  kill_hard(self.pid)
  self.proc:close()
  self.proc, self.pid = nil, nil
  local log = self:error_log()
  if not log:match("%S") then log = read_file(self.prefix .. "/nginx.out") or "" end
  if not log:match("%S") then log = "(nothing logged)" end
  return false, log, log:find("Address already in use", 1, true) ~= nil
end

-- Starts nginx; opts:
--   nginx       the binary (M.find_nginx's answer)
--   prefix      an existing directory: nginx.conf, error.log and nginx.out go there
--   temporary   true: stop() (and a failed start) removes the prefix
--   config      the nginx.conf template (@NAME@ placeholders, see M.render), or a
--               function(vars) returning the config text
--   vars        the placeholders' values; PREFIX is added
--   ports       names in vars that get a free 127.0.0.1 port for each try (up to
--               attempts, 5) while another process takes one; a name already set in vars
--               keeps its port, and a clash is then final. n.url is the first one's.
--   ready       function(n) -> true once nginx answers (default: as soon as it runs)
--   timeout     seconds to wait for ready (10); stop_timeout: for an exit after TERM (5)
--   env         { NAME = value } in nginx's environment
--   globals     directives for -g ("daemon off; ...")
--   stdout      true: keep nginx's standard output as the pipe n:wait() reads
--   who         the prefix of a template error ("stella.nginx")
-- Returns the running nginx, or nil, the log (or message), whether a port was in use and
-- the ports of the last try.
function M.start(opts)
  local self = setmetatable({ prefix = opts.prefix, temporary = opts.temporary, ports = {},
                              stop_timeout = opts.stop_timeout or STOP_TIMEOUT }, Nginx)
  local names = opts.ports or {}
  local fixed = true
  for _, name in ipairs(names) do
    if opts.vars == nil or opts.vars[name] == nil then fixed = false end
  end
  local started, log, in_use
  for _ = 1, (fixed and 1 or opts.attempts or BIND_ATTEMPTS) do
    local vars = {}
    for k, v in pairs(opts.vars or {}) do vars[k] = v end
    if vars.PREFIX == nil then vars.PREFIX = self.prefix end
    for _, name in ipairs(names) do
      if vars[name] == nil then vars[name] = free_port() end
      self.ports[name] = tonumber(vars[name])
    end
    self.vars, self.port = vars, self.ports[names[1]]
    self.url = self.port and "http://127.0.0.1:" .. self.port or nil
    local ok, a, b, c = pcall(launch, self, opts, vars)
    if ok then
      started, log, in_use = a, b, c
    else   -- a ready() that raised, say: leave no nginx behind
      if self.pid then kill_hard(self.pid) end
      if self.proc then self.proc:close() end
      self.proc, self.pid = nil, nil
      started, log, in_use = false, tostring(a), false
    end
    if started or not in_use then break end
  end
  if not started then
    self.stopped = true
    if self.temporary then remove_dir(self.prefix) end
    return nil, log, in_use, self.ports
  end
  self.gc_guard = gc_guard(function() Nginx.stop(self) end)
  running[self] = true
  return self
end

return M
