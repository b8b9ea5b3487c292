-- Specs for the rules inside Redis (stella.redis_rules, `stella redis load`, FCALL
-- stella_decide) against a real redis-server (spec/support/redis.lua): the pure SHA-256
-- against the C core's (here and inside Redis), the same outcomes as the Lua trigger over
-- examples/interactions.jsonl with examples/rules.lua, suppression and dedupe shared with
-- the Lua trigger on one store, a call from redis-cli, rules files using what Redis's Lua
-- lacks refused with file:line, and an invalid request sent by nobody: `stella retry`
-- validates it, records it invalid and releases its marks.
local redis_server = require "support.redis"
local redis = require "stella.redis"
local store_mod = require "stella.store"
local stella = require "stella"
local core = require "stella.core"
local nginx = require "stella.nginx"
local redis_rules = require "stella.redis_rules"
local sha256_mod = require "stella.redis_rules.sha256"
local cjson = require "cjson"

local LUA = os.getenv("STELLA_TEST_LUA") or (rawget(_G, "jit") and "luajit" or "lua5.4")
local SPEC_DIR = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./")
local ROOT = SPEC_DIR .. "../"
local RULES = ROOT .. "examples/rules.lua"
local shell_quote, read_file, write_file, sh = nginx.shell_quote, nginx.read_file, nginx.write_file, nginx.run

-- LuaJIT's bit; under Lua 5.4 the same functions over its operators (loaded from a string:
-- LuaJIT cannot parse them)
local bit = rawget(_G, "jit") and require("bit") or assert(load([[
  local function tobit(x)
    x = math.floor(x) % 4294967296
    if x >= 2147483648 then x = x - 4294967296 end
    return x
  end
  local function u(x) return math.floor(x) % 4294967296 end
  return {
    tobit = tobit,
    band = function(a, b) return tobit(u(a) & u(b)) end,
    bxor = function(a, b, c) local r = u(a) ~ u(b) if c then r = r ~ u(c) end return tobit(r) end,
    bnot = function(a) return tobit(~u(a)) end,
    rshift = function(a, n) return tobit(u(a) >> n) end,
    ror = function(a, n) a = u(a) return tobit(((a >> n) | (a << (32 - n))) & 0xffffffff) end,
    tohex = function(a, n) return string.format("%0" .. n .. "x", u(a)) end,
  }]]))()

-- bin/stella run to the end: status, stdout, stderr (support.child)
local function stella_cmd(dir, args, env) return require("support.child").run(LUA, dir, args, env, "cmd") end

