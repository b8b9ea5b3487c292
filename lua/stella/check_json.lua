-- stella.check_json: stella.validate_json's check of JSON text with the values at some
-- dotted paths, kept in a checker to be read one at a time. Under LuaJIT it calls the C
-- core's stella_check_json through the FFI, which the JIT compiles into its trace (a call
-- of validate_json, a lua_CFunction, ends the trace), and makes a Lua string only of the
-- values read; elsewhere (Lua 5.4, no FFI, a core without the function) it calls
-- validate_json. Both give the same answers. The sandbox checks every request this way.
--
--   local check_json = require "stella.check_json"
--   local c = check_json.new("request", { "customer.email", "channel" })   -- [, { ffi = false }]
--   local ok, errors = c:check(text)   -- validate_json(text, "request"): true | nil, errors
--   c:get(1)       -- after a true: the value at paths[1], as validate_json returns it
--   c:lower(1)     -- string.lower of the string there
--   c:present(2)   -- c:get(2) ~= nil, without making the value
-- c.ffi says which way it checks. A checker's values are those of its last valid text,
-- which must stay alive (and unchanged) while they are read.
local core = require "stella.core"

local validate_json = core.validate_json
local lower = string.lower
local type, error, tonumber, pcall, setmetatable = type, error, tonumber, pcall, setmetatable

local M = {}

local ENDPOINT = { request = 0, recovery = 1 }
local NIL, NUMBER, STRING = 0, 2, 3     -- stella_type (csrc/stella.h)

-- The C core through the FFI, or nil (and why) when it cannot be reached.
local ffi, lib, why
do
  local ok, f = pcall(require, "ffi")
  if not ok then
    why = "no FFI"
  else
    local path = package.searchpath and package.searchpath("stella.core", package.cpath)
    local okl, l = false, nil
    if path then okl, l = pcall(f.load, path) end
    if not okl then
      why = "the C core's library is not found for the FFI"
    else
      local okd = pcall(f.cdef, [[
        typedef struct stella_checker stella_checker;
        typedef struct stella_field {
          int type, is_int, boolean, upper;
          const char *ptr;
          size_t len;
          long long i;
          double num;
        } stella_field;
        stella_checker *stella_checker_new(void);
        void stella_checker_free(stella_checker *c);
        int stella_check_json(stella_checker *c, int endpoint, const char *text, size_t len,
                              const char *const *paths, size_t n, stella_field *out);
      ]])
      if okd and pcall(function() return l.stella_check_json end) then
        ffi, lib = f, l
      else
        why = "the C core has no stella_check_json"
      end
    end
  end
end
M.ffi_available, M.ffi_missing = lib ~= nil, why

local FFI, PLAIN = {}, {}
FFI.__index, PLAIN.__index = FFI, PLAIN

-- new(kind, paths [, opts]): kind "request" or "recovery"; opts.ffi = false: never the FFI.
function M.new(kind, paths, opts)
  local endpoint = ENDPOINT[kind]
  if endpoint == nil then error("check_json.new: kind must be \"request\" or \"recovery\"", 2) end
  if type(paths) ~= "table" then error("check_json.new: paths must be a list of dotted paths", 2) end
  local n = #paths
  local list = {}
  for i = 1, n do
    if type(paths[i]) ~= "string" then error("check_json.new: paths[" .. i .. "] must be a string", 2) end
    list[i] = paths[i]
  end
  local use_ffi = lib ~= nil and not (opts and opts.ffi == false)
  if not use_ffi then
    return setmetatable({ ffi = false, kind = kind, opts = { fields = list }, values = {}, n = n }, PLAIN)
  end
  local c = lib.stella_checker_new()
  if c == nil then error("not enough memory", 2) end
  local cpaths = ffi.new("const char *[?]", n + 1)
  for i = 1, n do cpaths[i - 1] = list[i] end   -- the strings stay anchored by `list`
  return setmetatable({
    ffi = true, kind = kind, endpoint = endpoint, n = n, list = list, cpaths = cpaths,
    fields = ffi.new("stella_field[?]", n + 1), c = ffi.gc(c, lib.stella_checker_free),
  }, FFI)
end

-- check(text) -> true | nil, errors (validate_json's list)
function FFI:check(text)
  if type(text) ~= "string" then error("check_json: the text must be a string", 2) end
  local rc = lib.stella_check_json(self.c, self.endpoint, text, #text, self.cpaths, self.n, self.fields)
  if rc == 1 then return true end
  if rc < 0 then error("not enough memory", 2) end
  local ok, errors = validate_json(text, self.kind)   -- not valid: the binding says why
  if ok then error("check_json: stella_check_json and validate_json disagree", 2) end
  return nil, errors
end

function FFI:get(i)
  local f = self.fields[i - 1]
  local t = f.type
  if t == STRING then return ffi.string(f.ptr, f.len) end
  if t == NIL then return nil end
  if t == NUMBER then
    if f.is_int ~= 0 then return tonumber(f.i) end
    return f.num
  end
  if t == 1 then return f.boolean ~= 0 end   -- STELLA_BOOL
  return true                                -- a table
end

function FFI:lower(i)
  local f = self.fields[i - 1]
  if f.type ~= STRING then error("check_json: no string at " .. self.list[i], 2) end
  local s = ffi.string(f.ptr, f.len)
  if f.upper == 0 then return s end   -- already lower case (string.lower changes A-Z only)
  return lower(s)
end

function FFI:present(i)
  return self.fields[i - 1].type ~= NIL
end

function PLAIN:check(text)
  local v = self.values
  local ok, a, b, c, d, e, f, g, h = validate_json(text, self.kind, self.opts)
  if not ok then return nil, a end
  if self.n <= 8 then
    v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8] = a, b, c, d, e, f, g, h
  else
    local all = { validate_json(text, self.kind, self.opts) }
    for i = 1, self.n do v[i] = all[i + 1] end
  end
  return true
end

function PLAIN:get(i) return self.values[i] end

function PLAIN:lower(i)
  local s = self.values[i]
  if type(s) ~= "string" then error("check_json: no string at " .. self.opts.fields[i], 2) end
  return lower(s)
end

function PLAIN:present(i) return self.values[i] ~= nil end

return M
