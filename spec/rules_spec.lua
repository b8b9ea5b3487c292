-- Specs for stella.rules: pure evaluation against a fake environment (a fixed clock,
-- marks in a Lua table, an unsubscribe function), loading rules files with their restricted globals,
-- and the same code under plain Lua 5.1 with no C modules.
local rules = require "stella.rules"

local SPEC_DIR = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./")
local T0 = 1700000000   -- "now" in these specs: 2023-11-14T22:13:20Z
local DAY = 86400

-- The fake store behind env.lookup: marks keyed on type | scope | email-or-id.
local function mark_key(m)
  return m.type .. "|" .. m.scope .. "|" .. tostring(m.email or m.id)
end

local function env(opts)
  opts = opts or {}
  local e = { now = opts.now or T0, marks = opts.marks or {}, unsubscribed = opts.unsubscribed }
  e.lookup = function(m)
    local u = e.marks[mark_key(m)]
    if u and u > e.now then return u end
    return nil
  end
  return e
end

-- What a caller does once the request is sent: write the decision's marks.
local function commit(e, d)
  for _, m in ipairs(d.marks) do e.marks[mark_key(m)] = m["until"] end
end

local function event(over)
  local ev = {
    customer = { name = "Jane Doe", email = "jane@example.com" },
    employee = { email = "paulagent@blancapeak.com" },
    channel = "phone",
    ext_interaction_id = 1001,
  }
  for k, v in pairs(over or {}) do ev[k] = v end
  return ev
end

local function eval(spec, ev, e, explain)
  return rules.evaluate(rules.compile(spec), ev or event(), e or env(), explain)
end

local function compile_error(spec)
  local ok, err = pcall(rules.compile, spec)
  assert.is_false(ok, "expected a compile error")
  return tostring(err)
end

local function contains(haystack, needle)
  return type(haystack) == "string" and haystack:find(needle, 1, true) ~= nil
end

