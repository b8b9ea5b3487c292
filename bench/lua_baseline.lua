-- bench/lua_baseline.lua: a plain-Lua validator of the Stella Connect request schema
-- (the same checks as the C core, see README.md "API"), used as the baseline of
-- bench/validate_encode.lua. Runs under Lua 5.4 and LuaJIT.
--
--   local base = require "lua_baseline"      (with bench/ on package.path)
--   base.validate(req [, channels])   -> out | nil, errors   (out: the normalised request)
--   base.encode(req [, channels])     -> json | nil, errors  (validate + cjson.encode(out))
--   base.encode_canonical(req [, channels]) -> json | nil, errors
--        (validate + a plain-Lua encoder writing the C core's canonical bytes: keys in
--         schema order, custom_properties sorted, no "\/" escaping)
--
-- errors is a list of { path = ..., code = ..., message = ... }. Within an object
-- the known fields come in schema order, then the unknown keys sorted; within
-- custom_properties the order is that of pairs() (the C core sorts by key).
--
-- The code is written to be reasonably fast: locals for library functions, Lua
-- patterns (string.find) for the character-class checks, hash sets for the ISO code
-- lists, constant paths for the fixed fields, no string building on the valid path,
-- and the validated sub-tables are reused (not copied) in the normalised output.

local cjson = require "cjson"

local type, pairs, ipairs, error = type, pairs, ipairs, error
local byte, find, sub, fmt, gsub, lower, upper, concat, sort =
      string.byte, string.find, string.sub, string.format, string.gsub, string.lower,
      string.upper, table.concat, table.sort
local mtype = math.type                 -- nil on LuaJIT
local utf8_len = utf8 and utf8.len      -- Lua 5.4: strict UTF-8 (no surrogates, <= U+10FFFF)
local cjson_encode = cjson.encode

local M = {}

local MAX_TAGS, MAX_TEXT_CHARS, MAX_EMAIL_BYTES = 20, 2000, 254
local TWO53 = 2 ^ 53

---------------------------------------------------------------------------
-- ISO code lists, read from the C core's generated tables (csrc/stella_codes.c)
---------------------------------------------------------------------------

local function here()
  local src = debug.getinfo(1, "S").source
  local dir = src:sub(1, 1) == "@" and src:sub(2):match("^(.*)/[^/]*$") or nil
  return dir or "."
end

