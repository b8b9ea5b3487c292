-- stella.redis: a connection to Redis, the same in plain Lua and inside OpenResty.
--
--   local redis = require "stella.redis"
--   local conn, err = redis.connect("redis://app:secret@127.0.0.1:6379/2")
--   local conn, err = redis.connect{ url = "redis://...", prefix = "stella:",
--                                    connect_timeout = 2, timeout = 2 }   -- seconds
--   conn:call("SET", "k", "v")                  -> "OK"        | nil, err
--   conn:pipeline{ {"INCR", "n"}, {"GET", "k"} } -> { 1, "v" }  | nil, err  (one round trip)
--   conn:load_library(name, code, version)      -> true, "loaded"|"current"|"newer" | nil, err
--   conn:fcall(fname, keys, args), conn:fcall_ro(...)  -> reply | nil, err
--   conn:fork()  -> a conn of its own to the same server (not connected yet)
--   conn:close(); tostring(conn) -> "stella.redis(redis://app:***@127.0.0.1:6379/2)"
--
-- URL: redis://[[user]:password@]host[:port][/db] (port 6379, db 0; IPv6 as [::1]; user
-- and password percent-decoded), or unix://[[user]:password@]/path/to/redis.sock[?db=N].
-- A password alone authenticates the default user (requirepass), user and password an
-- ACL user. The password is never part of an error, of tostring(conn) or of the object.
--
-- Transport: inside OpenResty, in a phase with cosockets (rewrite, access, content,
-- timer, ssl_cert, ssl_session_fetch), resty.redis or nginx.redis (stella.redis.cosocket)
-- with nginx's keep-alive pool: close() gives the connection back to the pool (options
-- pool, pool_size, keepalive_timeout), and a connection taken from it skips AUTH and
-- SELECT. Such a conn belongs to the request or timer that made it (conn:fork() gives
-- another its own). Everywhere else, the C module stella.redis.core (hiredis), which
-- blocks while it waits.
--
-- Replies: status and bulk strings -> string, integers -> integer, nil -> false (as in
-- Redis' Lua scripting), arrays -> lists; an error reply inside an array or a pipeline is
-- an error value in its place (redis.is_error). Errors: { kind, code, message, retryable }
-- printing as their message; kind "network" (retryable; the connection is dropped and
-- the next call connects again), "redis" (an error reply, code its first word: "ERR",
-- "WRONGTYPE", ...; retryable for LOADING, BUSY, TRYAGAIN, MASTERDOWN, READONLY), "auth"
-- (NOAUTH, WRONGPASS, NOPERM, a refused AUTH), "invalid" (a bad URL). Misuse raises.
--
-- Functions: load_library(name, code, version) loads a library ("#!lua name=NAME ...")
-- with FUNCTION LOAD REPLACE when the server has none or an older version, adding a
-- function NAME_version (no-writes) that returns version: any client can read it with
-- FCALL_RO NAME_version 0. fcall on a server that lost the function (a restart without
-- persistence, FUNCTION FLUSH) loads the conn's libraries (options.libraries, and those
-- given to load_library) once and calls again.
local redact = require("stella.error").redact

local error, ipairs, pairs, select, setmetatable, getmetatable, tonumber, tostring, type, rawget =
      error, ipairs, pairs, select, setmetatable, getmetatable, tonumber, tostring, type, rawget
local unpack, floor = unpack or table.unpack, math.floor
local char, find, format, lower, match, upper = string.char, string.find, string.format, string.lower,
                                               string.match, string.upper

local M = {}

local DEFAULT_PORT = 6379
local DEFAULT_PREFIX = "stella:"
local DEFAULT_CONNECT_TIMEOUT = 2   -- seconds
local DEFAULT_TIMEOUT = 2
local DEFAULT_KEEPALIVE = 60
local KNOWN_OPTIONS = {
  url = true, prefix = true, connect_timeout = true, timeout = true, libraries = true,
  pool = true, pool_size = true, keepalive_timeout = true,
}

local in_cosocket_phase = require("stella.openresty.phase").cosockets

