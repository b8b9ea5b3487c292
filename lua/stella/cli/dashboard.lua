-- stella.cli.dashboard: `stella dashboard`, a read-only page of the integration's own
-- pipeline (stella.dashboard) in the foreground until Ctrl-C.
local tonumber, tostring = tonumber, tostring
local setup = require "stella.cli.setup"
local signals = require "stella.cli.signals"

local M = {}

M.help = [[
usage: stella dashboard [--db FILE] [--port N] [--bind ADDR] [--token TOKEN] [--rules FILE]

Serves a read-only page of this integration's pipeline, from its store, until Ctrl-C:
outcomes and reasons over time (per hour, or per day for 7 and 30 days), the error rate per
hour against the alert threshold, the outbox (due, scheduled, retrying; its oldest item),
dead letters with their errors, the latest failed and invalid events, and the workers.
GET /status.json is the same data (`stella status --json`'s object and more).

  --db FILE        the store (default stella.db)
  --port N         the port (default 8788; 0 picks a free one)
  --bind ADDR      the address to listen on (default 127.0.0.1, loopback only); any other
                   address needs a token
  --token TOKEN    every request must carry it (?token=TOKEN in the browser's address, or
                   Authorization: Bearer TOKEN); at least 16 characters; also
                   STELLA_DASHBOARD_TOKEN. Never printed.
  --rules FILE     the rules file whose alert.threshold the error rate is held against
                   (default 5%)
]]

-- its options: "flag" or "value"
M.options = { db = "value", port = "value", bind = "value", token = "value", rules = "value" }

function M.run(ctx, opts, positional)
  if #positional > 0 then return ctx:usage_error("dashboard", "unexpected argument %s", positional[1]) end
  local port = tonumber(opts.port or "8788")
  if not port or port < 0 or port > 65535 or port % 1 ~= 0 then
    return ctx:usage_error("dashboard", "--port must be a port number (0 to 65535)")
  end
  local token = opts.token or ctx.getenv("STELLA_DASHBOARD_TOKEN")
  ctx:secret(token)
  local threshold
  if opts.rules then
    local run, rstatus = setup.start(ctx, "dashboard", { rules = opts.rules, db = ":memory:" })
    if not run then return rstatus end
    local alert = run.rules.source.alert
    threshold = alert and alert.threshold
    setup.stop(run)
  end
  local db = opts.db or setup.DEFAULT_DB
  local store, serr = setup.open_store(db, { must_exist = true })
  if not store then ctx:warn("stella dashboard: %s", serr) return 1 end
  local ok, dashboard = pcall(require, "stella.dashboard")
  if not ok then
    store:close()
    ctx:warn("stella dashboard: the dashboard needs luasocket: install the Debian package lua-socket or the rock luasocket (%s)",
      tostring(dashboard):match("^[^\n]*"))
    return 1
  end
  -- a Redis store: the work queue's workers and depth (stella.cli.queue_status)
  local sources = setup.is_url(db) and require("stella.cli.queue_status").sources(db) or nil
  local d, err = dashboard.new{ store = store, db = db, bind = opts.bind, port = port, token = token,
                                threshold = threshold, sources = sources, log = function(m) ctx:warn("%s", m) end }
  if not d then
    store:close()
    if err:find("needs a token", 1, true) or err:find("token must", 1, true) then
      return ctx:usage_error("dashboard", "%s", err)
    end
    ctx:warn("stella dashboard: %s", err)
    return 1
  end
  ctx:say("stella dashboard: %s (the store %s, read only)%s; Ctrl-C stops it", d:url(), db,
    token and ", with a token: add ?token=... to the address" or "")
  ctx.stdout:flush()
  local sig = signals.catch()
  d:serve(sig.caught)
  local status = sig:status() or 0
  sig:release()
  d:close()
  store:close()
  return status
end

return M
