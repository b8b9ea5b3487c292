-- stella.cli.retry: `stella retry`, what the outbox holds sent again (the trigger's flush).
local pcall, tostring = pcall, tostring
local args = require "stella.cli.args"
local setup = require "stella.cli.setup"

local M = {}

M.help = [[
usage: stella retry [--rules FILE] [--db FILE] [--connections N] [--json] [-q | -v]

Sends the requests waiting in the outbox (those that failed with a retryable error) and
prints how many were sent, are still queued, or were given up (dead). Exit status 1 when
any failed or was given up.

  --rules FILE   the rules file (for keys, brands and alerts); optional
  --db FILE      the store (default stella.db)
  --connections N  send up to N requests at once (1 to 64; default 1)
  --json         print the result as one JSON object (fields: see README, "Machine-readable output")
  -q, -v         accepted for symmetry with trigger (retry prints no per-event lines)
]] .. setup.KEYS_HELP

-- its options: "flag" or "value"
M.options = args.with_output{ rules = "value", db = "value", connections = "value" }

function M.run(ctx, opts, positional)
  if #positional > 0 then return ctx:usage_error("retry", "unexpected argument %s", positional[1]) end
  local mode, merr = args.output_mode(opts, false)
  if merr then return ctx:usage_error("retry", "%s", merr) end
  local connections = args.connections(opts)
  if not connections then
    return ctx:usage_error("retry", "--connections must be a whole number from 1 to 64")
  end
  local run, rstatus = setup.start(ctx, "retry", { rules = opts.rules, send = true, connections = connections,
                                                   db = opts.db or setup.DEFAULT_DB, must_exist = true })
  if not run then return rstatus end
  local fok, res, flush_err = pcall(run.trigger.flush, run.trigger)
  local left = fok and res and run.store:outbox_counts() or nil
  setup.stop(run)
  if not fok or not res then ctx:warn("stella retry: %s", tostring(fok and flush_err or res)) return 1 end
  local status = (res.failed or 0) > 0 and 1 or 0
  if mode == "json" then
    ctx:say("%s", require("stella.cli.output").encode{ command = "retry", sent = res.sent or 0,
      recorded = res.recorded or 0, queued = res.queued or 0, failed = res.failed or 0, dead = res.dead or 0,
      outbox = { queued = left and left.queued or 0, dead = left and left.dead or 0 }, exit_status = status })
    return status
  end
  ctx:say("sent %d, recorded %d, still queued %d, failed %d (of which %d given up: dead)",
    res.sent or 0, res.recorded or 0, res.queued or 0, res.failed or 0, res.dead or 0)
  if left then ctx:say("outbox: %d queued, %d dead", left.queued or 0, left.dead or 0) end
  return status
end

return M
