-- bench/send.lua: sequential sends per second of a stella client (client:send on one
-- keep-alive connection) against wrk -t1 -c1 POSTing the same body and headers to the
-- same endpoint of the loopback nginx test server, measured in the same run. Prints the
-- measurements and one ratio line; fails only on a crash or on a broken precondition
-- (a failed send, more than one connection, wrk answers that are not 2xx).
--
-- From the repository root:
--   LUA_PATH="./lua/?.lua;./lua/?/init.lua;./spec/?.lua;;" LUA_CPATH="./build/5.4/?.so;;" \
--     lua5.4 bench/send.lua
-- Environment: BENCH_SEND_SECONDS (length of each timed phase, default 3).
--
-- Everything runs over 127.0.0.1; every phase is bounded in time, wrk runs under
-- timeout(1), and the server is stopped at the end, also after an error.

local stella = require "stella"
local testserver = require "support.testserver"
local socket = require "socket"

local now, fmt = socket.gettime, string.format

local DURATION = tonumber(os.getenv("BENCH_SEND_SECONDS")) or 3
local WARMUP = 0.5
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

-- Runs wrk -t1 -c1 for `seconds`; returns requests/s and the parsed summary.
local function wrk(url, seconds, script)
  local cmd = fmt("timeout %d wrk -t1 -c1 -d%ds %s %s", seconds + 15, seconds,
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
-- 65,000 records of this request; it answers 500 once full. The client's timed phase
-- is therefore cut into windows with a reset in between (not timed, same connection).
local function send_windows(client, seconds, windows)
  local n, elapsed = 0, 0
  for _ = 1, windows do
    server:reset()
    local wn, wt = send_for(client, seconds / windows)
    n, elapsed = n + wn, elapsed + wt
  end
  return n, elapsed
end

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
  server = testserver.start()
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

  -- 2. The client: warm up, then count sends for DURATION seconds of wall clock.
  server:reset()
  send_for(client, WARMUP)
  local n, elapsed = send_windows(client, DURATION, math.max(1, math.floor(DURATION + 0.5)))
  local client_rate = n / elapsed
  local connections = client:connections()
  assert(connections == 1, "the client opened " .. tostring(connections) .. " connections, expected 1")

  -- 3. The client's own transport without the Lua layer (same connection, same
  --    pre-encoded body): how much of a send is the HTTP exchange itself. [info]
  server:reset()
  local pn, pelapsed = post_for(client.transport, body, 1)
  local raw_rate = pn / pelapsed
  assert(client:connections() == 1, "the transport reconnected")

  -- 4. wrk: warm up, then DURATION seconds.
  local script = wrk_script(body, headers)
  server:reset()
  wrk(url, 1, script)
  server:reset()
  local w = wrk(url, DURATION, script)
  local wrk_mode = fmt("-d%ds", DURATION)
  if w.non2xx > 0 then
    -- the server's record dict filled up (500s, a different code path): measure again
    -- in 1 s runs with a reset between them
    local windows = math.max(1, math.floor(DURATION + 0.5))
    local total, secs, lat = 0, 0, {}
    for i = 1, windows do
      server:reset()
      local part = wrk(url, 1, script)
      if part.non2xx > 0 then
        error(fmt("wrk got %d non-2xx answers of %d:\n%s", part.non2xx, part.requests, part.output), 0)
      end
      total, secs, lat[i] = total + part.requests, secs + part.requests / part.rate, part.latency
    end
    wrk_mode = fmt("%d x -d1s: -d%ds filled the test server's record dict (%d non-2xx of %d)",
                   windows, DURATION, w.non2xx, w.requests)
    w = { rate = total / secs, requests = total, latency = table.concat(lat, "/"),
          socket_errors = nil }
  end

  -- 5. The same server with no recording: wrk GET /_control/ping (a Lua content
  --    handler that only answers). An upper bound for this server. [info]
  server:reset()
  local ping = wrk(server.url .. "/_control/ping", 2, nil)
  server:reset()

  print(fmt("send benchmark under %s: %d-byte body to %s; the server saw the same method, path, "
    .. "body and Accept/Content-Type/x-api-key/User-Agent from both", interp, #body, url))
  if #extra > 0 then print("  other headers that differ: " .. table.concat(extra, ", ")) end
  print(fmt("  client:send          %6.0f/s  (%d sends in %.2f s, %.1f us each, 1 connection)",
    client_rate, n, elapsed, elapsed / n * 1e6))
  print(fmt("  transport:post       %6.0f/s  (pre-encoded body, no Lua client layer)  [info]", raw_rate))
  print(fmt("  wrk -t1 -c1          %6.0f/s  (%s: %d requests, latency avg %s%s)", w.rate, wrk_mode,
    w.requests, w.latency or "?", w.socket_errors and (", socket errors:" .. w.socket_errors) or ""))
  print(fmt("  wrk -c1 GET ping     %6.0f/s  (same server, no body, no recording)  [info]", ping.rate))
  print(fmt("sends: client %.0f/s, wrk -c1 %.0f/s, ratio %.0f%% (target >= 70%%)",
    client_rate, w.rate, client_rate / w.rate * 100))
end

local ok, err = xpcall(main, debug.traceback)
if client then pcall(client.close, client) end
if server then pcall(server.stop, server) end
for _, f in ipairs(tmpfiles) do os.remove(f) end
if not ok then
  io.stderr:write("bench/send.lua: ", tostring(err), "\n")
  os.exit(1)
end
