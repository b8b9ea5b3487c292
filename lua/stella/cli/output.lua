-- stella.cli.output: the machine-readable output of trigger, status, retry and validate
-- (--json, --json-lines): JSON text for a summary object and for one event's outcome. The
-- fields are documented in README, "Machine-readable output"; absent values are null.
local assert, getmetatable, ipairs, pairs, setmetatable, tostring, type =
      assert, getmetatable, ipairs, pairs, setmetatable, tostring, type
local sort, concat = table.sort, table.concat
local cjson = require "cjson.safe"

local M = {}

local null = cjson.null

local function value(v)
  if v == nil then return null end
  return v
end

-- A list for the output: encoded as a JSON array even when empty. (lua-cjson's own
-- cjson.array_mt, where it has one, is the marker; Debian's lua-cjson 2.1.0 has none, and
-- an empty table would come out as {}.)
local ARRAY = cjson.array_mt or {}
M.ARRAY = ARRAY
function M.array(t)
  return setmetatable(t or {}, ARRAY)
end

-- JSON text of a value: objects with their keys sorted (the same object gives the same
-- text), tables marked by M.array or with a first element as arrays, other values by cjson.
local function encode(v)
  if type(v) ~= "table" or v == null then return assert(cjson.encode(v)) end
  if getmetatable(v) == ARRAY or v[1] ~= nil then
    local parts = {}
    for i = 1, #v do parts[i] = encode(v[i]) end
    return "[" .. concat(parts, ",") .. "]"
  end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  local parts = {}
  for i, k in ipairs(keys) do parts[i] = assert(cjson.encode(tostring(k))) .. ":" .. encode(v[k]) end
  return "{" .. concat(parts, ",") .. "}"
end
M.encode = encode

-- the tally of outcomes ({ status, reason, count } in the order met) as a list
function M.counts(order)
  local list = M.array()
  for _, t in ipairs(order) do
    list[#list + 1] = { status = t.status, reason = value(t.reason), count = t.count }
  end
  return list
end

function M.total(order)
  local n = 0
  for _, t in ipairs(order) do n = n + t.count end
  return n
end

-- One event's outcome: { input, line, event_id, status, reason, detail, request_id, error }
function M.outcome_line(name, line_no, outcome)
  local err = outcome.error
  local e = null
  if err ~= nil then
    e = { kind = value(type(err) == "table" and err.kind or nil),
          message = tostring(type(err) == "table" and (err.message or err) or err),
          status = value(type(err) == "table" and err.status or nil) }
  end
  local id = outcome.event_id
  if type(id) ~= "string" and type(id) ~= "number" then id = nil end
  return M.encode{ input = name, line = line_no, event_id = value(id), status = tostring(outcome.status),
                   reason = value(outcome.reason), detail = value(type(outcome.detail) == "string" and outcome.detail or nil),
                   request_id = value(outcome.request_id), error = e }
end

return M
