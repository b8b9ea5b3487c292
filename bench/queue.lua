-- bench/queue.lua: the work queue (README "Work queue") against an API that answers in
-- 20 ms (spec/support/openresty/slow_api.lua, as bench/lanes.lua), on a redis-server of
-- its own (spec/support/redis.lua, a free port):
--   1. W `stella worker` processes x `--connections C` (W = 1, 2, 4; C = 1, 4): the
--      workers start and wait on an empty stream, then the events go in at once (one
--      MULTI/EXEC of XADDs, each event its own customer and interaction, so every one is
--      sent); events per second from the first request's arrival to the last answer,
--      counted at the API (every event there exactly once, every entry read and
--      acknowledged), against the ideal W x C / 20 ms, with `wrk -t1 -cWC` on the same
--      API (its own answer time is the real ceiling); the CPU time per event of the
--      workers, redis-server and the API's nginx, and how many CPUs the machine had busy
--      (/proc/stat, other work included), which say when the CPU is the limit.
--   2. The queue's overhead: the same events through one `stella worker` (queued) and one
--      `stella trigger --db redis://...` (a JSON Lines file), --connections 1, batches of
--      the trigger's size (--batch 200 for the worker), the API answering at once: CPU per
--      event of each process (its whole run, from the shell's `times`, less that of the
--      same command with no events) and of redis-server (the XADDs included).
-- Also the API's mean answer time and the share of the time each connection held a
-- request there, and the rate of the middle 80% of the answers (without the first
-- batches' start and the burst's end, where workers finish up to a batch apart).
-- BENCH_QUEUE_KEEP=1 keeps the workers' output (it is kept when a run fails).
-- Never fails on a missed target; fails when an event is lost, sent twice or left pending.
--
-- From the repository root (tools/run-bench does this):
--   LUA_PATH="./lua/?.lua;./lua/?/init.lua;./spec/?.lua;./bench/?.lua;;" \
--     LUA_CPATH="./build/5.4/?.so;;" lua5.4 bench/queue.lua
-- Environment: BENCH_QUEUE_WORKERS ("1 2 4"), BENCH_QUEUE_CONNECTIONS ("1 4"),
-- BENCH_QUEUE_SECONDS (ideal seconds per run, at least; 2), BENCH_QUEUE_BATCH (--batch;
-- the worker's default), BENCH_QUEUE_EVENTS (part 2's events; 6000; " " for
-- BENCH_QUEUE_WORKERS skips part 1).
local common = require "bench.common"
local slow_api = require "support.openresty.slow_api"
local redis_server = require "support.redis"
local child = require "support.child"
local nginx = require "stella.nginx"
local redis = require "stella.redis"
local defaults = require("stella.queue.worker").DEFAULTS
local cjson = require "cjson"
local socket = require "socket"

local fmt, gettime, q = string.format, socket.gettime, child.quote

