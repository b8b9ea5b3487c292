-- Specs for stella.trigger: events through the rules, the store and a real client to the
-- loopback test server, with a controlled clock, on both stores (memory and SQLite in a
-- temporary file); then what only SQLite can show: other processes, the file's bytes
-- and a child process killed with SIGKILL in the middle of its work.
local stella = require "stella"
local store_mod = require "stella.store"
local testserver = require "support.testserver"
local socket = require "socket"

local SPEC_DIR = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./")
local RULES = SPEC_DIR .. "support/trigger_rules.lua"
local ONCE = SPEC_DIR .. "support/trigger_once.lua"
local CRASH = SPEC_DIR .. "support/trigger_crash.lua"
local LUA = os.getenv("STELLA_TEST_LUA") or (rawget(_G, "jit") and "luajit" or "lua5.4")

local T0 = 1700000000
local DAY = 86400
local API_KEY = "tk_trigger_spec_0123SECRET"
local JANE = "jane.customer@example.com"

local child = require "support.child"
local quote, CHILD_ENV, read_file, remove_db = child.quote, child.ENV, child.read_file, child.remove_db

-- The rules file as a table, with some settings changed.
local function rules_with(changes)
  local r = dofile(RULES)
  for k, v in pairs(changes or {}) do r[k] = v end
  return r
end

-- Active marks in a store (reading the backend's own tables: the interface has no
-- listing on purpose).
local function mark_count(s, now)
  local b = s.backend
  if b.db then   -- SQLite, through LuaDBI
    local sth = assert(b.db:prepare("SELECT COUNT(*) FROM marks WHERE until_at > ?"))
    assert(sth:execute(now))
    local n = sth:fetch(false)[1]
    sth:close()
    return tonumber(n)
  end
  local n = 0
  for _, m in pairs(b.marks) do if m["until"] > now then n = n + 1 end end
  return n
end

-- Wire requests per ext_interaction_id (taken from the JSON body).
local function per_interaction(reqs)
  local counts = {}
  for _, r in ipairs(reqs) do
    local id = r.body:match('"ext_interaction_id":"([^"]*)"')
    if id then counts[id] = (counts[id] or 0) + 1 end
  end
  return counts
end

