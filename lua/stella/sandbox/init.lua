-- stella.sandbox: starts and stops the local Requests API sandbox, a real nginx with its
-- Lua module answering like the service (see stella.sandbox.server for what it answers,
-- files/config.lua beside this module for the company it pretends to be). Runs under Lua 5.4 and LuaJIT;
-- needs luasocket. nginx itself runs LuaJIT with the C core built for it
-- (make LUA=luajit -> build/luajit/stella/core.so).
--
--   local sandbox = require "stella.sandbox"
--   local sb = assert(sandbox.start{ port = 0 })     -- 0: any free port
--   print(sb.url, sb.config.keys.test)
--   ...
--   sb:stop()
--
-- start(opts), every field optional:
--   port             default 8787; 0 picks a free 127.0.0.1 port
--   config           a config file (default files/config.lua beside this module) or a
--                    table (written to the prefix as a file)
--   prefix           nginx's directory (config, logs, pid file); created when missing and
--                    kept. Default: a new temporary directory, removed by stop()
--   access_log       true: nginx writes one line per request to its standard output,
--                    which wait() relays
--   extra_locations  nginx text added to the server block (the benchmark's baseline)
--   nginx, module_dirs, core_dir   where nginx, its modules and stella/core.so (LuaJIT
--                    build) are; also $STELLA_NGINX, $STELLA_SANDBOX_CORE
--   sandbox_dir      where the sandbox's files are; also $STELLA_SANDBOX_DIR
-- Returns the sandbox or nil, message. A sandbox has url, port, pid, pid_file, prefix,
-- config (normalised), config_file and the methods stop(), wait(on_line), running(),
-- error_log().
--
-- nginx runs in the foreground as a child of this process (daemon off, through
-- io.popen), so it shares the terminal's process group: Ctrl-C stops it too. Its pid is
-- also in PREFIX/sandbox.pid, for stopping it from elsewhere: kill -TERM $(cat ...).
local config_mod = require "stella.sandbox.config"
local nginx = require "stella.nginx"

local M = {}

local DEFAULT_PORT = 8787
local START_TIMEOUT = 10
local CORE_CANDIDATES = { "/usr/local/lib/lua/5.1", "/usr/lib/x86_64-linux-gnu/lua/5.1", "/usr/lib/lua/5.1" }

local shell_quote, run, exists, read_file, write_file = nginx.shell_quote, nginx.run, nginx.file_exists,
  nginx.read_file, nginx.write_file
local absolute, alive = nginx.absolute, nginx.alive
M.alive = alive

---------------------------------------------------------------------------
-- Where things are
---------------------------------------------------------------------------

-- lua/ (this module's tree), the repository root, the sandbox's files and the LuaJIT
-- core. The files (nginx.conf, config.lua, status.*) are in files/ beside this module,
-- wherever it is: the repository's lua/, or the tree `make install` or `luarocks make`
-- installed the modules into.
function M.paths(opts)
  opts = opts or {}
  local source = debug.getinfo(1, "S").source
  local file = absolute(source:match("^@(.*)$") or "lua/stella/sandbox/init.lua")
  local lua_dir = file:match("^(.*)/stella/sandbox/[^/]*$") or absolute("lua")
  local root = lua_dir:match("^(.*)/[^/]*$") or "."
  local sandbox_dir = opts.sandbox_dir or os.getenv("STELLA_SANDBOX_DIR") or (lua_dir .. "/stella/sandbox/files")
  local core_dir = opts.core_dir or os.getenv("STELLA_SANDBOX_CORE")
  if not core_dir then
    -- a checkout's build; a LuaRocks tree for Lua 5.4 (its rock builds the LuaJIT core
    -- into the lib dir beside stella/core.so); make install's PREFIX or a LuaJIT tree
    -- (lib/lua/5.1 holds the LuaJIT core itself); the usual system directories
    local prefix, abi = lua_dir:match("^(.*)/share/lua/([^/]+)$")
    local candidates = { root .. "/build/luajit" }
    if prefix then
      candidates[#candidates + 1] = prefix .. "/lib/lua/" .. abi .. "/stella/sandbox/luajit"
      candidates[#candidates + 1] = prefix .. "/lib/lua/5.1"
    end
    for _, dir in ipairs(CORE_CANDIDATES) do candidates[#candidates + 1] = dir end
    for _, dir in ipairs(candidates) do
      if exists(dir .. "/stella/core.so") then core_dir = dir break end
    end
  end
  return { lua_dir = lua_dir, root = root, sandbox_dir = absolute(sandbox_dir),
           core_dir = core_dir and absolute(core_dir) or nil }
end

-- Is our nginx answering? Its ping answers with the token it was started with, so
-- another server on the same port does not count.
local function ping(url, token)
  local socket = require "socket"
  local host, port = url:match("^http://([^:/]+):(%d+)")
  local c = socket.tcp()
  c:settimeout(0.5)
  local ok = c:connect(host, tonumber(port))
  if not ok then c:close() return false end
  c:send("GET /_sandbox/ping HTTP/1.1\r\nHost: " .. host .. "\r\nConnection: close\r\n\r\n")
  local text, _, partial = c:receive("*a")
  c:close()
  text = text or partial or ""
  return text:match("^HTTP/1%.%d 200") ~= nil and text:find("ok " .. token, 1, true) ~= nil
end

-- A token for this start (hex, from the kernel's random numbers when it has them).
local function token()
  local f = io.open("/dev/urandom", "rb")
  local bytes = f and f:read(8)
  if f then f:close() end
  if bytes and #bytes == 8 then
    return (bytes:gsub(".", function(ch) return ("%02x"):format(ch:byte()) end))
  end
  return ("%x%x"):format(os.time(), math.floor(nginx.clock() * 1e6) % 0x7fffffff)
end

-- a Lua string literal for the nginx config (inside *_by_lua_block)
local function lua_string(s)
  return ("%q"):format(s):gsub("\\\n", "\\n")
end

---------------------------------------------------------------------------
-- The sandbox object
---------------------------------------------------------------------------

local Sandbox = {}
Sandbox.__index = Sandbox

function Sandbox:running()
  return not self.stopped and self.process ~= nil and self.process:running()
end

function Sandbox:error_log()
  return read_file(self.prefix .. "/error.log") or ""
end

-- Stops nginx (fast shutdown), reaps it, removes the pid file and a temporary prefix.
-- Safe to call more than once, and after nginx was stopped from elsewhere. (Dropped
-- without stop(), the sandbox is stopped by stella.nginx's gc guard; nginx removes its
-- pid file itself on TERM.)
function Sandbox:stop()
  if self.stopped then return end
  self.stopped = true
  if self.process then self.process:stop() end
  os.remove(self.pid_file)
end

-- Blocks until nginx exits (Ctrl-C, kill -TERM of its pid), calling on_line(line) for
-- each access-log line (with access_log = true). Then cleans up as stop() does.
function Sandbox:wait(on_line)
  if self.process and not self.stopped then self.process:wait(on_line) end
  self:stop()
end

---------------------------------------------------------------------------
-- Start-up
---------------------------------------------------------------------------

local ACCESS_LOG = [[log_format stella_sandbox '$time_iso8601 $request_method $request_uri $status $body_bytes_sent ${request_time}s';
    access_log /dev/stdout stella_sandbox;]]

function M.start(opts)
  opts = opts or {}
  if not pcall(require, "socket") then   -- an optional dependency: only the sandbox needs it
    return nil, "the sandbox needs luasocket: install the Debian package lua-socket or the rock luasocket"
  end
  local paths = M.paths(opts)
  if not paths.core_dir then
    return nil, "the C core for LuaJIT is missing (nginx loads stella/core.so built against LuaJIT): "
      .. "in a checkout run `make LUA=luajit`; with LuaRocks install LuaJIT's headers (Debian "
      .. "libluajit2-5.1-dev) and install the rock again; or set STELLA_SANDBOX_CORE to the "
      .. "directory holding stella/core.so"
  end
  local template = read_file(paths.sandbox_dir .. "/nginx.conf")
  if not template then
    return nil, "cannot read " .. paths.sandbox_dir .. "/nginx.conf (set STELLA_SANDBOX_DIR to the directory of the sandbox's files)"
  end
  local binary, nerr = nginx.find_nginx(opts)
  if not binary then return nil, nerr end
  local ndk, merr = nginx.find_module("ndk_http_module.so", opts)
  if not ndk then return nil, merr end
  local lua_mod, lerr = nginx.find_module("ngx_http_lua_module.so", opts)
  if not lua_mod then return nil, lerr end

  local port = opts.port
  if port == nil then port = DEFAULT_PORT end
  if type(port) ~= "number" or port < 0 or port > 65535 or port ~= math.floor(port) then
    return nil, "the port must be a number from 0 to 65535"
  end

  -- the prefix
  local self = setmetatable({ access_log = opts.access_log == true }, Sandbox)
  if opts.prefix then
    self.prefix = absolute(opts.prefix):gsub("/+$", "")
    local code, out = run("mkdir -p " .. shell_quote(self.prefix))
    if code ~= 0 then return nil, "cannot create " .. self.prefix .. ": " .. out end
  else
    local dir, terr = nginx.temp_dir("stella-sandbox")
    if not dir then return nil, terr end
    self.prefix, self.temporary = dir, true
  end
  self.pid_file = self.prefix .. "/sandbox.pid"
  local old = tonumber((read_file(self.pid_file) or ""):match("%d+"))
  if old and alive(old) and (read_file("/proc/" .. old .. "/cmdline") or ""):find("nginx", 1, true) then
    return nil, ("a sandbox is already running in %s (pid %d): stop it first (kill -TERM %d)")
      :format(self.prefix, old, old)
  end

  -- the config: checked here, so a mistake is reported before nginx starts
  local conf, cerr, config_file
  if type(opts.config) == "table" then
    conf, cerr = config_mod.check(opts.config)
    if conf then
      config_file = self.prefix .. "/config.lua"
      local ok, werr = write_file(config_file, config_mod.serialize(opts.config))
      if not ok then cerr = "cannot write " .. config_file .. ": " .. tostring(werr) end
    end
  else
    config_file = absolute(opts.config or (paths.sandbox_dir .. "/config.lua"))
    conf, cerr = config_mod.load(config_file)
  end
  if not conf or cerr then
    if self.temporary then nginx.remove_dir(self.prefix) end
    return nil, cerr
  end
  self.config, self.config_file = conf, config_file

  local lua_path, lua_cpath = nginx.lua_paths{ lua_dirs = { paths.lua_dir }, lib_dirs = { paths.core_dir } }
  local vars = {
    PID_FILE = self.pid_file,
    NDK_MODULE = ndk,
    LUA_MODULE = lua_mod,
    USER_DIRECTIVE = nginx.is_root() and "user root;" or "",
    ACCESS_LOG = self.access_log and ACCESS_LOG or "access_log off;",
    LUA_PATH = lua_path,
    LUA_CPATH = lua_cpath,
    CONFIG_FILE = lua_string(config_file),
    SANDBOX_DIR = lua_string(paths.sandbox_dir),
    EXTRA_LOCATIONS = opts.extra_locations or "",
    TOKEN = token(),
    PORT = port ~= 0 and port or nil,   -- 0: a free port (another is tried if one is taken)
  }
  -- nginx's standard output stays the pipe (the access log, when on, and EOF when nginx
  -- exits: wait() relies on it)
  local process, log, in_use, ports = nginx.start{
    nginx = binary, prefix = self.prefix, temporary = self.temporary, who = "sandbox",
    config = template, vars = vars, ports = { "PORT" }, stdout = true, timeout = START_TIMEOUT,
    ready = function(n) return ping(n.url, vars.TOKEN) end,
  }
  if not process then
    self.stopped = true
    self.port = ports.PORT or port
    if in_use then
      return nil, ("127.0.0.1:%d is in use (another sandbox?): stop it or choose another port"):format(self.port)
    end
    return nil, "nginx failed to start on port " .. tostring(self.port) .. ":\n" .. nginx.tail(log, 12)
  end
  self.process, self.pid, self.port, self.url = process, process.pid, process.port, process.url
  return self
end

return M
