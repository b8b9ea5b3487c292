-- Specs for stella.encode, written against the "API" section of README.md:
-- byte-exact canonical JSON. Run from the repository root:
-- `lua5.4 /usr/bin/busted` or `luajit /usr/bin/busted`.

local stella = require "stella"

-- ---------------------------------------------------------------------------
-- helpers
-- ---------------------------------------------------------------------------

-- Sentinel for "remove this field" in req{...} overrides.
local NONE = setmetatable({}, { __tostring = function() return "<NONE>" end })

local function copy(v)
  if type(v) ~= "table" or v == NONE then return v end
  local t = {}
  for k, x in pairs(v) do t[k] = copy(x) end
  return t
end

local BASE = {
  customer = { name = "Jane", email = "janecustomer@example.com" },
  employee = { email = "paulagent@blancapeak.com" },
  channel = "phone",
  ext_interaction_id = "123456",
}

-- Deep-copies BASE and applies overrides: keys are dotted paths
-- ("customer.name"), NONE removes the field. Applied in sorted path order.
local function req(overrides)
  local r = copy(BASE)
  local paths = {}
  for path in pairs(overrides or {}) do paths[#paths + 1] = path end
  table.sort(paths)
  for _, path in ipairs(paths) do
    local value = overrides[path]
    local parent, key = r, path
    local head, rest = path:match "^([^.]+)%.(.+)$"
    if head then
      if type(parent[head]) ~= "table" then parent[head] = {} end
      parent, key = parent[head], rest
    end
    if value == NONE then parent[key] = nil else parent[key] = copy(value) end
  end
  return r
end

-- The encoding of BASE, split around the point where optional top-level
-- fields go, so expectations can be written as MIN_HEAD .. extra .. "}".
local MIN_CUSTOMER = '{"name":"Jane","email":"janecustomer@example.com"}'
local MIN_HEAD = '{"customer":' .. MIN_CUSTOMER
  .. ',"employee":{"email":"paulagent@blancapeak.com"},"channel":"phone","ext_interaction_id":"123456"'

local function describe_errors(errs)
  if type(errs) ~= "table" then return tostring(errs) end
  local parts = {}
  for i, e in ipairs(errs) do parts[i] = string.format("{%s, %s}", tostring(e.path), tostring(e.code)) end
  return "{" .. table.concat(parts, ", ") .. "}"
end

-- Encodes `r` and asserts the exact bytes.
local function assert_json(expected, r, kind, opts)
  local json, errs = stella.encode(r, kind, opts)
  assert.is_string(json, "encode failed: " .. describe_errors(errs))
  assert.is_nil(errs)
  assert.equal(expected, json)
end

-- ---------------------------------------------------------------------------

describe("stella.encode", function()

  describe("field order", function()
    it("encodes the minimal request in schema order, not the example's order", function()
      assert_json('{"customer":{"name":"Jane","email":"janecustomer@example.com"},'
        .. '"employee":{"email":"paulagent@blancapeak.com"},"channel":"phone","ext_interaction_id":"123456"}',
        req())
    end)

    it("encodes a full request with every field in schema order", function()
      assert_json('{"customer":{"name":"Jane","email":"jane@example.com","custom_id":"C-1"},'
        .. '"employee":{"email":"paul@example.com","custom_id":"E-7"},'
        .. '"channel":"chat",'
        .. '"ext_interaction_id":"T-42",'
        .. '"external_url":"example.com/ticket/42",'
        .. '"do_not_send":true,'
        .. '"tags":["vip","billing"],'
        .. '"brand":"blancapeak",'
        .. '"language":"en-US",'
        .. '"country":"us",'
        .. '"custom_properties":{"plan":"gold","seats":"5"}}',
        {
          custom_properties = { seats = 5, plan = "gold" },
          country = "us",
          language = "en-US",
          brand = "blancapeak",
          tags = { "vip", "billing" },
          do_not_send = true,
          external_url = "example.com/ticket/42",
          ext_interaction_id = "T-42",
          channel = "chat",
          employee = { custom_id = "E-7", email = "paul@example.com" },
          customer = { custom_id = "C-1", email = "jane@example.com", name = "Jane" },
        })
    end)

    it("keeps tags in sequence order", function()
      assert_json(MIN_HEAD .. ',"tags":["c","a","b"]}', req { tags = { "c", "a", "b" } })
    end)

    it("writes an employee with only custom_id", function()
      assert_json('{"customer":' .. MIN_CUSTOMER .. ',"employee":{"custom_id":"E-7"},'
        .. '"channel":"phone","ext_interaction_id":"123456"}',
        req { employee = { custom_id = "E-7" } })
    end)

    it("sorts custom_properties keys by byte value", function()
      assert_json(MIN_HEAD .. ',"custom_properties":{"Beta":"3","_x":"4","a":"6","a b":"5","ab":"7","alpha":"2","zeta":"1"}}',
        req { custom_properties = {
          zeta = "1", alpha = "2", Beta = "3", _x = "4", ["a b"] = "5", a = "6", ab = "7",
        } })
    end)

    it("sorts non-ASCII custom_properties keys by byte value after ASCII", function()
      assert_json(MIN_HEAD .. ',"custom_properties":{"z":"1","é":"2","李":"3"}}',
        req { custom_properties = { ["李"] = "3", ["é"] = "2", z = "1" } })
    end)

    it("encodes a recovery in recovery field order", function()
      assert_json('{"employee":{"email":"paul@example.com","custom_id":"E-7"},'
        .. '"initial_feedback_request_id":"abc",'
        .. '"ext_interaction_id":"99",'
        .. '"external_url":"example.com/t/99",'
        .. '"tags":["x"],'
        .. '"do_not_send":true}',
        {
          do_not_send = true,
          tags = { "x" },
          external_url = "example.com/t/99",
          ext_interaction_id = 99,
          initial_feedback_request_id = "abc",
          employee = { custom_id = "E-7", email = "paul@example.com" },
        }, "recovery")
    end)

    it("encodes a minimal recovery", function()
      assert_json('{"employee":{"email":"paul@example.com"},"initial_feedback_request_id":"abc"}',
        { employee = { email = "paul@example.com" }, initial_feedback_request_id = "abc" }, "recovery")
    end)
  end)

  describe("numbers", function()
    it("writes an integer ext_interaction_id as its decimal string", function()
      local r = req { ext_interaction_id = 123456 }
      assert_json(MIN_HEAD .. "}", r)
    end)

    it("writes an integral float ext_interaction_id without a fraction", function()
      assert_json(MIN_HEAD .. "}", req { ext_interaction_id = 123456.0 })
    end)

    it("writes 2^53 - 1 exactly", function()
      assert_json('{"customer":' .. MIN_CUSTOMER .. ',"employee":{"email":"paulagent@blancapeak.com"},'
        .. '"channel":"phone","ext_interaction_id":"9007199254740991"}',
        req { ext_interaction_id = 2 ^ 53 - 1 })
    end)

    it("writes an integer initial_feedback_request_id as a string", function()
      assert_json('{"employee":{"custom_id":"E-7"},"initial_feedback_request_id":"987"}',
        { employee = { custom_id = "E-7" }, initial_feedback_request_id = 987 }, "recovery")
    end)

    it("writes integral custom property numbers as integers in strings", function()
      assert_json(MIN_HEAD .. ',"custom_properties":{"a":"42","b":"42","c":"-7","d":"0"}}',
        req { custom_properties = { a = 42, b = 42.0, c = -7, d = 0 } })
    end)

    it("writes other custom property numbers with 14 significant digits", function()
      assert_json(MIN_HEAD .. ',"custom_properties":{"a":"0.25","b":"0.33333333333333","c":"-1.5"}}',
        req { custom_properties = { a = 0.25, b = 1 / 3, c = -1.5 } })
    end)
  end)

  describe("empty containers", function()
    it("tags = {} is []", function()
      assert_json(MIN_HEAD .. ',"tags":[]}', req { tags = {} })
    end)

    it("custom_properties = {} is {}", function()
      assert_json(MIN_HEAD .. ',"custom_properties":{}}', req { custom_properties = {} })
    end)

    it("both empty together", function()
      assert_json(MIN_HEAD .. ',"tags":[],"custom_properties":{}}',
        req { tags = {}, custom_properties = {} })
    end)
  end)

  describe("strings", function()
    local function with_name(json_name)
      return '{"customer":{"name":' .. json_name .. ',"email":"janecustomer@example.com"},'
        .. '"employee":{"email":"paulagent@blancapeak.com"},"channel":"phone","ext_interaction_id":"123456"}'
    end

    it("escapes a double quote and a backslash", function()
      assert_json(with_name([["Jane \"JJ\" O\\Brien"]]), req { ["customer.name"] = 'Jane "JJ" O\\Brien' })
    end)

    it("escapes newline and tab as \\n and \\t", function()
      assert_json(with_name([["a\nb\tc"]]), req { ["customer.name"] = "a\nb\tc" })
    end)

    it("escapes a carriage return as \\r; other control characters do not validate", function()
      assert_json(with_name([["a\r\nb"]]), req { ["customer.name"] = "a\r\nb" })
      local body, errs = stella.encode(req { ["customer.name"] = "a\1b\16c\25d" })
      assert.is_nil(body)
      assert.equal("control_character", errs[1].code)
    end)

    it("passes DEL (0x7F) through unescaped", function()
      assert_json(with_name('"a\127b"'), req { ["customer.name"] = "a\127b" })
    end)

    it("passes non-ASCII through as raw UTF-8 bytes", function()
      assert_json(with_name('"Zoë Åkesson"'), req { ["customer.name"] = "Zoë Åkesson" })
      assert_json(with_name('"李雷"'), req { ["customer.name"] = "李雷" })
      assert_json(with_name('"Jane 😀"'), req { ["customer.name"] = "Jane 😀" })
    end)

    it("never writes \\u escapes for non-ASCII", function()
      local json = assert(stella.encode(req { ["customer.name"] = "Zoë 李雷 😀", tags = { "é" } }))
      assert.is_nil(json:find("\\u", 1, true))
    end)

    it("does not escape /", function()
      assert_json(MIN_HEAD .. ',"external_url":"https://example.com/a/b?c=d/e"}',
        req { external_url = "https://example.com/a/b?c=d/e" })
    end)

    it("escapes tags, custom property keys and values", function()
      assert_json(MIN_HEAD .. [[,"tags":["a\"b","c\\d"],"custom_properties":{"k\"1":"v\n1"}}]],
        req { tags = { 'a"b', "c\\d" }, custom_properties = { ['k"1'] = "v\n1" } })
    end)
  end)

  describe("booleans", function()
    it("do_not_send = false is false", function()
      assert_json(MIN_HEAD .. ',"do_not_send":false}', req { do_not_send = false })
    end)

    it("do_not_send = true is true", function()
      assert_json(MIN_HEAD .. ',"do_not_send":true}', req { do_not_send = true })
    end)
  end)

  describe("invalid input", function()
    it("returns nil and the same errors as validate", function()
      local r = req { ["customer.email"] = "a@", channel = NONE, tags = { "" }, bogus = 1 }
      local json, errs = stella.encode(r)
      assert.is_nil(json)
      assert.is_table(errs)
      local ok, verrs = stella.validate(r)
      assert.is_nil(ok)
      assert.same(verrs, errs)
      local got = {}
      for i, e in ipairs(errs) do got[i] = { e.path, e.code } end
      assert.same({
        { "customer.email", "invalid_email" },
        { "channel", "required" },
        { "tags[1]", "empty" },
        { "bogus", "unknown_field" },
      }, got)
    end)

    it("applies opts.channels", function()
      local json, errs = stella.encode(req { channel = "sms" }, "request", { channels = { "phone" } })
      assert.is_nil(json)
      assert.same("channel", errs[1].path)
      assert.same("unknown_channel", errs[1].code)
      assert_json(MIN_HEAD .. "}", req(), "request", { channels = { "phone" } })
    end)

    it("validates against the kind it is given", function()
      local json, errs = stella.encode(req(), "recovery")
      assert.is_nil(json)
      assert.is_table(errs)
    end)

    it("raises for a non-table request", function()
      assert.has_error(function() stella.encode(nil) end)
      assert.has_error(function() stella.encode("{}") end)
    end)

    it("raises for an unknown kind", function()
      assert.has_error(function() stella.encode(req(), "bogus") end)
    end)
  end)

  describe("determinism", function()
    local function full()
      return req {
        ["customer.custom_id"] = "C-1",
        ["employee.custom_id"] = "E-7",
        external_url = "example.com/ticket/1",
        do_not_send = false,
        tags = { "b", "a" },
        brand = "blancapeak",
        language = "pt-BR",
        country = "br",
        custom_properties = { one = "1", two = 2, three = "3", four = 4.5, five = "5", six = "6" },
      }
    end

    it("gives identical bytes when the same table is encoded twice", function()
      local r = full()
      local a = assert(stella.encode(r))
      local b = assert(stella.encode(r))
      assert.equal(a, b)
    end)

    it("gives identical bytes for a table built with keys inserted in another order", function()
      local r = {}
      r.custom_properties = {}
      for _, k in ipairs { "six", "five", "four", "three", "two", "one" } do
        r.custom_properties[k] = full().custom_properties[k]
      end
      r.country = "br"
      r.language = "pt-BR"
      r.brand = "blancapeak"
      r.tags = { "b", "a" }
      r.do_not_send = false
      r.external_url = "example.com/ticket/1"
      r.ext_interaction_id = "123456"
      r.channel = "phone"
      r.employee = { custom_id = "E-7" }
      r.employee.email = "paulagent@blancapeak.com"
      r.customer = { custom_id = "C-1" }
      r.customer.email = "janecustomer@example.com"
      r.customer.name = "Jane"
      assert.equal(assert(stella.encode(full())), assert(stella.encode(r)))
    end)

    it("gives the expected bytes for the full table", function()
      assert_json('{"customer":{"name":"Jane","email":"janecustomer@example.com","custom_id":"C-1"},'
        .. '"employee":{"email":"paulagent@blancapeak.com","custom_id":"E-7"},'
        .. '"channel":"phone","ext_interaction_id":"123456","external_url":"example.com/ticket/1",'
        .. '"do_not_send":false,"tags":["b","a"],"brand":"blancapeak","language":"pt-BR","country":"br",'
        .. '"custom_properties":{"five":"5","four":"4.5","one":"1","six":"6","three":"3","two":"2"}}',
        full())
    end)

    it("does not depend on the table's hash layout (many custom properties)", function()
      local keys = {}
      for i = 1, 200 do keys[i] = string.format("k%03d", i) end
      local forward, backward = {}, {}
      for i = 1, #keys do forward[keys[i]] = i end
      for i = #keys, 1, -1 do backward[keys[i]] = i end
      local a = assert(stella.encode(req { custom_properties = forward }))
      local b = assert(stella.encode(req { custom_properties = backward }))
      assert.equal(a, b)
      assert.truthy(a:find('"k001":"1","k002":"2"', 1, true))
      assert.truthy(a:find('"k199":"199","k200":"200"}}', 1, true))
    end)
  end)
end)
