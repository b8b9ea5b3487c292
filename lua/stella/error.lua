-- stella.error: the error values returned by the client (kind, status, message,
-- retryable, attempts, ...). They print as their message and never hold an API key.
local setmetatable, tostring, type = setmetatable, tostring, type

local M = {}

local Error = {}
Error.__index = Error
Error.__tostring = function(e) return e.message end

-- kind -> retryable by default (the HTTP classification lives in the C core)
M.kinds = {
  invalid = false, rejected = false, auth = false, not_found = false,
  rate_limited = true, server = true, timeout = true, network = true, protocol = false,
}

function M.new(fields)
  assert(M.kinds[fields.kind] ~= nil, "unknown error kind")
  if fields.retryable == nil then fields.retryable = M.kinds[fields.kind] end
  fields.code = fields.kind
  return setmetatable(fields, Error)
end

function M.is_error(v)
  return type(v) == "table" and getmetatable(v) == Error
end

-- Replaces every occurrence of `secret` in `text` (plain find, no patterns).
function M.redact(text, secret)
  if type(text) ~= "string" or not secret or secret == "" then return text end
  local out, pos = {}, 1
  while true do
    local s, e = text:find(secret, pos, true)
    if not s then break end
    out[#out + 1] = text:sub(pos, s - 1)
    out[#out + 1] = "[redacted]"
    pos = e + 1
  end
  if pos == 1 then return text end
  out[#out + 1] = text:sub(pos)
  return table.concat(out)
end

-- A one-line summary of a validation error list.
function M.summarize(errors)
  local first = errors[1]
  local text = first and (first.path .. ": " .. first.message) or "invalid"
  if #errors > 1 then text = text .. " (and " .. tostring(#errors - 1) .. " more)" end
  return text
end

return M