-- Ledger entries of one event, oldest first.
local function ledger_of(s, event_id)
  local list = {}
  local all = assert(s:ledger{ limit = 10000 })
  for i = #all, 1, -1 do
    if all[i].event_id == event_id then list[#list + 1] = all[i] end
  end
  return list
end

local function statuses(entries)
  local list = {}
  for i, e in ipairs(entries) do list[i] = e.status .. "/" .. tostring(e.reason) end
  return list
end

describe("stella.trigger", function()
  local server

  lazy_setup(function() server = testserver.start() end)
  lazy_teardown(function() if server then server:stop() end end)
  before_each(function() server:reset() end)

  local function client_options(over)
    local o = { api_key = API_KEY, base_url = server.url, timeout = 5,
                retry = { attempts = 2, base_delay = 0.001 }, sleep = function() end }
    for k, v in pairs(over or {}) do o[k] = v end
    return o
  end

  for _, backend in ipairs{ "memory", "sqlite" } do
    describe(backend .. " store", function()
      local now, s, path, triggers

      local function trigger(opts)
        opts = opts or {}
        opts.rules = opts.rules or RULES
        opts.store = opts.store or s
        opts.clock = opts.clock or function() return now end
        opts.random = opts.random or function() return 0.5 end
        if opts.client == nil then opts.client = client_options() end
        local t = stella.trigger(opts)
        triggers[#triggers + 1] = t
        return t
      end

      before_each(function()
        now = T0
        triggers = {}
        if backend == "sqlite" then
          path = os.tmpname()
          s = assert(store_mod.sqlite(path))
        else
          s = assert(store_mod.memory())
        end
      end)

      after_each(function()
        for _, t in ipairs(triggers) do t:close() end
        s:close()
        if path then remove_db(path) end
        path = nil
      end)

      it("sends an eligible event: request_id from the server, encoded mapped request on the wire", function()
        local t = trigger()
        local out = t:process{ ticket = 1001, email = JANE }
        assert.equal("sent", out.status)
        assert.is_nil(out.reason)
        assert.equal("req-1", out.request_id)
        assert.equal("1001", out.event_id)
        assert.equal("1001", out.interaction_id)
        local reqs = server:requests()
        assert.equal(1, #reqs)
        assert.equal("/v1/requests", reqs[1].path)
        assert.equal(API_KEY, reqs[1].headers["x-api-key"])
        assert.equal(stella.encode(out.request), reqs[1].body)
        assert.equal('{"customer":{"name":"Jane Doe","email":"' .. JANE .. '"},' ..
                     '"employee":{"email":"paulagent@blancapeak.com"},"channel":"phone",' ..
                     '"ext_interaction_id":"1001"}', reqs[1].body)
        local ledger = s:ledger()
        assert.equal(1, #ledger)
        assert.same({ time = T0, status = "sent", event_id = "1001", interaction_id = "1001",
                      channel = "phone", request_id = "req-1", attempts = 1,
                      customer_hash = s:hash_email(JANE) }, ledger[1])
        assert.equal(2, mark_count(s, now))   -- once + suppression, confirmed
        assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
      end)

      it("records a do_not_send request: sent with do_not_send, status recorded, no suppression", function()
        local t = trigger()
        local out = t:process{ ticket = 1002, email = JANE, tags = { "vip-no-survey" } }
        assert.equal("recorded", out.status)
        assert.equal("do_not_send_tag", out.reason)
        local reqs = server:requests()
        assert.equal(1, #reqs)
        assert.truthy(reqs[1].body:find('"do_not_send":true', 1, true))
        assert.equal(stella.encode(out.request), reqs[1].body)
        assert.same({ "recorded/do_not_send_tag" }, statuses(s:ledger()))
        assert.equal(1, mark_count(s, now))   -- the once mark only
        -- it neither is suppressed nor suppresses: the customer is still reachable
        assert.equal("sent", t:process{ ticket = 1003, email = JANE }.status)
        assert.equal("duplicate", t:process{ ticket = 1002, email = JANE }.reason)
      end)

      it("ledgers skipped and invalid events with their reason, with no marks and nothing on the wire", function()
        local t = trigger()
        local cases = {
          { { ticket = 1, email = JANE, tags = { "spam" } }, "skipped", "excluded_tag" },
          { { ticket = 2, email = JANE, channel = "email" }, "skipped", "channel_manual" },
          { { ticket = 3, email = JANE, channel = "sms" }, "skipped", "channel_disabled" },
          { { ticket = 4, email = "not an address" }, "invalid", "invalid_request" },
          { { id = 5, email = JANE, boom = true }, "invalid", "map_error" },   -- no request: event.id
        }
        for _, c in ipairs(cases) do
          local out = t:process(c[1])
          assert.equal(c[2], out.status, c[3])
          assert.equal(c[3], out.reason)
          assert.truthy(out.detail)
        end
        assert.truthy(t:process{ ticket = 4, email = "not an address" }.detail:find("customer.email", 1, true))
        assert.same({}, server:requests())
        assert.equal(0, mark_count(s, now))
        assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
        local ledger = s:ledger{ limit = 100 }
        assert.equal(#cases + 1, #ledger)
        for i, c in ipairs(cases) do
          local e = ledger[#ledger - i + 1]   -- newest first
          assert.equal(c[2], e.status)
          assert.equal(c[3], e.reason)
          assert.equal(tostring(c[1].ticket or c[1].id), e.event_id)
          assert.truthy(e.detail)
        end
        -- the same customer can be sent right after all of that
        assert.equal("sent", t:process{ ticket = 6, email = JANE }.status)
      end)

      it("ledgers a suppressed event with until, adds no marks and sends nothing", function()
        local t = trigger()
        assert.equal("sent", t:process{ ticket = 1, email = JANE }.status)
        now = T0 + 2 * DAY
        local marks = mark_count(s, now)
        local out = t:process{ ticket = 2, email = "Jane.Customer@EXAMPLE.com" }
        assert.equal("suppressed", out.status)
        assert.equal("suppressed", out.reason)
        assert.equal(T0 + 7 * DAY, out["until"])
        assert.equal(1, #server:requests())
        assert.equal(marks, mark_count(s, now))
        local e = s:ledger()[1]
        assert.equal("suppressed", e.status)
        assert.equal("2", e.event_id)
        assert.equal(s:hash_email(JANE), e.customer_hash)
      end)

      it("lifts suppression after the window", function()
        local t = trigger()
        assert.equal("sent", t:process{ ticket = 1, email = JANE }.status)
        now = T0 + 7 * DAY - 1
        assert.equal("suppressed", t:process{ ticket = 2, email = JANE }.status)
        now = T0 + 7 * DAY
        local out = t:process{ ticket = 2, email = JANE }   -- a suppressed event left no once mark
        assert.equal("sent", out.status)
        assert.equal("suppressed", t:process{ ticket = 3, email = JANE }.status)
        assert.equal(2, #server:requests())
      end)

      it("sends one request per interaction, also from a second trigger on the same store", function()
        local a, b = trigger(), trigger()
        assert.equal("sent", a:process{ ticket = 77, email = JANE }.status)
        local out = b:process{ ticket = 77, email = "someone.else@example.com" }
        assert.equal("skipped", out.status)
        assert.equal("duplicate", out.reason)
        assert.equal("duplicate", a:process{ ticket = "77", email = JANE }.reason)
        assert.equal(1, #server:requests())
      end)

      it("commits no marks for a rejected request (400): failed, and the customer can be sent again", function()
        server:script{ { status = 400, body = "Invalid customer" } }
        local t = trigger()
        local out = t:process{ ticket = 10, email = JANE }
        assert.equal("failed", out.status)
        assert.equal("rejected", out.reason)
        assert.equal("rejected", out.error.kind)
        assert.truthy(out.detail:find("Invalid customer", 1, true))
        assert.equal(0, mark_count(s, now))
        assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
        local e = s:ledger()[1]
        assert.equal("failed", e.status)
        assert.equal("rejected", e.error_kind)
        assert.truthy(e.error_message:find("HTTP 400", 1, true))
        out = t:process{ ticket = 10, email = JANE }
        assert.equal("sent", out.status)
        assert.equal("req-2", out.request_id)
        assert.equal(2, #server:requests())
      end)

      it("queues a request after the client's retries fail (503), keeps its marks, and flush() sends it once", function()
        server:script{ { status = 503 }, { status = 503 } }
        local t = trigger()
        local out = t:process{ ticket = 20, email = JANE }
        assert.equal("queued", out.status)
        assert.equal("server", out.reason)
        assert.equal(2, out.attempts)                -- the client tried twice
        assert.equal(T0 + 45, out.next_at)           -- 60 s backoff, half of it jittered (random 0.5)
        assert.equal(2, #server:requests())
        assert.equal(2, mark_count(s, now))          -- reserved by the queued item
        assert.same({ queued = 1, dead = 0 }, s:outbox_counts())
        -- the marks hold while it waits
        assert.equal("suppressed", t:process{ ticket = 21, email = JANE }.status)
        assert.equal("duplicate", t:process{ ticket = 20, email = JANE }.reason)
        -- not due yet
        assert.same({ sent = 0, recorded = 0, queued = 0, failed = 0, dead = 0 }, t:flush())
        assert.equal(2, #server:requests())
        now = T0 + 60
        assert.same({ sent = 1, recorded = 0, queued = 0, failed = 0, dead = 0 }, t:flush())
        local reqs = server:requests()
        assert.equal(3, #reqs)
        assert.equal(reqs[1].body, reqs[3].body)
        assert.same({ sent = 0, recorded = 0, queued = 0, failed = 0, dead = 0 }, t:flush())
        now = T0 + DAY
        assert.same({ sent = 0, recorded = 0, queued = 0, failed = 0, dead = 0 }, t:flush())
        assert.equal(3, #server:requests())
        assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
        local entries = ledger_of(s, "20")
        assert.same({ "queued/server", "skipped/duplicate", "sent/outbox" }, statuses(entries))
        assert.equal("req-3", entries[3].request_id)
        assert.equal(s:hash_email(JANE), entries[3].customer_hash)
        -- confirmed: still suppressed, still a duplicate
        assert.equal(2, mark_count(s, now))
        assert.equal("suppressed", t:process{ ticket = 22, email = JANE }.status)
      end)

      it("gives up after outbox.max_attempts: dead with the last error, marks released", function()
        server:script{ { status = 503 }, { status = 503, body = "still down" } }
        local t = trigger{ outbox = { max_attempts = 2 }, client = client_options{ retry = { attempts = 1 } } }
        assert.equal("queued", t:process{ ticket = 30, email = JANE }.status)
        now = T0 + 3600
        local summary = t:flush()
        assert.same({ sent = 0, recorded = 0, queued = 0, failed = 1, dead = 1 }, summary)
        local dead = s:outbox("dead")
        assert.equal(1, #dead)
        assert.equal("30", dead[1].event_id)
        assert.truthy(dead[1].last_error:find("HTTP 503", 1, true))
        assert.truthy(dead[1].last_error:find("still down", 1, true))
        assert.equal(now, dead[1].died_at)
        assert.equal(2, dead[1].attempts)   -- both tries, the one that gave up included
        assert.equal(0, mark_count(s, now))
        local entries = ledger_of(s, "30")
        assert.same({ "queued/server", "failed/dead" }, statuses(entries))
        assert.truthy(entries[2].error_message:find("still down", 1, true))
        -- released: the same interaction and customer go through now
        assert.equal("sent", t:process{ ticket = 30, email = JANE }.status)
      end)

      it("gives up after outbox.max_age: dead, marks released", function()
        server:script{ { status = 503 }, { status = 502 } }
        local t = trigger{ outbox = { max_age = 600 }, client = client_options{ retry = { attempts = 1 } } }
        assert.equal("queued", t:process{ ticket = 31, email = JANE }.status)
        now = T0 + 700
        assert.same({ sent = 0, recorded = 0, queued = 0, failed = 1, dead = 1 }, t:flush())
        local dead = s:outbox("dead")
        assert.equal(1, #dead)
        assert.truthy(dead[1].last_error:find("HTTP 502", 1, true))
        assert.equal(0, mark_count(s, now))
        assert.equal("sent", t:process{ ticket = 32, email = JANE }.status)
      end)

      it("dry_run returns statuses but sends and writes nothing", function()
        local t = trigger{ dry_run = true }
        local out = t:process{ ticket = 40, email = JANE }
        assert.equal("sent", out.status)
        assert.is_true(out.dry_run)
        assert.is_nil(out.request_id)
        -- what it would have sent counts for the rest of its run, as in a real run
        out = t:process{ ticket = 40, email = "someone.else@example.com" }
        assert.equal("skipped", out.status)
        assert.equal("duplicate", out.reason)
        out = t:process{ ticket = 41, email = " Jane.Customer@EXAMPLE.com" }
        assert.equal("suppressed", out.status)
        assert.equal(T0 + 7 * DAY, out["until"])
        assert.equal("recorded", t:process{ ticket = 42, email = "vip@example.com", tags = { "vip-no-survey" } }.status)
        assert.equal("skipped", t:process{ ticket = 43, email = JANE, tags = { "spam" } }.status)
        assert.equal("invalid", t:process{ ticket = 44, email = "nope" }.status)
        assert.same({ sent = 0, recorded = 0, queued = 0, failed = 0, dead = 0 }, t:flush())
        assert.same({}, server:requests())
        assert.same({}, s:ledger())
        assert.equal(0, mark_count(s, now))
        assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
        assert.same({ sent = 1, recorded = 1, skipped = 2, suppressed = 1, invalid = 1 }, t:stats().counts)
        -- and within one batch, as a real batch does
        local outs = trigger{ dry_run = true }:process_many{
          { ticket = 60, email = "a@example.com" }, { ticket = 61, email = "a@example.com" },
          { ticket = 60, email = "b@example.com" }, { ticket = 62, email = "b@example.com" },
        }
        assert.same({ "sent", "suppressed", "skipped", "sent" },
                    { outs[1].status, outs[2].status, outs[3].status, outs[4].status })
        -- nothing was written: another trigger on the store sends
        assert.equal("sent", trigger():process{ ticket = 40, email = JANE }.status)
        assert.equal(1, #server:requests())
      end)

      it("suppresses and dedupes within one batch as across batches, and reports as a dry run would", function()
        local events = {
          { ticket = 70, email = "a@example.com" },
          { ticket = 71, email = "A@example.com " },            -- same customer: suppressed
          { ticket = 70, email = "b@example.com" },              -- same interaction: duplicate
          { ticket = 72, email = "b@example.com", tags = { "vip-no-survey" } },   -- recorded
          { ticket = 73, email = "b@example.com" },              -- recorded marks no suppression
          { ticket = 74, email = "c@example.com", tags = { "spam" } },
          { ticket = 75, email = "c@example.com" },
        }
        local function statuses_of(outs)
          local list = {}
          for i, o in ipairs(outs) do list[i] = o.status .. "/" .. tostring(o.reason) end
          return list
        end
        local dry = statuses_of(trigger{ dry_run = true }:process_many(events))
        local real = statuses_of(trigger():process_many(events))
        assert.same({ "sent/nil", "suppressed/suppressed", "skipped/duplicate", "recorded/do_not_send_tag",
                      "sent/nil", "skipped/excluded_tag", "sent/nil" }, real)
        assert.same(real, dry)
        assert.equal(4, #server:requests())
        -- one outbox item per request, all settled; marks confirmed, none left reserved
        assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
        local until_, reserved = s:get_mark("once|brand:|70", now)
        assert.truthy(until_)
        assert.is_nil(reserved)
        until_, reserved = s:get_mark("suppress|brand:|" .. s:hash_email("a@example.com"), now)
        assert.equal(now + 7 * DAY, until_)
        assert.is_nil(reserved)
        assert.equal(7, #s:ledger())
        -- a second batch sees the first one's marks in the store
        assert.same({ "suppressed/suppressed", "skipped/duplicate" },
                    statuses_of(trigger():process_many{ { ticket = 76, email = "a@example.com" },
                                                        { ticket = 75, email = "d@example.com" } }))
      end)

      it("explain returns every verdict, validate included, and writes nothing", function()
        local t = trigger()
        local out = t:explain{ ticket = 50, email = JANE }
        assert.equal("sent", out.status)
        local rules = {}
        for _, v in ipairs(out.verdicts) do rules[#rules + 1] = v.rule .. "=" .. v.verdict end
        assert.same({ "map=pass", "channels=pass", "exclude_tags=pass", "unsubscribes=pass",
                      "once_per_interaction=pass",
                      "do_not_send_tags=pass", "suppression=pass", "validate=pass" }, rules)
        out = t:explain{ ticket = 51, email = "not an address", tags = { "spam" } }
        assert.equal("skipped", out.status)   -- the first non-pass decides
        assert.equal("excluded_tag", out.reason)
        out = t:explain{ ticket = 52, email = "not an address" }
        assert.equal("invalid", out.status)
        assert.equal("invalid_request", out.reason)
        local last = out.verdicts[#out.verdicts]
        assert.equal("validate", last.rule)
        assert.equal("invalid", last.verdict)
        assert.truthy(last.detail:find("customer.email", 1, true))
        assert.same({}, server:requests())
        assert.same({}, s:ledger())
        assert.equal(0, mark_count(s, now))
        -- after a real send, explain shows why the next one would not go
        assert.equal("sent", t:process{ ticket = 50, email = JANE }.status)
        out = t:explain{ ticket = 50, email = JANE }
        assert.equal("skipped", out.status)
        assert.equal("duplicate", out.reason)
        local seen = {}
        for _, v in ipairs(out.verdicts) do seen[v.rule] = v.verdict end
        assert.equal("suppressed", seen.suppression)
        assert.equal(1, #s:ledger())
      end)

      it("routes each brand to its own api_key", function()
        local rules = rules_with{
          brands = { acme = { api_key = "key-acme" }, beta = { api_key = "key-beta", signifier = "BETA-1" },
                     plain = {} },
          default_brand = "plain",
        }
        local t = trigger{ rules = rules }
        local i = 0
        local function send(brand)
          i = i + 1
          return t:process{ ticket = 60 + i, email = ("c%d@example.com"):format(i), brand = brand }
        end
        assert.equal("sent", send("acme").status)
        assert.equal("sent", send("beta").status)
        assert.equal("sent", send("plain").status)
        assert.equal("sent", send(nil).status)
        assert.equal("sent", send("acme").status)
        local out = send("gamma")
        assert.equal("skipped", out.status)
        assert.equal("unknown_brand", out.reason)
        local reqs = server:requests()
        assert.equal(5, #reqs)
        local keys, brands = {}, {}
        for k, r in ipairs(reqs) do
          keys[k] = r.headers["x-api-key"]
          brands[k] = r.body:match('"brand":"([^"]*)"')
        end
        assert.same({ "key-acme", "key-beta", API_KEY, API_KEY, "key-acme" }, keys)
        assert.same({ "acme", "BETA-1", "plain", "plain", "acme" }, brands)
        -- given a client object instead of options, a brand's client goes to the same host
        local c = stella.new(client_options())
        local t2 = trigger{ rules = rules, client = c }
        server:reset()
        assert.equal("sent", t2:process{ ticket = 70, email = "d@example.com", brand = "acme" }.status)
        assert.equal("sent", t2:process{ ticket = 71, email = "e@example.com" }.status)
        reqs = server:requests()
        assert.equal("key-acme", reqs[1].headers["x-api-key"])
        assert.equal(API_KEY, reqs[2].headers["x-api-key"])
        c:close()
      end)

      it("counts outcomes in stats() by status and by status/reason", function()
        server:script{ { status = 400 } }
        local t = trigger{ client = client_options{ retry = { attempts = 1 } } }
        t:process{ ticket = 80, email = "a@example.com" }                             -- failed/rejected
        t:process{ ticket = 81, email = JANE }                                        -- sent
        t:process{ ticket = 82, email = JANE }                                        -- suppressed
        t:process{ ticket = 81, email = "b@example.com" }                             -- duplicate
        t:process{ ticket = 83, email = "c@example.com", tags = { "spam" } }          -- excluded
        t:process{ ticket = 84, email = "d@example.com", tags = { "vip-no-survey" } } -- recorded
        t:process{ ticket = 85, boom = true }                                         -- map_error
        local st = t:stats()
        assert.same({ failed = 1, sent = 1, suppressed = 1, skipped = 2, recorded = 1, invalid = 1 }, st.counts)
        assert.same({
          ["failed/rejected"] = 1, ["sent/"] = 1, ["suppressed/suppressed"] = 1,
          ["skipped/duplicate"] = 1, ["skipped/excluded_tag"] = 1,
          ["recorded/do_not_send_tag"] = 1, ["invalid/map_error"] = 1,
        }, st.reasons)
        -- a copy: changing it changes nothing
        st.counts.sent = 99
        assert.equal(1, t:stats().counts.sent)
      end)

      it("calls on_alert once when over 5% of at least min_sends sends fail in the hour", function()
        local alerts = {}
        local t = trigger{
          alert = { min_sends = 5, check_every = 0 },
          on_alert = function(info) alerts[#alerts + 1] = info end,
          client = client_options{ retry = { attempts = 1 } },
        }
        local n = 0
        local function ok()
          n = n + 1
          assert.equal("sent", t:process{ ticket = 9000 + n, email = ("ok%d@example.com"):format(n) }.status)
        end
        local function fail()
          n = n + 1
          server:script{ { status = 400 } }
          assert.equal("failed", t:process{ ticket = 9000 + n, email = ("f%d@example.com"):format(n) }.status)
        end
        fail()                          -- 1 of 1: fewer than min_sends, no alert
        for _ = 1, 3 do ok() end
        assert.equal(0, #alerts)
        fail()                          -- 2 of 5
        assert.equal(1, #alerts)
        assert.same({ rate = 2 / 5, errors = 2, total = 5, threshold = 0.05, window = 3600, time = T0 },
                    alerts[1])
        now = T0 + 1800
        fail()                          -- still within the hour: no second alert
        assert.equal(1, #alerts)
        -- an hour after that, all of it is out of the window: 1 failure in 25 (4%) is fine ...
        now = T0 + 1800 + 3601
        for _ = 1, 24 do ok() end
        fail()
        assert.equal(1, #alerts)
        -- ... 2 in 26 (7.7%) is not, and the last alert is more than an hour old
        now = T0 + 5500
        fail()
        assert.equal(2, #alerts)
        assert.equal(2, alerts[2].errors)
        assert.equal(26, alerts[2].total)
        assert.equal(T0 + 5500, alerts[2].time)
        assert.equal(tostring(T0 + 5500), s:get_meta("last_alert"))
      end)

      it("calls on_alert when sends keep failing and go to the outbox (an outage queues, not fails)", function()
        local alerts = {}
        local t = trigger{
          alert = { min_sends = 5, check_every = 0 },
          on_alert = function(info) alerts[#alerts + 1] = info end,
          client = client_options{ retry = { attempts = 1 } },
        }
        for i = 1, 4 do
          assert.equal("sent", t:process{ ticket = 9100 + i, email = ("ok%d@example.com"):format(i) }.status)
        end
        assert.equal(0, #alerts)
        server:script{ { status = 503 } }
        local out = t:process{ ticket = 9105, email = "down@example.com" }
        assert.equal("queued", out.status)
        assert.equal(1, #alerts)
        assert.same({ rate = 1 / 5, errors = 1, total = 5 },
                    { rate = alerts[1].rate, errors = alerts[1].errors, total = alerts[1].total })
      end)

      it("keeps customer hashes, never the address, in the ledger", function()
        server:script{ { status = 503 }, { status = 503 } }
        local t = trigger()
        t:process{ ticket = 1, email = JANE }                              -- queued
        t:process{ ticket = 2, email = JANE }                              -- suppressed
        t:process{ ticket = 3, email = "Bob@Example.com", tags = { "spam" } } -- skipped
        t:process{ ticket = 4, email = "carol@example.com" }               -- sent
        now = T0 + 3600
        t:flush()                                                          -- 1: sent
        local entries = s:ledger{ limit = 100 }
        assert.equal(5, #entries)
        local hashes = { [s:hash_email(JANE)] = true, [s:hash_email("bob@example.com")] = true,
                         [s:hash_email("carol@example.com")] = true }
        for _, e in ipairs(entries) do
          assert.truthy(hashes[e.customer_hash], e.status .. " has no known customer_hash")
          for k, v in pairs(e) do
            local text = tostring(v):lower()
            assert.is_nil(text:find("@example.com", 1, true), k .. " holds an address: " .. text)
          end
        end
      end)
    end)
  end

  describe("sqlite only", function()
    local paths, now

    local function new_path()
      local p = os.tmpname()
      paths[#paths + 1] = p
      return p
    end

    before_each(function()
      paths, now = {}, T0
    end)
    after_each(function()
      for _, p in ipairs(paths) do remove_db(p); os.remove(p .. ".log") end
    end)

    local function trigger(s, opts)
      opts = opts or {}
      opts.rules, opts.store = opts.rules or RULES, s
      opts.clock = function() return now end
      opts.client = opts.client or client_options()
      return stella.trigger(opts)
    end

    local function run(cmd)
      local p = io.popen(cmd .. " 2>&1", "r")
      local out = p:read("*a")
      p:close()
      return out
    end

    it("sends one request per interaction across processes", function()
      local p = new_path()
      local function child(ticket, email)
        return run(CHILD_ENV .. table.concat({ LUA, quote(ONCE), quote(p), quote(server.url), tostring(T0), tostring(ticket),
                                  quote(email), quote(RULES) }, " "))
      end
      assert.equal("sent nil\n", child(501, JANE))
      local s = assert(store_mod.sqlite(p))
      local t = trigger(s)
      local out = t:process{ ticket = 501, email = JANE }
      assert.equal("skipped", out.status)
      assert.equal("duplicate", out.reason)
      assert.equal("sent", t:process{ ticket = 502, email = "bob@example.com" }.status)
      assert.equal("skipped duplicate\n", child(502, "carol@example.com"))
      assert.equal("suppressed suppressed\n", child(503, "BOB@example.com"))
      local counts = per_interaction(server:requests())
      assert.same({ ["501"] = 1, ["502"] = 1 }, counts)
      t:close()
      s:close()
    end)

    it("never writes a customer's address in clear to the file once nothing for them is queued", function()
      local p = new_path()
      local s = assert(store_mod.sqlite(p))
      local t = trigger(s)
      local emails = { JANE, "bob.secret@example.com", "carol.secret@example.com", "dave.secret@example.com" }
      server:script{ { status = 400 }, { status = 503 }, { status = 503 } }
      assert.equal("failed", t:process{ ticket = 1, email = emails[3] }.status)
      assert.equal("queued", t:process{ ticket = 2, email = emails[4] }.status)
      assert.equal("sent", t:process{ ticket = 3, email = JANE }.status)
      assert.equal("suppressed", t:process{ ticket = 4, email = JANE }.status)
      assert.equal("skipped", t:process{ ticket = 5, email = emails[2], tags = { "spam" } }.status)
      local function bytes() return read_file(p) .. read_file(p .. "-wal") .. read_file(p .. "-shm") end
      -- the outbox keeps a queued request's body (it must be sent as it was), address and all
      assert.truthy(bytes():find(emails[4], 1, true))
      now = T0 + 3600
      assert.equal(1, t:flush().sent)
      t:close()
      s:close()   -- the last connection checkpoints the WAL into the file and removes it
      local all = bytes()
      assert.truthy(#all > 0)
      for _, email in ipairs(emails) do
        assert.is_nil(all:find(email, 1, true), email .. " is in the file")
        assert.is_nil(all:find(email:upper(), 1, true), email .. " is in the file")
      end
      s = assert(store_mod.sqlite(p))
      assert.truthy(all:find(s:hash_email(JANE), 1, true))   -- a check of the check
      for _, e in ipairs(s:ledger{ limit = 100 }) do
        assert.truthy(e.customer_hash, e.status)
      end
      s:close()
    end)

    it("keeps no sent customer's name or address in the -wal or the file while the store stays open", function()
      local p = new_path()
      local s = assert(store_mod.sqlite(p))
      local t = trigger(s, { outbox = { max_attempts = 2 } })
      local function bytes() return read_file(p) .. read_file(p .. "-wal") .. read_file(p .. "-shm") end
      local sent = { { "Ramona Wexley-Sent", "ramona.wexley@example.com" },
                     { "Tobias Quill-Sent", "tobias.quill@example.com" } }
      local queued = { "Odile Marchetti-Queued", "odile.marchetti@example.com" }
      server:script{ {}, {}, { status = 503 }, { status = 503 } }   -- (the client tries twice)
      local outcomes = t:process_many{
        { ticket = 11, name = sent[1][1], email = sent[1][2] },
        { ticket = 12, name = sent[2][1], email = sent[2][2] },
        { ticket = 13, name = queued[1], email = queued[2] },
      }
      assert.same({ "sent", "sent", "queued" }, { outcomes[1].status, outcomes[2].status, outcomes[3].status })
      local all = bytes()
      -- a check of the check: the queued request's body is kept, in clear, until it is sent
      assert.truthy(all:find(queued[2], 1, true))
      assert.truthy(all:find(queued[1], 1, true))
      for _, c in ipairs(sent) do
        assert.is_nil(all:find(c[1], 1, true), c[1] .. " is in the file or its WAL")
        assert.is_nil(all:find(c[2], 1, true), c[2] .. " is in the file or its WAL")
      end
      -- given up (dead): kept for inspection until the retention window has passed
      now = T0 + 3600
      server:script{ { status = 503 }, { status = 503 } }
      assert.equal(1, t:flush().dead)
      assert.truthy(bytes():find(queued[2], 1, true))
      now = T0 + 3600 + 91 * DAY
      assert.same({ ledger = 4, dead = 1, marks = 2 }, t:purge())
      all = bytes()
      assert.is_nil(all:find(queued[1], 1, true), "a purged dead item's body is in the file or its WAL")
      assert.is_nil(all:find(queued[2], 1, true), "a purged dead item's body is in the file or its WAL")
      assert.same({}, s:ledger())
      t:close()
      s:close()
    end)

    -- A child process works through events while the server takes 2 s to answer each;
    -- we kill it with SIGKILL while a request is in flight, then recover with flush() in
    -- a fresh trigger once the outbox lease has run out.
    it("loses no event and sends none twice after a kill -9 and a recovery flush", function()
      local p = new_path()
      local log = p .. ".log"
      local FIRST, COUNT = 7001, 6
      assert(store_mod.sqlite(p)):close()   -- schema in place before the child starts
      -- the first event's request fails at once (503: to the outbox); the rest take 2 s
      local script = { { status = 503 } }
      for i = 2, COUNT do script[i] = { delay = 2 } end
      server:script(script)

      local proc = assert(io.popen("echo $$; exec " .. CHILD_ENV .. table.concat({ LUA, quote(CRASH), quote(p),
        quote(server.url), tostring(T0), tostring(FIRST), tostring(COUNT), quote(log), quote(RULES) }, " ")
        .. " 2>&1", "r"))
      local pid = assert(tonumber(proc:read("*l")))
      -- wait until the third request is at the server (the first went to the outbox, the
      -- second was answered after 2 s, the third is waiting for its answer), then kill
      local deadline = socket.gettime() + 20
      local seen = 0
      repeat
        socket.sleep(0.02)
        seen = #server:requests()
      until seen >= 3 or socket.gettime() > deadline
      run("kill -9 " .. pid)
      local child_out = proc:read("*a")
      proc:close()
      assert.truthy(seen >= 3, "the child made only " .. seen .. " requests: " .. child_out .. read_file(log))

      local before = server:requests()
      server:reset()   -- drops the rest of the delayed script: the recovery gets prompt 200s

      -- what the child logged
      local started, done = {}, {}
      for line in read_file(log):gmatch("[^\n]+") do
        local ticket = line:match("^start (%d+)$")
        if ticket then started[#started + 1] = ticket end
        local dticket, status = line:match("^done (%d+) (%S+)")
        if dticket then done[dticket] = status end
        assert.is_nil(line:match("^error"), line)
        assert.is_nil(line:match("^finished"), "the child finished before the kill")
      end
      local in_flight = {}
      for _, ticket in ipairs(started) do
        if not done[ticket] then in_flight[#in_flight + 1] = ticket end
      end
      assert.equal(1, #in_flight)   -- killed while waiting for the server
      assert.equal("queued", done[tostring(FIRST)])

      -- recovery: a fresh trigger, past the lease (300 s) and the first item's backoff
      local s = assert(store_mod.sqlite(p))
      now = T0 + 3600
      local t = trigger(s, { client = client_options{ retry = { attempts = 1 } } })
      local summary = assert(t:flush())
      assert.equal(2, summary.sent)   -- the 503 one and the one in flight
      local after = server:requests()
      -- a second flush finds nothing more to send
      assert.same({ sent = 0, recorded = 0, queued = 0, failed = 0, dead = 0 }, t:flush())
      assert.equal(#after, #server:requests())

      local wire_before, wire_after = per_interaction(before), per_interaction(after)
      local queued, dead = {}, {}
      for _, it in ipairs(s:outbox("queued", 1000)) do queued[it.event_id] = true end
      for _, it in ipairs(s:outbox("dead", 1000)) do dead[it.event_id] = it end
      for _, ticket in ipairs(started) do
        local sent = 0
        for _, e in ipairs(ledger_of(s, ticket)) do
          if e.status == "sent" then sent = sent + 1 end
        end
        local states = (sent > 0 and 1 or 0) + (queued[ticket] and 1 or 0) + (dead[ticket] and 1 or 0)
        assert.equal(1, states, "ticket " .. ticket .. " is in " .. states .. " of sent/queued/dead")
        assert.truthy(sent <= 1, "ticket " .. ticket .. " ledgered as sent " .. sent .. " times")
        if dead[ticket] then assert.truthy(dead[ticket].last_error, "dead without a reason") end
        -- on the wire: what the child sent, plus at most one more from the recovery
        local b, a = wire_before[ticket] or 0, wire_after[ticket] or 0
        if done[ticket] == "sent" then
          assert.equal(1, b)
          assert.equal(0, a, "ticket " .. ticket .. " was sent again after it was sent")
        elseif done[ticket] == "queued" then
          assert.equal(1, b)   -- the 503
          assert.equal(1, a)
        else
          -- In flight at the kill: the request reached the server (it may even have been
          -- answered) but the child never recorded the outcome, so the outbox item was
          -- still queued under its lease and the recovery sent it again. Delivery is
          -- at-least-once: one duplicate for each event killed in flight, never more.
          assert.equal(1, b)
          assert.equal(1, a)
        end
      end
      -- events the child never started left no trace
      for ticket = FIRST + #started, FIRST + COUNT - 1 do
        assert.is_nil(wire_before[tostring(ticket)])
        assert.is_nil(wire_after[tostring(ticket)])
        assert.same({}, ledger_of(s, tostring(ticket)))
      end
      -- the in-flight event's marks were reserved by its outbox item and are now confirmed
      local out = t:process{ ticket = tonumber(in_flight[1]), email = "other@example.com" }
      assert.equal("duplicate", out.reason)
      out = t:process{ ticket = 7999, email = ("crash.customer.%s@example.com"):format(in_flight[1]) }
      assert.equal("suppressed", out.status)
      assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
      t:close()
      s:close()
    end)
  end)
end)

describe("stella.trigger batch lease", function()
  local stella = require "stella"
  -- A client whose every send takes 100 s of the trigger's clock: a slow API.
  local function slow_setup(store)
    local now = 1700000000
    local sent = {}
    local client = {
      post = function(_, _, body)
        now = now + 100
        sent[#sent + 1] = body
        return { status = 200, request_id = "r" .. #sent, attempts = 1 }
      end,
    }
    local trigger = stella.trigger{
      rules = {}, client = client, store = store, clock = function() return now end,
      outbox = { lease = 300 },
    }
    local function ev(i)
      return { customer = { name = "C" .. i, email = "c" .. i .. "@example.com" },
               employee = { email = "agent@example.com" }, channel = "phone",
               ext_interaction_id = "lease-" .. i }
    end
    return trigger, sent, ev
  end

  for _, kind in ipairs{ "memory", "sqlite" } do
    it("stops sending past half the lease and leaves the rest queued for flush (" .. kind .. ")", function()
      local path = kind == "sqlite" and os.tmpname() or nil
      local store = kind == "sqlite" and assert(stella.store.sqlite(path)) or stella.store.memory()
      local trigger, sent, ev = slow_setup(store)
      local outcomes = trigger:process_many{ ev(1), ev(2), ev(3), ev(4) }
      -- deadline = start + 150 s: sends at +100 and +200 happen (the check comes before
      -- each send), then the clock is past it
      assert.same({ "sent", "sent", "queued", "queued" },
        { outcomes[1].status, outcomes[2].status, outcomes[3].status, outcomes[4].status })
      assert.equal("deferred", outcomes[3].reason)
      assert.equal(2, #sent)
      assert.equal(2, store:outbox_counts().queued)
      local summary = trigger:flush()
      assert.equal(2, summary.sent)
      assert.equal(4, #sent)
      assert.equal(0, store:outbox_counts().queued)
      -- each interaction went out exactly once
      local seen = {}
      for _, body in ipairs(sent) do
        local id = body:match('"ext_interaction_id":"([^"]+)"')
        assert.is_nil(seen[id], "sent twice: " .. tostring(id))
        seen[id] = true
      end
      store:close()
      if path then for _, suffix in ipairs{ "", "-wal", "-shm" } do os.remove(path .. suffix) end end
    end)
  end
end)

describe("stella.trigger and a retryable store failure while deciding", function()
  local stella = require "stella"
  -- A memory store whose first mark write fails as another writer's race would (a
  -- retryable store error, everything rolled back), and which then holds the other
  -- writer's mark for the customer.
  local function racing_store(other_key_of)
    local s = stella.store.memory()
    local failed = false
    local real_write, real_put = s._write_values, s.put_mark_many
    local real_atomic, other = s.atomic, false
    local function race()
      failed, other = true, true
      return nil, store_mod.error("mark was taken by another worker", true)
    end
    -- the other writer's mark is committed by then (outside this store's rolled-back transaction)
    s.atomic = function(self, ...)
      local res = (function(...) return { n = select("#", ...), ... } end)(pcall(real_atomic, self, ...))
      if other then
        other = false
        assert(real_put(self, { { key = other_key_of(self), ["until"] = 1700000000 + 86400 } }))
      end
      if not res[1] then error(res[2], 0) end
      return (table.unpack or unpack)(res, 2, res.n)
    end
    if real_write then
      s._write_values = function(self, kind, ...)
        if kind == "put_mark" and not failed then return race(self) end
        return real_write(self, kind, ...)
      end
    end
    s.put_mark_many = function(self, ...)
      if not failed then return race(self) end
      return real_put(self, ...)
    end
    return s
  end

  it("decides the batch again: the loser is suppressed, not failed, and nothing is sent twice", function()
    local s = racing_store(function(self) return "suppress|brand:acme|" .. self:hash_email("jane@example.com") end)
    local sent = {}
    local t = stella.trigger{
      rules = { suppression = { days = 7, per = "brand" }, brands = { acme = {} }, default_brand = "acme" },
      store = s, clock = function() return 1700000000 end,
      client = { post = function(_, _, body) sent[#sent + 1] = body return { status = 200, request_id = "r", attempts = 1 } end },
    }
    local out = t:process{ customer = { name = "Jane", email = "jane@example.com" },
                           employee = { email = "agent@example.com" }, channel = "phone",
                           ext_interaction_id = "race-1" }
    assert.equal("suppressed", out.status)
    assert.equal(0, #sent)
    assert.equal(0, s:outbox_counts().queued)
  end)
end)

describe("stella.trigger event ids", function()
  local stella = require "stella"
  it("names an event whose map raised by its ext_interaction_id when it has no id", function()
    local s = stella.store.memory()
    local t = stella.trigger{ rules = { map = function() error("no requester", 0) end }, store = s,
                              client = { post = function() error("nothing is sent") end } }
    local out = t:process{ ext_interaction_id = "tk-77", customer = { email = "x@example.com" } }
    assert.equal("invalid", out.status)
    assert.equal("map_error", out.reason)
    assert.equal("tk-77", out.event_id)
    assert.equal("tk-77", s:ledger{ limit = 1 }[1].event_id)
    assert.is_nil(t:process{ customer = {} }.event_id)   -- nothing names it
  end)
end)

describe("stella.trigger and the rules budget", function()
  local stella = require "stella"
  local function ev(id, over)
    local e = { customer = { name = "Jane Doe", email = "c" .. id .. "@example.com" },
                employee = { email = "paulagent@blancapeak.com" }, channel = "phone",
                ext_interaction_id = id }
    for k, v in pairs(over or {}) do e[k] = v end
    return e
  end

  -- (each loop is written inside its rule: see the budget specs of stella.rules)
  local cases = {
    { "map", { map = function(e) while e.loop do end e.loop = nil return e end } },
    { "when", { when = function(e) while e.loop do end return true end } },
    { "rules[1]", { rules = { function(req) while req.loop do end req.loop = nil end } } },
  }
  for _, c in ipairs(cases) do
    it("fails the event whose " .. c[1] .. " never returns with rule_error; the batch goes on", function()
      local rules = { budget = { instructions = 100000 } }
      for k, v in pairs(c[2]) do rules[k] = v end
      local t = stella.trigger{ rules = rules, store = stella.store.memory(), dry_run = true }
      local outs = t:process_many{ ev(1), ev(2, { loop = true }), ev(3), ev(4) }
      local got = {}
      for i, o in ipairs(outs) do got[i] = o.status .. "/" .. tostring(o.reason) end
      assert.same({ "sent/nil", "invalid/rule_error", "sent/nil", "sent/nil" }, got)
      assert.truthy(outs[2].detail:find(c[1] .. " (", 1, true), outs[2].detail)
      assert.truthy(outs[2].detail:find("exceeded its budget of 100000 instructions", 1, true), outs[2].detail)
      assert.is_nil(debug.gethook())
      t:close()
    end)
  end
end)

describe("stella.trigger clients", function()
  local stella = require "stella"
  it("gives brands without keys of their own one shared client (one connection), others their own", function()
    local t = stella.trigger{
      rules = { brands = { a = {}, b = {}, k = { api_key = "key-k" } }, default_brand = "a" },
      store = stella.store.memory(),
      client = { api_key = "key-default", base_url = "http://127.0.0.1:9" },
    }
    local d = t:client_for(nil)
    assert.equal(d, t:client_for("a"))
    assert.equal(d, t:client_for("b"))
    assert.are_not.equal(d, t:client_for("k"))
    assert.equal(t:client_for("k"), t:client_for("k"))
    t:close()
  end)
end)

describe("stella.trigger rules", function()
  local stella = require "stella"
  local rules_mod = require "stella.rules"
  it("takes compiled rules (what stella.rules.load returns) as they are, not compiling them again", function()
    local compiled = assert(rules_mod.load{ channels = { phone = "integrated" } })
    assert.equal(compiled, rules_mod.load(compiled))
    local t = stella.trigger{ rules = compiled, store = stella.store.memory(), dry_run = true,
                              client = { post = function() error("nothing is sent") end } }
    assert.equal(compiled, t.rules)
    local out = t:process{ customer = { name = "Jane", email = "jane@example.com" },
                           employee = { email = "agent@example.com" }, channel = "chat",
                           ext_interaction_id = "c-1" }
    assert.equal("skipped", out.status)
    assert.equal("channel_disabled", out.reason)
  end)
end)

describe("stella.trigger retention", function()
  local stella = require "stella"
  local T0, DAY = 1700000000, 86400
  local now, s

  -- a trigger whose rules skip every event (a ledger entry each, nothing sent)
  local function trigger(rules, opts)
    rules = rules or {}
    rules.when = function() return false end
    opts = opts or {}
    opts.rules, opts.store, opts.clock = rules, s, function() return now end
    opts.client = { api_key = "key", base_url = "http://127.0.0.1:9" }
    return stella.trigger(opts)
  end

  local function times()
    local list = {}
    for i, e in ipairs(s:ledger{ limit = 1000 }) do list[i] = e.time end
    table.sort(list)
    return list
  end

  before_each(function()
    now, s = T0, stella.store.memory()
  end)

  it("keeps 90 days by default, purging by itself at the first batch and then every hour", function()
    local t = trigger()
    t:process{ id = 1 }
    now = T0 + 90 * DAY
    t:process{ id = 2 }   -- not older than 90 days: kept
    now = T0 + 90 * DAY + 1800
    t:process_many{ { id = 3 } }
    assert.same({ T0, T0 + 90 * DAY, T0 + 90 * DAY + 1800 }, times())
    now = T0 + 90 * DAY + 3600   -- an hour after the last purge: the first entry goes
    local p = t:pipeline(function() end)
    p:process{ { id = 4 } }
    p:finish()
    assert.same({ T0 + 90 * DAY, T0 + 90 * DAY + 1800, T0 + 90 * DAY + 3600 }, times())
    t:close()
  end)

  it("takes the window from the rules file, and the trigger's option over it", function()
    local t = trigger({ retention = { days = 10 } })
    t:process{ id = 1 }
    now = T0 + 10 * DAY + 1
    t:process{ id = 2 }
    assert.same({ T0 + 10 * DAY + 1 }, times())
    t:close()
    t = trigger({ retention = { days = 10 } }, { retention = { days = 20 } })
    now = T0 + 25 * DAY
    t:process{ id = 3 }
    assert.same({ T0 + 10 * DAY + 1, T0 + 25 * DAY }, times())
    t:close()
  end)

  it("purges on trigger:purge(), dead items and expired marks too; every = 0 only then", function()
    local t = trigger(nil, { retention = { days = 1, every = 0 } })
    t:process{ id = 1 }
    local dead = s:enqueue{ kind = "request", body = "{}", created_at = T0 }
    s:kill(dead, "gave up", T0)
    s:put_mark("m", T0 + 10)
    now = T0 + 2 * DAY
    t:process{ id = 2 }   -- never by itself
    assert.same({ T0, T0 + 2 * DAY }, times())
    assert.same({ ledger = 1, dead = 1, marks = 1 }, t:purge())
    assert.same({ T0 + 2 * DAY }, times())
    assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
    assert.same({ ledger = 1, dead = 0, marks = 0 }, t:purge(T0 + 4 * DAY))
    t:close()
  end)

  it("keeps everything with days = math.huge, and writes nothing on a dry run", function()
    local t = trigger({ retention = { days = math.huge } })
    t:process{ id = 1 }
    now = T0 + 10000 * DAY
    assert.same({ ledger = 0, dead = 0, marks = 0 }, t:purge())
    t:close()
    t = trigger(nil, { dry_run = true })
    assert.same({ ledger = 0, dead = 0, marks = 0 }, t:purge())
    assert.same({ T0 }, times())
    t:close()
  end)

  it("raises on a bad window", function()
    assert.has_error(function() trigger(nil, { retention = { days = 0 } }) end,
      "stella.trigger: retention.days must be a number of days above 0")
    assert.has_error(function() trigger(nil, { retention = { every = -1 } }) end,
      "stella.trigger: retention.every must be a number of seconds (0: only trigger:purge)")
    assert.has_error(function() trigger(nil, { retention = { weeks = 2 } }) end,
      "stella.trigger: retention.weeks is not a retention setting (days, every)")
    assert.has_error(function() trigger(nil, { retention = 90 }) end, "stella.trigger: retention must be a table")
    local ok, err = pcall(trigger, { retention = { days = "90" } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("retention.days must be a number of days above 0", 1, true), err)
    ok, err = pcall(trigger, { retention = { day = 90 } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("retention.day is not a retention setting (days)", 1, true), err)
    local t = trigger()
    assert.has_error(function() t:purge("now") end, "trigger:purge: now must be a finite number or nil")
    t:close()
  end)
end)

describe("the first batches ramp up", function()
  local stella = require "stella"
  local cli_trigger = require "stella.cli.trigger"
  local server
  lazy_setup(function() server = testserver.start() end)
  lazy_teardown(function() if server then server:stop() end end)

  local function take(next_size, n)
    local sizes = {}
    for i = 1, n do sizes[i] = next_size() end
    return sizes
  end

  it("stella trigger's batches: two events per connection (at least 8), doubling up to batch_size", function()
    assert.same({ 128, 256, 512, 1024, 2048, 2048 }, take(cli_trigger.batch_sizes(64), 6))
    assert.equal(2048, cli_trigger.batch_size(64))
    assert.same({ 8, 16, 32, 64, 128, 200, 200 }, take(cli_trigger.batch_sizes(1), 7))
    assert.same({ 16, 32, 64, 128, 256, 256 }, take(cli_trigger.batch_sizes(8), 6))
  end)

  it("flush() claims 2 items per connection first, each next claim twice the one before, and sends each once", function()
    local store = stella.store.memory()
    local rules = { map = function(e)
      return { customer = { name = "C" .. e.n, email = ("ramp%d@example.com"):format(e.n) },
               employee = { email = "agent@example.com" }, channel = "phone", ext_interaction_id = "ramp-" .. e.n }
    end, channels = { phone = "integrated" } }
    local client = { api_key = API_KEY, base_url = server.url, timeout = 5 }
    -- an outbox of 300 items: a trigger told to stop at once sends none of them
    local first = stella.trigger{ rules = rules, store = store, client = client, stop = function() return true end }
    local events = {}
    for i = 1, 300 do events[i] = { n = i } end
    first:process_many(events)
    first:close()
    assert.equal(300, store:outbox_counts().queued)
    assert.same({}, server:requests())

    local asked, real_claim = {}, store.claim
    store.claim = function(self, now, lease, n)
      asked[#asked + 1] = n
      return real_claim(self, now, lease, n)
    end
    local t = stella.trigger{ rules = rules, store = store, client = client, connections = 4 }
    local summary = assert(t:flush())
    t:close()
    -- 8 + 16 + 32 + 64 = 120, then the full size max(outbox batch 100, 32 x 4) = 128 twice
    -- (the second claim takes the last 52: less than asked, so the flush ends)
    assert.same({ 8, 16, 32, 64, 128, 128 }, asked)
    assert.equal(300, summary.sent)
    local seen, reqs = {}, server:requests()
    assert.equal(300, #reqs)
    for _, r in ipairs(reqs) do
      local id = r.body:match('"ext_interaction_id":"([^"]+)"')
      assert.is_nil(seen[id], "sent twice: " .. tostring(id))
      seen[id] = true
    end
    assert.equal(0, store:outbox_counts().queued)
  end)
end)
