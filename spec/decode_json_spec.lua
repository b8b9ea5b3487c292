-- Specs for stella.decode_json (stella.core.decode_json): strict JSON text to Lua values.
local stella = require "stella"
local core = require "stella.core"

local decode = stella.decode_json

describe("stella.decode_json", function()
  it("is the core's function", function()
    assert.equal(core.decode_json, stella.decode_json)
  end)

  it("decodes objects, arrays, strings, booleans and numbers", function()
    local v = assert(decode('{"a": {"b": [1, 2.5, "x", true, false]}, "s": "Zo\\u00eb \\ud83d\\ude00"}'))
    assert.same({ a = { b = { 1, 2.5, "x", true, false } }, s = "Zoë 😀" }, v)
    assert.same({}, decode("{}"))
    assert.same({}, decode("[]"))
    assert.equal("x", decode('"x"'))
    assert.equal(3, decode(" 3 "))
  end)

  it("gives integers within 2^53 as numbers (integers under Lua 5.4)", function()
    local v = assert(decode('{"a": 48211, "b": -9007199254740992, "c": 9007199254740992, "d": 2.0}'))
    assert.equal(48211, v.a)
    assert.equal(-2^53, v.b)
    assert.equal(2^53, v.c)
    assert.equal(2, v.d)
    if math.type then
      assert.equal("integer", math.type(v.a))
      assert.equal("integer", math.type(v.c))
      assert.equal("integer", math.type(v.d))
    end
  end)

  it("gives integers past 2^53 as their exact decimal strings", function()
    local v = assert(decode('{"a": 9007199254740993, "b": 9007199254740992, "c": -9007199254740993, '
      .. '"d": 9223372036854775807, "e": -9223372036854775808}'))
    assert.equal("9007199254740993", v.a)
    assert.equal(9007199254740992, v.b)
    assert.are_not.equal(tostring(v.a), ("%d"):format(v.b))
    assert.equal("-9007199254740993", v.c)
    assert.equal("9223372036854775807", v.d)
    assert.equal("-9223372036854775808", v.e)
  end)

  it("gives other numbers as floats", function()
    local v = assert(decode('[1.5, 1e16, -0.25, 1e400]'))
    assert.equal(1.5, v[1])
    assert.equal(1e16, v[2])
    assert.equal(-0.25, v[3])
    assert.equal(math.huge, v[4])
  end)

  it("drops null, or puts opts.null in its place", function()
    assert.same({ a = 1, t = { "x", "y" } }, decode('{"a": 1, "b": null, "t": ["x", null, "y"]}'))
    local N = {}
    local v = decode('{"a": 1, "b": null, "t": ["x", null, "y"]}', { null = N })
    assert.equal(N, v.b)
    assert.equal(N, v.t[2])
    assert.equal(3, #v.t)
    assert.is_nil(decode("null"))
    assert.equal(false, decode("null", { null = false }))
  end)

  it("refuses a repeated key, naming it with its path and position", function()
    local v, err = decode('{"channel": "phone", "x": 1, "channel": "chat"}')
    assert.is_nil(v)
    assert.same({ code = "duplicate_key", message = 'duplicate key "channel"', path = "channel",
                  line = 1, column = 30, offset = 29 }, err)
    v, err = decode('{"customer": {"email": null,\n "name": "x", "email": "a@b.c"}}')
    assert.is_nil(v)
    assert.equal("duplicate_key", err.code)
    assert.equal("customer.email", err.path)
    assert.same({ 2, 15 }, { err.line, err.column })
    v, err = decode('{"tags": [{"a": 1, "\\u0061": 2}]}')
    assert.is_nil(v)
    assert.equal("tags[1].a", err.path)
    assert.is_nil(err.line)   -- an escaped key has no place in the text
  end)

  it("reports a syntax error with its line and column", function()
    local v, err = decode('{\n  "a": tru}')
    assert.is_nil(v)
    assert.same({ code = "syntax", message = "invalid literal (expected true, false or null)",
                  line = 2, column = 8, offset = 9 }, err)
    v, err = decode("{")
    assert.same({ "syntax", "unexpected end of input", 1, 2 }, { err.code, err.message, err.line, err.column })
    v, err = decode("")
    assert.same({ "syntax", 1, 1 }, { err.code, err.line, err.column })
    v, err = decode('{"a": 1} x')
    assert.same({ "syntax", "trailing characters after the document", 10 },
                { err.code, err.message, err.column })
    v, err = decode('{"a": 1,}')
    assert.equal("syntax", err.code)
  end)

  it("refuses a document nested too deep", function()
    local v, err = decode(("["):rep(65) .. ("]"):rep(65))
    assert.is_nil(v)
    assert.equal("depth", err.code)
    assert.equal(65, err.column)
    local ok = assert(decode(("["):rep(64) .. ("]"):rep(64)))
    assert.is_table(ok)
  end)

  it("decodes a large document and then a small one", function()
    local items = {}
    for i = 1, 50000 do items[i] = ('{"id": %d, "name": "n%d"}'):format(i, i) end
    local v = assert(decode("[" .. table.concat(items, ",") .. "]"))
    assert.equal(50000, #v)
    assert.same({ id = 50000, name = "n50000" }, v[50000])
    assert.same({ a = 1 }, decode('{"a": 1}'))
  end)

  it("raises on misuse", function()
    assert.has_error(function() decode(nil) end)
    assert.has_error(function() decode({}) end)
    assert.has_error(function() decode("{}", 5) end)
  end)
end)
