-- The store contract's test: the behaviour every store backend must have, as a busted
-- suite over a backend's constructor. Every backend passes this same suite; a new one
-- (Redis, say) passes it before it is used:
--
--   1. Write the backend (the primitives documented at the top of lua/stella/store/init.lua)
--      and a constructor returning stella.store.open(backend).
--   2. Run this suite on it from a spec file, as spec/store_spec.lua does for memory and
--      SQLite:
--        local contract = require "support.store_contract"
--        local B = { describe = describe, it = it, before_each = before_each,
--                    after_each = after_each, assert = assert }
--        describe("redis", function()
--          contract(B, "redis", function() return my_backend.new(...) end, cleanup)
--        end)
--      Where busted cannot run (shdict lives inside nginx), spec/support/mini_suite.lua
--      runs it and the spec checks its results: spec/support/openresty/selftest.lua
--      (case store_contract) and spec/openresty_spec.lua.
--
-- contract(b, name, open [, cleanup]): b = { describe, it, before_each, after_each, assert
-- [, now] } from the calling spec file (busted gives them to spec files only; b.now: the
-- "now" of the suite's times, default 1700000000; a backend whose marks expire on the real
-- clock, as shdict's do, needs the real time here); name as tostring(store) shows it
-- ("stella.store." .. name); open() -> a new, empty store (or nil, err) that shares no
-- data with any store opened before; cleanup() runs after each test, once its store is
-- closed (temporary files). The backend contract itself: lua/stella/store/init.lua.
local DEFAULT_T0 = 1700000000
local T0   -- "now" in these specs (b.now or DEFAULT_T0)

local describe, it, before_each, after_each, assert   -- busted's, from the caller

-- Calls fn, expects it to raise a message matching `pattern` that names this file (the
-- error is reported at the caller's line).
local function raises(pattern, fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error matching " .. pattern)
  err = tostring(err)
  assert.is_truthy(err:find(pattern), "error " .. err .. " does not match " .. pattern)
  assert.is_truthy(err:find("store_contract.lua:%d+:"), "error not reported at the caller: " .. err)
end

local function ids(items)
  local list = {}
  for i, it in ipairs(items) do list[i] = it.id end
  return list
end

local function item(fields)
  local it = { kind = "request", body = "{}", created_at = T0, next_at = T0 }
  for k, v in pairs(fields or {}) do it[k] = v end
  return it
end

return function(b, name, open_store, cleanup)
  describe, it, before_each, after_each, assert = b.describe, b.it, b.before_each, b.after_each, b.assert
  T0 = b.now or DEFAULT_T0
  local s

  -- a new store
  local function open()
    local st, err = open_store()
    assert(st, tostring(err))
    return st
  end

  before_each(function()
    s = open()
  end)

  after_each(function()
    s:close()
    if cleanup then cleanup() end
  end)


  it("prints as its backend", function()
    assert.truthy(tostring(s):find("stella.store." .. name, 1, true))
    s:close()
    assert.truthy(tostring(s):find("closed", 1, true))
  end)

  describe("hash_email", function()
    it("hashes the trimmed, lower-cased address with the store's salt", function()
      local h = s:hash_email("Jane.Customer@Example.com")
      assert.equal(64, #h)
      assert.truthy(h:match("^[0-9a-f]+$"))
      assert.equal(h, s:hash_email("  jane.customer@example.COM\t\n"))
      assert.not_equal(h, s:hash_email("john@example.com"))
      -- it is salted: not the bare SHA-256 of the address
      assert.not_equal(require("stella.core").sha256("jane.customer@example.com"), h)
    end)

    it("gives different hashes in different stores (a salt per database)", function()
      local other = open()
      assert.not_equal(s:hash_email("jane@example.com"), other:hash_email("jane@example.com"))
      other:close()
    end)

    it("raises on a non-string address", function()
      raises("email must be a string", function() s:hash_email(42) end)
      raises("email must be a string", function() s:hash_email() end)
    end)
  end)

  describe("marks", function()
    it("returns nothing for an unknown key", function()
      assert.is_nil(s:get_mark("suppress:nobody", T0))
    end)

    it("keeps a mark until its time has passed", function()
      assert.is_true(s:put_mark("suppress:a", T0 + 100))
      local until_, outbox_id = s:get_mark("suppress:a", T0)
      assert.equal(T0 + 100, until_)
      assert.is_nil(outbox_id)
      assert.equal(T0 + 100, (s:get_mark("suppress:a", T0 + 99.5)))
      assert.is_nil(s:get_mark("suppress:a", T0 + 100))   -- until <= now: gone
      assert.is_nil(s:get_mark("suppress:a", T0 + 1000))
    end)

    it("replaces a mark with the same key", function()
      s:put_mark("k", T0 + 10, 1)
      s:put_mark("k", T0 + 500, 2)
      local until_, outbox_id = s:get_mark("k", T0)
      assert.equal(T0 + 500, until_)
      assert.equal(2, outbox_id)
      s:put_mark("k", T0 + 5)
      until_, outbox_id = s:get_mark("k", T0)
      assert.equal(T0 + 5, until_)
      assert.is_nil(outbox_id)
    end)

    it("keeps fractional times and any key bytes", function()
      local key = "dedupe:brand 'x'\0;DROP TABLE marks;--"
      s:put_mark(key, T0 + 0.25)
      assert.equal(T0 + 0.25, (s:get_mark(key, T0)))
      assert.is_nil(s:get_mark("dedupe:brand 'x'", T0))
    end)

    it("reserves marks for an outbox item, then confirms them", function()
      s:put_mark("suppress:a", T0 + 100, 7)
      s:put_mark("dedupe:i1", T0 + 200, 7)
      s:put_mark("suppress:b", T0 + 100, 8)
      assert.equal(2, s:confirm_marks(7))
      local until_, outbox_id = s:get_mark("suppress:a", T0)
      assert.equal(T0 + 100, until_)
      assert.is_nil(outbox_id)
      assert.is_nil(select(2, s:get_mark("dedupe:i1", T0)))
      assert.equal(8, select(2, s:get_mark("suppress:b", T0)))
      -- confirmed marks are no longer tied to the item
      assert.equal(0, s:release_marks(7))
      assert.equal(T0 + 100, (s:get_mark("suppress:a", T0)))
    end)

    it("releases the marks reserved for an outbox item, and only those", function()
      s:put_mark("suppress:a", T0 + 100, 7)
      s:put_mark("dedupe:i1", T0 + 100, 7)
      s:put_mark("suppress:b", T0 + 100, 8)
      s:put_mark("suppress:c", T0 + 100)
      assert.equal(2, s:release_marks(7))
      assert.is_nil(s:get_mark("suppress:a", T0))
      assert.is_nil(s:get_mark("dedupe:i1", T0))
      assert.equal(T0 + 100, (s:get_mark("suppress:b", T0)))
      assert.equal(T0 + 100, (s:get_mark("suppress:c", T0)))
      assert.equal(0, s:release_marks(7))
    end)

    it("takes string reservation ids too, any bytes", function()
      s:put_mark("k", T0 + 100, "job-1")
      assert.equal("job-1", select(2, s:get_mark("k", T0)))
      assert.equal(1, s:confirm_marks("job-1"))
      assert.is_nil(select(2, s:get_mark("k", T0)))
      s:put_mark("k2", T0 + 100, "job\0-2")
      assert.equal("job\0-2", select(2, s:get_mark("k2", T0)))
      assert.equal(1, s:release_marks("job\0-2"))
    end)

    it("looks up many keys in one call", function()
      s:put_mark("a", T0 + 100, 7)
      s:put_mark("c", T0 + 10)
      s:put_mark("d", T0 + 300, "job-1")
      local untils, owners = s:get_marks({ "a", "b", "c", "d" }, T0 + 20)
      assert.same({ [1] = T0 + 100, [4] = T0 + 300 }, untils)
      assert.same({ [1] = 7, [4] = "job-1" }, owners)
      untils, owners = s:get_marks({}, T0)
      assert.same({}, untils)
      assert.same({}, owners)
      raises("keys must be a list", function() s:get_marks("a", T0) end)
      raises("keys%[2%] must be a non%-empty string", function() s:get_marks({ "a", "" }, T0) end)
      raises("now must be a finite number", function() s:get_marks({ "a" }) end)
    end)

    it("purges expired marks and counts them", function()
      s:put_mark("a", T0 + 10)
      s:put_mark("b", T0 + 20, 3)
      s:put_mark("c", T0 + 30)
      assert.equal(0, s:purge_marks(T0))
      assert.equal(2, s:purge_marks(T0 + 20))
      assert.equal(T0 + 30, (s:get_mark("c", T0)))
      assert.is_nil(s:get_mark("a", T0))
      assert.is_nil(s:get_mark("b", T0))
      assert.equal(0, s:release_marks(3))
      assert.equal(1, s:purge_marks(T0 + 1000))
    end)

    it("raises on wrong arguments", function()
      raises("key must be a non%-empty string", function() s:get_mark(1, T0) end)
      raises("key must be a non%-empty string", function() s:put_mark("", T0) end)
      raises("now must be a finite number", function() s:get_mark("k") end)
      raises("until must be a finite number", function() s:put_mark("k", "soon") end)
      raises("until must be a finite number", function() s:put_mark("k", 0 / 0) end)
      raises("until must be a finite number", function() s:put_mark("k", math.huge) end)
      raises("outbox_id must be an integer or a non%-empty string", function() s:put_mark("k", T0, 1.5) end)
      raises("outbox_id must be an integer", function() s:confirm_marks() end)
      raises("outbox_id must be an integer", function() s:release_marks({}) end)
      raises("now must be a finite number", function() s:purge_marks() end)
    end)
  end)

  describe("unsubscribes", function()
    it("records, answers, counts and forgets unsubscribes by hash", function()
      local h1, h2 = s:hash_email("a@example.com"), s:hash_email("b@example.com")
      assert.is_false(s:is_unsubscribed(h1))
      assert.equal(0, s:unsubscribed_count())
      assert.is_true(s:unsubscribe(h1, T0))
      assert.is_true(s:unsubscribe(h1, T0 + 5))   -- again: still one
      assert.is_true(s:unsubscribe(h2, T0))
      assert.is_true(s:is_unsubscribed(h1))
      assert.equal(2, s:unsubscribed_count())
      assert.is_true(s:resubscribe(h1))
      assert.is_true(s:resubscribe(h1))
      assert.is_false(s:is_unsubscribed(h1))
      assert.is_true(s:is_unsubscribed(h2))
      assert.equal(1, s:unsubscribed_count())
    end)

    it("answers many look-ups in one call", function()
      local h1, h2 = s:hash_email("a@example.com"), s:hash_email("b@example.com")
      s:unsubscribe(h2, T0)
      assert.same({ false, true, false }, s:unsubscribed_many{ h1, h2, "other" })
      assert.same({}, s:unsubscribed_many{})
      raises("hashes must be a list", function() s:unsubscribed_many("h") end)
      raises("hashes%[2%] must be a non%-empty string", function() s:unsubscribed_many{ "h", "" } end)
    end)

    it("raises on wrong arguments", function()
      raises("hash must be a non%-empty string", function() s:unsubscribe(nil, T0) end)
      raises("now must be a finite number", function() s:unsubscribe("h") end)
      raises("hash must be a non%-empty string", function() s:is_unsubscribed(5) end)
      raises("hash must be a non%-empty string", function() s:resubscribe("") end)
    end)
  end)

  describe("outbox", function()
    it("enqueues items with increasing integer ids and defaults", function()
      local a = s:enqueue{ kind = "request", body = "{\"a\":1}", created_at = T0 }
      local b = s:enqueue(item{ kind = "recovery", brand = "Blanca", event_id = "e-1",
        interaction_id = 123456, customer_hash = "abc", next_at = T0 + 5, attempts = 2 })
      assert.equal(math.floor(a), a)
      assert.is_true(b > a)
      local queued = s:outbox("queued")
      assert.same({
        { id = a, kind = "request", body = "{\"a\":1}", created_at = T0, next_at = T0,
          attempts = 0, state = "queued" },
        { id = b, kind = "recovery", body = "{}", brand = "Blanca", event_id = "e-1",
          interaction_id = "123456", customer_hash = "abc", created_at = T0, next_at = T0 + 5,
          attempts = 2, state = "queued" },
      }, queued)
      assert.same({ queued = 2, dead = 0 }, s:outbox_counts())
    end)

    it("keeps any bytes in a body", function()
      local bytes = {}
      for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
      local body = table.concat(bytes) .. "'\"\\%?--" .. table.concat(bytes)
      local id = s:enqueue(item{ body = body, event_id = "it's" })
      local got = s:claim(T0, 60, 1)[1]
      assert.equal(id, got.id)
      assert.equal(#body, #got.body)
      assert.equal(body, got.body)
      assert.equal("it's", got.event_id)
    end)

    it("claims due items, oldest next_at first, at most limit", function()
      local c = s:enqueue(item{ next_at = T0 + 3 })
      local a = s:enqueue(item{ next_at = T0 + 1 })
      local later = s:enqueue(item{ next_at = T0 + 100 })
      local b = s:enqueue(item{ next_at = T0 + 2 })
      local d = s:enqueue(item{ next_at = T0 + 3 })   -- same time as c: by id
      assert.same({ a, b }, ids(s:claim(T0 + 10, 1000, 2)))
      assert.same({ c, d }, ids(s:claim(T0 + 10, 1000, 10)))
      assert.same({}, s:claim(T0 + 10, 1000, 10))
      assert.same({ later }, ids(s:claim(T0 + 100, 1000)))   -- limit defaults to 100
      assert.same({}, s:claim(T0 + 100, 1000, 0))
    end)

    it("leases claimed items: not claimed again until the lease has passed", function()
      local id = s:enqueue(item())
      local got = s:claim(T0, 60, 10)
      assert.same({ id }, ids(got))
      assert.equal(T0 + 60, got[1].next_at)
      assert.equal("queued", got[1].state)
      assert.same({}, s:claim(T0 + 30, 60, 10))
      assert.same({}, s:claim(T0 + 59, 60, 10))
      assert.same({ id }, ids(s:claim(T0 + 60, 60, 10)))   -- the claimer died: claimed again
      assert.same({}, s:claim(T0 + 61, 60, 10))
    end)

    it("reschedules an item with its attempts and last error", function()
      local id = s:enqueue(item())
      s:claim(T0, 60, 1)
      assert.is_true(s:reschedule(id, T0 + 30, 1, "server: 503"))
      assert.same({}, s:claim(T0 + 29, 60, 1))
      local got = s:claim(T0 + 30, 60, 1)[1]
      assert.equal(1, got.attempts)
      assert.equal("server: 503", got.last_error)
      -- attempts nil keeps them; an error value is kept as its text
      local err = setmetatable({}, { __tostring = function() return "timeout" end })
      assert.is_true(s:reschedule(id, T0 + 40, nil, err))
      got = s:claim(T0 + 40, 60, 1)[1]
      assert.equal(1, got.attempts)
      assert.equal("timeout", got.last_error)
      assert.is_false(s:reschedule(id + 100, T0, 1))
    end)

    it("finishes (deletes) a sent item", function()
      local id = s:enqueue(item())
      local other = s:enqueue(item())
      assert.is_true(s:finish(id))
      assert.is_false(s:finish(id))
      assert.same({ other }, ids(s:outbox("queued")))
      assert.same({ queued = 1, dead = 0 }, s:outbox_counts())
      -- ids are not reused
      assert.is_true(s:enqueue(item()) > other)
    end)

    it("kills an item: kept as dead for inspection, never claimed", function()
      local a = s:enqueue(item())
      local b = s:enqueue(item())
      local c = s:enqueue(item())
      assert.is_true(s:kill(a, "rejected: 400", T0 + 10))
      assert.is_true(s:kill(c, "auth: 401", T0 + 20))
      assert.is_false(s:kill(c + 100, "x", T0))
      assert.same({ b }, ids(s:claim(T0 + 1000, 60, 10)))
      local dead = s:outbox("dead")
      assert.same({ c, a }, ids(dead))   -- most recent death first
      assert.equal("dead", dead[1].state)
      assert.equal(T0 + 20, dead[1].died_at)
      assert.equal("auth: 401", dead[1].last_error)
      assert.same({ c }, ids(s:outbox("dead", 1)))
      assert.same({ queued = 1, dead = 2 }, s:outbox_counts())
      -- kill may record the final count of attempts (the try that gave up included)
      assert.is_true(s:kill(b, "server: 503", T0 + 30, 10))
      dead = s:outbox("dead")
      assert.same({ b, c, a }, ids(dead))
      assert.equal(10, dead[1].attempts)
      assert.equal(0, dead[2].attempts)
      assert.is_true(s:reschedule(b, T0, 0))
      -- rescheduling a dead item puts it back in the queue
      assert.is_true(s:reschedule(a, T0, 0))
      assert.same({ queued = 2, dead = 1 }, s:outbox_counts())
      local back = s:outbox("queued")
      assert.same({ a, b }, ids(back))
      assert.is_nil(back[1].died_at)
    end)

    it("lists queued items by next_at, with a limit", function()
      local a = s:enqueue(item{ next_at = T0 + 2 })
      local b = s:enqueue(item{ next_at = T0 + 1 })
      for _ = 1, 150 do s:enqueue(item{ next_at = T0 + 3 }) end
      assert.same({ b, a }, ids(s:outbox("queued", 2)))
      assert.equal(100, #s:outbox("queued"))
      assert.equal(152, #s:outbox("queued", 1000))
      assert.same({}, s:outbox("dead"))
    end)

    it("raises on wrong arguments", function()
      raises("item must be a table", function() s:enqueue("x") end)
      raises("item.kind must be", function() s:enqueue(item{ kind = "email" }) end)
      raises("item.body must be a string", function() s:enqueue(item{ body = {} }) end)
      raises("item.created_at must be a finite number", function() s:enqueue(item{ created_at = "now" }) end)
      raises("item.next_at must be a finite number", function() s:enqueue(item{ next_at = 0 / 0 }) end)
      raises("item.attempts must be a non%-negative integer", function() s:enqueue(item{ attempts = -1 }) end)
      raises("item.brand must be a string", function() s:enqueue(item{ brand = true }) end)
      raises("now must be a finite number", function() s:claim(nil, 60, 1) end)
      raises("lease must be a finite number", function() s:claim(T0, "1m", 1) end)
      raises("limit must be a non%-negative integer", function() s:claim(T0, 60, 2.5) end)
      raises("id must be an integer", function() s:finish("1") end)
      raises("id must be an integer", function() s:kill(nil, "x", T0) end)
      raises("now must be a finite number", function() s:kill(1, "x") end)
      raises("attempts must be", function() s:kill(1, "x", T0, -1) end)
      raises("next_at must be a finite number", function() s:reschedule(1) end)
      raises("state must be one of dead, queued", function() s:outbox("sent") end)
    end)
  end)

  describe("ledger", function()
    local function fill()
      s:record{ time = T0 + 1, status = "sent", event_id = "e1", interaction_id = "i1", brand = "B",
        channel = "phone", request_id = "r1", customer_hash = "h1", attempts = 1 }
      s:record{ time = T0 + 2, status = "skipped", reason = "sampled", event_id = "e2" }
      s:record{ time = T0 + 3, status = "failed", reason = "server", error_kind = "server",
        error_message = "503 Service Unavailable", attempts = 3, detail = "gave up" }
      s:record{ time = T0 + 3, status = "suppressed", reason = "recent_request" }
      s:record{ time = T0 + 4, status = "skipped", reason = "do_not_contact" }
      s:record{ time = T0 + 5, status = "skipped", reason = "sampled" }
      s:record{ time = T0 + 6, status = "invalid", reason = "customer.email",
        error_kind = "invalid", error_message = "customer.email: not valid" }
      s:record{ time = T0 + 7, status = "queued", reason = "network" }
      s:record{ time = T0 + 8, status = "recorded", detail = "do_not_send" }
    end

    it("lists entries newest first with all their fields", function()
      fill()
      local list = s:ledger{ since = T0 }
      assert.equal(9, #list)
      assert.same({ time = T0 + 8, status = "recorded", detail = "do_not_send" }, list[1])
      -- equal times: the later record first
      assert.equal("suppressed", list[6].status)
      assert.equal("failed", list[7].status)
      assert.same({ time = T0 + 1, status = "sent", event_id = "e1", interaction_id = "i1",
        brand = "B", channel = "phone", request_id = "r1", customer_hash = "h1", attempts = 1 }, list[9])
      assert.same({ time = T0 + 3, status = "failed", reason = "server", error_kind = "server",
        error_message = "503 Service Unavailable", attempts = 3, detail = "gave up" }, list[7])
    end)

    it("filters by time and status, with a limit", function()
      fill()
      assert.equal(4, #s:ledger{ since = T0 + 5 })
      local skipped = s:ledger{ since = T0, status = "skipped" }
      assert.equal(3, #skipped)
      assert.equal(T0 + 5, skipped[1].time)
      assert.equal(T0 + 2, skipped[3].time)
      assert.same({ T0 + 5, T0 + 4 }, { s:ledger{ status = "skipped", limit = 2 }[1].time,
        s:ledger{ status = "skipped", limit = 2 }[2].time })
      assert.equal(1, #s:ledger{ since = T0, limit = 1 })
      assert.same({}, s:ledger{ since = T0 + 100 })
      assert.equal(9, #s:ledger())
    end)

    it("returns at most 100 entries by default", function()
      s:atomic(function()
        for i = 1, 120 do s:record{ time = T0 + i, status = "sent" } end
      end)
      local list = s:ledger{ since = 0 }
      assert.equal(100, #list)
      assert.equal(T0 + 120, list[1].time)
      assert.equal(T0 + 21, list[100].time)
    end)

    it("counts entries by status and reason", function()
      fill()
      assert.same({
        { status = "failed", reason = "server", count = 1 },
        { status = "invalid", reason = "customer.email", count = 1 },
        { status = "queued", reason = "network", count = 1 },
        { status = "recorded", count = 1 },
        { status = "sent", count = 1 },
        { status = "skipped", reason = "do_not_contact", count = 1 },
        { status = "skipped", reason = "sampled", count = 2 },
        { status = "suppressed", reason = "recent_request", count = 1 },
      }, s:counts{ since = T0 })
      assert.same({
        { status = "invalid", reason = "customer.email", count = 1 },
        { status = "queued", reason = "network", count = 1 },
        { status = "recorded", count = 1 },
        { status = "skipped", reason = "sampled", count = 1 },
      }, s:counts{ since = T0 + 5 })
      assert.same({}, s:counts{ since = T0 + 100 })
    end)

    it("sorts counts with no reason before reasons", function()
      s:record{ time = T0, status = "skipped", reason = "b" }
      s:record{ time = T0, status = "skipped" }
      s:record{ time = T0, status = "skipped", reason = "a" }
      assert.same({
        { status = "skipped", count = 1 },
        { status = "skipped", reason = "a", count = 1 },
        { status = "skipped", reason = "b", count = 1 },
      }, s:counts{ since = T0 })
    end)

    it("reports the rate per time bucket: totals and errors", function()
      local H = 3600
      local base = 472222 * H   -- T0 rounded down to the hour
      local function at(t, status, reason) s:record{ time = t, status = status, reason = reason } end
      at(base + 10, "sent")
      at(base + 20, "failed")
      at(base + 30, "skipped")        -- not counted
      at(base + 40, "suppressed")     -- not counted
      at(base + H - 1, "invalid")
      at(base + H, "recorded")        -- the next bucket starts here
      at(base + H + 5, "queued", "server")     -- queued after a failed send: an error
      at(base + H + 6, "queued", "deferred")   -- deferred to a later flush: no error
      at(base + 3 * H + 0.5, "failed")
      at(base + 4 * H, "skipped")     -- a bucket with nothing counted: left out
      assert.same({
        { start = base, total = 3, errors = 2 },
        { start = base + H, total = 3, errors = 1 },
        { start = base + 3 * H, total = 1, errors = 1 },
      }, s:rate{ since = base, bucket = H })
      assert.same({
        { start = base + H, total = 3, errors = 1 },
        { start = base + 3 * H, total = 1, errors = 1 },
      }, s:rate{ since = base + H })   -- bucket defaults to 3600
      assert.same({
        { start = base, total = 6, errors = 3 },
        { start = base + 2 * H, total = 1, errors = 1 },
      }, s:rate{ since = base, bucket = 2 * H })
      assert.same({ start = base + 10, total = 1, errors = 0 }, s:rate{ since = base, bucket = 1 }[1])
      assert.same({}, s:rate{ since = base + 5 * H })
    end)

    it("raises on wrong arguments", function()
      raises("entry must be a table", function() s:record() end)
      raises("entry.time must be a finite number", function() s:record{ status = "sent" } end)
      raises("entry.status must be one of", function() s:record{ time = T0, status = "done" } end)
      raises("entry.status must be one of", function() s:record{ time = T0 } end)
      raises("entry.attempts must be a non%-negative integer", function()
        s:record{ time = T0, status = "sent", attempts = "2" }
      end)
      raises("entry.brand must be a string", function() s:record{ time = T0, status = "sent", brand = {} } end)
      raises("options must be a table", function() s:ledger(5) end)
      raises("since must be a finite number", function() s:ledger{ since = "yesterday" } end)
      raises("status must be a ledger status", function() s:ledger{ status = "ok" } end)
      raises("limit must be a non%-negative integer", function() s:ledger{ limit = -1 } end)
      raises("bucket must be a positive number", function() s:rate{ bucket = 0 } end)
    end)
  end)

  describe("purge (retention)", function()
    it("deletes ledger entries and dead items older than before, never a queued item", function()
      s:record{ time = T0 - 100, status = "sent", event_id = "old" }
      s:record{ time = T0 - 50.5, status = "skipped", reason = "sampled" }
      s:record{ time = T0, status = "sent", event_id = "kept" }   -- time = before: kept
      s:record{ time = T0 + 10, status = "failed", reason = "server" }
      local old_dead = s:enqueue(item{ created_at = T0 - 300, next_at = T0 - 300 })
      local new_dead = s:enqueue(item())
      local queued = s:enqueue(item{ created_at = T0 - 300, next_at = T0 - 300 })
      s:kill(old_dead, "server: 503", T0 - 1)
      s:kill(new_dead, "server: 503", T0)
      assert.same({ ledger = 2, dead = 1 }, s:purge(T0))
      local list = s:ledger()
      assert.equal(2, #list)
      assert.equal(T0 + 10, list[1].time)
      assert.equal("kept", list[2].event_id)
      assert.same({ new_dead }, ids(s:outbox("dead")))
      assert.same({ queued }, ids(s:outbox("queued")))
      assert.same({ queued = 1, dead = 1 }, s:outbox_counts())
      assert.same({ { status = "failed", reason = "server", count = 1 }, { status = "sent", count = 1 } },
        s:counts())
      assert.same({ ledger = 0, dead = 0 }, s:purge(T0))
    end)

    it("deletes at most limit of each per call", function()
      for i = 1, 5 do s:record{ time = T0 - i, status = "sent" } end
      for _ = 1, 3 do s:kill(s:enqueue(item()), "dead", T0 - 10) end
      assert.same({ ledger = 2, dead = 2 }, s:purge(T0, 2))
      assert.same({ ledger = 2, dead = 1 }, s:purge(T0, 2))
      assert.same({ ledger = 0, dead = 0 }, s:purge(T0, 0))
      assert.same({ ledger = 1, dead = 0 }, s:purge(T0, 2))
      assert.same({}, s:ledger())
      assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
    end)

    it("is undone with the transaction it is part of", function()
      s:record{ time = T0 - 100, status = "sent" }
      s:kill(s:enqueue(item()), "dead", T0 - 100)
      local r, err = s:atomic(function()
        assert.same({ ledger = 1, dead = 1 }, s:purge(T0))
        return nil, "changed my mind"
      end)
      assert.is_nil(r)
      assert.equal("changed my mind", err)
      assert.equal(1, #s:ledger())
      assert.same({ queued = 0, dead = 1 }, s:outbox_counts())
    end)

    it("raises on wrong arguments", function()
      raises("before must be a finite number", function() s:purge() end)
      raises("before must be a finite number", function() s:purge(0 / 0) end)
      raises("limit must be a non%-negative integer", function() s:purge(T0, -1) end)
      raises("limit must be a non%-negative integer", function() s:purge(T0, 1.5) end)
    end)
  end)

  describe("batches (*_many)", function()
    it("enqueues a list in order, with the ids enqueue would give", function()
      local before = s:enqueue(item())
      local items = {}
      for i = 1, 50 do   -- more than one statement's worth
        items[i] = item{ body = "{\"n\":" .. i .. (i == 7 and ",\"x\":\"\0\"" or "") .. "}", event_id = i,
                         brand = i % 2 == 0 and "B" or nil, next_at = T0 + i }
      end
      local ids = s:enqueue_many(items)
      assert.equal(50, #ids)
      for i = 1, 50 do assert.equal(before + i, ids[i]) end
      local queued = s:outbox("queued", 100)
      assert.equal(51, #queued)
      for i = 1, 50 do
        local it = queued[i + 1]
        assert.equal(ids[i], it.id)
        assert.equal(items[i].body, it.body)
        assert.equal(tostring(i), it.event_id)
        assert.equal(items[i].brand, it.brand)
        assert.equal(T0 + i, it.next_at)
        assert.equal(0, it.attempts)
      end
      assert.same({}, s:enqueue_many{})
      assert.is_true(s:enqueue(item()) > ids[50])
    end)

    it("puts a list of marks in order: a later one with the same key replaces an earlier", function()
      local marks = {}
      for i = 1, 70 do marks[i] = { key = "k" .. i, ["until"] = T0 + i, outbox_id = i % 3 == 0 and "r" or i } end
      marks[71] = { key = "k1", ["until"] = T0 + 500 }
      assert.is_true(s:put_mark_many(marks))
      assert.is_true(s:put_mark_many{})
      local until_, reserved = s:get_mark("k1", T0)
      assert.equal(T0 + 500, until_)
      assert.is_nil(reserved)
      until_, reserved = s:get_mark("k70", T0)
      assert.equal(T0 + 70, until_)
      assert.equal(70, reserved)
      assert.equal("r", select(2, s:get_mark("k69", T0)))
      assert.equal(23, s:release_marks("r"))
      assert.is_nil(s:get_mark("k69", T0))
    end)

    it("confirms the marks of a list of reservations and finishes a list of items", function()
      local got = s:enqueue_many{ item(), item(), item(), item() }
      s:put_mark_many{
        { key = "a", ["until"] = T0 + 10, outbox_id = got[1] },
        { key = "b", ["until"] = T0 + 10, outbox_id = got[1] },
        { key = "c", ["until"] = T0 + 10, outbox_id = got[2] },
        { key = "d", ["until"] = T0 + 10, outbox_id = got[3] },
        { key = "e", ["until"] = T0 + 10, outbox_id = "job-1" },
      }
      assert.equal(4, s:confirm_marks_many{ got[1], got[2], "job-1", 999 })
      assert.equal(0, s:confirm_marks_many{})
      for _, k in ipairs{ "a", "b", "c", "e" } do
        assert.is_nil(select(2, s:get_mark(k, T0)), k)
      end
      assert.equal(got[3], select(2, s:get_mark("d", T0)))
      assert.equal(3, s:finish_many{ got[1], got[2], got[4], got[4] + 100 })
      assert.equal(0, s:finish_many{})
      assert.same({ got[3] }, ids(s:outbox("queued")))
      -- more ids than one statement takes
      local many = {}
      for i = 1, 45 do many[i] = s:enqueue(item()) end
      assert.equal(45, s:finish_many(many))
      assert.same({ got[3] }, ids(s:outbox("queued")))
    end)

    it("records a list of entries in order", function()
      local entries = {}
      for i = 1, 40 do
        entries[i] = { time = T0, status = i % 2 == 0 and "sent" or "skipped", event_id = i,
                       reason = i % 2 == 1 and "sampled" or nil, detail = i == 5 and "a\0b" or nil }
      end
      assert.is_true(s:record_many(entries))
      assert.equal(1, entries[1].event_id)   -- converted for the store, the caller's row unchanged
      assert.is_true(s:record_many{})
      local list = s:ledger{ limit = 100 }
      assert.equal(40, #list)
      for i = 1, 40 do assert.equal(tostring(41 - i), list[i].event_id) end   -- the later first
      assert.equal("a\0b", list[36].detail)
      assert.same({ { status = "sent", count = 20 }, { status = "skipped", reason = "sampled", count = 20 } },
        s:counts{ since = T0 })
    end)

    it("writes all or nothing, as part of a transaction", function()
      local ok = pcall(s.atomic, s, function()
        s:enqueue_many{ item(), item() }
        s:put_mark_many{ { key = "a", ["until"] = T0 + 10, outbox_id = 1 } }
        s:record_many{ { time = T0, status = "sent" } }
        error("boom")
      end)
      assert.is_false(ok)
      assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
      assert.is_nil(s:get_mark("a", T0))
      assert.same({}, s:ledger())
      -- a bad element raises before anything is written
      raises("items%[2%]%.body must be a string", function() s:enqueue_many{ item(), item{ body = 5 } } end)
      raises("entries%[3%]%.status must be one of", function()
        s:record_many{ { time = T0, status = "sent" }, { time = T0, status = "sent" }, { time = T0 } }
      end)
      raises("marks%[2%]%.until must be a finite number", function()
        s:put_mark_many{ { key = "a", ["until"] = T0 }, { key = "b" } }
      end)
      assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
      assert.same({}, s:ledger())
      assert.is_nil(s:get_mark("a", T0 - 1))
    end)

    it("raises on wrong arguments", function()
      raises("items must be a list", function() s:enqueue_many() end)
      raises("items%[1%] must be a table", function() s:enqueue_many{ "x" } end)
      raises("marks must be a list", function() s:put_mark_many("k") end)
      raises("marks%[1%] must be a table", function() s:put_mark_many{ 1 } end)
      raises("marks%[1%]%.key must be a non%-empty string", function() s:put_mark_many{ { key = "", ["until"] = T0 } } end)
      raises("marks%[1%]%.outbox_id must be an integer or a non%-empty string", function()
        s:put_mark_many{ { key = "k", ["until"] = T0, outbox_id = 1.5 } }
      end)
      raises("ids must be a list", function() s:confirm_marks_many(7) end)
      raises("ids%[2%] must be an integer or a non%-empty string", function() s:confirm_marks_many{ 1, {} } end)
      raises("ids must be a list", function() s:finish_many() end)
      raises("ids%[1%] must be an integer", function() s:finish_many{ "1" } end)
      raises("entries must be a list", function() s:record_many(true) end)
      raises("entries%[1%]%.brand must be a string", function()
        s:record_many{ { time = T0, status = "sent", brand = {} } }
      end)
      raises("the store is closed", function()
        s:close()
        s:record_many{}
      end)
    end)
  end)

  describe("meta", function()
    it("keeps named values as strings", function()
      assert.is_nil(s:get_meta("last_alert"))
      assert.is_true(s:set_meta("last_alert", T0))
      assert.equal(tostring(T0), s:get_meta("last_alert"))
      assert.equal(T0, tonumber(s:get_meta("last_alert")))
      s:set_meta("ratio", 0.1)
      assert.equal(0.1, tonumber(s:get_meta("ratio")))
      s:set_meta("last_alert", "never")
      assert.equal("never", s:get_meta("last_alert"))
      s:set_meta("last_alert", nil)
      assert.is_nil(s:get_meta("last_alert"))
    end)

    it("raises on wrong arguments", function()
      raises("name must be a non%-empty string", function() s:get_meta() end)
      raises("value must be a string, a number or nil", function() s:set_meta("x", {}) end)
    end)
  end)

  describe("atomic", function()
    it("returns the function's results and passes its arguments", function()
      local a, b, c, d = s:atomic(function(x, y) return x + y, nil, "z", nil end, 1, 2)
      assert.equal(3, a)
      assert.is_nil(b)
      assert.equal("z", c)
      assert.is_nil(d)
      assert.equal(0, select("#", s:atomic(function() end)))
    end)

    it("commits everything the function did", function()
      local id = s:atomic(function()
        s:put_mark("suppress:a", T0 + 100)
        s:record{ time = T0, status = "queued" }
        return s:enqueue(item())
      end)
      assert.equal(T0 + 100, (s:get_mark("suppress:a", T0)))
      assert.same({ id }, ids(s:outbox("queued")))
      assert.equal(1, #s:ledger())
    end)

    it("rolls everything back and re-raises when the function raises", function()
      s:put_mark("suppress:a", T0 + 100, 1)
      s:put_mark("suppress:b", T0 + 100, 1)
      local h = s:hash_email("a@example.com")
      s:unsubscribe(h, T0)
      local kept = s:enqueue(item())
      s:set_meta("m", "before")
      local boom = { "an error value" }
      local ok, err = pcall(s.atomic, s, function()
        s:put_mark("suppress:a", T0 + 999)       -- replaced
        s:put_mark("suppress:new", T0 + 100)     -- added
        s:release_marks(1)                       -- deleted
        s:purge_marks(T0 + 1000)
        s:resubscribe(h)
        s:unsubscribe("other", T0)
        s:enqueue(item())
        s:claim(T0, 60, 10)
        s:kill(kept, "x", T0)
        s:finish(kept)
        s:record{ time = T0, status = "sent" }
        s:set_meta("m", "after")
        s:set_meta("n", "new")
        error(boom)
      end)
      assert.is_false(ok)
      assert.equal(boom, err)   -- the same value, re-raised
      local until_, outbox_id = s:get_mark("suppress:a", T0)
      assert.equal(T0 + 100, until_)
      assert.equal(1, outbox_id)
      assert.equal(T0 + 100, (s:get_mark("suppress:b", T0)))
      assert.is_nil(s:get_mark("suppress:new", T0))
      assert.is_true(s:is_unsubscribed(h))
      assert.is_false(s:is_unsubscribed("other"))
      assert.equal(1, s:unsubscribed_count())
      local queued = s:outbox("queued")
      assert.same({ kept }, ids(queued))
      assert.equal(T0, queued[1].next_at)
      assert.same({ queued = 1, dead = 0 }, s:outbox_counts())
      assert.same({}, s:ledger())
      assert.equal("before", s:get_meta("m"))
      assert.is_nil(s:get_meta("n"))
      -- and the store works on afterwards, with both marks still reserved by 1
      assert.equal(2, s:confirm_marks(1))
      assert.is_true(s:put_mark("after", T0 + 1))
      assert.equal(T0 + 1, (s:get_mark("after", T0)))
    end)

    it("runs a nested call inside the outer transaction", function()
      local inner = s:atomic(function()
        s:put_mark("outer", T0 + 10)
        return s:atomic(function(x)
          s:put_mark("inner", T0 + 10)
          return x
        end, "inner result")
      end)
      assert.equal("inner result", inner)
      assert.truthy(s:get_mark("inner", T0))
      -- an error in the nested call undoes the outer work as well
      assert.has_error(function()
        s:atomic(function()
          s:put_mark("outer2", T0 + 10)
          s:atomic(function()
            s:put_mark("inner2", T0 + 10)
            error("inner failure")
          end)
        end)
      end)
      assert.is_nil(s:get_mark("outer2", T0))
      assert.is_nil(s:get_mark("inner2", T0))
      -- a nested error caught inside leaves the outer transaction to commit
      s:atomic(function()
        s:put_mark("outer3", T0 + 10)
        pcall(s.atomic, s, function() error("caught") end)
      end)
      assert.truthy(s:get_mark("outer3", T0))
    end)

    it("raises without a function", function()
      raises("fn must be a function", function() s:atomic() end)
      raises("fn must be a function", function() s:atomic("x") end)
    end)
  end)

  describe("close", function()
    it("is idempotent; a closed store raises when used", function()
      assert.is_true(s:close())
      assert.is_true(s:close())
      raises("the store is closed", function() s:get_mark("k", T0) end)
      raises("the store is closed", function() s:enqueue(item()) end)
      raises("the store is closed", function() s:atomic(function() end) end)
    end)

    it("raises when a method is called with a dot", function()
      raises("use store:get_mark", function() s.get_mark("k", T0) end)
    end)
  end)
end
