-- stella.cli.retry: `stella retry`, what the outbox holds sent again (the trigger's flush).
local pcall, tonumber, tostring = pcall, tonumber, tostring
local args = require "stella.cli.args"
local setup = require "stella.cli.setup"
local signals = require "stella.cli.signals"
local trigger_rows = require "stella.trigger.rows"

local EXIT = signals.EXIT

local M = {}

M.help = [[
usage: stella retry [--rules FILE] [--db FILE|URL] [--connections N] [--keep AGE] [--json] [-q | -v]
       stella retry --dead --db URL [--limit N] [--json]

Sends the requests waiting in the outbox that are due (those that failed with a
retryable error, those the rules scheduled for later once their time has come, and those
decided inside Redis: validated first) and prints how many were sent, are still queued,
or were given up (dead), and when the next item waiting is due (an item that failed waits
out a backoff). Exit status 1 when any failed, was given up or was invalid, 3 when the API
could not be reached (the circuit breaker opened), 128+N when stopped by signal N.

  --rules FILE   the rules file (for keys, brands and alerts); optional
  --db FILE|URL  the store (default $STELLA_DB, else stella.db; redis://... a Redis store)
  --connections N  send up to N requests at once (1 to 64; default 1)
]] .. args.KEEP_HELP .. [[
  --json         print the result as one JSON object (fields: see README, "Machine-readable output")
  -q, -v         accepted for symmetry with trigger (retry prints no per-event lines)
  --dead         the work queue's dead letters (Redis: stella:events:dead) appended to the
                 queue again for `stella worker`, at most --limit N (default 1000); those
                 without an event (a line `stella submit` could not read) stay
]] .. setup.KEYS_HELP

-- its options: "flag" or "value"
M.options = args.with_output{ rules = "value", db = "value", connections = "value", keep = "value",
                               dead = "flag", limit = "value" }

local function fmt_time(t)
  return os.date("%Y-%m-%d %H:%M:%S", math.floor(t))
end

-- --dead: the work queue's dead letters back into the queue (stella.queue)
local function replay_dead(ctx, opts, mode)
  local db = setup.db(ctx, opts)
  if not setup.is_url(db) then return ctx:usage_error("retry", "--dead needs --db redis://... (the work queue)") end
  local limit = tonumber(opts.limit or "1000")
  if not limit or limit < 1 or limit % 1 ~= 0 then return ctx:usage_error("retry", "--limit must be a whole number >= 1") end
  local q, err = require("stella.queue").open(db)
  local res
  if q then res, err = q:replay_dead(limit) q:close() end
  if not res then
    ctx:warn("stella retry: the queue %s: %s", setup.label(db), tostring(err))
    return EXIT.FAILED
  end
  if mode == "json" then
    ctx:say("%s", require("stella.cli.output").encode{ command = "retry", dead = true, replayed = res.replayed,
      kept = res.kept, exit_status = EXIT.OK })
  else
    ctx:say("dead letters back in the queue: %d; kept (no event to replay): %d", res.replayed, res.kept)
  end
  return EXIT.OK
end

function M.run(ctx, opts, positional)
  if #positional > 0 then return ctx:usage_error("retry", "unexpected argument %s", positional[1]) end
  local mode, merr = args.output_mode(opts, false)
  if merr then return ctx:usage_error("retry", "%s", merr) end
  if opts.dead then return replay_dead(ctx, opts, mode) end
  if opts.limit then return ctx:usage_error("retry", "--limit goes with --dead") end
  local connections = args.connections(opts)
  if not connections then
    return ctx:usage_error("retry", "--connections must be a whole number from 1 to 64")
  end
  local retention, kerr = args.keep(opts)
  if retention == false then return ctx:usage_error("retry", "%s", kerr) end
  local sig = signals.catch()
  local run, rstatus = setup.start(ctx, "retry", { rules = opts.rules, send = true, connections = connections,
                                                   db = setup.db(ctx, opts), must_exist = true,
                                                   stop = sig.caught, retention = retention })
  if not run then sig:release() return rstatus end
  setup.purge(ctx, "retry", run, opts)   -- (flush would purge by itself: this one is said)
  local fok, res, flush_err = pcall(run.trigger.flush, run.trigger)
  local left, next_item
  if fok and res then
    left = run.store:outbox_counts()
    -- what waits, and until when: the earliest item due
    local first = (left and (left.queued or 0) > 0) and run.store:outbox("queued", 1) or nil
    next_item = first and first[1]
  end
  local circuit = run.client and run.client:circuit()
  setup.stop(run)
  local signal_status = sig:status()
  local signal_name = sig.name()
  sig:release()
  if not fok or not res then ctx:warn("stella retry: %s", tostring(fok and flush_err or res)) return EXIT.FAILED end
  -- a settle the store did not take (flush_err with a summary): sent, kept for the next run
  if flush_err then
    ctx:warn("stella retry: the store could not record the last batch (%s); %d sent request%s kept in %s: "
      .. "the next run records them and sends nothing of them again", tostring(flush_err), res.unrecorded or 0,
      (res.unrecorded or 0) == 1 and "" or "s", require("stella.trigger.unsettled").path_of(run.store) or "memory")
  end
  local unreachable = circuit == "open" or circuit == "half_open"
  local status = signal_status or (unreachable and EXIT.UNREACHABLE)
    or (((res.failed or 0) > 0 or (res.invalid or 0) > 0 or flush_err) and EXIT.FAILED or EXIT.OK)
  if mode == "json" then
    ctx:say("%s", require("stella.cli.output").encode{ command = "retry", sent = res.sent or 0,
      recorded = res.recorded or 0, queued = res.queued or 0, failed = res.failed or 0, dead = res.dead or 0,
      invalid = (res.invalid or 0) > 0 and res.invalid or nil,   -- requests decided in Redis
      unrecorded = res.unrecorded or 0, reconciled = res.reconciled or 0,
      outbox = { queued = left and left.queued or 0, dead = left and left.dead or 0 },
      next_due = next_item and next_item.next_at or nil, circuit = circuit or nil,
      signal = signal_status and tostring(signal_name) or nil, exit_status = status })
    return status
  end
  ctx:say("sent %d, recorded %d, still queued %d, failed %d (of which %d given up: dead)",
    res.sent or 0, res.recorded or 0, res.queued or 0, res.failed or 0, res.dead or 0)
  if (res.invalid or 0) > 0 then
    ctx:say("invalid %d: decided in Redis, refused by validation (recorded invalid, marks released; "
      .. "see stella status)", res.invalid)
  end
  if (res.reconciled or 0) > 0 then
    ctx:say("recorded %d settle%s an earlier run could not write (sent then, not sent again)", res.reconciled,
      res.reconciled == 1 and "" or "s")
  end
  if left then ctx:say("outbox: %d queued, %d dead", left.queued or 0, left.dead or 0) end
  if next_item and next_item.next_at then
    local now = ctx.time()
    local wait = next_item.next_at - now
    local why = trigger_rows.is_scheduled(next_item) and "it is scheduled then (the rules' delay or quiet hours)"
      or ("it waits out its backoff after %d tr%s"):format(next_item.attempts or 0,
                                                           (next_item.attempts or 0) == 1 and "y" or "ies")
    ctx:say("next item due %s%s", wait > 0 and ("at " .. fmt_time(next_item.next_at)) or "now",
      wait > 0 and (" (in %d s: %s)"):format(math.ceil(wait), why) or "")
  end
  if signal_status then
    ctx:warn("stella retry: stopped by %s; what was not sent stays in the outbox", tostring(signal_name))
  elseif unreachable then
    ctx:warn("stella retry: the API could not be reached: the circuit breaker opened after repeated "
      .. "connection failures; the rest stays in the outbox")
  end
  return status
end

return M
