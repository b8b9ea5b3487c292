-- Specs for examples/openresty/ with its queue on Redis (configure{ queue = "redis://..." }:
-- stella.openresty.redis_queue, the work queue's stream), as an operator runs it: the
-- shipped nginx.conf (2 workers) in a real nginx, a real redis-server (spec/support/redis.lua,
-- with AOF, so that a restart keeps the stream, and a password), a loopback API answering slowly
-- (spec/support/openresty/slow_api.lua) that counts what it received, and `stella worker`
-- processes. Every event answered 202 must reach the API exactly once; an event Redis
-- cannot take is answered 503 with Retry-After, never 202.
--
-- Under Lua 5.4 only: what is checked runs inside nginx (LuaJIT) and in `stella worker`
-- children either way, and each case sleeps on a slow API for seconds.
local harness = require "support.openresty.harness"
local slow_api = require "support.openresty.slow_api"
local webhook_nginx = require "support.openresty.webhook"
local redis_server = require "support.redis"
local child = require "support.child"
local queue = require "stella.queue"
local socket = require "socket"
local cjson = require "cjson"

local ROOT = harness.ROOT
local KEY = "test-key-webhook-redis-0123456789"
local PASSWORD = "redis-pw-webhook-Zq9s3cret"   -- never in a log line or an answer
local LUA = os.getenv("STELLA_TEST_LUA") or "lua5.4"
local it = rawget(_G, "jit") and pending or it
local http, wait_for = webhook_nginx.http, webhook_nginx.wait_for
local event = webhook_nginx.events(os.time() % 100000 * 1000 + 500, "r")

describe("the OpenResty webhook with its queue on Redis", function()
  local api, srv
  local nodes = webhook_nginx.nodes()
  local db_n = 0

  lazy_setup(function()
    if rawget(_G, "jit") then return end
    if not harness.read_file(ROOT .. "/build/luajit/stella/core.so") then
      harness.run("cd " .. harness.shell_quote(ROOT) .. " && make LUA=luajit module")
    end
    api = slow_api.start{ delay = 0 }
    srv = redis_server.start{ appendonly = true, appendfsync = "always", requirepass = PASSWORD }
  end)

  lazy_teardown(function()
    nodes:stop_all()
    if api then api:stop() end
    if srv then srv:remove() end
  end)

  before_each(function()
    api:set_status(201)
    api:reset()
  end)

  -- A database of its own for each case: its stream, group and store.
  local function fresh_url()
    db_n = db_n + 1
    return srv:url{ db = db_n, password = PASSWORD }
  end

  -- The example's nginx.conf with 2 workers, its queue on url, the settings given (Lua
  -- text added to configure{...}) and the edits, on a prefix of its own (or `prefix`).
  local function webhook(url, settings, edit, prefix)
    edit = edit or {}
    edit["queue_capacity = 10000,"] = ('queue = "%s", %s'):format(url, settings or "queue_capacity = 10000,")
    return nodes:start{ key = KEY, base_url = api.url, workers = 2, edit = edit, prefix = prefix }
  end

  local function stop(n)
    nodes:stop(n)
    local log = harness.read_file(n.prefix .. "/error.log") or ""
    assert.is_nil(log:find(PASSWORD, 1, true), "the Redis password is in the log")
    assert.is_nil(log:find(KEY, 1, true), "the API key is in the log")
  end

  local function health(n)
    local code, body = http(n.ports.PORT, "GET", "/events/health")
    assert.equal(200, code, body)
    return cjson.decode(body)
  end

  local function backlog(url)
    local q = assert(queue.open(url))
    local b = assert(q:backlog())
    q:close()
    return b
  end

  -- Posts `count` new events on one connection each, all sent before any answer is read;
  -- each must be answered 202. -> { [id] = true }
  local function burst(n, count) return webhook_nginx.burst_accepted(n.ports.PORT, event, count) end

  local function post(n, e)
    return http(n.ports.PORT, "POST", "/events", cjson.encode(e))
  end

  -- Waits until every id in `accepted` reached the API; then checks each did exactly
  -- once, that no id in `refused` did, and that the group has nothing left.
  local function all_sent_once(url, accepted, refused, timeout, log)
    webhook_nginx.all_sent_once(api, accepted, refused, timeout, log)
    assert.truthy(wait_for(10, function() return backlog(url).waiting == 0 end), cjson.encode(backlog(url)))
  end

  local function log_of(n) return function() return harness.read_file(n.prefix .. "/error.log") or "" end end

  it("drains a burst larger than its consumer pool, sending each event exactly once", function()
    api:set_delay(1)
    local url = fresh_url()
    local n = webhook(url, nil, { ["consumers = 8,"] = "consumers = 3," })   -- 6 in all
    local accepted = burst(n, 24)
    -- the 202s are in Redis: what is not received yet is waiting or pending in the group
    -- (the API read on both sides of the group's count, as in openresty_webhook_spec)
    local function received_now() return webhook_nginx.received_count(api, accepted) end
    local before = received_now()
    local b = backlog(url)
    local after = received_now()
    assert.is_true(before + b.waiting <= 24, cjson.encode(b))
    assert.is_true(after + b.waiting >= 24, "lost: " .. after .. " received, " .. b.waiting .. " in Redis")
    assert.is_true(b.pending <= 6, "more held than the pool: " .. cjson.encode(b))
    local h = health(n)
    assert.equal(10000, h.queue.capacity)
    assert.is_number(h.queue.depth)
    assert.is_number(h.queue.oldest_age)
    all_sent_once(url, accepted, nil, 15, log_of(n))
    webhook_nginx.pool_used(api, 6)
    assert.equal(0, health(n).queue.depth)
    stop(n)
  end)

  it("answers 503 with Retry-After when the queue holds its capacity, and sends every event it accepted", function()
    api:set_delay(1)
    local url = fresh_url()
    local n = webhook(url, "queue_capacity = 4,", { ["consumers = 8,"] = "consumers = 1," })
    -- each answered 202, or 503 with Retry-After: 30 naming the capacity
    local accepted, refused, nacc = webhook_nginx.post_until_full(n.ports.PORT, event, 20, "capacity of 4")
    -- the capacity counts what the consumers hold (pending) as well: 4, and one more for
    -- each event sent meanwhile
    assert.is_true(nacc >= 4 and nacc < 20, nacc .. " accepted")
    assert.truthy(log_of(n)():find("answering 503", 1, true))
    all_sent_once(url, accepted, refused, 15, log_of(n))
    stop(n)
  end)

  it("answers 503 with Retry-After, never 202, while Redis is stopped; accepts again once it is back", function()
    api:set_delay(0)
    local url = fresh_url()
    local n = webhook(url, nil, { ["consumers = 8,"] = "consumers = 2," })
    local accepted, refused = {}, {}
    for _ = 1, 3 do
      local e = event()
      assert.equal(202, (post(n, e)))
      accepted[e.id] = true
    end
    all_sent_once(url, accepted, nil, 10, log_of(n))
    srv:stop()
    for _ = 1, 6 do
      local e = event()
      local code, body, headers = post(n, e)
      assert.equal(503, code, body)
      assert.equal("30", headers["retry-after"])
      assert.truthy(cjson.decode(body).error:find("redis", 1, true), body)
      assert.is_nil(body:find(PASSWORD, 1, true), body)
      refused[e.id] = true
    end
    local h = health(n)
    assert.equal("warn", h.status)
    assert.truthy(h.warnings[1]:find("the queue cannot be read", 1, true), cjson.encode(h))
    srv:start()
    for _ = 1, 3 do
      local e = event()
      local code = assert(wait_for(10, function()
        local c = post(n, e)
        return c == 202 and c
      end))
      assert.equal(202, code)
      accepted[e.id] = true
    end
    all_sent_once(url, accepted, refused, 10, log_of(n))
    local log = log_of(n)()
    assert.truthy(log:find("answering 503 %(redis queue: "), log)
    stop(n)
  end)

  it("answers 503 with Retry-After when Redis does not answer within redis_timeout (the event may be queued all the same)", function()
    api:set_delay(0)
    local url = fresh_url()
    -- (lease 2: a consumer's read that timed out meanwhile may have been given the entry)
    local n = webhook(url, "queue_capacity = 10000, redis_timeout = 0.3, lease = 2,",
                      { ["consumers = 8,"] = "consumers = 1," })
    local first = event()
    assert.equal(202, (post(n, first)))   -- connected, library loaded
    -- Redis busy for 1.5 s (DEBUG SLEEP on a connection of its own)
    local c = socket.tcp()
    c:settimeout(10)
    assert(c:connect(srv.host, srv.port))
    local resp = redis_server.resp
    assert(c:send(resp("AUTH", PASSWORD)))
    assert.equal("+OK", c:receive("*l"))
    assert(c:send(resp("DEBUG", "SLEEP", "1.5")))
    socket.sleep(0.1)
    local late = event()
    local code, body, headers = post(n, late)
    assert.equal("+OK", c:receive("*l"))   -- Redis answers again
    c:close()
    assert.equal(503, code, body)
    assert.equal("30", headers["retry-after"])
    assert.truthy(cjson.decode(body).error:find("timeout", 1, true), body)
    -- a timeout is ambiguous (README): when the XADD had gone out before it, Redis ran it
    -- after its sleep and the event answered 503 is queued and sent all the same (once);
    -- when the connection was still authenticating, it is not. Redis counts what was ever
    -- added, which tells the two apart.
    local third = event()
    assert.equal(202, (post(n, third)))
    all_sent_once(url, { [first.id] = true, [third.id] = true }, nil, 15, log_of(n))
    local conn = assert(require("stella.redis").connect(url))
    local info = assert(conn:call("XINFO", "STREAM", "stella:events"))
    conn:close()
    local added
    for i = 1, #info - 1, 2 do if info[i] == "entries-added" then added = info[i + 1] end end
    assert.truthy(added == 2 or added == 3, tostring(added))
    assert.equal(added - 2, api:received()[tostring(late.id)] or 0)
    stop(n)
  end)

  it("keeps the backlog in Redis on nginx -s quit and sends it after a restart", function()
    api:set_delay(1)
    local url = fresh_url()
    local prefix = assert(require("stella.nginx").temp_dir("stella-webhook-redis-quit"))
    finally(function() harness.run("rm -rf " .. harness.shell_quote(prefix)) end)
    local edit = { ["consumers = 8,"] = "consumers = 2," }
    local n = webhook(url, nil, edit, prefix)
    local accepted = burst(n, 14)
    local log = webhook_nginx.quit(n)
    stop(n)
    assert.truthy(log:find("what is queued stays in stella.openresty.redis_queue", 1, true), log)
    assert.falsy(log:find("LOST", 1, true), log)
    -- the consumers finished what they held: nothing pending, the rest waiting
    local b = backlog(url)
    assert.equal(0, b.pending)
    assert.is_true(b.waiting > 0, "nothing was left in the queue")
    assert.equal(14, webhook_nginx.received_count(api, accepted) + b.waiting)

    local again = webhook(url, nil, edit, prefix)
    all_sent_once(url, accepted, nil, 15, log_of(again))
    stop(again)
  end)

  it("loses nothing when reloaded in the middle of a burst", function()
    api:set_delay(0.2)
    local url = fresh_url()
    local n = webhook(url, nil, { ["consumers = 8,"] = "consumers = 2," })
    local accepted, refused = webhook_nginx.post_reloading(n, event, 60, 20)   -- reloaded before the 20th
    local id, answer = next(refused)
    assert.is_nil(id, "event " .. tostring(id) .. " answered " .. tostring(answer))
    all_sent_once(url, accepted, nil, 20, log_of(n))
    local log = log_of(n)()
    assert.truthy(log:find("reconfiguring", 1, true), log)
    assert.falsy(log:find("LOST", 1, true), log)
    stop(n)
  end)

  it("takes over the entries a dead consumer held, after the lease, and sends each once", function()
    api:set_delay(0)
    local url = fresh_url()
    -- three events read by a consumer that is gone (an nginx worker killed mid-batch)
    local q = assert(queue.open(url))
    local accepted = {}
    for _ = 1, 3 do
      local e = event()
      assert(q:submit(e))
      accepted[e.id] = true
    end
    assert.equal(3, #assert(q:read("nginx-gone-1", 10)))
    q:close()
    assert.equal(3, backlog(url).pending)
    local n = webhook(url, "queue_capacity = 10000, lease = 1,", { ["consumers = 8,"] = "consumers = 1," })
    all_sent_once(url, accepted, nil, 15, log_of(n))
    stop(n)
  end)

  it("kill -9 of a worker holding entries: another consumer takes them over after the lease, "
    .. "every 202 is sent, only those on the wire twice", function()
    api:set_delay(1)
    local url = fresh_url()
    local n = webhook(url, "queue_capacity = 10000, lease = 3,", { ["consumers = 8,"] = "consumers = 2," })
    local accepted = burst(n, 12)
    -- both workers' consumers hold an entry each (4 pending, the API sleeping on them: on the
    -- wire, not only read; an entry read but not yet sent when its worker dies is decided
    -- again as a duplicate and its request waits out the outbox lease, longer than this spec)
    assert.truthy(wait_for(10, function() return backlog(url).pending == 4 and api:busy() == 4 end),
      cjson.encode(backlog(url)))
    local pids = n:pids()
    assert.equal(3, #pids)
    harness.run("kill -9 " .. pids[2])
    local got
    assert.truthy(wait_for(20, function()
      got = api:received()
      for id in pairs(accepted) do if not got[tostring(id)] then return false end end
      return true
    end), "not every 202 reached the API\n" .. log_of(n)())
    local twice = 0
    for id in pairs(accepted) do
      assert.is_true(got[tostring(id)] <= 2, "event " .. id .. " sent " .. got[tostring(id)] .. " times")
      if got[tostring(id)] == 2 then twice = twice + 1 end
    end
    assert.is_true(twice <= 2, twice .. " sent twice: more than the killed worker's 2 consumers held")
    assert.truthy(wait_for(10, function() return backlog(url).waiting == 0 end), cjson.encode(backlog(url)))
    assert.truthy(log_of(n)():find("exited on signal 9", 1, true))
    stop(n)
  end)

  it("accepts with no consumer of its own; `stella worker` processes send what it accepted, each once", function()
    api:set_delay(0.2)
    local url = fresh_url()
    local n = webhook(url, nil, { ["consumers = 8,"] = "consumers = 0," })
    local accepted = burst(n, 20)
    local b = backlog(url)
    assert.equal(20, b.waiting)
    assert.equal(20, b.lag)   -- nginx read nothing
    local dir = assert(require("stella.nginx").temp_dir("stella-webhook-redis-worker"))
    finally(function() harness.run("rm -rf " .. harness.shell_quote(dir)) end)
    local workers = {}
    for w = 1, 2 do
      local pid, wait = child.background(LUA, dir, { "worker", "--rules", ROOT .. "/examples/openresty/rules.lua",
        "--db", url, "--name", "w" .. w, "--batch", "5", "--block", "0.2", "--json" },
        { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = api.url }, "w" .. w)
      workers[w] = { pid = pid, wait = wait }
    end
    all_sent_once(url, accepted, nil, 20, function()
      return child.read_file(dir .. "/w1.err") .. child.read_file(dir .. "/w2.err")
    end)
    local read = 0
    for _, w in ipairs(workers) do
      harness.run("kill -TERM " .. w.pid)
      local status, out, err = w.wait()
      assert.equal(0, status, err)
      local summary = cjson.decode(out)
      assert.is_nil(err:find(KEY, 1, true))
      assert.is_nil(err:find(PASSWORD, 1, true))
      read = read + summary.read
    end
    assert.equal(20, read)
    stop(n)
  end)
end)
