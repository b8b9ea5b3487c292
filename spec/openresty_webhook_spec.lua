-- Specs for examples/openresty/ as an operator runs it: the shipped nginx.conf (2 workers,
-- settings edited per case) in a real nginx, in front of a loopback API that answers slowly
-- (spec/support/openresty/slow_api.lua, its own nginx) and counts what it received. Every
-- event answered 202 must reach the API exactly once, or still be queued and reported;
-- an event the webhook cannot keep is answered 503, never 202.
local harness = require "support.openresty.harness"
local slow_api = require "support.openresty.slow_api"
local webhook_nginx = require "support.openresty.webhook"
local cjson = require "cjson"

local ROOT = harness.ROOT
local KEY = "test-key-webhook-0123456789"
local http, wait_for = webhook_nginx.http, webhook_nginx.wait_for
local event = webhook_nginx.events(os.time() % 100000 * 1000)

describe("the OpenResty webhook under load", function()
  local api
  local nodes = webhook_nginx.nodes()

  lazy_setup(function()
    if not harness.read_file(ROOT .. "/build/luajit/stella/core.so") then
      harness.run("cd " .. harness.shell_quote(ROOT) .. " && make LUA=luajit module")
    end
    api = slow_api.start{ delay = 0 }
  end)

  lazy_teardown(function()
    nodes:stop_all()
    if api then api:stop() end
  end)

  before_each(function()
    api:set_status(201)
    api:reset()
  end)

  -- The example's nginx.conf with 2 workers and the given edits, on a prefix of its own
  -- (or `prefix`, kept for a restart).
  local function webhook(edit, prefix)
    return nodes:start{ key = KEY, base_url = api.url, workers = 2, edit = edit, prefix = prefix }
  end

  local function stop(n) nodes:stop(n) end

  local function health(n)
    local code, body = http(n.ports.PORT, "GET", "/events/health")
    assert.equal(200, code, body)
    return cjson.decode(body)
  end

  -- Posts `count` new events on one connection each, all sent before any answer is read;
  -- each must be answered 202. -> { [id] = true }
  local function burst(n, count) return webhook_nginx.burst_accepted(n.ports.PORT, event, count) end

  local function post(n, e)
    return http(n.ports.PORT, "POST", "/events", cjson.encode(e))
  end

  -- Waits until every id in `accepted` reached the API; then checks each did exactly
  -- once and that no id in `refused` did.
  local function all_sent_once(n, accepted, refused, timeout)
    webhook_nginx.all_sent_once(api, accepted, refused, timeout,
      n and function() return harness.read_file(n.prefix .. "/error.log") or "" end)
  end

  it("drains a burst larger than its consumer pool, sending each event exactly once", function()
    api:set_delay(1)
    local n = webhook{ ["consumers = 8,"] = "consumers = 3," }   -- 6 in all
    local accepted = burst(n, 24)
    -- at any moment: each accepted event was received, is queued, or is held by one of
    -- the 6 consumers. The health answer and the API's count are read at two moments, so
    -- the API is read on both sides of it: what was received before it cannot be queued
    -- then, and what is neither received after it nor queued then was held by a consumer.
    local function received_now() return webhook_nginx.received_count(api, accepted) end
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
    webhook_nginx.pool_used(api, 6)
    assert.equal(0, health(n).queue.depth)
    stop(n)
  end)

  it("answers 503 with Retry-After when the queue is full, and sends every event it accepted", function()
    api:set_delay(1)
    local n = webhook{ ["consumers = 8,"] = "consumers = 1,", ["queue_capacity = 10000,"] = "queue_capacity = 4," }
    -- each answered 202, or 503 with Retry-After: 30 naming the capacity
    local accepted, refused, nacc = webhook_nginx.post_until_full(n.ports.PORT, event, 20, "capacity of 4")
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
    local accepted = burst(n, 14)
    assert.is_true(health(n).queue.depth > 0)
    local log = webhook_nginx.quit(n)
    stop(n)
    assert.truthy(log:find("stopping: spooled %d+ event%(s%)"), log)
    local spool = harness.read_file(prefix .. "/spool.jsonl")
    assert.truthy(spool and spool ~= "", "no spool file")
    local before = webhook_nginx.received_count(api, accepted)
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
    -- the API was asked and failed them; not necessarily all six: on a loaded machine a send
    -- can end before it reaches the API (a timeout, its batch past half the lease) and wait
    -- in the outbox unattempted (seen under make asan). None taken and all six queued is
    -- what the rest of the spec builds on.
    assert.is_true(failed >= 1, failed .. " failed requests")

    local log = webhook_nginx.quit(n)
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
    local accepted, refused = webhook_nginx.post_reloading(n, event, 60, 20)   -- reloaded before the 20th
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
