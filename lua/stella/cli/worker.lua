-- stella.cli.worker: `stella worker`, one consumer of the work queue (stella.queue.worker)
-- until SIGINT or SIGTERM; `stella worker --dead` lists the dead letters.
local ipairs, setmetatable, tonumber, tostring = ipairs, setmetatable, tonumber, tostring
local args = require "stella.cli.args"
local output = require "stella.cli.output"
local setup = require "stella.cli.setup"
local signals = require "stella.cli.signals"
local tables = require "stella.cli.table"

local M = {}

M.help = [[
usage: stella worker --rules FILE --db URL [--name NAME] [--connections N] [--batch N]
                     [--lease SECONDS] [--max-deliveries N] [--forget-after AGE]
                     [--json] [-q | -v]
       stella worker --dead --db URL [--limit N] [--json]
       stella worker --dead --purge --db URL (ID... | --older-than AGE) [--json]

Processes the work queue on Redis (the stream stella:events, filled by `stella submit` or
any client's XADD): reads batches as a member of the consumer group "stella", decides
them with the rules (the Redis store's atomic calls, as `stella trigger`), sends,
settles and acknowledges them. Run as many as you like, on any host.

  --rules FILE        the rules file; required
  --db URL            redis://[[user]:password@]host[:port][/db] (default $STELLA_DB): the
                      queue and the store
  --name NAME         this consumer's name (default HOST-PID); a restarted worker with the
                      same name takes back what it held
  --connections N     requests sent at once (1 to 64; default 1)
  --batch N           entries read at a time (default 100)
  --lease SECONDS     an entry held that long by a consumer that does not acknowledge it
                      (a dead worker) is taken over by another (default 30)
  --max-deliveries N  an entry delivered more often goes to the dead-letter stream with
                      its last error (default 5)
  --forget-after AGE  forget workers silent that long (stopped or vanished) and the
                      group's consumers idle that long holding nothing (default 1d;
                      e.g. 12h, 30m)
  --dead              list the dead letters (stella:events:dead) and exit
  --limit N           with --dead: at most N (default 100)
  --purge             with --dead: remove the dead letters with these ids (the id
                      column of --dead), or all that died before --older-than AGE
                      (e.g. 30d); nothing removes them otherwise
  --json              the summary (or --dead's list) as one JSON object
  -q, --quiet         no line per failed event on standard error
  -v, --verbose       a line per batch on standard error

Retries are scheduled, not slept on: a failed send waits in the outbox with its due
time, and every worker sends what is due between batches. SIGINT or SIGTERM: no new read;
the batch in hand is decided, its sends in flight settle (the rest wait in the outbox)
and it is acknowledged; then the summary and exit status 0. Redis away (a restart): the
worker keeps trying (a backoff up to 2 s), with one line when Redis goes and one when it
is back; stopped meanwhile, it waits up to 5 s for Redis to take the settles of what it
sent.
The rules' rate_limit (e.g. { per_second = 50 }) is one limit per API key for every
worker on the Redis server, and a 429 with Retry-After pauses that key for all of them
(README, "Work queue").
]] .. setup.KEYS_HELP

M.options = args.with_output{ rules = "value", db = "value", name = "value", connections = "value",
                               batch = "value", lease = "value", ["max-deliveries"] = "value",
                               dead = "flag", limit = "value", block = "value",
                               ["forget-after"] = "value", purge = "flag", ["older-than"] = "value" }

local function whole(text, min, max)
  local n = tonumber(text)
  if not n or n % 1 ~= 0 or n < min or n > max then return nil end
  return n
end

local function first_line(path)
  local f = io.open(path, "r")
  if not f then return nil end
  local line = f:read("*l")
  f:close()
  return line
end

-- this process's id and host name (Linux /proc; else nil)
local function pid_and_host()
  local stat = first_line("/proc/self/stat")
  return stat and tonumber(stat:match("^(%d+)")), first_line("/proc/sys/kernel/hostname") or os.getenv("HOSTNAME")
end

local function list_dead(ctx, q, opts, mode)
  local limit = whole(opts.limit or "100", 1, 1000000)
  if not limit then return ctx:usage_error("worker", "--limit must be a whole number >= 1") end
  local dead, err = q:dead(limit)
  if not dead then ctx:warn("stella worker: %s", tostring(err)) return 1 end
  if mode == "json" then
    local list = output.array()
    for i, d in ipairs(dead) do list[i] = d end
    ctx:say("%s", require("cjson").encode{ command = "worker", dead = list })
    return 0
  end
  local rows = {}
  for _, d in ipairs(dead) do
    rows[#rows + 1] = { d.id, os.date("%Y-%m-%d %H:%M:%S", d.time or 0), d.entry or "-", tostring(d.deliveries or "-"),
                        tostring(d.reason) }
  end
  ctx:say("dead letters: %d", #dead)
  if #rows > 0 then tables.print(ctx, { "id", "time", "entry", "deliveries", "reason" }, rows) end
  return 0
end

-- `--dead --purge`: the dead letters with the given ids, or those older than --older-than.
local function purge_dead(ctx, q, opts, ids, mode)
  local removed, err
  if opts["older-than"] then
    local age = args.parse_duration(opts["older-than"])
    removed, err = q:purge_dead{ before = os.time() - age }
  else
    removed, err = q:purge_dead{ ids = ids }
  end
  if not removed then ctx:warn("stella worker: %s", tostring(err)) return 1 end
  if mode == "json" then
    ctx:say("%s", output.encode{ command = "worker", purged = removed })
  else
    ctx:say("dead letters removed: %d", removed)
  end
  return 0
end

function M.run(ctx, opts, positional)
  if opts.purge then
    if not opts.dead then return ctx:usage_error("worker", "--purge goes with --dead") end
    if (#positional > 0) == (opts["older-than"] ~= nil) then
      return ctx:usage_error("worker", "--dead --purge needs the dead letters' ids or --older-than AGE (not both)")
    end
    for _, id in ipairs(positional) do
      if not id:match("^%d+%-%d+$") then return ctx:usage_error("worker", "%s is not a dead letter's id (such as 1733400000000-0)", id) end
    end
    if opts["older-than"] and not args.parse_duration(opts["older-than"]) then
      return ctx:usage_error("worker", "--older-than must be an age such as 30d, 12h or 90m")
    end
  elseif opts["older-than"] then
    return ctx:usage_error("worker", "--older-than goes with --dead --purge")
  elseif #positional > 0 then
    return ctx:usage_error("worker", "unexpected argument %s", positional[1])
  end
  local mode, merr = args.output_mode(opts, false)
  if merr then return ctx:usage_error("worker", "%s", merr) end
  local db = setup.db(ctx, opts)
  if not setup.is_url(db) then return ctx:usage_error("worker", "--db must be a redis:// or unix:// URL") end
  if not opts.dead and not opts.rules then return ctx:usage_error("worker", "--rules FILE is required") end
  local connections = args.connections(opts)
  if not connections then return ctx:usage_error("worker", "--connections must be a whole number from 1 to 64") end
  local batch = whole(opts.batch or "100", 1, 10000)
  if not batch then return ctx:usage_error("worker", "--batch must be a whole number from 1 to 10000") end
  local max_deliveries = whole(opts["max-deliveries"] or "5", 1, 1000)
  if not max_deliveries then return ctx:usage_error("worker", "--max-deliveries must be a whole number from 1 to 1000") end
  local lease = tonumber(opts.lease or "30")
  if not lease or lease < 0.1 then return ctx:usage_error("worker", "--lease must be a number of seconds >= 0.1") end
  local forget_after = args.parse_duration(opts["forget-after"] or "1d")
  if not forget_after then return ctx:usage_error("worker", "--forget-after must be an age such as 1d, 12h or 30m") end
  local block = tonumber(opts.block or "1")
  if not block or block < 0.01 or block > 1.5 then return ctx:usage_error("worker", "--block must be from 0.01 to 1.5 seconds") end

  local q, qerr = require("stella.queue").open(db)
  if not q then
    ctx:warn("stella worker: cannot open the queue %s: %s", setup.label(db), tostring(qerr))
    return 1
  end
  if opts.dead then
    local status = opts.purge and purge_dead(ctx, q, opts, positional, mode) or list_dead(ctx, q, opts, mode)
    q:close()
    return status
  end
  local pid, host = pid_and_host()
  local name = opts.name or ((host or "worker") .. "-" .. tostring(pid or os.time()))

  local sig = signals.catch()
  -- a rate limit paces a round's sends for at most 5 s (half the lease, if shorter); the
  -- rest waits in the outbox for a later round, due at its slot
  local run, rstatus = setup.start(ctx, "worker", { rules = opts.rules, send = true, db = db,
                                                    connections = connections, stop = sig.caught,
                                                    rate_budget = math.max(0.5, math.min(5, lease / 2)) })
  if not run then sig:release() q:close() return rstatus end
  local summary = require("stella.queue.worker").run{
    queue = q, trigger = run.trigger, name = name, batch = batch, lease = lease, block = block,
    max_deliveries = max_deliveries, stop = sig.caught, pid = pid, host = host, forget_after = forget_after,
    on_error = function(message)
      if not opts.quiet and not sig.caught() then ctx:warn("stella worker %s: %s", name, message) end
    end,
    on_notice = function(message)   -- (after a signal too: what the worker did on its way out)
      if not opts.quiet then ctx:warn("stella worker %s: %s", name, message) end
    end,
    on_batch = function(report)
      if opts.verbose then
        ctx:warn("stella worker %s: read %d, acknowledged %d, dead %d, to retry %d", name, report.read,
          report.acked, report.dead, report.retried)
      end
    end,
  }
  setup.stop(run)
  q:close()
  local signal_name = sig.name()
  sig:release()
  if mode == "json" then
    ctx:say("%s", output.encode{ command = "worker", name = name, read = summary.read, acknowledged = summary.acked,
      dead = summary.dead, retried = summary.retried, flushed = summary.flushed, errors = summary.errors,
      outages = summary.outages, outcomes = summary.outcomes, signal = signal_name, exit_status = 0 })
  elseif not opts.quiet then
    ctx:say("worker %s stopped by %s: read %d, acknowledged %d, dead letters %d, sent from the outbox %d",
      name, tostring(signal_name), summary.read, summary.acked, summary.dead, summary.flushed)
  end
  return signals.EXIT.OK
end

return M
