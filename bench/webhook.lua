-- bench/webhook.lua: the OpenResty webhook of examples/openresty/ (2 workers, its
-- nginx.conf with a larger queue) measured four ways, all over 127.0.0.1:
--   1. the accept path alone: POST /events (checks, enqueue, 202) against the same nginx
--      answering a fixed 202 with the same body at another server (`return 202`, no Lua),
--      both driven by wrk -t1 -c16 (keep-alive) with the same script (one event of the
--      same size, a fresh id and customer per request), in alternating rounds; the median
--      ratio (target >= 70%). Meanwhile the consumers wait on an API that holds their
--      requests (they send at their own pace: here, not at all). The nginx workers share
--      one CPU and wrk runs on another (taskset and worker_cpu_affinity, when there are 2
--      CPUs or more), so the ratio compares the workers' cost per request, not how the
--      client and the server split the machine. Also printed: the nginx processes' CPU
--      time per request on each side (schedstat), which other load disturbs less.
--      [info] A third location of that server is timed in each round (rotating order):
--      the floor of any Lua handler, which reads the body and answers 202 as webhook.lua
--      does, from content_by_lua_block.
--      [info] After the rounds, one round of both with the same event in every request
--      (LuaJIT interns each body: bodies that differ only in their ids walk one hash
--      chain, the same body is found at once).
--   2. [info] the same accept path while the consumers send to an API answering in 20 ms
--      (at most 800 events/s, sharing the workers' CPU), and while they drain the
--      backlog to an API answering at once: accepts and sends per second.
--   3. the drain rate: DRAIN events posted in batches, sent to an API answering after
--      20 ms by 8 consumers per worker: events per second from the first post to the last
--      request received.
--   4. memory: bytes of the store's dict per event surveyed (a suppression mark and a
--      once-per-interaction mark), and of the queue's dict per queued event (one per POST)
--      beyond its JSON.
--   5. the accept path with the queue on Redis (configure{ queue = "redis://..." }: a
--      second nginx of the same config and pinning, a redis-server started here,
--      unpinned), in the same rounds as 1: requests/s, nginx CPU per request, and Redis'
--      CPU per request (schedstat of redis-server).
--
-- From the repository root, after make and make LUA=luajit:
--   LUA_PATH="./lua/?.lua;./lua/?/init.lua;./spec/?.lua;;" LUA_CPATH="./build/5.4/?.so;;" \
--     lua5.4 bench/webhook.lua
-- Environment: BENCH_WEBHOOK_SECONDS (each wrk run, default 3), BENCH_WEBHOOK_ROUNDS (5).
local harness = require "support.openresty.harness"
local slow_api = require "support.openresty.slow_api"
local webhook = require "support.openresty.webhook"
local common = require "bench.common"
local redis_server = require "support.redis"
local socket = require "socket"
local cjson = require "cjson"

local fmt = string.format
local DURATION = tonumber(os.getenv("BENCH_WEBHOOK_SECONDS")) or 3
local ROUNDS = math.max(1, math.floor(tonumber(os.getenv("BENCH_WEBHOOK_ROUNDS")) or 5))
local CONNECTIONS = 16
local DRAIN = 4000

local api, web, rweb, srv
local tmpfiles = {}

local function http(port, method, path, body) return webhook.http(port, method, path, body, 30) end

local function health()
  local _, body = http(web.ports.PORT, "GET", "/events/health")
  return cjson.decode(body)
end

local function event(id)
  return {
    id = id, status = "solved", channel = "chat",
    requester = { name = "Customer " .. id, email = ("c%d@example.com"):format(id) },
    assignee = { name = "Paul Agent", email = "paulagent@blancapeak.com" },
    tags = { "billing" }, locale = "en-US", url = "https://support.example.com/tickets/" .. id,
  }
end

