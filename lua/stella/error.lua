-- stella.error: the error values returned by the client (kind, status, message,
-- retryable, attempts, ...). They print as their message and never hold an API key.
local assert, getmetatable, setmetatable, tonumber, tostring, type =
      assert, getmetatable, setmetatable, tonumber, tostring, type

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

-- The ways a character of a key may be written by a server that echoes it back inside
-- JSON or a URL: itself, a backslash escape (JSON's \/ \" \\, and any \X), \u00XX
-- (either case) or %XX. Returns the position after the character at `pos`, or nil.
local function char_at(text, pos, c)
  local b = text:byte(pos)
  if b == nil then return nil end
  if b == c then return pos + 1 end
  local code = text:byte(pos + 1)
  if b == 92 then   -- backslash
    if code == c then return pos + 2 end
    if code == 117 and text:sub(pos + 2, pos + 3) == "00" and
       tonumber(text:sub(pos + 4, pos + 5), 16) == c and text:sub(pos + 4, pos + 5):match("^%x%x$") then
      return pos + 6
    end
  elseif b == 37 then   -- %
    local hex = text:sub(pos + 1, pos + 2)
    if hex:match("^%x%x$") and tonumber(hex, 16) == c then return pos + 3 end
  end
  return nil
end

-- The end of an escaped occurrence of secret (bytes) starting at pos, or nil.
local function escaped_at(text, pos, bytes)
  for i = 1, #bytes do
    pos = char_at(text, pos, bytes[i])
    if not pos then return nil end
  end
  return pos - 1
end

-- Replaces every occurrence of `secret` in `text` with "[redacted]": written as it is
-- (plain find, no patterns), and also written with JSON or URL escapes (a server that
-- echoes the key inside a JSON string may write "/" as "\/", or any character as \u00XX).
function M.redact(text, secret)
  if type(text) ~= "string" or not secret or secret == "" then return text end
  local out, pos = {}, 1
  if text:find("[\\%%]") then
    local bytes = { secret:byte(1, -1) }
    -- where an occurrence can start: the key's first character, a backslash or a %
    local first = secret:sub(1, 1)
    local starts = "[" .. (first:match("%w") and first or "%" .. first) .. "\\%%]"
    local i = text:find(starts)
    while i do
      local e = escaped_at(text, i, bytes)
      if e then
        out[#out + 1] = text:sub(pos, i - 1)
        out[#out + 1] = "[redacted]"
        pos = e + 1
        i = text:find(starts, pos)
      else
        i = text:find(starts, i + 1)
      end
    end
  else
    while true do
      local s, e = text:find(secret, pos, true)
      if not s then break end
      out[#out + 1] = text:sub(pos, s - 1)
      out[#out + 1] = "[redacted]"
      pos = e + 1
    end
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
