-- stella.check_json: the same answers as stella.validate_json(text, kind, {fields = ...}),
-- through the FFI under LuaJIT (the sandbox's way) and through validate_json elsewhere.
local stella = require "stella"
local check_json = require "stella.check_json"

local PATHS = { "employee.email", "employee.custom_id", "customer.email", "channel", "brand", "language",
                "do_not_send", "ext_interaction_id", "customer", "tags", "custom_properties.seats",
                "customer.name", "nope", "channel.x" }

local HEAD = '"customer":{"name":"Jane","email":"jane@example.com"},"employee":{"email":"paul@example.com"},'
  .. '"channel":"phone"'

local VALID = {
  "{" .. HEAD .. ',"ext_interaction_id":"1"}',
  "{" .. HEAD .. ',"ext_interaction_id":123456}',
  "{" .. HEAD .. ',"ext_interaction_id":9007199254740993}',
  '  {"customer":{"name":"Zo\\u00eb \\"Q\\"","email":"Zoe.Akesson@Example.COM","custom_id":"c-1"},'
    .. '"employee":{"email":"PaulAgent@BlancaPeak.com","custom_id":"E\\u0041-7"},"channel":"chat",'
    .. '"ext_interaction_id":"x\\/1","brand":"blancapeak","language":"en-US","country":"us",'
    .. '"do_not_send":true,"tags":["a","b"],"custom_properties":{"seats":12,"plan":"p"}}\n',
  "{" .. HEAD .. ',"ext_interaction_id":"1","do_not_send":false,"tags":[],"custom_properties":{"seats":1.5}}',
  '{"employee":{"custom_id":"only-id"},"customer":{"name":"J","email":"j@localhost"},"channel":"x",'
    .. '"ext_interaction_id":"2","custom_properties":{"seats":"3"}}',
}

local INVALID = {
  "",
  "[]",
  "{",
  "{}",
  "{" .. HEAD .. "}",
  "{" .. HEAD .. ',"ext_interaction_id":"1","brand":null}',
  "{" .. HEAD .. ',"ext_interaction_id":"1","channel":"chat"}',
  "{" .. HEAD .. ',"ext_interaction_id":"1","tags":{}}',
  "{" .. HEAD .. ',"ext_interaction_id":"1"} x',
  '{"customer":{"name":"J","email":"not an e-mail"},"employee":{"email":"p@example.com"},"channel":"phone",'
    .. '"ext_interaction_id":"1"}',
  "{" .. HEAD .. ',"ext_interaction_id":"\255"}',
}

-- what validate_json returns, as a list (n + 1 values, nil holes kept by the count)
local function expected(text, kind)
  return table.pack(stella.validate_json(text, kind, { fields = PATHS }))
end

local function read_all(c)
  local t = { n = #PATHS + 1, true }
  for i = 1, #PATHS do t[i + 1] = c:get(i) end
  return t
end

local function same_as_validate_json(c, kind)
  for _, text in ipairs(VALID) do
    local want = expected(text, kind)
    local ok, errors = c:check(text)
    if kind == "request" then
      assert.is_true(want[1], text)
      assert.is_true(ok, text)
      assert.is_nil(errors)
      assert.same(want, read_all(c))
      for i = 1, #PATHS do
        assert.equal(want[i + 1] ~= nil, c:present(i), PATHS[i])
        if type(want[i + 1]) == "string" then assert.equal(want[i + 1]:lower(), c:lower(i)) end
      end
    else
      assert.is_nil(ok)
      assert.same(want[2], errors)
    end
  end
  for _, text in ipairs(INVALID) do
    local want = expected(text, kind)
    local ok, errors = c:check(text)
    assert.is_nil(want[1], text)
    assert.is_nil(ok, text)
    assert.same(want[2], errors)
    assert.is_true(#errors > 0)
  end
end

describe("stella.check_json", function()
  it("gives validate_json's answers without the FFI", function()
    local c = check_json.new("request", PATHS, { ffi = false })
    assert.is_false(c.ffi)
    same_as_validate_json(c, "request")
    same_as_validate_json(check_json.new("recovery", PATHS, { ffi = false }), "recovery")
  end)

  it("reaches the C core through the FFI under LuaJIT (with the core that has it), and answers alike", function()
    if not jit then
      assert.is_false(check_json.ffi_available)
      assert.is_false(check_json.new("request", PATHS).ffi)
      return
    end
    assert.is_true(check_json.ffi_available, tostring(check_json.ffi_missing))
    local c = check_json.new("request", PATHS)
    assert.is_true(c.ffi)
    same_as_validate_json(c, "request")
    same_as_validate_json(check_json.new("recovery", PATHS), "recovery")
    -- many calls in a loop (the JIT's compiled path), the values of the latest text
    local a, b = VALID[1], VALID[4]
    for i = 1, 300 do
      local text = i % 2 == 0 and a or b
      assert.is_true(c:check(text))
      assert.equal(i % 2 == 0 and "paul@example.com" or "paulagent@blancapeak.com", c:lower(1))
      assert.equal(i % 2 == 0 and "1" or "x/1", c:get(8))
    end
  end)

  it("finds a control character given as an escape (in a field, a property's name or its value)", function()
    for _, use_ffi in ipairs{ true, false } do
      local c = check_json.new("request", PATHS, { ffi = use_ffi })
      for text, code in pairs{
        ["{" .. HEAD .. ',"ext_interaction_id":"1","brand":"a\\u0001b"}'] = "control_character",
        ["{" .. HEAD .. ',"ext_interaction_id":"1","custom_properties":{"k\\u0000":"v"}}'] = "invalid_key",
        ["{" .. HEAD .. ',"ext_interaction_id":"1","custom_properties":{"k":"v\\u001f"}}'] = "control_character",
        ["{" .. HEAD .. ',"ext_interaction_id":"a\\u0007"}'] = "control_character",
      } do
        local ok, errors = c:check(text)
        assert.is_nil(ok, text)
        assert.equal(1, #errors, text)
        assert.equal(code, errors[1].code, text)
      end
      -- tab, line feed and carriage return are fine, escaped
      assert.is_true(c:check("{" .. HEAD .. ',"ext_interaction_id":"1","brand":"a\\tb\\r\\nc"}'))
      assert.equal("a\tb\r\nc", c:get(5))
    end
  end)

  it("checks its arguments", function()
    assert.has_error(function() check_json.new("other", PATHS) end,
      'check_json.new: kind must be "request" or "recovery"')
    assert.has_error(function() check_json.new("request", "customer.email") end,
      "check_json.new: paths must be a list of dotted paths")
    assert.has_error(function() check_json.new("request", { "a", 2 }) end, "check_json.new: paths[2] must be a string")
    local c = check_json.new("request", { "customer.email", "do_not_send" })
    assert.has_error(function() c:check(nil) end)
    assert.is_true(c:check(VALID[1]))
    assert.has_error(function() c:lower(2) end, "check_json: no string at do_not_send")
  end)
end)
