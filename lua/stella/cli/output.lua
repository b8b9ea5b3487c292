-- stella.cli.output: the machine-readable output of trigger, status, retry and validate
-- (--json, --json-lines): JSON text for a summary object and for one event's outcome. The
-- fields are documented in README, "Machine-readable output"; absent values are null.
local assert, ipairs, next, pairs, setmetatable, tostring, type = assert, ipairs, next, pairs, setmetatable, tostring, type
local sort = table.sort
local cjson = require "cjson.safe"

local M = {}

local null = cjson.null

local function value(v)
  if v == nil then return null end
  return v
end

-- JSON text of a table (keys sorted: the same object gives the same text)
function M.encode(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  sort(keys)
  local parts = {}
  for _, k in ipairs(keys) do
    local v = t[k]
    parts[#parts + 1] = cjson.encode(k) .. ":" .. (type(v) == "table" and v ~= null and v[1] == nil and next(v) ~= nil
      and M.encode(v) or assert(cjson.encode(v)))
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

-- the tally of outcomes ({ status, reason, count } in the order met) as a list
function M.counts(order)
  local list = setmetatable({}, cjson.array_mt)
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
