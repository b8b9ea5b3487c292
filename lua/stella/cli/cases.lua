-- stella.cli.cases: a cases file of `stella test` read and checked: events with the
-- outcome each should get, a fixed clock, steps of time, a starting state.
--
--   local file, problems = cases.load(path)
--   -- file = { path, groups = { group, ... } } | nil, { "FILE: case 3 (name): message", ... }
--   -- group = { name, now, state = { unsubscribes = { email, ... },
--   --                                 sent = { { at, event, where }, ... } (oldest first) },
--   --           cases = { { index, name, label, at, advance, event, expect, reason, request,
--   --                       send_at }, ... } }
--
-- A cases file is Lua (it returns the table) or JSON (the same table as an object); see
-- README, "Testing your rules: stella test". Every mistake in it is found before any case
-- runs, each named by file, group and case.
local ipairs, next, pairs, pcall, sort, tonumber, tostring, type =
      ipairs, next, pairs, pcall, table.sort, tonumber, tostring, type
local floor = math.floor
local setfenv, loadstring, load = setfenv, loadstring, load   -- 5.1 or 5.2+ loaders

local args = require "stella.cli.args"
local rules_mod = require "stella.rules"

local M = {}

-- What a dry run can make of an event (failed needs a send; queued is a request the
-- rules schedule for later: reason "scheduled").
M.STATUSES = { "sent", "recorded", "queued", "skipped", "suppressed", "invalid" }
local STATUS_SET = {}
for _, s in ipairs(M.STATUSES) do STATUS_SET[s] = true end

-- The keys each level may have: anything else is a typo worth an error.
local FILE_KEYS = { now = true, base = true, state = true, cases = true, groups = true }
local GROUP_KEYS = { name = true, now = true, base = true, state = true, cases = true }
local CASE_KEYS = { name = true, event = true, base = true, expect = true, reason = true,
                    request = true, advance = true, at = true, send_at = true }
local STATE_KEYS = { sent = true, unsubscribes = true }
local SENT_KEYS = { at = true, ago = true, event = true, base = true }

-- Globals of a Lua cases file: plain data building, no io, os.execute or require.
local SAFE = { "assert", "error", "ipairs", "next", "pairs", "select", "tonumber", "tostring",
               "type", "unpack", "setmetatable", "getmetatable", "rawget", "rawset" }

local function cases_globals()
  local env = {}
  for _, name in ipairs(SAFE) do env[name] = _G[name] end
  for _, lib in ipairs{ "string", "table", "math" } do
    local copy = {}
    for k, v in pairs(_G[lib]) do copy[k] = v end
    env[lib] = copy
  end
  env.os = { time = os.time, date = os.date }
  env._G = env
  return env
end

