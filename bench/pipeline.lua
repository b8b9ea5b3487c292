-- bench/pipeline.lua: events per second through stella.trigger (a realistic rules table,
-- the SQLite store in a temporary file, sends to the loopback nginx test server) against
-- sends per second of the bare client (client:send of the same request bodies to the same
-- server), measured in the same run. Every event has its own customer and interaction,
-- so nothing is suppressed and every event is sent. Prints the measurements, a profile of
-- where a pipeline event spends its time, and one ratio line; fails only on a crash or a
-- broken precondition (an event not sent, a body that differs from the bare client's).
--
-- From the repository root:
--   LUA_PATH="./lua/?.lua;./lua/?/init.lua;./spec/?.lua;;" LUA_CPATH="./build/5.4/?.so;;" \
--     lua5.4 bench/pipeline.lua
-- Environment: BENCH_PIPELINE_SECONDS (length of each timed phase, default 2), BENCH_BATCH
-- (events per batch, default the command's). The pipeline and the bare client run in three
-- rounds, alternating which goes first; the ratio line gives the median round.

local stella = require "stella"
local store_mod = require "stella.store"
local testserver = require "support.testserver"
local socket = require "socket"

local gettime, fmt = socket.gettime, string.format

local DURATION = tonumber(os.getenv("BENCH_PIPELINE_SECONDS")) or 2
local ROUNDS = 3         -- pipeline / bare client rounds (odd: the median is one of them)
local WARMUP = 0.5
local WINDOW = 1         -- seconds between resets of the test server's record dict
local API_KEY = "bench-key"
local interp = (rawget(_G, "jit") and jit.version or _VERSION)

local TEST_DOMAINS = { ["qa.blancapeak.com"] = true }

-- A helpdesk event, one customer and one ticket per n.
local function event(n)
  return {
    id = n, status = "solved", channel = n % 2 == 0 and "phone" or "chat",
    brand = n % 3 == 0 and "blancapeak-es" or nil,
    requester = { name = "Customer " .. n, email = fmt("customer.%d@example.com", n) },
    assignee = { email = "paulagent@blancapeak.com" },
    tags = { "billing", "refund" },
    url = "https://helpdesk.example.com/tickets/" .. n,
  }
end

local RULES = {
  when = function(e) return e.status == "solved" or e.status == "closed" end,
  map = function(e)
    local tags = {}
    for i, t in ipairs(e.tags or {}) do tags[i] = t end
    return {
      customer = { name = e.requester.name, email = e.requester.email },
      employee = { email = e.assignee.email },
      channel = e.channel,
      ext_interaction_id = e.id,
      external_url = e.url,
      tags = tags,
      brand = e.brand,
    }
  end,
  channels = { phone = "integrated", chat = "integrated", email = "manual" },
  exclude_tags = { "spam", "internal" },
  do_not_send_tags = { "vip-no-survey" },
  brands = {
    ["blancapeak"] = { suppression_days = 7, language = "en" },
    ["blancapeak-es"] = { suppression_days = 7, language = "es" },
  },
  default_brand = "blancapeak",
  suppression = { days = 7, per = "brand" },
  once_per_interaction = true,
  rules = {
    function(request)   -- no surveys for the company's own test accounts
      local domain = request.customer.email:match("@([^@]+)$")
      if domain and TEST_DOMAINS[domain:lower()] then return "skip", "test_account" end
    end,
  },
}

-- The request the rules make of event(n), built by hand for the bare client.
local function request(n)
  local e = event(n)
  local brand = e.brand or "blancapeak"
  return {
    customer = { name = e.requester.name, email = e.requester.email },
    employee = { email = e.assignee.email },
    channel = e.channel,
    ext_interaction_id = e.id,
    external_url = e.url,
    tags = { "billing", "refund" },
    brand = brand,
    language = brand == "blancapeak" and "en" or "es",
  }
end

local server, db_path
local closers = {}

local function remove_db(path)
  for _, suffix in ipairs{ "", "-wal", "-shm", "-journal" } do os.remove(path .. suffix) end
end

-- Calls step(n) for consecutive n from `first` during `seconds`, in windows of WINDOW
-- seconds with a reset of the test server between them (not timed). Returns the count,
-- the time it took and the next n.
local function timed(seconds, first, step)
  local n, count, elapsed = first, 0, 0
  local windows = math.max(1, math.floor(seconds / WINDOW + 0.5))
  for _ = 1, windows do
    server:reset()
    local t0 = gettime()
    local deadline = t0 + seconds / windows
    repeat
      step(n)
      n, count = n + 1, count + 1
    until gettime() >= deadline
    elapsed = elapsed + (gettime() - t0)
  end
  return count, elapsed, n
end

-- Wraps every method of a store to count calls and time spent (for the profile).
-- Calls made inside store:atomic are counted under their own name too; `top` is the
-- time of the outermost calls only (the store's share of an event).
local function instrument(s)
  local stats, depth, top = {}, 0, { time = 0 }
  local proxy = setmetatable({}, { __index = function(_, name)
    local v = s[name]
    if type(v) ~= "function" then return v end
    return function(_, ...)
      local st = stats[name]
      if not st then st = { calls = 0, time = 0 }; stats[name] = st end
      st.calls = st.calls + 1
      depth = depth + 1
      local t0 = gettime()
      local a, b, c = v(s, ...)
      local dt = gettime() - t0
      depth = depth - 1
      st.time = st.time + dt
      if depth == 0 then top.time = top.time + dt end
      return a, b, c
    end
  end })
  return proxy, stats, top
end

local function main()
  server = testserver.start()
  db_path = os.tmpname()
  local s = assert(store_mod.sqlite(db_path))
  closers[#closers + 1] = function() s:close() end
  local client_opts = { api_key = API_KEY, base_url = server.url, retry = { attempts = 1 } }
  local trigger = stella.trigger{ rules = RULES, store = s, client = client_opts }
  closers[#closers + 1] = function() trigger:close() end
  local client = stella.new(client_opts)
  closers[#closers + 1] = function() client:close() end

  local function pipeline_step(n)
    local out = trigger:process(event(n))
    if out.status ~= "sent" then
      error(fmt("event %d: %s %s %s", n, out.status, tostring(out.reason), tostring(out.detail)), 0)
    end
  end
  -- The way `stella trigger` feeds a file: BATCH events per process_many call
  -- (two store transactions per batch instead of two per event).
  local BATCH = tonumber(os.getenv("BENCH_BATCH")) or require("stella.cli").BATCH_SIZE
  local function pipeline_batch_step(b)
    local events = {}
    for i = 1, BATCH do events[i] = event(b * BATCH + i) end
    for _, out in ipairs(trigger:process_many(events)) do
      if out.status ~= "sent" then
        error(fmt("batch %d: %s %s %s", b, out.status, tostring(out.reason), tostring(out.detail)), 0)
      end
    end
  end
  -- The way `stella trigger` runs a file: the trigger's pipeline, BATCH events per
  -- batch, each batch's sends on the wire (a background thread of the C core) while the
  -- next batch is decided and the previous one settled.
  local pl_bad
  local pl = trigger:pipeline(function(outcomes, _, b)
    for _, out in ipairs(outcomes) do
      if out.status ~= "sent" and not pl_bad then
        pl_bad = fmt("batch %d: %s %s %s", b, out.status, tostring(out.reason), tostring(out.detail))
      end
    end
  end)
  local function pipeline_stream_step(b)
    local events = {}
    for i = 1, BATCH do events[i] = event(b * BATCH + i) end
    pl:process(events, b)
  end
  local function client_step(n)
    local res, err = client:send(request(n))
    if not res then error(fmt("send %d: %s", n, tostring(err)), 0) end
  end

  -- 1. Both put the same bodies on the wire.
  server:reset()
  for n = 1, 6 do pipeline_step(n) end
  for n = 1, 6 do client_step(n) end
  local recorded = server:requests()
  assert(#recorded == 12, "expected 12 requests, the server saw " .. #recorded)
  for n = 1, 6 do
    assert(recorded[n].body == recorded[n + 6].body,
      "the pipeline and the client sent different bodies:\n" .. recorded[n].body .. "\n" .. recorded[n + 6].body)
    assert(recorded[n].body == stella.encode(request(n)))
  end

  -- 2. The pipeline, then the bare client, over fresh customers; warm-up first.
  local n = 100
  local _, _, next_n = timed(WARMUP, n, pipeline_step)
  local p_count, p_elapsed
  p_count, p_elapsed, n = timed(DURATION, next_n, pipeline_step)
  local b_calls, b_elapsed = timed(DURATION, 600000, pipeline_batch_step)   -- events 30e6 and up: fresh customers
  local b_count = b_calls * BATCH
  -- The pipeline and the bare client in ROUNDS rounds, alternating which goes first (one
  -- run on a shared machine can swing by 20 points); the ratio is the median of the
  -- rounds' ratios.
  local first_client = 1000000
  local _, _, cn = timed(WARMUP, first_client, client_step)
  local sb = 1400000                   -- pipeline batches: events 1400000 * BATCH and up
  local rounds = {}
  for r = 1, ROUNDS do
    local round = {}
    local function run_pipeline()
      local calls, elapsed
      calls, elapsed, sb = timed(DURATION, sb, pipeline_stream_step)
      local t0 = gettime()
      pl:finish()                      -- the last batch's sends and settling count too
      elapsed = elapsed + (gettime() - t0)
      if pl_bad then error(pl_bad, 0) end
      round.s_count, round.s_rate = calls * BATCH, calls * BATCH / elapsed
    end
    local function run_client()
      local count, elapsed
      count, elapsed, cn = timed(DURATION, cn, client_step)
      round.c_count, round.c_rate = count, count / elapsed
    end
    if r % 2 == 1 then run_pipeline() run_client() else run_client() run_pipeline() end
    round.ratio = round.s_rate / round.c_rate
    rounds[r] = round
  end
  local sorted = {}
  for r = 1, ROUNDS do sorted[r] = rounds[r] end
  table.sort(sorted, function(a, b) return a.ratio < b.ratio end)
  local median = sorted[math.floor((ROUNDS + 1) / 2)]
  local p_rate = p_count / p_elapsed
  local b_rate = b_count / b_elapsed
  local s_rate, c_rate = median.s_rate, median.c_rate

  -- 3. Profile [info]: the same pipeline with every store call counted and timed.
  --    The HTTP exchange is timed too: between two of the pipeline's sends the server
  --    sits idle for the store's work, and an idle loopback peer answers more slowly
  --    than one kept busy by back-to-back sends.
  local proxy, stats, top = instrument(s)
  local profiled = stella.trigger{ rules = RULES, store = proxy, client = client_opts }
  closers[#closers + 1] = function() profiled:close() end
  local post_time = 0
  for _, brand in ipairs{ "blancapeak", "blancapeak-es" } do
    local c = profiled:client_for(brand)
    local post = c.post
    c.post = function(...)
      local t0 = gettime()
      local res, perr = post(...)
      post_time = post_time + (gettime() - t0)
      return res, perr
    end
  end
  local pr_calls, pr_elapsed = timed(1, math.floor((n + 1000000 * 10) / BATCH), function(b)
    local events = {}
    for i = 1, BATCH do events[i] = event(b * BATCH + i) end
    for _, out in ipairs(profiled:process_many(events)) do assert(out.status == "sent", out.status) end
  end)
  local pr_count = pr_calls * BATCH

  -- 4. The same pipeline on the memory store [info]: what is left without SQLite.
  local mem = assert(store_mod.memory())
  local memt = stella.trigger{ rules = RULES, store = mem, client = client_opts }
  closers[#closers + 1] = function() memt:close() end
  local m_calls, m_elapsed = timed(1, math.floor((n + 1000000 * 20) / BATCH), function(b)
    local events = {}
    for i = 1, BATCH do events[i] = event(b * BATCH + i) end
    for _, out in ipairs(memt:process_many(events)) do assert(out.status == "sent", out.status) end
  end)
  local m_count = m_calls * BATCH

  -- 5. A distant API [info]: every answer 20 ms late (the test server's scripted delay),
  --    one batch through the pipeline over 1 and over 8 connections, and the bare client.
  local LATENCY, DISTANT = 0.02, 80
  local function delayed()
    local script = {}
    for i = 1, DISTANT do script[i] = { delay = LATENCY } end
    server:reset()
    server:script(script)
  end
  local distant = {}
  for _, conns in ipairs{ 1, 8 } do
    local dt = stella.trigger{ rules = RULES, store = mem, client = client_opts, connections = conns }
    closers[#closers + 1] = function() dt:close() end
    local events = {}
    for i = 1, DISTANT do events[i] = event(50000000 + conns * 1000 + i) end
    delayed()
    local t0 = gettime()
    local p = dt:pipeline(function(outcomes)
      for _, out in ipairs(outcomes) do assert(out.status == "sent", out.status) end
    end)
    p:process(events)
    p:finish()
    distant[conns] = DISTANT / (gettime() - t0)
  end
  delayed()
  local t0 = gettime()
  for i = 1, DISTANT do assert(client:send(request(60000000 + i))) end
  distant.client = DISTANT / (gettime() - t0)

  print(fmt("pipeline benchmark under %s: stella.trigger (rules: when, map, channels, exclude_tags, "
    .. "do_not_send_tags, 2 brands, suppression 7 days per brand, once_per_interaction, 1 custom rule) "
    .. "+ SQLite store (%s) vs client:send, same bodies, same server", interp, db_path))
  print(fmt("  trigger:process   %7.0f/s  (%d events in %.2f s, %.1f us each; one event per call)",
    p_rate, p_count, p_elapsed, p_elapsed / p_count * 1e6))
  print(fmt("  trigger:process_many %7.0f/s  (%d events in %.2f s, %.1f us each; %d per call, sends in line)",
    b_rate, b_count, b_elapsed, b_elapsed / b_count * 1e6, BATCH))
  for r, round in ipairs(rounds) do
    print(fmt("  round %d: trigger:pipeline %7.0f/s (%d events; batches of %d, as `stella trigger` runs), "
      .. "client:send %7.0f/s (%d sends, %.1f us each): %.0f%%", r, round.s_rate, round.s_count, BATCH,
      round.c_rate, round.c_count, 1e6 / round.c_rate, round.ratio * 100))
  end
  local per_event = pr_elapsed / pr_count * 1e6
  print(fmt("  profile [info]: %d events in %.2f s (process_many, %d per call) with the store instrumented, "
    .. "%.1f us each; store calls per event:", pr_count, pr_elapsed, BATCH, per_event))
  local names = {}
  for name in pairs(stats) do names[#names + 1] = name end
  table.sort(names, function(a, b) return stats[a].time > stats[b].time end)
  for _, name in ipairs(names) do
    local st = stats[name]
    print(fmt("    %-18s %5.2f calls  %7.1f us/event", name, st.calls / pr_count, st.time / pr_count * 1e6))
  end
  print(fmt("    store in all (outermost calls; atomic includes what runs inside it): %.1f us/event, "
    .. "%.0f%% of an event; 2 transactions (BEGIN IMMEDIATE .. COMMIT) per process_many() call",
    top.time / pr_count * 1e6, top.time / pr_elapsed * 100))
  local inside = 0
  for name, st in pairs(stats) do
    if name ~= "atomic" then inside = inside + st.time end
  end
  print(fmt("    of which BEGIN/COMMIT and the trigger's own work inside atomic (rules, encode): %.1f us/event",
    (top.time - inside) / pr_count * 1e6))
  print(fmt("    HTTP (client:post inside the pipeline): %.1f us/event, %.0f%% of an event "
    .. "(back to back, client:send took %.1f us)", post_time / pr_count * 1e6,
    post_time / pr_elapsed * 100, 1e6 / c_rate))
  print(fmt("    the rest (outside the store and HTTP: making the events, outcomes, counting): %.1f us/event",
    (pr_elapsed - top.time - post_time) / pr_count * 1e6))
  print(fmt("  trigger:process_many, memory store [info] %6.0f/s  (%d events in %.2f s; no SQLite)",
    m_count / m_elapsed, m_count, m_elapsed))
  print(fmt("  a distant API [info] (answers %d ms late, %d events): bare client %.0f/s, pipeline %.0f/s "
    .. "over 1 connection, %.0f/s over 8 (connections = 8, --connections 8)", LATENCY * 1000, DISTANT,
    distant.client, distant[1], distant[8]))
  print(fmt("pipeline: %.0f events/s (trigger:pipeline, batches of %d, as `stella trigger` runs), "
    .. "bare client %.0f sends/s, ratio %.0f%% (median of %d rounds; target >= 50%%)", s_rate, BATCH, c_rate,
    median.ratio * 100, ROUNDS))
end

local ok, err = xpcall(main, debug.traceback)
for i = #closers, 1, -1 do pcall(closers[i]) end
if server then pcall(server.stop, server) end
if db_path then remove_db(db_path) end
if not ok then
  io.stderr:write("bench/pipeline.lua: ", tostring(err), "\n")
  os.exit(1)
end
