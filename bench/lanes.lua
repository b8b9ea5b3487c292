-- bench/lanes.lua: how busy `--connections C` keeps its connections against an API that
-- answers in 20 ms, C = 1, 8, 16, 32, 64. The API is bench/delay_api.c
-- (spec/support/delay_api.lua: one epoll thread answering each request exactly 20 ms after
-- it arrived); BENCH_LANES_API=nginx takes spec/support/openresty/slow_api.lua instead
-- (nginx, ngx.sleep), which holds a request 21-22 ms (millisecond timers, a cached clock,
-- shared-dict work per request), so no client reaches 95% of C / 20 ms against it.
--   trigger  the trigger's pipeline fed in batches of the size `stella trigger` uses
--            (stella.cli.trigger.batch_sizes(C)), SQLite store, connections = C
--   retry    trigger:flush() (`stella retry --connections C`) on an outbox of as many items
--   sender   the trigger's lanes alone (core.sender_open, C clients sharing one queue), the
--            same number of requests added in chunks of the batch size, no store work: the
--            ceiling of the lanes' loop and libcurl, which trigger and retry reach when batch
--            boundaries cost nothing
--   wrk      wrk -t1 -cC on the same endpoint, the same body size
-- each as events (requests) per second and as a share of the ideal C / 20 ms, with the
-- API's mean hold time per request (arrival to answer) and the mean round trip the client
-- saw (C x elapsed / n; for wrk C / its rate): their difference is what the client and the
-- kernel add. Each run checks that the API answered every request once (no interaction
-- twice).
-- Placement: the API on BENCH_SERVER_CPU, this process (its lanes, and wrk) on
-- BENCH_CLIENT_CPU; unset, on a machine of 2 CPUs or more with taskset: API on CPU 0,
-- client on CPU 1.
-- Environment: BENCH_LANES ("1 8 16 32 64"), BENCH_LANES_SECONDS (ideal seconds per run, 2),
-- BENCH_LANES_API ("delay", or "nginx"), BENCH_LANES_MODES (which of "trigger retry sender wrk").
local stella = require "stella"
local store_mod = require "stella.store"
local cli_trigger = require "stella.cli.trigger"
local common = require "bench.common"
local socket = require "socket"

local fmt = string.format
local gettime = socket.gettime