local function read_codes()
  local path = here() .. "/../csrc/stella_codes.c"
  local f = io.open(path, "rb")
  if not f then f = assert(io.open("csrc/stella_codes.c", "rb")) end
  local text = f:read("*a")
  f:close()
  local function list(name)
    local body = text:match(name .. "%[%d+%]%[%d+%]%s*=%s*(%b{})")
    assert(body, "lua_baseline: table " .. name .. " not found in stella_codes.c")
    local out = {}
    for code in body:gmatch('"(%w+)"') do out[#out + 1] = code end
    return out
  end
  return list("language_codes"), list("country_codes"), list("m49_area_codes")
end

-- Every case variant of a two-letter code ("en", "EN", "En", "eN"), so the lookups
-- need no string.lower/upper call.
local function alpha2_set(codes)
  local set = {}
  for _, c in ipairs(codes) do
    local a, b = sub(c, 1, 1), sub(c, 2, 2)
    local la, ua, lb, ub = lower(a), upper(a), lower(b), upper(b)
    set[la .. lb], set[la .. ub], set[ua .. lb], set[ua .. ub] = true, true, true, true
  end
  return set
end

local LANGUAGES, COUNTRIES, M49 = {}, {}, {}
do
  local l, c, m = read_codes()
  LANGUAGES, COUNTRIES = alpha2_set(l), alpha2_set(c)
  for _, code in ipairs(m) do M49[code] = true end
end
M.counts = { languages = 0, countries = 0, m49 = 0 }
for _ in pairs(LANGUAGES) do M.counts.languages = M.counts.languages + 1 end
for _ in pairs(COUNTRIES) do M.counts.countries = M.counts.countries + 1 end
for _ in pairs(M49) do M.counts.m49 = M.counts.m49 + 1 end

---------------------------------------------------------------------------
-- Scalar checks
---------------------------------------------------------------------------

-- Strict UTF-8 (RFC 3629) for Lua 5.1/LuaJIT, which has no utf8 library: only the
-- non-ASCII stretches are walked byte by byte.
local function utf8_valid_slow(s)
  local i = find(s, "[\128-\255]")
  while i do
    local c = byte(s, i)
    if c >= 0xC2 and c <= 0xDF then
      local c1 = byte(s, i + 1)
      if not c1 or c1 < 0x80 or c1 > 0xBF then return false end
      i = i + 2
    elseif c >= 0xE0 and c <= 0xEF then
      local c1, c2 = byte(s, i + 1, i + 2)
      if not c2 or c1 < 0x80 or c1 > 0xBF or c2 < 0x80 or c2 > 0xBF then return false end
      if (c == 0xE0 and c1 < 0xA0) or (c == 0xED and c1 > 0x9F) then return false end
      i = i + 3
    elseif c >= 0xF0 and c <= 0xF4 then
      local c1, c2, c3 = byte(s, i + 1, i + 3)
      if not c3 or c1 < 0x80 or c1 > 0xBF or c2 < 0x80 or c2 > 0xBF or c3 < 0x80 or c3 > 0xBF then
        return false
      end
      if (c == 0xF0 and c1 < 0x90) or (c == 0xF4 and c1 > 0x8F) then return false end
      i = i + 4
    else
      return false
    end
    i = find(s, "[\128-\255]", i)
  end
  return true
end

local utf8_valid
if utf8_len then
  utf8_valid = function(s) return utf8_len(s) ~= nil end
else
  utf8_valid = utf8_valid_slow
end

-- Characters of a valid UTF-8 string.
local function char_count(s)
  if utf8_len then return utf8_len(s) end
  local _, cont = gsub(s, "[\128-\191]", "")
  return #s - cont
end

-- WHATWG "valid e-mail address": 1*(atext / ".") "@" label *("." label),
-- label = alnum [*61(alnum / "-") alnum]. (%w is ASCII: Lua runs in the C locale.)
local function email_valid(s)
  local _, at = find(s, "^[%w.!#$%%&'*+/=?^_`{|}~-]+@")
  if not at then return false end
  local n, pos = #s, at + 1
  if pos > n then return false end
  while true do
    local ls, le = find(s, "^[%w-]+", pos)
    if not ls or le - ls >= 63 or byte(s, ls) == 45 or byte(s, le) == 45 then return false end
    if le == n then return true end
    if byte(s, le + 1) ~= 46 then return false end    -- "."
    pos = le + 2
  end
end

-- external_url: ASCII controls, space, DEL, and the non-ASCII whitespace/controls
-- (U+0080-U+00A0, U+1680, U+2000-U+200A, U+2028/9, U+202F, U+205F, U+3000, U+FEFF).
local function url_has_space(s)
  if find(s, "[%z\1- \127]") then return true end
  if find(s, "[\194\225\226\227\239]") then
    return (find(s, "\194[\128-\160]") or find(s, "\225\154\128")
      or find(s, "\226\128[\128-\138\168\169\175]") or find(s, "\226\129\159")
      or find(s, "\227\128\128") or find(s, "\239\187\191")) ~= nil
  end
  return false
end

-- ISO 639-1, optionally "-" and an ISO 3166-1 alpha-2 or UN M.49 area code.
local function language_valid(s)
  local n = #s
  if n == 2 then return LANGUAGES[s] == true end
  if (n ~= 5 and n ~= 6) or byte(s, 3) ~= 45 or not LANGUAGES[sub(s, 1, 2)] then return false end
  if n == 5 then return COUNTRIES[sub(s, 4, 5)] == true end
  return M49[sub(s, 4, 6)] == true
end

local function is_integer(x)     -- x is a number
  if mtype and mtype(x) == "integer" then return true end
  return x % 1 == 0 and x >= -TWO53 and x <= TWO53
end

local function type_name(v)
  local t = type(v)
  if t == "number" then return is_integer(v) and "an integer" or "a number" end
  if t == "boolean" then return "a boolean" end
  if t == "string" then return "a string" end
  if t == "table" then return "a table" end
  return "an unsupported value"
end

---------------------------------------------------------------------------
-- Errors (only built when something is wrong)
---------------------------------------------------------------------------

local function add(errs, path, code, message)
  errs = errs or {}
  errs[#errs + 1] = { path = path, code = code, message = message }
  return errs
end

-- A non-empty UTF-8 string (empty allowed when allow_empty). Returns ok, errs.
local function check_text(errs, path, v, allow_empty)
  if type(v) ~= "string" then
    return false, add(errs, path, "invalid_type", path .. " must be a string, got " .. type_name(v))
  end
  if v == "" and not allow_empty then
    return false, add(errs, path, "empty", path .. " must not be empty")
  end
  if not utf8_valid(v) then
    return false, add(errs, path, "invalid_utf8", path .. " is not valid UTF-8")
  end
  return true, errs
end

local function check_max_chars(errs, path, v)
  if #v > MAX_TEXT_CHARS and char_count(v) > MAX_TEXT_CHARS then
    return add(errs, path, "too_long", path .. " has more than " .. MAX_TEXT_CHARS .. " characters")
  end
  return errs
end

local function check_email(errs, path, v)
  local ok
  ok, errs = check_text(errs, path, v)
  if not ok then return errs end
  if #v > MAX_EMAIL_BYTES then
    return add(errs, path, "too_long", path .. " is longer than 254 bytes")
  end
  if not email_valid(v) then
    return add(errs, path, "invalid_email", path .. " is not a valid e-mail address")
  end
  return errs
end

-- string (non-empty) or integer; returns the value to send, errs
local function check_id(errs, path, v)
  local t = type(v)
  if t == "number" then
    if is_integer(v) then return fmt("%d", v), errs end
    return nil, add(errs, path, "invalid_type",
                    path .. " must be a string or an integer, got a non-integral number")
  end
  if t ~= "string" then
    return nil, add(errs, path, "invalid_type",
                    path .. " must be a string or an integer, got " .. type_name(v))
  end
  local _
  _, errs = check_text(errs, path, v)
  return v, errs
end

local function number_string(x)
  if is_integer(x) then return fmt("%d", x) end
  return fmt("%.14g", x)
end

---------------------------------------------------------------------------
-- Unknown keys (error path only)
---------------------------------------------------------------------------

local function key_rank(k)
  local t = type(k)
  return t == "string" and 0 or t == "number" and 1 or 2
end

local function key_less(a, b)
  local ra, rb = key_rank(a), key_rank(b)
  if ra ~= rb then return ra < rb end
  if ra == 2 then return false end
  return a < b
end

local function key_path(prefix, k)
  if type(k) == "string" and k ~= "" and utf8_valid(k) then
    return prefix == "" and k or prefix .. "." .. k
  end
  if type(k) == "number" and is_integer(k) then return prefix .. fmt("[%d]", k) end
  if k == "" then return prefix .. '[""]' end
  return prefix .. "[?]"
end

local function unknown_keys(errs, t, known, prefix, what)
  local list = {}
  for k in pairs(t) do
    if not known[k] then list[#list + 1] = k end
  end
  sort(list, key_less)
  for i = 1, #list do
    local p = key_path(prefix, list[i])
    errs = add(errs, p, "unknown_field", p .. " is not a field of the " .. what)
  end
  return errs
end

---------------------------------------------------------------------------
-- Objects
---------------------------------------------------------------------------

local CUSTOMER_KNOWN = { name = true, email = true, custom_id = true }
local EMPLOYEE_KNOWN = { email = true, custom_id = true }
local REQUEST_KNOWN = {
  customer = true, employee = true, channel = true, ext_interaction_id = true,
  external_url = true, do_not_send = true, tags = true, brand = true, language = true,
  country = true, custom_properties = true,
}

local function table_type_error(errs, path, v, what)
  return add(errs, path, "invalid_type", what .. " must be a table, got " .. type_name(v))
end

local function check_customer(errs, v)
  if type(v) ~= "table" then return table_type_error(errs, "customer", v, "customer") end
  local name, email, custom_id = v.name, v.email, v.custom_id
  local present, _ = 0, nil
  if name ~= nil then present = 1; _, errs = check_text(errs, "customer.name", name)
  else errs = add(errs, "customer.name", "required", "customer.name is required") end
  if email ~= nil then present = present + 1; errs = check_email(errs, "customer.email", email)
  else errs = add(errs, "customer.email", "required", "customer.email is required") end
  if custom_id ~= nil then present = present + 1; _, errs = check_text(errs, "customer.custom_id", custom_id) end
  -- any key beyond the known ones present is unknown
  local n = 0
  for _ in pairs(v) do n = n + 1 end
  if n ~= present then errs = unknown_keys(errs, v, CUSTOMER_KNOWN, "customer", "customer") end
  return errs
end

local function check_employee(errs, v)
  if type(v) ~= "table" then return table_type_error(errs, "employee", v, "employee") end
  local email, custom_id = v.email, v.custom_id
  local present, _ = 0, nil
  if email ~= nil then present = 1; errs = check_email(errs, "employee.email", email) end
  if custom_id ~= nil then present = present + 1; _, errs = check_text(errs, "employee.custom_id", custom_id) end
  if present == 0 then
    errs = add(errs, "employee", "one_of_required",
               "employee needs an email or a custom_id (at least one) matching the agent's profile")
  end
  local n = 0
  for _ in pairs(v) do n = n + 1 end
  if n ~= present then errs = unknown_keys(errs, v, EMPLOYEE_KNOWN, "employee", "employee") end
  return errs
end

local function check_tags(errs, v)
  if type(v) ~= "table" then
    return add(errs, "tags", "invalid_type", "tags must be a list of strings, got " .. type_name(v))
  end
  -- a sequence: n distinct integer keys within 1..n (n = #v)
  local n, count = #v, 0
  for k in pairs(v) do
    count = count + 1
    if type(k) ~= "number" or k < 1 or k > n or k % 1 ~= 0 then count = -1; break end
  end
  if count ~= n then
    return add(errs, "tags", "not_a_sequence", "tags must be a list (keys 1..n without holes) of strings")
  end
  if n > MAX_TAGS then
    errs = add(errs, "tags", "too_many", "tags has " .. n .. " items; at most 20 are allowed")
  end
  for i = 1, n do
    local item = v[i]
    -- fast path: a short non-empty valid string needs no path string
    if type(item) ~= "string" or item == "" or #item > MAX_TEXT_CHARS or not utf8_valid(item) then
      local path = "tags[" .. i .. "]"
      local ok
      ok, errs = check_text(errs, path, item)
      if ok then errs = check_max_chars(errs, path, item) end
    end
  end
  return errs
end

-- Returns the table to send (v itself unless a number had to become a string), errs.
local function check_props(errs, v)
  if type(v) ~= "table" then
    return nil, add(errs, "custom_properties", "invalid_type",
                    "custom_properties must be a table of string values, got " .. type_name(v))
  end
  local out = v
  for k, val in pairs(v) do
    if type(k) ~= "string" or k == "" or not utf8_valid(k) then
      local p = key_path("custom_properties", k)
      errs = add(errs, p, "invalid_key", p .. ": custom property names must be non-empty UTF-8 strings")
    else
      local t = type(val)
      if t == "string" then
        if #val > MAX_TEXT_CHARS or not utf8_valid(val) then
          local p = "custom_properties." .. k
          local ok
          ok, errs = check_text(errs, p, val, true)
          if ok then errs = check_max_chars(errs, p, val) end
        end
      elseif t == "number" then
        if val ~= val or val - val ~= 0 then
          errs = add(errs, "custom_properties." .. k, "invalid_type",
                     "custom_properties." .. k .. " must be a finite number")
        else
          if out == v then        -- copy on the first number
            out = {}
            for k2, v2 in pairs(v) do out[k2] = v2 end
          end
          out[k] = number_string(val)
        end
      elseif t == "table" then
        errs = add(errs, "custom_properties." .. k, "invalid_type",
                   "custom_properties." .. k .. " must be a string; custom properties cannot be nested")
      else
        local _
        _, errs = check_text(errs, "custom_properties." .. k, val, true)
      end
    end
  end
  return out, errs
end

local function check_channel(errs, v, channels)
  local ok
  ok, errs = check_text(errs, "channel", v)
  if ok and channels and not channels[v] then
    errs = add(errs, "channel", "unknown_channel", "channel is not one of the allowed channels")
  end
  return errs
end

local function check_code(errs, path, v, valid, code, what)
  local ok
  ok, errs = check_text(errs, path, v)
  if ok and not valid(v) then errs = add(errs, path, code, path .. " " .. what) end
  return errs
end

local function country_valid(s) return #s == 2 and COUNTRIES[s] == true end

-- Validates a request. channels: nil, or a set { phone = true, ... }.
-- Returns the normalised request (what gets encoded) or nil, errors.
function M.validate(req, channels)
  if type(req) ~= "table" then error("lua_baseline.validate: request table expected", 2) end
  local errs, _ = nil, nil
  local customer, employee, channel, id = req.customer, req.employee, req.channel,
                                         req.ext_interaction_id
  local url, dns, tags, brand = req.external_url, req.do_not_send, req.tags, req.brand
  local language, country, props = req.language, req.country, req.custom_properties
  local present = 0

  if customer ~= nil then present = 1; errs = check_customer(errs, customer)
  else errs = add(errs, "customer", "required", "customer is required") end
  if employee ~= nil then present = present + 1; errs = check_employee(errs, employee)
  else errs = add(errs, "employee", "required", "employee is required") end
  if channel ~= nil then present = present + 1; errs = check_channel(errs, channel, channels)
  else errs = add(errs, "channel", "required", "channel is required") end
  if id ~= nil then present = present + 1; id, errs = check_id(errs, "ext_interaction_id", id)
  else errs = add(errs, "ext_interaction_id", "required", "ext_interaction_id is required") end
  if url ~= nil then
    present = present + 1
    local ok
    ok, errs = check_text(errs, "external_url", url)
    if ok and url_has_space(url) then
      errs = add(errs, "external_url", "invalid_url",
                 "external_url must not contain whitespace or control characters")
    end
  end
  if dns ~= nil then
    present = present + 1
    if type(dns) ~= "boolean" then
      errs = add(errs, "do_not_send", "invalid_type",
                 "do_not_send must be true or false, got " .. type_name(dns))
    end
  end
  if tags ~= nil then present = present + 1; errs = check_tags(errs, tags) end
  if brand ~= nil then present = present + 1; _, errs = check_text(errs, "brand", brand) end
  if language ~= nil then
    present = present + 1
    errs = check_code(errs, "language", language, language_valid, "invalid_language",
                      "is not an ISO 639-1 language code with an optional region")
  end
  if country ~= nil then
    present = present + 1
    errs = check_code(errs, "country", country, country_valid, "invalid_country",
                      "is not an assigned ISO 3166-1 alpha-2 country code")
  end
  if props ~= nil then present = present + 1; props, errs = check_props(errs, props) end

  local n = 0
  for _ in pairs(req) do n = n + 1 end
  if n ~= present then errs = unknown_keys(errs, req, REQUEST_KNOWN, "", "request") end
  if errs then return nil, errs end

  -- validated sub-tables are sent as they are
  return {
    customer = customer, employee = employee, channel = channel, ext_interaction_id = id,
    external_url = url, do_not_send = dns, tags = tags, brand = brand, language = language,
    country = country, custom_properties = props,
  }
end

local validate = M.validate

-- validate + cjson.encode of the normalised table (key order is cjson's)
function M.encode(req, channels)
  local out, errs = validate(req, channels)
  if not out then return nil, errs end
  return cjson_encode(out)
end

---------------------------------------------------------------------------
-- Canonical encoder in plain Lua (same bytes as the C core)
---------------------------------------------------------------------------

local ESCAPES = { ['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n', ['\r'] = '\\r',
                  ['\t'] = '\\t', ['\b'] = '\\b', ['\f'] = '\\f' }
for c = 0, 31 do
  local ch = string.char(c)
  if not ESCAPES[ch] then ESCAPES[ch] = fmt("\\u%04x", c) end
end

local function quote(s)
  if find(s, '[%z\1-\31"\\]') then s = gsub(s, '[%z\1-\31"\\]', ESCAPES) end
  return '"' .. s .. '"'
end

local function scalar(v)
  local t = type(v)
  if t == "string" then return quote(v) end
  if t == "boolean" then return v and "true" or "false" end
  return '"' .. number_string(v) .. '"'
end

function M.encode_canonical(req, channels)
  local out, errs = validate(req, channels)
  if not out then return nil, errs end
  local b, n = { "{" }, 1
  local function field(name, text)
    n = n + 1
    b[n] = (n > 2 and ',"' or '"') .. name .. '":' .. text
  end
  local c, e = out.customer, out.employee
  local parts = {}
  if c.name then parts[#parts + 1] = '"name":' .. quote(c.name) end
  if c.email then parts[#parts + 1] = '"email":' .. quote(c.email) end
  if c.custom_id then parts[#parts + 1] = '"custom_id":' .. quote(c.custom_id) end
  field("customer", "{" .. concat(parts, ",") .. "}")
  parts = {}
  if e.email then parts[#parts + 1] = '"email":' .. quote(e.email) end
  if e.custom_id then parts[#parts + 1] = '"custom_id":' .. quote(e.custom_id) end
  field("employee", "{" .. concat(parts, ",") .. "}")
  field("channel", quote(out.channel))
  field("ext_interaction_id", quote(out.ext_interaction_id))
  if out.external_url then field("external_url", quote(out.external_url)) end
  if out.do_not_send ~= nil then field("do_not_send", out.do_not_send and "true" or "false") end
  if out.tags then
    parts = {}
    for i = 1, #out.tags do parts[i] = quote(out.tags[i]) end
    field("tags", "[" .. concat(parts, ",") .. "]")
  end
  if out.brand then field("brand", quote(out.brand)) end
  if out.language then field("language", quote(out.language)) end
  if out.country then field("country", quote(out.country)) end
  if out.custom_properties then
    local keys = {}
    for k in pairs(out.custom_properties) do keys[#keys + 1] = k end
    sort(keys)
    parts = {}
    for i = 1, #keys do
      parts[i] = quote(keys[i]) .. ":" .. scalar(out.custom_properties[keys[i]])
    end
    field("custom_properties", "{" .. concat(parts, ",") .. "}")
  end
  b[n + 1] = "}"
  return concat(b)
end

-- exposed for the self-checks in validate_encode.lua
M.email_valid, M.utf8_valid, M.language_valid, M.url_has_space =
  email_valid, utf8_valid, language_valid, url_has_space
M.utf8_valid_slow = utf8_valid_slow

return M
