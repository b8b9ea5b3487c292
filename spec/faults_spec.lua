-- Specs for the faults of the hardening issue, each with the real fault: a SIGINT or
-- SIGTERM to a `stella trigger` child in the middle of its batches, a damaged SQLite
-- file, a closed port (the circuit breaker), an answer over the size cap, a proxy in the
-- environment, a key echoed JSON-escaped. Counts are asserted, never times.
local testserver = require "support.testserver"
local child = require "support.child"
local cjson = require "cjson"
local nginx = require "stella.nginx"
local stella = require "stella"
local core = require "stella.core"
local store_mod = require "stella.store"

local LUA = os.getenv("STELLA_TEST_LUA") or "lua5.4"
local KEY = "tk_faults_0123456789/abcdefSECRET"   -- a "/" that JSON may write as "\/"
local shell_quote, write_file = nginx.shell_quote, nginx.write_file

local function no_key(text)
  assert.is_nil(text:find(KEY, 1, true), "the key leaked")
end

-- bin/stella run to the end (status, stdout, stderr) and in the background (its pid and
-- a function waiting for those), output in DIR/NAME.out and .err, no key in either
-- (support.child)
local stella_cmd, stella_bg = child.runners(LUA, no_key)

local function events_file(path, first, count)
  local lines = {}
  for i = first, first + count - 1 do
    lines[#lines + 1] = ('{"customer":{"name":"C","email":"c%d@example.com"},"employee":{"email":"a@b.com"},'
      .. '"channel":"phone","ext_interaction_id":"%d"}'):format(i, i)
  end
  assert(write_file(path, table.concat(lines, "\n") .. "\n"))
  return path
end

-- ext_interaction_id -> how many times the server received it, and the total
local received = child.received

-- the ledger's entries by status/reason, and event ids per status
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

-- After an interrupted run that got the ids `got` through: `stella retry` on db sends the
-- `rest` (that many requests), none of them sent before and each once, and leaves the
-- outbox empty.
local function retry_sends_the_rest(server, dir, db, env, got, rest)
  server:reset()
  local rstatus, rout = stella_cmd(dir, { "retry", "--db", db }, env)
  assert.equal(0, rstatus, rout)
  local again, atotal = received(server)
  assert.equal(rest, atotal)
  for id in pairs(again) do
    assert.is_nil(got[id], "event " .. id .. " sent twice")
    assert.equal(1, again[id])
  end
  local _, _, left = ledger_of(db)
  assert.same({ queued = 0, dead = 0 }, left)
end

