-- bench/redis_store.lua: the trigger's pipeline (batches of the command's size, sends to
-- the loopback nginx test server) with the Redis store against the SQLite store and the
-- bare client (client:send of the same requests), measured in the same run; the round
-- trips a batch makes to Redis (counted at the connection) and Redis' own work per event
-- (INFO commandstats and INFO cpu), against the ceiling redis-benchmark measures for a call into
-- the library on the same Redis; then 1, 2 and 4 processes at once on one Redis,
-- their aggregate events per second. Every event has its own customer and interaction:
-- nothing is suppressed, every event is sent. Fails only on a crash or an event not sent.
--
-- From the repository root:
--   LUA_PATH="./lua/?.lua;./lua/?/init.lua;./spec/?.lua;;" LUA_CPATH="./build/5.4/?.so;;" \
--     lua5.4 bench/redis_store.lua
-- Environment: BENCH_SECONDS (length of each timed phase, default 2).
-- (With "--child URL SERVER_URL FIRST SECONDS" it is one of the processes of part 3.)
local stella = require "stella"
local store_mod = require "stella.store"
local socket = require "socket"

local gettime, fmt = socket.gettime, string.format
local DURATION = tonumber(os.getenv("BENCH_SECONDS")) or 2
local BATCH = require("stella.cli").BATCH_SIZE
local API_KEY = "bench-key"
local RULES = {
  channels = { phone = "integrated" },
  suppression = { days = 7, per = "brand" },
  once_per_interaction = true,
}

local function event(n)
  return { customer = { name = "Customer " .. n, email = fmt("customer.%d@example.com", n) },
           employee = { email = "paulagent@blancapeak.com" }, channel = "phone", brand = "blancapeak",
           ext_interaction_id = n }
end

