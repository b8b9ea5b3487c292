-- stella.rate_limit.settings: the rules file's rate_limit (top level and per brand),
-- checked and made into what the gate uses (stella.rate_limit). Pure Lua 5.1-compatible
-- code: rules.lua uses it, and rules.lua also runs inside Redis (stella.redis_rules).
local error, pairs, tostring, type = error, pairs, tostring, type
local floor, huge = math.floor, math.huge

local M = {}

local FIELDS = { per_second = true, per_minute = true, burst = true, max_wait = true }

local function positive(v)
  return type(v) == "number" and v > 0 and v < huge
end

-- settings(value, where) -> { rate (per second, or nil: pause only), interval_us, burst,
-- max_wait, text } | nil when value is nil or false. Raises naming the field.
function M.settings(value, where)
  where = where or "rate_limit"
  if value == nil or value == false then return nil end
  if type(value) ~= "table" then error(where .. " must be a table (or false), got " .. type(value), 0) end
  for k in pairs(value) do
    if not FIELDS[k] then
      error(where .. ": unknown field '" .. tostring(k) .. "' (per_second, per_minute, burst, max_wait)", 0)
    end
  end
  local ps, pm = value.per_second, value.per_minute
  if ps ~= nil and pm ~= nil then error(where .. ": give per_second or per_minute, not both", 0) end
  if ps ~= nil and not positive(ps) then error(where .. ".per_second must be a number above 0", 0) end
  if pm ~= nil and not positive(pm) then error(where .. ".per_minute must be a number above 0", 0) end
  local burst = value.burst
  if burst == nil then burst = 1 end
  if type(burst) ~= "number" or burst < 1 or burst % 1 ~= 0 or burst > 100000 then
    error(where .. ".burst must be a whole number from 1 to 100000", 0)
  end
  local max_wait = value.max_wait
  if max_wait == nil then max_wait = 1 end
  if type(max_wait) ~= "number" or not (max_wait >= 0 and max_wait <= 60) then
    error(where .. ".max_wait must be a number of seconds from 0 to 60", 0)
  end
  local rate = ps or (pm and pm / 60)
  local interval = rate and floor(1e6 / rate + 0.5) or 0
  if rate and interval < 1 then error(where .. ": at most 1000000 per second", 0) end
  local text = ps and (("%g/s"):format(ps)) or pm and (("%g/min"):format(pm)) or "pause only"
  return { rate = rate, interval_us = interval, burst = burst, max_wait = max_wait, text = text }
end

-- of_rules(spec, name) -> { default = settings | nil, brands = { name = settings | false } }
-- | nil when the rules set no rate limit. Raises on a mistake, naming the field.
function M.of_rules(spec, name)
  name = name or "rules"
  local out, any = { brands = {} }, false
  if spec.rate_limit ~= nil then
    out.default = M.settings(spec.rate_limit, name .. ": rate_limit")
    any = out.default ~= nil
  end
  if type(spec.brands) == "table" then
    for bname, b in pairs(spec.brands) do
      if type(b) == "table" and b.rate_limit ~= nil then
        local where = name .. ": brands." .. tostring(bname) .. ".rate_limit"
        if b.api_key == nil and b.keys == nil then
          error(where .. ": the brand has no key of its own (api_key or keys) and sends with the default key, "
            .. "whose limit is the top-level rate_limit", 0)
        end
        out.brands[bname] = M.settings(b.rate_limit, where) or false
        any = true
      end
    end
  end
  return any and out or nil
end

return M
