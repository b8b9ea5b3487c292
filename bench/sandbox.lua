-- bench/sandbox.lua: requests per second the Requests API sandbox answers (POST
-- /v1/requests with a valid body and the test key: the key check, parsing and validation
-- of the JSON text by the C core (stella.validate_json), the company's checks, the marks,
-- the status rows and the echo), against the same nginx answering a fixed 200 at another location
-- (`return 200 ...`, no Lua, a body as long as the sandbox's echo). Both driven by wrk -t1
-- -c8 with the same script (method, body, headers), in one run: rounds, each timing the
-- locations one after the other (in rotating order), so that a change in the machine's load
-- between two timings moves one round, not the result. Prints every timing and one ratio
-- line: the median of the rounds' ratios. Also the CPU time nginx (its master and worker)
-- spends per request on each side (/proc/PID/schedstat), which other load disturbs less than
-- rates: when nginx is the bottleneck, the ratio of rates tends to the ratio of these.
-- [info] A third location is timed in each round, the floor of any Lua handler: it reads
-- the body and prints the fixed answer from content_by_lua_block (what nginx and its Lua
-- module cost before the sandbox's own work).
--
-- From the repository root (needs build/luajit/stella/core.so for nginx, and the core
-- for the interpreter running this file):
--   LUA_PATH="./lua/?.lua;./lua/?/init.lua;./spec/?.lua;;" LUA_CPATH="./build/5.4/?.so;;" \
--     lua5.4 bench/sandbox.lua
-- Environment: BENCH_SANDBOX_SECONDS (length of each timed run, default 2),
-- BENCH_SANDBOX_ROUNDS (default 5), BENCH_CLIENT_CPU and BENCH_SERVER_CPU (pin wrk, and
-- the sandbox's nginx, to those CPUs; tools/run-bench sets them).
--
-- Everything runs over 127.0.0.1; wrk runs under timeout(1); the sandbox is stopped at
-- the end, also after an error.

package.path = "./bench/?.lua;" .. package.path

local stella = require "stella"
local sandbox = require "stella.sandbox"
local common = require "common"

local fmt = string.format
local DURATION = tonumber(os.getenv("BENCH_SANDBOX_SECONDS")) or 2
local ROUNDS = math.max(1, math.floor(tonumber(os.getenv("BENCH_SANDBOX_ROUNDS")) or 5))
local CONNECTIONS = 8
local FIXED_PATH, FLOOR_PATH = "/_bench/fixed", "/_bench/lua-floor"

-- A realistic valid request for the default company (lua/stella/sandbox/files/config.lua).
local REQ = {
  customer = { name = "Zoë Åkesson", email = "zoe.akesson@example.com", custom_id = "cust-8812" },
  employee = { email = "paulagent@blancapeak.com" },
  channel = "phone",
  ext_interaction_id = 123456,
  external_url = "https://support.blancapeak.com/tickets/123456",
  tags = { "billing", "refund", "priority-high" },
  brand = "blancapeak",
  language = "en-US",
  country = "us",
  custom_properties = { order_id = "ORD-99812", plan = "premium", seats = 12 },
}

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function run(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("*a")
  p:close()
  return out
end

local sb
local tmpfiles = {}

local function wrk_script(body, key)
  local path = os.tmpname()
  tmpfiles[#tmpfiles + 1] = path
  local f = assert(io.open(path, "wb"))
  f:write('wrk.method = "POST"\n', "wrk.body = ", fmt("%q", body), "\n",
          'wrk.headers["Content-Type"] = "application/json"\n',
          'wrk.headers["Accept"] = "application/json"\n',
          "wrk.headers[\"x-api-key\"] = ", fmt("%q", key), "\n")
  f:close()
  return path
end

-- CPU time (ns) the sandbox's nginx processes have used so far (/proc/PID/schedstat).
local function nginx_cpu() return common.cpu_ns(sb.process:pids()) end

local function wrk(url, seconds, script)
  local cpu0 = nginx_cpu()
  local cmd = fmt("timeout %d wrk -t1 -c%d -d%ds -s %s %s", seconds + 15, CONNECTIONS, seconds,
                  shell_quote(script), shell_quote(url))
  local out = run(cmd)
  local cpu = nginx_cpu() - cpu0
  local rate = tonumber(out:match("Requests/sec:%s*([%d.]+)"))
  if not rate then error("wrk failed:\n" .. out, 0) end
  local requests = tonumber(out:match("(%d+) requests in")) or 0
  return {
    rate = rate,
    requests = requests,
    cpu = cpu / math.max(1, requests) / 1000,   -- µs of nginx CPU per request
    non2xx = tonumber(out:match("Non%-2xx or 3xx responses:%s*(%d+)")) or 0,
    latency = out:match("Latency%s+(%S+)"),
    output = out,
  }
end

local function get(url)
  return run("curl -s --max-time 10 " .. shell_quote(url))
end

local function main()
  if not run("command -v wrk"):match("wrk") then error("wrk is not installed", 0) end
  local err
  -- nginx inherits the CPU this process has when it starts it; wrk, the one it has after
  local client_cpu, server_cpu, placement = common.placement()
  local body = assert(stella.encode(REQ))
  -- the fixed answer as long as the echo: the body, a request id and "suppressed" (the
  -- delivery of every request after the first)
  local echo_len = #body - 1 + #',"request_id":"' + 36 + #'","delivery":"suppressed"}'
  local head = '{"request_id":"00000000-0000-4000-8000-000000000000","pad":"'
  local fixed_body = head .. ("x"):rep(echo_len - #head - 2) .. '"}'
  common.pin(server_cpu)
  sb, err = sandbox.start{
    port = 0,
    extra_locations = "location = " .. FIXED_PATH .. " { return 200 '" .. fixed_body .. "'; }\n"
      .. "        location = " .. FLOOR_PATH .. " { content_by_lua_block { ngx.req.read_body() "
      .. "local _ = ngx.req.get_body_data() ngx.header['Content-Length'] = " .. #fixed_body
      .. " ngx.print('" .. fixed_body .. "') } }",
  }
  if not sb then error(err, 0) end
  common.pin(client_cpu)
  local key = sb.config.keys.test
  local script = wrk_script(body, key)

  -- the body passes: one send through the client, answered 200 with a request id
  local client = stella.new{ api_key = key, base_url = sb.url, retry = { attempts = 1 } }
  local res, serr = client:send(REQ)
  client:close()
  if not res or not res.request_id then error("the sandbox refused the bench request: " .. tostring(serr), 0) end

  local api, fixed, floor = sb.url .. "/v1/requests", sb.url .. FIXED_PATH, sb.url .. FLOOR_PATH
  wrk(api, 1, script)     -- warm-up (LuaJIT traces, connections, dict)
  wrk(fixed, 1, script)
  wrk(floor, 1, script)
  local rounds = {}
  local order = { "s", "f", "l" }
  local url = { s = api, f = fixed, l = floor }
  for i = 1, ROUNDS do
    local r = {}
    for j = 0, 2 do   -- rotating order
      local side = order[(i + j - 1) % 3 + 1]
      r[side] = wrk(url[side], DURATION, script)
    end
    for name, side in pairs{ sandbox = r.s, fixed = r.f, floor = r.l } do
      if side.non2xx > 0 then
        error(fmt("wrk got %d non-2xx answers of %d from the %s location:\n%s", side.non2xx, side.requests,
          name, side.output), 0)
      end
    end
    rounds[i] = { s = r.s, f = r.f, l = r.l, ratio = r.s.rate / r.f.rate, floor_ratio = r.l.rate / r.f.rate }
  end
  local status = get(sb.url .. "/status.json?limit=0")
  local deliveries = status:match('"test":(%b{})') or "?"

  local interp = jit and jit.version or _VERSION
  print(fmt("sandbox benchmark (driver under %s): %d-byte body, %d-byte answers, wrk -t1 -c%d -d%ds, %d rounds, "
    .. "one nginx worker, %s; load average %s", interp, #body, #fixed_body, CONNECTIONS, DURATION, ROUNDS,
    placement, common.loadavg()))
  for i, r in ipairs(rounds) do
    print(fmt("  round %d: POST /v1/requests %8.0f/s (%d requests, latency avg %s, nginx CPU %.2f µs/request), "
      .. "fixed 200 (no Lua) %8.0f/s (%d, %s, %.2f µs): %.0f%%; Lua floor %8.0f/s (%.2f µs): %.0f%%", i, r.s.rate,
      r.s.requests, r.s.latency or "?", r.s.cpu, r.f.rate, r.f.requests, r.f.latency or "?", r.f.cpu,
      r.ratio * 100, r.l.rate, r.l.cpu, r.floor_ratio * 100))
  end
  print(fmt("  test-key deliveries after the run: %s", deliveries))
  local s_cpu, f_cpu, l_cpu, l_ratio = {}, {}, {}, {}
  for i, r in ipairs(rounds) do s_cpu[i], f_cpu[i], l_cpu[i], l_ratio[i] = r.s.cpu, r.f.cpu, r.l.cpu, r.floor_ratio end
  local sc, fc, lc = common.median(s_cpu), common.median(f_cpu), common.median(l_cpu)
  print(fmt("  nginx CPU per request (medians): POST /v1/requests %.2f µs, fixed 200 %.2f µs: the fixed "
    .. "answer's is %.0f%% of the sandbox's", sc, fc, fc / sc * 100))
  print(fmt("  [info] the Lua floor (content_by_lua_block: read the body, print the fixed answer): %.2f µs, "
    .. "%.0f%% of the fixed answer's rate (median): nginx's Lua module before any of the sandbox's work", lc,
    common.median(l_ratio) * 100))
  table.sort(rounds, function(a, b) return a.ratio < b.ratio end)
  local mid = rounds[math.floor((#rounds + 1) / 2)]
  if #rounds % 2 == 0 then   -- an even count: the mean of the middle two ratios
    local other = rounds[#rounds / 2 + 1]
    mid = { s = mid.s, f = mid.f, ratio = (mid.ratio + other.ratio) / 2 }
  end
  print(fmt("sandbox (%s): %.0f req/s, fixed response %.0f req/s, ratio %.0f%% (median of %d rounds; "
    .. "target >= 80%%); load average %s", placement, mid.s.rate, mid.f.rate, mid.ratio * 100, #rounds,
    common.loadavg()))
end

local ok, err = xpcall(main, debug.traceback)
if sb then pcall(sb.stop, sb) end
for _, path in ipairs(tmpfiles) do os.remove(path) end
if not ok then
  io.stderr:write("bench/sandbox.lua: ", tostring(err), "\n")
  os.exit(1)
end
