-- stella.cli.validate: `stella validate`, export files checked offline (each line as a
-- request, or each event mapped by the rules in a dry run); one line per problem.
local ipairs, pcall, setmetatable, tonumber, tostring, type = ipairs, pcall, setmetatable, tonumber, tostring, type
local args = require "stella.cli.args"
local cli_events = require "stella.cli.events"
local setup = require "stella.cli.setup"

local M = {}

M.help = [[
usage: stella validate [--rules FILE] [--channels a,b] [--format FMT] [--json | --json-lines] [-q]
                       [INPUT...]

Checks export files offline; sends nothing, needs no key. Without --rules each line is a
request as the API takes it; with --rules each event is first mapped by the rules (a dry
run) and the request it gives is checked. Prints one line per problem,
FILE:LINE: PATH: message (CODE), then "N events, M invalid". Exit status 1 when any
event is invalid or malformed.

  --rules FILE    map events through this rules file first
  --channels a,b  without --rules: the channels the company has enabled (with --rules,
                  the rules file's channels apply)
  --format FMT    jsonl or csv, when the file name and content do not tell
  --json          print the counts as one JSON object instead of the lines
  --json-lines    one JSON object per invalid or malformed event instead of the lines
  -q, --quiet     only the last line ("N events, M invalid")
  (fields: see README, "Machine-readable output")
]]

-- its options: "flag" or "value"
M.options = args.with_output{ rules = "value", channels = "value", format = "value" }

function M.run(ctx, opts, inputs)
  if opts.rules and opts.channels then
    return ctx:usage_error("validate", "give --rules or --channels, not both (the rules file lists its channels)")
  end
  local mode, merr = args.output_mode(opts, true)
  if merr then return ctx:usage_error("validate", "%s", merr) end
  if #inputs == 0 then inputs = { "-" } end
  local stella = require "stella"
  -- where the problem lines go: the human lines, JSON Lines, or nowhere (--json, -q)
  local output = require "stella.cli.output"
  local function problems_of(name, line_no, errors, message)
    if mode == "json-lines" then
      local list = output.array()
      for i, e in ipairs(errors or {}) do
        list[i] = { path = tostring(e.path), code = tostring(e.code), message = tostring(e.message) }
      end
      ctx:say("%s", output.encode{ input = name, line = line_no, errors = list, message = message or require("cjson").null })
    elseif mode == nil and not opts.quiet then
      if errors and errors[1] then cli_events.problem_lines(ctx, name, line_no, errors)
      else ctx:say("%s:%d: %s", name, line_no, message) end
    end
  end
  local channels = opts.channels and args.split_list(opts.channels) or nil
  local check
  local run
  if opts.rules then
    local rstatus
    run, rstatus = setup.start(ctx, "validate", { rules = opts.rules, db = ":memory:", dry_run = true })
    if not run then return rstatus end
    local trigger = run.trigger
    check = function(reader, line_no, event)
      local pok, outcome = pcall(trigger.process, trigger, event)
      if not pok then
        problems_of(reader.name, line_no, nil, "rules: " .. tostring(outcome))
        return false
      end
      if outcome.status ~= "invalid" and outcome.status ~= "failed" then return true end
      local problems = outcome.errors   -- the request's validation errors, when it has them
      if type(problems) == "table" and problems[1] then
        problems_of(reader.name, line_no, problems)
      else
        problems_of(reader.name, line_no, nil, cli_events.outcome_message(outcome))
      end
      return false
    end
  else
    local vopts = channels and { channels = channels } or nil
    check = function(reader, line_no, event)
      local ok, errors = stella.validate(event, vopts)
      if ok then return true end
      problems_of(reader.name, line_no, errors)
      return false
    end
  end

  local events, invalid = 0, 0
  local malformed, unreadable = cli_events.each(ctx, inputs, opts.format, function(reader, line_no, event)
    events = events + 1
    if not check(reader, line_no, event) then invalid = invalid + 1 end
  end, function(message)   -- malformed lines are problems too
    local name, line_no, text = message:match("^(.-):(%d+): (.*)$")
    if name then problems_of(name, tonumber(line_no), nil, text)
    elseif mode == nil and not opts.quiet then ctx:say("%s", message) end
  end)
  if run then setup.stop(run) end
  events, invalid = events + malformed, invalid + malformed
  local status = (invalid > 0 or unreadable > 0) and 1 or 0
  if mode == "json" then
    ctx:say("%s", output.encode{ command = "validate", events = events, invalid = invalid, malformed = malformed,
                                 unreadable = unreadable, exit_status = status })
    return status
  elseif mode == "json-lines" then
    return status
  end
  ctx:say("%d event%s, %d invalid", events, events == 1 and "" or "s", invalid)
  return status
end

return M
