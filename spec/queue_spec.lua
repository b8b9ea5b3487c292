-- Specs for the work queue (stella.queue, `stella submit`, `stella worker`): a real
-- redis-server (spec/support/redis.lua), worker processes (bin/stella), the capture
-- server (spec/support/testserver.lua); loopback only. Counts are asserted, never times.
local testserver = require "support.testserver"
local redis_server = require "support.redis"
local cjson = require "cjson"
local nginx = require "stella.nginx"
local queue = require "stella.queue"
local store_mod = require "stella.store"

local LUA = os.getenv("STELLA_TEST_LUA") or "lua5.4"
local KEY = "tk_queue_0123456789SECRET"
local write_file = nginx.write_file

local function no_secret(text)
  assert.is_nil(text:find(KEY, 1, true), "the key leaked: " .. text)
end

-- bin/stella run to the end (status, stdout, stderr) and in the background (its pid and
-- a function waiting for those), output in DIR/NAME.out and .err (support.child)
local stella_cmd, stella_bg = require("support.child").runners(LUA, no_secret)

local function event(i)
  return { customer = { name = "Cust " .. i, email = ("cust%d@example.com"):format(i) },
           employee = { email = "a@b.com" }, channel = "phone", brand = "acme", ext_interaction_id = tostring(i) }
end