-- A wrk script posting the sample event with a fresh id and customer each time (same
-- length within a run: ids of one magnitude).
local function wrk_script(base)
  local parts = {}
  for part in (cjson.encode(event(777777)) .. "777777"):gmatch("(.-)777777") do parts[#parts + 1] = fmt("%q", part) end
  assert(#parts >= 3, "the sample event does not show its id")
  local path = os.tmpname()
  tmpfiles[#tmpfiles + 1] = path
  local f = assert(io.open(path, "wb"))
  f:write('wrk.method = "POST"\n', 'wrk.headers["Content-Type"] = "application/json"\n',
    "local parts = { ", table.concat(parts, ", "), " }\n",
    "local n = ", base, "\n",
    "request = function() n = n + 1; return wrk.format(nil, nil, nil, table.concat(parts, n)) end\n")
  f:close()
  return path
end

-- CPUs: the nginx workers on one, wrk on another, when there are two or more.
local NCPU = tonumber((select(2, harness.run("nproc")):match("%d+"))) or 1
local WRK_CPU = NCPU >= 2 and (NCPU - 1) or nil

local cpu_of = common.cpu_ns   -- CPU time (ns) the processes have used so far

local function nginx_cpu()
  local pids = web:pids()
  for _, pid in ipairs(rweb and rweb:pids() or {}) do pids[#pids + 1] = pid end
  return cpu_of(pids)
end

local function redis_cpu()
  return srv and cpu_of{ srv.pid } or 0
end

local function wrk(url, seconds, script)
  local cpu0, rcpu0 = nginx_cpu(), redis_cpu()
  local p = assert(io.popen(fmt("%stimeout %d wrk -t1 -c%d -d%ds -s %s %s 2>&1",
    WRK_CPU and ("taskset -c " .. WRK_CPU .. " ") or "", seconds + 15, CONNECTIONS,
    seconds, harness.shell_quote(script), harness.shell_quote(url))))
  local out = p:read("*a")
  p:close()
  local rate = tonumber(out:match("Requests/sec:%s*([%d.]+)"))
  if not rate then error("wrk failed:\n" .. out, 0) end
  local requests = tonumber(out:match("(%d+) requests in")) or 0
  return { rate = rate, requests = requests, cpu = (nginx_cpu() - cpu0) / math.max(1, requests) / 1000,
           redis_cpu = (redis_cpu() - rcpu0) / math.max(1, requests) / 1000,
           non2xx = tonumber(out:match("Non%-2xx or 3xx responses:%s*(%d+)")) or 0, output = out }
end

local wait_for, loadavg = webhook.wait_for, common.loadavg

-- The edits of examples/openresty/nginx.conf both webhooks here get (2 workers, both on
-- CPU 0 when wrk has a CPU of its own; warnings only; no access log), and `more`.
local function edits(more)
  more["worker_processes auto;"] = "worker_processes 2;" .. (WRK_CPU and "\nworker_cpu_affinity 1 1;" or "")
  more["error_log @PREFIX@/error.log notice;"] = "error_log @PREFIX@/error.log warn;"
  more["access_log @PREFIX@/access.log;"] = "access_log off;"
  return more
end

local function main()
  local load0 = loadavg()
  api = slow_api.start{ delay = 0 }
  web = webhook.start{
    key = "bench-key-0123456789", base_url = api.url,
    edit = edits{
      ["queue_capacity = 10000,"] = "queue_capacity = 10000000,",
      ["lua_shared_dict stella_queue 16m;"] = "lua_shared_dict stella_queue 1024m;",
      ["lua_shared_dict stella 10m;"] = "lua_shared_dict stella 256m;",
      -- the backlog left at the end is not written out when the bench stops nginx
      ['spool = "@PREFIX@/spool.jsonl",'] = "spool = nil,",
    },
    http = "    server { listen 127.0.0.1:@FIXED_PORT@; default_type application/json;\n"
      .. "      location = /fixed { return 202 '{\"accepted\":1}\\n'; }\n"
      -- [info] the floor of any Lua handler: read the body, answer as webhook.lua does
      .. "      location = /lua-floor { content_by_lua_block { ngx.req.read_body() "
      .. "local _ = ngx.req.get_body_data() ngx.status = 202 local h = ngx.header "
      .. "h['Content-Type'] = 'application/json' h['Content-Length'] = 15 "
      .. "ngx.print('{\"accepted\":1}\\n') } } }\n",
    ports = { "PORT", "FIXED_PORT" },
  }
  local interp = rawget(_G, "jit") and jit.version or _VERSION
  -- 5. the same webhook with its queue on Redis
  srv = redis_server.start{}
  rweb = webhook.start{
    key = "bench-key-0123456789", base_url = api.url,
    edit = edits{
      ["queue_capacity = 10000,"] = 'queue = "' .. srv:url{ db = 1 } .. '", queue_capacity = 10000000,',
    },
  }

  -- 4a. memory of the store's dict per surveyed event, and 3. the drain rate
  api:set_delay(0.02)
  local function post_range(from, to)
    local batch = {}
    for id = from, to do
      batch[#batch + 1] = event(id)
      if #batch == 100 or id == to then
        local code, body = http(web.ports.PORT, "POST", "/events", cjson.encode(batch))
        if code ~= 202 then error("POST /events answered " .. tostring(code) .. ": " .. tostring(body), 0) end
        batch = {}
      end
    end
  end
  local function drained(total)
    return wait_for(120, function() local _, t = api:received(); return t >= total end)
  end
  -- warm-up and the ledger ring filled (1000 entries), so that what grows next is marks
  post_range(1, 1500)
  assert(drained(1500), "the warm-up did not drain")
  local used0 = health().store.dict.used
  local t0 = socket.gettime()
  post_range(1501, 1500 + DRAIN)
  assert(drained(1500 + DRAIN), "the drain did not finish")
  local drain_s = socket.gettime() - t0
  local per_event = (health().store.dict.used - used0) / DRAIN

  -- 4b. the queue's dict per queued event, one event per POST: the consumers held up by
  -- an API answering in 5 s while wrk posts for one second
  api:set_delay(5)
  post_range(100001, 100016)   -- each consumer holds one
  wait_for(5, function() return health().worker.busy > 0 end)
  socket.sleep(0.5)
  local qa = health().queue
  wrk("http://127.0.0.1:" .. web.ports.PORT .. "/events", 1, wrk_script(1000000))
  local qb = health().queue
  local sample = #cjson.encode(event(1000001))
  local per_queued = (qb.dict.capacity - qb.dict.free - (qa.dict.capacity - qa.dict.free)) / (qb.depth - qa.depth)

  -- 1. the accept path against the fixed 202; the consumers wait on the API meanwhile
  api:set_delay(25)
  post_range(200001, 200016)   -- each consumer holds one
  wait_for(5, function() return health().worker.busy > 0 end)
  for id = 300001, 300016 do   -- and each of the Redis webhook's
    local code = http(rweb.ports.PORT, "POST", "/events", cjson.encode(event(id)))
    if code ~= 202 then error("POST /events (Redis) answered " .. tostring(code), 0) end
  end
  local accept_url = "http://127.0.0.1:" .. web.ports.PORT .. "/events"
  local redis_url = "http://127.0.0.1:" .. rweb.ports.PORT .. "/events"
  local fixed_url = "http://127.0.0.1:" .. web.ports.FIXED_PORT .. "/fixed"
  wrk(fixed_url, 1, wrk_script(10000000))
  local floor_url = "http://127.0.0.1:" .. web.ports.FIXED_PORT .. "/lua-floor"
  wrk(floor_url, 1, wrk_script(10000000))
  wrk(redis_url, 1, wrk_script(10500000))
  local rounds = {}
  local order = { "a", "f", "l", "r" }
  local url = { a = accept_url, f = fixed_url, l = floor_url, r = redis_url }
  for i = 1, ROUNDS do
    local base = 10000000 + i * 1000000
    local r = {}
    for j = 0, 3 do   -- rotating order
      local side = order[(i + j - 1) % 4 + 1]
      r[side] = wrk(url[side], DURATION, wrk_script(side == "r" and base + 500000 or base))
    end
    local a, f, l, rd = r.a, r.f, r.l, r.r
    if a.non2xx > 0 then error(fmt("%d of %d accepts were not 202:\n%s", a.non2xx, a.requests, a.output), 0) end
    if f.non2xx > 0 then error(fmt("%d of %d fixed answers were not 202:\n%s", f.non2xx, f.requests, f.output), 0) end
    if l.non2xx > 0 then error(fmt("%d of %d Lua floor answers were not 202:\n%s", l.non2xx, l.requests, l.output), 0) end
    if rd.non2xx > 0 then error(fmt("%d of %d Redis accepts were not 202:\n%s", rd.non2xx, rd.requests, rd.output), 0) end
    rounds[i] = { a = a, f = f, l = l, r = rd, ratio = a.rate / f.rate, rratio = rd.rate / f.rate }
  end
  -- [info] one body for every request (the same id): LuaJIT finds each body already
  -- interned instead of walking a hash chain of bodies that differ only in their ids (see
  -- README, OpenResty)
  local same = wrk_script(20000000)
  do   -- its request function again, last: the same event each time
    local f = assert(io.open(same, "ab"))
    f:write("request = function() return wrk.format(nil, nil, nil, table.concat(parts, 20000001)) end\n")
    f:close()
  end
  local sa = wrk(accept_url, DURATION, same)
  local sf = wrk(fixed_url, DURATION, same)
  local load1 = loadavg()
  -- pushes per call of the Redis webhook's group commit: entries added / FCALLs made
  local per_call
  do
    local conn = assert(require("stella.redis").connect(srv:url{ db = 1 }))
    local stats = assert(conn:call("INFO", "commandstats"))
    local info = assert(conn:call("XINFO", "STREAM", "stella:events"))
    conn:close()
    local calls = tonumber(stats:match("cmdstat_fcall:calls=(%d+)")) or 0
    for i = 1, #info - 1, 2 do
      if info[i] == "entries-added" then per_call = info[i + 1] / math.max(1, calls) end
    end
  end
  -- the Redis webhook's backlog would be drained by its consumers from here on, sharing CPU 0
  rweb:stop()
  rweb = nil
  srv:remove()
  srv = nil

  -- 2. accepting while the consumers send to a 20 ms API, and while they drain the
  -- backlog as fast as they can
  api:set_delay(0.02)
  socket.sleep(0.5)
  local paced = wrk(accept_url, DURATION, wrk_script(80000000))
  api:set_delay(0)
  socket.sleep(1)
  local _, sent0 = api:received()
  local ts = socket.gettime()
  local busy = wrk(accept_url, DURATION, wrk_script(90000000))
  local _, sent1 = api:received()
  local sends = (sent1 - sent0) / (socket.gettime() - ts)

  print(fmt("webhook benchmark (driver under %s): 2 nginx workers (8 consumers each) %s; "
    .. "load average %s before, %s after the rounds", interp,
    WRK_CPU and ("on CPU 0, wrk on CPU " .. WRK_CPU) or "and wrk unpinned (1 CPU)", load0, load1))
  for i, r in ipairs(rounds) do
    print(fmt("  round %d: POST /events (enqueue + 202) %6.0f/s (%.1f us CPU each), fixed 202 (no Lua) %6.0f/s "
      .. "(%.1f us): %.0f%%; Lua floor %6.0f/s (%.1f us): %.0f%%; queue on Redis %6.0f/s (%.1f us nginx + %.1f us "
      .. "Redis CPU each): %.0f%%", i, r.a.rate, r.a.cpu, r.f.rate, r.f.cpu, r.ratio * 100, r.l.rate, r.l.cpu,
      r.l.rate / r.f.rate * 100, r.r.rate, r.r.cpu, r.r.redis_cpu, r.rratio * 100))
  end
  local function median(key)
    local v = {}
    for i, r in ipairs(rounds) do v[i] = key(r) end
    table.sort(v)
    return v[math.floor((#v + 1) / 2)]
  end
  local cpu_a, cpu_f = median(function(r) return r.a.cpu end), median(function(r) return r.f.cpu end)
  local cpu_l, floor_ratio = median(function(r) return r.l.cpu end), median(function(r) return r.l.rate / r.f.rate end)
  local cpu_r, cpu_rr = median(function(r) return r.r.cpu end), median(function(r) return r.r.redis_cpu end)
  local rate_r, ratio_r = median(function(r) return r.r.rate end), median(function(r) return r.rratio end)
  table.sort(rounds, function(x, y) return x.ratio < y.ratio end)
  local mid = rounds[math.floor((#rounds + 1) / 2)]
  print(fmt("  nginx CPU per request (medians): "
    .. "%.1f us vs %.1f us, the fixed answer's cost is %.0f%% of the accept path's", cpu_a, cpu_f, cpu_f / cpu_a * 100))
  print(fmt("  [info] the Lua floor (content_by_lua_block: read the body, answer 202 as webhook.lua does): "
    .. "%.1f us, %.0f%% of the fixed answer's rate (median): nginx's Lua module before any of the webhook's work",
    cpu_l, floor_ratio * 100))
  print(fmt("  [info] one body for every request: POST /events %.0f/s (%.1f us CPU each), fixed 202 %.0f/s "
    .. "(%.1f us): %.0f%% (one round)", sa.rate, sa.cpu, sf.rate, sf.cpu, sa.rate / sf.rate * 100))
  print(fmt("  accepting while the consumers send to a 20 ms API (800/s): %.0f/s (%.1f us CPU each, sends included)",
    paced.rate, paced.cpu))
  print(fmt("  accepting while the consumers drain a backlog to an API answering at once: %.0f accepts/s "
    .. "and %.0f sends/s", busy.rate, sends))
  print(fmt("  drain: %d events to an API answering in 20 ms: %.1f s, %.0f events/s (16 consumers: at most %d/s)",
    DRAIN, drain_s, DRAIN / drain_s, 16 / 0.02))
  print(fmt("  store's dict: %.0f bytes per surveyed event (a suppression mark + a once-per-interaction mark; "
    .. "whole 4 KB pages)", per_event))
  print(fmt("  queue's dict: %.0f bytes per queued event of %d bytes of JSON (%.0f beyond the JSON)",
    per_queued, sample, per_queued - sample))
  print(fmt("  queue on Redis (medians): %.0f req/s, %.0f%% of the fixed answer; nginx CPU %.1f us per request "
    .. "(%.1f us more than the shared dict's), Redis CPU %.1f us; %.1f pushes per call (group commit)", rate_r,
    ratio_r * 100, cpu_r, cpu_r - cpu_a, cpu_rr, per_call or 0))
  print(fmt("webhook accept path: %.0f req/s, fixed 202 %.0f req/s, ratio %.0f%% (median of %d rounds; target >= 70%%)",
    mid.a.rate, mid.f.rate, mid.ratio * 100, #rounds))
end

local ok, err = xpcall(main, debug.traceback)
if web then pcall(web.stop, web) end
if rweb then pcall(rweb.stop, rweb) end
if srv then pcall(srv.remove, srv) end
if api then pcall(api.stop, api) end
for _, path in ipairs(tmpfiles) do os.remove(path) end
if not ok then
  io.stderr:write("bench/webhook.lua: ", tostring(err), "\n")
  os.exit(1)
end
