-- Specs for the work queue under faults and over time: redis-server killed and started
-- again under running `stella worker`s and a producer (AOF, appendfsync always); workers
-- and consumers no longer in use forgotten; dead letters removed only by an operator. A
-- real redis-server (spec/support/redis.lua), worker processes, the capture server;
-- loopback only. Counts are asserted, never times. The restart (seconds of sleeping,
-- several processes) runs once, under Lua 5.4 (the worker's code is the same Lua under
-- LuaJIT; spec/queue_spec.lua runs under both).
local testserver = require "support.testserver"
local redis_server = require "support.redis"
local child = require "support.child"
local cjson = require "cjson"
local socket = require "socket"
local nginx = require "stella.nginx"
local queue = require "stella.queue"
local store_mod = require "stella.store"

local LUA = os.getenv("STELLA_TEST_LUA") or "lua5.4"
local KEY = "tk_queue_faults_0123456789SECRET"
local it_once = rawget(_G, "jit") and pending or it

local function event(i)
  return { customer = { name = "Cust " .. i, email = ("cust%d@example.com"):format(i) },
           employee = { email = "a@b.com" }, channel = "phone", brand = "acme", ext_interaction_id = tostring(i) }
end

local function count_lines(text, pattern)
  local n = 0
  for line in text:gmatch("[^\n]+") do if line:find(pattern) then n = n + 1 end end
  return n
end

