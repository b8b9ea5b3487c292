-- stella.redis_rules: the rules inside Redis (`stella redis load --rules FILE --db URL`).
-- The store's Function library `stella` (lua/stella/store/redis_lib.lua) is loaded again
-- with the rule engine and a rules file added to it, so that any Redis client decides
-- and enqueues an event with one call:
--
--   FCALL stella_decide 1 stella:{main}:meta EVENT_JSON [NOW]
--     -> status, reason, detail, outbox id     (see glue.lua and the README)
--   FCALL_RO stella_rules 0 -> rules file name, SHA-256 of its text, "ready" | the error
--
-- The library is built here from the files themselves: stella.rules, stella.trigger.outcome,
-- stella.trigger.rows, stella.store.rows (the same code the Lua trigger runs), the SHA-256
-- and glue of this directory, and the rules file, each kept as its text and compiled
-- inside Redis on the first call (a library's top level may only define functions), with
-- its own chunk name, so an error names the file and line.
--
--   redis_rules.library(name, source) -> the library's code
--   redis_rules.load(store, name, source) -> info | nil, message   (info: { name, sha256,
--     version, bytes, meta_key }); refused when check.lua finds what Redis lacks, or when
--     the rules do not compile or run in Redis (then the library the server had is put
--     back). store: an open stella.store.redis.
local lib = require "stella.store.redis_lib"
local check = require "stella.redis_rules.check"

local concat, format, rep = table.concat, string.format, string.rep
local assert, error, ipairs, tonumber, tostring, type, open = assert, error, ipairs, tonumber, tostring, type, io.open
local searchpath = package.searchpath

local M = {}

-- The modules the library holds, by name (require inside the library resolves them).
M.MODULES = { "stella.rate_limit.settings", "stella.rules", "stella.trigger.outcome", "stella.trigger.rows",
              "stella.store.rows", "stella.store.text", "stella.redis_rules.sha256", "stella.redis_rules.glue" }

local function read(path)
  local f, err = open(path, "rb")
  if not f then return nil, err end
  local text = f:read("*a")
  f:close()
  return text
end

-- A module's file on package.path (package.searchpath: Lua 5.2+ and LuaJIT).
local function module_text(name)
  local path, err = searchpath(name, package.path)
  if not path then error("stella.redis_rules: cannot find module " .. name .. ": " .. tostring(err), 0) end
  return assert(read(path))
end

-- s as a long string literal whose brackets do not occur in it.
local function long_string(s)
  local eq = 1
  while s:find("]" .. rep("=", eq) .. "]", 1, true) do eq = eq + 1 end
  -- a newline right after the opening bracket is dropped by Lua: one more keeps the first
  return "[" .. rep("=", eq) .. "[\n" .. s .. "]" .. rep("=", eq) .. "]"
end


local SECTION = [=[

-----------------------------------------------------------------------------------------
-- The rules inside Redis (`stella redis load`; built by lua/stella/redis_rules/init.lua)
-----------------------------------------------------------------------------------------
local RULES_NAME, RULES_SHA256 = %s, %s
local RULES_SOURCE = %s
local MODULES = {
%s}
local decide_event   -- the glue's function, made on the first call
local function start()
  local loaded = {}
  local function require(name)
    local m = loaded[name]
    if m ~= nil then return m end
    local code = MODULES[name]
    if not code then error("module " .. name .. " is not in the library", 2) end
    local chunk, err = loadstring("local require = ...; " .. code, "@" .. name:gsub("%%.", "/") .. ".lua")
    if not chunk then error(err, 0) end
    m = chunk(require)
    loaded[name] = m
    return m
  end
  return require("stella.redis_rules.glue").new{
    call = call, OPS = OPS, require = require, loadstring = loadstring, cjson = cjson, bit = bit,
    error_reply = redis.error_reply, rules_name = RULES_NAME, rules_source = RULES_SOURCE,
  }
end
local function ready()
  if decide_event then return true end
  local ok, f = pcall(start)
  if not ok then return nil, (string.gsub(tostring(f), "[\r\n]+", " ")) end
  decide_event = f
  return true
end
local function decide(keys, argv)
  local ok, err = ready()
  if not ok then return redis.error_reply("ERR stella_decide: the rules cannot run in Redis: " .. err) end
  return decide_event(keys, argv)
end
local function rules_info()
  local ok, err = ready()
  return { RULES_NAME, RULES_SHA256, ok and "ready" or err }
end
redis.register_function("stella_decide", decide)
redis.register_function{ function_name = "stella_rules", callback = rules_info, flags = { "no-writes" } }
]=]

-- The library's code: the store's library and the rules section.
function M.library(name, source)
  local mods = {}
  for _, m in ipairs(M.MODULES) do
    mods[#mods + 1] = format("  [%q] = %s,\n", m, long_string(module_text(m)))
  end
  return lib.code .. format(SECTION, format("%q", name), format("%q", require("stella.core").sha256(source)),
                            long_string(source), concat(mods))
end

-- The version function stella.redis's load_library adds (FCALL_RO stella_version 0).
local function with_version(code)
  return code .. format("\nredis.register_function{function_name='%s_version', "
    .. "callback=function() return %d end, flags={'no-writes'}}\n", lib.name, lib.version)
end

local function message(err)
  return (tostring(err):gsub("^ERR ", ""))
end

function M.load(store, name, source)
  if type(source) ~= "string" then error("stella.redis_rules.load: the rules file's text expected", 2) end
  local problems = check.problems(name, source)
  if #problems > 0 then return nil, concat(problems, "\n") end
  local b = store.backend
  if not (b and b.conn and b.meta_key) then error("stella.redis_rules.load: a Redis store expected", 2) end
  local conn = b.conn
  local have, verr = conn:call("FCALL_RO", lib.name .. "_version", 0)
  if have == nil then return nil, "cannot read the library's version: " .. message(verr) end
  if tonumber(have) > lib.version then
    return nil, format("the server's library %s is version %s, newer than this stella's (%d): "
      .. "load the rules with the newer stella", lib.name, tostring(have), lib.version)
  end
  -- what the server has now, put back if the new one fails
  local list, lerr = conn:call("FUNCTION", "LIST", "LIBRARYNAME", lib.name, "WITHCODE")
  if not list then return nil, message(lerr) end
  local previous
  for _, entry in ipairs(list) do
    for j = 1, #entry - 1, 2 do
      if entry[j] == "library_name" and entry[j + 1] == lib.name then
        for k = 1, #entry - 1, 2 do if entry[k] == "library_code" then previous = entry[k + 1] end end
      end
    end
  end
  local code = with_version(M.library(name, source))
  local ok, ferr = conn:call("FUNCTION", "LOAD", "REPLACE", code)
  if not ok then return nil, "Redis refused the library: " .. message(ferr) end
  local info, ierr = conn:call("FCALL_RO", "stella_rules", 0)
  local why = not info and message(ierr) or (info[3] ~= "ready" and info[3]) or nil
  if why then
    conn:call("FUNCTION", "LOAD", "REPLACE", previous or with_version(lib.code))
    return nil, why
  end
  return { name = name, sha256 = info[2], version = lib.version, bytes = #code, meta_key = b.meta_key }
end

M.read = read
M.check = check.problems

return M
