-- Specs for scheduled sends: the rules' delay, event_time and quiet_hours (stella.rules),
-- time zones from the system's zone files (stella.zones), and the trigger queuing a
-- scheduled request in the outbox for flush() to send once due, against the loopback
-- test server with a controlled clock, on both stores.
local stella = require "stella"
local rules = require "stella.rules"
local zones = require "stella.zones"
local store_mod = require "stella.store"
local trigger_rows = require "stella.trigger.rows"
local testserver = require "support.testserver"
local child = require "support.child"

local T, iso = rules.parse_time, rules.iso_utc
local HOUR = 3600

-- a request the rules map from an event { id, at, tz, email }
local function map(e)
  return { customer = { name = "Jane Doe", email = e.email or "jane@example.com" },
           employee = { email = "paulagent@blancapeak.com" }, channel = "phone",
           ext_interaction_id = e.id }
end

local function rules_with(extra)
  local spec = { map = map, suppression = { days = 7 } }
  for k, v in pairs(extra) do spec[k] = v end
  return rules.compile(spec)
end

local ENV = { zone_offset = zones.offset }   -- what the trigger gives the rules

local function decide(r, event, now, env)
  local e = { now = now }
  for k, v in pairs(env or ENV) do e[k] = v end
  return rules.evaluate(r, event, e, true)
end

local function verdict(d, rule)
  for _, v in ipairs(d.verdicts) do if v.rule == rule then return v end end
end

describe("stella.zones", function()
  it("gives a zone's offset on both sides of its daylight saving changes", function()
    local ny = "America/New_York"   -- 2026: EDT from 03-08 07:00Z, EST from 11-01 06:00Z
    assert.equal(-5 * HOUR, zones.offset(ny, T"2026-03-08T06:59:59Z"))
    assert.equal(-4 * HOUR, zones.offset(ny, T"2026-03-08T07:00:00Z"))
    assert.equal(-4 * HOUR, zones.offset(ny, T"2026-11-01T05:59:59Z"))
    assert.equal(-5 * HOUR, zones.offset(ny, T"2026-11-01T06:00:00Z"))
    assert.equal(1 * HOUR, zones.offset("Europe/Paris", T"2026-03-29T00:59:59Z"))
    assert.equal(2 * HOUR, zones.offset("Europe/Paris", T"2026-03-29T01:00:00Z"))
    assert.equal(5.5 * HOUR, zones.offset("Asia/Kolkata", T"2026-06-01T00:00:00Z"))
  end)

  it("follows the file's rule past its last transition, south of the equator and by half hours", function()
    assert.equal(-4 * HOUR, zones.offset("America/New_York", T"2090-07-01T00:00:00Z"))
    assert.equal(-5 * HOUR, zones.offset("America/New_York", T"2090-12-01T00:00:00Z"))
    assert.equal(11 * HOUR, zones.offset("Australia/Sydney", T"2090-01-01T00:00:00Z"))
    assert.equal(10 * HOUR, zones.offset("Australia/Sydney", T"2090-07-01T00:00:00Z"))
    assert.equal(11 * HOUR, zones.offset("Australia/Lord_Howe", T"2090-01-01T00:00:00Z"))
    assert.equal(10.5 * HOUR, zones.offset("Australia/Lord_Howe", T"2090-07-01T00:00:00Z"))
    -- the footer rule alone: New York's
    local z = assert(zones.parse_tz("EST5EDT,M3.2.0,M11.1.0"))
    assert.equal(-5 * HOUR, zones.tz_offset(z, T"2026-03-08T06:59:59Z"))
    assert.equal(-4 * HOUR, zones.tz_offset(z, T"2026-03-08T07:00:00Z"))
    assert.same({ std = 5.5 * HOUR }, zones.parse_tz("<+0530>-5:30"))   -- POSIX: west is positive
    assert.is_nil(zones.parse_tz("EST5EDT,M3.2.0"))
  end)

  it("takes UTC offsets without a file and refuses names that are no zone or leave the directory", function()
    assert.equal(5.5 * HOUR, zones.offset("+05:30", 0))
    assert.equal(-8 * HOUR, zones.offset("UTC-08:00", 0))
    assert.equal(0, zones.offset("UTC", 0))
    local none, err = zones.offset("Mars/Olympus_Mons", 0)
    assert.is_nil(none)
    assert.matches("unknown time zone", err)
    for _, bad in ipairs{ "../../etc/passwd", "/etc/localtime", "Europe/../../etc/passwd", "", "a b" } do
      none, err = zones.offset(bad, 0)
      assert.is_nil(none, bad)
      assert.matches("not a time zone name", err)
    end
    none, err = zones.offset("zone.tab", 0)   -- a file in the directory that is not TZif
    assert.is_nil(none)
  end)
end)

