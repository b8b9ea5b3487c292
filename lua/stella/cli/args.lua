-- stella.cli.args: the command line's words into options, and the option values that
-- several commands share (lists, durations, --connections).
--
-- Options are GNU-style long ones only: --name VALUE, --name=VALUE, --flag; "--" ends
-- them and "-" is a positional argument (standard input). A command declares what it
-- takes as { name = "flag" | "value" }. (lua-argparse does this too, but its messages
-- differ from the ones the command has always printed: see README, Layout.)
local tonumber, tostring = tonumber, tostring
local floor = math.floor

local M = {}

-- argv[first..]: returns opts, positional | nil, message.
function M.parse(argv, first, spec)
  local opts, positional = {}, {}
  local i = first
  while i <= #argv do
    local a = argv[i]
    if a == "--" then
      for j = i + 1, #argv do positional[#positional + 1] = argv[j] end
      break
    elseif a:sub(1, 2) == "--" then
      local name, value = a:match("^%-%-([^=]+)=(.*)$")
      name = name or a:sub(3)
      local kind = spec[name]
      if not kind then return nil, "unknown option --" .. name end
      if kind == "flag" then
        if value then return nil, "--" .. name .. " takes no value" end
        opts[name] = true
      else
        if not value then
          i = i + 1
          value = argv[i]
          if value == nil then return nil, "--" .. name .. " needs a value" end
        end
        if value == "" then return nil, "--" .. name .. " needs a value" end
        opts[name] = value
      end
    elseif a:sub(1, 1) == "-" and a ~= "-" then
      return nil, "unknown option " .. a
    else
      positional[#positional + 1] = a
    end
    i = i + 1
  end
  return opts, positional
end

-- --help or -h among argv[first..], before any "--"
function M.wants_help(argv, first)
  for i = first, #argv do
    local a = argv[i]
    if a == "--" then return false end
    if a == "--help" or a == "-h" then return true end
  end
  return false
end

-- "a,b c" -> { "a", "b", "c" } (--channels)
function M.split_list(text)
  local list = {}
  for item in text:gmatch("[^,%s]+") do list[#list + 1] = item end
  return list
end

local DURATION_UNITS = { s = 1, m = 60, h = 3600, d = 86400, w = 604800 }

-- "90m", "24h", "7d" -> seconds | nil
function M.parse_duration(text)
  local n, unit = tostring(text):match("^(%d+%.?%d*)([smhdw])$")
  n = tonumber(n)
  if not n or n <= 0 then return nil end
  return floor(n * DURATION_UNITS[unit] + 0.5)
end

-- --connections N: a whole number from 1 to 64 (1 when absent), or nil.
function M.connections(opts)
  local n = tonumber(opts.connections or "1")
  if not n or n < 1 or n > 64 or n % 1 ~= 0 then return nil end
  return n
end

return M
