-- stella.redis.cosocket: the Redis connection inside OpenResty, over resty.redis (as
-- OpenResty ships it) or nginx.redis (the same library as Debian's lua-nginx-redis
-- installs it) on cosockets, so a call yields to nginx's event loop instead of blocking
-- the worker. stella.redis picks it in the phases that have cosockets; it offers the
-- same methods as the C module stella.redis.core (command, pipeline, connected, close)
-- and the same replies: strings, integers, false for nil, nested lists, error values
-- made by new_error(kind, code, message) in an error reply's place.
--
--   cosocket.connect{ host =, port = | path =, connect_timeout_ms =, timeout_ms =,
--                     new_error =, pool =, pool_size = } -> link | nil, err
--   link.reused              true when the connection came from the keep-alive pool
--   link:keepalive(idle_ms, pool_size)   back to the pool (else closed)
--   cosocket.driver()        "resty.redis" or "nginx.redis", whichever is loaded
local ngx = rawget(_G, "ngx")
local error, select, setmetatable, type, tostring, unpack = error, select, setmetatable, type,
                                                            tostring, unpack or table.unpack
local byte, find, upper = string.byte, string.find, string.upper

local M = {}

local Link = {}
Link.__index = Link

local driver, driver_name   -- the client library, loaded on first use

local function load_driver()
  if driver then return driver end
  local name, ok, d = "resty.redis", pcall(require, "resty.redis")
  if not ok then name, ok, d = "nginx.redis", pcall(require, "nginx.redis") end
  if not ok then
    error("stella.redis: neither resty.redis (OpenResty) nor nginx.redis (Debian's lua-nginx-redis) "
      .. "can be loaded", 3)
  end
  driver, driver_name = d, name
  return d
end

-- The name of the client library in use: "resty.redis" or "nginx.redis".
function M.driver()
  load_driver()
  return driver_name
end

-- The method of the driver that sends command `name`: it makes one for any name. Names
-- are upper-cased so that none is taken for one of its own methods (connect, close, ...).
local function method(red, name, what)
  local cmd = upper(name)
  if byte(cmd, 1) == 95 then   -- "_VERSION" and the like are not commands
    error("bad argument #1 to '" .. what .. "' (not a command name: " .. name .. ")", 4)
  end
  return red[cmd]
end

local function check_args(what, item, ...)
  local n = select("#", ...)
  if n == 0 then
    if item then error(("bad argument #1 to '%s' (command %d: a command name expected)"):format(what, item), 3) end
    error("bad argument #1 to '" .. what .. "' (a command name expected)", 3)
  end
  for i = 1, n do
    local t = type((select(i, ...)))
    if t ~= "string" and t ~= "number" then
      if item then
        error(("bad argument #1 to '%s' (command %d: arguments must be strings or numbers, got %s)")
          :format(what, item, t), 3)
      end
      error(("bad argument #%d to '%s' (a string or a number expected, got %s)"):format(i, what, t), 3)
    end
  end
end

-- A reply of the driver as stella.redis.core gives it.
local function reply_error(self, text)
  text = tostring(text)
  local code = text:match("^(%S+)") or "ERR"
  if #code >= 32 then code = "ERR" end
  return self.new_error("redis", code, text)
end

local function convert(self, v)
  if v == ngx.null then return false end
  if type(v) == "table" then
    if v[1] == false then return reply_error(self, v[2]) end   -- an error inside an array
    for i = 1, #v do v[i] = convert(self, v[i]) end
  end
  return v
end

local function network_code(err)
  if err == "timeout" or err == "closed" then return err end
  return "io"
end

-- A failed exchange: the connection cannot be trusted any more.
local function fail(self, err)
  if self.red then self.red:close() end
  self.red = nil
  return nil, self.new_error("network", network_code(err), tostring(err))
end

local function stale(self)
  return nil, self.new_error("network", "stale", "the connection is closed")
end

function Link:connected()
  return self.red ~= nil
end

function Link:command(...)
  check_args("command", nil, ...)
  local red = self.red
  if not red then return stale(self) end
  local res, err = method(red, (...), "command")(red, select(2, ...))
  if res == nil then return fail(self, err) end
  if res == false then return nil, reply_error(self, err) end
  return convert(self, res)
end

function Link:pipeline(cmds)
  if type(cmds) ~= "table" then error("bad argument #1 to 'pipeline' (table expected, got " .. type(cmds) .. ")", 2) end
  local n = #cmds
  for i = 1, n do
    local c = cmds[i]
    if type(c) ~= "table" then
      error(("bad argument #1 to 'pipeline' (command %d: a list of arguments expected)"):format(i), 2)
    end
    check_args("pipeline", i, unpack(c, 1, #c))
  end
  local red = self.red
  if not red then return stale(self) end
  if n == 0 then return {} end
  red:init_pipeline(n)
  for i = 1, n do
    local c = cmds[i]
    method(red, c[1], "pipeline")(red, unpack(c, 2, #c))
  end
  local vals, err = red:commit_pipeline()
  if not vals then return fail(self, err) end
  for i = 1, n do vals[i] = convert(self, vals[i]) end
  return vals
end

function Link:keepalive(idle_ms, pool_size)
  local red = self.red
  self.red = nil
  if red and not red:set_keepalive(idle_ms, pool_size) then red:close() end
end

function Link:close()
  local red = self.red
  self.red = nil
  if red then red:close() end
end

function M.connect(o)
  if not (ngx and ngx.socket) then
    error("stella.redis.cosocket runs only inside nginx with its Lua module (OpenResty)", 2)
  end
  local d = load_driver()
  local red, err = d:new()
  if not red then return nil, o.new_error("network", "connect", "cannot connect: " .. tostring(err)) end
  red:set_timeout(o.connect_timeout_ms)
  local opts = { pool = o.pool, pool_size = o.pool_size }
  local ok
  if o.path then
    ok, err = red:connect("unix:" .. o.path, opts)
  else
    -- IPv6 literals keep their brackets (ngx_parse_url); localhost needs no resolver
    local host = o.host
    if host == "localhost" then host = "127.0.0.1"
    elseif find(host, ":", 1, true) then host = "[" .. host .. "]" end
    ok, err = red:connect(host, o.port, opts)
  end
  if not ok then
    return nil, o.new_error("network", err == "timeout" and "timeout" or "connect", "cannot connect: " .. tostring(err))
  end
  red:set_timeout(o.timeout_ms)
  return setmetatable({ red = red, new_error = o.new_error, reused = (red:get_reused_times() or 0) > 0 }, Link)
end

return M
