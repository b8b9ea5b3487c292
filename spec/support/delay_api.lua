-- A loopback Requests API that answers every request exactly `delay` after it arrived
-- (bench/delay_api.c, built by `make build/bench/delay_api`; Linux only), for
-- bench/lanes.lua and spec/delay_api_spec.lua: the same shape as
-- support/openresty/slow_api.lua, without nginx's millisecond timers and per-request
-- shared-dict work (that API holds a 20 ms request 21-22 ms).
--
--   local delay_api = require "support.delay_api"
--   local api = delay_api.start{ delay = 0.02, cpu = 0 }   -- seconds; cpu: taskset -c (optional)
--   api.url, api.port, api.pid; api:set_delay(0.02); api:set_status(503)  -- 201 again: set_status(201)
--   api:received() -> the counters (below), total, the most requests it held at once,
--                     requests answered with an error
--   api:span() -> the first counted request's arrival and the last counted answer
--                 (CLOCK_REALTIME, s; nil before any), and the seconds the counted requests
--                 were held in all (arrival to answer written)
--   api:busy() -> requests held right now
--   api:reset(); api:stop()
-- The counters: total, held_us, max, busy, failed, first, last, ids (distinct
-- ext_interaction_id values answered), dups (how many of those were answered more than
-- once), delay, status.
local socket = require "socket"
local cjson = require "cjson"
local nginx = require "stella.nginx"   -- the shell and process helpers

local M = {}

M.BINARY = os.getenv("STELLA_DELAY_API") or "build/bench/delay_api"

local function request(port, method, path, timeout)
  local c = socket.tcp()
  c:settimeout(timeout or 10)
  local ok, err = c:connect("127.0.0.1", port)
  if not ok then c:close() return nil, err end
  c:send(method .. " " .. path .. " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
  local data = c:receive("*a")
  c:close()
  if not data then return nil, "no answer" end
  return tonumber(data:match("^HTTP/1%.%d (%d%d%d)")), data:match("\r\n\r\n(.*)$")
end

local Api = {}
Api.__index = Api

function M.start(opts)
  opts = opts or {}
  if not nginx.file_exists(M.BINARY) then
    error("delay_api: " .. M.BINARY .. " not found (make build/bench/delay_api)", 2)
  end
  local pin = opts.cpu and ("taskset -c " .. nginx.shell_quote(tostring(opts.cpu)) .. " ") or ""
  -- the shell prints its pid and exec's the server (so that pid is the server's), which
  -- prints the port it listens on; no LD_PRELOAD (make asan's runtime is the Lua's only)
  local proc = assert(io.popen("echo $$; unset LD_PRELOAD; exec " .. pin .. nginx.shell_quote(M.BINARY)
    .. " -d " .. string.format("%.6f", opts.delay or 0) .. " 0"))
  local pid = tonumber(proc:read("*l"))
  local port = tonumber(proc:read("*l"))
  if not pid or not port then
    proc:close()
    error("delay_api: " .. M.BINARY .. " did not start", 2)
  end
  local api = setmetatable({ proc = proc, pid = pid, port = port, url = "http://127.0.0.1:" .. port }, Api)
  api.guard = nginx.gc_guard(function() api:stop() end)   -- stopped when collected
  return api
end

function Api:counters()
  local code, body = request(self.port, "GET", "/_received")
  assert(code == 200, "delay_api: /_received failed: " .. tostring(body))
  return cjson.decode(body)
end

function Api:received()
  local v = self:counters()
  return v, v.total, v.max, v.failed
end

function Api:busy()
  return self:counters().busy
end

function Api:span()
  local v = self:counters()
  if v.total == 0 then return nil, nil, 0 end
  return v.first, v.last, v.held_us / 1e6
end

function Api:reset()
  assert(request(self.port, "POST", "/_reset") == 200, "delay_api: /_reset failed")
end

function Api:set_status(code)
  assert(request(self.port, "POST", "/_status?code=" .. code) == 200, "delay_api: /_status failed")
end

function Api:set_delay(s)
  assert(request(self.port, "POST", "/_delay?s=" .. string.format("%.6f", s)) == 200, "delay_api: /_delay failed")
end

-- SIGTERM, then waits for it (SIGKILL after 10 s); idempotent.
function Api:stop()
  local pid = self.pid
  if not pid then return end
  self.pid = nil
  if nginx.alive(pid) then
    nginx.run("kill -TERM " .. pid)
    if not nginx.wait_until(10, function() return not nginx.alive(pid) end) then nginx.kill_hard(pid) end
  end
  self.proc:close()
end

return M
