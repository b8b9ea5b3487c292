-- Specs for examples/openresty/ as an operator runs it: the shipped nginx.conf (2 workers,
-- settings edited per case) in a real nginx, in front of a loopback API that answers slowly
-- (spec/support/openresty/slow_api.lua, its own nginx) and counts what it received. Every
-- event answered 202 must reach the API exactly once, or still be queued and reported;
-- an event the webhook cannot keep is answered 503, never 202.
local harness = require "support.openresty.harness"
local slow_api = require "support.openresty.slow_api"
local socket = require "socket"
local cjson = require "cjson"

local SPEC_DIR = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
if SPEC_DIR:sub(1, 1) ~= "/" then
  local _, cwd = harness.run("pwd")
  SPEC_DIR = cwd:gsub("%s+$", "") .. "/" .. SPEC_DIR
end
local ROOT = SPEC_DIR:gsub("/spec$", ""):gsub("/%./spec$", "")
local KEY = "test-key-webhook-0123456789"

-- One HTTP/1.0 exchange: status, body, headers (lower-case names).
local function http(port, method, path, body, timeout)
  local c = socket.tcp()
  c:settimeout(timeout or 20)
  assert(c:connect("127.0.0.1", port))
  local head = method .. " " .. path .. " HTTP/1.0\r\nHost: 127.0.0.1\r\n"
  if body then
    head = head .. "Content-Type: application/json\r\nContent-Length: " .. #body .. "\r\n"
  end
  assert(c:send(head .. "\r\n" .. (body or "")))
  local answer, err, partial = c:receive("*a")
  c:close()
  answer = answer or partial
  assert(answer and answer ~= "", "no answer: " .. tostring(err))
  local headers = {}
  for name, value in (answer:match("^(.-)\r\n\r\n") or ""):gmatch("\n([^:\r\n]+):%s*([^\r\n]*)") do
    headers[name:lower()] = value
  end
  return tonumber(answer:match("^HTTP/1%.%d (%d%d%d)")), answer:match("\r\n\r\n(.*)$"), headers
end

local function wait_for(timeout, pred)
  local deadline = socket.gettime() + timeout
  while true do
    local v = pred()
    if v then return v end
    if socket.gettime() > deadline then return nil end
    socket.sleep(0.05)
  end
end

local seq = os.time() % 100000 * 1000
local function event()
  seq = seq + 1
  return {
    id = seq, status = "solved", channel = "chat",
    requester = { name = "Customer " .. seq, email = ("c%d@example.com"):format(seq) },
    assignee = { name = "Paul Agent", email = "paulagent@blancapeak.com" },
    tags = { "billing" }, locale = "en-US",
  }
end

