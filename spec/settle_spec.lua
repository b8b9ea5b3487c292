-- A settle the store does not take, with the real fault: another process holds the SQLite
-- write lock (BEGIN EXCLUSIVE, support/sqlite_lock.lua) while a batch's requests are on
-- the wire, past the trigger's busy timeout. What the server received is compared with
-- the ledger and the outbox; `stella retry` afterwards sends nothing twice. Also: a batch
-- whose decide raises in the pipeline still completes the batch before it.
local testserver = require "support.testserver"
local child = require "support.child"
local cjson = require "cjson"
local nginx = require "stella.nginx"
local stella = require "stella"
local store_mod = require "stella.store"

local LUA = os.getenv("STELLA_TEST_LUA") or "lua5.4"
local KEY = "tk_settle_0123456789abcdef"
local q = child.quote

-- ext_interaction_id -> how many times the server received it, and the total
local received = require("support.child").received

-- the ledger by "status/reason", its entries' event ids by status, the outbox's counts
local function ledger_of(path)
  local s = assert(store_mod.sqlite(path))
  local by, ids = {}, {}
  for _, e in ipairs(assert(s:ledger{ limit = 100000 })) do
    local key = e.status .. "/" .. tostring(e.reason or "")
    by[key] = (by[key] or 0) + 1
    ids[e.status] = ids[e.status] or {}
    ids[e.status][e.event_id] = (ids[e.status][e.event_id] or 0) + 1
  end
  local oc = assert(s:outbox_counts())
  s:close()
  return by, ids, oc
end

local function exists(path)
  local f = io.open(path, "r")
  if f then f:close() return true end
  return false
end

-- Runs support/settle_lock.lua MODE against db with a lock taken once it is ready; waits
-- for both to end. Returns the child's result.
local function run_locked(mode, dir, db, url, count, release)
  for _, name in ipairs{ "ready", "locked", "release", "unlocked", "done", "result" } do os.remove(dir .. "/" .. name) end
  os.execute(child.ENV .. LUA .. " spec/support/settle_lock.lua " .. table.concat({ q(mode), q(db), q(url), q(dir),
    tostring(count), q(release) }, " ") .. " >" .. q(dir .. "/child.log") .. " 2>&1 &")
  assert.is_true(nginx.wait_until(60, function() return exists(dir .. "/ready") end),
    "the trigger never got ready: " .. child.read_file(dir .. "/child.log"))
  os.execute(child.ENV .. LUA .. " spec/support/sqlite_lock.lua " .. q(db) .. " " .. q(dir) .. " >" ..
    q(dir .. "/lock.log") .. " 2>&1 &")
  assert.is_true(nginx.wait_until(60, function() return exists(dir .. "/done") and exists(dir .. "/unlocked") end),
    "did not end: " .. child.read_file(dir .. "/child.log") .. child.read_file(dir .. "/lock.log"))
  local result = cjson.decode(child.read_file(dir .. "/result"))
  assert.is_nil(result.error, result.error)
  return result
end

-- bin/stella with the key and the test server's URL, run to the end: status, stdout, stderr
local function stella_cmd(dir, args, url)
  return child.run(LUA, dir, args, { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = url })
end

