-- stella.sandbox.config: the sandbox's company settings, loaded from a Lua file that
-- returns a table (see files/config.lua beside it, the documented default), checked and
-- normalised for fast look-ups. Plain Lua 5.1 (no C module needed, stella.core is used
-- for the e-mail check when present): it runs in the `stella` command (to report a
-- mistake before nginx starts) and inside nginx (LuaJIT).
--
--   local config = require "stella.sandbox.config"
--   local conf, err = config.load(path)     -- from a file
--   local conf, err = config.check(table)   -- from a table (the specs)
--
-- A normalised config keeps every field of the file and adds:
--   modes           { [key] = "test" | "production" }
--   by_email        { [lower-case e-mail] = employee }
--   by_custom_id    { [custom_id] = employee }
--   brand_by_name   { [name] = brand }
--   multi_brand     more than one brand
--   multi_language  more than one language
--   unsubscribed_set, invalid_customer_set   { [lower-case e-mail] = true }
local error, ipairs, pairs, pcall, tostring, type =
      error, ipairs, pairs, pcall, tostring, type
local lower, floor = string.lower, math.floor

local M = {}

local core_ok, core = pcall(require, "stella.core")

local DEFAULTS = {
  company = "Sandbox Company",
  languages = { "en" },
  suppression_days = 7,
  log_limit = 500,
  test_controls = false,
}

local KNOWN = {
  company = "string", test_email = "string", keys = "table", channels = "table",
  employees = "table", brands = "table", languages = "table", suppression_days = "number",
  unsubscribed = "table", invalid_customers = "table", log_limit = "number",
  test_controls = "boolean",
}

local function email_ok(s)
  if type(s) ~= "string" or s == "" or #s > 254 then return false end
  if core_ok and core.email_valid then return core.email_valid(s) end
  return s:match("^[^@%s]+@[%w%-]+[%.%w%-]*$") ~= nil
end

local function key_ok(s)
  return type(s) == "string" and #s >= 8 and not s:find("[%s%c]")
end

-- Checks a config table; returns the normalised copy or nil, message.
function M.check(t, name)
  name = name or "sandbox config"
  local function fail(fmt, ...)
    error(name .. ": " .. fmt:format(...), 0)
  end
  local ok, res = pcall(function()
    if type(t) ~= "table" then fail("must return a table, got %s", type(t)) end
    for k, v in pairs(t) do
      local want = KNOWN[k]
      if not want then fail("unknown setting %s", tostring(k)) end
      if type(v) ~= want then fail("%s must be a %s, got %s", k, want, type(v)) end
    end
    local c = {}
    for k, v in pairs(DEFAULTS) do c[k] = v end
    for k, v in pairs(t) do c[k] = v end

    if c.company == "" then fail("company must not be empty") end
    if not email_ok(c.test_email) then
      fail("test_email must be the company's test/monitoring e-mail address")
    end

    -- keys: exactly one test and one production key
    local keys = c.keys
    if type(keys) ~= "table" then fail("keys = { test = ..., production = ... } is required") end
    for k in pairs(keys) do
      if k ~= "test" and k ~= "production" then fail("keys has an unknown entry %s", tostring(k)) end
    end
    for _, mode in ipairs{ "test", "production" } do
      if not key_ok(keys[mode]) then
        fail("keys.%s must be a string of at least 8 characters without spaces", mode)
      end
    end
    if keys.test == keys.production then fail("the test and production keys must differ") end
    c.modes = { [keys.test] = "test", [keys.production] = "production" }

    -- channels: { name = "integrated" | "manual" }
    local channels = {}
    for ch, mode in pairs(c.channels or { phone = "integrated", chat = "integrated", email = "integrated" }) do
      if type(ch) ~= "string" or ch == "" then fail("channels must map channel names to a mode") end
      if mode ~= "integrated" and mode ~= "manual" then
        fail("channel %s: mode must be \"integrated\" or \"manual\", not %s", ch, tostring(mode))
      end
      channels[ch] = mode
    end
    c.channels = channels

    -- employees
    c.by_email, c.by_custom_id = {}, {}
    local employees = {}
    for i, e in ipairs(c.employees or {}) do
      local where = "employees[" .. i .. "]"
      if type(e) ~= "table" then fail("%s must be a table", where) end
      for k in pairs(e) do
        if k ~= "email" and k ~= "custom_id" and k ~= "name" and k ~= "active" and k ~= "profile_complete" then
          fail("%s has an unknown field %s", where, tostring(k))
        end
      end
      if e.email == nil and e.custom_id == nil then fail("%s needs an email or a custom_id", where) end
      if e.email ~= nil and not email_ok(e.email) then fail("%s.email is not an e-mail address", where) end
      if e.custom_id ~= nil and (type(e.custom_id) ~= "string" or e.custom_id == "") then
        fail("%s.custom_id must be a non-empty string", where)
      end
      for _, flag in ipairs{ "active", "profile_complete" } do
        if e[flag] ~= nil and type(e[flag]) ~= "boolean" then fail("%s.%s must be a boolean", where, flag) end
      end
      local emp = { email = e.email, custom_id = e.custom_id, name = e.name,
                    active = e.active ~= false, profile_complete = e.profile_complete ~= false }
      if emp.email then
        local k = lower(emp.email)
        if c.by_email[k] then fail("%s: the e-mail %s is listed twice", where, emp.email) end
        c.by_email[k] = emp
      end
      if emp.custom_id then
        if c.by_custom_id[emp.custom_id] then fail("%s: the custom_id %s is listed twice", where, emp.custom_id) end
        c.by_custom_id[emp.custom_id] = emp
      end
      employees[i] = emp
    end
    c.employees = employees

    -- brands: a list of { name = ..., active = true } (or of names)
    c.brand_by_name = {}
    local brands = {}
    for i, b in ipairs(c.brands or {}) do
      if type(b) == "string" then b = { name = b } end
      local where = "brands[" .. i .. "]"
      if type(b) ~= "table" or type(b.name) ~= "string" or b.name == "" then
        fail("%s must be a brand name or { name = ..., active = true }", where)
      end
      for k in pairs(b) do
        if k ~= "name" and k ~= "active" then fail("%s has an unknown field %s", where, tostring(k)) end
      end
      if b.active ~= nil and type(b.active) ~= "boolean" then fail("%s.active must be a boolean", where) end
      if c.brand_by_name[b.name] then fail("%s: brand %s is listed twice", where, b.name) end
      local brand = { name = b.name, active = b.active ~= false }
      c.brand_by_name[b.name] = brand
      brands[i] = brand
    end
    c.brands = brands
    c.multi_brand = #brands > 1
    -- the suppression scope of a request without a brand
    c.default_brand = #brands == 1 and brands[1].name or ""

    -- languages
    local languages = {}
    for i, l in ipairs(c.languages) do
      if type(l) ~= "string" or l == "" then fail("languages[%d] must be a language code", i) end
      languages[i] = l
    end
    if #languages == 0 then fail("languages must list at least one language") end
    c.languages = languages
    c.multi_language = #languages > 1

    local days = c.suppression_days
    if days < 0 or days ~= days then fail("suppression_days must be 0 or more") end

    local function email_set(field)
      local set, list = {}, {}
      for i, e in ipairs(c[field] or {}) do
        if not email_ok(e) then fail("%s[%d] is not an e-mail address", field, i) end
        set[lower(e)] = true
        list[i] = e
      end
      c[field] = list
      return set
    end
    c.unsubscribed_set = email_set("unsubscribed")
    c.invalid_customer_set = email_set("invalid_customers")

    if c.log_limit < 1 or c.log_limit ~= floor(c.log_limit) then
      fail("log_limit must be a whole number of at least 1")
    end
    return c
  end)
  if not ok then return nil, tostring(res) end
  return res