local LATENCY = 0.02
local SECONDS = tonumber(os.getenv("BENCH_LANES_SECONDS") or "2")
local LANES = {}
for c in (os.getenv("BENCH_LANES") or "1 8 16 32 64"):gmatch("%d+") do LANES[#LANES + 1] = tonumber(c) end
local MODES = {}
for m in (os.getenv("BENCH_LANES_MODES") or "trigger retry sender wrk"):gmatch("%a+") do MODES[m] = true end

local RULES = {
  map = function(e)
    return { customer = { name = "Customer " .. e.ticket, email = ("c%d@example.com"):format(e.ticket) },
             employee = { email = "paulagent@blancapeak.com" }, channel = "phone",
             ext_interaction_id = e.ticket }
  end,
  channels = { phone = "integrated" },
  suppression = { days = 7, per = "brand" },
  once_per_interaction = true,
}

local API_KIND = os.getenv("BENCH_LANES_API") or "delay"
assert(API_KIND == "delay" or API_KIND == "nginx", "BENCH_LANES_API: delay or nginx")

local client_cpu, server_cpu, placement = common.placement()
if not client_cpu and common.cpus() >= 2 and common.run("command -v taskset"):match("taskset") then
  client_cpu, server_cpu, placement = "1", "0", "client on CPU 1, server on CPU 0"
end
local api
if API_KIND == "nginx" then
  common.pin(server_cpu)   -- nginx inherits this process's CPU
  api = require("support.openresty.slow_api").start{ delay = LATENCY }
else
  api = require("support.delay_api").start{ delay = LATENCY, cpu = server_cpu }
end
common.pin(client_cpu)
local tmpfiles = {}
local client_opts = { api_key = "tk_bench_lanes", base_url = api.url, timeout = 10 }

local function new_store()
  local path = os.tmpname()
  tmpfiles[#tmpfiles + 1] = path
  os.remove(path)
  return assert(store_mod.sqlite(path))
end

local next_ticket = 10000000
local function events(n)
  local list = {}
  for i = 1, n do list[i] = { ticket = next_ticket + i } end
  next_ticket = next_ticket + n
  return list
end

-- `stella trigger --connections c`: its pipeline, its batch sizes.
local function trigger_rate(c, n)
  local t = stella.trigger{ rules = RULES, store = new_store(), client = client_opts, connections = c }
  local evs, next_size = events(n), cli_trigger.batch_sizes(c)
  local sent = 0
  local p = t:pipeline(function(outcomes)
    for _, o in ipairs(outcomes) do
      assert(o.status == "sent", o.status)
      sent = sent + 1
    end
  end)
  local t0, cpu0 = gettime(), os.clock()   -- CPU: the process's, the lanes' threads included
  local first = 1
  while first <= n do   -- the CLI's batches: small first, doubling up to batch_size(c)
    local size = next_size()
    local batch = {}
    for i = first, math.min(n, first + size - 1) do batch[#batch + 1] = evs[i] end
    first = first + size
    p:process(batch)
  end
  p:finish()
  local elapsed, cpu = gettime() - t0, os.clock() - cpu0
  t:close()
  assert(sent == n)
  return elapsed, t0, cpu
end

-- `stella retry --connections c`: an outbox of n items (written by a trigger that was
-- told to stop at once, so that nothing went out), then flush().
local function retry_rate(c, n)
  local store = new_store()
  local t = stella.trigger{ rules = RULES, store = store, client = client_opts, connections = c,
                            stop = function() return true end }
  local p = t:pipeline(function() end)
  p:process(events(n))
  p:finish()
  t:close()
  local r = stella.trigger{ rules = RULES, store = store, client = client_opts, connections = c }
  local t0, cpu0 = gettime(), os.clock()   -- CPU: the process's, the lanes' threads included
  local summary = assert(r:flush())
  local elapsed, cpu = gettime() - t0, os.clock() - cpu0
  r:close()
  assert(summary.sent == n, fmt("retry sent %d of %d", summary.sent, n))
  return elapsed, t0, cpu
end

-- The lanes alone: n requests over c clients in chunks of `size`, every chunk added at
-- once (the lanes never wait for one), each collected in order.
local function sender_rate(c, n, size)
  local core = require "stella.core"
  local hs = {}
  for i = 1, c do hs[i] = assert(core.http_new{ base_url = api.url, api_key = "tk_bench_lanes", timeout = 10 }) end
  local s = assert(core.sender_open())
  local t0, cpu0 = gettime(), os.clock()   -- CPU: the process's, the lanes' threads included
  local ids = {}
  for first = 1, n, size do
    local flat, groups = {}, {}
    for i = first, math.min(n, first + size - 1) do
      local t = next_ticket + i
      flat[#flat + 1] = hs[(i - 1) % c + 1]
      flat[#flat + 1] = "/v1/requests"
      flat[#flat + 1] = ('{"customer":{"name":"Customer %d","email":"c%d@example.com"},"employee":'
        .. '{"email":"paulagent@blancapeak.com"},"channel":"phone","ext_interaction_id":"%d"}'):format(t, t, t)
      groups[#groups + 1] = 1
    end
    ids[#ids + 1] = assert(s:add(flat, 60, groups))
  end
  for _, id in ipairs(ids) do
    assert(s:ready(id, 60))
    for _, r in ipairs((s:collect(id))) do assert(r and r.status and r.status < 300, "not sent") end
  end
  local elapsed, cpu = gettime() - t0, os.clock() - cpu0
  next_ticket = next_ticket + n
  s:close()
  for i = 1, c do hs[i]:close() end
  return elapsed, t0, cpu
end

-- What the API answered since its last reset: how many, their mean hold time (s); raises
-- when an interaction was answered twice, or (`n`) when not exactly n were answered.
local function answered(what, n)
  local ids, total = api:received()
  local twice = 0
  if API_KIND == "nginx" then
    for _, k in pairs(ids) do if k > 1 then twice = twice + 1 end end
  else
    twice = ids.dups
  end
  if twice > 0 then error(fmt("%s: %d interactions were answered more than once", what, twice), 0) end
  if n and total ~= n then error(fmt("%s: the API answered %d requests of %d", what, total, n), 0) end
  local first, last, held = api:span()
  return total, total > 0 and held / total or 0, first, last
end

local ok, err = pcall(function()
  local script = common.wrk_post_script("tk_bench_lanes")
  tmpfiles[#tmpfiles + 1] = script
  print(fmt("lanes benchmark under %s: an API answering in %d ms (%s), %d ideal seconds per run, %s; load %s",
    rawget(_G, "jit") and jit.version or _VERSION, LATENCY * 1000,
    API_KIND == "nginx" and "nginx, ngx.sleep" or "bench/delay_api.c", SECONDS, placement, common.loadavg()))
  print("  hold: the API's mean time from a request's arrival to its answer; round trip: C x elapsed / n;")
  print("  start: from the call to the first arrival at the API; end: from the last answer to the return;")
  print("  between: the rate from the first arrival to the last answer, as a share of C / 20 ms;")
  print("  CPU: this process's CPU time (every thread) per request, µs")
  print("      C  mode        ideal/s     rate/s       %   hold ms  round trip ms  start ms  end ms  between   CPU  (batch)")
  local summary = {}
  for _, c in ipairs(LANES) do
    local ideal = c / LATENCY
    local size = cli_trigger.batch_size(c)
    local n = math.max(size, math.floor(ideal * SECONDS))
    local row = { c = c }
    local function report(mode, rate, hold, trip, start, stop, between, cpu)
      row[mode] = rate / ideal * 100
      print(fmt("  %5d  %-8s %10.0f %10.0f  %5.1f%%  %8.2f  %13.2f  %8s  %6s  %6s  %4s  (%d)", c, mode, ideal, rate,
        rate / ideal * 100, hold * 1000, trip * 1000, start and fmt("%.1f", start * 1000) or "-",
        stop and fmt("%.1f", stop * 1000) or "-", fmt("%.1f%%", between / ideal * 100),
        cpu and fmt("%.0f", cpu * 1e6) or "-", size))
    end
    local function measure(mode, run)
      if not MODES[mode] then return end
      api:reset()
      local el, t0, cpu = run()
      if not el then return end   -- wrk: reported already
      local _, hold, first, last = answered(mode, n)
      report(mode, n / el, hold, c * el / n, first - t0, t0 + el - last, n / (last - first), cpu / n)
    end
    measure("trigger", function() return trigger_rate(c, n) end)
    measure("retry", function() return retry_rate(c, n) end)
    measure("sender", function() return sender_rate(c, n, size) end)
    measure("wrk", function()
      local wr = common.wrk_rate(c, SECONDS, script, api.url)
      -- the requests wrk left in flight: the nginx API still answers (and counts) them
      local deadline = gettime() + 1
      while api:busy() > 0 and gettime() < deadline do socket.sleep(0.01) end
      local total, hold, first, last = answered("wrk")
      report("wrk", wr, hold, c / wr, nil, nil, total / (last - first))
    end)
    summary[#summary + 1] = row
  end
  print("      C   trigger     retry    sender       wrk   (% of C / 20 ms)")
  for _, r in ipairs(summary) do
    local function pct(v) return v and fmt("%7.1f%%", v) or "       -" end
    print(fmt("  %5d  %s  %s  %s  %s", r.c, pct(r.trigger), pct(r.retry), pct(r.sender), pct(r.wrk)))
  end
  print(fmt("  load after: %s", common.loadavg()))
end)
api:stop()
for _, p in ipairs(tmpfiles) do os.remove(p); os.remove(p .. "-wal"); os.remove(p .. "-shm") end
if not ok then error(err, 0) end