local function read(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, "cannot open the cases file: " .. tostring(err) end
  local text = f:read("*a")
  f:close()
  return text
end

local function load_lua(path, text)
  if text:sub(1, 1) == "#" then text = "--" .. text end   -- a shebang line
  local env, chunk, err = cases_globals(), nil, nil
  if setfenv then
    chunk, err = loadstring(text, "@" .. path)
    if chunk then setfenv(chunk, env) end
  else
    chunk, err = load(text, "@" .. path, "t", env)
  end
  if not chunk then return nil, tostring(err) end
  local ok, value = pcall(chunk)
  if not ok then return nil, tostring(value) end
  return value
end

local function load_json(path, text)
  local value, err = require("stella").decode_json(text)
  if value == nil then
    local where = type(err) == "table" and err.line and (":" .. err.line) or ""
    return nil, path .. where .. ": invalid JSON: " .. tostring(type(err) == "table" and err.message or err)
  end
  return value
end

-- JSON by its extension or a first character "{"; Lua otherwise.
local function is_json(path, text)
  if path:match("%.json$") then return true end
  if path:match("%.lua$") then return false end
  return text:match("^%s*{") ~= nil
end

-- "2026-01-05T10:00:00Z", "2026-01-05T12:00:00+02:00" or seconds since the epoch -> seconds | nil
-- (the rules' own reading of a time: stella.rules.parse_time)
function M.parse_time(v)
  return rules_mod.parse_time(v)
end

-- "2h", "7d", "90m" or seconds -> seconds | nil
local function parse_duration(v)
  if type(v) == "number" then
    if v > 0 and v < math.huge then return v end
    return nil
  end
  if type(v) ~= "string" then return nil end
  return args.parse_duration(v)
end

local function deep_copy(v)
  if type(v) ~= "table" then return v end
  local c = {}
  for k, x in pairs(v) do c[k] = deep_copy(x) end
  return c
end

-- a table with fields (not a list, not empty): merged field by field
local function is_record(v)
  return type(v) == "table" and v[1] == nil and next(v) ~= nil
end

-- base with event's fields over it: records merge, anything else (lists included) replaces
local function merged(base, event)
  local out = deep_copy(base)
  for k, v in pairs(event) do
    if is_record(v) and is_record(out[k]) then out[k] = merged(out[k], v)
    else out[k] = deep_copy(v) end
  end
  return out
end
M.merged = merged

local function quoted(v)
  if type(v) == "string" then return '"' .. v .. '"' end
  return tostring(v)
end

-- Checks one file's table; problems go to `problems`.
local function check(path, spec, problems)
  local function problem(where, fmt, ...)
    problems[#problems + 1] = path .. ": " .. (where and (where .. ": ") or "") .. fmt:format(...)
  end
  if type(spec) ~= "table" then
    problem(nil, "a cases file must return a table (Lua) or hold an object (JSON), got %s", type(spec))
    return nil
  end
  for k in pairs(spec) do
    if not FILE_KEYS[k] then problem(nil, "unknown key %s (expected now, base, state, cases or groups)", quoted(k)) end
  end

  local function keys_of(t, known, where, list)
    for k in pairs(t) do
      if not known[k] then problem(where, "unknown key %s (expected %s)", quoted(k), list) end
    end
  end

  local function list_of(v, where, what)
    if type(v) ~= "table" or (next(v) ~= nil and v[1] == nil) then
      problem(where, "%s must be a list", what)
      return {}
    end
    return v
  end

  -- the event of a case or of state.sent, with the base under it unless base = false
  local function event_of(item, base, where)
    if type(item.event) ~= "table" then
      problem(where, "event must be a table (an object), got %s", type(item.event))
      return nil
    end
    if item.base ~= nil and item.base ~= false then
      problem(where, "base may only be false here (the event without the group's base)")
    end
    if base and item.base ~= false then return merged(base, item.event) end
    return deep_copy(item.event)
  end

  local function group_of(g, gname, inherited, where_g, first_index)
    local now = g.now
    if now == nil then now = inherited.now end
    local t0 = M.parse_time(now)
    if now == nil then
      problem(where_g, "now is required: the fixed clock, \"2026-01-05T10:00:00Z\" or seconds since the epoch")
    elseif not t0 then
      problem(where_g, "now must be a time, \"2026-01-05T10:00:00Z\" (or with +hh:mm) or seconds since the epoch, got %s", quoted(now))
    end
    local base = g.base
    if base == nil then base = inherited.base end
    if base ~= nil and type(base) ~= "table" then
      problem(where_g, "base must be a table (the fields every event starts from)")
      base = nil
    end
    local group = { name = gname, now = t0 or 0, cases = {},
                    state = { sent = {}, unsubscribes = {} } }
    local state = g.state
    if state == nil then state = inherited.state end
    local swhere = (where_g and (where_g .. ": ") or "") .. "state"
    if state ~= nil then
      if type(state) ~= "table" then
        problem(nil, "%s must be a table", swhere)
      else
        keys_of(state, STATE_KEYS, swhere, "sent or unsubscribes")
        for i, e in ipairs(list_of(state.unsubscribes or {}, swhere, "unsubscribes")) do
          if type(e) ~= "string" or not e:match("^[^@%s]+@[^@%s]+$") then
            problem(swhere, "unsubscribes[%d] must be an e-mail address, got %s", i, quoted(e))
          else
            group.state.unsubscribes[#group.state.unsubscribes + 1] = e
          end
        end
        for i, s in ipairs(list_of(state.sent or {}, swhere, "sent")) do
          local where = ("%s.sent[%d]"):format(swhere, i)
          if type(s) ~= "table" then
            problem(nil, "%s must be a table { at = TIME or ago = DURATION, event = {...} }", where)
          else
            keys_of(s, SENT_KEYS, where, "at, ago, event or base")
            local at
            if (s.at == nil) == (s.ago == nil) then
              problem(where, "give at (a time) or ago (a duration before now), one of them")
            elseif s.at ~= nil then
              at = M.parse_time(s.at)
              if not at then problem(where, "at must be a time, got %s", quoted(s.at)) end
            else
              local d = parse_duration(s.ago)
              if not d then problem(where, "ago must be a duration (\"3d\", \"2h\") or seconds, got %s", quoted(s.ago))
              else at = (t0 or 0) - d end
            end
            local event = event_of(s, base, where)
            if at and event then
              group.state.sent[#group.state.sent + 1] = { at = at, event = event, where = where, order = i }
            end
          end
        end
        sort(group.state.sent, function(a, b)
          if a.at ~= b.at then return a.at < b.at end
          return a.order < b.order
        end)
      end
    end
    local index = first_index
    local list = g.cases
    if list == nil then
      problem(where_g, "cases is required: the events to test, in order")
      list = {}
    end
    for i, c in ipairs(list_of(list, where_g, "cases")) do
      index = index + 1
      local cname = type(c) == "table" and type(c.name) == "string" and c.name or nil
      local label_name = cname and gname and (gname .. ": " .. cname) or cname or gname
      local where = ("case %d%s"):format(index, label_name and (" (" .. label_name .. ")") or "")
      if type(c) ~= "table" then
        problem(where, "a case must be a table, got %s", type(c))
      else
        keys_of(c, CASE_KEYS, where, "name, event, base, expect, reason, request, send_at, advance or at")
        if c.name ~= nil and type(c.name) ~= "string" then problem(where, "name must be a string") end
        local case = { index = index, name = cname, label = where, event = event_of(c, base, where),
                       expect = c.expect, reason = c.reason, request = c.request }
        if not STATUS_SET[c.expect] then
          problem(where, "expect must be one of %s, got %s", table.concat(M.STATUSES, ", "), quoted(c.expect))
        end
        if c.reason ~= nil and type(c.reason) ~= "string" then problem(where, "reason must be a string") end
        if c.send_at ~= nil then
          case.send_at = M.parse_time(c.send_at)
          if not case.send_at then problem(where, "send_at must be a time, got %s", quoted(c.send_at)) end
        end
        if c.request ~= nil and type(c.request) ~= "table" then
          problem(where, "request must be a table (the request fields to match)")
        end
        if c.at ~= nil and c.advance ~= nil then problem(where, "give at or advance, not both") end
        if c.at ~= nil then
          case.at = M.parse_time(c.at)
          if not case.at then problem(where, "at must be a time, got %s", quoted(c.at)) end
        elseif c.advance ~= nil then
          case.advance = parse_duration(c.advance)
          if not case.advance then
            problem(where, "advance must be a duration (\"2h\", \"7d\", \"90m\") or seconds, got %s", quoted(c.advance))
          end
        end
        group.cases[#group.cases + 1] = case
      end
    end
    return group, index
  end

  local file = { path = path, groups = {} }
  if spec.groups ~= nil and spec.cases ~= nil then
    problem(nil, "give cases or groups, not both")
    return nil
  end
  if spec.groups ~= nil then
    local index = 0
    local groups = list_of(spec.groups, nil, "groups")
    if groups[1] == nil then problem(nil, "groups is empty") end
    for i, g in ipairs(groups) do
      local gname = type(g) == "table" and type(g.name) == "string" and g.name or nil
      local where = ("group %d%s"):format(i, gname and (" (" .. gname .. ")") or "")
      if type(g) ~= "table" then
        problem(where, "a group must be a table")
      else
        keys_of(g, GROUP_KEYS, where, "name, now, base, state or cases")
        file.groups[i], index = group_of(g, gname or ("group " .. i), spec, where, index)
      end
    end
  else
    file.groups[1] = group_of(spec, nil, {}, nil, 0)
  end
  return file
end

-- load(path) -> file | nil, problems (a list of lines, each naming the file)
function M.load(path)
  local text, err = read(path)
  if not text then return nil, { path .. ": " .. err } end
  local spec
  if is_json(path, text) then spec, err = load_json(path, text)
  else spec, err = load_lua(path, text) end
  if spec == nil and err then return nil, { (err:find(path, 1, true) and err or (path .. ": " .. err)) } end
  local problems = {}
  local file = check(path, spec, problems)
  if problems[1] then return nil, problems end
  return file
end

return M
