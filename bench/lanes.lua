-- bench/lanes.lua: how busy `--connections C` keeps its connections against an API that
-- answers in 20 ms (spec/support/openresty/slow_api.lua: nginx, ngx.sleep before each
-- answer), C = 1, 8, 16, 32, 64:
--   trigger  the trigger's pipeline fed in batches of the size `stella trigger` uses
--            (stella.cli.trigger.batch_size(C)), SQLite store, connections = C
--   retry    trigger:flush() (`stella retry --connections C`) on an outbox of as many items
--   sender   the trigger's lanes alone (core.sender_open, C clients sharing one queue), the
--            same number of requests added in chunks of the batch size, no store work: the
--            ceiling of the threads and libcurl, which trigger and retry reach when batch
--            boundaries cost nothing
--   wrk      wrk -t1 -cC on the same endpoint, the same body size
-- each as events (requests) per second and as a share of the ideal C / 20 ms.
-- Environment: BENCH_LANES ("1 8 16 32 64"), BENCH_LANES_SECONDS (ideal seconds per run, 2).
local stella = require "stella"
local store_mod = require "stella.store"
local cli_trigger = require "stella.cli.trigger"
local slow_api = require "support.openresty.slow_api"
local common = require "bench.common"
local socket = require "socket"

local fmt = string.format
local gettime = socket.gettime

local LATENCY = 0.02
local SECONDS = tonumber(os.getenv("BENCH_LANES_SECONDS") or "2")
local LANES = {}
for c in (os.getenv("BENCH_LANES") or "1 8 16 32 64"):gmatch("%d+") do LANES[#LANES + 1] = tonumber(c) end

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

local api = slow_api.start{ delay = LATENCY }
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

-- `stella trigger --connections c`: its pipeline, its batch size.
local function trigger_rate(c, n)
  local t = stella.trigger{ rules = RULES, store = new_store(), client = client_opts, connections = c }
  local evs, size = events(n), cli_trigger.batch_size(c)
  local sent = 0
  local p = t:pipeline(function(outcomes)
    for _, o in ipairs(outcomes) do
      assert(o.status == "sent", o.status)
      sent = sent + 1
    end
  end)
  local t0 = gettime()
  for first = 1, n, size do
    local batch = {}
    for i = first, math.min(n, first + size - 1) do batch[#batch + 1] = evs[i] end
    p:process(batch)
  end
  p:finish()
  local elapsed = gettime() - t0
  t:close()
  assert(sent == n)
  return n / elapsed
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
  local t0 = gettime()
  local summary = assert(r:flush())
  local elapsed = gettime() - t0
  r:close()
  assert(summary.sent == n, fmt("retry sent %d of %d", summary.sent, n))
  return n / elapsed
end

-- The lanes alone: n requests over c clients in chunks of `size`, every chunk added at
-- once (the lanes never wait for one), each collected in order.
local function sender_rate(c, n, size)
  local core = require "stella.core"
  local hs = {}
  for i = 1, c do hs[i] = assert(core.http_new{ base_url = api.url, api_key = "tk_bench_lanes", timeout = 10 }) end
  local s = assert(core.sender_open())
  local t0 = gettime()
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
  local elapsed = gettime() - t0
  next_ticket = next_ticket + n
  s:close()
  for i = 1, c do hs[i]:close() end
  return n / elapsed
end

local ok, err = pcall(function()
  local script = common.wrk_post_script("tk_bench_lanes")
  tmpfiles[#tmpfiles + 1] = script
  print(fmt("lanes benchmark under %s: an API answering in %d ms (nginx, ngx.sleep), %d ideal seconds per run; load %s",
    rawget(_G, "jit") and jit.version or _VERSION, LATENCY * 1000, SECONDS, common.loadavg()))
  print("      C    ideal/s   trigger/s      %   retry/s      %  sender/s      %     wrk/s      %  (batch)")
  for _, c in ipairs(LANES) do
    local ideal = c / LATENCY
    local n = math.max(cli_trigger.batch_size(c), math.floor(ideal * SECONDS))
    api:reset()
    local tr = trigger_rate(c, n)
    api:reset()
    local rr = retry_rate(c, n)
    api:reset()
    local sr = sender_rate(c, n, cli_trigger.batch_size(c))
    local wr = common.wrk_rate(c, SECONDS, script, api.url)
    print(fmt("  %5d %10.0f %11.0f %5.1f%% %9.0f %5.1f%% %9.0f %5.1f%% %9.0f %5.1f%%  (%d)", c, ideal, tr,
      tr / ideal * 100, rr, rr / ideal * 100, sr, sr / ideal * 100, wr, wr / ideal * 100, cli_trigger.batch_size(c)))
  end
  print(fmt("  load after: %s", common.loadavg()))
end)
api:stop()
for _, p in ipairs(tmpfiles) do os.remove(p); os.remove(p .. "-wal"); os.remove(p .. "-shm") end
if not ok then error(err, 0) end
