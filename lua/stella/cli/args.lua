-- stella.cli.args: the command line's words into options, and the option values that
-- several commands share (lists, durations, --connections).
--
-- Options are GNU-style long ones only: --name VALUE, --name=VALUE, --flag; "--" ends
-- them and "-" is a positional argument (standard input). A command declares what it
-- takes as { name = "flag" | "value" }. (lua-argparse does this too, but its messages
-- differ from the ones the command has always printed: see README, Layout.)
local pairs, tonumber, tostring = pairs, tonumber, tostring
local floor = math.floor

local M = {}

-- the short options: -q and -v, for the commands that take --quiet and --verbose
local SHORT = { ["-q"] = "quiet", ["-v"] = "verbose" }

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
    elseif (a == "-q" or a == "-v") and spec[SHORT[a]] == "flag" then
      opts[SHORT[a]] = true
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

-- The output options of trigger, status, retry and validate: --json (one JSON object, the
-- summary, on standard output), --json-lines (JSON Lines: one object per event),
-- --quiet/-q (no per-event lines on standard error, no progress bar), --verbose/-v (a line
-- on standard error for every event, not only the failed ones). Returns the mode
-- ("json", "json-lines" or nil) | nil, message.
M.OUTPUT_OPTIONS = { json = "flag", ["json-lines"] = "flag", quiet = "flag", verbose = "flag" }
M.OUTPUT_HELP = [[
  --json         print the summary as one JSON object (fields: see README, "Machine-readable output")
  --json-lines   print one JSON object per event (JSON Lines) instead of the summary
  -q, --quiet    no line per failed event on standard error (the summary still prints)
  -v, --verbose  a line on standard error for every event, not only the failed ones
]]
function M.output_mode(opts, lines_too)
  if opts.json and opts["json-lines"] then return nil, "give --json or --json-lines, not both" end
  if opts.quiet and opts.verbose then return nil, "give --quiet or --verbose, not both" end
  if opts["json-lines"] and not lines_too then return nil, "--json-lines is not for this command (--json is)" end
  return opts.json and "json" or opts["json-lines"] and "json-lines" or nil
end

function M.with_output(options)
  for k, v in pairs(M.OUTPUT_OPTIONS) do options[k] = v end
  return options
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

-- --keep DURATION (trigger, retry): how long the ledger and dead outbox items are kept,
-- "90d", "12w" or "forever". Returns { days = n } (math.huge: forever), nil when absent,
-- or false, message.
M.KEEP_HELP = [[
  --keep AGE     keep the ledger and dead outbox items this long, then purge them (e.g.
                 90d, 12w, or forever; default the rules file's retention.days, else 90d)
]]
function M.keep(opts)
  local v = opts.keep
  if v == nil then return nil end
  if v == "forever" then return { days = math.huge } end
  local seconds = M.parse_duration(v)
  if not seconds then return false, "--keep must be an age such as 90d, 12w or 36h, or forever" end
  return { days = seconds / 86400 }
end

-- --connections N: a whole number from 1 to 64 (1 when absent), or nil.
function M.connections(opts)
  local n = tonumber(opts.connections or "1")
  if not n or n < 1 or n > 64 or n % 1 ~= 0 then return nil end
  return n
end

return M
