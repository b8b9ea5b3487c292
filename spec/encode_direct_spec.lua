-- Specs for stella.encode's one pass (csrc/lstella_encode.c): a Lua table straight to
-- canonical JSON. It must give the same bytes as the value-tree path (to_value,
-- stella_validate, stella_encode_json: stella.core.encode_tree) for every valid request
-- and must never take one the tree path rejects; stella.encode and stella.validate must
-- answer exactly as the tree path does, errors included.
--   1. the encode and validate specs, run again with every call checked against the tree
--   2. the examples' requests and generated variants (a fixed seed) of valid requests

local stella = require "stella"
local core = require "stella.core"

local cjson_ok, cjson = pcall(require, "cjson")

-- Compares one call's answers: stella.encode/validate (the one pass, else the tree), the
-- tree alone and the one pass alone. Raises (failing the spec in which it ran) on any
-- difference; returns what the real function returned.
local stats = { calls = 0, direct = 0 }

local function same_errors(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do
    if a[i].path ~= b[i].path or a[i].code ~= b[i].code or a[i].message ~= b[i].message then
      return false
    end
  end
  return true
end

local function compare(what, real_json, real_errs, ...)
  local tree_json, tree_errs = core.encode_tree(...)
  local direct = core.encode_direct(...)
  stats.calls = stats.calls + 1
  if direct ~= false then
    stats.direct = stats.direct + 1
    if direct ~= tree_json then
      error(("%s: the one pass wrote %s, the tree path %s"):format(what, direct,
        tostring(tree_json) .. (tree_errs and (" (errors: " .. tree_errs[1].code .. " at "
        .. tree_errs[1].path .. ")") or "")), 2)
    end
  end
  if what == "encode" then
    if real_json ~= tree_json then
      error(("encode: %s, the tree path %s"):format(tostring(real_json), tostring(tree_json)), 2)
    end
  elseif (real_json == true) ~= (tree_json ~= nil) then
    error("validate: " .. tostring(real_json) .. ", the tree path " .. tostring(tree_json), 2)
  end
  if (real_errs == nil) ~= (tree_errs == nil) or (real_errs and not same_errors(real_errs, tree_errs)) then
    error(what .. ": the errors differ from the tree path's", 2)
  end
end

local function checked(name, real)
  return function(...)
    local a, b = real(...)   -- misuse raises here, as it would unchecked
    compare(name, a, b, ...)
    return a, b
  end
end

-- A spec file loaded into this file's environment, so that its describe blocks nest here.
local function load_spec(path)
  local chunk
  if rawget(_G, "setfenv") then
    chunk = assert(loadfile(path))
    setfenv(chunk, getfenv(1))
  else
    chunk = assert(loadfile(path, "t", _ENV))
  end
  return chunk
end

describe("stella.encode's one pass against the value-tree path", function()
  local real_encode, real_validate = stella.encode, stella.validate

  describe("on the encode and validate specs", function()
    setup(function()
      stats.calls, stats.direct = 0, 0
      stella.encode = checked("encode", real_encode)
      stella.validate = checked("validate", real_validate)
    end)
    teardown(function()
      stella.encode, stella.validate = real_encode, real_validate
    end)

    load_spec("spec/encode_spec.lua")()
    load_spec("spec/validate_spec.lua")()

    it("checked the calls, and the one pass took many of them", function()
      assert.is_true(stats.calls > 150, "only " .. stats.calls .. " calls were checked")
      assert.is_true(stats.direct > 50, "the one pass took only " .. stats.direct .. " requests")
    end)
  end)

  describe("on generated requests", function()
    local NULL = cjson_ok and cjson.null or nil

    local function copy(v)
      if type(v) ~= "table" then return v end
      local t = {}
      for k, x in pairs(v) do t[k] = copy(x) end
      return t
    end

    local FULL = {
      customer = { name = "Zoë Åkesson", email = "zoe.akesson@example.com", custom_id = "cust-8812" },
      employee = { email = "paulagent@blancapeak.com", custom_id = "emp-77" },
      channel = "phone",
      ext_interaction_id = 123456,
      external_url = "https://support.example.com/tickets/123456?view=full",
      do_not_send = false,
      tags = { "billing", "refund", "priority-high" },
      brand = "Blanca Peak 日本",
      language = "es-419",
      country = "us",
      custom_properties = { order_id = "ORD-99812", plan = "premium", seats = 12, score = 0.75,
                            note = "«quoted» \"and\" \\ \n\t\r escaped", [""] = nil },
    }
    local MINIMAL = {
      customer = { name = "Jane", email = "jane@example.com" },
      employee = { custom_id = "agent-7" },
      channel = "chat",
      ext_interaction_id = "T-1",
    }
    local RECOVERY = {
      employee = { email = "paulagent@blancapeak.com" },
      initial_feedback_request_id = "6f1c",
      ext_interaction_id = 99,
      tags = { "x" },
      do_not_send = true,
    }

    local function hash_list(n)   -- a list kept in the hash part, filled backwards
      local t = {}
      for i = n, 1, -1 do t[i] = "tag" .. i end
      return t
    end
    local function many_props(n)
      local t = {}
      for i = 1, n do t["k" .. i] = i % 2 == 0 and ("v" .. i) or i end
      return t
    end

    local VALUES = {
      "", "x", "Jane", "a@b.c", "jane@example.com", "a@-b.c", "a b@c.d", "é@x.y",
      string.rep("x", 245) .. "@example.com", "\192\128", "ok\195", "\237\160\128", "Zoë",
      "en", "en-US", "es-419", "EN", "xx", "us", "XK", "uk", "usa", "phone", "chat",
      "https://x.example/a b", "https://x.example/\194\160", "https://x.example/ok?a=1",
      string.rep("t", 2001), string.rep("é", 2000), string.rep("é", 2001), "\"quote\\",
      0, 1, -7, 42, 1.5, 2 ^ 53, 2 ^ 53 + 2, -0.0, 0 / 0, math.huge, -math.huge,
      true, false, print, {}, { "a" }, { "a", "b" }, { a = "x" }, { a = 1.5, b = "c" },
      { "a", nil, "c" }, { [2] = "b" }, { [1] = "a", x = "c" }, { a = { b = "c" } },
      { [1] = "x" }, { [""] = "x" }, { ["k\255"] = "x" }, { a = true }, { a = 0 / 0 },
      { name = "N", email = "n@example.com" }, { email = "e@example.com" }, { custom_id = "c" },
      { name = "N", email = "n@example.com", nmae = "x" },
      hash_list(3), hash_list(20), hash_list(21), many_props(16), many_props(40),
    }
    if NULL then VALUES[#VALUES + 1] = NULL end
    if math.type then VALUES[#VALUES + 1] = 3.0 end   -- Lua 5.4: an integral float

    local PATHS = {
      "customer", "customer.name", "customer.email", "customer.custom_id", "customer.nmae",
      "employee", "employee.email", "employee.custom_id", "channel", "chanel",
      "ext_interaction_id", "external_url", "do_not_send", "tags", "brand", "language",
      "country", "custom_properties", "custom_properties.a", "custom_properties.order_id",
      "initial_feedback_request_id", "extra", "tags.2",
    }

    local function set(r, path, value)
      local head, key = path:match("^([^.]+)%.(.+)$")
      local parent = r
      if head then
        if type(r[head]) ~= "table" then return end
        parent = r[head]
        key = tonumber(key) or key
      else
        key = path
      end
      parent[key] = copy(value)
    end

    it("gives the tree path's answers for thousands of variants", function()
      math.randomseed(14)
      local bases = { { FULL, "request" }, { MINIMAL, "request" }, { RECOVERY, "recovery" } }
      local opts_list = { false, { channels = { "phone", "email" } }, { channels = { chat = true } } }
      stats.calls, stats.direct = 0, 0
      local valid = 0
      for _ = 1, 6000 do
        local base = bases[math.random(#bases)]
        local r = copy(base[1])
        for _ = 1, math.random(0, 3) do
          local v = math.random(#VALUES + 2)
          set(r, PATHS[math.random(#PATHS)], v <= #VALUES and VALUES[v] or nil)
        end
        local opts = opts_list[math.random(#opts_list)]
        local json, errs
        if opts then
          json, errs = stella.encode(r, base[2], opts)
          compare("encode", json, errs, r, base[2], opts)
          compare("validate", stella.validate(r, base[2], opts), select(2, stella.validate(r, base[2], opts)),
                  r, base[2], opts)
        else
          json, errs = stella.encode(r, base[2])
          compare("encode", json, errs, r, base[2])
        end
        if json then valid = valid + 1 end
      end
      assert.is_true(valid > 500, "only " .. valid .. " variants were valid")
      assert.is_true(stats.direct > 500, "the one pass took only " .. stats.direct)
    end)

    it("takes every valid base request", function()
      for _, base in ipairs{ { FULL, "request" }, { MINIMAL, "request" }, { RECOVERY, "recovery" } } do
        local direct = core.encode_direct(base[1], base[2])
        assert.is_string(direct)
        assert.are.equal(core.encode_tree(base[1], base[2]), direct)
      end
    end)

    it("gives the same answers for the examples' tickets", function()
      local n = 0
      for line in io.lines("examples/interactions.jsonl") do
        local t = stella.decode_json(line) or {}   -- the file has malformed lines on purpose
        local r = {
          customer = t.requester and { name = t.requester.name, email = t.requester.email },
          employee = t.assignee and { email = t.assignee.email },
          channel = t.channel, ext_interaction_id = t.id, brand = t.brand, tags = t.tags,
          language = t.locale, external_url = t.url,
        }
        local json, errs = stella.encode(r)
        compare("encode", json, errs, r)
        n = n + 1
      end
      assert.is_true(n > 5, "only " .. n .. " tickets")
    end)
  end)
end)
