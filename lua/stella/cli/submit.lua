-- stella.cli.submit: `stella submit`, the events of export files appended to the work
-- queue (stella.queue) for `stella worker` processes; malformed lines go to the queue's
-- dead-letter stream with the reason, never dropped silently.
local ipairs, setmetatable, tonumber, tostring = ipairs, setmetatable, tonumber, tostring
local args = require "stella.cli.args"
local cli_events = require "stella.cli.events"
local output = require "stella.cli.output"
local setup = require "stella.cli.setup"

local M = {}

M.help = [[
usage: stella submit --db URL [--format FMT] [--json] [-q] [INPUT...]

Appends every event of each INPUT (a JSON Lines or CSV export file; "-" or nothing is
standard input) to the work queue on Redis: the stream PREFIXevents (default
stella:events), one entry { event = JSON } each, for `stella worker` to process.

  --db URL       redis://[[user]:password@]host[:port][/db] (default $STELLA_DB)
  --format FMT   jsonl or csv, when the file name and content do not tell
]] .. args.OUTPUT_HELP .. [[

A malformed line is reported on standard error as FILE:LINE: message and appended to
the dead-letter stream (stella:events:dead) with that reason. Exit status: 0 when every
line was queued, 1 when a line was malformed or Redis failed, 2 on bad usage.
]]

M.options = args.with_output{ db = "value", format = "value" }

function M.run(ctx, opts, inputs)
  local mode, merr = args.output_mode(opts, false)
  if merr then return ctx:usage_error("submit", "%s", merr) end
  local db = setup.db(ctx, opts)
  if not setup.is_url(db) then return ctx:usage_error("submit", "--db must be a redis:// or unix:// URL") end
  if #inputs == 0 then inputs = { "-" } end
  local q, err = require("stella.queue").open(db)
  if not q then
    ctx:warn("stella submit: cannot open the queue %s: %s", setup.label(db), tostring(err))
    return 1
  end
  local queued, dead, failed = 0, 0, nil
  local malformed, unreadable = cli_events.each(ctx, inputs, opts.format, function(_, _, event)
    local id, serr = q:submit(event)
    if not id then failed = serr return false end
    queued = queued + 1
  end, function(message)
    if not opts.quiet then ctx:warn("%s", message) end
    local id, derr = q:dead_letter{ reason = "malformed: " .. message, event = "" }
    if id then dead = dead + 1 elseif not failed then failed = derr end
  end)
  q:close()
  if failed then ctx:warn("stella submit: %s", tostring(failed.message or failed)) end
  local status = (failed or malformed > 0 or unreadable > 0) and 1 or 0
  if mode == "json" then
    ctx:say("%s", output.encode{ command = "submit", queued = queued, malformed = malformed, dead = dead,
                                 unreadable = unreadable, exit_status = status })
  elseif not opts.quiet then
    ctx:say("queued: %d, malformed: %d (in the dead-letter stream: %d)", queued, malformed, dead)
  end
  return status
end

return M