end

-- Runs a config file in an environment with only harmless globals (os.getenv lets a
-- config take its keys from the environment). Returns the normalised config or nil,
-- message.
function M.load(path)
  if type(path) ~= "string" then error("sandbox config: a file name expected", 2) end
  local f, ferr = io.open(path, "rb")
  if not f then return nil, "sandbox config: cannot read " .. tostring(ferr) end
  local text = f:read("*a")
  f:close()
  local env = {
    os = { getenv = os.getenv, time = os.time }, string = string, table = table, math = math,
    pairs = pairs, ipairs = ipairs, tostring = tostring, tonumber = tonumber, type = type,
    error = error, assert = assert, select = select,
  }
  local chunk, lerr
  if setfenv then   -- Lua 5.1 / LuaJIT
    chunk, lerr = loadstring(text, "@" .. path)
    if chunk then setfenv(chunk, env) end
  else
    chunk, lerr = load(text, "@" .. path, "t", env)
  end
  if not chunk then return nil, "sandbox config: " .. tostring(lerr) end
  local ok, t = pcall(chunk)
  if not ok then return nil, "sandbox config: " .. tostring(t) end
  return M.check(t, path)
end

-- Writes a plain-data table (strings, numbers, booleans, tables) as a Lua file that
-- returns it, for configs given as a table.
function M.serialize(t)
  local out = {}
  local function write(v, indent)
    local tv = type(v)
    if tv == "string" then out[#out + 1] = ("%q"):format(v):gsub("\\\n", "\\n")
    elseif tv == "number" then
      out[#out + 1] = (v == floor(v) and v > -2^53 and v < 2^53) and ("%d"):format(v) or ("%.17g"):format(v)
    elseif tv == "boolean" then out[#out + 1] = tostring(v)
    elseif tv == "table" then
      out[#out + 1] = "{\n"
      local n = #v
      for i = 1, n do
        out[#out + 1] = indent .. "  "
        write(v[i], indent .. "  ")
        out[#out + 1] = ",\n"
      end
      local keys = {}
      for k in pairs(v) do
        if not (type(k) == "number" and k >= 1 and k <= n and k == floor(k)) then keys[#keys + 1] = k end
      end
      table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
      for _, k in ipairs(keys) do
        out[#out + 1] = indent .. "  ["
        write(k, indent .. "  ")
        out[#out + 1] = "] = "
        write(v[k], indent .. "  ")
        out[#out + 1] = ",\n"
      end
      out[#out + 1] = indent .. "}"
    else
      error("sandbox config: cannot write a " .. tv, 0)
    end
  end
  write(t, "")
  return "return " .. table.concat(out) .. "\n"
end

return M