local LUA = rawget(_G, "jit") and "luajit" or "lua5.4"
local LATENCY = 0.02
local SECONDS = tonumber(os.getenv("BENCH_QUEUE_SECONDS") or "2")
local BATCH = tonumber(os.getenv("BENCH_QUEUE_BATCH") or defaults.batch)
local OVERHEAD_EVENTS = tonumber(os.getenv("BENCH_QUEUE_EVENTS") or "6000")
local function numbers(text)
  local list = {}
  for n in text:gmatch("%d+") do list[#list + 1] = tonumber(n) end
  return list
end
local WORKERS = numbers(os.getenv("BENCH_QUEUE_WORKERS") or "1 2 4")
local CONNECTIONS = numbers(os.getenv("BENCH_QUEUE_CONNECTIONS") or "1 4")
local KEY = "tk_bench_queue"
local RULES = [[return { channels = { phone = "integrated" }, suppression = { days = 7, per = "brand" },
                          once_per_interaction = true }]]
local STREAM = "stella:events"
local CPUS = common.cpus()
-- part 2's worker reads batches of the trigger's size, so that the difference is the queue's
local TRIGGER_BATCH = require("stella.cli.trigger").batch_size(1)

local function event_json(n)
  return cjson.encode{ customer = { name = "Customer " .. n, email = fmt("customer.%d@example.com", n) },
                       employee = { email = "paulagent@blancapeak.com" }, channel = "phone", brand = "blancapeak",
                       ext_interaction_id = tostring(n) }
end

local api = slow_api.start{ delay = LATENCY }
local srv = redis_server.start{}
local dir = assert(nginx.temp_dir("stella-bench-queue"))
local rules = dir .. "/rules.lua"
assert(nginx.write_file(rules, RULES))
local env = { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = api.url }

-- CPU seconds of a finished child, from the `times` its shell printed (children's line).
local function times_cpu(text)
  local um, us, sm, ss = text:match("[^\n]*\n(%d+)m([%d.]+)s (%d+)m([%d.]+)s")
  assert(um, "no times in: " .. text)
  return tonumber(um) * 60 + tonumber(us) + tonumber(sm) * 60 + tonumber(ss)
end

-- `stella ARGS` in the background: { pid, wait() -> stdout, CPU seconds of its whole run }
local function stella_bg(name, args)
  local out, err = dir .. "/" .. name .. ".out", dir .. "/" .. name .. ".err"
  local proc = assert(io.popen("sh -c " .. q("echo $$; exec " .. child.stella_command(LUA, args, env) .. " >" .. q(out)
    .. " 2>" .. q(err)) .. "; times"))
  local pid = assert(tonumber(proc:read("*l")))
  return { pid = pid, name = name, wait = function()
    local rest = proc:read("*a")
    proc:close()
    local text = nginx.read_file(out) or ""
    return text, times_cpu(rest), nginx.read_file(err) or ""
  end }
end

local function worker_args(url, name, c, batch)
  return { "worker", "--rules", rules, "--db", url, "--name", name, "--connections", tostring(c),
           "--batch", tostring(batch or BATCH), "--json" }
end

-- Waits until `n` clients of db `db` are blocked in XREADGROUP (the workers, ready).
local function wait_ready(admin, db, n)
  local ok = nginx.wait_until(60, function()
    local list = admin:call("CLIENT", "LIST") or ""
    local blocked = 0
    for line in list:gmatch("[^\n]+") do
      if line:find(" db=" .. db .. " ", 1, true) and line:find(" cmd=xreadgroup", 1, true)
         and (line:match(" flags=(%S+)") or ""):find("b", 1, true) then
        blocked = blocked + 1
      end
    end
    return blocked >= n
  end)
  assert(ok, "the workers did not get ready")
end

-- The events first .. first + n - 1 into the stream at once (one MULTI/EXEC: workers
-- blocked in XREADGROUP are woken once all are in).
local function submit(admin, first, n)
  local cmds = { { "MULTI" } }
  for i = first, first + n - 1 do cmds[#cmds + 1] = { "XADD", STREAM, "*", "event", event_json(i) } end
  cmds[#cmds + 1] = { "EXEC" }
  local res = assert(admin:pipeline(cmds))
  assert(not redis.is_error(res[#res]) and res[#res], "the MULTI/EXEC of the events failed")
end

-- Waits until the group has read `n` entries and holds none pending (all acknowledged).
local function wait_done(admin, n, timeout)
  return nginx.wait_until(timeout, function()
    local groups = admin:call("XINFO", "GROUPS", STREAM)
    if type(groups) ~= "table" or not groups[1] then return false end
    local f = {}
    for i = 1, #groups[1] - 1, 2 do f[groups[1][i]] = groups[1][i + 1] end
    return (tonumber(f["entries-read"]) or 0) >= n and tonumber(f.pending) == 0 and tonumber(f.lag) == 0
  end)
end

-- Every event first .. first + n - 1 received once by the API, nothing else, no error.
local function check_received(first, n)
  local ids, total, _, failed = api:received()
  assert(failed == 0, "the API answered errors")
  for i = first, first + n - 1 do
    local got = ids[tostring(i)]
    assert(got == 1, fmt("event %d (number %d of the run) received %s times", i, i - first + 1, tostring(got)))
  end
  assert(total == n, fmt("the API received %d requests for %d events", total, n))
end

local function processes_cpu()
  return { redis = common.cpu_ns(srv.pid), api = common.cpu_ns(api.nginx:pids()), machine = common.machine_cpu() }
end

-- A database of its own for each run (1 to 15, emptied first): its URL, number, connection.
local next_event, next_db = 1000000, 0
local function fresh_db()
  next_db = next_db % 15 + 1
  local url = srv:url{ db = next_db }
  local admin = assert(redis.connect(url))
  assert(admin:call("FLUSHDB"))
  return url, next_db, admin
end

-- 1. W workers x C connections. -> { n, rate, middle, ideal, answer, occupancy, workers,
-- redis, api (CPU µs per event), busy (the machine's busy CPUs) }
local function run_workers(w, c)
  local url, db, admin = fresh_db()
  local ideal = w * c / LATENCY
  local n = w * math.max(3 * BATCH, math.floor(c / LATENCY * SECONDS))
  local first = next_event
  next_event = next_event + n
  api:reset()
  local workers = {}
  for i = 1, w do workers[i] = stella_bg(fmt("w%d-%d", db, i), worker_args(url, "w" .. i, c)) end
  local pids = {}
  for i, wk in ipairs(workers) do pids[i] = wk.pid end
  wait_ready(admin, db, w)
  local before, wcpu0 = processes_cpu(), common.cpu_ns(pids)
  submit(admin, first, n)
  local done = wait_done(admin, n, math.max(60, 20 * n / ideal))
  local after, wcpu1 = processes_cpu(), common.cpu_ns(pids)
  local t_first, t_last, held = api:span()
  local read, acked = 0, 0
  for _, wk in ipairs(workers) do os.execute("kill -TERM " .. wk.pid) end
  for _, wk in ipairs(workers) do
    local out, _, err = wk.wait()
    local doc = cjson.decode(out:match("{.*}") or "null")
    assert(type(doc) == "table", wk.name .. " printed no summary: " .. out .. err)
    read, acked = read + doc.read, acked + doc.acknowledged
  end
  admin:close()
  assert(done, fmt("%d workers x %d connections: the queue was not drained", w, c))
  check_received(first, n)
  assert(read == n and acked == n, fmt("read %d, acknowledged %d of %d", read, acked, n))
  local span = t_last - t_first
  local rate = n / span
  -- the middle 80% of the answers: the flow once every worker has its first batch out and
  -- before the last batches, which end up to a batch's time apart from worker to worker
  local k1 = math.floor(n / 10)
  local k2 = n - k1
  local middle = (k2 - k1) / (api:answered(k2) - api:answered(k1))
  return {
    n = n, rate = rate, ideal = ideal, middle = middle,
    answer = held / n,                    -- the API's mean answer time
    occupancy = held / (w * c * span),    -- the share of the time a connection held a request at the API
    workers = (wcpu1 - wcpu0) / 1e3 / n, redis = (after.redis - before.redis) / 1e3 / n,
    api = (after.api - before.api) / 1e3 / n,
    busy = common.busy_cpus(before.machine, after.machine, CPUS),
  }
end

-- What limits a run: the API (at 90% of the ideal or more, or 95% of what wrk gets from
-- it with as many connections: its answers take more than 20 ms), the CPU (the machine busy,
-- or the CPU per event of the workers, Redis and the API too much for the CPUs the rest of
-- the machine left), else the workers (their connections idle part of the time).
local function limit_of(r)
  local ratio = r.rate / r.ideal
  local own = (r.workers + r.redis + r.api) * r.rate / 1e6   -- CPUs our processes kept busy
  local others = math.max(0, (r.busy or own) - own)
  local ceiling = (CPUS - others) / ((r.workers + r.redis + r.api) / 1e6)
  r.ceiling = ceiling
  if ratio >= 0.9 then return "the API's 20 ms (ideal met)" end
  if r.rate >= 0.95 * r.wrk then return "the API: wrk gets no more" end
  if r.middle >= 0.95 * math.min(r.wrk, r.ideal) then return "the burst's end: workers end a batch apart" end
  if (r.busy or 0) >= 0.9 * CPUS or r.rate >= 0.85 * ceiling then
    return fmt("CPU (machine %.1f of %d CPUs busy)", r.busy or 0, CPUS)
  end
  return "the workers: connections idle between sends"
end

-- 2. The queue's overhead: one worker against one stella trigger, the same events.
local function overhead()
  api:set_delay(0)
  local n = OVERHEAD_EVENTS
  local first = next_event
  next_event = next_event + n
  local lines = {}
  for i = first, first + n - 1 do lines[#lines + 1] = event_json(i) end
  local input, empty = dir .. "/events.jsonl", dir .. "/empty.jsonl"
  assert(nginx.write_file(input, table.concat(lines, "\n") .. "\n"))
  assert(nginx.write_file(empty, ""))
  local res = {}

  -- stella trigger: the file, and an empty file (the start-up and exit to take off)
  local function trigger(file, name)
    local url, _, admin = fresh_db()
    admin:close()
    local r0, t0 = common.cpu_ns(srv.pid), gettime()
    local t = stella_bg(name, { "trigger", "--rules", rules, "--db", url, "--connections", "1",
                                "--json", "-q", file })
    local out, cpu, err = t.wait()
    assert(out:find('"command":"trigger"', 1, true), "stella trigger failed: " .. out .. err)
    return cpu, (common.cpu_ns(srv.pid) - r0) / 1e9, gettime() - t0
  end
  -- stella worker: started, the events (if any) in the stream and done, SIGTERM
  local function worker(count, name)
    local url, db, admin = fresh_db()
    local r0 = common.cpu_ns(srv.pid)
    local wk = stella_bg(name, worker_args(url, name, 1, TRIGGER_BATCH))
    wait_ready(admin, db, 1)
    local t0 = gettime()
    if count > 0 then
      submit(admin, first, count)
      assert(wait_done(admin, count, 120), "the worker did not drain the queue")
    end
    local r1, wall = common.cpu_ns(srv.pid), gettime() - t0
    os.execute("kill -TERM " .. wk.pid)
    local out, cpu, err = wk.wait()
    admin:close()
    assert(out:find('"command":"worker"', 1, true), "stella worker failed: " .. out .. err)
    return cpu, (r1 - r0) / 1e9, wall
  end

  local base_t, base_tr, base_tw = trigger(empty, "trigger-empty")
  api:reset()
  local cpu_t, redis_t, wall_t = trigger(input, "trigger")
  res.trigger_rate = n / (wall_t - base_tw)
  check_received(first, n)
  local base_w, base_wr = worker(0, "worker-empty")
  api:reset()
  local cpu_w, redis_w, wall_w = worker(n, "worker")
  res.worker_rate = n / wall_w
  check_received(first, n)
  api:set_delay(LATENCY)
  res.trigger = (cpu_t - base_t) * 1e6 / n
  res.worker = (cpu_w - base_w) * 1e6 / n
  res.redis_trigger = (redis_t - base_tr) * 1e6 / n
  res.redis_worker = (redis_w - base_wr) * 1e6 / n
  res.n = n
  return res
end

local ok, err = pcall(function()
  print(fmt("queue benchmark under %s: W `stella worker` x --connections C (--batch %d) against an API answering "
    .. "in %d ms; %d CPUs; load %s", rawget(_G, "jit") and jit.version or _VERSION, BATCH, LATENCY * 1000, CPUS,
    common.loadavg()))
  local script = common.wrk_post_script(KEY)
  local wrk_of = {}
  print("   W  C  events  ideal/s  events/s      %  middle 80%  |  wrk -cWC      %  | answer   held  |"
    .. " CPU us/event: workers  redis    api  | busy CPUs  limit")
  for _, w in ipairs(WORKERS) do
    for _, c in ipairs(CONNECTIONS) do
      local r = run_workers(w, c)
      if not wrk_of[w * c] then
        api:reset()
        wrk_of[w * c] = common.wrk_rate(w * c, 1, script, api.url)
        socket.sleep(0.2)   -- the answers to wrk's last requests, before the next run's count
      end
      local wr = wrk_of[w * c]
      r.wrk = wr
      local limit = limit_of(r)
      print(fmt("  %2d %2d  %6d  %7.0f  %8.0f  %5.1f%%  %9.1f%%  |  %8.0f  %5.1f%%  | %4.1fms  %4.1f%%  |  %20.0f"
        .. "  %5.0f  %5.0f  |  %8s  %s", w, c, r.n, r.ideal, r.rate, r.rate / r.ideal * 100, r.middle / r.ideal * 100,
        wr, wr / r.ideal * 100,
        r.answer * 1000, r.occupancy * 100, r.workers, r.redis, r.api,
        r.busy and fmt("%.2f", r.busy) or "?", limit))
    end
  end
  os.remove(script)
  print("  (events/s: from the first request's arrival at the API to the last answer; middle 80%: from the"
    .. " 10%-th answer to the 90%-th; answer: the API's mean"
    .. " time from a request's arrival to its answer; held: the share of the time the W x C connections each"
    .. " held a request at the API (events/s = held x W x C / answer); busy CPUs: the whole machine's, other"
    .. " work included)")

  local o = overhead()
  print(fmt("queue overhead, %d events, --connections 1, batches of %d, the API answering at once (CPU per"
    .. " event, whole run less an empty run; redis-server's with the XADD of each event):", o.n, TRIGGER_BATCH))
  print(fmt("  stella trigger --db redis://  %7.1f us/event  (redis-server %5.1f us/event; %5.0f events/s)", o.trigger,
    o.redis_trigger, o.trigger_rate))
  print(fmt("  stella worker (the queue)     %7.1f us/event  (redis-server %5.1f us/event; %5.0f events/s)", o.worker,
    o.redis_worker, o.worker_rate))
  print(fmt("ratio: worker %.2f of the trigger's CPU per event (+%.1f us), redis-server %.2f (+%.1f us)",
    o.worker / o.trigger, o.worker - o.trigger, o.redis_worker / o.redis_trigger, o.redis_worker - o.redis_trigger))
  print(fmt("  load after: %s", common.loadavg()))
end)
api:stop()
srv:remove()
if ok and not os.getenv("BENCH_QUEUE_KEEP") then nginx.remove_dir(dir) else print("  (the runs' output is kept in " .. dir .. ")") end
if not ok then error(err, 0) end
