-- Specs for the `stella` command on the Redis store (--db redis://..., STELLA_DB): several
-- `stella trigger` processes at once on one Redis, a kill -9 mid-batch and `stella retry`
-- from another process, Redis unreachable at start or going away mid-run, AOF after a
-- kill -9 of the server, passwords (requirepass and an ACL user) never printed. A real
-- redis-server (spec/support/redis.lua) and the capture server (spec/support/testserver.lua),
-- loopback only. Counts are asserted, never times.
local testserver = require "support.testserver"
local redis_server = require "support.redis"
local child = require "support.child"
local cjson = require "cjson"
local nginx = require "stella.nginx"
local store_mod = require "stella.store"

local LUA = os.getenv("STELLA_TEST_LUA") or "lua5.4"
local KEY = "tk_redis_store_0123456789SECRET"
local PASSWORD = "default-pw-0123SECRET"
local APP_PASSWORD = "app pw:@/%SECRET"   -- needs %-escaping in a URL
local shell_quote, read_file, write_file = nginx.shell_quote, nginx.read_file, nginx.write_file

local function escape(s)
  return (s:gsub("[^%w%-._~]", function(c) return ("%%%02X"):format(c:byte()) end))
end

local SPEC_DIR = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./")

local function no_secret(text)
  for _, s in ipairs{ KEY, PASSWORD, APP_PASSWORD, escape(APP_PASSWORD) } do
    assert.is_nil(text:find(s, 1, true), "a secret leaked: " .. text)
  end
end

-- bin/stella run to the end (status, stdout, stderr) and in the background (its pid and
-- a function waiting for those), output in DIR/NAME.out and .err, no secret in either
-- (support.child)
local stella_cmd, stella_bg = child.runners(LUA, no_secret)

-- Events for interactions first..last; customer(i) names the customer's e-mail number.
local function events_file(path, ids, customer)
  local lines = {}
  for _, i in ipairs(ids) do
    lines[#lines + 1] = ('{"customer":{"name":"Cust %d","email":"cust%d@example.com"},'
      .. '"employee":{"email":"a@b.com"},"channel":"phone","brand":"acme","ext_interaction_id":"%d"}')
      :format(customer(i), customer(i), i)
  end
  assert(write_file(path, table.concat(lines, "\n") .. "\n"))
  return path
end

local function range(a, b)
  local t = {}
  for i = a, b do t[#t + 1] = i end
  return t
end

-- interaction id -> times received; customer e-mail -> times; total
local function received(server)
  local by_id, by_customer, total = {}, {}, 0
  for _, r in ipairs(server:requests()) do
    local req = cjson.decode(r.body)
    local id, email = req.ext_interaction_id, req.customer.email
    by_id[id] = (by_id[id] or 0) + 1
    by_customer[email] = (by_customer[email] or 0) + 1
    total = total + 1
  end
  return by_id, by_customer, total
end

local function counts_of(json_out)
  local by = {}
  local doc = cjson.decode(json_out:match("[^\n]+$") or json_out)
  for _, c in ipairs(doc.counts) do
    local key = c.status .. "/" .. (c.reason ~= cjson.null and tostring(c.reason) or "")
    by[key] = (by[key] or 0) + c.count
  end
  return by, doc
end

-- Every key and value of the URL's database, as one string.
local function dump(url)
  local conn = assert(require("stella.redis").connect(url))
  local parts, cursor = {}, "0"
  repeat
    local res = assert(conn:call("SCAN", cursor, "COUNT", 1000))
    cursor = res[1]
    for _, key in ipairs(res[2]) do
      local kind = assert(conn:call("TYPE", key))
      local v
      if kind == "string" then v = { assert(conn:call("GET", key)) }
      elseif kind == "hash" then v = assert(conn:call("HGETALL", key))
      elseif kind == "set" then v = assert(conn:call("SMEMBERS", key))
      elseif kind == "zset" then v = assert(conn:call("ZRANGE", key, 0, -1))
      else error("unexpected type " .. tostring(kind) .. " of " .. key) end
      parts[#parts + 1] = key .. "=" .. table.concat(v, ",")
    end
  until cursor == "0"
  conn:close()
  return table.concat(parts, "\n")
end

describe("the stella command on the Redis store", function()
  local server, srv, dir, rules
  local db_n = 0

  -- a URL for a fresh database (each test its own), as the ACL user
  local function fresh_url()
    db_n = db_n + 1
    return srv:url{ user = "app", password = escape(APP_PASSWORD), db = db_n }
  end

  lazy_setup(function()
    server = testserver.start()
    srv = redis_server.start{ requirepass = PASSWORD, appendonly = true, appendfsync = "everysec",
                              users = { { name = "app", password = APP_PASSWORD, rules = "~* &* +@all" } } }
    dir = assert(nginx.temp_dir("stella-redis-cli"))
    rules = dir .. "/rules.lua"
    assert(write_file(rules, 'return { suppression = { days = 7, per = "brand" }, once_per_interaction = true, '
      .. 'outbox = { lease = 4 } }'))
  end)
  lazy_teardown(function()
    if server then server:stop() end
    if srv then srv:remove() end
    if dir then nginx.remove_dir(dir) end
  end)
  before_each(function() server:reset() end)

  it("four stella trigger processes on overlapping input: each interaction and customer once, every event in a ledger", function()
    local url = fresh_url()
    -- 300 interactions; 201..300 are customers 1..100 again (suppressed by brand)
    local function customer(i) return i > 200 and i - 200 or i end
    local inputs = {}
    for p = 1, 4 do   -- the same events, each process in its own order
      local ids = range(1, 300)
      for k = 1, #ids do
        local j = (k * (2 * p + 1) + p * 37) % #ids + 1
        ids[k], ids[j] = ids[j], ids[k]
      end
      inputs[p] = events_file(dir .. "/in" .. p .. ".jsonl", ids, customer)
    end
    local env = { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = server.url, STELLA_DB = url }
    local waits = {}
    for p = 1, 4 do
      local _, wait = stella_bg(dir, { "trigger", "--rules", rules, "--json", inputs[p] }, env, "p" .. p)
      waits[p] = wait
    end
    local total_by = {}
    for p = 1, 4 do
      local status, out, err = waits[p]()
      assert.equal(0, status, out .. err)
      local by = counts_of(out)
      for k, v in pairs(by) do total_by[k] = (total_by[k] or 0) + v end
    end
    local by_id, by_customer, total = received(server)
    -- each customer once (200 customers), each interaction at most once
    assert.equal(200, total)
    for email, n in pairs(by_customer) do assert.equal(1, n, email) end
    for id, n in pairs(by_id) do assert.equal(1, n, "interaction " .. id) end
    for i = 1, 100 do   -- of a customer's two interactions, one was sent
      assert.equal(1, (by_id[tostring(i)] or 0) + (by_id[tostring(i + 200)] or 0), "customer " .. i)
    end
    for i = 101, 200 do assert.equal(1, by_id[tostring(i)], "interaction " .. i) end
    -- the processes' summaries: 1200 events, 200 sent, the rest suppressed or duplicates
    local sum = 0
    for k, v in pairs(total_by) do
      sum = sum + v
      -- suppressed: the customer had a request; skipped/duplicate: the interaction had one
      assert.truthy(k == "sent/" or k:match("^suppressed/") or k == "skipped/duplicate", "unexpected outcome " .. k)
    end
    assert.equal(1200, sum)
    assert.equal(200, total_by["sent/"])
    -- and the shared ledger holds all of them
    local s = assert(store_mod.redis(url))
    local n = 0
    for _, c in ipairs(assert(s:counts{ since = 0 })) do n = n + c.count end
    assert.equal(1200, n)
    assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
    s:close()
    -- no e-mail or name in clear anywhere in Redis (nothing is queued: no request bodies)
    local everything = dump(url)
    assert.is_true(#everything > 10000)
    assert.is_nil(everything:find("example.com", 1, true))
    assert.is_nil(everything:find("Cust ", 1, true))
    assert.truthy(everything:find("acme", 1, true))   -- (the dump does hold the data)
    -- stella status reads it too
    local status, out = stella_cmd(dir, { "status", "--json" }, { STELLA_DB = url })
    assert.equal(0, status, out)
    assert.equal(200, counts_of(out)["sent/"])
  end)

  it("kill -9 of a trigger mid-batch, then stella retry from another process: nothing lost", function()
    local url = fresh_url()
    local input = events_file(dir .. "/kill.jsonl", range(1, 600), function(i) return i end)
    local slow = {}
    for i = 1, 600 do slow[i] = { delay = 0.01 } end
    server:script(slow)
    local env = { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = server.url }
    local pid, wait = stella_bg(dir, { "trigger", "--rules", rules, "--db", url, "--connections", "4", input },
      env, "killed")
    -- Redis goes away about a second in (10 ms answers, one connection): the trigger has
    -- decided its first batches (8, 16, ... 200 events) and has more to decide
    local ok = nginx.wait_until(60, function() return #server:requests() >= 100 end)
    os.execute("kill -9 " .. pid)
    local status = wait()
    assert.is_true(ok, "the server never got 250 requests")
    assert.equal(137, status)
    local before = received(server)
    -- the killed run's batch is leased for 4 s: retry once the lease is over
    local s = assert(store_mod.redis(url))
    local leased = assert(s:outbox("queued", 1000))
    assert.is_true(#leased > 0, "nothing was left in the outbox")
    local due = 0
    for _, it in ipairs(leased) do due = math.max(due, it.next_at) end
    nginx.wait_until(30, function() return os.time() > due end)
    local rstatus, rout, rerr = stella_cmd(dir, { "retry", "--db", url }, env, "retry")
    assert.equal(0, rstatus, rout .. rerr)
    assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
    -- every decided event reached the server: the ledger's sends are all there
    local after = received(server)
    local sent_ids = {}
    for _, e in ipairs(assert(s:ledger{ status = "sent", limit = 10000 })) do sent_ids[e.interaction_id] = true end
    s:close()
    for id in pairs(sent_ids) do assert.truthy(after[id], "interaction " .. id .. " lost") end
    for id in pairs(after) do assert.truthy(sent_ids[id], "interaction " .. id .. " sent but not in the ledger") end
    -- twice only what was on the wire, unsettled, at the kill: at most one batch
    local twice = 0
    for id, n in pairs(after) do
      assert.is_true(n <= 2, "interaction " .. id)
      if n == 2 then
        twice = twice + 1
        assert.truthy(before[id], "interaction " .. id .. " went twice but was not sent before the kill")
      end
    end
    assert.is_true(twice <= 200, "more than a batch went twice: " .. twice)
  end)

  it("Redis unreachable at start: one clear line, a non-zero exit, no password", function()
    local port = redis_server.closed_port()
    local url = "redis://app:" .. escape(APP_PASSWORD) .. "@127.0.0.1:" .. port .. "/0"
    local input = events_file(dir .. "/u.jsonl", range(1, 3), function(i) return i end)
    for _, args in ipairs{ { "trigger", "--rules", rules, "--db", url, input }, { "status", "--db", url },
                           { "retry", "--db", url }, { "doctor", "--db", url } } do
      local status, out, err = stella_cmd(dir, args, { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = server.url })
      assert.not_equal(0, status, args[1])
      assert.equal("", out, args[1])
      local lines = {}
      for line in err:gmatch("[^\n]+") do lines[#lines + 1] = line end
      assert.equal(1, #lines, err)
      assert.matches("^stella " .. args[1] .. ": ", lines[1])
      assert.matches("redis://app:%*%*%*@127%.0%.0%.1:" .. port .. "/0", lines[1])
      assert.matches("[Cc]onnect", lines[1])
    end
    assert.equal(0, #server:requests())
  end)

  it("a wrong password or user: refused, never shown", function()
    local url = srv:url{ user = "app", password = "wrong-" .. escape(APP_PASSWORD), db = 1 }
    local status, _, err = stella_cmd(dir, { "status", "--db", url }, {})
    assert.equal(1, status)
    assert.matches("authentication failed", err)
    assert.is_nil(err:find("wrong-", 1, true))
    -- the default user's requirepass works too
    local dout
    status, dout = stella_cmd(dir, { "doctor", "--db", srv:url{ password = PASSWORD, db = 1 } }, {})
    assert.equal(0, status, dout)
    assert.matches("redis://:%*%*%*@127%.0%.0%.1:%d+/1: Redis 7", dout)
    local s = assert(store_mod.redis(srv:url{ password = PASSWORD, db = 1 }))
    assert.matches("^stella%.store%.redis%(redis://:%*%*%*@", tostring(s.backend))
    assert.is_nil(tostring(s):find(PASSWORD, 1, true))
    s:close()
  end)

  it("Redis going away mid-run: undecided events reported, decided ones queued for retry", function()
    local url = fresh_url()
    local input = events_file(dir .. "/away.jsonl", range(1, 1000), function(i) return i end)
    local slow = {}
    for i = 1, 1000 do slow[i] = { delay = 0.01 } end
    server:script(slow)
    local env = { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = server.url }
    local _, wait = stella_bg(dir, { "trigger", "--rules", rules, "--db", url, "--json", input }, env, "away")
    -- Redis goes away about a second in (10 ms answers, one connection): the trigger has
    -- decided its first batches (8, 16, ... 200 events) and has more to decide
    local ok = nginx.wait_until(60, function() return #server:requests() >= 100 end)
    srv:stop()   -- SIGTERM: Redis writes its AOF and exits
    local status, out, err = wait()
    assert.is_true(ok)
    assert.equal(1, status, out .. err)
    local by = counts_of(out)
    local failed = by["failed/store_error"] or 0
    assert.is_true(failed > 0, out)
    assert.matches("store", err)
    assert(srv:start())
    -- what was decided is in the outbox (or was sent and settled); retry sends the rest
    local got_before = received(server)
    local s = assert(store_mod.redis(url))
    local queued = assert(s:outbox("queued", 2000))
    local due = 0
    for _, it in ipairs(queued) do due = math.max(due, it.next_at) end
    nginx.wait_until(30, function() return os.time() > due end)
    local rstatus, rout, rerr = stella_cmd(dir, { "retry", "--db", url }, env, "retry2")
    assert.equal(0, rstatus, rout .. rerr)
    assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
    s:close()
    local got = received(server)
    -- every event is either reported failed (not decided) or reached the server
    local reached = 0
    for _ in pairs(got) do reached = reached + 1 end
    assert.equal(1000, reached + failed)
    for id in pairs(got_before) do assert.truthy(got[id]) end
  end)

  it("Redis killed (kill -9) and restarted with AOF everysec: no transaction half there, none out of order", function()
    local url = fresh_url()
    local log = dir .. "/writer.log"
    local writer = SPEC_DIR .. "support/redis_writer.lua"
    local proc = assert(io.popen(child.ENV .. LUA .. " " .. shell_quote(writer) .. " " .. shell_quote(url)
      .. " " .. shell_quote(log) .. " 100000 2>&1"))
    local ok = nginx.wait_until(60, function()
      local _, n = (read_file(log) or ""):gsub("\nok ", "")
      return n >= 300
    end)
    srv:kill()
    proc:read("*a")
    proc:close()
    assert.is_true(ok, "the writer did not get going: " .. tostring(read_file(log)))
    assert(srv:start())
    local committed = {}
    for id in (read_file(log) or ""):gmatch("ok (%d+)") do committed[#committed + 1] = tonumber(id) end
    local s = assert(store_mod.redis(url))
    local items = assert(s:outbox("queued", 200000))
    local have = {}
    for _, it in ipairs(items) do have[it.id] = true end
    -- what is there is a prefix of what was committed (plus, perhaps, the commit whose
    -- answer the kill cut off); each transaction whole: its item, both marks, its entry
    local kept = 0
    while kept < #committed and have[committed[kept + 1]] do kept = kept + 1 end
    assert.is_true(#items == kept or #items == kept + 1, ("%d items, a prefix of %d"):format(#items, kept))
    for i = kept + 1, #committed do assert.is_nil(have[committed[i]], "a hole before item " .. committed[i]) end
    local keys = {}
    for _, it in ipairs(items) do keys[#keys + 1] = "a" .. it.id; keys[#keys + 1] = "b" .. it.id end
    local _, owners = s:get_marks(keys, os.time())
    for j, it in ipairs(items) do
      assert.equal(it.id, owners[2 * j - 1], "mark a" .. it.id)
      assert.equal(it.id, owners[2 * j], "mark b" .. it.id)
    end
    local lost = {}
    for i = kept + 1, #committed do lost[#lost + 1] = "a" .. committed[i] end
    if #lost > 0 then
      local untils = s:get_marks(lost, os.time())
      assert.same({}, untils)
    end
    assert.equal(#items, #assert(s:ledger{ limit = 200000 }))
    -- (a kill -9 of the process keeps what it wrote to the AOF: lost, if any, is only
    -- what Redis had not yet written; a machine crash can lose up to a second)
    s:close()
  end)
end)
