-- Specs for the fleet's rate limit (stella.rate_limit) inside OpenResty: examples/openresty
-- with its queue and store on a real redis-server (configure{ queue = "redis://..." }), rules
-- that set rate_limit, a loopback API (spec/support/testserver.lua) that records when each
-- request arrived. The in-nginx consumers and the outbox replays send through the same
-- limit as `stella worker`: the API sees no second with more than the rate plus the burst
-- (counted on its clock, never timed by us), a 429 with Retry-After pauses every sender of
-- the key, and every event accepted arrives exactly once.
--
-- Under Lua 5.4 only (but the last case): what is checked runs inside nginx (LuaJIT) and in
-- a `stella worker` child either way, and each case waits seconds for the limit.
local harness = require "support.openresty.harness"
local testserver = require "support.testserver"
local redis_server = require "support.redis"
local child = require "support.child"
local rate_limit = require "stella.rate_limit"
local nginx = require "stella.nginx"
local socket = require "socket"
local cjson = require "cjson"

local SPEC_DIR = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
if SPEC_DIR:sub(1, 1) ~= "/" then
  local _, cwd = harness.run("pwd")
  SPEC_DIR = cwd:gsub("%s+$", "") .. "/" .. SPEC_DIR
end
local ROOT = SPEC_DIR:gsub("/spec$", ""):gsub("/%./spec$", "")
local KEY = "test-key-ngx-rate-0123456789SECRET"
local LUA = os.getenv("STELLA_TEST_LUA") or "lua5.4"
local RATE, BURST = 20, 5
local it_both = it   -- (the last case, quick and without nginx, runs under both Luas)
local it = rawget(_G, "jit") and pending or it

local seq = os.time() % 100000 * 1000
local function event()
  seq = seq + 1
  return {
    id = seq, status = "solved", channel = "chat",
    requester = { name = "Customer " .. seq, email = ("rl%d@example.com"):format(seq) },
    assignee = { name = "Paul Agent", email = "paulagent@blancapeak.com" },
  }
end