-- Runs the trigger's pipeline on `s` for `seconds` over events first, first + 1, ...:
-- the number of events and the time taken (the last batch's sends and settling included).
local function run_pipeline(s, server_url, first, seconds)
  local trigger = stella.trigger{ rules = RULES, store = s,
                                  client = { api_key = API_KEY, base_url = server_url, retry = { attempts = 1 } } }
  local bad
  local pl = trigger:pipeline(function(outcomes)
    for _, o in ipairs(outcomes) do
      if o.status ~= "sent" and not bad then bad = fmt("%s %s %s", o.status, tostring(o.reason), tostring(o.detail)) end
    end
  end)
  local n, t0 = first, gettime()
  repeat
    local events = {}
    for i = 1, BATCH do events[i] = event(n + i - 1) end
    n = n + BATCH
    pl:process(events)
  until gettime() - t0 >= seconds
  pl:finish()
  local elapsed = gettime() - t0
  trigger:close()
  if bad then error("an event was not sent: " .. bad, 0) end
  return n - first, elapsed
end

if arg[1] == "--child" then
  local url, server_url, first, seconds = arg[2], arg[3], tonumber(arg[4]), tonumber(arg[5])
  local s = assert(store_mod.redis(url))
  local count, elapsed = run_pipeline(s, server_url, first, seconds)
  s:close()
  io.write(count, " ", elapsed, "\n")
  return
end

local testserver = require "support.testserver"
local redis_server = require "support.redis"
local redis = require "stella.redis"

local function info_number(text, field)
  return tonumber(text:match(field .. ":([%d.]+)"))
end

-- Redis' CPU seconds (user + sys) and its commandstats as { cmd = { calls, usec } }.
local function redis_stats(admin)
  local cpu = assert(admin:call("INFO", "cpu"))
  local cs = assert(admin:call("INFO", "commandstats"))
  local stats = {}
  for name, calls, usec in cs:gmatch("cmdstat_([%w|_]+):calls=(%d+),usec=(%d+)") do
    stats[name] = { calls = tonumber(calls), usec = tonumber(usec) }
  end
  return info_number(cpu, "used_cpu_user") + info_number(cpu, "used_cpu_sys"), stats
end

local function main()
  local server = testserver.start()
  local srv = redis_server.start{}
  local admin = assert(redis.connect(srv:url()))
  local db_path = os.tmpname()
  local ok, err = pcall(function()
    -- 1. events per second: SQLite, Redis, the bare client
    local sqlite = assert(store_mod.sqlite(db_path))
    run_pipeline(sqlite, server.url, 1, 0.5)   -- warm-up
    server:reset()
    local q_count, q_elapsed = run_pipeline(sqlite, server.url, 100000, DURATION)
    sqlite:close()
    local r = assert(store_mod.redis(srv:url{ db = 1 }))
    run_pipeline(r, server.url, 1, 0.5)
    server:reset()
    local r_count, r_elapsed = run_pipeline(r, server.url, 100000, DURATION)
    local client = stella.new{ api_key = API_KEY, base_url = server.url, retry = { attempts = 1 } }
    server:reset()
    local c_count, t0 = 0, gettime()
    repeat
      c_count = c_count + 1
      assert(client:send(event(200000 + c_count)))
    until gettime() - t0 >= DURATION
    local c_elapsed = gettime() - t0
    client:close()
    server:reset()
    print(fmt("pipeline, SQLite store: %8.0f events/s", q_count / q_elapsed))
    print(fmt("pipeline, Redis store:  %8.0f events/s", r_count / r_elapsed))
    print(fmt("bare client:            %8.0f sends/s", c_count / c_elapsed))

    -- 2. round trips per batch and Redis' work per event: one process_many of a batch
    local conn = r.backend.conn
    local trips = 0
    local call, pipeline = conn.call, conn.pipeline
    conn.call = function(...) trips = trips + 1 return call(...) end
    conn.pipeline = function(...) trips = trips + 1 return pipeline(...) end
    local trigger = stella.trigger{ rules = RULES, store = r,
                                    client = { api_key = API_KEY, base_url = server.url, retry = { attempts = 1 } } }
    local BATCHES = 10
    local cpu0, stats0 = redis_stats(admin)
    for b = 1, BATCHES do
      local events = {}
      for i = 1, BATCH do events[i] = event(300000 + b * BATCH + i) end
      for _, o in ipairs(trigger:process_many(events)) do assert(o.status == "sent", tostring(o.detail)) end
    end
    local cpu1, stats1 = redis_stats(admin)
    trigger:close()
    conn.call, conn.pipeline = nil, nil
    local events = BATCHES * BATCH
    print(fmt("round trips per batch of %d events: %.1f", BATCH, trips / BATCHES))
    local names = {}
    for name, st in pairs(stats1) do
      local before = stats0[name] or { calls = 0, usec = 0 }
      if st.calls > before.calls and name ~= "info" then
        names[#names + 1] = { name = name, calls = st.calls - before.calls, usec = st.usec - before.usec }
      end
    end
    table.sort(names, function(a, b) return a.usec > b.usec end)
    for _, c in ipairs(names) do
      print(fmt("  %-18s %7d calls  %6.2f per batch  %6.1f us per event", c.name, c.calls, c.calls / BATCHES,
        c.usec / events))
    end
    local cpu_per_event = (cpu1 - cpu0) * 1e6 / events
    print(fmt("Redis CPU per event: %.1f us (used_cpu_user + used_cpu_sys)", cpu_per_event))
    r:close()

    -- The ceiling, from redis-benchmark on the same Redis: the smallest call into the
    -- library (FCALL_RO stella_version 0: a function call's fixed cost) over one connection,
    -- as one process makes them, and over four. With the round trips per batch above, the
    -- one-connection rate bounds what round trips alone allow; Redis CPU per event bounds
    -- what one Redis core allows.
    if io.popen("command -v redis-benchmark"):read("*l") then
      local function bench_calls(clients)
        local cmd = fmt("redis-benchmark -h %s -p %d -c %d -n 20000 -q FCALL_RO stella_version 0 2>&1",
          srv.host, srv.port, clients)
        local out = io.popen(cmd):read("*a")
        return tonumber(out:match("([%d.]+) requests per second")), out
      end
      local one, out1 = bench_calls(1)
      local four = bench_calls(4)
      if one then
        local per_batch = trips / BATCHES
        print(fmt("ceiling (redis-benchmark, FCALL_RO stella_version 0): %.0f calls/s on 1 connection, %.0f on 4",
          one, four or 0))
        print(fmt("  round trips alone (%.1f per batch of %d): at most %.0f events/s per process;"
          .. " Redis CPU alone (%.1f us/event): at most %.0f events/s per Redis core",
          per_batch, BATCH, one / per_batch * BATCH, cpu_per_event, 1e6 / cpu_per_event))
      else
        print("ceiling: redis-benchmark gave no rate: " .. out1)
      end
    else
      print("ceiling: skipped, redis-benchmark not installed (Debian: redis-tools)")
    end

    -- 3. 1, 2, 4 processes at once on one Redis: aggregate events per second
    local lua = rawget(_G, "jit") and "luajit" or "lua5.4"
    local script = debug.getinfo(1, "S").source:sub(2)
    local rates = {}
    for _, procs in ipairs{ 1, 2, 4 } do
      server:reset()
      local children = {}
      for p = 1, procs do
        children[p] = assert(io.popen(fmt("%s %s --child %s %s %d %s", lua, script, srv:url{ db = 2 }, server.url,
          1000000 * (procs * 10 + p), DURATION)))
      end
      local total = 0
      for p = 1, procs do
        local out = children[p]:read("*a")
        children[p]:close()
        local count, elapsed = out:match("^(%d+) ([%d.]+)")
        assert(count, "child failed: " .. out)
        total = total + tonumber(count) / tonumber(elapsed)
      end
      rates[procs] = total
      print(fmt("%d process%s on one Redis: %8.0f events/s together", procs, procs == 1 and "" or "es", total))
    end
    print(fmt("ratio: Redis store %.2f of SQLite, %.2f of the bare client; 4 processes %.2f of 1",
      (r_count / r_elapsed) / (q_count / q_elapsed), (r_count / r_elapsed) / (c_count / c_elapsed), rates[4] / rates[1]))
  end)
  admin:close()
  srv:remove()
  server:stop()
  os.remove(db_path)
  if not ok then error(err, 0) end
end

main()
