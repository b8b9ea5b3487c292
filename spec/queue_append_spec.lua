-- Specs for stella.queue's append (the Redis function stella_enqueue of
-- stella.queue.redis_lib: all or none, refused over a capacity counted on the group's
-- backlog) and backlog, against a real redis-server (spec/support/redis.lua).
local redis_server = require "support.redis"
local queue = require "stella.queue"
local redis = require "stella.redis"

describe("stella.queue append and backlog", function()
  local srv
  local db_n = 0
  local function fresh()
    db_n = db_n + 1
    local url = srv:url{ db = db_n }
    return assert(queue.open(url)), assert(redis.connect(url))
  end

  lazy_setup(function() srv = redis_server.start{} end)
  lazy_teardown(function() if srv then srv:remove() end end)

  it("appends all the texts as entries { event = text }, in order, and makes the group", function()
    local q, c = fresh()
    finally(function() q:close() c:close() end)
    assert.same({ waiting = 0, lag = 0, pending = 0 }, assert(q:backlog()))
    local ids = assert(q:append({ '{"a":1}', '{"b":2}' }, 10))
    assert.equal(2, #ids)
    local entries = assert(c:call("XRANGE", "stella:events", "-", "+"))
    assert.same({ { ids[1], { "event", '{"a":1}' } }, { ids[2], { "event", '{"b":2}' } } }, entries)
    local groups = assert(c:call("XINFO", "GROUPS", "stella:events"))
    assert.equal(1, #groups)
    local b = assert(q:backlog())
    assert.equal(2, b.waiting)
    assert.equal(2, b.lag)
    assert.equal(0, b.pending)
    assert.is_number(b.oldest)
  end)

  it("refuses a push that would pass the capacity, all of it, counting read but unacknowledged entries", function()
    local q, c = fresh()
    finally(function() q:close() c:close() end)
    assert(q:append({ "{}", "{}", "{}" }, 4))
    local read = assert(q:read("c1", 2))   -- pending now, still counted
    assert.equal(2, #read)
    local ids, err = q:append({ "{}", "{}" }, 4)
    assert.is_nil(ids)
    assert.equal("FULL", err.code)
    assert.matches("holds 3 of its capacity of 4", err.message)
    assert.equal(3, c:call("XLEN", "stella:events"))   -- none of the two
    assert(q:append({ "{}" }, 4))
    assert(q:ack{ read[1].id, read[2].id })   -- done: no longer counted
    local b = assert(q:backlog())
    assert.equal(2, b.waiting)
    assert.equal(2, b.lag)
    assert(q:append({ "{}", "{}" }, 4))
    assert.is_nil((q:append({ "{}" }, 4)))
    assert(q:append({ "{}" }, 0))   -- 0: no limit
    assert.equal(5, assert(q:backlog()).waiting)
  end)

  it("appends several pushes in one call, each all or none against the capacity the ones before it left", function()
    local q, c = fresh()
    finally(function() q:close() c:close() end)
    local res = assert(q:append_many({ { "{}", "{}" }, { "{}", "{}", "{}" }, { "{}" }, { "{}", "{}" } }, 4))
    assert.equal(4, #res)
    assert.equal(2, #res[1])
    assert.is_true(redis.is_error(res[2]))
    assert.equal("FULL", res[2].code)
    assert.matches("holds 2 of its capacity of 4", res[2].message)
    assert.equal(1, #res[3])
    assert.is_true(redis.is_error(res[4]))
    assert.matches("holds 3 of its capacity of 4", res[4].message)
    assert.equal(3, c:call("XLEN", "stella:events"))
    local texts = {}
    for i, e in ipairs(assert(q:read("c1", 10))) do texts[i] = e.fields.event end
    assert.same({ "{}", "{}", "{}" }, texts)
    res = assert(q:append_many({ { '{"a":1}' }, { '{"b":2}', '{"c":3}' } }, 0))
    assert.equal(1, #res[1])
    assert.equal(2, #res[2])
  end)

  it("append and append_many raise at their caller on a capacity that is no whole number >= 0 or a text that is no string", function()
    local q, c = fresh()
    finally(function() q:close() c:close() end)
    local here = "queue_append_spec.lua:%d+: "
    for _, cap in ipairs{ -1, 1.5, "4" } do
      assert.has_error(function() q:append({ "{}" }, cap) end)
      local _, err = pcall(q.append, q, { "{}" }, cap)
      assert.matches("queue:append: capacity must be a whole number >= 0", err, 1, true)
      _, err = pcall(function() q:append_many({ { "{}" } }, cap) end)
      assert.matches(here .. "queue:append_many: capacity must be a whole number >= 0", err)
    end
    local _, err = pcall(function() q:append({ "{}", 5 }, 4) end)
    assert.matches(here .. "queue:append: text 2 is not a string", err)
    _, err = pcall(function() q:append_many({ { "{}" }, { "{}", {} } }, 4) end)
    assert.matches(here .. "queue:append_many: push 2, text 2 is not a string", err)
    assert.equal(0, c:call("EXISTS", "stella:events"))   -- nothing appended
  end)

  it("forgets the consumers of a prefix that hold nothing, never one holding entries", function()
    local q, c = fresh()
    finally(function() q:close() c:close() end)
    assert(q:append({ "{}", "{}", "{}" }, 0))
    assert.equal(1, #assert(q:read("nginx-b", 1)))   -- holds one
    for _, name in ipairs{ "nginx-a", "w1" } do      -- held one, acknowledged it
      local got = assert(q:read(name, 1))
      assert(q:ack{ got[1].id })
    end
    assert.equal(0, assert(q:forget_consumers("nginx-", 3600 * 1000)))   -- none idle that long
    assert.equal(1, assert(q:forget_consumers("nginx-", 0)))
    local names = {}
    for _, cons in ipairs(assert(c:call("XINFO", "CONSUMERS", "stella:events", "stella"))) do
      names[#names + 1] = cons[2]
    end
    table.sort(names)
    assert.same({ "nginx-b", "w1" }, names)
    assert.equal(1, assert(q:backlog()).pending)
  end)

  it("counts a stream filled before any group (stella submit) as waiting, and loads the library on a server that lost it", function()
    local q, c = fresh()
    finally(function() q:close() c:close() end)
    assert(q:submit_json('{"x":1}'))
    assert(q:submit_json('{"x":2}'))
    assert.equal(2, assert(q:backlog()).waiting)
    assert(q:append({ "{}" }, 3))
    assert.is_nil((q:append({ "{}" }, 3)))
    assert(c:call("FUNCTION", "FLUSH"))
    local ids = assert(q:append({ "{}" }, 0))
    assert.equal(1, #ids)
    local read = assert(q:read("c1", 10))
    assert.equal(4, #read)
    assert.equal('{"x":1}', read[1].fields.event)
  end)
end)