describe("the OpenResty webhook under load", function()
  local api
  local running = {}

  lazy_setup(function()
    if not harness.read_file(ROOT .. "/build/luajit/stella/core.so") then
      harness.run("cd " .. harness.shell_quote(ROOT) .. " && make LUA=luajit module")
    end
    api = slow_api.start{ delay = 0 }
  end)

  lazy_teardown(function()
    for n in pairs(running) do n:stop() end
    if api then api:stop() end
  end)

  before_each(function()
    api:set_status(201)
    api:reset()
  end)

  -- The example's nginx.conf with 2 workers and the given edits, on a prefix of its own
  -- (or `prefix`, kept for a restart).
  local function webhook(edit, prefix)
    edit = edit or {}
    edit["worker_processes auto;"] = "worker_processes 2;"
    local n = harness.start{
      template = ROOT .. "/examples/openresty/nginx.conf",
      vars = {
        STELLA_ROOT = ROOT, EXAMPLE_DIR = ROOT .. "/examples/openresty",
        CA_FILE = "/etc/ssl/certs/ca-certificates.crt", RESOLVER = "127.0.0.1",
        NDK_MODULE = harness.find_module("ndk_http_module.so"),
        LUA_MODULE = harness.find_module("ngx_http_lua_module.so"),
      },
      ports = { "PORT" }, edit = edit, prefix = prefix,
      env = { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = api.url, STELLA_MODE = "test" },
      probe = { port = "PORT", path = "/events/health" },
    }
    running[n] = true
    return n
  end

  local function stop(n)
    n:stop()
    running[n] = nil
  end

  local function health(n)
    local code, body = http(n.ports.PORT, "GET", "/events/health")
    assert.equal(200, code, body)
    return cjson.decode(body)
  end

  -- Posts the events on one connection each, all sent before any answer is read.
  -- -> { [id] = status }, and the answers' headers by id
  local function burst(n, events)
    local conns = {}
    for i, e in ipairs(events) do
      local body = cjson.encode(e)
      local c = socket.tcp()
      c:settimeout(20)
      assert(c:connect("127.0.0.1", n.ports.PORT))
      assert(c:send("POST /events HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
        .. "Content-Length: " .. #body .. "\r\n\r\n" .. body))
      conns[i] = c
    end
    local status, headers = {}, {}
    for i, c in ipairs(conns) do
      local answer = assert(c:receive("*a"))
      c:close()
      status[events[i].id] = tonumber(answer:match("^HTTP/1%.%d (%d%d%d)"))
      headers[events[i].id] = answer
    end
    return status, headers
  end

  local function post(n, e)
    return http(n.ports.PORT, "POST", "/events", cjson.encode(e))
  end

  -- Waits until every id in `accepted` reached the API; then checks each did exactly
  -- once and that no id in `refused` did.
  local function all_sent_once(n, accepted, refused, timeout)
    local want = 0
    for _ in pairs(accepted) do want = want + 1 end
    local got
    local done = wait_for(timeout, function()
      got = api:received()
      local have = 0
      for id in pairs(accepted) do if got[tostring(id)] then have = have + 1 end end
      return have == want
    end)
    local missing = {}
    for id in pairs(accepted) do
      if not got[tostring(id)] then missing[#missing + 1] = tostring(id) end
    end
    assert.truthy(done, #missing .. " accepted event(s) never reached the API: "
      .. table.concat(missing, ",") .. "\n" .. (n and harness.read_file(n.prefix .. "/error.log") or ""))
    for id in pairs(accepted) do assert.equal(1, got[tostring(id)], "event " .. id .. " sent twice") end
    for id in pairs(refused or {}) do assert.is_nil(got[tostring(id)], "refused event " .. id .. " was sent") end
  end

  it("drains a burst larger than its consumer pool, sending each event exactly once", function()
    api:set_delay(1)
    local n = webhook{ ["consumers = 8,"] = "consumers = 3," }   -- 6 in all
    local events = {}
    for i = 1, 24 do events[i] = event() end
    local status = burst(n, events)
    local accepted = {}
    for id, s in pairs(status) do
      assert.equal(202, s)
      accepted[id] = true
    end
    -- at any moment: each accepted event was received, is queued, or is held by one of
    -- the 6 consumers. The health answer and the API's count are read at two moments, so
    -- the API is read on both sides of it: what was received before it cannot be queued
    -- then, and what is neither received after it nor queued then was held by a consumer.
    local function received_now()
      local got, n_got = api:received(), 0
      for id in pairs(accepted) do if got[tostring(id)] then n_got = n_got + 1 end end
      return n_got
    end
    local before = received_now()
    local h = health(n)
    local after = received_now()
    assert.is_true(before + h.queue.depth <= 24, cjson.encode(h))
    assert.is_true(after + h.queue.depth >= 24 - 6, "lost: " .. after .. " received, "
      .. h.queue.depth .. " queued\n" .. cjson.encode(h))
    assert.equal(10000, h.queue.capacity)
    assert.is_number(h.queue.oldest_age)
    assert.is_number(h.store.dict.free)
    all_sent_once(n, accepted, nil, 15)
    local _, _, most = api:received()
    assert.is_true(most <= 6, "the API held " .. most .. " requests at once: more than the pool")
    assert.equal(6, most)   -- and the pool was used
    assert.equal(0, health(n).queue.depth)
    stop(n)
  end)

  it("answers 503 with Retry-After when the queue is full, and sends every event it accepted", function()
    api:set_delay(1)
    local n = webhook{ ["consumers = 8,"] = "consumers = 1,", ["queue_capacity = 10000,"] = "queue_capacity = 4," }
    local accepted, refused = {}, {}
    local nacc = 0
    for _ = 1, 20 do
      local e = event()
      local code, body, headers = post(n, e)
      if code == 202 then
        accepted[e.id] = true
        nacc = nacc + 1
      else
        assert.equal(503, code, body)
        assert.equal("30", headers["retry-after"])
        assert.truthy(cjson.decode(body).error:find("capacity of 4", 1, true), body)
        refused[e.id] = true
      end
    end
    -- 4 queued, and at most one taken by each worker's consumer
    assert.is_true(nacc >= 4 and nacc <= 6, nacc .. " accepted")
    assert.truthy(harness.read_file(n.prefix .. "/error.log"):find("answering 503", 1, true))
    all_sent_once(n, accepted, refused, 10)
    stop(n)
  end)

  it("refuses events before 202 when the store's dict (the marks) is full", function()
    api:set_delay(0)
    local n = webhook{ ["lua_shared_dict stella 10m;"] = "lua_shared_dict stella 160k;",
                       ["store_reserve = 1048576,"] = "store_reserve = 16384," }
    local accepted, refused = {}, {}
    local first_refusal
    for i = 1, 2000 do
      local e = event()
      local code, body = post(n, e)
      if code == 202 then
        accepted[e.id] = true
      else
        assert.equal(503, code, body)
        assert.truthy(cjson.decode(body).error:find("store's shared dict", 1, true), body)
        refused[e.id] = true
        first_refusal = first_refusal or i
        if i > first_refusal + 20 then break end
      end
      -- the consumers keep up with one event at a time
      if i % 50 == 0 then wait_for(5, function() return health(n).queue.depth == 0 end) end
    end
    assert.truthy(first_refusal, "the dict never filled up")
    assert.is_true(first_refusal > 50, "refused after only " .. tostring(first_refusal))
    all_sent_once(n, accepted, refused, 10)
    local log = harness.read_file(n.prefix .. "/error.log")
    assert.falsy(log:find("store_error", 1, true), log)
    assert.falsy(log:find("LOST", 1, true), log)
    local h = health(n)
    assert.equal("warn", h.status)
    assert.truthy(h.warnings[1]:find("store's dict", 1, true))
    stop(n)
  end)

  it("spools the backlog on nginx -s quit and sends it after a restart", function()
    api:set_delay(1)
    local prefix = assert(require("stella.nginx").temp_dir("stella-webhook-quit"))
    finally(function() harness.run("rm -rf " .. harness.shell_quote(prefix)) end)
    local edit = { ["consumers = 8,"] = "consumers = 2," }
    local n = webhook(edit, prefix)
    local events, accepted = {}, {}
    for i = 1, 14 do events[i] = event() end
    for id, s in pairs(burst(n, events)) do
      assert.equal(202, s)
      accepted[id] = true
    end
    assert.is_true(health(n).queue.depth > 0)
    harness.run("kill -QUIT " .. n.pid)
    assert.truthy(wait_for(10, function() return not harness.alive(n.pid) end), "nginx did not quit")
    local log = harness.read_file(prefix .. "/error.log")
    stop(n)
    assert.truthy(log:find("stopping: spooled %d+ event%(s%)"), log)
    local spool = harness.read_file(prefix .. "/spool.jsonl")
    assert.truthy(spool and spool ~= "", "no spool file")
    local got = api:received()
    local before = 0
    for id in pairs(accepted) do if got[tostring(id)] then before = before + 1 end end
    assert.is_true(before < 14, "nothing was left to spool")

    local again = webhook(edit, prefix)
    all_sent_once(again, accepted, nil, 10)
    assert.truthy(harness.read_file(prefix .. "/error.log"):find("restored %d+ queued event"))
    assert.is_nil(harness.read_file(prefix .. "/spool.jsonl"))
    assert.is_nil(harness.read_file(prefix .. "/spool.jsonl.taking"))
    stop(again)
  end)

  it("spools the outbox on nginx -s quit (a failing API left items there) and sends each once after a restart", function()
    api:set_delay(0)
    api:set_status(503)
    local prefix = assert(require("stella.nginx").temp_dir("stella-webhook-outbox"))
    finally(function() harness.run("rm -rf " .. harness.shell_quote(prefix)) end)
    -- the example's rules, retrying after 1-2 s instead of 30-60 s
    local rules = harness.read_file(ROOT .. "/examples/openresty/rules.lua")
    rules = rules:gsub("\n}\n$", "\n  outbox = { base_delay = 2, max_delay = 2 },\n}\n")
    assert.truthy(rules:find("base_delay = 2", 1, true))
    harness.write_file(prefix .. "/rules.lua", rules)
    local setting = ' rules = "' .. prefix .. '/rules.lua",'
    -- the first nginx never replays its outbox (the API fails anyway): all of it is spooled
    local n = webhook({ ["flush_every = 60,"] = "flush_every = 3600," .. setting }, prefix)
    local accepted, ids = {}, {}
    for i = 1, 6 do
      local e = event()
      assert.equal(202, (post(n, e)))
      accepted[e.id] = true
      ids[i] = tostring(e.id)
    end
    assert.truthy(wait_for(20, function() return health(n).outbox.queued == 6 end),
      cjson.encode(health(n)) .. "\n" .. harness.read_file(prefix .. "/error.log"))
    local got, _, _, failed = api:received()
    assert.is_nil(next(got), "the API took an event while failing")
    assert.is_true(failed >= 6, failed .. " failed requests")

    harness.run("kill -QUIT " .. n.pid)
    assert.truthy(wait_for(10, function() return not harness.alive(n.pid) end), "nginx did not quit")
    local log = harness.read_file(prefix .. "/error.log")
    stop(n)
    local line = log:match("[^\n]*stopping: spooled %d+ event%(s%) and 6 outbox item%(s%)[^\n]*")
    assert.truthy(line, log)
    for _, id in ipairs(ids) do
      assert.truthy(line:find("[ ,]" .. id .. "[,\n]") or line:find("[ ,]" .. id .. "$"), "id " .. id .. " not named: " .. line)
    end
    local spool = assert(harness.read_file(prefix .. "/spool.jsonl"), "no spool file")
    local items = 0
    for l in spool:gmatch("[^\n]+") do
      if cjson.decode(l).o then items = items + 1 end
    end
    assert.equal(6, items)

    api:set_status(201)
    local again = webhook({ ["flush_every = 60,"] = "flush_every = 1," .. setting }, prefix)
    all_sent_once(again, accepted, nil, 20)
    assert.truthy(harness.read_file(prefix .. "/error.log"):find("restored 0 queued event%(s%) and 6 outbox item%(s%)"))
    assert.is_nil(harness.read_file(prefix .. "/spool.jsonl"))
    assert.is_nil(harness.read_file(prefix .. "/spool.jsonl.taking"))
    assert.equal(0, health(again).outbox.queued)
    stop(again)
  end)

  it("loses nothing when reloaded in the middle of a burst", function()
    api:set_delay(0.2)
    local n = webhook{ ["consumers = 8,"] = "consumers = 2," }
    local accepted, refused = {}, {}
    for i = 1, 60 do
      if i == 20 then harness.run("kill -HUP " .. n.pid) end
      local e = event()
      local code = post(n, e)
      if code == 202 then accepted[e.id] = true else refused[e.id] = true end
    end
    local nacc = 0
    for _ in pairs(accepted) do nacc = nacc + 1 end
    assert.is_true(nacc >= 55, nacc .. " of 60 accepted")
    all_sent_once(n, accepted, refused, 15)
    local log = harness.read_file(n.prefix .. "/error.log")
    assert.truthy(log:find("leaves for a reload", 1, true), log)
    assert.falsy(log:find("LOST", 1, true), log)
    stop(n)
  end)
end)