local function post(n, events)
  local body = cjson.encode(events)
  local c = socket.tcp()
  c:settimeout(20)
  assert(c:connect("127.0.0.1", n.ports.PORT))
  assert(c:send("POST /events HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
    .. #body .. "\r\n\r\n" .. body))
  local answer = assert(c:receive("*a"))
  c:close()
  return tonumber(answer:match("^HTTP/1%.%d (%d%d%d)")), answer
end

-- The most requests that arrived within any one second (the API's clock).
local function busiest_second(reqs)
  local times = {}
  for i, r in ipairs(reqs) do times[i] = r.time end
  table.sort(times)
  local most, j = 0, 1
  for i = 1, #times do
    while times[i] - times[j] >= 1 do j = j + 1 end
    if i - j + 1 > most then most = i - j + 1 end
  end
  return most
end

describe("the OpenResty webhook on Redis with the rules' rate_limit", function()
  local server, srv, dir
  local running = {}
  local db_n = 0

  lazy_setup(function()
    if rawget(_G, "jit") then return end
    if not harness.read_file(ROOT .. "/build/luajit/stella/core.so") then
      harness.run("cd " .. harness.shell_quote(ROOT) .. " && make LUA=luajit module")
    end
    server = testserver.start()
    srv = redis_server.start{}
    dir = assert(nginx.temp_dir("stella-ngx-rate"))
    -- the example's rules with a limit for the key
    local rules = assert(harness.read_file(ROOT .. "/examples/openresty/rules.lua"))
    -- (max_wait below what the consumers wait for at once: some get no slot, go back to the
    -- outbox and are replayed when due)
    local limited, k = rules:gsub('\n  mode = "test",\n', ('\n  mode = "test",\n  rate_limit = { per_second = %d, '
      .. 'burst = %d, max_wait = 0.25 },\n'):format(RATE, BURST))
    assert(k == 1, "examples/openresty/rules.lua: no mode line to add rate_limit after")
    harness.write_file(dir .. "/rules.lua", limited)
  end)

  lazy_teardown(function()
    for n in pairs(running) do n:stop() end
    if server then server:stop() end
    if srv then srv:remove() end
    if dir then nginx.remove_dir(dir) end
  end)

  before_each(function()
    server:reset()
  end)

  -- The example's nginx.conf with 2 workers, its queue and store on a database of its own.
  local function webhook()
    db_n = db_n + 1
    local url = srv:url{ db = db_n }
    local n = harness.start{
      template = ROOT .. "/examples/openresty/nginx.conf",
      vars = {
        STELLA_ROOT = ROOT, EXAMPLE_DIR = ROOT .. "/examples/openresty",
        CA_FILE = "/etc/ssl/certs/ca-certificates.crt", RESOLVER = "127.0.0.1",
        NDK_MODULE = harness.find_module("ndk_http_module.so"),
        LUA_MODULE = harness.find_module("ngx_http_lua_module.so"),
      },
      ports = { "PORT" },
      edit = {
        ["worker_processes auto;"] = "worker_processes 2;",
        ["queue_capacity = 10000,"] = ('queue = "%s", rules = "%s", queue_capacity = 10000,')
          :format(url, dir .. "/rules.lua"),
      },
      env = { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = server.url, STELLA_MODE = "test" },
      probe = { port = "PORT", path = "/events/health" },
    }
    running[n] = true
    return n, url
  end

  local function stop(n)
    n:stop()
    running[n] = nil
    local log = harness.read_file(n.prefix .. "/error.log") or ""
    assert.is_nil(log:find(KEY, 1, true), "the API key is in the log")
    return log
  end

  local function log_of(n) return harness.read_file(n.prefix .. "/error.log") or "" end

  -- Waits until `want` requests answered 200 reached the API (a duplicate would come a
  -- moment later: waited for); -> the requests, { [event id] = times received with 200 }
  local function all_arrived(want, n)
    local ok = nginx.wait_until(60, function()
      local k = 0
      for _, r in ipairs(server:requests()) do if r.answer.status == nil then k = k + 1 end end
      return k >= want
    end)
    assert.is_true(ok, "not every request arrived\n" .. log_of(n))
    nginx.sleep(0.5)
    local reqs = server:requests()
    local by_id = {}
    for _, r in ipairs(reqs) do
      if r.answer.status == nil then
        local id = tostring(cjson.decode(r.body).ext_interaction_id)
        by_id[id] = (by_id[id] or 0) + 1
      end
    end
    return reqs, by_id
  end

  it("a burst of events reaches the API at the key's rate: no second holds more than rate + burst", function()
    local n = webhook()
    local events, ids = {}, {}
    for i = 1, 60 do
      events[i] = event()
      ids[i] = tostring(events[i].id)
    end
    local status, answer = post(n, events)
    assert.equal(202, status, answer)
    local reqs, by_id = all_arrived(60, n)
    for _, id in ipairs(ids) do assert.equal(1, by_id[id], "event " .. id) end
    assert.equal(60, #reqs)
    local most = busiest_second(reqs)
    assert.is_true(most <= RATE + BURST, ("%d requests within one second (limit %d/s, burst %d)")
      :format(most, RATE, BURST))
    stop(n)
  end)

  it("a 429 with Retry-After: 2 pauses every nginx worker for the key; then each event arrives once", function()
    local n, url = webhook()
    server:script{ { status = 429, headers = { ["Retry-After"] = "2" } } }
    local first = event()
    assert.equal(202, (post(n, { first })))
    local limiter = assert(rate_limit.open(url))
    local id = rate_limit.key_id(KEY)
    assert.is_true(nginx.wait_until(30, function()
      return #server:requests() >= 1 and limiter.conn:call("HGET", "stella:rate:" .. id, "until")
    end), "no pause after the 429\n" .. log_of(n))
    limiter:close()
    local events = {}
    for i = 1, 20 do events[i] = event() end
    assert.equal(202, (post(n, events)))
    local reqs, by_id = all_arrived(21, n)
    local hit = reqs[1]
    assert.equal(429, hit.answer.status)
    assert.equal(tostring(first.id), tostring(cjson.decode(hit.body).ext_interaction_id))
    for k = 2, #reqs do
      -- nothing within the 2 s after the 429 (the server's clock: ms, hence the 1 ms)
      assert.is_true(reqs[k].time >= hit.time + 2 - 0.001,
        ("request %d came %.3f s after the 429"):format(k, reqs[k].time - hit.time))
      assert.is_nil(reqs[k].answer.status, "only the first answer is a 429")
    end
    assert.equal(1, by_id[tostring(first.id)])
    for _, e in ipairs(events) do assert.equal(1, by_id[tostring(e.id)], "event " .. e.id) end
    assert.equal(22, #reqs)
    stop(n)
  end)

  it("nginx and a `stella worker` on the same stream share the key's limit", function()
    local n, url = webhook()
    local pid, wait = child.background(LUA, dir, { "worker", "--rules", dir .. "/rules.lua", "--db", url,
      "--name", "w1", "--block", "0.2", "--batch", "5", "--json" }, { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = server.url }, "w1")
    -- the worker reading (its heartbeat) before the events come
    local q = assert(require("stella.queue").open(url))
    local live = nginx.wait_until(30, function()
      for _, w in ipairs(q:workers() or {}) do if w.name == "w1" and w.state == "live" then return true end end
    end)
    q:close()
    assert.is_true(live, "the worker did not start")
    local events, ids = {}, {}
    for i = 1, 60 do
      events[i] = event()
      ids[i] = tostring(events[i].id)
    end
    assert.equal(202, (post(n, events)))
    local reqs, by_id = all_arrived(60, n)
    os.execute("kill -TERM " .. pid)
    local wstatus, wout, werr = wait()
    assert.equal(0, wstatus, tostring(wout) .. tostring(werr))
    assert.is_nil((tostring(wout) .. tostring(werr)):find(KEY, 1, true), "the API key in the worker's output")
    local by_worker = cjson.decode(wout)
    -- both sent: the worker read entries (5 at a time) or replayed hand-backs; nginx read the others
    assert.is_true(by_worker.read + by_worker.flushed > 0 and by_worker.read < 60,
      ("the worker read %d of 60 and replayed %d"):format(by_worker.read, by_worker.flushed))
    for _, eid in ipairs(ids) do assert.equal(1, by_id[eid], "event " .. eid) end
    assert.equal(60, #reqs)
    local most = busiest_second(reqs)
    assert.is_true(most <= RATE + BURST, ("%d requests within one second (limit %d/s, burst %d)")
      :format(most, RATE, BURST))
    stop(n)
  end)
end)

describe("the OpenResty webhook on its shared dict with the rules' rate_limit", function()
  it("says once in the error log that the limit is not applied", function()
    local dir = assert(nginx.temp_dir("stella-ngx-rate-dict"))
    local rules = assert(harness.read_file(ROOT .. "/examples/openresty/rules.lua"))
    harness.write_file(dir .. "/rules.lua", (rules:gsub('\n  mode = "test",\n', '\n  mode = "test",\n'
      .. '  rate_limit = { per_second = 5 },\n')))
    local n = harness.start{
      template = ROOT .. "/examples/openresty/nginx.conf",
      vars = {
        STELLA_ROOT = ROOT, EXAMPLE_DIR = ROOT .. "/examples/openresty",
        CA_FILE = "/etc/ssl/certs/ca-certificates.crt", RESOLVER = "127.0.0.1",
        NDK_MODULE = harness.find_module("ndk_http_module.so"),
        LUA_MODULE = harness.find_module("ngx_http_lua_module.so"),
      },
      ports = { "PORT" },
      edit = { ["worker_processes auto;"] = "worker_processes 2;",
               ["queue_capacity = 10000,"] = ('rules = "%s", queue_capacity = 10000,'):format(dir .. "/rules.lua") },
      env = { STELLA_TEST_KEY = KEY, STELLA_MODE = "test" },
      probe = { port = "PORT", path = "/events/health" },
    }
    local log
    nginx.wait_until(10, function()   -- (worker 0 says it as it starts: maybe after the probe's answer)
      log = harness.read_file(n.prefix .. "/error.log") or ""
      return log:find("rate_limit", 1, true)
    end)
    nginx.sleep(0.3)   -- (a second line would come now)
    log = harness.read_file(n.prefix .. "/error.log") or ""
    n:stop()
    nginx.remove_dir(dir)
    local _, count = log:gsub("the rules' rate_limit is kept in Redis", "")
    assert.equal(1, count, log)
    assert.matches("not applied with the shared dict store", log)
  end)
end)

-- One gate shared by several coroutines at once, as a worker's consumers share it inside
-- nginx (here plain coroutines, a real redis-server and a loopback API): what a send call
-- held back is that call's own.
describe("one gate, several coroutines", function()
  local server, srv
  lazy_setup(function()
    server = testserver.start()
    srv = redis_server.start{}
  end)
  lazy_teardown(function()
    if server then server:stop() end
    if srv then srv:remove() end
  end)

  local function ev(i, brand)
    return { customer = { name = "Cust " .. i, email = ("co%d@example.com"):format(i) }, brand = brand,
             employee = { email = "a@b.com" }, channel = "phone", ext_interaction_id = tostring(i) }
  end

  it_both("a send call's hand-backs are its coroutine's: another's call since does not hide them", function()
    local rules_mod = require "stella.rules"
    -- the default key: 10/s, 0.15 s ahead, at most 0.05 s of pacing per call (2 slots for 4 requests, the
    -- second 0.1 s on); brand b: a key of its own, no hurry
    local compiled = rules_mod.compile({ rate_limit = { per_second = 10, max_wait = 0.15 }, default_brand = "a",
      brands = { a = {}, b = { api_key = KEY .. "-b", rate_limit = { per_second = 1000 } } } }, "r")
    local limiter = assert(rate_limit.open(srv:url{}))
    local gate = rate_limit.gate{ limiter = limiter, rules = compiled, budget = 0.05 }
    local t = require("stella").trigger{ rules = compiled, gate = gate,
                                         client = { api_key = KEY, base_url = server.url } }
    local a = coroutine.create(function()
      local out = t:process_many{ ev(1), ev(2), ev(3), ev(4) }
      coroutine.yield(out)   -- another coroutine's send call now
      return gate:held_back_here()
    end)
    local b = coroutine.create(function()
      local out = t:process_many{ ev(5, "b") }
      return out, gate:held_back_here()
    end)
    local oka, aout = coroutine.resume(a)
    assert(oka, aout)
    local okb, bout, b_held = coroutine.resume(b)
    assert(okb, bout)
    local _, a_held = coroutine.resume(a)
    t:close()
    limiter:close()
    assert.equal("sent", bout[1].status)
    assert.is_false(b_held)
    assert.equal("sent", aout[1].status)
    assert.equal("sent", aout[2].status)
    for i = 3, 4 do
      assert.equal("queued", aout[i].status)
      assert.equal("deferred", aout[i].reason)
      assert.matches("this round's time for rate%-limited sends", aout[i].detail)
    end
    assert.is_true(a_held)
    assert.equal(3, #server:requests())
  end)
end)