describe("stella.rules scheduled sends", function()
  it("reads times, durations and offsets as documented", function()
    assert.equal(1767607200, T"2026-01-05T10:00:00Z")
    assert.equal(1767607200, T"2026-01-05 12:00:00+02:00")
    assert.equal(1767607200.25, T"2026-01-05T10:00:00.25Z")
    assert.equal(1767607200, T"2026-01-05T05:00-0500")
    assert.equal(1767607200, T(1767607200))
    assert.is_nil(T"2026-01-05T10:00:00")           -- no zone: refused
    assert.is_nil(T"2026-02-29T10:00:00Z")          -- not a leap year
    assert.equal(5400, rules.parse_duration("1h30m"))
    assert.equal(3, rules.parse_duration("3s"))
    assert.equal(2 * 86400, rules.parse_duration("2d"))
    assert.equal(90, rules.parse_duration(90))
    assert.is_nil(rules.parse_duration("2 hours"))
    assert.is_nil(rules.parse_duration(-1))
    assert.equal("2026-03-08T08:00:00-04:00", rules.iso_time(T"2026-03-08T12:00:00Z", -4 * HOUR))
  end)

  it("refuses schedule keys it cannot use, naming them", function()
    local function refused(spec, pattern)
      local ok, err = pcall(rules.compile, spec, "r.lua")
      assert.is_false(ok)
      assert.matches(pattern, err)
    end
    refused({ delay = "2 hours" }, "r.lua: delay must be a duration")
    refused({ delay = "2h", event_time = "a..b" }, "event_time must be a field name")
    refused({ event_time = "at" }, "event_time is for delay")
    refused({ quiet_hours = { from = "21:00" } }, "quiet_hours.from and quiet_hours.to must be local times")
    refused({ quiet_hours = { from = "25:00", to = "08:00" } }, "must be local times")
    refused({ quiet_hours = { from = "08:00", to = "08:00" } }, "must differ")
    refused({ quiet_hours = { from = "21:00", to = "08:00", zone = "x" } }, "unknown key 'quiet_hours.zone'")
    local ok, err = pcall(stella.trigger, { rules = { quiet_hours = { from = "21:00", to = "08:00",
                                                                     fallback_zone = "Mars/Base" } } })
    assert.is_false(ok)
    assert.matches("quiet_hours.fallback_zone: unknown time zone Mars/Base", err)
  end)

  it("sends `delay` after the event's time, now when that is past, and moves the marks along", function()
    local r = rules_with{ delay = "2h", event_time = "at", once_per_interaction = true }
    local now = T"2026-01-05T10:30:00Z"
    local d = decide(r, { id = 1, at = "2026-01-05T10:00:00Z" }, now)
    assert.equal("send", d.action)
    assert.equal(T"2026-01-05T12:00:00Z", d.send_at)
    local v = verdict(d, "schedule")
    assert.equal("scheduled", v.verdict)
    assert.equal("will send at 2026-01-05T12:00:00Z (2h after the event's time 2026-01-05T10:00:00Z)", v.detail)
    -- the windows count from the send
    for _, mark in ipairs(d.marks) do
      local days = mark.type == "suppress" and 7 or 365
      assert.equal(T"2026-01-05T12:00:00Z" + days * 86400, mark["until"])
    end
    -- an event older than the delay goes now
    d = decide(r, { id = 2, at = "2026-01-05T08:00:00Z" }, now)
    assert.is_nil(d.send_at)
    assert.equal("pass", verdict(d, "schedule").verdict)
    -- without event_time: after the decision
    d = decide(rules_with{ delay = 90 }, { id = 3 }, now)
    assert.equal(now + 90, d.send_at)
  end)

  it("makes an event whose time cannot be read invalid (invalid_time), and a raising event_time a rule_error", function()
    local r = rules_with{ delay = "2h", event_time = "ticket.solved_at" }
    local d = rules.evaluate(r, { id = 1 }, { now = 0 })
    assert.equal("invalid", d.action)
    assert.equal("invalid_time", d.reason)
    assert.equal("the event's ticket.solved_at is missing", d.detail)
    d = rules.evaluate(r, { id = 1, ticket = { solved_at = "yesterday" } }, { now = 0 })
    assert.equal("invalid_time", d.reason)
    assert.matches("%(yesterday%) is not a time with a zone", d.detail)
    d = rules.evaluate(rules_with{ delay = "1h", event_time = function() error("no clock", 0) end }, { id = 1 }, { now = 0 })
    assert.equal("rule_error", d.reason)
    assert.equal("event_time: no clock", d.detail)
    -- a function returning nil: the decision's time
    d = rules.evaluate(rules_with{ delay = "1h", event_time = function() return nil end }, { id = 1 }, { now = 0 })
    assert.equal(3600, d.send_at)
  end)

  describe("quiet hours", function()
    local r = rules_with{ quiet_hours = { from = "21:00", to = "08:00", zone_field = "tz",
                                          fallback_zone = "America/New_York" } }

    it("moves a send inside them to their end, across New York's spring change", function()
      -- 2026-03-07 23:30 EST (UTC-5); the night's end, 08:00, is EDT (UTC-4): 12:00Z, not 13:00Z
      local now = T"2026-03-08T04:30:00Z"
      local d = decide(r, { id = 1, tz = "America/New_York" }, now)
      assert.equal(T"2026-03-08T12:00:00Z", d.send_at)
      assert.equal("will send at 2026-03-08T12:00:00Z (quiet hours 21:00-08:00 in America/New_York: "
                   .. "at their end, 2026-03-08T08:00:00-04:00)", verdict(d, "schedule").detail)
      -- and across the autumn change: 08:00 EST is 13:00Z
      d = decide(r, { id = 2, tz = "America/New_York" }, T"2026-11-01T03:00:00Z")   -- 23:00 EDT
      assert.equal(T"2026-11-01T13:00:00Z", d.send_at)
      -- 07:59 local still waits; 08:00 local goes now
      d = decide(r, { id = 3, tz = "America/New_York" }, T"2026-03-09T11:59:00Z")
      assert.equal(T"2026-03-09T12:00:00Z", d.send_at)
      d = decide(r, { id = 4, tz = "America/New_York" }, T"2026-03-09T12:00:00Z")
      assert.is_nil(d.send_at)
      -- 20:59 local goes now; 21:00 local waits for the morning
      assert.is_nil(decide(r, { id = 5, tz = "America/New_York" }, T"2026-03-10T00:59:59Z").send_at)
      assert.equal(T"2026-03-10T12:00:00Z", decide(r, { id = 6, tz = "America/New_York" }, T"2026-03-10T01:00:00Z").send_at)
    end)

    it("reads the customer's zone as a UTC offset, and falls back on an unknown or missing one", function()
      local now = T"2026-01-05T16:00:00Z"   -- 21:30 at +05:30, 11:00 in New York
      local d = decide(r, { id = 1, tz = "+05:30" }, now)
      assert.equal(T"2026-01-06T02:30:00Z", d.send_at)   -- 08:00 +05:30
      assert.is_nil(decide(r, { id = 2, tz = "Mars/Base" }, now).send_at)
      assert.matches("the event's tz Mars/Base is not a known zone",
                     verdict(decide(r, { id = 3, tz = "Mars/Base" }, T"2026-01-06T03:00:00Z"), "schedule").detail)
      assert.is_nil(decide(r, { id = 4 }, now).send_at)
    end)

    it("works on UTC offsets alone where there are no zone files (inside Redis), and says so for a name", function()
      local q = rules_with{ quiet_hours = { from = "22:00", to = "07:00", zone_field = "tz", fallback_zone = "+01:00" } }
      local now = T"2026-01-05T22:00:00Z"   -- 23:00 at +01:00
      local d = decide(q, { id = 1, tz = "Europe/Paris" }, now, {})   -- no env.zone_offset: the fallback
      assert.equal(T"2026-01-06T06:00:00Z", d.send_at)
      d = rules.evaluate(r, { id = 2 }, { now = now })   -- a named fallback and no zone files
      assert.equal("invalid", d.action)
      assert.equal("invalid_time", d.reason)
      assert.matches("time zone America/New_York is unknown here", d.detail)
    end)

    it("comes after the delay: a delayed send that lands in quiet hours waits for their end", function()
      local both = rules_with{ delay = "3h", event_time = "at",
                               quiet_hours = { from = "21:00", to = "08:00", fallback_zone = "UTC" } }
      local d = decide(both, { id = 1, at = "2026-01-05T19:00:00Z" }, T"2026-01-05T19:00:00Z")
      assert.equal(T"2026-01-06T08:00:00Z", d.send_at)
      assert.matches("^will send at 2026%-01%-06T08:00:00Z %(3h after the event's time 2026%-01%-05T19:00:00Z; "
                     .. "quiet hours 21:00%-08:00 in UTC: at their end", verdict(d, "schedule").detail)
    end)
  end)
end)

