-- bench/peers.lua (make bench-peers): the same endpoint of the loopback test server,
-- POSTed sequentially by the ways a program might do it without lua-stella, next to
-- client:send and wrk -t1 -c1 (the ceiling):
--   stella client:send      validation + canonical JSON + libcurl, one keep-alive connection
--   luasocket + cjson       socket.http.request with cjson.encode (no checks); socket.http
--                           closes the connection after each request
--   python3 requests        requests.Session().post(data=...) on one keep-alive connection
--                           (skipped with a note when python3 or requests is missing)
--   curl loop               one `curl` process per request (a shell loop), as a cron job
--                           or shell script would send
--   wrk -t1 -c1             the ceiling: a C load generator on one keep-alive connection
-- Each is timed for BENCH_PEERS_SECONDS (default 1) in each of BENCH_PEERS_ROUNDS (default
-- 3) rounds, the order rotating from round to round; the table shows medians. CPU time per
-- request: os.clock for the Lua ones (this process), time.process_time around python's
-- loop, the shell's `times` for the others (the shell loop and its curls; wrk). The curl
-- loop sends 50 requests per BENCH_PEERS_SECONDS instead of running for that long.
-- Pinned like bench/send.lua (BENCH_CLIENT_CPU, BENCH_SERVER_CPU; make bench-peers puts
-- the client on CPU 1 and the server on CPU 0 when there are two CPUs).
--
-- Prints a markdown table (the README's "Alternatives" table comes from here).
package.path = "./bench/?.lua;" .. package.path

local stella = require "stella"
local testserver = require "support.testserver"
local socket = require "socket"
local http = require "socket.http"
local ltn12 = require "ltn12"
local cjson = require "cjson"
local common = require "common"

local now, fmt, clock = socket.gettime, string.format, os.clock
local SECONDS = tonumber(os.getenv("BENCH_PEERS_SECONDS")) or 1
local ROUNDS = math.max(1, math.floor(tonumber(os.getenv("BENCH_PEERS_ROUNDS")) or 3))
local API_KEY = "bench-key"

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

local server, client
local tmpfiles = {}
local function tmpfile(text)
  local name = os.tmpname()
  tmpfiles[#tmpfiles + 1] = name
  local f = assert(io.open(name, "wb"))
  f:write(text)
  f:close()
  return name
end

-- The CPU seconds of the shell's children, from `times` at the end of `out`.
local function children_cpu(out)
  local um, us, sm, ss = out:match("\n(%d+)m([%d.]+)s (%d+)m([%d.]+)s%s*$")
  if not um then return nil end
  return tonumber(um) * 60 + tonumber(us) + tonumber(sm) * 60 + tonumber(ss)
end

-- Runs `cmd` (which prints "count N" or wrk's summary) followed by `times`; returns the
-- number of requests, the wall seconds and the CPU seconds of the children.
local function child(cmd)
  local t0 = now()
  local out = common.run(cmd .. "; times")
  local wall = now() - t0
  return out, wall, children_cpu(out)
end

local function loop(seconds, fn)
  local n, t0, c0 = 0, now(), clock()
  local deadline = t0 + seconds
  repeat
    fn()
    n = n + 1
  until now() >= deadline
  return { rate = n / (now() - t0), cpu_us = (clock() - c0) / n * 1e6, n = n }
end

local PYTHON = [[
import sys, time
import requests
url, seconds, path, key = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
body = open(path, "rb").read()
s = requests.Session()
h = {"Content-Type": "application/json", "Accept": "application/json", "x-api-key": key}
s.post(url, data=body, headers=h).raise_for_status()
n, t0, c0 = 0, time.time(), time.process_time()
while time.time() - t0 < seconds:
    r = s.post(url, data=body, headers=h)
    if r.status_code != 200:
        sys.exit("status %d" % r.status_code)
    r.json()
    n += 1
print("count %d %.6f %.6f" % (n, time.time() - t0, time.process_time() - c0))
]]

local function main()
  local client_cpu, server_cpu, placement = common.placement()
  common.pin(server_cpu)
  server = testserver.start()
  common.pin(client_cpu)
  local url = server.url .. "/v1/requests"
  client = stella.new{ api_key = API_KEY, base_url = server.url, retry = { attempts = 1 } }
  local body = assert(stella.encode(REQ))
  local body_file = tmpfile(body)
  local headers = { ["Content-Type"] = "application/json", ["Accept"] = "application/json",
                    ["x-api-key"] = API_KEY }

  local peers = {}
  local function peer(name, how, fn, note)
    peers[#peers + 1] = { name = name, how = how, fn = fn, note = note, runs = {} }
  end

  peer("stella `client:send`", "validates, canonical JSON; 1 keep-alive connection (libcurl opens it)", function()
    return loop(SECONDS, function() assert(client:send(REQ)) end)
  end)

  peer("luasocket + cjson", "`socket.http.request` + `cjson.encode`, no checks; a new connection per request", function()
    return loop(SECONDS, function()
      local data = cjson.encode(REQ)
      local sink = {}
      local h = { ["Content-Length"] = tostring(#data) }
      for k, v in pairs(headers) do h[k] = v end
      local ok, code = http.request{ url = url, method = "POST", headers = h,
        source = ltn12.source.string(data), sink = ltn12.sink.table(sink) }
      if not ok or code ~= 200 then error("luasocket: " .. tostring(code), 0) end
      cjson.decode(table.concat(sink))
    end)
  end)

  local py_ok = common.run("python3 -c 'import requests; print(\"requests-ok\")'"):match("requests%-ok")
  local py_file = tmpfile(PYTHON)
  peer("python3 requests", "`requests.Session().post`, 1 keep-alive connection", py_ok and function()
    local out = common.run(fmt("timeout %d python3 %s %s %g %s %s", SECONDS + 20, shell_quote(py_file),
      shell_quote(url), SECONDS, shell_quote(body_file), API_KEY))
    local n, secs, cpu = out:match("count (%d+) ([%d.]+) ([%d.]+)")
    if not n then error("python3 requests failed:\n" .. out, 0) end
    n = tonumber(n)
    -- the loop's own time (time.process_time), not the interpreter's start
    return { rate = n / tonumber(secs), cpu_us = tonumber(cpu) / n * 1e6, n = n }
  end, not py_ok and "skipped: python3 with the requests module is not installed (Debian: python3-requests)")

  local curl_ok = common.run("command -v curl"):match("curl")
  local curl_ok = common.run("command -v curl"):match("curl")
  local CURLS = math.max(10, math.floor(50 * SECONDS))
  peer("curl loop", "one `curl` process per request (shell loop)", curl_ok and function()
    local script = fmt([[
i=0
while [ $i -lt %d ]; do
  curl -s -o /dev/null -f -X POST --data-binary @%s -H 'Content-Type: application/json' \
    -H 'Accept: application/json' -H 'x-api-key: %s' %s || exit 1
  i=$((i+1))
done
echo "count $i"]], CURLS, shell_quote(body_file), API_KEY, shell_quote(url))
    local out, wall, cpu = child("sh -c " .. shell_quote(script))
    local n = tonumber(out:match("count (%d+)"))
    if not n or n == 0 then error("curl loop failed:\n" .. out, 0) end
    return { rate = n / wall, cpu_us = cpu and cpu / n * 1e6 or 0 / 0, n = n }
  end, not curl_ok and "skipped: curl is not installed")

  local wrk_script = tmpfile('wrk.method = "POST"\nwrk.body = ' .. fmt("%q", body) .. "\n"
    .. 'wrk.headers["Content-Type"] = "application/json"\nwrk.headers["Accept"] = "application/json"\n'
    .. fmt('wrk.headers["x-api-key"] = %q\n', API_KEY))
  local wrk_ok = common.run("command -v wrk"):match("wrk")
  peer("wrk -t1 -c1", "the ceiling: C, 1 keep-alive connection, nothing checked or decoded", wrk_ok and function()
    local out, _, cpu = child(fmt("timeout %d wrk -t1 -c1 -d%ds -s %s %s", SECONDS + 15, math.max(1, math.floor(SECONDS + 0.5)),
      shell_quote(wrk_script), shell_quote(url)))
    local rate = tonumber(out:match("Requests/sec:%s*([%d.]+)"))
    local n = tonumber(out:match("(%d+) requests in"))
    if not rate or (tonumber(out:match("Non%-2xx or 3xx responses:%s*(%d+)")) or 0) > 0 then
      error("wrk failed:\n" .. out, 0)
    end
    return { rate = rate, cpu_us = cpu and cpu / n * 1e6 or 0 / 0, n = n }
  end, not wrk_ok and "skipped: wrk is not installed")

  -- warm-up, then the rounds (the order rotates)
  for _, p in ipairs(peers) do
    if p.fn then server:reset(); p.fn() end
  end
  for r = 1, ROUNDS do
    for k = 0, #peers - 1 do
      local p = peers[(r - 1 + k) % #peers + 1]
      if p.fn then
        server:reset()
        p.runs[#p.runs + 1] = p.fn()
      end
    end
  end

  local ceiling
  for _, p in ipairs(peers) do
    if #p.runs > 0 then
      local rates, cpus = {}, {}
      for i, run in ipairs(p.runs) do rates[i], cpus[i] = run.rate, run.cpu_us end
      p.rate, p.cpu_us = common.median(rates), common.median(cpus)
      if p.name:match("^wrk") then ceiling = p.rate end
    end
  end

  local interp = rawget(_G, "jit") and jit.version or _VERSION
  print(fmt("peers benchmark (Lua sides under %s): %d-byte body to %s, %s; %d rounds of %g s, medians; "
    .. "load average %s", interp, #body, url, placement, ROUNDS, SECONDS, common.loadavg()))
  print("")
  print("| client | how | requests/s | of wrk -c1 | CPU per request |")
  print("|---|---|---:|---:|---:|")
  for _, p in ipairs(peers) do
    if p.rate then
      print(fmt("| %s | %s | %.0f | %s | %.0f µs |", p.name, p.how, p.rate,
        ceiling and fmt("%.0f%%", p.rate / ceiling * 100) or "-", p.cpu_us))
    else
      print(fmt("| %s | %s | - | - | - (%s) |", p.name, p.how, p.note))
    end
  end
  print("")
  print(fmt("(%s; load average %s at the end)", placement, common.loadavg()))
end

local ok, err = xpcall(main, debug.traceback)
if client then pcall(client.close, client) end
if server then pcall(server.stop, server) end
for _, f in ipairs(tmpfiles) do os.remove(f) end
if not ok then
  io.stderr:write("bench/peers.lua: ", tostring(err), "\n")
  os.exit(1)
end