local function write_file(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

describe("stella.rules", function()
  describe("compile", function()
    it("rejects an unknown key, naming it", function()
      local err = compile_error{ chanels = { phone = "integrated" } }
      assert.truthy(contains(err, "unknown key 'chanels'"), err)
    end)

    it("rejects a key of the wrong type, naming it and the types", function()
      local err = compile_error{ map = "not a function" }
      assert.truthy(contains(err, "map must be a function, got string"), err)
      err = compile_error{ sample = "0.5" }
      assert.truthy(contains(err, "sample must be a number"), err)
      err = compile_error{ rules = { function() end, 42 } }
      assert.truthy(contains(err, "rules[2] must be a function"), err)
      err = compile_error{ exclude_tags = { 1, 2 } }
      assert.truthy(contains(err, "exclude_tags must be a list of strings"), err)
      err = compile_error{ brands = { acme = "x" } }
      assert.truthy(contains(err, "brands must map a brand name to a table"), err)
      err = compile_error{ suppression = { days = "7" } }
      assert.truthy(contains(err, "suppression.days"), err)
      err = compile_error{ suppression = { days = 7, per = "customer" } }
      assert.truthy(contains(err, "suppression.per"), err)
      err = compile_error("rules")
      assert.truthy(contains(err, "rules must be a table"), err)
    end)

    it("rejects a channel mode other than integrated or manual, naming the channel", function()
      local err = compile_error{ channels = { phone = "integrated", chat = "auto" } }
      assert.truthy(contains(err, "channels.chat"), err)
      assert.truthy(contains(err, "\"integrated\" or \"manual\""), err)
    end)

    it("rejects a default_brand that is not in brands", function()
      local err = compile_error{ brands = { acme = {} }, default_brand = "acme-es" }
      assert.truthy(contains(err, "default_brand 'acme-es' is not in brands"), err)
    end)

    it("rejects a brand field of the wrong type or range, naming the brand and field", function()
      local err = compile_error{ brands = { acme = { suppression_days = "7" } } }
      assert.truthy(contains(err, "brands.acme.suppression_days must be a number, got string"), err)
      err = compile_error{ brands = { acme = { suppression_days = -1 } } }
      assert.truthy(contains(err, "brands.acme.suppression_days must be a number of days"), err)
      err = compile_error{ brands = { acme = { suppression_days = 0 / 0 } } }
      assert.truthy(contains(err, "brands.acme.suppression_days"), err)
      err = compile_error{ brands = { acme = { language = 1 } } }
      assert.truthy(contains(err, "brands.acme.language must be a string"), err)
      err = compile_error{ brands = { acme = { keys = "k" } } }
      assert.truthy(contains(err, "brands.acme.keys must be a table"), err)
      err = compile_error{ brands = { acme = { mode = "live" } } }
      assert.truthy(contains(err, "brands.acme.mode must be \"test\" or \"production\""), err)
      assert.truthy(rules.compile{ brands = { acme = { suppression_days = 0, language = "en", mode = "test" } } })
    end)

    it("rejects a sample outside [0, 1]", function()
      assert.truthy(contains(compile_error{ sample = 1.5 }, "sample must be between 0 and 1"))
      assert.truthy(contains(compile_error{ sample = -0.1 }, "sample must be between 0 and 1"))
      assert.truthy(rules.compile{ sample = 0 })
      assert.truthy(rules.compile{ sample = 1 })
    end)

    it("accepts the keys the client and the trigger read", function()
      assert.truthy(rules.compile{ api_key = "k", mode = "test", base_url = "http://x",
                                   keys = {}, alert = {}, outbox = {}, on_alert = function() end })
    end)
  end)

  describe("map", function()
    it("defaults to a deep copy of the event", function()
      local ev = event{ tags = { "billing" }, brand = "acme" }
      local d = eval({ brands = { acme = { language = "en" } } }, ev)
      assert.equal("send", d.action)
      assert.same({ name = "Jane Doe", email = "jane@example.com" }, d.request.customer)
      assert.same({ "billing" }, d.request.tags)
      assert.are_not.equal(ev, d.request)
      assert.are_not.equal(ev.customer, d.request.customer)
      assert.are_not.equal(ev.tags, d.request.tags)
      -- what the rules add goes to the copy, never to the caller's event
      assert.equal("en", d.request.language)
      assert.is_nil(ev.language)
    end)

    it("uses map(event) as the request", function()
      local d = eval({ map = function(e) return { customer = e.who, channel = "chat" } end },
                     { who = { email = "x@example.com" } })
      assert.equal("send", d.action)
      assert.same({ customer = { email = "x@example.com" }, channel = "chat" }, d.request)
    end)

    it("gives invalid / map_error when map raises", function()
      local d = eval({ map = function() error("no requester on ticket", 0) end })
      assert.equal("invalid", d.action)
      assert.equal("map_error", d.reason)
      assert.truthy(contains(d.detail, "no requester on ticket"), d.detail)
      assert.same({}, d.marks)
    end)

    it("gives invalid / map_error when map returns something other than a table", function()
      local d = eval({ map = function() return "a request" end })
      assert.equal("invalid", d.action)
      assert.equal("map_error", d.reason)
      assert.truthy(contains(d.detail, "got string"), d.detail)
      d = eval({ map = function() end })
      assert.equal("map_error", d.reason)
      assert.truthy(contains(d.detail, "got nil"), d.detail)
    end)
  end)

  it("skips with not_eligible when `when` returns false, and is invalid when it raises", function()
    local spec = { when = function(e) return e.status == "solved" end }
    assert.equal("send", eval(spec, event{ status = "solved" }, nil).action)
    local d = eval(spec, event{ status = "open" })
    assert.equal("skip", d.action)
    assert.equal("not_eligible", d.reason)
    d = eval({ when = function() error("boom", 0) end })
    assert.equal("invalid", d.action)
    assert.equal("rule_error", d.reason)
    assert.truthy(contains(d.detail, "boom"))
  end)

  describe("channels", function()
    local spec = { channels = { phone = "integrated", email = "manual" } }

    it("sends on an integrated channel", function()
      assert.equal("send", eval(spec, event{ channel = "phone" }).action)
    end)

    it("skips a manual channel with channel_manual", function()
      local d = eval(spec, event{ channel = "email" })
      assert.equal("skip", d.action)
      assert.equal("channel_manual", d.reason)
    end)

    it("skips a channel the rules do not list with channel_disabled", function()
      local d = eval(spec, event{ channel = "chat" })
      assert.equal("skip", d.action)
      assert.equal("channel_disabled", d.reason)
      assert.equal("channel_disabled", eval(spec, event{ channel = false }).reason)
    end)

    it("lets any channel through when the rules list none", function()
      assert.equal("send", eval({}, event{ channel = "custom-sms" }).action)
    end)
  end)

  it("skips an event with an excluded tag", function()
    local spec = { exclude_tags = { "spam", "internal" } }
    local d = eval(spec, event{ tags = { "billing", "internal" } })
    assert.equal("skip", d.action)
    assert.equal("excluded_tag", d.reason)
    assert.truthy(contains(d.detail, "internal"))
    assert.equal("send", eval(spec, event{ tags = { "billing" } }).action)
    assert.equal("send", eval(spec, event()).action)
  end)

  describe("unsubscribes", function()
    it("skips an address on the rules' list, ignoring case on both sides", function()
      local spec = { unsubscribes = { "No.Surveys@Example.com" } }
      local d = eval(spec, event{ customer = { name = "N", email = "no.surveys@EXAMPLE.com" } })
      assert.equal("skip", d.action)
      assert.equal("unsubscribed", d.reason)
      assert.equal("send", eval(spec, event()).action)
    end)

    it("asks env.unsubscribed, with the address in lower case", function()
      local asked = {}
      local e = env{ unsubscribed = function(addr)
        asked[#asked + 1] = addr
        return addr == "jane@example.com"
      end }
      local d = eval({}, event{ customer = { name = "J", email = "Jane@Example.COM" } }, e)
      assert.equal("skip", d.action)
      assert.equal("unsubscribed", d.reason)
      assert.same({ "jane@example.com" }, asked)
      assert.equal("send", eval({}, event{ customer = { name = "B", email = "bob@example.com" } }, e).action)
    end)
  end)

  describe("once_per_interaction", function()
    it("produces a once mark for the interaction, for a year by default", function()
      local d = eval{ once_per_interaction = true }
      assert.equal("send", d.action)
      assert.same({ { type = "once", scope = "brand:", id = "1001", ["until"] = T0 + 365 * DAY } }, d.marks)
      d = eval({ once_per_interaction = 30, brands = { acme = {} }, default_brand = "acme" })
      assert.same({ { type = "once", scope = "brand:acme", id = "1001", ["until"] = T0 + 30 * DAY } }, d.marks)
    end)

    it("skips an interaction with an active mark as a duplicate", function()
      local e = env()
      local d = eval({ once_per_interaction = true }, event(), e)
      commit(e, d)
      d = eval({ once_per_interaction = true }, event(), e)
      assert.equal("skip", d.action)
      assert.equal("duplicate", d.reason)
      assert.same({}, d.marks)
      -- another interaction of the same customer is not a duplicate
      assert.equal("send", eval({ once_per_interaction = true }, event{ ext_interaction_id = 1002 }, e).action)
      -- once the mark has expired, the interaction may trigger again
      e.now = T0 + 366 * DAY
      assert.equal("send", eval({ once_per_interaction = true }, event(), e).action)
    end)

    it("treats an integer id and its decimal string as the same interaction", function()
      local e = env()
      local big = 2 ^ 40   -- an integer on every Lua version; never "1.099511627776e+12"
      commit(e, eval({ once_per_interaction = true }, event{ ext_interaction_id = big }, e))
      assert.truthy(e.marks["once|brand:|1099511627776"])
      local d = eval({ once_per_interaction = true }, event{ ext_interaction_id = "1099511627776" }, e)
      assert.equal("duplicate", d.reason)
      commit(e, eval({ once_per_interaction = true }, event{ ext_interaction_id = "77" }, e))
      assert.equal("duplicate", eval({ once_per_interaction = true }, event{ ext_interaction_id = 77 }, e).reason)
    end)

    it("does not raise on a non-integral id (the request is invalid later, not the rules)", function()
      local d = eval({ once_per_interaction = true }, event{ ext_interaction_id = 1.5 })
      assert.equal("send", d.action)
      assert.equal("1.5", d.marks[1].id)
    end)
  end)

  describe("sample", function()
    it("is deterministic: the same id always gets the same answer", function()
      local spec = { sample = 0.5 }
      for i = 1, 50 do
        local first = eval(spec, event{ ext_interaction_id = i }).action
        for _ = 1, 3 do assert.equal(first, eval(spec, event{ ext_interaction_id = i }).action) end
        assert.equal(first, eval(spec, event{ ext_interaction_id = tostring(i) }).action)
      end
    end)

    it("keeps roughly the given fraction of 2000 sequential ids", function()
      local r = rules.compile{ sample = 0.25 }
      for _, fmt in ipairs{ "%d", "T-%06d", "ticket-%d" } do
        local sent = 0
        for i = 48000, 49999 do
          local d = rules.evaluate(r, event{ ext_interaction_id = fmt:format(i) }, env())
          if d.action == "send" then sent = sent + 1 else assert.equal("sampled_out", d.reason) end
        end
        assert.truthy(sent > 0.21 * 2000 and sent < 0.29 * 2000,
                      fmt .. ": " .. sent .. " of 2000 sent with sample = 0.25")
      end
    end)

    it("skips everything with sample = 0 and nothing with sample = 1", function()
      for i = 1, 200 do
        local d = eval({ sample = 0 }, event{ ext_interaction_id = i })
        assert.equal("skip", d.action)
        assert.equal("sampled_out", d.reason)
        assert.equal("send", eval({ sample = 1 }, event{ ext_interaction_id = i }).action)
      end
    end)

    it("maps ids into [0, 1)", function()
      for _, s in ipairs{ "", "a", "1001", string.rep("\255", 64) } do
        local h = rules.unit_hash(s)
        assert.truthy(h >= 0 and h < 1, s)
      end
    end)
  end)

  describe("custom rules", function()
    it("may change the request", function()
      local d = eval{ rules = { function(req)
        req.tags = req.tags or {}
        req.tags[#req.tags + 1] = "batch-export"
        req.custom_properties = { source = "spec" }
      end } }
      assert.equal("send", d.action)
      assert.same({ "batch-export" }, d.request.tags)
      assert.same({ source = "spec" }, d.request.custom_properties)
    end)

    it("skips with the rule's reason (custom_rule when it gives none) and stops there", function()
      local ran = false
      local d = eval{ rules = {
        function() return "skip", "test_account" end,
        function() ran = true end,
      } }
      assert.equal("skip", d.action)
      assert.equal("test_account", d.reason)
      assert.truthy(contains(d.detail, "rules[1]"))
      assert.is_false(ran)
      assert.equal("custom_rule", eval{ rules = { function() return "skip" end } }.reason)
    end)

    it("turns the request into do_not_send with the rule's reason", function()
      local d = eval{ rules = { function() return "do_not_send", "vip" end } }
      assert.equal("send", d.action)
      assert.is_true(d.request.do_not_send)
      assert.equal("vip", d.do_not_send_reason)
      d = eval{ rules = { function() return "do_not_send" end } }
      assert.equal("custom_rule", d.do_not_send_reason)
    end)

    it("gives invalid / rule_error when a rule raises", function()
      local d = eval{ rules = { function() end, function() error("lookup table missing", 0) end } }
      assert.equal("invalid", d.action)
      assert.equal("rule_error", d.reason)
      assert.truthy(contains(d.detail, "rules[2]"), d.detail)
      assert.truthy(contains(d.detail, "lookup table missing"), d.detail)
    end)

    it("gives rule_error when a rule returns something it does not understand", function()
      local d = eval{ rules = { function() return "maybe" end } }
      assert.equal("invalid", d.action)
      assert.equal("rule_error", d.reason)
      assert.truthy(contains(d.detail, "returned maybe"), d.detail)
      assert.equal("send", eval{ rules = { function() return true end } }.action)
    end)

    it("gets a ctx with event, brand, brand_config, now, clock, suppressed_until, seen, unsubscribed", function()
      local e = env{ unsubscribed = function(addr) return addr == "gone@example.com" end }
      e.marks["suppress|brand:acme|jane@example.com"] = T0 + 3 * DAY
      e.marks["once|brand:acme|555"] = T0 + DAY
      e.marks["suppress|brand:other|bob@example.com"] = T0 + DAY
      local brands = { acme = { language = "en", tier = "gold" }, other = {} }
      local got
      local ev = event{ brand = "acme" }
      local d = eval({ brands = brands, unsubscribes = { "listed@example.com" }, rules = { function(req, ctx)
        got = {
          event = ctx.event, brand = ctx.brand, tier = ctx.brand_config.tier, now = ctx.now,
          clock = ctx.clock(),
          jane = ctx.suppressed_until("Jane@Example.com"),
          bob = ctx.suppressed_until("bob@example.com"),
          nobody = ctx.suppressed_until("nobody@example.com"),
          seen555 = ctx.seen(555), seen556 = ctx.seen("556"),
          gone = ctx.unsubscribed("GONE@example.com"), listed = ctx.unsubscribed("listed@example.com"),
          here = ctx.unsubscribed("jane@example.com"),
          req_language = req.language,
        }
      end } }, ev, e)
      assert.equal("send", d.action)
      assert.equal(ev, got.event)   -- the caller's event itself
      assert.equal("acme", got.brand)
      assert.equal("gold", got.tier)
      assert.equal(T0, got.now)
      assert.equal(T0, got.clock)
      assert.equal(T0 + 3 * DAY, got.jane)
      assert.is_nil(got.bob)          -- another brand's mark
      assert.is_nil(got.nobody)
      assert.is_true(got.seen555)
      assert.is_false(got.seen556)
      assert.truthy(got.gone)
      assert.truthy(got.listed)
      assert.is_false(got.here)
      assert.equal("en", got.req_language)   -- rules see the request after brand defaults
    end)

    it("ctx.suppressed_until looks in the scope the suppression rule uses", function()
      local e = env()
      e.marks["suppress|global|jane@example.com"] = T0 + DAY
      e.marks["suppress|channel:chat|bob@example.com"] = T0 + 2 * DAY
      local got
      local rule = function(_, ctx) got = ctx.suppressed_until("jane@example.com") end
      eval({ suppression = { days = 7, per = "global" }, rules = { rule } }, event{ ext_interaction_id = 9 }, e)
      assert.equal(T0 + DAY, got)
      rule = function(_, ctx) got = ctx.suppressed_until("bob@example.com") end
      eval({ suppression = { days = 7, per = "channel" }, rules = { rule } }, event{ channel = "chat" }, e)
      assert.equal(T0 + 2 * DAY, got)
    end)
  end)

  it("records do_not_send_tags as do_not_send with reason do_not_send_tag", function()
    local d = eval({ do_not_send_tags = { "vip-no-survey" } }, event{ tags = { "vip-no-survey" } })
    assert.equal("send", d.action)
    assert.is_true(d.request.do_not_send)
    assert.equal("do_not_send_tag", d.do_not_send_reason)
    d = eval({ do_not_send_tags = { "vip-no-survey" } }, event{ tags = { "billing" } })
    assert.is_nil(d.request.do_not_send)
  end)

  describe("suppression", function()
    local function suppress_marks(d)
      local list = {}
      for _, m in ipairs(d.marks) do if m.type == "suppress" then list[#list + 1] = m end end
      return list
    end

    it("produces a mark per brand, until now + days, for the lower-cased address", function()
      local spec = { suppression = { days = 7 }, brands = { acme = {} }, default_brand = "acme" }
      local d = eval(spec, event{ customer = { name = "J", email = "Jane@Example.com" } })
      assert.equal("send", d.action)
      assert.same({ { type = "suppress", scope = "brand:acme", email = "jane@example.com",
                      ["until"] = T0 + 7 * 86400 } }, suppress_marks(d))
    end)

    it("suppresses while a mark is active, with `until`, and lifts after the window", function()
      local spec = { suppression = { days = 7 }, brands = { acme = {}, other = {} }, default_brand = "acme" }
      local e = env()
      commit(e, eval(spec, event(), e))
      e.now = T0 + 2 * DAY
      local d = eval(spec, event{ ext_interaction_id = 1002 }, e)
      assert.equal("suppressed", d.action)
      assert.equal("suppressed", d.reason)
      assert.equal(T0 + 7 * DAY, d["until"])
      assert.truthy(contains(d.detail, rules.iso_utc(T0 + 7 * DAY)), d.detail)
      assert.same({}, d.marks)
      -- per brand: the other brand may still reach the customer
      assert.equal("send", eval(spec, event{ brand = "other" }, e).action)
      e.now = T0 + 7 * DAY
      assert.equal("send", eval(spec, event{ ext_interaction_id = 1003 }, e).action)
    end)

    it("scopes per channel", function()
      local spec = { suppression = { days = 7, per = "channel" } }
      local e = env()
      local d = eval(spec, event(), e)
      assert.equal("channel:phone", suppress_marks(d)[1].scope)
      commit(e, d)
      assert.equal("suppressed", eval(spec, event{ ext_interaction_id = 2 }, e).action)
      assert.equal("send", eval(spec, event{ ext_interaction_id = 3, channel = "chat" }, e).action)
    end)

    it("scopes globally", function()
      local spec = { suppression = { days = 7, per = "global" }, brands = { a = {}, b = {} }, default_brand = "a" }
      local e = env()
      local d = eval(spec, event(), e)
      assert.equal("global", suppress_marks(d)[1].scope)
      commit(e, d)
      assert.equal("suppressed", eval(spec, event{ brand = "b", channel = "chat" }, e).action)
    end)

    it("lets a brand's suppression_days override the rules' days", function()
      local spec = { suppression = { days = 7 }, brands = { acme = { suppression_days = 3 }, other = {} },
                     default_brand = "acme" }
      local d = eval(spec, event())
      assert.equal(T0 + 3 * DAY, suppress_marks(d)[1]["until"])
      d = eval(spec, event{ brand = "other" })
      assert.equal(T0 + 7 * DAY, suppress_marks(d)[1]["until"])
      spec.brands.acme.suppression_days = 0   -- 0: never suppressed, no mark
      local e = env()
      d = eval(spec, event(), e)
      assert.same({}, suppress_marks(d))
      e.marks["suppress|brand:acme|jane@example.com"] = T0 + DAY
      assert.equal("send", eval(spec, event(), e).action)
    end)

    it("lets do_not_send requests through and gives them no suppression mark", function()
      local spec = { suppression = { days = 7 }, once_per_interaction = true,
                     do_not_send_tags = { "no-survey" } }
      local e = env()
      e.marks["suppress|brand:|jane@example.com"] = T0 + DAY
      local d = eval(spec, event{ tags = { "no-survey" } }, e)
      assert.equal("send", d.action)
      assert.is_true(d.request.do_not_send)
      assert.same({}, suppress_marks(d))
      assert.equal(1, #d.marks)   -- the once mark only
      assert.equal("once", d.marks[1].type)
    end)
  end)

  describe("brands", function()
    it("uses default_brand for an event without one", function()
      local d = eval({ brands = { acme = {} }, default_brand = "acme" })
      assert.equal("send", d.action)
      assert.equal("acme", d.brand)
      assert.equal("acme", d.request.brand)
    end)

    it("skips an unknown brand, and a missing one without default_brand", function()
      local d = eval({ brands = { acme = {} } }, event{ brand = "acme-es" })
      assert.equal("skip", d.action)
      assert.equal("unknown_brand", d.reason)
      assert.truthy(contains(d.detail, "acme-es"))
      assert.equal("unknown_brand", eval({ brands = { acme = {} } }).reason)
    end)

    it("fills in the brand's language unless the request has one", function()
      local spec = { brands = { acme = { language = "es" } }, default_brand = "acme" }
      assert.equal("es", eval(spec).request.language)
      assert.equal("en-US", eval(spec, event{ language = "en-US" }).request.language)
    end)

    it("sends the brand's signifier as the request's brand", function()
      local spec = { brands = { acme = { signifier = "ACME-01" }, plain = {} }, default_brand = "acme" }
      local d = eval(spec)
      assert.equal("acme", d.brand)               -- the rules' name, for scopes and keys
      assert.equal("ACME-01", d.request.brand)    -- the name the service knows
      assert.equal("ACME-01", eval(spec, event{ brand = "acme" }).request.brand)
      assert.equal("plain", eval(spec, event{ brand = "plain" }).request.brand)
    end)
  end)

  it("hands back marks only when the action is send", function()
    local spec = { once_per_interaction = true, suppression = { days = 7 },
                   rules = { function(req) if req.tags then return "skip", "tagged" end end } }
    local e = env()
    e.marks["suppress|brand:|jane@example.com"] = T0 + DAY
    -- the once check passed (and made a mark) before suppression decided
    local d = eval(spec, event(), e)
    assert.equal("suppressed", d.action)
    assert.same({}, d.marks)
    d = eval(spec, event{ tags = { "x" }, customer = { name = "B", email = "bob@example.com" } }, e)
    assert.equal("skip", d.action)
    assert.same({}, d.marks)
    d = eval(spec, event{ customer = { name = "B", email = "bob@example.com" } }, e)
    assert.equal("send", d.action)
    assert.equal(2, #d.marks)
    for _, explain in ipairs{ false, true } do
      d = eval({ once_per_interaction = true, sample = 0 }, event(), env(), explain)
      assert.equal("skip", d.action)
      assert.same({}, d.marks)
    end
  end)

  describe("explain", function()
    it("records a verdict for every rule and keeps the first non-pass as the decision", function()
      local spec = {
        when = function() return true end,
        brands = { acme = {} }, default_brand = "acme",
        channels = { phone = "manual" },
        exclude_tags = { "spam" },
        unsubscribes = { "jane@example.com" },
        once_per_interaction = true,
        sample = 1,
        rules = { function() return "skip", "custom" end, function() return "do_not_send", "vip" end },
        do_not_send_tags = { "vip" },
        suppression = { days = 7 },
      }
      local e = env()
      e.marks["once|brand:acme|1001"] = T0 + DAY
      local d = eval(spec, event{ tags = { "spam", "vip" } }, e, true)
      assert.equal("skip", d.action)
      assert.equal("channel_manual", d.reason)
      assert.same({}, d.marks)
      local seen = {}
      for _, v in ipairs(d.verdicts) do seen[v.rule] = v.verdict end
      assert.same({
        map = "pass", when = "pass", brand = "pass", channels = "skip", exclude_tags = "skip",
        unsubscribes = "skip", once_per_interaction = "skip", ["rules[1]"] = "skip",
        ["rules[2]"] = "do_not_send", do_not_send_tags = "do_not_send",
      }, seen)
      local order = {}
      for i, v in ipairs(d.verdicts) do order[i] = v.rule end
      assert.same({ "map", "when", "brand", "channels", "exclude_tags", "unsubscribes",
                    "once_per_interaction", "rules[1]", "rules[2]", "do_not_send_tags" }, order)
    end)

    it("reaches suppression and reports it when everything before passes", function()
      local spec = { suppression = { days = 7 }, exclude_tags = { "spam" } }
      local e = env()
      e.marks["suppress|brand:|jane@example.com"] = T0 + DAY
      local d = eval(spec, event(), e, true)
      assert.equal("suppressed", d.action)
      assert.equal(T0 + DAY, d["until"])
      assert.same({ { rule = "map", verdict = "pass" }, { rule = "exclude_tags", verdict = "pass" } },
                  { d.verdicts[1], d.verdicts[2] })
      assert.equal("suppression", d.verdicts[3].rule)
      assert.equal("suppressed", d.verdicts[3].verdict)
      -- without explain there are no verdicts
      assert.is_nil(eval(spec, event(), e).verdicts)
    end)
  end)

  describe("budget", function()
    local BUDGET = { instructions = 100000 }
    local function with_budget(spec)
      spec.budget = spec.budget or BUDGET
      return spec
    end
    -- (the loops are written inside the rule functions: under LuaJIT, a function defined
    -- elsewhere in a program is compiled, and a compiled loop runs without the hook)

    -- The VM instructions fn(...) runs, counted one by one (in the VM running this spec).
    -- (sethook a local: a global look-up under busted runs its environment's __index)
    local sethook = debug.sethook
    local function instructions_of(fn, ...)
      local n = 0
      sethook(function() n = n + 1 end, "", 1)
      fn(...)
      sethook()
      return n
    end

    after_each(function() debug.sethook() end)

    it("fails a map that never returns with rule_error naming the map, and removes its hook", function()
      local d = eval(with_budget{ map = function(e) while e do end return e end })
      assert.equal("invalid", d.action)
      assert.equal("rule_error", d.reason)
      assert.truthy(contains(d.detail, "map ("), d.detail)
      assert.truthy(contains(d.detail, "exceeded its budget of 100000 instructions"), d.detail)
      assert.is_nil(debug.gethook())
    end)

    it("fails a when that never returns with rule_error", function()
      local d = eval(with_budget{ when = function() while true do end end })
      assert.equal("invalid", d.action)
      assert.equal("rule_error", d.reason)
      assert.truthy(contains(d.detail, "when ("), d.detail)
      assert.truthy(contains(d.detail, "exceeded its budget"), d.detail)
      assert.is_nil(debug.gethook())
    end)

    it("fails a custom rule that loops, naming it, after the rules before it ran", function()
      local ran = false
      local d = eval(with_budget{ rules = { function() ran = true end,
                                            function(req) while req do end end } })
      assert.is_true(ran)
      assert.equal("invalid", d.action)
      assert.equal("rule_error", d.reason)
      assert.truthy(contains(d.detail, "rules[2] ("), d.detail)
      assert.truthy(contains(d.detail, "exceeded its budget of 100000 instructions"), d.detail)
      assert.is_nil(debug.gethook())
    end)

    it("cannot be outlived by a rule that catches its error", function()
      local caught = 0
      local d = eval(with_budget{ rules = { function()
        while true do
          if not pcall(function() while true do end end) then caught = caught + 1 end
        end
      end } })
      assert.equal("rule_error", d.reason)
      assert.equal(0, caught)   -- raised again at the rule's next instruction
      -- nor by one that swallows it and returns as if nothing happened
      d = eval(with_budget{ map = function(e) pcall(function() while true do end end) return e end })
      assert.equal("rule_error", d.reason)
      assert.truthy(contains(d.detail, "exceeded its budget"), d.detail)
    end)

    it("passes a rule that runs just under its limit and fails it just over", function()
      -- (the rule allocates nothing: a garbage collection step could run finalizers,
      -- whose instructions count too)
      local function work(req) local s = 0 for i = 1, 2000 do s = s + i end req.ext_interaction_id = s end
      assert.truthy(rules.compile{ rules = { work } }.budget)   -- under LuaJIT: now out of the JIT
      local n = instructions_of(work, event())
      assert.truthy(n > 2000, n)
      local d = eval{ rules = { work }, budget = { instructions = n + 10 } }
      assert.equal("send", d.action)
      assert.equal(2001000, d.request.ext_interaction_id)
      d = eval{ rules = { work }, budget = { instructions = n - 10 } }
      assert.equal("rule_error", d.reason)
    end)

    it("decides the next events normally after one went over", function()
      local r = rules.compile(with_budget{ map = function(e) while e.loop do end return e end })
      local e = env()
      assert.equal("send", rules.evaluate(r, event(), e).action)
      assert.equal("rule_error", rules.evaluate(r, event{ loop = true }, e).reason)
      assert.equal("send", rules.evaluate(r, event(), e).action)
      assert.is_nil(debug.gethook())
    end)

    it("holds for a loop the JIT compiled before (LuaJIT)", function()
      local function map(e)
        local s = 0
        for i = 1, e.n do s = s + i end
        e.custom_properties = { sum = tostring(s) }
        return e
      end
      local r = rules.compile(with_budget{ map = map })
      for _ = 1, 500 do assert.equal("send", rules.evaluate(r, event{ n = 100 }, env()).action) end
      local d = rules.evaluate(r, event{ n = 2^40 }, env())
      assert.equal("rule_error", d.reason)
    end)

    it("puts back a debugger's hook, which sees the rule's lines meanwhile", function()
      local lines = 0
      local function line_hook() lines = lines + 1 end
      debug.sethook(line_hook, "l")
      local d = eval(with_budget{ map = function(e) while e do end return e end })
      local h, mask = debug.gethook()
      debug.sethook()
      assert.equal("rule_error", d.reason)
      assert.equal(line_hook, h)
      assert.equal("l", mask)
      assert.truthy(lines > 0)
    end)

    -- A look-up may yield (a Redis store on cosockets): other coroutines run meanwhile.
    -- Under LuaJIT a hook is one for all of them, so the budget's hook must be off then.
    it("sets no hook for other coroutines while a custom rule's look-up is suspended", function()
      local e = env()
      local inner = e.lookup
      e.lookup = function(m)   -- the store answering later, as over a network
        coroutine.yield("waiting")
        return inner(m)
      end
      local r = rules.compile(with_budget{ rules = { function(req, ctx)
        local n = 0
        for i = 1, 3 do if not ctx.seen("i" .. i) then n = n + 1 end end
        req.custom_properties = { unseen = tostring(n) }
      end } })
      local co = coroutine.create(function() return rules.evaluate(r, event(), e) end)
      local other = rules.compile{ budget = false, rules = { function(req)   -- no budget of its own
        local s = 0
        for i = 1, 300000 do s = s + i end   -- 3x the first rule's budget
        req.ext_interaction_id = s
      end } }
      local waits = 0
      while true do
        local ok, v = coroutine.resume(co)
        assert.is_true(ok, tostring(v))
        if coroutine.status(co) == "dead" then
          assert.equal("send", v.action, tostring(v.detail))
          assert.equal("3", v.request.custom_properties.unseen)
          break
        end
        waits = waits + 1
        assert.is_nil(debug.gethook())   -- the suspended rule left no hook behind
        local d = rules.evaluate(other, event(), env())
        assert.equal("send", d.action, tostring(d.detail))
      end
      assert.equal(3, waits)
      assert.is_nil(debug.gethook())
    end)

    it("still stops a custom rule that looks things up forever", function()
      local lookups = 0
      local e = env()
      local inner = e.lookup
      e.lookup = function(m) lookups = lookups + 1 return inner(m) end
      local d = eval(with_budget{ rules = { function(_, ctx) while true do ctx.seen("x") end end } }, nil, e)
      assert.equal("rule_error", d.reason)
      assert.truthy(contains(d.detail, "exceeded its budget of 100000 instructions"), d.detail)
      assert.truthy(lookups > 0)
      assert.is_nil(debug.gethook())
    end)

    it("lets an interrupt through (Ctrl-C in the lua interpreter), not a rule_error", function()
      local child = require "support.child"
      local lua = os.getenv("STELLA_TEST_LUA") or (rawget(_G, "jit") and "luajit" or "lua5.4")
      local script, marker, out, pidfile = os.tmpname(), os.tmpname(), os.tmpname(), os.tmpname()
      os.remove(marker)
      write_file(script, [[
        local rules = require "stella.rules"
        local r = rules.compile{ budget = { instructions = 2147483647 }, map = function(e)
          assert(io.open(arg[1], "w")):close()   -- in the loop from here on
          while e do end
        end }
        local ok, res = pcall(rules.evaluate, r, {}, { now = 0 })
        io.write(ok and ("decided " .. tostring(res.reason)) or ("raised " .. tostring(res)))
      ]])
      assert(os.execute(child.ENV .. lua .. " " .. child.quote(script) .. " " .. child.quote(marker) ..
                        " >" .. child.quote(out) .. " 2>&1 & echo $! >" .. child.quote(pidfile)))
      local pid = child.read_file(pidfile):match("%d+")
      for _ = 1, 600 do   -- wait for the child to be in the loop (at most a minute)
        if io.open(marker) then break end
        os.execute("sleep 0.1")
      end
      assert.truthy(io.open(marker), "the child never reached its loop: " .. child.read_file(out))
      os.execute("kill -INT " .. pid)
      for _ = 1, 600 do   -- and for it to end
        if child.read_file(out) ~= "" then break end
        os.execute("sleep 0.1")
      end
      local got = child.read_file(out)
      for _, p in ipairs{ script, marker, out, pidfile } do os.remove(p) end
      assert.truthy(got:find("^raised .*interrupted!$"), got)
    end)

    it("has a default, can be turned off, and refuses a budget it cannot use", function()
      assert.equal(rules.DEFAULT_BUDGET, rules.compile{}.budget)
      assert.equal(rules.DEFAULT_BUDGET, rules.compile{ budget = {} }.budget)
      assert.equal(5000, rules.compile{ budget = { instructions = 5000 } }.budget)
      assert.is_nil(rules.compile{ budget = false }.budget)
      assert.truthy(contains(compile_error{ budget = 5 }, "budget must be a table or false"))
      assert.truthy(contains(compile_error{ budget = { instructions = 0 } }, "budget.instructions"))
      assert.truthy(contains(compile_error{ budget = { instructions = 1.5 } }, "budget.instructions"))
      assert.truthy(contains(compile_error{ budget = { ms = 10 } }, "unknown key 'budget.ms'"))
    end)
  end)

  describe("rules files", function()
    local paths
    before_each(function() paths = {} end)
    after_each(function() for _, p in ipairs(paths) do os.remove(p) end end)

    local function file(text)
      local p = os.tmpname()
      paths[#paths + 1] = p
      write_file(p, text)
      return p
    end

    -- A rules file whose one custom rule reports what its environment holds.
    local PROBE = [[
      return { rules = { function(req)
        req.custom_properties = {
          io = tostring(io ~= nil), execute = tostring(os.execute ~= nil),
          require = tostring(require ~= nil), time = tostring(os.time ~= nil),
          string = tostring(string.format ~= nil),
        }
      end } }
    ]]

    it("runs with restricted globals: no io, no os.execute, no require", function()
      local r = assert(rules.load(file(PROBE)))
      local d = rules.evaluate(r, event(), env())
      assert.same({ io = "false", execute = "false", require = "false", time = "true", string = "true" },
                  d.request.custom_properties)
      local p = file("return { map = function(e) io.open('/etc/passwd') return e end }")
      d = rules.evaluate(assert(rules.load(p)), event(), env())
      assert.equal("invalid", d.action)
      assert.equal("map_error", d.reason)
      -- a rules file cannot reach the real os table through its own
      p = file("os.exit = nil; return {}")
      assert(rules.load(p))
      assert.equal("function", type(os.exit))
    end)

    it("opens io, os or require when allowed", function()
      local r = assert(rules.load(file(PROBE), { allow = { io = true, os = true, require = true } }))
      local d = rules.evaluate(r, event(), env())
      assert.same({ io = "true", execute = "true", require = "true", time = "true", string = "true" },
                  d.request.custom_properties)
      r = assert(rules.load(file(PROBE), { allow = { io = true } }))
      d = rules.evaluate(r, event(), env())
      assert.equal("true", d.request.custom_properties.io)
      assert.equal("false", d.request.custom_properties.execute)
    end)

    it("keeps a file's own helpers inside the budget (LuaJIT: out of the JIT)", function()
      local p = file([[
        local function count_to(n) local s = 0 for i = 1, n do s = s + i end return s end
        return { budget = { instructions = 100000 },
                 map = function(e) e.custom_properties = { s = tostring(count_to(e.n)) } return e end }
      ]])
      local r = assert(rules.load(p))
      for _ = 1, 500 do assert.equal("send", rules.evaluate(r, event{ n = 100 }, env()).action) end
      local d = rules.evaluate(r, event{ n = 2^40 }, env())
      assert.equal("rule_error", d.reason)
      assert.truthy(contains(d.detail, "map (" .. p:sub(-20)), d.detail)
    end)

    it("accepts a shebang line", function()
      assert(rules.load(file("#!/usr/bin/env stella\nreturn { sample = 1 }\n")))
    end)

    it("gives nil, err naming the file when it raises, returns a non-table or does not parse", function()
      local cases = {
        { "local x = io.open('x')\nreturn {}", "attempt to index" },
        { "error('bad rules')", "bad rules" },
        { "return 42", "must return a table, got number" },
        { "return { sample = ", "" },
        { "return { chanels = {} }", "unknown key 'chanels'" },
      }
      for _, c in ipairs(cases) do
        local p = file(c[1])
        local r, err = rules.load(p)
        assert.is_nil(r, c[1])
        assert.truthy(contains(err, p), "error does not name the file: " .. tostring(err))
        assert.truthy(contains(err, c[2]), tostring(err))
      end
      local r, err = rules.load("/nonexistent/rules.lua")
      assert.is_nil(r)
      assert.truthy(contains(err, "/nonexistent/rules.lua"), err)
    end)

    it("raises on a source that is neither a file name nor a table", function()
      assert.has_error(function() rules.load(42) end)
    end)
  end)

  it("writes ISO 8601 UTC times", function()
    assert.equal("1970-01-01T00:00:00Z", rules.iso_utc(0))
    assert.equal("2000-02-29T00:00:00Z", rules.iso_utc(951782400))
    assert.equal("2023-11-14T22:13:20Z", rules.iso_utc(T0))
    assert.equal("2023-11-14T22:13:20Z", rules.iso_utc(T0 + 0.9))
    assert.equal("2099-12-31T23:59:59Z", rules.iso_utc(4102444799))
    assert.equal("1969-12-31T23:59:59Z", rules.iso_utc(-1))
    assert.equal("0001-01-01T00:00:00Z", rules.iso_utc(-62135596800))
    assert.equal("9999-12-31T23:59:59Z", rules.iso_utc(253402300799))
  end)

  it("runs without the debug library (as in Redis), with no budget", function()
    local lua51 = "/usr/bin/lua5.1"
    if not io.open(lua51, "rb") then
      pending("lua5.1 is not installed")
      return
    end
    local script = os.tmpname()
    write_file(script, ([[
      package.path = %q
      debug = nil
      setmetatable(_G, { __index = function(_, k) error("no global " .. k) end })   -- as Redis does
      local rules = require "stella.rules"
      local r = rules.compile{ budget = { instructions = 10 }, map = function(e)
        local s = 0 for i = 1, 100 do s = s + i end e.ext_interaction_id = s return e end }
      io.write(tostring(r.budget), " ", rules.evaluate(r, { channel = "phone" }, { now = 0 }).action)
    ]]):format(SPEC_DIR .. "../lua/?.lua"))
    local p = io.popen(lua51 .. " " .. script .. " 2>&1", "r")
    local out = p:read("*a")
    p:close()
    os.remove(script)
    assert.equal("nil send", out)
  end)

  it("runs under plain Lua 5.1 with no C modules", function()
    local lua51 = "/usr/bin/lua5.1"
    local f = io.open(lua51, "rb")
    if not f then
      pending("lua5.1 is not installed")
      return
    end
    f:close()
    local rules_file = os.tmpname()
    write_file(rules_file, "return { channels = { phone = 'integrated' }, sample = 1, " ..
      "rules = { function(req) if io or require then return 'skip', 'globals not restricted' end end } }")
    local script = os.tmpname()
    write_file(script, ([[
      package.path = %q
      package.cpath = ""
      local rules = require "stella.rules"
      for name in pairs(package.loaded) do
        if name:match("^stella") and name ~= "stella.rules" and name ~= "stella.rate_limit.settings" then
          error("loaded " .. name)
        end
      end
      local marks = {}
      local env = { now = 1700000000, lookup = function(m)
        return marks[m.type .. "|" .. m.scope .. "|" .. (m.email or m.id)]
      end }
      local r = rules.compile{
        channels = { phone = "integrated" }, exclude_tags = { "spam" },
        suppression = { days = 7 }, once_per_interaction = true, sample = 0.5,
        brands = { acme = { language = "en" } }, default_brand = "acme",
        rules = { function(req, ctx) req.tags = { "batch" } end },
      }
      local ev = { customer = { name = "J", email = "Jane@Example.com" }, channel = "phone",
                   ext_interaction_id = 1001 }
      local d = rules.evaluate(r, ev, env)
      for _, m in ipairs(d.marks) do marks[m.type .. "|" .. m.scope .. "|" .. (m.email or m.id)] = m["until"] end
      local again = rules.evaluate(r, ev, env)
      local other = rules.evaluate(r, { customer = ev.customer, channel = "phone", ext_interaction_id = 1002 }, env)
      local fromfile = rules.evaluate(assert(rules.load(%q)), ev, env)
      print(_VERSION, d.action, #d.marks, d.request.language, again.reason, other.action,
            fromfile.action, string.format("%%.6f", rules.unit_hash("1001")), rules.iso_utc(1700000000))
    ]]):format(SPEC_DIR .. "../lua/?.lua", rules_file))
    local p = io.popen(lua51 .. " " .. script .. " 2>&1", "r")
    local out = p:read("*a")
    p:close()
    os.remove(script)
    os.remove(rules_file)
    local expected = table.concat({ "Lua 5.1", "send", "2", "en", "duplicate", "suppressed", "send",
                                    ("%.6f"):format(rules.unit_hash("1001")), "2023-11-14T22:13:20Z" }, "\t")
    assert.equal(expected .. "\n", out)
  end)
end)