describe("the work queue under faults", function()
  local server, dir, rules

  lazy_setup(function()
    server = testserver.start()
    dir = assert(nginx.temp_dir("stella-queue-faults"))
    rules = dir .. "/rules.lua"
    -- an outbox lease longer than an outage here (a kill, a start, the backoff), shorter
    -- than the default (300 s): a stopped worker's unsettled requests go again soon
    assert(nginx.write_file(rules, "return { once_per_interaction = true, outbox = { lease = 8 } }"))
  end)
  lazy_teardown(function()
    if server then server:stop() end
    if dir then nginx.remove_dir(dir) end
  end)
  before_each(function() server:reset() end)

  local function start_worker(url, name, env, extra)
    local a = { "worker", "--rules", rules, "--db", url, "--name", name, "--lease", "1", "--block", "0.2", "--json" }
    for _, x in ipairs(extra or {}) do a[#a + 1] = x end
    local pid, wait = child.background(LUA, dir, a, env, name)
    return { pid = pid, wait = wait, name = name }
  end

  -- done when the server has `want` distinct interactions, nothing is pending or unread
  -- in the group and the outbox is empty
  local function drained(url, want)
    local q = assert(queue.open(url))
    local s = assert(store_mod.redis(url))
    local ok = nginx.wait_until(90, function()
      local distinct = 0
      for _ in pairs((child.received(server))) do distinct = distinct + 1 end
      if distinct < want then return false end
      local st = q:status()
      local counts = s:outbox_counts()
      return st and counts and st.pending == 0 and st.lag == 0 and counts.queued == 0
    end)
    q:close()
    s:close()
    return ok
  end

  it_once("Redis killed (kill -9), then shut down, and started again each time mid-run with its AOF: "
    .. "the workers carry on, saying so once per outage (one stopped by SIGTERM meanwhile settles "
    .. "and exits 0); every acknowledged event decided, its request sent once", function()
    local srv = redis_server.start{ appendonly = true, appendfsync = "always" }
    finally(function() srv:remove() end)
    local url = srv:url{ db = 1 }
    local env = { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = server.url }
    local slow = {}
    for i = 1, 400 do slow[i] = { delay = 0.01 } end
    server:script(slow)   -- batches on the wire when Redis goes
    local workers = {}
    for w = 1, 3 do workers[w] = start_worker(url, "w" .. w, env, { "--batch", "20" }) end
    local extra = start_worker(url, "w4", env, { "--batch", "20" })
    local q = assert(queue.open(url))
    local acknowledged, refused, n = {}, {}, 0
    local function produce(count)
      for _ = 1, count do
        n = n + 1
        if q:submit(event(n)) then acknowledged[#acknowledged + 1] = n else refused[#refused + 1] = n end
      end
    end
    produce(150)
    assert.equal(150, #acknowledged)
    local busy = nginx.wait_until(60, function() return #server:requests() >= 40 end)
    srv:kill()
    -- while it is away: the producer's XADDs fail (not acknowledged), the workers back off
    produce(20)
    socket.sleep(1.5)
    -- a fourth worker stopped while Redis is away: it waits a little (5 s at most) for
    -- Redis to take the settles of what it sent meanwhile, then ends (exit 0)
    os.execute("kill -TERM " .. extra.pid)
    local on_the_wire = child.received(server)   -- everything sent before Redis came back
    assert(srv:start())
    local xstatus, xout, xerr = extra.wait()
    assert.equal(0, xstatus, xout .. xerr)
    assert.equal("SIGTERM", cjson.decode(xout).signal)
    assert.equal(1, count_lines(xerr, "Redis unreachable"), xerr)
    local w4_unsettled = xerr:find("left unsettled", 1, true) ~= nil
    print("# w4: " .. (xerr:match("settled %d+ request%(s%) sent while Redis was away") or
                       xerr:match("%d+ request%(s%) sent while Redis was away left unsettled") or "nothing unsettled"))
    produce(150)
    -- then, once every worker has found Redis back, a clean shutdown (SIGTERM: Redis
    -- writes its AOF and exits) and a start again
    local back = nginx.wait_until(60, function()
      for w = 1, 3 do
        if not child.read_file(dir .. "/w" .. w .. ".err"):find("Redis reachable again", 1, true) then return false end
      end
      return true
    end)
    local busy2 = nginx.wait_until(60, function() return #server:requests() >= 220 end)
    local before_stop = child.received(server)
    srv:stop()
    produce(10)
    socket.sleep(1)
    local after_stop = child.received(server)
    assert(srv:start())
    for id, times in pairs(after_stop) do   -- what went out during the second outage
      if times > (before_stop[id] or 0) then on_the_wire[id] = true end
    end
    produce(50)
    local ok = drained(url, #acknowledged)
    -- every worker still running; then stopped by SIGTERM
    for w = 1, 3 do assert.is_true(nginx.alive(workers[w].pid), "worker w" .. w .. " ended") end
    for w = 1, 3 do os.execute("kill -TERM " .. workers[w].pid) end
    for w = 1, 3 do
      local status, out, err = workers[w].wait()
      assert.is_nil((out .. err):find(KEY, 1, true), "the key leaked")
      assert.equal(0, status, out .. err)
      local doc = cjson.decode(out)
      assert.equal("SIGTERM", doc.signal)
      assert.equal(2, doc.outages, err)
      -- each outage said once, its end once; no line per failed call
      assert.equal(2, count_lines(err, "Redis unreachable"), err)
      assert.equal(2, count_lines(err, "Redis reachable again after"), err)
      assert.equal(4, count_lines(err, "."), err)
    end
    assert.is_true(busy and busy2, "the workers had not sent 40, then 220 requests")
    assert.is_true(back, "a worker did not find Redis back")
    assert.is_true(ok, "the queue was not drained")
    assert.equal(30, #refused)
    assert.equal(350, #acknowledged)
    -- every acknowledged event's request arrived; nothing refused was sent; a request sent
    -- twice only if it was on the wire while Redis was away (sent, not yet settled)
    local got = child.received(server)
    local twice = 0
    for _, i in ipairs(acknowledged) do
      local times = got[tostring(i)]
      assert.is_not_nil(times, "interaction " .. i .. " was not sent")
      assert.is_true(times <= 2, "interaction " .. i)
      if times == 2 then
        twice = twice + 1
        assert.truthy(on_the_wire[tostring(i)], "interaction " .. i .. " went twice but was not sent during the outage")
      end
    end
    for _, i in ipairs(refused) do assert.is_nil(got[tostring(i)], "refused interaction " .. i .. " was sent") end
    -- none unless w4 ended before Redis took its settles (then its batch, sent while
    -- Redis was away, went again after the outbox lease)
    if not w4_unsettled then assert.equal(0, twice, xerr) end
    print(("# Redis kill -9, restart, SIGTERM, restart mid-run: %d of 350 requests went twice (sent during "
      .. "an outage, unsettled)"):format(twice))
    -- decided once each: the ledger has 350 sent (a reclaimed entry decided again is a
    -- duplicate), and a send for each request that went twice whose first settle was
    -- written late (after the outbox lease, so another worker sent it too)
    local s = assert(store_mod.redis(url))
    local sent, other = 0, {}
    for _, c in ipairs(assert(s:counts{ since = 0 })) do
      if c.status == "sent" then sent = sent + c.count
      else other[#other + 1] = c.status .. "/" .. tostring(c.reason) end
    end
    s:close()
    assert.is_true(sent >= 350 and sent <= 350 + twice, sent .. " sent, " .. twice .. " twice")
    for _, o in ipairs(other) do assert.equal("skipped/duplicate", o) end
    local st = assert(q:status())
    assert.equal(0, st.dead)
    q:close()
  end)

  describe("over time", function()
    local srv
    local db_n = 0
    lazy_setup(function() srv = redis_server.start{} end)
    lazy_teardown(function() if srv then srv:remove() end end)
    local function fresh_url()
      db_n = db_n + 1
      return srv:url{ db = db_n }
    end

    local function consumers_of(q)
      local out = {}
      for _, c in ipairs(assert(q:status()).consumers) do out[c.name] = c.pending end
      return out
    end
    local function worker_names(q)
      local out = {}
      for _, w in ipairs(assert(q:workers())) do out[#out + 1] = w.name end
      return out
    end

    it("forgets workers silent past the limit and consumers idle that long holding nothing; "
      .. "one that holds entries stays until they are taken over", function()
      local q = assert(queue.open(fresh_url()))
      local now = os.time()
      assert(q:ensure_group())
      for i = 1, 3 do assert(q:submit(event(i))) end
      -- stopped two days ago, nothing held
      assert(q:ack{ assert(q:read("old-stopped", 1))[1].id })
      assert(q:beat("old-stopped", { state = "stopped" }, now - 2 * 86400))
      -- died two days ago holding an entry
      local held = assert(q:read("old-holding", 1))[1]
      assert(q:beat("old-holding", { state = "running" }, now - 2 * 86400))
      -- beating now (a worker that came back under its name)
      assert(q:ack{ assert(q:read("recent", 1))[1].id })
      assert(q:beat("recent", { state = "running" }, now))
      -- a consumer with no heartbeat that holds nothing
      assert.equal(1, q.conn:call("XGROUP", "CREATECONSUMER", q.stream, q.group, "ghost"))
      assert.same({ ["old-stopped"] = 0, ["old-holding"] = 1, recent = 0, ghost = 0 }, consumers_of(q))
      socket.sleep(0.6)   -- every consumer idle for 0.5 s: the limit below
      assert.same({ workers = 2, consumers = 2 }, assert(q:prune(now, 0.5)))
      assert.same({ "recent" }, worker_names(q))
      assert.same({ ["old-holding"] = 1, recent = 0 }, consumers_of(q))
      -- its entry taken over by a live worker: then it goes too
      local taken = assert(q:reclaim("recent", 0, 10))
      assert.equal(held.id, taken[1].id)
      assert(q:ack{ held.id })
      socket.sleep(0.6)
      assert(q:beat("recent", { state = "running" }, os.time()))
      assert.same({ workers = 0, consumers = 1 }, assert(q:prune(os.time(), 0.5)))
      assert.same({ recent = 0 }, consumers_of(q))
      assert.same({ "recent" }, worker_names(q))
      -- nothing silent long enough at the default limit (a day)
      assert.same({ workers = 0, consumers = 0 }, assert(q:prune()))
      q:close()
    end)

    it("stella worker --forget-after: a running worker forgets a stopped one; dead letters stay", function()
      local url = fresh_url()
      local q = assert(queue.open(url))
      assert(q:ensure_group())
      assert(q:beat("long-gone", { state = "stopped" }, os.time() - 3600))
      assert(q:dead_letter{ event = "{", reason = "malformed: invalid JSON", id = "" })
      local w = start_worker(url, "w-prune", { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = server.url },
                             { "--forget-after", "10m" })
      local forgotten = nginx.wait_until(30, function()
        local names = table.concat(worker_names(q), " ")
        return names == "w-prune"
      end)
      os.execute("kill -TERM " .. w.pid)
      local status, out, err = w.wait()
      assert.equal(0, status, out .. err)
      assert.is_true(forgotten, table.concat(worker_names(q), " "))
      assert.equal(1, #assert(q:dead()))
      q:close()
    end)

    it("stella worker --dead --purge removes dead letters by id or by age", function()
      local url = fresh_url()
      local q = assert(queue.open(url))
      local old = assert(q.conn:call("XADD", q.dead_stream, "1000000000000-0", "event", "{", "reason", "old", "time", "1000000000"))
      local a = assert(q:dead_letter{ event = "{", reason = "malformed: a", id = "" })
      local b = assert(q:dead_letter{ event = "{", reason = "malformed: b", id = "" })
      local function run(args)
        local cmd = child.stella_command(LUA, args) .. " 2>" .. child.quote(dir .. "/purge.err")
        local p = io.popen(cmd .. "; echo @$?")
        local out = p:read("*a")
        p:close()
        return tonumber(out:match("@(%d+)%s*$")), (out:gsub("@%d+%s*$", "")), child.read_file(dir .. "/purge.err")
      end
      -- the list shows each one's id
      local status, out = run{ "worker", "--dead", "--db", url }
      assert.equal(0, status, out)
      assert.matches("dead letters: 3", out)
      for _, id in ipairs{ old, a, b } do assert.truthy(out:find(id, 1, true), id) end
      -- refused: neither ids nor an age, both, a bad id, --purge alone
      local _, err
      status, _, err = run{ "worker", "--dead", "--purge", "--db", url }
      assert.equal(2, status)
      assert.matches("needs the dead letters' ids or %-%-older%-than", err)
      status = run{ "worker", "--dead", "--purge", "--db", url, "--older-than", "30d", a }
      assert.equal(2, status)
      status, _, err = run{ "worker", "--dead", "--purge", "--db", url, "nope" }
      assert.equal(2, status)
      assert.matches("nope is not a dead letter's id", err)
      status = run{ "worker", "--purge", "--db", url, a }
      assert.equal(2, status)
      assert.equal(3, #assert(q:dead()))
      -- by id
      status, out = run{ "worker", "--dead", "--purge", "--db", url, "--json", a }
      assert.equal(0, status, out)
      assert.same({ command = "worker", purged = 1 }, cjson.decode(out))
      -- by age: the one from 2001 only
      status, out = run{ "worker", "--dead", "--purge", "--db", url, "--older-than", "30d" }
      assert.equal(0, status, out)
      assert.matches("dead letters removed: 1", out)
      local left = assert(q:dead())
      assert.equal(1, #left)
      assert.equal(b, left[1].id)
      q:close()
    end)
  end)
end)
