-- Starts an nginx (with its Lua module) from a config template, for the OpenResty specs
-- (spec/openresty_spec.lua; support/openresty/webhook.lua for the webhook's specs): the
-- webhook of examples/openresty/ plus whatever server blocks a spec adds. Runs it with
-- stella.nginx, like spec/support/testserver.lua: in the foreground, as a child of this Lua
-- process, on free 127.0.0.1 ports, in a temporary prefix removed by stop() (kept with
-- $STELLA_KEEP_PREFIX). Runs under Lua 5.4 and LuaJIT; needs luasocket.
--
--   local harness = require "support.openresty.harness"
--   local n = harness.start{
--     template = "examples/openresty/nginx.conf",     -- @NAME@ placeholders
--     vars = { STELLA_ROOT = ..., ... },             -- PREFIX and the ports are added
--     ports = { "PORT", "SELFTEST_PORT" },           -- a free port for each name
--     http = "server { ... }",                       -- appended inside the http block
--     env = { STELLA_TEST_KEY = "..." },             -- environment of nginx
--     probe = { port = "SELFTEST_PORT", path = "/selftest?case=ping" },
--     edit = { ["queue_capacity = 10000"] = "queue_capacity = 20" },   -- each found once
--     prefix = dir,                                  -- keep this prefix (not removed)
--   }
--   n.ports.PORT, n.url (http://127.0.0.1:PORT), n:error_log(), n:pids(), n:stop()
--   harness.ROOT     the checkout's top directory, absolute (from where this file is)
--   harness.SUPPORT  this directory (spec/support/openresty), absolute
local socket = require "socket"
local nginx = require "stella.nginx"

local M = {}

local START_TIMEOUT = 10

M.read_file, M.run, M.shell_quote = nginx.read_file, nginx.run, nginx.shell_quote
M.is_root, M.free_port, M.alive, M.wait_until = nginx.is_root, nginx.free_port, nginx.alive, nginx.wait_until

M.SUPPORT = nginx.absolute(debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or ".")
M.ROOT = M.SUPPORT:gsub("/spec/support/openresty$", "")

function M.write_file(path, text)
  assert(nginx.write_file(path, text))
end

local function need(what, v, err)
  if not v then error("harness: " .. (err or what), 0) end
  return v
end

function M.find_module(name)
  return need(name, nginx.find_module(name))
end

function M.nginx()
  return need("nginx", nginx.find_nginx())
end

-- One HTTP GET with luasocket; returns the status or nil, err.
local function probe(port, path, timeout)
  local c = socket.tcp()
  c:settimeout(timeout)
  local ok, err = c:connect("127.0.0.1", port)
  if not ok then c:close() return nil, err end
  c:send("GET " .. path .. " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
  local data = c:receive("*a")
  c:close()
  return data and tonumber(data:match("^HTTP/1%.%d (%d%d%d)"))
end

-- Plain replacements in the template text; each must occur exactly once.
local function edited(template, edit)
  for old, new in pairs(edit or {}) do
    local at = template:find(old, 1, true)
    if not at or template:find(old, at + 1, true) then
      error("harness: \"" .. old .. "\" must occur exactly once in the template", 0)
    end
    template = template:sub(1, at - 1) .. new .. template:sub(at + #old)
  end
  return template
end
M.edited = edited

-- The template with opts.http appended inside its http block (the last }).
local function config(opts, template)
  return function(vars)
    local text = nginx.render(edited(template, opts.edit), vars, "harness")
    if not opts.http then return text end
    local head = text:match("^(.*)}%s*$")
    if not head then error("harness: the template does not end with the http block's }", 0) end
    return head .. nginx.render(opts.http, vars, "harness") .. "\n}\n"
  end
end

-- The running nginx (stella.nginx's), with ports, url, vars, error_log(), pids(), stop().
function M.start(opts)
  local template = assert(nginx.read_file(opts.template), "harness: cannot read " .. opts.template)
  local prefix, terr = opts.prefix, nil
  if not prefix then prefix, terr = nginx.temp_dir("stella-openresty") end
  if not prefix then error("harness: " .. terr, 2) end
  local p = opts.probe
  local n, log = nginx.start{
    nginx = M.nginx(), prefix = prefix,
    temporary = not opts.prefix and not os.getenv("STELLA_KEEP_PREFIX"),
    config = config(opts, template), vars = opts.vars, ports = opts.ports, env = opts.env,
    globals = "daemon off; master_process on;" .. (nginx.is_root() and " user root;" or ""),
    timeout = START_TIMEOUT,
    ready = function(self) return probe(self.ports[p.port], p.path, 0.5) ~= nil end,
    stop_timeout = opts.stop_timeout,
  }
  if not n then error("harness: nginx failed to start:\n" .. nginx.tail(log, 16), 2) end
  return n
end

return M