describe("the rules inside Redis", function()
  local srv, dir, now

  setup(function()
    srv = redis_server.start()
    dir = assert(nginx.temp_dir("stella-redis-rules"))
    now = os.time()   -- marks expire by Redis's clock: a real time, fixed for the whole file
  end)
  teardown(function()
    if srv then srv:remove() end
    if dir then nginx.remove_dir(dir) end
  end)

  local function open(tag)
    return assert(store_mod.redis{ url = srv:url(), tag = tag })
  end

  local function load_rules(store, path)
    return redis_rules.load(store, path, assert(redis_rules.read(path)))
  end

  -- FCALL stella_decide on a raw connection: status, reason, detail, outbox id
  local function fcall(conn, tag, event_json, at)
    local r, err = conn:call("FCALL", "stella_decide", 1, "stella:{" .. tag .. "}:meta", event_json,
                             tostring(at or now))
    assert(r, tostring(err))
    return { status = r[1], reason = r[2] or nil, detail = r[3] or nil, outbox_id = r[4] or nil }
  end

  describe("the pure SHA-256", function()
    local sha256 = sha256_mod.new(bit)
    local function inputs()
      local list = { "", "abc", "0123456789abcdef0123456789abcdef jane.doe@example.com" }
      math.randomseed(11)
      for len = 1, 200 do
        local b = {}
        for i = 1, len do b[i] = string.char(math.random(0, 255)) end
        list[#list + 1] = table.concat(b)
      end
      list[#list + 1] = string.rep("x", 10000)
      return list
    end

    it("matches stella.core's on every length up to 200 bytes and a long input", function()
      for _, s in ipairs(inputs()) do assert.equal(core.sha256(s), sha256(s)) end
    end)

    it("matches it inside Redis (Redis's own bit library)", function()
      local conn = assert(redis.connect(srv:url()))
      local script = "local M = loadstring(ARGV[1])() local f = M.new(bit) local out = {} "
        .. "for i = 2, #ARGV do out[i - 1] = f(ARGV[i]) end return out"
      local list = inputs()
      local args = { "EVAL", script, 0, read_file(ROOT .. "lua/stella/redis_rules/sha256.lua") }
      for _, s in ipairs(list) do args[#args + 1] = s end
      local out = assert(conn:call((table.unpack or unpack)(args)))
      assert.equal(#list, #out)
      for i, s in ipairs(list) do assert.equal(core.sha256(s), out[i]) end
      conn:close()
    end)
  end)

  describe("FCALL stella_decide", function()
    it("decides examples/interactions.jsonl as the Lua trigger does", function()
      local lua_store, redis_store = open("lua"), open("fcall")
      assert(load_rules(redis_store, RULES))
      -- one address unsubscribed in each store (each with its own salt)
      for _, s in ipairs{ lua_store, redis_store } do
        assert(s:unsubscribe(s:hash_email(" Omar.Haddad@example.net "), now))
      end
      local trigger = stella.trigger{ rules = RULES, store = lua_store, clock = function() return now end,
                                      client = { api_key = "k", base_url = "http://127.0.0.1:9", retry = { attempts = 1 } } }
      local conn = redis_store.backend.conn
      local compared, queued, malformed = 0, 0, 0
      for line in io.lines(ROOT .. "examples/interactions.jsonl") do
        local event = stella.decode_json(line)
        if event then
          local want = trigger:process(event)
          local got = fcall(conn, "fcall", line)
          if want.outbox_id or want.reason == "invalid_request" then
            -- queued: the Lua trigger's send failed (nothing listens); invalid_request: the C
            -- core refused it, which in Redis happens when the sender validates (below)
            if want.outbox_id then assert.equal("queued", want.status) end
            assert.equal("queued", got.status)
            assert.equal("deferred", got.reason)
            assert.truthy(got.outbox_id)
            if want.outbox_id then queued = queued + 1 end
          else
            assert.same({ want.status, want.reason, want.detail }, { got.status, got.reason, got.detail })
          end
          compared = compared + 1
        else
          assert.has_error(function() fcall(conn, "fcall", line) end)
          malformed = malformed + 1
        end
      end
      assert.equal(48, compared)
      assert.equal(2, malformed)
      assert.is_true(queued > 10)
      -- the same marks under the same keys, the same queue, the same ledger statuses
      local lua_counts, redis_counts = {}, {}
      for _, c in ipairs(lua_store:counts{}) do lua_counts[c.status .. "/" .. tostring(c.reason)] = c.count end
      for _, c in ipairs(redis_store:counts{}) do redis_counts[c.status .. "/" .. tostring(c.reason)] = c.count end
      local skipped = 0   -- (skipped, suppressed, invalid by the rules)
      for k, v in pairs(lua_counts) do
        if not k:match("^queued/") and k ~= "invalid/invalid_request" then
          assert.equal(v, redis_counts[k], k)
          skipped = skipped + v
        end
      end
      assert.equal(queued + lua_counts["invalid/invalid_request"], redis_counts["queued/deferred"])
      assert.is_true(skipped > 10)
      -- the sender validates: the request the C core refuses is recorded invalid there too
      local sender = stella.trigger{ rules = RULES, store = redis_store, clock = function() return now end,
                                     client = { api_key = "k", base_url = "http://127.0.0.1:9", retry = { attempts = 1 } } }
      local summary = assert(sender:flush())
      assert.equal(lua_counts["invalid/invalid_request"], summary.invalid)
      assert.equal(lua_counts["invalid/invalid_request"], redis_store:counts{}[1] and (function()
        for _, c in ipairs(redis_store:counts{}) do
          if c.status == "invalid" and c.reason == "invalid_request" then return c.count end
        end
      end)())
      sender:close()
      assert.is_true(redis_counts["skipped/unsubscribed"] >= 2)   -- the rules' list and the store's
      assert.equal(lua_store:outbox_counts().queued, redis_store:outbox_counts().queued)
      local e = redis_store:ledger{ limit = 1 }[1]
      assert.equal(now, e.time)
      trigger:close()
      lua_store:close()
      redis_store:close()
    end)

    it("shares suppression and once-per-interaction with the Lua trigger on one store", function()
      local store = open("shared")
      assert(load_rules(store, RULES))
      local trigger = stella.trigger{ rules = RULES, store = store, clock = function() return now end,
                                      client = { api_key = "k", base_url = "http://127.0.0.1:9", retry = { attempts = 1 } } }
      local conn = store.backend.conn
      local function event(id, email)
        return { id = id, status = "solved", channel = "phone", brand = "blancapeak",
                 requester = { name = "A", email = email }, assignee = { email = "agent@blancapeak.com" } }
      end
      -- decided in Redis first: the Lua trigger then suppresses the customer, skips the ticket
      local got = fcall(conn, "shared", cjson.encode(event(9001, "first@example.com")))
      assert.equal("queued", got.status)
      local o = trigger:process(event(9002, "First@Example.com"))
      assert.equal("suppressed", o.status)
      o = trigger:process(event(9001, "other@example.com"))
      assert.same({ "skipped", "duplicate" }, { o.status, o.reason })
      -- decided by the Lua trigger first: FCALL suppresses and skips
      o = trigger:process(event(9003, "second@example.com"))
      assert.equal("queued", o.status)   -- not sent (nothing listens), its marks reserved
      got = fcall(conn, "shared", cjson.encode(event(9004, "second@example.com")))
      assert.equal("suppressed", got.status)
      assert.truthy(got.detail:find("next possible at", 1, true))
      got = fcall(conn, "shared", cjson.encode(event(9003, "third@example.com")))
      assert.same({ "skipped", "duplicate" }, { got.status, got.reason })
      trigger:close()
      store:close()
    end)

    it("answers redis-cli, with the outbox item a sender reads", function()
      local cli = "/usr/bin/redis-cli"
      if not nginx.file_exists(cli) then pending("redis-cli is not installed") return end
      local store = open("cli")
      assert(load_rules(store, RULES))
      local json = '{"id": 777, "status": "solved", "channel": "chat", "requester": {"name": "R", '
        .. '"email": "cli@example.com", "phone": null}, "assignee": {"email": "agent@blancapeak.com"}, '
        .. '"tags": ["a", null]}'
      local out_file = dir .. "/cli.out"
      assert.equal(0, sh(cli .. " -h 127.0.0.1 -p " .. srv.port .. " FCALL stella_decide 1 "
        .. shell_quote("stella:{cli}:meta") .. " " .. shell_quote(json) .. " >" .. shell_quote(out_file)))
      local lines = {}
      for l in (read_file(out_file) or ""):gmatch("[^\n]+") do lines[#lines + 1] = l end
      assert.equal("queued", lines[1])
      assert.equal("deferred", lines[2])
      local items = store:outbox("queued")
      assert.equal(1, #items)
      assert.equal("unvalidated", items[1].kind)
      assert.equal("777", items[1].event_id)
      assert.equal(store:hash_email("cli@example.com"), items[1].customer_hash)
      local req = assert(stella.decode_json(items[1].body))
      assert.same({ "a", "batch-export" }, req.tags)   -- null dropped, as the Lua reader does
      assert.is_nil(req.customer.phone)
      assert(stella.encode(req, "request"))
      store:close()
    end)
  end)

  describe("stella redis load", function()
    it("refuses a rules file using what Redis's Lua lacks, naming file and line", function()
      local path = dir .. "/uses_io.lua"
      write_file(path, "return {\n  map = function(e)\n    local f = io.open('/etc/hostname')\n"
        .. "    return e\n  end,\n  when = function(e) return os.date('%H') ~= '' end,\n"
        .. "  on_alert = function(info) io.stderr:write('alert') end,\n}\n")
      local status, out, err = stella_cmd(dir, { "redis", "load", "--rules", path, "--db", srv:url() })
      assert.equal(1, status)
      assert.equal("", out)
      assert.truthy(err:find(path .. ":3: uses io.open, which Redis's Lua does not have", 1, true), err)
      assert.truthy(err:find(path .. ":6: uses os.date", 1, true), err)
      assert.is_nil(err:find(":7:", 1, true), err)   -- on_alert never runs in Redis
      local problems = redis_rules.check("r.lua", "local t = {}\nreturn { map = function(e) x = e.n // 2 "
        .. "goto done ::done:: return e end, when = function(e) return string.pack('i4', 1) end }")
      assert.same({ "r.lua:2: assigns the global x, which Redis does not allow (make it local)",
                    "r.lua:2: uses the operator // (Lua 5.3), which Redis's Lua does not have",
                    "r.lua:2: uses goto (Lua 5.2), which Redis's Lua does not have",
                    "r.lua:2: uses a ::label:: (Lua 5.2), which Redis's Lua does not have",
                    "r.lua:2: uses string.pack, which Redis's Lua does not have" }, problems)
    end)

    it("refuses what only Redis's compiler finds, and puts the previous library back", function()
      local store = open("refused")
      assert(load_rules(store, RULES))
      local path = dir .. "/hexfloat.lua"   -- 0x1p-1: a number in 5.4 and LuaJIT, not in 5.1
      write_file(path, "return {\n  sample = 0x1p-1,\n}\n")
      local info, err = load_rules(store, path)
      assert.is_nil(info)
      assert.truthy(err:find(path .. ":2:", 1, true), err)
      local conn = store.backend.conn
      local r = assert(conn:call("FCALL_RO", "stella_rules", 0))
      assert.same({ RULES, core.sha256(read_file(RULES)), "ready" }, r)
      store:close()
    end)

    it("loads with the command and prints the FCALL to use", function()
      local status, out, err = stella_cmd(dir, { "redis", "load", "--rules", RULES, "--db", srv:url() })
      assert.equal(0, status, err)
      assert.truthy(out:find("loaded " .. RULES, 1, true), out)
      assert.truthy(out:find("FCALL stella_decide 1 stella:{main}:meta EVENT_JSON [NOW]", 1, true), out)
      status, _, err = stella_cmd(dir, { "redis", "load", "--rules", RULES, "--db", dir .. "/x.db" })
      assert.equal(2, status)
      assert.truthy(err:find("--db must be a Redis URL", 1, true), err)
    end)
  end)

  describe("a request decided in Redis that the rules schedule", function()
    it("waits in the outbox until its time, as the Lua trigger schedules it, then goes", function()
      local testserver = require "support.testserver"
      local server = testserver.start()
      local path = dir .. "/delay_rules.lua"
      -- 2 h after the event's time, then out of the quiet hours at +01:00 (no zone field)
      write_file(path, [[
return {
  map = function(e) return { customer = { name = "C", email = e.email }, channel = "chat",
                             employee = { email = "agent@blancapeak.com" }, ext_interaction_id = e.id } end,
  once_per_interaction = true,
  delay = "2h", event_time = "at",
  quiet_hours = { from = "21:00", to = "08:00", fallback_zone = "+01:00" },
}
]])
      -- an event at 18:30 UTC (19:30 at +01:00): 2 h later is 21:30 local, in the quiet
      -- hours, so it goes at 08:00 local the next morning (07:00 UTC)
      local day = math.floor(now / 86400) * 86400
      local at = day + 18 * 3600 + 1800
      local want = day + 86400 + 7 * 3600
      local event = { id = "S-1", email = "later@example.com", at = os.date("!%Y-%m-%dT%H:%M:%SZ", at) }
      local store = open("delay")
      assert(load_rules(store, path))
      local conn = store.backend.conn
      local got = fcall(conn, "delay", cjson.encode(event), at)
      assert.same({ "queued", "scheduled" }, { got.status, got.reason })
      -- the Lua trigger's own words for the same event lead the detail
      local lua_trigger = stella.trigger{ rules = path, store = store_mod.memory(), clock = function() return at end,
                                          client = { api_key = "k", base_url = server.url, retry = { attempts = 1 } } }
      local lua_o = lua_trigger:explain(event)
      lua_trigger:close()
      assert.equal("will send at " .. os.date("!%Y-%m-%dT%H:%M:%SZ", want), lua_o.detail:sub(1, 33))
      assert.equal(lua_o.detail, got.detail:sub(1, #lua_o.detail))
      local items = store:outbox("queued")
      assert.equal(1, #items)
      assert.equal(want, items[1].next_at)
      assert.equal("scheduled", items[1].last_error)
      assert.equal(0, items[1].attempts)
      -- the sender (stella retry's flush) leaves it alone before its time ...
      local clock = want - 1
      local trigger = stella.trigger{ rules = path, store = store, clock = function() return clock end,
                                      client = { api_key = "k", base_url = server.url, retry = { attempts = 1 } } }
      local summary = assert(trigger:flush())
      assert.equal(0, summary.sent + summary.queued + summary.failed)
      assert.equal(0, #server:requests())
      -- ... and sends it once due
      clock = want
      summary = assert(trigger:flush())
      assert.equal(1, summary.sent)
      local reqs = server:requests()
      assert.equal(1, #reqs)
      assert.equal("S-1", cjson.decode(reqs[1].body).ext_interaction_id)
      assert.same({ queued = 0, dead = 0 }, store:outbox_counts())
      trigger:close()
      store:close()
      server:stop()
    end)
  end)

  describe("a request decided in Redis that is invalid", function()
    it("is sent by nobody: stella retry records it invalid and releases its marks", function()
      local path = dir .. "/invalid_rules.lua"
      -- employee left out: the API's schema wants one
      write_file(path, [[
return {
  map = function(e) return { customer = { name = "C", email = e.email }, channel = "chat",
                             ext_interaction_id = e.id } end,
  suppression = { days = 7 },
  once_per_interaction = true,
}
]])
      local store = open("invalid")
      assert(load_rules(store, path))
      local conn = store.backend.conn
      local got = fcall(conn, "invalid", '{"id": "T-1", "email": "bad@example.com"}')
      assert.equal("queued", got.status)
      -- reserved: a second event for the customer is suppressed until the sender decides
      assert.equal("suppressed", fcall(conn, "invalid", '{"id": "T-2", "email": "bad@example.com"}').status)
      -- the sender: the trigger's flush (what `stella retry` runs; the next spec runs the command)
      local trigger = stella.trigger{ rules = path, store = store, clock = function() return now end,
                                      client = { api_key = "k", base_url = "http://127.0.0.1:9", retry = { attempts = 1 } } }
      local summary = assert(trigger:flush())
      assert.equal(1, summary.invalid)
      assert.equal(0, summary.sent + summary.queued + summary.failed)
      assert.same({ queued = 0, dead = 0 }, store:outbox_counts())
      local e = store:ledger{ status = "invalid", limit = 5 }[1]
      assert.equal("invalid_request", e.reason)
      assert.equal("T-1", e.event_id)
      assert.truthy(e.detail:find("employee", 1, true), e.detail)
      assert.equal("invalid", e.error_kind)
      assert.equal(store:hash_email("bad@example.com"), e.customer_hash)
      -- its marks are gone: the customer and the interaction are free again
      got = fcall(conn, "invalid", '{"id": "T-1", "email": "bad@example.com"}')
      assert.equal("queued", got.status)
      trigger:close()
      store:close()
    end)

    it("`stella retry` on the store says so and exits 1", function()
      local path = dir .. "/invalid_rules.lua"
      local store = open("main")
      assert(load_rules(store, path))
      local got = fcall(store.backend.conn, "main", '{"id": "M-1", "email": "main@example.com"}')
      assert.equal("queued", got.status)
      store:close()
      local status, out, err = stella_cmd(dir, { "retry", "--db", srv:url() },
                                          { STELLA_API_KEY = "k", STELLA_BASE_URL = "http://127.0.0.1:9" })
      assert.equal(1, status, err)
      assert.truthy(out:find("sent 0,", 1, true), out)
      assert.truthy(out:find("invalid 1: decided in Redis", 1, true), out)
      assert.truthy(out:find("outbox: 0 queued, 0 dead", 1, true), out)
    end)
  end)
end)
