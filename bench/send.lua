-- bench/send.lua: sequential sends per second of a stella client (client:send on one
-- keep-alive connection) against wrk -t1 -c1 POSTing the same body and headers to the
-- same endpoint of the loopback nginx test server, measured in the same run. Prints the
-- measurements and one ratio line; fails only on a crash or on a broken precondition
-- (a failed send, more than one connection, wrk answers that are not 2xx).
--
-- From the repository root:
--   LUA_PATH="./lua/?.lua;./lua/?/init.lua;./spec/?.lua;;" LUA_CPATH="./build/5.4/?.so;;" \
--     lua5.4 bench/send.lua
-- Environment: BENCH_SEND_SECONDS (length of each timing, default 1), BENCH_SEND_ROUNDS
-- (default 5), BENCH_CLIENT_CPU and BENCH_SERVER_CPU (pin the client and wrk, and the
-- server's nginx, to those CPUs with taskset; tools/run-bench sets them).
-- Rounds alternate the two sides; the ratio line is the median of the rounds' ratios.
--
-- Everything runs over 127.0.0.1; every phase is bounded in time, wrk runs under
-- timeout(1), and the server is stopped at the end, also after an error.

package.path = "./bench/?.lua;" .. package.path

local stella = require "stella"
local testserver = require "support.testserver"
local socket = require "socket"
local common = require "common"

local now, fmt, clock = socket.gettime, string.format, os.clock

local SECONDS = tonumber(os.getenv("BENCH_SEND_SECONDS")) or 1
local ROUNDS = math.max(1, math.floor(tonumber(os.getenv("BENCH_SEND_ROUNDS")) or 5))
local WARMUP = 0.5
local KEEPALIVE_REQUESTS = 100000   -- spec/support/nginx/nginx.conf
local API_KEY = "bench-key"
local interp = (jit and jit.version or _VERSION)

-- A realistic request: the full set of fields, some non-ASCII.
local REQ = {
  customer = { name = "Zoë Åkesson", email = "zoe.akesson@example.com", custom_id = "cust-8812" },
  employee = { email = "paulagent@blancapeak.com" },
  channel = "phone",
  ext_interaction_id = 123456,
  external_url = "https://helpdesk.example.com/tickets/123456",
  tags = { "billing", "refund", "priority-high" },
  brand = "Blanca Peak",
  language = "en-US",
  country = "us",
  custom_properties = { order_id = "ORD-99812", plan = "premium", seats = 12 },
}

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function write_file(path, text)
  local f = assert(io.open(path, "wb"))
  assert(f:write(text))
  assert(f:close())
end

local function run(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("*a")
  p:close()
  return out
end

local server, client   -- stopped/closed at the end, also after an error
local placement
local tmpfiles = {}
local function tmpname()
  local name = os.tmpname()
  tmpfiles[#tmpfiles + 1] = name
  return name
end

-- The wrk script: the same method, body and headers as the client sends.
-- stop_after: stop the thread after that many responses (for the check run).
local function wrk_script(body, headers, stop_after)
  local lines = { 'wrk.method = "POST"', "wrk.body = " .. fmt("%q", body) }
  for _, h in ipairs(headers) do
    lines[#lines + 1] = fmt("wrk.headers[%q] = %q", h[1], h[2])
  end
  if stop_after then
    lines[#lines + 1] = "local n = 0"
    lines[#lines + 1] = "function response() n = n + 1; if n >= " .. stop_after
      .. " then wrk.thread:stop() end end"
  end
  local path = tmpname()
  write_file(path, table.concat(lines, "\n") .. "\n")
  return path
end

-- The CPU seconds (user + system) of the shell's children, from the output of sh's
-- `times` (its second line), or nil.
local function children_cpu(out)
  local um, us, sm, ss = out:match("\n(%d+)m([%d.]+)s (%d+)m([%d.]+)s%s*$")
  if not um then return nil end
  return tonumber(um) * 60 + tonumber(us) + tonumber(sm) * 60 + tonumber(ss)
end

-- Runs wrk -t1 -c1 for `seconds`; returns requests/s, its CPU time per request (us) and
-- the parsed summary.
local function wrk(url, seconds, script)
  local cmd = fmt("timeout %d wrk -t1 -c1 -d%ds %s %s; times", seconds + 15, seconds,
                  script and ("-s " .. shell_quote(script)) or "", shell_quote(url))
  local out = run(cmd)
  local rate = tonumber(out:match("Requests/sec:%s*([%d.]+)"))
  if not rate then error("wrk failed:\n" .. out, 0) end
  local r = {
    rate = rate,
    requests = tonumber(out:match("(%d+) requests in")) or 0,
    non2xx = tonumber(out:match("Non%-2xx or 3xx responses:%s*(%d+)")) or 0,
    socket_errors = out:match("Socket errors:([^\n]*)"),
    latency = out:match("Latency%s+(%S+)"),
    output = out,
  }
  local cpu = children_cpu(out)
  r.cpu_us = cpu and r.requests > 0 and cpu / r.requests * 1e6 or nil
  return r
end

local function send_for(client, seconds)
  local send = client.send
  local n, t0 = 0, now()
  local deadline = t0 + seconds
  repeat
    local res, err = send(client, REQ)
    if not res then error("client:send failed after " .. n .. " sends: " .. tostring(err), 0) end
    n = n + 1
  until now() >= deadline
  return n, now() - t0
end

-- The test server records every request in a 64 MB shared dict, which holds about
-- 65,000 records of this request and answers 500 once full: every timing starts with a
-- reset (not timed, same connection), and one timing is SECONDS long.
local function post_for(transport, body, seconds)
  local n, t0 = 0, now()
  local deadline = t0 + seconds
  repeat
    local r = transport:post("/v1/requests", body)
    if r.status ~= 200 then error("transport:post answered " .. tostring(r.status or r.failure), 0) end
    n = n + 1
  until now() >= deadline
  return n, now() - t0
end

local function main()
  if not run("command -v wrk"):match("wrk") then error("wrk is not installed", 0) end
  -- the server inherits the CPU this process has when it starts it; then this process
  -- (the client, and wrk, which it starts) moves to its own
  local client_cpu, server_cpu, where = common.placement()
  placement = where
  common.pin(server_cpu)
  server = testserver.start()
  common.pin(client_cpu)
  local url = server.url .. "/v1/requests"
  client = stella.new{ api_key = API_KEY, base_url = server.url, retry = { attempts = 1 } }
  local body = assert(stella.encode(REQ))
  local headers = {
    { "Accept", "application/json" },
    { "Content-Type", "application/json" },
    { "x-api-key", API_KEY },
    { "User-Agent", "lua-stella/" .. stella.version },
  }

  -- 1. Both sides must put the same request on the wire: one client send and a few
  --    wrk requests, compared as the server recorded them.
  server:reset()
  assert(client:send(REQ))
  local check = wrk(url, 2, wrk_script(body, headers, 3))
  if check.non2xx > 0 then error("wrk got non-2xx answers in the check run:\n" .. check.output, 0) end
  local recorded = server:requests()
  if #recorded < 2 then error("the check run recorded " .. #recorded .. " requests", 0) end
  local c = recorded[1]
  local extra = {}
  for i = 2, #recorded do
    local w = recorded[i]
    assert(w.method == c.method and w.path == c.path and w.path == "/v1/requests",
           "wrk and the client hit different endpoints")
    assert(w.body == c.body and w.body == body, "wrk and the client sent different bodies")
    for _, h in ipairs(headers) do
      local name = h[1]:lower()
      assert(w.headers[name] == c.headers[name] and c.headers[name] == h[2],
             "header " .. name .. " differs: client " .. tostring(c.headers[name])
             .. ", wrk " .. tostring(w.headers[name]))
    end
    for name, v in pairs(c.headers) do
      if w.headers[name] ~= v and not extra[name] then
        extra[name] = true
        extra[#extra + 1] = fmt("%s (client %s, wrk %s)", name, tostring(v), tostring(w.headers[name]))
      end
    end
    for name, v in pairs(w.headers) do
      if c.headers[name] == nil and not extra[name] then
        extra[name] = true
        extra[#extra + 1] = fmt("%s (client -, wrk %s)", name, tostring(v))
      end
    end
  end

  -- 2. Rounds: in each, the client's sends for SECONDS of wall clock and wrk for as long,
  --    in alternating order (the client first in odd rounds), the server's record reset
  --    before each; the client's CPU time (os.clock: Lua, encoding, libcurl) per send.
  server:reset()
  local sent = 1 + send_for(client, WARMUP)
  local script = wrk_script(body, headers)
  server:reset()
  wrk(url, 1, script)   -- warm-up
  local rounds = {}
  for i = 1, ROUNDS do
    local r = {}
    local function client_side()
      server:reset()
      local c0 = clock()
      r.n, r.elapsed = send_for(client, SECONDS)
      sent = sent + r.n
      r.cpu_us = (clock() - c0) / r.n * 1e6
      r.client = r.n / r.elapsed
    end
    local function wrk_side()
      server:reset()
      local w = wrk(url, SECONDS, script)
      if w.non2xx > 0 then
        error(fmt("wrk got %d non-2xx answers of %d:\n%s", w.non2xx, w.requests, w.output), 0)
      end
      r.wrk, r.wrk_latency, r.wrk_cpu_us = w.rate, w.latency, w.cpu_us or 0 / 0
    end
    if i % 2 == 1 then client_side(); wrk_side() else wrk_side(); client_side() end
    r.ratio = r.client / r.wrk
    rounds[i] = r
  end
  -- one keep-alive connection, but for the test server closing it after KEEPALIVE_REQUESTS
  -- requests (its keepalive_requests), which a fast placement reaches
  local function check_connections(what)
    local connections, expected = client:connections(), 1 + math.floor(sent / KEEPALIVE_REQUESTS)
    assert(connections <= expected, fmt("%s: the client opened %d connections for %d sends, expected %d",
      what, connections, sent, expected))
  end
  check_connections("client:send")

  -- 3. The client's own transport without the Lua layer (same connection, same
  --    pre-encoded body): how much of a send is the HTTP exchange itself. [info]
  server:reset()
  local c0 = clock()
  local pn, pelapsed = post_for(client.transport, body, 1)
  sent = sent + pn
  local raw_cpu = (clock() - c0) / pn * 1e6
  local raw_rate = pn / pelapsed
  check_connections("transport:post")

  -- 4. The same server with no recording: wrk GET /_control/ping (a Lua content
  --    handler that only answers). An upper bound for this server. [info]
  server:reset()
  local ping = wrk(server.url .. "/_control/ping", 1, nil)
  server:reset()

  local function pick(field)
    local t = {}
    for i, r in ipairs(rounds) do t[i] = r[field] end
    return common.median(t)
  end
  print(fmt("send benchmark under %s: %d-byte body to %s, %s; %d rounds of %g s; load average %s",
    interp, #body, url, placement, ROUNDS, SECONDS, common.loadavg()))
  print("  the server saw the same method, path, body and Accept/Content-Type/x-api-key/User-Agent from both")
  if #extra > 0 then print("  other headers that differ: " .. table.concat(extra, ", ")) end
  for i, r in ipairs(rounds) do
    print(fmt("  round %d: client:send %6.0f/s (%.1f us CPU each), wrk -t1 -c1 %6.0f/s (%.1f us CPU each, "
      .. "latency avg %s): %.0f%%", i, r.client, r.cpu_us, r.wrk, r.wrk_cpu_us, r.wrk_latency or "?", r.ratio * 100))
  end
  print(fmt("  transport:post       %6.0f/s  (%.1f us CPU per post; pre-encoded body, no Lua client layer)  [info]",
    raw_rate, raw_cpu))
  print(fmt("  wrk -c1 GET ping     %6.0f/s  (same server, no body, no recording)  [info]", ping.rate))
  print(fmt("sends (%s): client %.0f/s, %.1f us CPU per send; wrk -c1 %.0f/s, %.1f us CPU per request; "
    .. "ratio %.0f%% (median of %d rounds; target >= 85%%); load average %s", placement, pick("client"),
    pick("cpu_us"), pick("wrk"), pick("wrk_cpu_us"), pick("ratio") * 100, ROUNDS, common.loadavg()))
end

local ok, err = xpcall(main, debug.traceback)
if client then pcall(client.close, client) end
if server then pcall(server.stop, server) end
for _, f in ipairs(tmpfiles) do os.remove(f) end
if not ok then
  io.stderr:write("bench/send.lua: ", tostring(err), "\n")
  os.exit(1)
end