describe("faults", function()
  local server, dir, rules

  lazy_setup(function()
    server = testserver.start()
    dir = assert(nginx.temp_dir("stella-faults"))
    rules = dir .. "/rules.lua"
    assert(write_file(rules, "return {}"))
  end)
  lazy_teardown(function()
    if server then server:stop() end
    if dir then nginx.remove_dir(dir) end
  end)
  before_each(function() server:reset() end)

  describe("a signal to stella trigger in the middle of its batches", function()
    for _, case in ipairs{ { "INT", 130 }, { "TERM", 143 } } do
      it("SIG" .. case[1] .. ": stops, settles truthfully, exits " .. case[2] .. ", and retry sends nothing twice", function()
        local db = dir .. "/sig" .. case[1] .. ".db"
        local input = events_file(dir .. "/sig.jsonl", 1, 1000)
        -- every answer a little late, so the run is still sending when the signal comes
        local slow = {}
        for i = 1, 1000 do slow[i] = { delay = 0.01 } end
        server:script(slow)
        local env = { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = server.url }
        local pid, wait = stella_bg(dir, { "trigger", "--rules", rules, "--db", db, input }, env)
        -- mid-batch: past the first batch of 200, well before the end
        local ok = nginx.wait_until(60, function() return #server:requests() >= 250 end)
        os.execute("kill -" .. case[1] .. " " .. pid)
        local status, out, err = wait()
        assert.is_true(ok, "the server never got 250 requests")
        assert.equal(case[2], status, out .. err)
        assert.matches("stopped by SIG" .. case[1], err)

        local got, total = received(server)
        local by, ids, oc = ledger_of(db)
        local sent = by["sent/"] or 0
        local interrupted = by["queued/interrupted"] or 0
        assert.is_true(total < 1000, "the run did not stop: " .. total)
        -- nothing reported sent that was not: the server has each ledgered send, once
        assert.equal(total, sent)
        for id in pairs(ids.sent) do assert.equal(1, got[id], "event " .. id) end
        -- everything else that was read is in the outbox, handed back as it was
        assert.same({ queued = interrupted, dead = 0 }, oc)
        for key in pairs(by) do
          assert.truthy(key == "sent/" or key == "queued/interrupted", "unexpected ledger entry " .. key)
        end
        -- the summary matches the ledger
        assert.equal(sent, tonumber(out:match("\nsent%s+%-%s+(%d+)")) or 0)
        assert.equal(interrupted, tonumber(out:match("\nqueued%s+interrupted%s+(%d+)")) or 0)
        assert.is_true(interrupted > 0)

        -- a later retry sends exactly the rest: nothing twice
        retry_sends_the_rest(server, dir, db, env, got, interrupted)
      end)
    end
  end)

  describe("a signal to stella retry in the middle of its batches", function()
    it("SIGINT: the batch on the wire and the one claimed ahead are settled truthfully; a later retry sends the rest once", function()
      local db = dir .. "/retrysig.db"
      -- an outbox of 1000 requests: written by a trigger told to stop at once (nothing sent)
      local evs = {}
      for line in io.lines(events_file(dir .. "/rsig.jsonl", 5001, 1000)) do evs[#evs + 1] = cjson.decode(line) end
      local store = assert(store_mod.sqlite(db))
      local t = stella.trigger{ rules = {}, store = store, client = { api_key = KEY, base_url = server.url },
                                stop = function() return true end }
      local p = t:pipeline(function() end)
      p:process(evs)
      p:finish()
      t:close()
      assert.same({ queued = 1000, dead = 0 }, store:outbox_counts())
      store:close()
      assert.equal(0, #server:requests())
      local slow = {}
      for i = 1, 1000 do slow[i] = { delay = 0.01 } end
      server:script(slow)
      local env = { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = server.url }
      local pid, wait = stella_bg(dir, { "retry", "--db", db }, env)
      -- past the first claim of 100, with the next one claimed ahead
      local ok = nginx.wait_until(60, function() return #server:requests() >= 250 end)
      os.execute("kill -INT " .. pid)
      local status, out, err = wait()
      assert.is_true(ok, "the server never got 250 requests")
      assert.equal(130, status, out .. err)

      local got, total = received(server)
      local by, ids, oc = ledger_of(db)
      assert.is_true(total < 1000, "the run did not stop: " .. total)
      -- each request ledgered sent reached the server once; everything else is queued, due
      assert.equal(total, by["sent/outbox"] or 0)
      for id in pairs(ids.sent) do assert.equal(1, got[id], "event " .. id) end
      assert.same({ queued = 1000 - total, dead = 0 }, oc)
      -- the first run's 1000 hand-backs, then this run's: the unsent rest of what it claimed
      assert.is_true((by["queued/interrupted"] or 0) > 1000)
      for key in pairs(by) do
        assert.truthy(key == "sent/outbox" or key == "queued/interrupted", "unexpected ledger entry " .. key)
      end

      retry_sends_the_rest(server, dir, db, env, got, 1000 - total)
    end)
  end)

  describe("a damaged database", function()
    -- a store with a ledger, then the ledger's pages overwritten
    local function damaged(name)
      local db = dir .. "/" .. name .. ".db"
      local env = { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = server.url }
      local status = stella_cmd(dir, { "trigger", "--rules", rules, "--db", db, events_file(dir .. "/d.jsonl", 1, 50) }, env)
      assert.equal(0, status)
      local sql = "PRAGMA wal_checkpoint(TRUNCATE); PRAGMA page_size; "
        .. "SELECT rootpage FROM sqlite_master WHERE tbl_name = 'ledger'"
      local p = assert(io.popen("sqlite3 " .. shell_quote(db) .. " " .. shell_quote(sql)))
      local out = p:read("*a")
      p:close()
      local nums = {}
      for n in out:gmatch("%d+") do nums[#nums + 1] = tonumber(n) end
      local page_size = nums[4]   -- after the checkpoint's busy, log, checkpointed; then the roots
      local f = assert(io.open(db, "r+b"))
      for i = 5, #nums do
        f:seek("set", (nums[i] - 1) * page_size)
        f:write(string.rep("\222\173\190\239", page_size / 4))
      end
      f:close()
      return db
    end

    it("fails stella status loudly, with SQLite's message", function()
      local db = damaged("status")
      local status, _, err = stella_cmd(dir, { "status", "--db", db }, {})
      assert.not_equal(0, status)
      assert.matches("database disk image is malformed", err)
    end)

    it("stella doctor finds it (and passes a sound store)", function()
      local db = damaged("doctor")
      local status, _, err = stella_cmd(dir, { "doctor", "--db", db }, {})
      assert.equal(1, status)
      assert.matches("is damaged", err)

      local good = dir .. "/good.db"
      stella_cmd(dir, { "trigger", "--rules", rules, "--db", good, events_file(dir .. "/g.jsonl", 1, 5) },
        { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = server.url })
      local gstatus, out = stella_cmd(dir, { "doctor", "--db", good }, {})
      assert.equal(0, gstatus)
      assert.matches("PRAGMA integrity_check ok", out)
      assert.matches("ledger: 5 entries", out)
    end)
  end)

  describe("a database locked by another process for the whole run", function()
    -- the store exists, then another process holds its write lock (BEGIN EXCLUSIVE,
    -- support/sqlite_lock.lua) while stella trigger runs over 150 events (one batch: each try waits out the busy timeout)
    -- 20 s of busy timeouts: run once, under Lua 5.4 (the command's code is the same Lua
    -- under LuaJIT, which the other CLI specs run)
    local it_once = rawget(_G, "jit") and pending or it
    it_once("reports one line per distinct store error with the count, not one per event", function()
      local db = dir .. "/locked.db"
      local env = { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = server.url }
      assert.equal(0, (stella_cmd(dir, { "trigger", "--rules", rules, "--db", db,
                                         events_file(dir .. "/l0.jsonl", 90001, 2) }, env)))
      server:reset()
      local lockdir = dir .. "/lock"
      os.execute("rm -rf " .. shell_quote(lockdir) .. " && mkdir -p " .. shell_quote(lockdir))
      local locker = LUA .. " spec/support/sqlite_lock.lua " .. shell_quote(db) .. " " .. shell_quote(lockdir)
        .. " 120 >/dev/null 2>&1 &"
      os.execute(child.stella_command(LUA, {}, {}):gsub(" " .. LUA .. " bin/stella$", "") .. " " .. locker)
      local waited = 0
      while not io.open(lockdir .. "/locked") and waited < 500 do os.execute("sleep 0.02") waited = waited + 1 end
      assert.truthy(io.open(lockdir .. "/locked"), "the locker did not take the lock")
      local status, out, err = stella_cmd(dir, { "trigger", "--rules", rules, "--db", db,
                                                 events_file(dir .. "/l.jsonl", 91001, 150) }, env)
      assert(write_file(lockdir .. "/release", ""))
      assert.equal(1, status, out .. err)
      local lines = {}
      for line in err:gmatch("[^\n]+") do
        if line:find("not processed", 1, true) then lines[#lines + 1] = line end
      end
      assert.equal(1, #lines, err)
      assert.matches("150 events not processed %(.*l%.jsonl:1 to .*l%.jsonl:150%): .*locked", lines[1])
      local n = 0
      for _ in err:gmatch("database is locked") do n = n + 1 end
      assert.is_true(n < 10, "the error was printed " .. n .. " times:\n" .. err)
      local _, total = received(server)
      assert.equal(0, total)   -- nothing decided, so nothing sent
    end)
  end)

  describe("the circuit breaker against a closed port", function()
    it("stops trying after 5 failed connections, queues the rest at once, exits 3", function()
      local port = nginx.free_port()
      local env = { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = "http://127.0.0.1:" .. port }
      local db = dir .. "/breaker.db"
      local status, out, err = stella_cmd(dir, { "trigger", "--rules", rules, "--db", db,
                                                 events_file(dir .. "/b.jsonl", 1, 300) }, env)
      assert.equal(3, status, out .. err)
      assert.matches("circuit breaker opened", err)
      local by, _, oc = ledger_of(db)
      -- five connection attempts in all (three for the first event, two for the second),
      -- then nothing: every other event is queued untried
      assert.equal(2, by["queued/network"])
      assert.equal(298, by["queued/circuit_open"])
      assert.same({ queued = 300, dead = 0 }, oc)

      -- retry straight after: says so, and when the next item is due
      local rstatus, rout, rerr = stella_cmd(dir, { "retry", "--db", db }, env)
      assert.equal(3, rstatus, rout .. rerr)
      assert.matches("next item due", rout)
      assert.matches("circuit breaker opened", rerr)
    end)

    it("closes again after its cooldown when the server answers (half open)", function()
      local now = 1000
      local port = nginx.free_port()
      local c = stella.new{ api_key = KEY, base_url = "http://127.0.0.1:" .. port, retry = { attempts = 1 },
                            breaker = { failures = 2, cooldown = 30, clock = function() return now end } }
      local req = { customer = { name = "A", email = "a@example.com" }, employee = { email = "e@example.com" },
                    channel = "phone", ext_interaction_id = 1 }
      assert.equal("network", select(2, c:send(req)).kind)
      assert.equal("network", select(2, c:send(req)).kind)
      assert.equal("open", (c:circuit()))
      local _, err = c:send(req)
      assert.equal("circuit_open", err.kind)
      assert.equal(0, err.attempts)
      c:close()
      -- the same client options against the live server, after the cooldown
      c = stella.new{ api_key = KEY, base_url = server.url, retry = { attempts = 1 },
                      breaker = { failures = 1, cooldown = 30, clock = function() return now end } }
      server:script{ { drop = true } }
      assert.equal("network", select(2, c:send(req)).kind)
      assert.equal("circuit_open", select(2, c:send(req)).kind)
      now = now + 31
      assert.equal("half_open", (c:circuit()))
      assert(c:send(req))
      assert.equal("closed", (c:circuit()))
      c:close()
    end)
  end)

  describe("an answer over the size cap", function()
    local req = { customer = { name = "A", email = "a@example.com" }, employee = { email = "e@example.com" },
                  channel = "phone", ext_interaction_id = 1 }
    for _, framing in ipairs{ "Content-Length", "chunked" } do
      it("is refused by the libcurl transport (" .. framing .. "), not read whole", function()
        local c = stella.new{ api_key = KEY, base_url = server.url, retry = { attempts = 3 } }
        server:script{ { body_bytes = core.max_answer_bytes + 1, chunked = framing == "chunked" or nil } }
        local res, err = c:send(req)
        c:close()
        assert.is_nil(res)
        assert.equal("protocol", err.kind)
        assert.is_false(err.retryable)
        assert.equal(1, err.attempts)   -- not retried: the same answer would come again
        assert.matches("larger than " .. core.max_answer_bytes .. " bytes", err.message)
        assert.equal(1, #server:requests())
      end)
    end

    it("takes an answer of exactly the cap", function()
      local c = stella.new{ api_key = KEY, base_url = server.url }
      server:script{ { body_bytes = core.max_answer_bytes } }
      local res = assert(c:send(req))
      c:close()
      assert.equal(core.max_answer_bytes, #res.body)
    end)
  end)

  describe("a proxy in the environment", function()
    it("never receives a request to a loopback URL (http_proxy, ALL_PROXY)", function()
      local proxy = testserver.start()
      local ok, err = pcall(function()
        local script = dir .. "/proxied.lua"
        assert(write_file(script, ([[
          local stella = require "stella"
          local c = stella.new{ api_key = %q, base_url = %q, retry = { attempts = 1 } }
          local res, err = c:send{ customer = { name = "A", email = "a@example.com" },
            employee = { email = "e@example.com" }, channel = "phone", ext_interaction_id = 7 }
          print(res and "sent" or tostring(err))
        ]]):format(KEY, server.url)))
        local env = "env http_proxy=" .. proxy.url .. " HTTP_PROXY=" .. proxy.url .. " ALL_PROXY=" .. proxy.url
          .. " LUA_PATH=" .. shell_quote(package.path) .. " LUA_CPATH=" .. shell_quote(package.cpath) .. " "
        local p = assert(io.popen(env .. LUA .. " " .. shell_quote(script) .. " 2>&1"))
        local out = p:read("*a")
        p:close()
        assert.matches("sent", out)
        assert.equal(0, #proxy:requests())
        assert.equal(1, #server:requests())
      end)
      proxy:stop()
      assert(ok, err)
    end)
  end)

  describe("a key echoed back", function()
    it("is redacted in its JSON-escaped and %-encoded forms, in the error and the ledger", function()
      local escaped = KEY:gsub("/", "\\/")
      local unicode = KEY:gsub("/", "\\u002F")
      local pct = KEY:gsub("/", "%%2f")
      server:script{ { status = 400, body = '{"error":"bad key ' .. escaped .. " or " .. unicode .. " or " .. pct .. '"}' } }
      local s = store_mod.memory()
      local t = stella.trigger{ rules = {}, store = s, client = { api_key = KEY, base_url = server.url } }
      local o = t:process{ customer = { name = "A", email = "a@example.com" }, employee = { email = "e@example.com" },
                           channel = "phone", ext_interaction_id = 9 }
      t:close()
      assert.equal("failed", o.status)
      local text = tostring(o.error) .. cjson.encode(s:ledger{ limit = 10 })
      assert.matches("[redacted]", text, 1, true)
      for _, form in ipairs{ KEY, escaped, unicode, pct, "abcdefSECRET" } do
        assert.is_nil(text:find(form, 1, true), "found " .. form .. " in " .. text)
      end
    end)
  end)
end)
