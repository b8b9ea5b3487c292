-- Specs for stella.validate_json and stella.encode_json: the checks of stella.validate and
-- stella.encode made by the C core on JSON text, parsed in C (README.md, "API").
-- Run from the repository root: `lua5.4 /usr/bin/busted` or `luajit /usr/bin/busted`.

local stella = require "stella"
local cjson = require "cjson"

local validate_json, encode_json = stella.validate_json, stella.encode_json

-- The minimal valid request's members, in order: { name, JSON text }.
local BASE_MEMBERS = {
  { "customer", '{"name":"Jane","email":"janecustomer@example.com"}' },
  { "employee", '{"email":"paulagent@blancapeak.com"}' },
  { "channel", '"phone"' },
  { "ext_interaction_id", '"123456"' },
}

-- The minimal valid request as JSON text, with members replaced or added:
-- with("brand", '"acme"', "channel", '"chat"') (false removes a member).
local function with(...)
  local members, args = {}, { ... }
  for i, m in ipairs(BASE_MEMBERS) do members[i] = { m[1], m[2] } end
  for i = 1, select("#", ...), 2 do
    local found = false
    for _, m in ipairs(members) do
      if m[1] == args[i] then m[2], found = args[i + 1], true end
    end
    if not found then members[#members + 1] = { args[i], args[i + 1] } end
  end
  local parts = {}
  for _, m in ipairs(members) do
    if m[2] then parts[#parts + 1] = '"' .. m[1] .. '":' .. m[2] end
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

-- `text` (an object) with one more member at its end, even one it already has.
local function plus(text, name, json)
  return text:sub(1, -2) .. ',"' .. name .. '":' .. json .. "}"
end

local BASE = with()

local function codes(errs)
  local out = {}
  for i, e in ipairs(errs or {}) do out[i] = { e.path, e.code } end
  return out
end

-- Objects that cjson decodes to tables stella.validate sees the same way: no repeated
-- keys, no {} or [] where the other belongs, no integers past 2^53.
local AGREE = {
  BASE,
  with("brand", '"blancapeak"', "language", '"en-US"', "country", '"us"'),
  with("tags", '["billing","refund"]', "custom_properties", '{"plan":"gold","seats":12,"ratio":0.25}'),
  with("tags", "[]", "custom_properties", "{}"),
  with("do_not_send", "true", "external_url", '"https://example.com/t/1"'),
  '{"customer":{"name":"Zo\\u00eb \\ud83d\\ude00","email":"zoe@example.com","custom_id":"c-1"},'
    .. '"employee":{"custom_id":"E-7"},"channel":"chat","ext_interaction_id":42}',
  "{}",
  '{"customer":{"name":"","email":"jane@"},"channel":"phone","ext_interaction_id":1.5}',
  '{"customer":"jane","employee":{},"channel":7,"ext_interaction_id":true,"do_not_send":"true"}',
  '{"customer":{"name":42,"email":"j@example.com","phone":"1"},"employee":{"email":"p@example.com"},'
    .. '"channel":"","ext_interaction_id":"x","priority":"high","tags":"billing"}',
  with("tags", '["a",2,"",null]'),
  with("custom_properties", '{"plan":{"tier":"gold"},"n":null,"ok":true,"":"x"}'),
  with("language", '"english"', "country", '"zz"', "external_url", '"support/tickets 1"'),
  with("brand", "null", "do_not_send", "null"),
  with("ext_interaction_id", "1e300"),
  with("customer", '{"name":"Jos\\u00e9","email":"jose@example.com","custom_id":"\\t"}'),
  with("tags", "[" .. string.rep('"t",', 20) .. '"t"]'),
  with("tags", '["' .. string.rep("x", 2001) .. '"]'),
  with("customer", false, "employee", false),
}

-- The same, where only a message differs: JSON says "an array" or "an object" where a
-- Lua table is only "a table".
local AGREE_CODES = {
  with("tags", '["a",["x"],{"y":1}]'),
  with("brand", "[]", "language", '{"x":"y"}'),
}

describe("stella.validate_json", function()
  describe("agrees with stella.validate on the same request decoded by cjson", function()
    for i, text in ipairs(AGREE) do
      it("text " .. i .. ": " .. text:sub(1, 60), function()
        local ok1, errs1 = stella.validate(cjson.decode(text))
        local ok2, errs2 = validate_json(text)
        assert.equal(ok1, ok2)
        assert.same(errs1, errs2)
      end)
    end

    it("the same paths and codes where JSON names a table's shape", function()
      for _, text in ipairs(AGREE_CODES) do
        local _, errs1 = stella.validate(cjson.decode(text))
        local _, errs2 = validate_json(text)
        assert.same(codes(errs1), codes(errs2))
        assert.is_true(#errs2 > 0)
      end
    end)

    it("also for recoveries and with opts.channels", function()
      for _, text in ipairs{
        '{"employee":{"email":"p@example.com"},"initial_feedback_request_id":"abc"}',
        '{"employee":{"email":"p@example.com"}}',
        '{"employee":{"email":"p@example.com"},"ext_interaction_id":7,"tags":["a"],"customer":{}}',
      } do
        assert.same({ stella.validate(cjson.decode(text), "recovery") }, { validate_json(text, "recovery") })
      end
      local opts = { channels = { "phone" } }
      local text = with("brand", '"x"'):gsub('"phone"', '"sms"')
      assert.same({ stella.validate(cjson.decode(text), opts) }, { validate_json(text, opts) })
      assert.same({ stella.validate(cjson.decode(text), "request", opts) },
                  { validate_json(text, "request", opts) })
      assert.same({ { "channel", "unknown_channel" } }, codes(select(2, validate_json(text, opts))))
    end)
  end)

  describe("what a Lua table cannot carry", function()
    it("reports a repeated key as duplicate_field, at any level", function()
      local _, errs = validate_json(plus(with("brand", '"a"'), "brand", '"a"'))
      assert.same({ { "brand", "duplicate_field" } }, codes(errs))
      _, errs = validate_json('{"customer":{"name":"J","email":"a@example.com","email":"b@example.com"},'
        .. '"employee":{"email":"p@example.com"},"channel":"phone","ext_interaction_id":"1","channel":"chat"}')
      assert.same({ { "customer.email", "duplicate_field" }, { "channel", "duplicate_field" } }, codes(errs))
      _, errs = validate_json(with("custom_properties", '{"plan":"a","n":1,"plan":"b"}'))
      assert.same({ { "custom_properties.plan", "duplicate_field" } }, codes(errs))
      assert.is_true(validate_json(with("custom_properties", '{"plan":"a","Plan":"b","plan2":"c"}')))
    end)

    it("tells [] from {}: an object where a list belongs and the reverse are invalid_type", function()
      local cases = {
        { with("tags", "{}"), "tags" },
        { with("tags", '{"1":"a"}'), "tags" },
        { with("custom_properties", "[]"), "custom_properties" },
        { '{"customer":[],"employee":{"email":"p@example.com"},"channel":"phone","ext_interaction_id":1}', "customer" },
        { '{"customer":{"name":"J","email":"j@example.com"},"employee":[],"channel":"phone","ext_interaction_id":1}',
          "employee" },
        { "[]", "" },
        { '"a string"', "" },
        { "42", "" },
        { "null", "" },
      }
      for _, case in ipairs(cases) do
        local ok, errs = validate_json(case[1])
        assert.is_nil(ok)
        assert.same({ { case[2], "invalid_type" } }, codes(errs))
        assert.matches("got %a+", errs[1].message)
      end
      -- both are fine where they belong, and a Lua table still fits either
      assert.is_true(validate_json(with("tags", "[]", "custom_properties", "{}")))
      local t = cjson.decode(BASE)
      t.tags, t.custom_properties = {}, {}
      assert.is_true(stella.validate(t))
    end)

    it("reports a lone surrogate escape as invalid_utf8 at its field", function()
      local _, errs = validate_json(with("brand", '"x\\ud800"', "tags", '["\\udc00"]'))
      assert.same({ { "tags[1]", "invalid_utf8" }, { "brand", "invalid_utf8" } }, codes(errs))
    end)

    it("reports bytes that are not UTF-8 as invalid_utf8 at their field, not as a syntax error", function()
      local _, errs = validate_json(with("brand", '"Jos\255"'))
      assert.same({ { "brand", "invalid_utf8" } }, codes(errs))
    end)

    it("says null is null", function()
      local _, errs = validate_json(with("brand", "null"))
      assert.matches("got null", errs[1].message)
      local _, errs2 = stella.validate(cjson.decode(with("brand", "null")))
      assert.same(errs, errs2)
    end)
  end)

  describe("a text that is not JSON", function()
    local CASES = {
      { "", "unexpected end of input", 1, 1 },
      { "{", "unexpected end of input", 1, 2 },
      { '{"customer":', "unexpected end of input", 1, 13 },
      { "not json", "invalid literal", 1, 1 },
      { "[1,]", "expected a value", 1, 4 },
      { '{"a":1,}', "expected a string key", 1, 8 },
      { '{"a" 1}', "expected ':'", 1, 6 },
      { '{"a":"b\nc"}', "control character in string", 1, 8 },
      { '{"a":"\\x"}', "invalid escape", 1, 7 },
      { '{"a":"abc}', "unterminated string", 1, 6 },
      { '{"a":01}', "leading zero", 1, 6 },
      { "{\n  \"a\": NaN\n}", "expected a value", 2, 8 },
      { "{} // comment", "trailing characters after the document", 1, 4 },
      { '{"a":"\195\169", x}', "expected a string key", 1, 11 },
      { string.rep("[", 65) .. string.rep("]", 65), "nesting too deep", 1, 65 },
    }
    for _, case in ipairs(CASES) do
      local shown = case[1]:sub(1, 20):gsub("\n", "\\n")
      it(string.format("'%s' is one invalid_json error: %s at line %d, column %d", shown, case[2],
                       case[3], case[4]), function()
        for _, f in ipairs{ validate_json, encode_json } do
          local ok, errs = f(case[1])
          assert.is_nil(ok)
          assert.equal(1, #errs)
          assert.equal("", errs[1].path)
          assert.equal("invalid_json", errs[1].code)
          assert.truthy(errs[1].message:find(case[2], 1, true), errs[1].message)
          assert.truthy(errs[1].message:find(string.format(" at line %d, column %d", case[3], case[4]), 1, true),
                        errs[1].message)
        end
      end)
    end

    it("accepts 64 levels of nesting (then the schema speaks)", function()
      local ok, errs = validate_json(with("tags", string.rep("[", 63) .. string.rep("]", 63)))
      assert.is_nil(ok)
      assert.same({ { "tags[1]", "invalid_type" } }, codes(errs))
    end)
  end)

  describe("opts.fields", function()
    local TEXT = with("do_not_send", "false", "tags", '["a"]', "custom_properties", '{"n":12,"f":0.5,"s":"x"}')

    it("returns true and the value at each dotted path, in order", function()
      local r = { validate_json(TEXT, { fields = { "customer.email", "channel", "ext_interaction_id",
        "do_not_send", "custom_properties.n", "custom_properties.f", "custom_properties.s" } }) }
      assert.same({ true, "janecustomer@example.com", "phone", "123456", false, 12, 0.5, "x" }, r)
      if math.type then assert.equal("integer", math.type(r[6])) end
    end)

    it("gives nil for an absent path and true for a table", function()
      local r = { validate_json(TEXT, { fields = { "brand", "customer", "tags", "employee.custom_id",
        "channel.x", "tags.1", "nope.deeper", "customer.email" } }) }
      assert.equal(9, select("#", validate_json(TEXT, { fields = { "brand", "customer", "tags",
        "employee.custom_id", "channel.x", "tags.1", "nope.deeper", "customer.email" } })))
      assert.same({ true, nil, true, true, nil, nil, nil, nil, "janecustomer@example.com" }, r)
    end)

    it("gives numbers as Lua numbers, integers as integers", function()
      local text = with("custom_properties", '{"big":9007199254740993,"neg":-0,"e":1e3,"frac":-2.5}')
      local _, big, neg, e, frac = validate_json(text, { fields = { "custom_properties.big",
        "custom_properties.neg", "custom_properties.e", "custom_properties.frac" } })
      if math.type then
        assert.equal(9007199254740993, big)
        assert.equal("integer", math.type(big))
      else
        assert.equal(9007199254740992, big)   -- LuaJIT: every number is a double
      end
      assert.equal(0, neg)
      assert.equal(1000, e)
      assert.equal(-2.5, frac)
    end)

    it("returns many fields", function()
      local fields = {}
      for i = 1, 40 do fields[i] = i % 2 == 0 and "channel" or "customer.name" end
      local r = { validate_json(TEXT, "request", { fields = fields }) }
      assert.equal(41, #r)
      assert.equal("Jane", r[40])
      assert.equal("phone", r[41])
    end)

    it("returns only the errors when the text is invalid", function()
      local r = { validate_json(with("brand", '""'), { fields = { "channel" } }) }
      assert.equal(2, #r)
      assert.is_nil(r[1])
      assert.same({ { "brand", "empty" } }, codes(r[2]))
    end)

    it("works with the recovery kind and channels together", function()
      local text = '{"employee":{"email":"p@example.com"},"ext_interaction_id":77}'
      assert.same({ true, 77, "p@example.com" },
        { validate_json(text, "recovery", { channels = { "phone" }, fields = { "ext_interaction_id", "employee.email" } }) })
    end)
  end)

  describe("misuse", function()
    it("raises for a text that is not a string, a bad kind or bad options", function()
      assert.has_error(function() validate_json({}) end)
      assert.has_error(function() validate_json(nil) end)
      assert.has_error(function() validate_json(42) end)
      assert.has_error(function() encode_json({}) end)
      assert.has_error(function() validate_json("{}", "order") end)
      assert.has_error(function() validate_json("{}", "request", "x") end)
      assert.has_error(function() validate_json(BASE, { fields = "customer.email" }) end)
      assert.has_error(function() validate_json(BASE, { fields = { 1 } }) end)
      assert.has_error(function() validate_json("{}", { channels = "phone" }) end)
    end)

    it("raises for bad fields whatever the text: an invalid or broken document too", function()
      assert.has_error(function() validate_json("{}", { fields = "customer.email" }) end,
        "options.fields must be a list of dotted paths")
      assert.has_error(function() validate_json("{", { fields = { "a", 2 } }) end,
        "options.fields[2] must be a string (a dotted path)")
    end)
  end)
end)

describe("stella.encode_json", function()
  it("writes the same canonical JSON as stella.encode of the decoded table", function()
    for _, text in ipairs{
      BASE,
      with("brand", '"blancapeak"', "language", '"en-US"', "country", '"us"'),
      with("tags", '["billing","refund"]', "custom_properties", '{"seats":12,"plan":"gold","ratio":0.25,"b":-3}'),
      with("tags", "[]", "custom_properties", "{}"),
      '{"ext_interaction_id":42,"channel":"chat","employee":{"custom_id":"E-7"},'
        .. '"customer":{"email":"zoe@example.com","name":"Zo\\u00eb \\ud83d\\ude00 \\/ \\"q\\" \\\\ \\t \\r \\u007f"}}',
    } do
      local want = assert(stella.encode(cjson.decode(text)))
      assert.equal(want, encode_json(text))
    end
    local recovery = '{"tags":["a"],"employee":{"email":"p@example.com"},"initial_feedback_request_id":7}'
    assert.equal(assert(stella.encode(cjson.decode(recovery), "recovery")), encode_json(recovery, "recovery"))
  end)

  it("keeps an exact integer past 2^53 where a double would round it", function()
    local json = assert(encode_json(with("ext_interaction_id", "9007199254740993")))
    assert.matches('"ext_interaction_id":"9007199254740993"', json)
  end)

  it("returns the same errors as validate_json", function()
    for _, text in ipairs(AGREE) do
      local ok, errs = validate_json(text)
      local json, errs2 = encode_json(text)
      if ok then assert.is_string(json) else assert.is_nil(json) end
      assert.same(errs, errs2)
    end
    local _, errs = encode_json(plus(with("tags", "{}", "brand", '"a"'), "brand", '"b"'))
    assert.same({ { "tags", "invalid_type" }, { "brand", "duplicate_field" } }, codes(errs))
  end)
end)