local function events_file(path, first, last, extra)
  local lines = {}
  for i = first, last do lines[#lines + 1] = cjson.encode(event(i)) end
  if extra then lines[#lines + 1] = extra end
  assert(write_file(path, table.concat(lines, "\n") .. "\n"))
  return path
end

-- interaction id -> times received, and the number of distinct ones
local function received(server)
  local by_id, distinct = {}, 0
  for _, r in ipairs(server:requests()) do
    local id = cjson.decode(r.body).ext_interaction_id
    if not by_id[id] then distinct = distinct + 1 end
    by_id[id] = (by_id[id] or 0) + 1
  end
  return by_id, distinct
end

describe("the work queue", function()
  local server, srv, dir, rules
  local db_n = 0
  local function fresh_url()
    db_n = db_n + 1
    return srv:url{ db = db_n }
  end

  lazy_setup(function()
    server = testserver.start()
    srv = redis_server.start{}
    dir = assert(nginx.temp_dir("stella-queue"))
    rules = dir .. "/rules.lua"
    assert(write_file(rules, "return { once_per_interaction = true, outbox = { lease = 3 } }"))
  end)
  lazy_teardown(function()
    if server then server:stop() end
    if srv then srv:remove() end
    if dir then nginx.remove_dir(dir) end
  end)
  before_each(function() server:reset() end)

  -- done when the server has `want` distinct interactions, nothing is pending in the
  -- group and the outbox is empty
  local function drained(url, want)
    local q = assert(queue.open(url))
    local s = assert(store_mod.redis(url))
    local ok = nginx.wait_until(90, function()
      local _, distinct = received(server)
      if distinct < want then return false end
      local st = assert(q:status())
      local counts = assert(s:outbox_counts())
      return st.pending == 0 and st.lag == 0 and counts.queued == 0
    end)
    q:close()
    s:close()
    return ok
  end

  local function worker_args(url, name, extra)
    local a = { "worker", "--rules", rules, "--db", url, "--name", name, "--lease", "1", "--block", "0.2", "--json" }
    for _, x in ipairs(extra or {}) do a[#a + 1] = x end
    return a
  end

  it("one producer of each kind and three workers: every event decided once, every request once; "
    .. "malformed and over-delivered entries in the dead-letter stream, replayed by stella retry --dead", function()
    local url = fresh_url()
    local env = { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = server.url }
    local q = assert(queue.open(url))
    -- an entry held by a consumer that is gone, already delivered 9 times
    assert(q:ensure_group())
    local ghost_id = assert(q:submit(event(9999)))
    assert.equal(1, #assert(q:read("ghost", 1)))
    assert(q.conn:call("XCLAIM", q.stream, q.group, "ghost", 0, ghost_id, "RETRYCOUNT", 9))
    -- producers: stella submit (with one malformed line), the Lua call, a plain XADD
    local status, out, err = stella_cmd(dir, { "submit", "--db", url, "--json",
      events_file(dir .. "/in.jsonl", 1, 100, "{not json") }, {}, "submit")
    assert.equal(1, status, out .. err)
    assert.same({ command = "submit", queued = 100, malformed = 1, dead = 1, unreadable = 0, exit_status = 1 },
                cjson.decode(out))
    assert.matches("in%.jsonl:101: invalid JSON", err)
    for i = 101, 200 do assert(q:submit(event(i))) end
    for i = 201, 300 do assert(q.conn:call("XADD", "stella:events", "*", "event", cjson.encode(event(i)))) end
    assert(q.conn:call("XADD", "stella:events", "*", "event", "[1, 2]"))   -- not an object

    local workers = {}
    for w = 1, 3 do
      local pid, wait = stella_bg(dir, worker_args(url, "w" .. w, { "--batch", "20" }), env, "w" .. w)
      workers[w] = { pid = pid, wait = wait }
    end
    local ok = drained(url, 300)
    -- (a worker started late under load may not have beaten yet: it does within 2 s)
    local live
    nginx.wait_until(30, function()
      live = assert(q:workers())
      local n = 0
      for _, w in ipairs(live) do if w.state == "live" then n = n + 1 end end
      return n == 3
    end)
    for w = 1, 3 do os.execute("kill -TERM " .. workers[w].pid) end
    local read, acked = 0, 0
    for w = 1, 3 do
      local wstatus, wout, werr = workers[w].wait()
      assert.equal(0, wstatus, wout .. werr)
      local doc = cjson.decode(wout)
      assert.equal("SIGTERM", doc.signal)
      read, acked = read + doc.read, acked + doc.acknowledged
    end
    assert.is_true(ok, "the queue was not drained")
    -- every interaction once; the ghost's entry never sent
    local by_id, distinct = received(server)
    assert.equal(300, distinct)
    for id, n in pairs(by_id) do assert.equal(1, n, "interaction " .. id) end
    assert.is_nil(by_id["9999"])
    assert.equal(300, acked)
    assert.equal(302, read)   -- + the ghost's entry and the array
    -- the ledger: 300 sent, nothing else
    local s = assert(store_mod.redis(url))
    local sent = 0
    for _, c in ipairs(assert(s:counts{ since = 0 })) do
      assert.equal("sent", c.status)
      sent = sent + c.count
    end
    s:close()
    assert.equal(300, sent)
    -- dead letters: the malformed line, the ghost's entry, the array
    local dead = assert(q:dead())
    assert.equal(3, #dead)
    local reasons = {}
    for _, d in ipairs(dead) do reasons[#reasons + 1] = d.reason end
    table.sort(reasons)
    assert.matches("^delivered 10 times; last error: none noted", reasons[1])
    assert.matches("^malformed: .*in%.jsonl:101: invalid JSON", reasons[2])
    assert.matches("^malformed: the event is not a JSON object", reasons[3])
    -- heartbeats: three live while they ran, three stopped now
    local names = {}
    for _, w in ipairs(live) do if w.state == "live" then names[#names + 1] = w.name end end
    assert.same({ "w1", "w2", "w3" }, names)
    for _, w in ipairs(assert(q:workers())) do assert.equal("stopped", w.state) end
    -- stella status: the queue, its consumers and workers
    local sstatus, sout = stella_cmd(dir, { "status", "--db", url, "--json" }, {}, "status")
    assert.equal(0, sstatus, sout)
    local qs = cjson.decode(sout).queue
    assert.equal(0, qs.pending)
    assert.equal(0, qs.lag)
    assert.equal(3, qs.dead)
    assert.equal(cjson.null, qs.oldest)   -- nothing left to do
    -- every consumer (a worker that never got to read has none) holds nothing
    local consumers = {}
    for _, c in ipairs(qs.consumers) do
      assert.equal(0, c.pending, c.name)
      consumers[c.name] = true
    end
    assert.is_true(consumers.ghost and #qs.consumers >= 2 and #qs.consumers <= 4, sout)
    for name in pairs(consumers) do assert.truthy(name == "ghost" or name:match("^w[123]$"), name) end
    assert.equal(3, #qs.workers)
    for _, w in ipairs(qs.workers) do assert.equal("stopped", w.state) end
    local tstatus, tout = stella_cmd(dir, { "status", "--db", url }, {}, "status-text")
    assert.equal(0, tstatus, tout)
    assert.matches("work queue: 0 waiting %(lag%), 0 being processed %(pending%), 3 dead letters", tout)
    assert.matches("worker w2: stopped", tout)
    -- what is done leaves the stream when trimmed (at most the last delivered entry stays)
    assert.is_true(assert(q.conn:call("XLEN", q.stream)) >= 250)
    assert(q:trim())
    assert.is_true(assert(q.conn:call("XLEN", q.stream)) <= 1)
    -- stella worker --dead lists them
    local dstatus, dout = stella_cmd(dir, { "worker", "--dead", "--db", url, "--json" }, {}, "dead")
    assert.equal(0, dstatus, dout)
    assert.equal(3, #cjson.decode(dout).dead)
    -- stella retry --dead: the two with an event back in the queue; a worker sends the
    -- ghost's (never sent before) and dead-letters the array again
    local rstatus, rout = stella_cmd(dir, { "retry", "--dead", "--db", url, "--json" }, {}, "replay")
    assert.equal(0, rstatus, rout)
    local replay = cjson.decode(rout)
    assert.equal(2, replay.replayed)
    assert.equal(1, replay.kept)
    local pid, wait = stella_bg(dir, worker_args(url, "w4"), env, "w4")
    local sent = nginx.wait_until(60, function()
      local st = assert(q:status())
      return received(server)["9999"] == 1 and st.pending == 0 and st.lag == 0
    end)
    os.execute("kill -TERM " .. pid)
    assert.equal(0, (wait()))
    assert.is_true(sent, "the replayed entry was not sent")
    dead = assert(q:dead())
    assert.equal(2, #dead)
    assert.matches("^malformed: .*in%.jsonl:101", dead[1].reason)
    assert.matches("^malformed: the event is not a JSON object", dead[2].reason)
    q:close()
  end)

  it("kill -9 of a worker mid-batch: its entries reclaimed, only requests on the wire go twice", function()
    local url = fresh_url()
    local env = { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = server.url }
    local q = assert(queue.open(url))
    for i = 1, 300 do assert(q:submit(event(i))) end
    local slow = {}
    for i = 1, 300 do slow[i] = { delay = 0.02 } end
    server:script(slow)
    local pid, wait = stella_bg(dir, worker_args(url, "doomed", { "--batch", "50" }), env, "doomed")
    local got = nginx.wait_until(60, function() return #server:requests() >= 30 end)
    os.execute("kill -9 " .. pid)
    assert.equal(137, (wait()))
    assert.is_true(got, "the server never got 30 requests")
    local before = received(server)
    local st = assert(q:status())
    assert.is_true(st.pending > 0, "the killed worker held nothing")
    local others = {}
    for w = 1, 2 do
      local opid, owait = stella_bg(dir, worker_args(url, "heir" .. w, { "--batch", "50" }), env, "heir" .. w)
      others[w] = { pid = opid, wait = owait }
    end
    local ok = drained(url, 300)
    for w = 1, 2 do os.execute("kill -TERM " .. others[w].pid) end
    for w = 1, 2 do
      local wstatus, wout, werr = others[w].wait()
      assert.equal(0, wstatus, wout .. werr)
    end
    assert.is_true(ok, "the queue was not drained")
    local after, distinct = received(server)
    assert.equal(300, distinct)
    local twice = 0
    for id, n in pairs(after) do
      assert.is_true(n <= 2, "interaction " .. id)
      if n == 2 then
        twice = twice + 1
        assert.truthy(before[id], "interaction " .. id .. " went twice but was not sent before the kill")
      end
    end
    assert.is_true(twice <= 50, "more than the batch on the wire went twice: " .. twice)
    print(("# kill -9 mid-batch: %d request%s went twice (on the wire, unsettled, at the kill)"):format(
      twice, twice == 1 and "" or "s"))
    -- the dead worker vanished (no beat), its heirs stopped
    local states = {}
    for _, w in ipairs(assert(q:workers(os.time() + 60))) do states[w.name] = w.state end
    assert.same({ doomed = "vanished", heir1 = "stopped", heir2 = "stopped" }, states)
    assert.equal(0, #assert(q:dead()))
    q:close()
  end)

  it("--connections 4: four requests on the wire at once, over batches smaller than the queue; each once", function()
    local slow_api = require "support.openresty.slow_api"
    local api = slow_api.start{ delay = 0.1 }
    local ok, err = pcall(function()
      local url = fresh_url()
      local q = assert(queue.open(url))
      for i = 1, 40 do assert(q:submit(event(i))) end
      local pid, wait = stella_bg(dir, worker_args(url, "wide", { "--batch", "10", "--connections", "4" }),
                                  { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = api.url }, "wide")
      local drained_all = nginx.wait_until(90, function()
        local st = assert(q:status())
        return st.pending == 0 and st.lag == 0
      end)
      os.execute("kill -TERM " .. pid)
      local status, out, werr = wait()
      assert.equal(0, status, out .. werr)
      assert.is_true(drained_all, "the queue was not drained")
      local doc = cjson.decode(out)
      assert.equal(40, doc.read)
      assert.equal(40, doc.acknowledged)
      local ids, total, most = api:received()
      assert.equal(40, total)
      for i = 1, 40 do assert.equal(1, ids[tostring(i)], "interaction " .. i) end
      -- the connections were used together (one at a time before the worker used the
      -- trigger's pipeline), and never more of them than asked for
      assert.equal(4, most)
      q:close()
    end)
    api:stop()
    assert(ok, err)
  end)

  -- a few seconds of 30 ms answers: once, under Lua 5.4 (the worker's code is the same Lua
  -- under LuaJIT, which the other specs here run)
  local it_once = rawget(_G, "jit") and pending or it
  it_once("a retry comes due while batches keep the worker busy: it is sent then, not after the queue", function()
    local url = fresh_url()
    local retry_rules = dir .. "/retry_rules.lua"
    assert(write_file(retry_rules, "return { once_per_interaction = true, outbox = { lease = 30, base_delay = 1, "
      .. "max_delay = 2 } }"))
    local q = assert(queue.open(url))
    for i = 1, 150 do assert(q:submit(event(i))) end
    -- the first request's three attempts answered 503 (a retryable failure: to the outbox,
    -- due again in 1 to 2 s), every other answer 30 ms late
    local script = { { status = 503 }, { status = 503 }, { status = 503 } }
    for i = 4, 160 do script[i] = { delay = 0.03 } end
    server:script(script)
    local args = { "worker", "--rules", retry_rules, "--db", url, "--name", "busy", "--batch", "10", "--json" }
    local pid, wait = stella_bg(dir, args, { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = server.url }, "busy")
    local s = assert(store_mod.redis(url))
    local ok = nginx.wait_until(90, function()
      local st = assert(q:status())
      return received(server)["1"] ~= nil and st.pending == 0 and st.lag == 0 and assert(s:outbox_counts()).queued == 0
    end)
    s:close()
    os.execute("kill -TERM " .. pid)
    local status, out, err = wait()
    assert.equal(0, status, out .. err)
    assert.is_true(ok, "the queue was not drained")
    -- each interaction accepted once; the first one's accepted request came before the
    -- queue's last event went out
    local accepted, at = {}, {}
    for n, r in ipairs(server:requests()) do
      if not r.answer.status then
        local id = cjson.decode(r.body).ext_interaction_id
        accepted[id] = (accepted[id] or 0) + 1
        at[id] = n
      end
    end
    for i = 1, 150 do assert.equal(1, accepted[tostring(i)], "interaction " .. i) end
    assert.is_true(at["1"] < at["150"], ("the retry went out as request %d, after the last event's (%d)"):format(
      at["1"], at["150"]))
    assert.equal(1, cjson.decode(out).flushed)
    q:close()
  end)

  it("SIGTERM during a batch: exit 0, nothing left pending, the rest sent by the next worker once", function()
    local url = fresh_url()
    local env = { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = server.url }
    local q = assert(queue.open(url))
    for i = 1, 200 do assert(q:submit(event(i))) end
    local slow = {}
    for i = 1, 200 do slow[i] = { delay = 0.03 } end
    server:script(slow)
    local pid, wait = stella_bg(dir, worker_args(url, "first", { "--batch", "100" }), env, "first")
    local got = nginx.wait_until(60, function() return #server:requests() >= 10 end)
    os.execute("kill -TERM " .. pid)
    local status, out, err = wait()
    assert.is_true(got, "the server never got 10 requests")
    assert.equal(0, status, out .. err)
    local st = assert(q:status())
    assert.equal(0, st.pending)
    for _, c in ipairs(st.consumers) do assert.equal(0, c.pending, c.name) end
    local sent_before = #server:requests()
    assert.is_true(sent_before < 200, "everything was sent before the signal")
    -- a second worker: the interrupted sends from the outbox, the unread entries from the stream
    local pid2, wait2 = stella_bg(dir, worker_args(url, "second", { "--batch", "100" }), env, "second")
    local ok = drained(url, 200)
    os.execute("kill -TERM " .. pid2)
    local status2, out2, err2 = wait2()
    assert.equal(0, status2, out2 .. err2)
    assert.is_true(ok, "the queue was not drained")
    local by_id, distinct = received(server)
    assert.equal(200, distinct)
    for id, n in pairs(by_id) do assert.equal(1, n, "interaction " .. id) end
    q:close()
  end)
end)