---------------------------------------------------------------------------------------
-- Errors
---------------------------------------------------------------------------------------

local Error = {}
Error.__index = Error
Error.__tostring = function(e) return e.message end

local AUTH_CODES = { NOAUTH = true, WRONGPASS = true, NOPERM = true }
local RETRYABLE_CODES = { LOADING = true, BUSY = true, TRYAGAIN = true, MASTERDOWN = true,
                          READONLY = true, CLUSTERDOWN = true }

function M.is_error(v)
  return type(v) == "table" and getmetatable(v) == Error
end

local function new_error(kind, code, message, retryable)
  return setmetatable({ kind = kind, code = code, message = message,
                        retryable = retryable or kind == "network" }, Error)
end

-- The constructor a connection gives its transport: messages are redacted, network
-- ones name the server.
local function error_maker(where, password)
  return function(kind, code, message)
    message = redact(message, password)
    if kind == "redis" then
      return new_error(AUTH_CODES[code] and "auth" or "redis", code, message, RETRYABLE_CODES[code] == true)
    end
    return new_error(kind, code, "redis " .. where .. ": " .. message)
  end
end

---------------------------------------------------------------------------------------
-- URLs
---------------------------------------------------------------------------------------

local function percent_decode(s)
  if find(s, "%%[^%x]") or find(s, "%%%x?$") then return nil end
  return (s:gsub("%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
end

-- The parts of a redis:// or unix:// URL: { host, port, path, db, user, password }, or
-- nil and a message (which never repeats the URL: it may hold a password).
function M.parse_url(url)
  if type(url) ~= "string" then error("stella.redis: the URL must be a string", 2) end
  local scheme, rest = match(url, "^(%a[%w+.-]*)://(.*)$")
  scheme = scheme and lower(scheme)
  if scheme == "rediss" then return nil, "invalid redis URL: rediss:// (TLS) is not supported" end
  if scheme ~= "redis" and scheme ~= "unix" then
    return nil, "invalid redis URL: expected redis://[[user]:password@]host[:port][/db]"
  end
  local u = { db = 0 }
  local userinfo, hostpart = match(rest, "^(.*)@(.-)$")
  if userinfo then
    local user, password = match(userinfo, "^([^:]*):(.*)$")
    if not user then
      return nil, "invalid redis URL: the part before @ must be user:password or :password"
    end
    u.user, u.password = percent_decode(user), percent_decode(password)
    if not u.user or not u.password then return nil, "invalid redis URL: bad %-escape before @" end
    if u.user == "" then u.user = nil end
    if u.password == "" then return nil, "invalid redis URL: empty password" end
  else
    hostpart = rest
  end
  if scheme == "unix" then
    local path, query = match(hostpart, "^(/[^?]*)(.*)$")
    if not path or path == "/" then return nil, "invalid redis URL: unix:// needs a socket path" end
    if query ~= "" then
      local db = match(query, "^%?db=(%d+)$")
      if not db then return nil, "invalid redis URL: unix:// accepts only ?db=N after the path" end
      u.db = tonumber(db)
    end
    u.path = path
  else
    local host, tail = match(hostpart, "^%[([%x:.]+)%](.*)$")
    if not host then host, tail = match(hostpart, "^([%w.%-_]+)(.*)$") end
    if not host then return nil, "invalid redis URL: no host" end
    u.host = host
    local port, after = match(tail, "^:(%d+)(.*)$")
    if port then
      u.port, tail = tonumber(port), after
      if u.port < 1 or u.port > 65535 then return nil, "invalid redis URL: port must be 1-65535" end
    elseif tail:sub(1, 1) == ":" then
      return nil, "invalid redis URL: port must be a number"
    else
      u.port = DEFAULT_PORT
    end
    if tail ~= "" and tail ~= "/" then
      local db = match(tail, "^/(%d+)$")
      if not db then return nil, "invalid redis URL: expected /DB (a number) after the host" end
      u.db = tonumber(db)
    end
  end
  if u.db > 2147483647 then return nil, "invalid redis URL: db out of range" end
  return u
end

-- The URL without its password, for tostring and messages.
local function display(u)
  local auth = u.password and ((u.user or "") .. ":***@") or ""
  if u.path then
    return "unix://" .. auth .. u.path .. (u.db ~= 0 and "?db=" .. u.db or "")
  end
  local host = find(u.host, ":", 1, true) and "[" .. u.host .. "]" or u.host
  return "redis://" .. auth .. host .. ":" .. u.port .. "/" .. u.db
end

---------------------------------------------------------------------------------------
-- Connections
---------------------------------------------------------------------------------------

local Conn = {}
Conn.__index = Conn
M.Conn = Conn

-- conn -> its password: kept out of the object (a dump of it never shows it).
local secrets = setmetatable({}, { __mode = "k" })

-- Commands that change a connection's state: such a connection is closed rather than
-- given back to the keep-alive pool.
local STATEFUL = { SELECT = true, AUTH = true, HELLO = true, RESET = true, CLIENT = true, MULTI = true,
                   WATCH = true, SUBSCRIBE = true, PSUBSCRIBE = true, SSUBSCRIBE = true, MONITOR = true,
                   READONLY = true }

local core_module   -- stella.redis.core, loaded on first use outside cosockets

local function load_core()
  if core_module then return core_module end
  local ok, core = pcall(require, "stella.redis.core")
  if not ok then
    error("stella.redis: the C module stella.redis.core is not available (build it with hiredis: "
      .. "libhiredis-dev, then make; or install the stella-redis rock): " .. tostring(core), 4)
  end
  core_module = core
  return core
end

local function ms(seconds) return floor(seconds * 1000 + 0.5) end

-- A new link (transport connection) with AUTH and SELECT done; or nil, err.
local function open_link(self)
  local u, link, err = self.parts
  if self.cosocket then
    link, err = require("stella.redis.cosocket").connect{
      host = u.host, port = u.port, path = u.path, connect_timeout_ms = ms(self.connect_timeout),
      timeout_ms = ms(self.timeout), new_error = self.new_error, pool = self.pool, pool_size = self.pool_size,
    }
  else
    local core = load_core()
    if u.path then
      link, err = core.connect_unix(u.path, ms(self.connect_timeout), ms(self.timeout), self.new_error)
    else
      link, err = core.connect(u.host, u.port, ms(self.connect_timeout), ms(self.timeout), self.new_error)
    end
  end
  if not link then return nil, err end
  if link.reused then return link end   -- from the pool: authenticated and selected already
  local password = secrets[self]
  if password then
    local ok
    if u.user then ok, err = link:command("AUTH", u.user, password)
    else ok, err = link:command("AUTH", password) end
    if not ok then
      link:close()
      if err.kind == "network" then return nil, err end
      return nil, new_error("auth", err.code, "redis " .. self.where .. ": authentication failed: " .. err.message)
    end
  end
  local ok
  if u.db ~= 0 then ok, err = link:command("SELECT", u.db)
  elseif not password then ok, err = link:command("PING")   -- a server that wants a password says so now
  else ok = true end
  if not ok then
    link:close()
    if err.kind == "redis" then
      err = new_error(err.kind, err.code, "redis " .. self.where .. ": " .. err.message)
    elseif err.kind == "auth" then
      err = new_error("auth", err.code, "redis " .. self.where .. ": " .. err.message)
    end
    return nil, err
  end
  return link
end

local function drop_link(self)
  local link = self.link
  self.link, self.dirty = nil, false
  if link then link:close() end
end

local function reopen(self)
  drop_link(self)
  local link, err = open_link(self)
  self.link = link
  return link, err
end

-- Runs link:command(...) or link:pipeline(...), connecting first when needed.
local function run(self, method, ...)
  local link, err = self.link
  if not (link and link:connected()) then
    link, err = reopen(self)
    if not link then return nil, err end
  end
  local res, rerr = link[method](link, ...)
  if res == nil and rerr.code == "stale" then   -- nothing was sent: safe on a new connection
    link, err = reopen(self)
    if not link then return nil, err end
    res, rerr = link[method](link, ...)
  end
  if res == nil then
    if rerr.kind == "network" then drop_link(self) end
    return nil, rerr
  end
  return res
end

local function mark_stateful(self, name)
  if type(name) == "string" and STATEFUL[upper(name)] then self.dirty = true end
end

function Conn:call(...)
  if select("#", ...) == 0 then error("stella.redis: call needs a command name", 2) end
  if self.cosocket then mark_stateful(self, (...)) end
  return run(self, "command", ...)
end

function Conn:pipeline(cmds)
  if type(cmds) ~= "table" then error("stella.redis: pipeline needs a list of commands", 2) end
  if self.cosocket then
    for _, c in ipairs(cmds) do mark_stateful(self, type(c) == "table" and c[1]) end
  end
  return run(self, "pipeline", cmds)
end

local function version_function(name) return name .. "_version" end

local function function_not_found(err)
  return err.kind == "redis" and find(err.message, "Function not found", 1, true) ~= nil
end

local function remember(self, lib)
  for i, l in ipairs(self.libraries) do
    if l.name == lib.name then self.libraries[i] = lib return end
  end
  self.libraries[#self.libraries + 1] = lib
end

local function check_library(name, code, version, level)
  if type(name) ~= "string" or not match(name, "^[%a_][%w_]*$") then
    error("stella.redis: a library name is letters, digits and _", level)
  end
  if type(code) ~= "string" or match(code, "^#!lua name=([%w_]+)") ~= name then
    error("stella.redis: the library's code must start with #!lua name=" .. name, level)
  end
  if type(version) ~= "number" or version < 1 or version ~= floor(version) then
    error("stella.redis: a library version is a whole number >= 1", level)
  end
end

local function load_library(self, lib)
  local have, err = self:call("FCALL_RO", version_function(lib.name), 0)
  if have == nil and not function_not_found(err) then return nil, err end
  have = tonumber(have)
  if have and have >= lib.version then return true, have > lib.version and "newer" or "current" end
  local text = lib.code .. format("\nredis.register_function{function_name='%s', "
    .. "callback=function() return %d end, flags={'no-writes'}}\n", version_function(lib.name), lib.version)
  local ok, lerr = self:call("FUNCTION", "LOAD", "REPLACE", text)
  if not ok then return nil, lerr end
  return true, "loaded"
end

-- Loads library `name` unless the server has this version or a newer one.
function Conn:load_library(name, code, version)
  check_library(name, code, version, 3)
  local lib = { name = name, code = code, version = version }
  remember(self, lib)
  return load_library(self, lib)
end

local function fcall(self, cmd, fname, keys, args)
  if type(fname) ~= "string" then error("stella.redis: " .. lower(cmd) .. " needs a function name", 3) end
  keys, args = keys or {}, args or {}
  if type(keys) ~= "table" or type(args) ~= "table" then
    error("stella.redis: " .. lower(cmd) .. "(fname, keys, args): keys and args are lists", 3)
  end
  local argv = { cmd, fname, #keys }
  for i = 1, #keys do argv[#argv + 1] = keys[i] end
  for i = 1, #args do argv[#argv + 1] = args[i] end
  local res, err = self:call(unpack(argv))
  if res == nil and function_not_found(err) and #self.libraries > 0 then
    for _, lib in ipairs(self.libraries) do
      local ok, lerr = load_library(self, lib)
      if not ok then return nil, lerr end
    end
    res, err = self:call(unpack(argv))
  end
  return res, err
end

function Conn:fcall(fname, keys, args) return fcall(self, "FCALL", fname, keys, args) end
function Conn:fcall_ro(fname, keys, args) return fcall(self, "FCALL_RO", fname, keys, args) end

-- conn:fork() -> a new conn to the same server, with the same options and libraries, not
-- connected yet: its first call connects (inside OpenResty, in a cosocket phase, taking a
-- connection from nginx's pool, as connect does), and close() gives that back. A cosocket
-- belongs to the request, timer or light thread that opened it, so code shared by all of
-- a worker's requests keeps one conn as a template and forks it for each operation
-- (stella.store.redis does). Errors come from the first call, not from fork.
function Conn:fork()
  local c = {}
  for k, v in pairs(self) do c[k] = v end
  c.link, c.dirty = nil, false
  c.cosocket = in_cosocket_phase()
  secrets[c] = secrets[self]
  return setmetatable(c, Conn)
end

-- Gives the connection back to nginx's pool (cosockets) or closes it. The conn stays
-- usable: its next call connects again.
function Conn:close()
  local link = self.link
  self.link = nil
  if not link then return end
  if self.cosocket and not self.dirty and link:connected() then
    link:keepalive(ms(self.keepalive_timeout), self.pool_size)
  else
    link:close()
  end
  self.dirty = false
end
Conn.__close = Conn.close

Conn.__tostring = function(self) return "stella.redis(" .. self.url .. ")" end

---------------------------------------------------------------------------------------
-- connect
---------------------------------------------------------------------------------------

local function seconds(opts, name, default)
  local v = opts[name]
  if v == nil then return default end
  if type(v) ~= "number" or not (v > 0) then error("stella.redis: option " .. name .. " must be a positive number of seconds", 3) end
  return v
end

-- redis.connect(url | options) -> conn | nil, err (kind "invalid", "network", "auth").
function M.connect(opts)
  if type(opts) == "string" then opts = { url = opts } end
  if type(opts) ~= "table" then error("stella.redis.connect: a URL or an options table expected", 2) end
  for k in pairs(opts) do
    if not KNOWN_OPTIONS[k] then error("stella.redis.connect: unknown option " .. tostring(k), 2) end
  end
  if type(opts.url) ~= "string" then error("stella.redis.connect: option url (a redis:// URL) expected", 2) end
  if opts.prefix ~= nil and type(opts.prefix) ~= "string" then error("stella.redis.connect: option prefix must be a string", 2) end
  if opts.pool ~= nil and type(opts.pool) ~= "string" then error("stella.redis.connect: option pool must be a string", 2) end
  local pool_size = opts.pool_size
  if pool_size ~= nil and (type(pool_size) ~= "number" or pool_size < 1 or pool_size ~= floor(pool_size)) then
    error("stella.redis.connect: option pool_size must be a whole number >= 1", 2)
  end
  local libraries = {}
  for _, lib in ipairs(opts.libraries or {}) do
    if type(lib) ~= "table" then error("stella.redis.connect: option libraries is a list of {name, code, version}", 2) end
    check_library(lib.name, lib.code, lib.version, 3)
    libraries[#libraries + 1] = { name = lib.name, code = lib.code, version = lib.version }
  end
  local u, perr = M.parse_url(opts.url)
  if not u then return nil, new_error("invalid", "url", perr) end

  local where = u.path and ("unix:" .. u.path) or
                ((find(u.host, ":", 1, true) and "[" .. u.host .. "]" or u.host) .. ":" .. u.port)
  local password = u.password
  u.password = nil
  local self = setmetatable({
    url = display{ user = u.user, password = password and true, host = u.host, port = u.port,
                   path = u.path, db = u.db },
    where = where,
    parts = u,
    prefix = opts.prefix or DEFAULT_PREFIX,
    connect_timeout = seconds(opts, "connect_timeout", DEFAULT_CONNECT_TIMEOUT),
    timeout = seconds(opts, "timeout", DEFAULT_TIMEOUT),
    keepalive_timeout = seconds(opts, "keepalive_timeout", DEFAULT_KEEPALIVE),
    pool_size = pool_size,
    libraries = libraries,
    cosocket = in_cosocket_phase(),
    new_error = error_maker(where, password),
  }, Conn)
  secrets[self] = password
  local ngx = rawget(_G, "ngx")
  if type(ngx) == "table" and ngx.sha1_bin then   -- inside nginx: for this conn and its forks
    -- one pool per server, db and credentials (the password only as a digest)
    self.pool = opts.pool or format("stella.redis:%s/%d:%s:%s", where, u.db, u.user or "",
      password and ngx.encode_base64(ngx.sha1_bin(password)):sub(1, 12) or "")
  end
  local link, err = open_link(self)
  if not link then return nil, err end
  self.link = link
  return self
end

return M
