-- stella.store.text: the text forms the stores write, in one place. Numbers as text that
-- reads back as the same number (every store), and the Redis store's ledger members. Used
-- by stella.store (number_text), stella.store.redis (in the client) and
-- stella.redis_rules.glue (inside Redis, which runs Lua 5.1): so it is pure Lua 5.1, with
-- no C module and no global, and requires only stella.store.rows.
local rows = require "stella.store.rows"

local type, tostring, tonumber = type, tostring, tonumber
local floor, format, concat = math.floor, string.format, table.concat
local math_type, tointeger = math.type, math.tointeger   -- nil before Lua 5.3

local M = {}

-- A number as text that reads back as the same number: integers in decimal, other
-- finite numbers with 17 significant digits.
local function number_text(v)
  if math_type and math_type(v) == "integer" then return format("%d", v) end
  if v == floor(v) and v > -9.2233720368547758e18 and v < 9.2233720368547758e18 then
    return format("%.0f", v)
  end
  return format("%.17g", v)
end
M.number_text = number_text

-- "12" -> 12 (an integer in Lua 5.4)
local function int(v)
  local n = tonumber(v)
  if math_type and n and math_type(n) == "float" and n == floor(n) then n = tointeger(n) or n end
  return n
end
M.int = int

local ENTRY = rows.entry
local ENTRY_NUMBER = {}   -- field index -> whether it reads back as a number
for j = 1, ENTRY.width do
  local kind = ENTRY[j].kind
  ENTRY_NUMBER[j] = kind == "time" or kind == "count"
end

-- A ledger entry (stella.store.rows.entry) as the Redis store keeps it: its fields in the
-- layout's order, each length-prefixed ("5:hello"), "~" for an absent one.
function M.encode_entry(e)
  local parts = {}
  for j = 1, ENTRY.width do
    local v = e[ENTRY[j].name]
    if v == nil then
      parts[j] = "~"
    else
      if type(v) == "number" then v = number_text(v) else v = tostring(v) end
      parts[j] = #v .. ":" .. v
    end
  end
  return concat(parts)
end

-- An encoded entry read back from position pos of text (the ledger's members put a
-- 15-digit sequence number before it: pos 16).
function M.decode_entry(text, pos)
  local e = {}
  pos = pos or 1
  for j = 1, ENTRY.width do
    if text:byte(pos) == 126 then   -- "~"
      pos = pos + 1
    else
      local colon = text:find(":", pos, true)
      local len = tonumber(text:sub(pos, colon - 1))
      local v = text:sub(colon + 1, colon + len)
      pos = colon + len + 1
      if ENTRY_NUMBER[j] then v = int(v) end
      e[ENTRY[j].name] = v
    end
  end
  return e
end

return M