describe("stella.trigger scheduled sends", function()
  local server
  lazy_setup(function() server = testserver.start() end)
  lazy_teardown(function() if server then server:stop() end end)
  before_each(function() server:reset() end)

  for _, backend in ipairs{ "memory", "sqlite" } do
    describe(backend .. " store", function()
      local now, s, path, t

      before_each(function()
        now = T"2026-01-05T10:00:00Z"
        if backend == "sqlite" then
          path = os.tmpname()
          s = assert(store_mod.sqlite(path))
        else
          s = assert(store_mod.memory())
        end
        t = stella.trigger{
          rules = { map = map, delay = "3s", event_time = "at", suppression = { days = 7 } },
          store = s, clock = function() return now end,
          client = { api_key = "tk_schedule_spec_0123", base_url = server.url, timeout = 5,
                     retry = { attempts = 1 } },
        }
      end)

      after_each(function()
        t:close()
        s:close()
        if path then child.remove_db(path) end
        path = nil
      end)

      it("queues a request with a 3-second delay: not sent before 3 s, sent by the flush at 3 s", function()
        local o = t:process{ id = 1, at = "2026-01-05T10:00:00Z" }
        assert.equal("queued", o.status)
        assert.equal("scheduled", o.reason)
        assert.equal(now + 3, o.send_at)
        assert.equal("will send at 2026-01-05T10:00:03Z (3s after the event's time 2026-01-05T10:00:00Z)", o.detail)
        assert.equal(0, #server:requests())
        -- waiting in the outbox, marked as scheduled, its marks reserved: the customer is suppressed
        local items = assert(s:outbox("queued"))
        assert.equal(1, #items)
        assert.equal(now + 3, items[1].next_at)
        assert.is_true(trigger_rows.is_scheduled(items[1]))
        assert.equal("suppressed", t:process{ id = 2, at = "2026-01-05T10:00:00Z" }.status)
        -- the ledger: queued/scheduled with the due time; no error in the rate
        local entry = assert(s:ledger{ status = "queued" })[1]
        assert.equal("scheduled", entry.reason)
        assert.matches("will send at 2026%-01%-05T10:00:03Z", entry.detail)
        for _, b in ipairs(s:rate{ since = 0 }) do assert.equal(0, b.errors) end

        now = now + 2.999
        assert.same({ sent = 0, recorded = 0, queued = 0, failed = 0, dead = 0 }, t:flush())
        assert.equal(0, #server:requests())
        now = now + 0.001
        assert.equal(1, t:flush().sent)
        local reqs = server:requests()
        assert.equal(1, #reqs)
        assert.matches('"ext_interaction_id":"1"', reqs[1].body)
        assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
        assert.equal(0, t:flush().sent)
        assert.equal(1, #server:requests())
      end)

      it("sends a batch's due requests in line and leaves its scheduled ones queued (the pipeline too)", function()
        local events = {
          { id = 10, at = "2026-01-05T09:00:00Z", email = "a@example.com" },   -- due: goes now
          { id = 11, at = "2026-01-05T10:00:00Z", email = "b@example.com" },   -- in 3 s
        }
        local outcomes = t:process_many(events)
        assert.equal("sent", outcomes[1].status)
        assert.equal("queued", outcomes[2].status)
        local p = t:pipeline(function() end)
        p:process{ { id = 12, at = "2026-01-05T10:00:00Z", email = "c@example.com" },
                   { id = 13, at = "2026-01-05T08:00:00Z", email = "d@example.com" } }
        p:finish()
        local sent = {}
        for _, r in ipairs(server:requests()) do sent[#sent + 1] = r.body:match('"ext_interaction_id":"(%d+)"') end
        assert.same({ "10", "13" }, sent)
        assert.equal(2, s:outbox_counts().queued)
        now = now + 3
        assert.equal(2, t:flush().sent)
        assert.equal(4, #server:requests())
      end)

      it("explains when a request will go, writing nothing", function()
        local o = t:explain{ id = 1, at = "2026-01-05T10:00:00Z" }
        assert.equal("queued", o.status)
        assert.equal("scheduled", o.reason)
        assert.equal(now + 3, o.send_at)
        local last = o.verdicts[#o.verdicts - 1]   -- then validate
        assert.equal("schedule", last.rule)
        assert.equal("will send at 2026-01-05T10:00:03Z (3s after the event's time 2026-01-05T10:00:00Z)", last.detail)
        assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
      end)
    end)
  end
end)

describe("the stella command with scheduled sends", function()
  local server, dir
  local LUA = os.getenv("STELLA_TEST_LUA") or (rawget(_G, "jit") and "luajit" or "lua5.4")
  local cjson = require "cjson"
  local socket = require "socket"

  lazy_setup(function()
    server = testserver.start()
    local p = io.popen("mktemp -d")
    dir = p:read("*l")
    p:close()
  end)
  lazy_teardown(function()
    if server then server:stop() end
    if dir then os.execute("rm -rf " .. child.quote(dir)) end
  end)
  before_each(function() server:reset() end)

  local function write(name, text)
    local f = assert(io.open(dir .. "/" .. name, "wb"))
    f:write(text)
    f:close()
    return dir .. "/" .. name
  end

  -- status, stdout, stderr
  local function stella(args)
    local words = {}
    for i, a in ipairs(args) do words[i] = child.quote(a) end
    local err = dir .. "/stderr"
    local p = io.popen(child.ENV .. "env -u STELLA_API_KEY -u STELLA_PRODUCTION_KEY -u STELLA_MODE "
      .. "STELLA_TEST_KEY=tk_schedule_cli_0123 STELLA_BASE_URL=" .. child.quote(server.url) .. " "
      .. LUA .. " bin/stella " .. table.concat(words, " ") .. " 2>" .. child.quote(err) .. "; echo @$?")
    local out = p:read("*a")
    p:close()
    return tonumber(out:match("@(%d+)%s*$")), (out:gsub("@%d+%s*$", "")), child.read_file(err)
  end

  local function ids_received()
    local ids = {}
    for _, r in ipairs(server:requests()) do ids[#ids + 1] = r.body:match('"ext_interaction_id":"([^"]*)"') end
    table.sort(ids)
    return ids
  end

  local RULES = [[
return {
  map = function(e)
    return { customer = { name = "Jane", email = e.email }, employee = { email = "paulagent@blancapeak.com" },
             channel = "phone", ext_interaction_id = e.id }
  end,
  delay = "2s", event_time = "solved_at",
  suppression = { days = 7 },
}
]]

  it("trigger queues what is not yet due, retry sends it once due, status counts it", function()
    local rules = write("rules.lua", RULES)
    local db = dir .. "/cli.db"
    local now = os.time()
    local function line(id, email, t)
      return ('{"id": "%s", "email": "%s", "solved_at": "%s"}\n'):format(id, email, iso(t))
    end
    -- 1: solved long ago, goes now; 2: due in about 2 s; 3: due in an hour
    local input = write("events.jsonl", line("1", "a@example.com", now - 600) .. line("2", "b@example.com", now)
                                        .. line("3", "c@example.com", now + 3600))
    local status, out, err = stella{ "trigger", "--rules", rules, "--db", db, input }
    assert.equal(0, status, err)
    assert.matches("queued%s+scheduled%s+2", out)
    assert.matches("scheduled: 2 requests wait in the outbox", out)
    assert.same({ "1" }, ids_received())

    local _, sjson = stella{ "status", "--db", db, "--json" }
    local s = cjson.decode(sjson)
    assert.equal(2, s.outbox.queued)
    assert.equal(2, s.outbox.scheduled)
    assert.equal(now + 2, s.outbox.next_scheduled)
    assert.equal(0, s.rate[#s.rate].errors)
    local _, stext = stella{ "status", "--db", db }
    assert.matches("outbox: 2 queued, 0 dead\n  0 due now, 2 scheduled %(the next at ", stext)

    -- event 3 is an hour away: a retry now does not send it (nor 2, unless 2 s passed)
    status, out = stella{ "retry", "--db", db }
    assert.equal(0, status, out)
    assert.matches("next item due at .* it is scheduled then", out)
    local got = ids_received()
    assert.is_nil(got[3])
    assert.are_not.equal("3", got[2])
    -- once event 2 is due, a retry sends it; event 3 still waits
    while os.time() < now + 2 do socket.sleep(0.1) end
    status, out = stella{ "retry", "--db", db }
    assert.equal(0, status, out)
    assert.same({ "1", "2" }, ids_received())
    assert.matches("outbox: 1 queued, 0 dead", out)
  end)

  it("stella test expects a scheduled outcome and its time", function()
    local rules = write("rules_q.lua", [[
return {
  map = function(e) return { customer = { name = "J", email = e.email }, employee = { email = "p@x.com" },
                             channel = "phone", ext_interaction_id = e.id } end,
  quiet_hours = { from = "21:00", to = "08:00", zone_field = "tz", fallback_zone = "America/New_York" },
  suppression = { days = 7 },
}
]])
    local cases = write("cases.lua", [[
return {
  now = "2026-03-08T04:30:00Z",
  cases = {
    { name = "night in New York", event = { id = 1, email = "a@x.com" }, expect = "queued", reason = "scheduled",
      send_at = "2026-03-08T08:00:00-04:00" },
    { name = "day in Kolkata", event = { id = 2, email = "b@x.com", tz = "Asia/Kolkata" }, expect = "sent" },
    { name = "wrong time", event = { id = 3, email = "c@x.com" }, expect = "queued", send_at = "2026-03-08T13:00:00Z" },
  },
}
]])
    local status, out = stella{ "test", "--rules", rules, "-v", cases }
    assert.equal(1, status, out)
    assert.matches("case 1 %(night in New York%): ok, queued %(scheduled%) at 2026%-03%-08T12:00:00Z", out)
    assert.matches("case 2 %(day in Kolkata%): ok, sent", out)
    assert.matches("case 3 %(wrong time%): expected send_at = 2026%-03%-08T13:00:00Z, got 2026%-03%-08T12:00:00Z; "
                   .. "verdicts: .*schedule=scheduled%(scheduled: will send at 2026%-03%-08T12:00:00Z", out)
    assert.matches("3 cases, 2 passed, 1 failed", out)
  end)
end)

-- The work queue's path (stella.queue.worker, what `stella worker` runs): the worker and its
-- trigger in this process on one controlled clock, a real redis-server, the test server.
describe("a queue worker with scheduled sends (Redis)", function()
  local redis_server = require "support.redis"
  local queue = require "stella.queue"
  local worker = require "stella.queue.worker"
  local server, srv
  local db_n = 0

  lazy_setup(function()
    server = testserver.start()
    srv = redis_server.start{}
  end)
  lazy_teardown(function()
    if server then server:stop() end
    if srv then srv:remove() end
  end)
  before_each(function() server:reset() end)

  -- a queue, a Redis store and a trigger on clock(); closed by finally
  local function setup(rules_spec, clock)
    db_n = db_n + 1
    local url = srv:url{ db = db_n }
    local q = assert(queue.open(url))
    local s = assert(store_mod.redis(url))
    local t = stella.trigger{
      rules = rules_spec, store = s, clock = clock,
      client = { api_key = "tk_schedule_spec_0123", base_url = server.url, timeout = 5, retry = { attempts = 1 } },
    }
    finally(function() t:close() s:close() q:close() end)
    return q, s, t
  end

  -- the worker's rounds until stop() (the worker's and the trigger's clock is clock)
  local function run(q, t, clock, stop, on_batch)
    return worker.run{ queue = q, trigger = t, name = "sched", block = 0.01, clock = clock, stop = stop,
                       on_batch = on_batch, on_error = function(m) error("worker: " .. m) end }
  end

  it("sends a request with a 3-second delay not before 3 s and within a flush interval (1 s) after", function()
    local t0 = os.time()   -- the real time (marks expire on Redis's clock), then stepped by the spec
    local now = t0
    local clock = function() return now end
    local q, s, t = setup({ map = map, delay = "3s", event_time = "at", suppression = { days = 7 } }, clock)
    assert(q:submit{ id = "1", at = iso(t0) })
    -- every look at stop() moves the clock 0.05 s on: a round of the worker looks three
    -- times, so a flush comes at most 1 s (flush_every) + 0.15 s after the one before
    local sent_at   -- the clock when the server first had the request
    run(q, t, clock, function()
      if not sent_at and #server:requests() > 0 then sent_at = now end
      now = now + 0.05
      return sent_at ~= nil or now > t0 + 6
    end)
    local reqs = server:requests()
    assert.equal(1, #reqs)
    assert.matches('"ext_interaction_id":"1"', reqs[1].body)
    -- in the ledger: decided queued/scheduled at t0, sent at the flush that found it due
    local sent = assert(s:ledger{ status = "sent" })
    assert.equal(1, #sent)
    assert.is_true(sent[1].time >= t0 + 3, "sent at " .. (sent[1].time - t0) .. " s")
    assert.is_true(sent[1].time <= t0 + 3 + 1.15, "sent at " .. (sent[1].time - t0) .. " s")
    assert.is_true(sent_at >= t0 + 3, "received at " .. (sent_at - t0) .. " s")
    local queued = assert(s:ledger{ status = "queued" })
    assert.equal("scheduled", queued[1].reason)
    assert.is_true(queued[1].time < t0 + 1)   -- decided in the first round
    assert.matches("will send at " .. iso(t0 + 3), queued[1].detail, 1, true)
    assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
    assert.equal(0, assert(q:status()).pending)
  end)

  it("holds a request in quiet hours until their end across New York's spring change, on a fixed clock", function()
    -- 2027-03-13 23:30 EST (UTC-5); the night ends at 08:00 EDT (UTC-4), 12:00Z, not 13:00Z.
    -- (2027, not a past date: the store's marks expire on Redis's own clock.)
    local now = T"2027-03-14T04:30:00Z"
    local clock = function() return now end
    local q, s, t = setup({ map = map, suppression = { days = 7 },
                            quiet_hours = { from = "21:00", to = "08:00", zone_field = "tz",
                                            fallback_zone = "America/New_York" } }, clock)
    assert(q:submit{ id = "2", tz = "America/New_York", email = "night@example.com" })
    -- the worker's rounds on a clock standing still: stop once `done()` or after 50 looks
    local function rounds(done, on_batch)
      local looks = 0
      run(q, t, clock, function()
        looks = looks + 1
        return done() or looks > 50
      end, on_batch)
    end
    local outcomes = {}
    rounds(function() return outcomes["queued/scheduled"] ~= nil end,
           function(report) for k, n in pairs(report.outcomes) do outcomes[k] = n end end)
    assert.same({ ["queued/scheduled"] = 1 }, outcomes)
    local queued = assert(s:ledger{ status = "queued" })
    assert.equal(1, #queued)
    assert.equal("scheduled", queued[1].reason)
    assert.equal("will send at 2027-03-14T12:00:00Z (quiet hours 21:00-08:00 in America/New_York: "
                 .. "at their end, 2027-03-14T08:00:00-04:00)", queued[1].detail)
    assert.equal(0, assert(q:status()).pending)
    -- 07:59:59 EDT: the worker's flush finds nothing due
    now = T"2027-03-14T11:59:59Z"
    rounds(function() return #server:requests() > 0 end)
    assert.equal(0, #server:requests())
    assert.equal(1, s:outbox_counts().queued)
    -- 08:00 EDT: sent, once
    now = T"2027-03-14T12:00:00Z"
    rounds(function() return #server:requests() > 0 end)
    local reqs = server:requests()
    assert.equal(1, #reqs)
    assert.matches('"ext_interaction_id":"2"', reqs[1].body)
    assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
    local sent = assert(s:ledger{ status = "sent" })
    assert.equal(1, #sent)
    assert.equal(T"2027-03-14T12:00:00Z", sent[1].time)
  end)
end)
