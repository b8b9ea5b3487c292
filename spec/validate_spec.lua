-- Specs for stella.validate, written against the "API" section of README.md.
-- Run from the repository root: `lua5.4 /usr/bin/busted` or `luajit /usr/bin/busted`.

local stella = require "stella"

-- ---------------------------------------------------------------------------
-- helpers
-- ---------------------------------------------------------------------------

-- Sentinel for "remove this field" in req{...} overrides (a table literal
-- cannot hold nil).
local NONE = setmetatable({}, { __tostring = function() return "<NONE>" end })

local function copy(v)
  if type(v) ~= "table" or v == NONE then return v end
  local t = {}
  for k, x in pairs(v) do t[k] = copy(x) end
  return t
end

-- The minimal valid request (the example in shared/requests-api.md).
local BASE = {
  customer = { name = "Jane", email = "janecustomer@example.com" },
  employee = { email = "paulagent@blancapeak.com" },
  channel = "phone",
  ext_interaction_id = "123456",
}

-- The minimal valid recovery.
local RECOVERY_BASE = {
  employee = { email = "paulagent@blancapeak.com" },
  initial_feedback_request_id = "abc",
}

-- Deep-copies `base` and applies `overrides`: keys are dotted paths
-- ("customer.email"), values are copied in, NONE removes the field.
-- Paths are applied in sorted order, so "customer" is set before "customer.x".
local function build(base, overrides)
  local r = copy(base)
  local paths = {}
  for path in pairs(overrides or {}) do paths[#paths + 1] = path end
  table.sort(paths)
  for _, path in ipairs(paths) do
    local value = overrides[path]
    local parent, key = r, path
    local head, rest = path:match "^([^.]+)%.(.+)$"
    if head then -- only one level of nesting exists in the schema
      if type(parent[head]) ~= "table" then parent[head] = {} end
      parent, key = parent[head], rest
    end
    if value == NONE then parent[key] = nil else parent[key] = copy(value) end
  end
  return r
end

local function req(overrides) return build(BASE, overrides) end
local function recovery(overrides) return build(RECOVERY_BASE, overrides) end

local function describe_errors(errs)
  if type(errs) ~= "table" then return tostring(errs) end
  local parts = {}
  for i, e in ipairs(errs) do
    parts[i] = string.format("{%s, %s, %q}", tostring(e.path), tostring(e.code), tostring(e.message))
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end

-- The field a path names: "customer.email" -> "email", "tags[3]" -> "tags",
-- "custom_properties.KEY" -> "KEY", "employee" -> "employee".
local function leaf(path)
  local last = path:match "([^.]+)$" or path
  return (last:gsub("%[%d+%]$", ""))
end

-- Asserts that `r` is valid: validate returns exactly true (and no errors).
local function assert_valid(r, kind, opts)
  local ok, errs = stella.validate(r, kind, opts)
  assert.is_true(ok, "expected a valid " .. tostring(kind or "request") .. ", got errors " .. describe_errors(errs))
  assert.is_nil(errs)
end

-- Asserts that validating `r` gives exactly `expected`, an ordered list of
-- {path, code}; every message must be a non-empty string naming the field.
local function assert_errors(expected, r, kind, opts)
  local ok, errs = stella.validate(r, kind, opts)
  assert.is_nil(ok, "expected errors, got a valid result")
  assert.is_table(errs)
  local got = {}
  for i, e in ipairs(errs) do got[i] = { e.path, e.code } end
  assert.same(expected, got, "errors were " .. describe_errors(errs))
  for _, e in ipairs(errs) do
    assert.is_string(e.message)
    assert.is_true(#e.message > 0, "empty message for " .. e.path)
    assert.is_truthy(e.message:find(leaf(e.path), 1, true),
      "message " .. string.format("%q", e.message) .. " does not mention " .. leaf(e.path))
  end
  return errs
end

local function assert_error(path, code, r, kind, opts)
  return assert_errors({ { path, code } }, r, kind, opts)
end

-- ---------------------------------------------------------------------------

describe("stella.validate", function()

  describe("a minimal request", function()
    it("passes and returns exactly true", function()
      assert_valid(req())
    end)

    it("passes with kind given explicitly as \"request\"", function()
      assert_valid(req(), "request")
    end)

    it("does not modify the table it checks", function()
      local r = req { tags = { "a", "b" }, custom_properties = { a = "x", b = 5 } }
      local before = copy(r)
      stella.validate(r)
      assert.same(before, r)
    end)

    it("passes with every optional field set", function()
      assert_valid(req {
        ["customer.custom_id"] = "C-1",
        ["employee.custom_id"] = "E-7",
        external_url = "example.com/ticket/1",
        do_not_send = false,
        tags = { "vip", "billing" },
        brand = "blancapeak",
        language = "en-US",
        country = "us",
        custom_properties = { plan = "gold", seats = 5 },
      })
    end)
  end)

  describe("misuse", function()
    it("raises for a non-table request", function()
      assert.has_error(function() stella.validate(nil) end)
      assert.has_error(function() stella.validate("customer") end)
      assert.has_error(function() stella.validate(42) end)
      assert.has_error(function() stella.validate(true) end)
    end)

    it("raises for an unknown kind", function()
      assert.has_error(function() stella.validate(req(), "bogus") end)
      assert.has_error(function() stella.validate(req(), "requests") end)
      assert.has_error(function() stella.validate(req(), 1) end)
    end)
  end)

  describe("required fields", function()
    it("customer missing -> required at customer", function()
      assert_error("customer", "required", req { customer = NONE })
    end)

    it("customer.name missing -> required", function()
      assert_error("customer.name", "required", req { ["customer.name"] = NONE })
    end)

    it("customer.email missing -> required", function()
      assert_error("customer.email", "required", req { ["customer.email"] = NONE })
    end)

    it("employee missing -> required at employee", function()
      assert_error("employee", "required", req { employee = NONE })
    end)

    it("channel missing -> required", function()
      assert_error("channel", "required", req { channel = NONE })
    end)

    it("ext_interaction_id missing -> required", function()
      assert_error("ext_interaction_id", "required", req { ext_interaction_id = NONE })
    end)

    it("customer.custom_id, external_url, do_not_send, tags, brand, language, country, custom_properties are optional", function()
      -- the minimal request has none of them
      local r = req()
      for _, k in ipairs { "external_url", "do_not_send", "tags", "brand", "language", "country", "custom_properties" } do
        assert.is_nil(r[k])
      end
      assert.is_nil(r.customer.custom_id)
      assert_valid(r)
    end)

    it("an empty table reports every required field in schema order", function()
      assert_errors({
        { "customer", "required" },
        { "employee", "required" },
        { "channel", "required" },
        { "ext_interaction_id", "required" },
      }, {})
    end)

    it("an empty customer reports name then email", function()
      assert_errors({
        { "customer.name", "required" },
        { "customer.email", "required" },
      }, req { customer = {} })
    end)
  end)

  describe("types", function()
    it("a non-table customer -> invalid_type at customer", function()
      assert_error("customer", "invalid_type", req { customer = "Jane <jane@example.com>" })
    end)

    it("a non-table employee -> invalid_type at employee", function()
      assert_error("employee", "invalid_type", req { employee = "paulagent@blancapeak.com" })
    end)

    it("a non-string customer.name -> invalid_type", function()
      assert_error("customer.name", "invalid_type", req { ["customer.name"] = 5 })
      assert_error("customer.name", "invalid_type", req { ["customer.name"] = { "Jane" } })
    end)

    it("a non-string customer.email -> invalid_type", function()
      assert_error("customer.email", "invalid_type", req { ["customer.email"] = true })
    end)

    it("a non-string customer.custom_id -> invalid_type", function()
      assert_error("customer.custom_id", "invalid_type", req { ["customer.custom_id"] = {} })
    end)

    it("a non-string employee.email / employee.custom_id -> invalid_type", function()
      assert_error("employee.email", "invalid_type", req { ["employee.email"] = false })
      assert_error("employee.custom_id", "invalid_type",
        req { employee = { custom_id = { "E-7" } } })
    end)

    it("a non-string channel -> invalid_type", function()
      assert_error("channel", "invalid_type", req { channel = 1 })
      assert_error("channel", "invalid_type", req { channel = { "phone" } })
    end)

    it("a non-string external_url, brand, language, country -> invalid_type", function()
      assert_error("external_url", "invalid_type", req { external_url = true })
      assert_error("brand", "invalid_type", req { brand = {} })
      assert_error("language", "invalid_type", req { language = false })
      assert_error("country", "invalid_type", req { country = 840 })
    end)

    it("a non-table tags / custom_properties -> invalid_type", function()
      assert_error("tags", "invalid_type", req { tags = "vip" })
      assert_error("custom_properties", "invalid_type", req { custom_properties = "plan=gold" })
    end)

    it("a function value -> invalid_type", function()
      assert_error("brand", "invalid_type", req { brand = print })
    end)
  end)

  describe("empty strings", function()
    local cases = {
      "customer.name", "customer.email", "customer.custom_id",
      "employee.email", "employee.custom_id",
      "channel", "ext_interaction_id", "external_url", "brand", "language", "country",
    }
    for _, path in ipairs(cases) do
      it(path .. " = \"\" -> empty", function()
        local r = req { [path] = "" }
        if path == "employee.custom_id" then r.employee.email = nil end
        assert_error(path, "empty", r)
      end)
    end

    it("an empty employee.email alongside a valid custom_id still reports empty", function()
      assert_error("employee.email", "empty", req { employee = { email = "", custom_id = "E-7" } })
    end)
  end)

  describe("e-mail addresses (WHATWG)", function()
    local valid = {
      "a@b", "first.last+tag@sub.example.co.uk", "x@localhost",
      "janecustomer@example.com", "o'brien@example.ie", "a-b@x-y.example",
    }
    for _, email in ipairs(valid) do
      it(string.format("%q passes", email), function()
        assert_valid(req { ["customer.email"] = email })
      end)
    end

    local invalid = {
      "a", "a@", "@b", "a@b..c", "a@-b.com", "a@b-.com", "a b@c.com", "a@b_c.com",
      "a@b.com.", "a@@b.com", "zoë@example.com", "a@" .. string.rep("b", 64) .. ".com",
    }
    for _, email in ipairs(invalid) do
      it(string.format("%q -> invalid_email", email), function()
        assert_error("customer.email", "invalid_email", req { ["customer.email"] = email })
      end)
    end

    it("a 63-character label passes", function()
      assert_valid(req { ["customer.email"] = "a@" .. string.rep("b", 63) .. ".com" })
    end)

    it("254 bytes passes, 255 bytes -> too_long", function()
      local domain = "@b.example"
      local ok254 = string.rep("a", 254 - #domain) .. domain
      local bad255 = string.rep("a", 255 - #domain) .. domain
      assert.equal(254, #ok254)
      assert.equal(255, #bad255)
      assert_valid(req { ["customer.email"] = ok254 })
      assert_error("customer.email", "too_long", req { ["customer.email"] = bad255 })
    end)

    it("employee.email is checked the same way", function()
      assert_valid(req { ["employee.email"] = "x@localhost" })
      assert_error("employee.email", "invalid_email", req { ["employee.email"] = "paul at example.com" })
    end)
  end)

  describe("employee", function()
    it("only email passes", function()
      assert_valid(req { employee = { email = "paulagent@blancapeak.com" } })
    end)

    it("only custom_id passes", function()
      assert_valid(req { employee = { custom_id = "E-7" } })
    end)

    it("both email and custom_id pass", function()
      assert_valid(req { employee = { email = "paulagent@blancapeak.com", custom_id = "E-7" } })
    end)

    it("neither -> one_of_required at employee", function()
      assert_error("employee", "one_of_required", req { employee = {} })
    end)
  end)

  describe("channel", function()
    it("any non-empty name passes without opts.channels (custom channels)", function()
      assert_valid(req { channel = "phone" })
      assert_valid(req { channel = "whatsapp-premium" })
    end)

    it("a name in an array-form opts.channels passes", function()
      assert_valid(req { channel = "chat" }, "request", { channels = { "phone", "chat" } })
    end)

    it("a name not in an array-form opts.channels -> unknown_channel", function()
      assert_error("channel", "unknown_channel", req { channel = "sms" }, "request",
        { channels = { "phone", "chat" } })
    end)

    it("a name in a set-form opts.channels passes", function()
      assert_valid(req { channel = "phone" }, "request", { channels = { phone = true } })
    end)

    it("a name not in a set-form opts.channels -> unknown_channel", function()
      assert_error("channel", "unknown_channel", req { channel = "chat" }, "request",
        { channels = { phone = true } })
    end)

    it("opts is honoured when kind is nil (the default)", function()
      assert_error("channel", "unknown_channel", req { channel = "email" }, nil,
        { channels = { "phone" } })
    end)

    it("opts without channels allows any channel", function()
      assert_valid(req { channel = "sms" }, "request", {})
    end)
  end)

  describe("ext_interaction_id", function()
    it("a string passes", function()
      assert_valid(req { ext_interaction_id = "TICKET-42" })
    end)

    it("an integer passes", function()
      assert_valid(req { ext_interaction_id = 123456 })
    end)

    it("an integral float passes (123456.0, 2^53 - 1)", function()
      assert_valid(req { ext_interaction_id = 123456.0 })
      assert_valid(req { ext_interaction_id = 2 ^ 53 - 1 })
    end)

    it("1.5 -> invalid_type", function()
      assert_error("ext_interaction_id", "invalid_type", req { ext_interaction_id = 1.5 })
    end)

    it("NaN and infinities -> invalid_type", function()
      assert_error("ext_interaction_id", "invalid_type", req { ext_interaction_id = 0 / 0 })
      assert_error("ext_interaction_id", "invalid_type", req { ext_interaction_id = math.huge })
      assert_error("ext_interaction_id", "invalid_type", req { ext_interaction_id = -math.huge })
    end)

    it("a float beyond 2^53 -> invalid_type", function()
      assert_error("ext_interaction_id", "invalid_type", req { ext_interaction_id = 2.0 ^ 60 })
    end)

    it("true -> invalid_type", function()
      assert_error("ext_interaction_id", "invalid_type", req { ext_interaction_id = true })
    end)

    it("\"\" -> empty", function()
      assert_error("ext_interaction_id", "empty", req { ext_interaction_id = "" })
    end)
  end)

  describe("external_url", function()
    it("a URL without a scheme passes", function()
      assert_valid(req { external_url = "example.com/ticket/1" })
    end)

    it("a full URL with query and fragment passes", function()
      assert_valid(req { external_url = "https://support.example.com/t/1?x=%20y&z=1#top" })
    end)

    it("a space -> invalid_url", function()
      assert_error("external_url", "invalid_url", req { external_url = "example.com/ticket 1" })
    end)

    it("a newline -> invalid_url", function()
      assert_error("external_url", "invalid_url", req { external_url = "example.com/ticket/1\n" })
    end)

    it("a tab -> invalid_url", function()
      assert_error("external_url", "invalid_url", req { external_url = "example.com/\tticket/1" })
    end)

    it("a control character -> invalid_url", function()
      assert_error("external_url", "invalid_url", req { external_url = "example.com/\1" })
    end)
  end)

  describe("do_not_send", function()
    it("true passes", function()
      assert_valid(req { do_not_send = true })
    end)

    it("false passes", function()
      assert_valid(req { do_not_send = false })
    end)

    it("\"true\" -> invalid_type", function()
      assert_error("do_not_send", "invalid_type", req { do_not_send = "true" })
    end)

    it("1 -> invalid_type", function()
      assert_error("do_not_send", "invalid_type", req { do_not_send = 1 })
    end)
  end)

  describe("tags", function()
    local function n_tags(n)
      local t = {}
      for i = 1, n do t[i] = "tag" .. i end
      return t
    end

    it("{} passes", function()
      assert_valid(req { tags = {} })
    end)

    it("20 tags pass", function()
      assert_valid(req { tags = n_tags(20) })
    end)

    it("21 tags -> too_many at tags", function()
      assert_error("tags", "too_many", req { tags = n_tags(21) })
    end)

    it("a tag of 2000 multibyte characters passes (characters, not bytes)", function()
      local tag = string.rep("é", 2000)
      assert.equal(4000, #tag)
      assert_valid(req { tags = { tag } })
      assert_valid(req { tags = { string.rep("😀", 2000) } })
    end)

    it("a tag of 2001 characters -> too_long at tags[1]", function()
      assert_error("tags[1]", "too_long", req { tags = { string.rep("é", 2001) } })
      assert_error("tags[1]", "too_long", req { tags = { string.rep("x", 2001) } })
    end)

    it("an error in the third tag has path tags[3]", function()
      assert_error("tags[3]", "too_long", req { tags = { "a", "b", string.rep("x", 2001) } })
    end)

    it("holes -> not_a_sequence", function()
      assert_error("tags", "not_a_sequence", req { tags = { [1] = "a", [3] = "c" } })
    end)

    it("a sequence not starting at 1 -> not_a_sequence", function()
      assert_error("tags", "not_a_sequence", req { tags = { [2] = "a", [3] = "b" } })
    end)

    it("string keys -> not_a_sequence", function()
      assert_error("tags", "not_a_sequence", req { tags = { x = "a" } })
      assert_error("tags", "not_a_sequence", req { tags = { "a", x = "b" } })
    end)

    it("a non-integer number key -> not_a_sequence", function()
      assert_error("tags", "not_a_sequence", req { tags = { "a", [1.5] = "b" } })
    end)

    it("an empty string tag -> empty at tags[2]", function()
      assert_error("tags[2]", "empty", req { tags = { "a", "" } })
    end)

    it("a non-string tag -> invalid_type", function()
      assert_error("tags[1]", "invalid_type", req { tags = { true } })
      assert_error("tags[2]", "invalid_type", req { tags = { "a", { "b" } } })
    end)
  end)

  describe("brand", function()
    it("a string passes", function()
      assert_valid(req { brand = "blancapeak" })
    end)
  end)

  describe("language", function()
    for _, lang in ipairs { "en", "EN", "en-US", "en-us", "es-419", "pt-BR", "fr-001", "zh-CN" } do
      it(string.format("%q passes", lang), function()
        assert_valid(req { language = lang })
      end)
    end

    for _, lang in ipairs { "xx", "en-XX", "en-840", "english", "en_US", "e", "eng",
                            "en-", "-US", "en-US-CA", "en-UK", "en US" } do
      it(string.format("%q -> invalid_language", lang), function()
        assert_error("language", "invalid_language", req { language = lang })
      end)
    end
  end)

  describe("country", function()
    for _, c in ipairs { "us", "US", "gb", "De" } do
      it(string.format("%q passes", c), function()
        assert_valid(req { country = c })
      end)
    end

    for _, c in ipairs { "uk", "xx", "usa", "xk", "eu", "u" } do
      it(string.format("%q -> invalid_country", c), function()
        assert_error("country", "invalid_country", req { country = c })
      end)
    end
  end)

  describe("custom_properties", function()
    it("{} passes", function()
      assert_valid(req { custom_properties = {} })
    end)

    it("string and number values pass", function()
      assert_valid(req { custom_properties = { a = "x", b = 5, c = 0.25 } })
    end)

    it("a nested table -> invalid_type at custom_properties.a", function()
      assert_error("custom_properties.a", "invalid_type",
        req { custom_properties = { a = { nested = "x" } } })
    end)

    it("a non-finite number -> invalid_type", function()
      assert_error("custom_properties.a", "invalid_type", req { custom_properties = { a = math.huge } })
      assert_error("custom_properties.a", "invalid_type", req { custom_properties = { a = 0 / 0 } })
    end)

    it("an integer key -> invalid_key", function()
      assert_error("custom_properties[1]", "invalid_key", req { custom_properties = { [1] = "x" } })
    end)

    it("an empty string key -> invalid_key", function()
      assert_error('custom_properties[""]', "invalid_key", req { custom_properties = { [""] = "x" } })
    end)

    it("a value of 2000 multibyte characters passes", function()
      assert_valid(req { custom_properties = { a = string.rep("é", 2000) } })
    end)

    it("a value over 2000 characters -> too_long", function()
      assert_error("custom_properties.a", "too_long",
        req { custom_properties = { a = string.rep("x", 2001) } })
      assert_error("custom_properties.a", "too_long",
        req { custom_properties = { a = string.rep("é", 2001) } })
    end)

    it("the path uses the key as given", function()
      assert_error("custom_properties.Order Number", "too_long",
        req { custom_properties = { ["Order Number"] = string.rep("x", 2001) } })
    end)
  end)

  describe("UTF-8", function()
    local bad = {
      { "a lone 0xFF byte", "Jane \255" },
      { "an overlong encoding", "\192\175" },
      { "an encoded surrogate", "\237\160\128" },
      { "a truncated sequence", "Jane \226\130" },
      { "a stray continuation byte", "\128Jane" },
      { "a code point above U+10FFFF", "\244\144\128\128" },
    }
    for _, case in ipairs(bad) do
      it(case[1] .. " in customer.name -> invalid_utf8", function()
        assert_error("customer.name", "invalid_utf8", req { ["customer.name"] = case[2] })
      end)
    end

    it("valid multibyte names pass", function()
      assert_valid(req { ["customer.name"] = "Zoë Åkesson" })
      assert_valid(req { ["customer.name"] = "李雷" })
      assert_valid(req { ["customer.name"] = "Jane 😀" })
    end)

    it("is checked in brand, tags and custom property values too", function()
      assert_error("brand", "invalid_utf8", req { brand = "\255" })
      assert_error("tags[2]", "invalid_utf8", req { tags = { "ok", "\192\175" } })
      assert_error("custom_properties.a", "invalid_utf8", req { custom_properties = { a = "\226\130" } })
    end)
  end)

  describe("control characters", function()
    it("a NUL in customer.name -> control_character, naming the field and the NUL", function()
      local ok, errs = stella.validate(req { ["customer.name"] = "Jane\0Doe" })
      assert.is_nil(ok)
      assert.same({ { path = "customer.name", code = "control_character",
                      message = "customer.name contains a NUL character (U+0000) at byte 5" } }, errs)
    end)

    it("a NUL past the first eight bytes, or at the very end, is found too", function()
      assert_error("customer.name", "control_character", req { ["customer.name"] = "Jane Doe-Smith\0" })
      assert_error("customer.name", "control_character",
        req { ["customer.name"] = string.rep("x", 4000) .. "\0" .. string.rep("y", 7) })
    end)

    it("every text field refuses NUL and the C0 controls but tab, LF and CR", function()
      assert_error("customer.email", "control_character", req { ["customer.email"] = "jane\0@example.com" })
      assert_error("employee.custom_id", "control_character", req { ["employee.custom_id"] = "p\1" })
      assert_error("ext_interaction_id", "control_character", req { ext_interaction_id = "12\0" })
      assert_error("brand", "control_character", req { brand = "acme\27[31m" })
      assert_error("channel", "control_character", req { channel = "phone\0" })
      assert_error("tags[2]", "control_character", req { tags = { "ok", "a\31b" } })
      assert_error("custom_properties.plan", "control_character", req { custom_properties = { plan = "gold\0" } })
      assert_error("ext_interaction_id", "control_character", recovery { ext_interaction_id = "\8" }, "recovery")
    end)

    it("a custom property name with a control character -> invalid_key, the name not echoed", function()
      assert_error("custom_properties[?]", "invalid_key", req { custom_properties = { ["a\0b"] = "x" } })
    end)

    it("external_url keeps its own code for control characters", function()
      assert_error("external_url", "invalid_url", req { external_url = "example.com/\0" })
    end)

    it("tab, line feed, carriage return and DEL pass", function()
      assert_valid(req { ["customer.name"] = "Jane\tDoe\r\nSmith\127", tags = { "a\tb" },
                         custom_properties = { note = "line 1\nline 2" } })
    end)

    it("comes from JSON escapes as from Lua strings", function()
      local ok, errs = stella.validate_json('{"customer":{"name":"Jo\\u0000","email":"j@example.com"},'
        .. '"employee":{"email":"p@example.com"},"channel":"phone","ext_interaction_id":"1"}')
      assert.is_nil(ok)
      assert.equal("control_character", errs[1].code)
      assert.equal("customer.name", errs[1].path)
    end)
  end)

  describe("unknown fields", function()
    it("at the top level -> unknown_field with the key as path", function()
      assert_error("ext_interactionid", "unknown_field", req { ext_interactionid = "123456" })
    end)

    it("in customer -> unknown_field at customer.KEY", function()
      assert_error("customer.phone", "unknown_field", req { ["customer.phone"] = "+1 555 0100" })
    end)

    it("in employee -> unknown_field at employee.KEY", function()
      assert_error("employee.name", "unknown_field", req { ["employee.name"] = "Paul" })
    end)

    it("are reported whatever their value's type", function()
      assert_error("extra", "unknown_field", req { extra = { nested = true } })
    end)

    it("at one level are sorted by name (byte order)", function()
      assert_errors({
        { "Beta", "unknown_field" },
        { "a b", "unknown_field" },
        { "alpha", "unknown_field" },
        { "zeta", "unknown_field" },
      }, req { zeta = 1, alpha = 1, Beta = 1, ["a b"] = 1 })
    end)

    it("in customer are sorted by name", function()
      assert_errors({
        { "customer.aa", "unknown_field" },
        { "customer.mm", "unknown_field" },
        { "customer.zz", "unknown_field" },
      }, req { ["customer.zz"] = "1", ["customer.aa"] = "1", ["customer.mm"] = "1" })
    end)
  end)

  describe("error order", function()
    local function messy()
      return req {
        customer = { name = "", email = "not-an-email", zip = "12345" },
        employee = {},
        channel = NONE,
        ext_interaction_id = 1.5,
        tags = { "ok", "" },
        language = "english",
        country = "uk",
        custom_properties = { b = { 1 }, a = string.rep("x", 2001) },
        zzz = 1,
        aaa = 1,
      }
    end

    local expected = {
      { "customer.name", "empty" },
      { "customer.email", "invalid_email" },
      { "customer.zip", "unknown_field" },
      { "employee", "one_of_required" },
      { "channel", "required" },
      { "ext_interaction_id", "invalid_type" },
      { "tags[2]", "empty" },
      { "language", "invalid_language" },
      { "country", "invalid_country" },
      { "custom_properties.a", "too_long" },
      { "custom_properties.b", "invalid_type" },
      { "aaa", "unknown_field" },
      { "zzz", "unknown_field" },
    }

    it("reports every problem at once in schema order, unknown keys last per object", function()
      assert_errors(expected, messy())
    end)

    it("is identical across two calls", function()
      local r = messy()
      local _, first = stella.validate(r)
      local _, second = stella.validate(r)
      assert.same(first, second)
    end)

    it("does not depend on the order keys were inserted", function()
      local r = {}
      r.aaa = 1
      r.custom_properties = {}
      r.custom_properties.a = string.rep("x", 2001)
      r.custom_properties.b = { 1 }
      r.country = "uk"
      r.language = "english"
      r.tags = { "ok", "" }
      r.ext_interaction_id = 1.5
      r.employee = {}
      r.customer = {}
      r.customer.zip = "12345"
      r.customer.email = "not-an-email"
      r.customer.name = ""
      r.zzz = 1
      assert_errors(expected, r)
      local _, a = stella.validate(r)
      local _, b = stella.validate(messy())
      assert.same(b, a)
    end)

    it("sorts custom property errors by key", function()
      assert_errors({
        { "custom_properties.a", "invalid_type" },
        { "custom_properties.b", "invalid_type" },
        { "custom_properties.c", "invalid_type" },
      }, req { custom_properties = { c = {}, a = {}, b = {}, ok = "fine" } })
    end)
  end)

  describe("recovery kind", function()
    it("a minimal recovery with initial_feedback_request_id passes", function()
      assert_valid(recovery(), "recovery")
    end)

    it("a recovery with ext_interaction_id only passes", function()
      assert_valid(recovery { initial_feedback_request_id = NONE, ext_interaction_id = "123456" }, "recovery")
    end)

    it("a recovery with both ids passes", function()
      assert_valid(recovery { ext_interaction_id = 123456 }, "recovery")
    end)

    it("a recovery with every field passes", function()
      assert_valid(recovery {
        employee = { email = "paulagent@blancapeak.com", custom_id = "E-7" },
        ext_interaction_id = "123456",
        external_url = "example.com/ticket/1",
        tags = { "recovery" },
        do_not_send = true,
      }, "recovery")
    end)

    it("neither id -> one_of_required at ext_interaction_id", function()
      assert_error("ext_interaction_id", "one_of_required",
        recovery { initial_feedback_request_id = NONE }, "recovery")
    end)

    it("an integer initial_feedback_request_id passes, 1.5 -> invalid_type", function()
      assert_valid(recovery { initial_feedback_request_id = 987 }, "recovery")
      assert_error("initial_feedback_request_id", "invalid_type",
        recovery { initial_feedback_request_id = 1.5 }, "recovery")
    end)

    it("an empty initial_feedback_request_id -> empty", function()
      assert_error("initial_feedback_request_id", "empty",
        recovery { initial_feedback_request_id = "" }, "recovery")
    end)

    it("missing employee -> required", function()
      assert_error("employee", "required", recovery { employee = NONE }, "recovery")
    end)

    it("an employee with neither email nor custom_id -> one_of_required at employee", function()
      assert_error("employee", "one_of_required", recovery { employee = {} }, "recovery")
    end)

    it("customer -> unknown_field", function()
      assert_error("customer", "unknown_field",
        recovery { customer = { name = "Jane", email = "janecustomer@example.com" } }, "recovery")
    end)

    it("channel -> unknown_field", function()
      assert_error("channel", "unknown_field", recovery { channel = "phone" }, "recovery")
    end)

    it("request-only fields (brand, language, country, custom_properties) -> unknown_field, sorted", function()
      assert_errors({
        { "brand", "unknown_field" },
        { "country", "unknown_field" },
        { "custom_properties", "unknown_field" },
        { "language", "unknown_field" },
      }, recovery { language = "en", brand = "b", custom_properties = {}, country = "us" }, "recovery")
    end)

    it("validates shared fields with the same rules", function()
      assert_error("employee.email", "invalid_email",
        recovery { ["employee.email"] = "a@" }, "recovery")
      assert_error("external_url", "invalid_url",
        recovery { external_url = "a b" }, "recovery")
      assert_error("tags[1]", "empty", recovery { tags = { "" } }, "recovery")
      assert_error("do_not_send", "invalid_type", recovery { do_not_send = "true" }, "recovery")
    end)

    it("reports errors in recovery field order", function()
      assert_errors({
        { "employee", "one_of_required" },
        { "ext_interaction_id", "one_of_required" },
        { "external_url", "invalid_url" },
        { "tags", "too_many" },
        { "do_not_send", "invalid_type" },
        { "channel", "unknown_field" },
        { "customer", "unknown_field" },
      }, recovery {
        employee = {},
        initial_feedback_request_id = NONE,
        do_not_send = 0,
        tags = { "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11",
                 "12", "13", "14", "15", "16", "17", "18", "19", "20", "21" },
        external_url = "a\tb",
        customer = {},
        channel = "phone",
      }, "recovery")
    end)

    it("a valid request is not a valid recovery", function()
      local ok, errs = stella.validate(req(), "recovery")
      assert.is_nil(ok)
      assert.is_table(errs)
    end)
  end)
end)
