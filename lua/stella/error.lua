-- stella.error: the error values returned by the client (kind, status, message,
-- retryable, attempts, ...). They print as their message and never hold an API key.
local assert, getmetatable, setmetatable, tostring, type =
      assert, getmetatable, setmetatable, tostring, type

local M = {}

local Error = {}
Error.__index = Error
Error.__tostring = function(e) return e.message end

-- fields: kind and retryable (both required: what a send's outcome means is defined once,
-- in the C core's outcome table, stella.core.outcomes), message, and anything else.
function M.new(fields)
  assert(type(fields.kind) == "string" and type(fields.retryable) == "boolean",
         "an error needs a kind and retryable")
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
