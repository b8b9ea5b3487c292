-- Specs for stella.store: the store contract's suite (spec/support/store_contract.lua) run
-- against memory and SQLite (shdict: spec/openresty_spec.lua), then what only SQLite
-- does: persistence, the file's contents, busy handling and several processes at once (child processes running spec/support/store_worker.lua).
local store = require "stella.store"

local SPEC_DIR = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./")
local WORKER = SPEC_DIR .. "support/store_worker.lua"
local LUA = os.getenv("STELLA_TEST_LUA") or (rawget(_G, "jit") and "luajit" or "lua5.4")

local T0 = 1700000000   -- "now" in these specs

local function temp_path()
  local path = os.tmpname()   -- an empty file is an empty SQLite database
  return path
end

local function remove_db(path)
  os.remove(path)
  os.remove(path .. "-wal")
  os.remove(path .. "-shm")
  os.remove(path .. "-journal")
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local data = f:read("*a")
  f:close()
  return data
end

-- Calls fn, expects it to raise a message matching `pattern` that names this file (the
-- error is reported at the caller's line).
local function raises(pattern, fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected an error matching " .. pattern)
  err = tostring(err)
  assert.is_truthy(err:find(pattern), "error " .. err .. " does not match " .. pattern)
  assert.is_truthy(err:find("store_spec.lua:%d+:"), "error not reported at the caller: " .. err)
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

describe("stella.store", function()
  local contract = require "support.store_contract"
  local B = { describe = describe, it = it, before_each = before_each, after_each = after_each, assert = assert }
  local opened = {}
  local function cleanup()
    for _, p in ipairs(opened) do remove_db(p) end
    opened = {}
  end

  describe("memory", function()
    contract(B, "memory", function() return store.memory() end)
  end)

  describe("sqlite", function()
    contract(B, "sqlite", function()   -- on a new temporary file
      local p = temp_path()
      opened[#opened + 1] = p
      return store.sqlite(p)
    end, cleanup)
  end)

  it("loads without LuaDBI until SQLite is used", function()
    local script = [[
      package.preload["DBI"] = function() error("LuaDBI is not installed") end
      local store = require "stella.store"
      local m = assert(store.memory())
      m:put_mark("k", 10)
      assert(m:get_mark("k", 1) == 10)
      local ok, err = pcall(store.sqlite, "/tmp/never.db")
      print(ok and "opened" or ("raised " .. tostring(err):match("LuaDBI is not installed")))
    ]]
    local p = io.popen(LUA .. " -e '" .. script:gsub("\n", " ") .. "' 2>&1", "r")
    local out = p:read("*a")
    p:close()
    assert.equal("raised LuaDBI is not installed\n", out)
  end)

  describe("sqlite only", function()
    local paths

    local function new_path()
      local p = temp_path()
      paths[#paths + 1] = p
      return p
    end

    before_each(function() paths = {} end)
    after_each(function()
      for _, p in ipairs(paths) do remove_db(p) end
    end)

    it("returns nil, err for a path it cannot open", function()
      local s, err = store.sqlite("/nonexistent-dir/sub/stella.db")
      assert.is_nil(s)
      assert.equal("store", err.kind)
      assert.truthy(tostring(err):find("/nonexistent-dir/sub/stella.db", 1, true))
      assert.truthy(store.is_error(err))
      -- a file that is not a database
      local p = new_path()
      local f = assert(io.open(p, "wb"))
      f:write(string.rep("this is not an SQLite database\n", 100))
      f:close()
      s, err = store.sqlite(p)
      assert.is_nil(s)
      assert.equal("store", err.kind)
      assert.truthy(tostring(err):find("not a database", 1, true))
    end)

    it("raises on a bad path or options", function()
      raises("path must be a non%-empty string", function() store.sqlite() end)
      raises("path must be a non%-empty string", function() store.sqlite("") end)
      raises("opts must be a table", function() store.sqlite("x.db", 5) end)
      raises("busy_timeout must be a non%-negative number", function() store.sqlite("x.db", { busy_timeout = -1 }) end)
    end)

    it("sets up WAL, the schema version and the indexes", function()
      local p = new_path()
      local s = assert(store.sqlite(p))
      assert.equal("1", s:get_meta("schema_version"))
      s:close()
      local function sql(q)
        local proc = io.popen("sqlite3 '" .. p .. "' \"" .. q .. "\" 2>&1", "r")
        local out = proc:read("*a")
        proc:close()
        return out
      end
      assert.equal("wal\n", sql("PRAGMA journal_mode"))
      local indexes = sql("SELECT name FROM sqlite_master WHERE type = 'index' ORDER BY name")
      for _, name in ipairs{ "ledger_status_time", "ledger_time", "marks_outbox", "marks_until",
        "outbox_state_next", "outbox_state_died" } do
        assert.truthy(indexes:find(name, 1, true), name)
      end
    end)

    it("runs its connection with secure_delete, synchronous NORMAL and the WAL settings", function()
      local p = new_path()
      local s = assert(store.sqlite(p))
      local function pragma(name)   -- on the store's own connection (LuaDBI)
        local sth = assert(s.backend.db:prepare("PRAGMA " .. name))
        assert(sth:execute())
        local row = sth:fetch(false)
        while sth:fetch(false) do end
        sth:close()
        return row[1]
      end
      assert.equal(1, tonumber(pragma("secure_delete")))
      assert.equal(1, tonumber(pragma("synchronous")))      -- NORMAL
      assert.equal("wal", pragma("journal_mode"))
      assert.equal(2, tonumber(pragma("temp_store")))       -- MEMORY
      assert.equal(10000, tonumber(pragma("wal_autocheckpoint")))
      assert.equal(5000, tonumber(pragma("busy_timeout")))
      s:close()
    end)

    it("keeps everything across close and reopen, with the same salt", function()
      local p = new_path()
      local s = assert(store.sqlite(p))
      local h = s:hash_email("jane@example.com")
      s:put_mark("suppress:" .. h, T0 + 100, 4)
      s:unsubscribe(h, T0)
      local id = s:enqueue(item{ body = "{\"x\":\"\0\"}", customer_hash = h })
      local dead = s:enqueue(item())
      s:kill(dead, "rejected", T0)
      s:record{ time = T0, status = "sent", customer_hash = h }
      s:set_meta("last_alert", T0)
      s:close()

      s = assert(store.sqlite(p))
      assert.equal(h, s:hash_email("JANE@example.com "))
      local until_, outbox_id = s:get_mark("suppress:" .. h, T0)
      assert.equal(T0 + 100, until_)
      assert.equal(4, outbox_id)
      assert.is_true(s:is_unsubscribed(h))
      local got = s:claim(T0, 60, 10)
      assert.same({ id }, ids(got))
      assert.equal("{\"x\":\"\0\"}", got[1].body)
      assert.same({ dead }, ids(s:outbox("dead")))
      assert.same({ { time = T0, status = "sent", customer_hash = h } }, s:ledger())
      assert.equal(tostring(T0), s:get_meta("last_alert"))
      -- ids go on after the last one
      assert.is_true(s:enqueue(item()) > dead)
      s:close()
    end)

    it("never writes a customer's address in clear, in the database or its WAL", function()
      local p = new_path()
      local email = "jane.customer.secret@example.com"
      local s = assert(store.sqlite(p))
      local h = s:hash_email(email)
      s:unsubscribe(h, T0)
      s:put_mark("suppress:" .. h, T0 + 100)
      s:record{ time = T0, status = "sent", customer_hash = h, detail = "ok" }
      s:enqueue(item{ customer_hash = h })
      local wal = read_file(p .. "-wal")
      local db = read_file(p)
      assert.truthy(#wal > 0)
      assert.is_nil(wal:find(email, 1, true))
      assert.is_nil(db:find(email, 1, true))
      assert.truthy((db .. wal):find(h, 1, true))   -- the hash is there, as a check of the check
      s:close()
      local all = read_file(p) .. read_file(p .. "-wal") .. read_file(p .. "-shm")
      assert.is_nil(all:find(email, 1, true))
      assert.is_nil(all:find(email:upper(), 1, true))
    end)

    it("overwrites a sent request's body (which holds the address) in the database file", function()
      local p = new_path()
      local email = "jane.customer.secret@example.com"
      local s = assert(store.sqlite(p))
      s:enqueue(item())
      local sent = s:enqueue(item{ body = "{\"customer\":{\"email\":\"" .. email .. "\"}}" })
      s:claim(T0, 60, 10)
      s:finish(sent)
      s:close()   -- the last connection checkpoints the WAL into the file
      local all = read_file(p) .. read_file(p .. "-wal")
      assert.is_nil(all:find(email, 1, true))
    end)

    it("empties the WAL after a transaction that deleted outbox items, unless scrub_wal = false", function()
      for _, scrub in ipairs{ true, false } do
        local p = new_path()
        local email = "ramona.scrub.secret@example.com"
        local s = assert(store.sqlite(p, { scrub_wal = scrub }))
        s:enqueue(item())
        local sent = s:enqueue(item{ body = "{\"customer\":{\"email\":\"" .. email .. "\"}}" })
        local dead_email = "odile.dead.secret@example.com"
        local dead = s:enqueue(item{ body = "{\"customer\":{\"email\":\"" .. dead_email .. "\"}}" })
        s:claim(T0, 60, 10)
        assert.truthy(read_file(p .. "-wal"):find(email, 1, true))   -- a check of the check
        s:atomic(function()
          s:finish(sent)
          s:kill(dead, "gave up", T0)
        end)
        local all = read_file(p) .. read_file(p .. "-wal")
        assert.equal(not scrub, all:find(email, 1, true) ~= nil, "scrub_wal = " .. tostring(scrub))
        if scrub then
          assert.equal(0, #read_file(p .. "-wal"))
          assert.truthy(all:find(dead_email, 1, true))   -- kept (dead) until purged
          assert.same({ ledger = 0, dead = 1 }, s:purge(T0 + 1))
          all = read_file(p) .. read_file(p .. "-wal")
          assert.is_nil(all:find(dead_email, 1, true))
        end
        s:close()
      end
      raises("scrub_wal must be a boolean", function() store.sqlite("x.db", { scrub_wal = "yes" }) end)
    end)

    it("returns a retryable store error when locked past the busy timeout, and waits otherwise", function()
      local p = new_path()
      local s = assert(store.sqlite(p, { busy_timeout = 0.2 }))
      -- another connection holds the write lock
      local conn = assert(require("DBI").Connect("SQLite3", p))
      conn:autocommit(true)
      local function sql(q)
        local sth = assert(conn:prepare(q))
        assert(sth:execute())
        sth:close()
      end
      sql("BEGIN IMMEDIATE")
      sql("INSERT INTO meta (name, value) VALUES ('held', 'x')")
      local ok, err = s:put_mark("k", T0 + 10)
      assert.is_nil(ok)
      assert.equal("store", err.kind)
      assert.is_true(err.retryable)
      assert.truthy(tostring(err):find("locked", 1, true))
      local r, aerr = s:atomic(function() return "never run" end)
      assert.is_nil(r)
      assert.equal("store", aerr.kind)
      -- readers are not blocked (WAL)
      assert.is_nil(s:get_mark("k", T0))
      assert.is_nil(s:get_meta("held"))
      sql("COMMIT")
      assert.is_true(s:put_mark("k", T0 + 10))
      assert.equal("x", s:get_meta("held"))
      conn:close()
      s:close()
    end)

    local function spawn(mode, p, n, go, now)
      local procs = {}
      for w = 1, n do
        procs[w] = io.popen(table.concat({ LUA, WORKER, mode, "'" .. p .. "'", tostring(w), "'" .. go .. "'",
          tostring(now), "2>&1" }, " "), "r")
      end
      local f = assert(io.open(go, "w"))
      f:close()
      local outputs = {}
      for w = 1, n do
        outputs[w] = procs[w]:read("*a")
        procs[w]:close()
      end
      os.remove(go)
      return outputs
    end

    local function lines(outputs, word)
      local list = {}
      for _, out in ipairs(outputs) do
        for value in out:gmatch("\n?" .. word .. " ([^\n]+)") do list[#list + 1] = value end
      end
      return list
    end

    it("lets exactly one of several processes take a mark, and keeps every enqueued item", function()
      local p = new_path()
      local s = assert(store.sqlite(p))   -- created before the workers start
      local outputs = spawn("marks", p, 4, p .. ".go", T0)
      for w, out in ipairs(outputs) do
        assert.is_nil(out:find("error", 1, true), "worker " .. w .. ": " .. out)
        assert.truthy(out:find("\ndone\n$"), "worker " .. w .. " did not finish: " .. out)
      end
      local winners = lines(outputs, "won")
      assert.equal(1, #winners)
      local until_, outbox_id = s:get_mark("suppress:x", T0)
      assert.equal(T0 + 3600, until_)
      assert.equal(tonumber(winners[1]), outbox_id)
      local enqueued = lines(outputs, "enqueued")
      assert.equal(100, #enqueued)
      local seen = {}
      for _, id in ipairs(enqueued) do
        assert.is_nil(seen[id], "id " .. id .. " given twice")
        seen[id] = true
      end
      local queued = s:outbox("queued", 1000)
      assert.equal(100, #queued)
      for _, it in ipairs(queued) do assert.truthy(seen[tostring(it.id)], "unknown id " .. it.id) end
      assert.same({ queued = 100, dead = 0 }, s:outbox_counts())
      s:close()
    end)

    it("lets several processes claim from one pool, each item exactly once", function()
      local p = new_path()
      local s = assert(store.sqlite(p))
      local pool = {}
      s:atomic(function()
        for i = 1, 40 do pool[i] = s:enqueue(item{ next_at = T0 - i }) end
      end)
      local outputs = spawn("claim", p, 4, p .. ".go", T0)
      for w, out in ipairs(outputs) do
        assert.is_nil(out:find("error", 1, true), "worker " .. w .. ": " .. out)
        assert.truthy(out:find("done\n$"), "worker " .. w .. " did not finish: " .. out)
      end
      local claimed = lines(outputs, "claimed")
      assert.equal(40, #claimed)
      local seen = {}
      for _, id in ipairs(claimed) do
        assert.is_nil(seen[id], "item " .. id .. " claimed twice")
        seen[id] = true
      end
      for _, id in ipairs(pool) do assert.truthy(seen[tostring(id)], "item " .. id .. " never claimed") end
      -- all leased: nothing due until the lease passes
      assert.same({}, s:claim(T0 + 59, 60, 100))
      assert.equal(40, #s:claim(T0 + 60, 60, 100))
      s:close()
    end)
  end)
end)