describe("a settle that meets a database locked by another process", function()
  local server, dir

  lazy_setup(function()
    server = testserver.start()
    dir = assert(nginx.temp_dir("stella-settle"))
  end)
  lazy_teardown(function()
    if server then server:stop() end
    if dir then nginx.remove_dir(dir) end
  end)
  before_each(function() server:reset() end)

  -- 20 events; the 5th is rejected (400), the 9th fails with 503 (retryable: queued)
  local function script()
    local items = {}
    for i = 1, 20 do items[i] = {} end
    items[5] = { status = 400, body = { error = "Invalid customer" } }
    items[9] = { status = 503 }
    server:script(items)
  end

  -- A new SQLite database at dir/name with n outbox items due now (ids prefix1..prefixN).
  local function outbox_db(name, prefix, n)
    local db = dir .. "/" .. name
    child.remove_db(db)
    local s = assert(store_mod.sqlite(db))
    local now = os.time()
    for i = 1, n do
      assert(s:enqueue{ kind = "request", body = cjson.encode{ ext_interaction_id = prefix .. i },
                        event_id = prefix .. i, created_at = now, next_at = now, attempts = 0 })
    end
    s:close()
    return db
  end

  it("is tried again: a lock released between its tries leaves the run as if nothing happened", function()
    local db = dir .. "/first.db"
    child.remove_db(db)
    script()
    local r = run_locked("pipeline", dir, db, server.url, 20, "first")
    assert.is_true(r.failures >= 1, "the settle never met the lock")
    local got, total = received(server)
    assert.equal(20, total)
    local by, ids, oc = ledger_of(db)
    assert.same({ ["sent/"] = 18, ["failed/rejected"] = 1, ["queued/server"] = 1 }, by)
    for id in pairs(ids.sent) do assert.equal(1, got[id]) end
    assert.same({ queued = 1, dead = 0 }, oc)
    assert.is_false(exists(db .. "-unsettled"))
    assert.equal(0, r.pending)
    for _, o in ipairs(r.outcomes) do
      assert.is_false(o.unrecorded)
      assert.is_not.equal("unrecorded", o.reason)
    end
  end)

  it("past its tries: reported sent but unrecorded, kept beside the database; stella retry records it and sends nothing twice", function()
    local db = dir .. "/held.db"
    child.remove_db(db)
    script()
    local r = run_locked("pipeline", dir, db, server.url, 20, "end")
    assert.is_true(r.failures >= 3)
    -- the outcomes say what happened: sent (not yet recorded), rejected, queued
    local by_outcome = {}
    for _, o in ipairs(r.outcomes) do
      assert.is_true(o.unrecorded)
      local key = o.status .. "/" .. tostring(o.reason)
      by_outcome[key] = (by_outcome[key] or 0) + 1
    end
    assert.same({ ["sent/unrecorded"] = 18, ["failed/rejected"] = 1, ["queued/server"] = 1 }, by_outcome)
    assert.equal(20, r.pending)
    local got, total = received(server)
    assert.equal(20, total)
    -- the store has none of it yet: no ledger entry, every item still leased
    local by, _, oc = ledger_of(db)
    assert.same({}, by)
    assert.same({ queued = 20, dead = 0 }, oc)
    assert.is_true(exists(db .. "-unsettled"))

    -- the next run writes the kept settle before it claims anything: nothing is sent
    server:reset()
    local status, out, err = stella_cmd(dir, { "retry", "--db", db, "--json" }, server.url)
    assert.equal(0, status, out .. err)
    local res = cjson.decode(out)
    assert.equal(0, res.sent)
    assert.equal(20, res.reconciled)
    assert.same({ queued = 1, dead = 0 }, res.outbox)   -- the 503: waiting out its backoff
    local _, again = received(server)
    assert.equal(0, again)
    local ids
    by, ids, oc = ledger_of(db)
    assert.same({ ["sent/"] = 18, ["failed/rejected"] = 1, ["queued/server"] = 1 }, by)
    for id in pairs(ids.sent) do assert.equal(1, got[id]) end
    assert.same({ queued = 1, dead = 0 }, oc)
    assert.is_false(exists(db .. "-unsettled"))
    -- and once more: nothing left to record or send
    status, out = stella_cmd(dir, { "retry", "--db", db, "--json" }, server.url)
    assert.equal(0, status)
    res = cjson.decode(out)
    assert.equal(0, res.sent)
    assert.equal(0, res.reconciled)
  end)

  it("in a flush whose second claim meets the lock: the first batch sent and kept, the rest left queued; the next flush sends only the rest", function()
    -- 10 items: the first claim takes 8 (two per connection, at least 8); the lock comes in
    -- after it, so the second claim fails while the first batch is on the wire
    local db = outbox_db("claim.db", "c", 10)
    local r = run_locked("flush", dir, db, server.url, 10, "end")
    assert.is_nil(r.summary, "the flush did not end with the claim's error")
    assert.truthy(r.err, "the flush did not report the store's failure")
    assert.matches("lock", r.err)
    local got, total = received(server)
    assert.equal(8, total)
    -- the first batch's settle met the lock too: kept beside the database for the next run
    assert.is_true(exists(db .. "-unsettled"))
    server:reset()
    local status, out, err = stella_cmd(dir, { "retry", "--db", db }, server.url)
    assert.equal(0, status, out .. err)
    assert.matches("sent 2, recorded 0, still queued 0, failed 0", out)
    assert.matches("recorded 8 settles an earlier run could not write", out)
    local again
    again, total = received(server)
    assert.equal(2, total)
    for id in pairs(again) do assert.is_nil(got[id], id .. " sent twice") end
    local by, _, oc = ledger_of(db)
    assert.same({ ["sent/outbox"] = 10 }, by)
    assert.same({ queued = 0, dead = 0 }, oc)
  end)

  it("in a flush: counted once, as sent but unrecorded; the next flush records it without sending", function()
    -- 7 items: fewer than the flush's first claim (8), so one claim takes them all and the
    -- lock comes in before their settle (a second claim would meet it first)
    local db = outbox_db("flush.db", "f", 7)
    local r = run_locked("flush", dir, db, server.url, 7, "end")
    assert.truthy(r.err, "the flush did not report the store's failure")
    assert.equal(7, r.summary.sent)
    assert.equal(7, r.summary.unrecorded)
    local _, total = received(server)
    assert.equal(7, total)
    server:reset()
    local status, out, err = stella_cmd(dir, { "retry", "--db", db }, server.url)
    assert.equal(0, status, out .. err)
    assert.matches("sent 0, recorded 0, still queued 0, failed 0", out)
    assert.matches("recorded 7 settles an earlier run could not write", out)
    local _, again = received(server)
    assert.equal(0, again)
    local by, _, oc = ledger_of(db)
    assert.same({ ["sent/outbox"] = 7 }, by)
    assert.same({ queued = 0, dead = 0 }, oc)
  end)
end)

