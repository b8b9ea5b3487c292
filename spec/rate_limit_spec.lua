-- Specs for the fleet's rate limit (stella.rate_limit): the settings and their errors, the
-- GCRA bucket and the pause in a real redis-server (counts of tokens, never times), the
-- key's id; then three `stella worker` processes and a capture server whose first answer
-- is a 429 with Retry-After: 2.
local redis_server = require "support.redis"
local testserver = require "support.testserver"
local cjson = require "cjson"
local nginx = require "stella.nginx"
local rate_limit = require "stella.rate_limit"
local rules_mod = require "stella.rules"

local LUA = os.getenv("STELLA_TEST_LUA") or "lua5.4"
local KEY = "tk_rate_0123456789SECRET"
local write_file = nginx.write_file

local function no_secret(text)
  assert.is_nil(tostring(text):find(KEY, 1, true), "the key leaked: " .. tostring(text))
end

describe("stella.rate_limit", function()
  describe("settings", function()
    it("per_second or per_minute, with burst and max_wait; nil and false are off", function()
      local s = rate_limit.settings{ per_second = 50 }
      assert.same({ rate = 50, interval_us = 20000, burst = 1, max_wait = 1, text = "50/s" }, s)
      s = rate_limit.settings{ per_minute = 120, burst = 5, max_wait = 0 }
      assert.same({ rate = 2, interval_us = 500000, burst = 5, max_wait = 0, text = "120/min" }, s)
      assert.same({ interval_us = 0, burst = 1, max_wait = 1, text = "pause only" }, rate_limit.settings{})
      assert.is_nil(rate_limit.settings(nil))
      assert.is_nil(rate_limit.settings(false))
    end)

    it("a mistake raises naming the field", function()
      local function err_of(rules)
        local ok, err = pcall(rules_mod.compile, rules, "rules.lua")
        assert.is_false(ok)
        return err
      end
      assert.equal("rules.lua: rate_limit.per_second must be a number above 0",
                   err_of{ rate_limit = { per_second = 0 } })
      assert.equal("rules.lua: rate_limit.per_minute must be a number above 0",
                   err_of{ rate_limit = { per_minute = "60" } })
      assert.equal("rules.lua: rate_limit: give per_second or per_minute, not both",
                   err_of{ rate_limit = { per_second = 1, per_minute = 60 } })
      assert.equal("rules.lua: rate_limit: unknown field 'per_hour' (per_second, per_minute, burst, max_wait)",
                   err_of{ rate_limit = { per_hour = 1 } })
      assert.equal("rules.lua: rate_limit.burst must be a whole number from 1 to 100000",
                   err_of{ rate_limit = { per_second = 5, burst = 0.5 } })
      assert.equal("rules.lua: rate_limit.max_wait must be a number of seconds from 0 to 60",
                   err_of{ rate_limit = { per_second = 5, max_wait = -1 } })
      assert.equal("rules.lua: rate_limit must be a table (or false), got number", err_of{ rate_limit = 50 })
      assert.equal("rules.lua: brands.acme.rate_limit.per_second must be a number above 0",
                   err_of{ brands = { acme = { api_key = "k", rate_limit = { per_second = -2 } } } })
      assert.matches("^rules%.lua: brands%.acme%.rate_limit: the brand has no key of its own",
                     err_of{ brands = { acme = { rate_limit = { per_second = 2 } } } })
    end)

    it("the rules' limits: the top level, a brand's own, a brand's false; none by default", function()
      assert.is_nil(rules_mod.compile({}, "r").rate_limit)
      local r = rules_mod.compile({ rate_limit = { per_second = 50 }, brands = {
        acme = { api_key = "k1", rate_limit = { per_minute = 60 } }, zed = { api_key = "k2", rate_limit = false },
        plain = {} } }, "r").rate_limit
      assert.equal(50, r.default.rate)
      assert.equal(1, r.brands.acme.rate)
      assert.is_false(r.brands.zed)
      assert.is_nil(r.brands.plain)
    end)

    it("a key's id is a hash of it: the same for the same key, never the key", function()
      local id = rate_limit.key_id(KEY)
      assert.matches("^%x+$", id)
      assert.equal(16, #id)
      assert.equal(id, rate_limit.key_id(KEY))
      assert.not_equal(id, rate_limit.key_id(KEY .. "x"))
      no_secret(id)
      assert.is_nil(id:find("SECRET", 1, true))
      local client = require("stella.client").new{ api_key = KEY, base_url = "http://127.0.0.1:9" }
      assert.equal(id, client.key_id)
      client:close()
    end)
  end)

  describe("the bucket and the pause in Redis", function()
    local srv, limiter
    lazy_setup(function()
      srv = redis_server.start{}
      limiter = assert(rate_limit.open(srv:url{}))
    end)
    lazy_teardown(function()
      if limiter then limiter:close() end
      if srv then srv:remove() end
    end)

    it("grants the burst at once, then one slot per interval up to max_wait ahead", function()
      local id = rate_limit.key_id(KEY .. "1")
      -- 10/s, burst 3, 1 s ahead: 3 at once and 10 more, one every 0.1 s
      local s = rate_limit.settings{ per_second = 10, burst = 3, max_wait = 1 }
      local g = assert(limiter:take(id, s, 50, "t"))
      assert.equal(13, g.granted)
      assert.near(-0.2, g.base, 1e-9)   -- slots max(0, -0.2 + (k - 1) * 0.1): three at 0
      assert.near(0.1, g.interval, 1e-9)
      assert.equal(0, g.paused)
      -- 6 a minute, 10 s ahead: a slot now and one in 10 s; then none for 20 s
      s = rate_limit.settings{ per_minute = 6, max_wait = 10 }
      id = rate_limit.key_id(KEY .. "2")
      g = assert(limiter:take(id, s, 5, "t"))
      assert.equal(2, g.granted)
      assert.near(0, g.base, 1e-9)
      assert.near(10, g.interval, 1e-9)
      g = assert(limiter:take(id, s, 5, "t"))
      assert.equal(0, g.granted)
      assert.is_true(g.base > 10 and g.base <= 20)   -- the next free slot: 20 s after the first
      -- fewer asked than allowed: just those
      g = assert(limiter:take(rate_limit.key_id(KEY .. "3"), rate_limit.settings{ per_second = 100 }, 4, "t"))
      assert.equal(4, g.granted)
    end)

    it("a pause holds every sender of the key until it ends, then the bucket starts from there", function()
      local id = rate_limit.key_id(KEY .. "4")
      local s = rate_limit.settings{ per_second = 100 }
      local left = assert(limiter:pause(id, 30, "t"))
      assert.near(30, left, 1e-6)
      local g = assert(limiter:take(id, s, 10, "t"))
      assert.equal(0, g.granted)
      assert.is_true(g.paused > 20 and g.paused <= 30)
      -- a shorter pause asked meanwhile does not shorten it
      assert.is_true(assert(limiter:pause(id, 0.1, "t")) > 20)
      assert.equal(0, assert(limiter:take(id, s, 10, "t")).granted)
      -- a short pause ends: slots again, the first at the pause's end or after
      id = rate_limit.key_id(KEY .. "6")
      assert(limiter:pause(id, 0.2, "t"))
      assert.is_true(nginx.wait_until(10, function()
        g = assert(limiter:take(id, s, 10, "t"))
        return g.granted > 0
      end))
      assert.equal(0, g.paused)
      -- pause only (no rate): everything at once, but the pause holds
      local p = rate_limit.settings{}
      id = rate_limit.key_id(KEY .. "5")
      assert.equal(1000, assert(limiter:take(id, p, 5000, "t")).granted)
      assert.is_true(assert(limiter.conn:call("PTTL", "stella:rate:" .. id)) > 3000 * 1000)   -- kept an hour
      assert(limiter:pause(id, 30, "t"))
      assert.equal(0, assert(limiter:take(id, p, 10, "t")).granted)
    end)

    it("the script again when the server lost it (SCRIPT FLUSH); status by id, the key nowhere", function()
      local id = rate_limit.key_id(KEY)
      local s = rate_limit.settings{ per_second = 5 }
      assert.equal(1, assert(limiter:take(id, s, 1, "brand acme 5/s")).granted)
      assert(limiter.conn:call("SCRIPT", "FLUSH"))
      assert.equal(5, assert(limiter:take(id, s, 5, "brand acme 5/s")).granted)
      assert(limiter:pause(id, 30, "brand acme 5/s"))
      local found
      for _, r in ipairs(assert(limiter:status())) do
        if r.id == id then found = r end
      end
      assert.is_table(found)
      assert.equal("brand acme 5/s", found.label)
      assert.near(5, found.rate, 1e-9)
      assert.is_true(found.paused > 29 and found.paused <= 30)
      assert.equal(1, found.pauses)
      -- no Redis key or value holds the key
      for _, k in ipairs(assert(limiter.conn:call("KEYS", "*"))) do
        no_secret(k)
        local t = limiter.conn:call("TYPE", k)
        if t == "hash" then
          for _, v in ipairs(assert(limiter.conn:call("HGETALL", k))) do no_secret(v) end
        end
      end
    end)
  end)

  -- several worker processes and seconds of waiting: once, under Lua 5.4 (the command's
  -- code is the same Lua under LuaJIT, which the other CLI specs run)
  local it_once = rawget(_G, "jit") and pending or it

  describe("the gate in the trigger's send stage", function()
    local server, srv
    lazy_setup(function()
      server = testserver.start()
      srv = redis_server.start{}
    end)
    lazy_teardown(function()
      if server then server:stop() end
      if srv then srv:remove() end
    end)
    before_each(function() server:reset() end)

    local function event(i)
      return { customer = { name = "Cust " .. i, email = ("cust%d@example.com"):format(i) },
               employee = { email = "a@b.com" }, channel = "phone", ext_interaction_id = tostring(i) }
    end

    it("Redis away: nothing is sent, the requests wait in the outbox; no password in what it says", function()
      local own = redis_server.start{ requirepass = "pw-SECRET-redis" }
      local url = own:url{ password = "pw-SECRET-redis" }
      local compiled = rules_mod.compile({ rate_limit = { per_second = 10 } }, "r")
      local limiter = assert(rate_limit.open(url))
      local gate = rate_limit.gate{ limiter = limiter, rules = compiled }
      local t = require("stella").trigger{ rules = compiled, gate = gate,
                                           client = { api_key = KEY, base_url = server.url } }
      own:kill()
      local out = t:process_many{ event(1), event(2) }
      own:remove()
      limiter:close()
      t:close()
      for i = 1, 2 do
        assert.equal("queued", out[i].status)
        assert.equal("deferred", out[i].reason)
        assert.matches("the rate limit cannot be read from Redis", out[i].detail)
        assert.is_nil(out[i].detail:find("pw-SECRET-redis", 1, true))
        no_secret(out[i].detail)
      end
      assert.is_true(gate.held_back)
      assert.equal(0, #server:requests())
    end)

    it("a pause another sender sets holds the slots a sender has taken already", function()
      local url = srv:url{ db = 4 }
      local compiled = rules_mod.compile({ rate_limit = { per_second = 10 } }, "r")
      local limiter, other = assert(rate_limit.open(url)), assert(rate_limit.open(url))
      local paused = false
      -- the other sender's 429 comes while this one waits for its second slot
      local gate = rate_limit.gate{ limiter = limiter, rules = compiled, sleep = function(seconds)
        if not paused then
          paused = true
          assert(other:pause(rate_limit.key_id(KEY), 30, "other"))
        end
        return require("stella.core").sleep(seconds)
      end }
      local t = require("stella").trigger{ rules = compiled, gate = gate,
                                           client = { api_key = KEY, base_url = server.url } }
      local out = t:process_many{ event(1), event(2), event(3) }
      t:close()
      limiter:close()
      other:close()
      assert.is_true(paused)
      assert.equal("sent", out[1].status)
      for i = 2, 3 do
        assert.equal("queued", out[i].status)
        assert.equal("deferred", out[i].reason)
        assert.matches("paused for every sender after a 429", out[i].detail)
      end
      assert.equal(1, #server:requests())
    end)

    it_once("over four connections: paced, and a 429 with Retry-After: 1 holds the rest until it ends", function()
      local url = srv:url{ db = 3 }
      local store = assert(require("stella.store").redis(url))
      -- 10/s: each of the connections' chunks is one request (slots 0.1 s apart)
      local compiled = rules_mod.compile({ rate_limit = { per_second = 10 }, once_per_interaction = true }, "r")
      local limiter = assert(rate_limit.open(url))
      local gate = rate_limit.gate{ limiter = limiter, rules = compiled }
      local t = require("stella").trigger{ rules = compiled, gate = gate, store = store, connections = 4,
                                           client = { api_key = KEY, base_url = server.url } }
      server:script{ { status = 200 }, { status = 429, headers = { ["Retry-After"] = "1" } } }
      local outcomes = {}
      local p = t:pipeline(function(out) for _, o in ipairs(out) do outcomes[#outcomes + 1] = o end end)
      local evs = {}
      for i = 1, 8 do evs[i] = event(i) end
      p:process(evs)
      p:finish()
      assert.equal("sent", outcomes[1].status)
      assert.equal("queued", outcomes[2].status)
      assert.equal("rate_limited", outcomes[2].reason)   -- the 429
      for i = 3, 8 do
        assert.equal("queued", outcomes[i].status)
        assert.equal("deferred", outcomes[i].reason)
        assert.matches("paused for every sender", outcomes[i].detail)
      end
      assert.equal(2, #server:requests())
      -- flush() sends them once the pause is over
      assert.is_true(nginx.wait_until(15, function()
        t:flush()
        return #server:requests() >= 9
      end))
      local reqs = server:requests()
      local by_id = {}
      for k, r in ipairs(reqs) do
        if k > 2 then
          assert.is_true(r.time >= reqs[2].time + 1 - 0.001, ("request %d came %.3f s after the 429")
            :format(k, r.time - reqs[2].time))
        end
        local eid = cjson.decode(r.body).ext_interaction_id
        by_id[eid] = (by_id[eid] or 0) + 1
      end
      assert.equal(9, #reqs)
      for i = 1, 8 do assert.equal(i == 2 and 2 or 1, by_id[tostring(i)], "interaction " .. i) end
      assert.same({ queued = 0, dead = 0 }, (function()
        local c = assert(store:outbox_counts())
        return { queued = c.queued, dead = c.dead }
      end)())
      t:close()
      store:close()
      limiter:close()
    end)
  end)
  describe("three workers and a 429 with Retry-After: 2", function()
    local server, srv, dir
    lazy_setup(function()
      server = testserver.start()
      srv = redis_server.start{}
      dir = assert(nginx.temp_dir("stella-rate"))
    end)
    lazy_teardown(function()
      if server then server:stop() end
      if srv then srv:remove() end
      if dir then nginx.remove_dir(dir) end
    end)

    -- bin/stella run to the end, and in the background (support.child), output in
    -- dir/NAME.out and .err, no key in either
    local stella_cmd, stella_bg = require("support.child").runners(LUA, no_secret)

    local function event(i)
      return { customer = { name = "Cust " .. i, email = ("cust%d@example.com"):format(i) },
               employee = { email = "a@b.com" }, channel = "phone", brand = "acme", ext_interaction_id = tostring(i) }
    end

    it_once("no worker sends for the 2 s after the 429; afterwards every request arrives, each once", function()
      local url = srv:url{ db = 1 }
      local rules = dir .. "/rules.lua"
      assert(write_file(rules, "return { once_per_interaction = true, outbox = { lease = 3 }, "
        .. "rate_limit = { per_second = 200 } }"))
      server:script{ { status = 429, headers = { ["Retry-After"] = "2" } } }
      local env = { STELLA_TEST_KEY = KEY, STELLA_BASE_URL = server.url }
      local workers = {}
      for w = 1, 3 do
        local pid, wait = stella_bg(dir, { "worker", "--rules", rules, "--db", url, "--name", "w" .. w, "--lease", "1",
                                           "--block", "0.2", "--json" }, env, "w" .. w)
        workers[w] = { pid = pid, wait = wait }
      end
      local q = assert(require("stella.queue").open(url))
      local limiter = assert(rate_limit.open(url))
      local id = rate_limit.key_id(KEY)
      -- the first event meets the 429; the rest come once the pause is in Redis
      assert(q:submit(event(1)))
      assert.is_true(nginx.wait_until(30, function()
        local hash = limiter.conn:call("HGET", "stella:rate:" .. id, "until")
        return #server:requests() >= 1 and hash
      end), "no pause after the 429")
      -- stella status shows it
      local code, st, st_err = stella_cmd(dir, { "status", "--db", url, "--json" }, {}, "status")
      assert.equal(0, code, st_err)
      local rl = cjson.decode(st).rate_limits
      assert.equal(1, #rl)
      assert.equal(id, rl[1].key_id)
      assert.equal("default key 200/s", rl[1].label)
      assert.near(200, rl[1].per_second, 1e-6)
      assert.is_true(rl[1].paused >= 0 and rl[1].paused <= 2)   -- (0 if this ran late: the pause's test is above)
      assert.equal(1, rl[1].pauses)
      for i = 2, 30 do assert(q:submit(event(i))) end
      -- done when every interaction has its 200
      local ok = nginx.wait_until(60, function()
        local n = 0
        for _, r in ipairs(server:requests()) do if r.answer.status == nil then n = n + 1 end end
        return n >= 30
      end)
      nginx.sleep(0.5)   -- a duplicate would come now
      for w = 1, 3 do os.execute("kill -TERM " .. workers[w].pid) end
      for w = 1, 3 do
        local wstatus, wout, werr = workers[w].wait()
        assert.equal(0, wstatus, wout .. werr)
      end
      q:close()
      limiter:close()
      assert.is_true(ok, "not every request arrived")
      local reqs = server:requests()
      local first = reqs[1]
      assert.equal(429, first.answer.status)
      assert.equal("1", cjson.decode(first.body).ext_interaction_id)
      -- nothing within the 2 s after the 429 (the server's clock: ms, hence the 1 ms)
      local by_id = {}
      for k = 2, #reqs do
        local r = reqs[k]
        assert.is_true(r.time >= first.time + 2 - 0.001,
          ("request %d came %.3f s after the 429"):format(k, r.time - first.time))
        assert.is_nil(r.answer.status, "only the first answer is a 429")
        local eid = cjson.decode(r.body).ext_interaction_id
        by_id[eid] = (by_id[eid] or 0) + 1
      end
      -- afterwards, all of them: each once (1 again after its 429)
      for i = 1, 30 do assert.equal(1, by_id[tostring(i)], "interaction " .. i) end
      assert.equal(31, #reqs)
    end)
  end)
end)