describe("trigger:pipeline when deciding a batch raises", function()
  local server
  lazy_setup(function() server = testserver.start() end)
  lazy_teardown(function() if server then server:stop() end end)

  it("completes the batch before it (sent, settled, handed on), then raises", function()
    local real = store_mod.memory()
    local decides = 0
    local store = setmetatable({
      atomic = function(_, fn, ...)
        decides = decides + 1
        if decides == 2 then error("boom: the store raised") end
        return real:atomic(fn, ...)
      end,
    }, { __index = function(_, k)
      local v = real[k]
      if type(v) == "function" then return function(_, ...) return v(real, ...) end end
      return v
    end })
    local t = stella.trigger{ rules = {}, store = store, client = { api_key = KEY, base_url = server.url } }
    local seen = {}
    local p = t:pipeline(function(outcomes, _, tag) seen[#seen + 1] = { tag = tag, outcomes = outcomes } end)
    local function events(from)
      local list = {}
      for i = from, from + 4 do
        list[#list + 1] = { customer = { name = "C", email = ("p%d@example.com"):format(i) },
                            employee = { email = "a@b.com" }, channel = "phone", ext_interaction_id = "p" .. i }
      end
      return list
    end
    p:process(events(1), "first")
    assert.has_error(function() p:process(events(6), "second") end, "boom: the store raised")
    assert.equal(1, #seen)
    assert.equal("first", seen[1].tag)
    for _, o in ipairs(seen[1].outcomes) do assert.equal("sent", o.status) end
    assert.same({ queued = 0, dead = 0 }, real:outbox_counts())   -- settled: nothing left leased
    assert.equal(5, #real:ledger{})
    assert.equal(5, #server:requests())
    p:finish()   -- nothing left to complete
    assert.equal(1, #seen)
    t:close()
  end)
end)
