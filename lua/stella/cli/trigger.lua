-- stella.cli.trigger: `stella trigger`, the events of export files through the rules, in
-- batches through the trigger's pipeline; failed and invalid events on standard error as
-- they settle, a summary by outcome and reason at the end.
local ipairs, pcall, tostring, type = ipairs, pcall, tostring, type
local args = require "stella.cli.args"
local cli_events = require "stella.cli.events"
local output = require "stella.cli.output"
local progress = require "stella.cli.progress"
local setup = require "stella.cli.setup"
local signals = require "stella.cli.signals"
local tables = require "stella.cli.table"

local EXIT = signals.EXIT

local M = {}

M.help = [[
usage: stella trigger --rules FILE [--db FILE|URL] [--dry-run] [--format FMT] [--connections N]
                      [--keep AGE] [--json | --json-lines] [-q | -v] [INPUT...]

Runs every event of each INPUT (a JSON Lines or CSV export file; "-" or nothing is
standard input) through the rules and sends the requests they decide on.

  --rules FILE   the rules file (Lua, returns a table); required
  --db FILE|URL  the store: suppression marks, ledger, unsubscribes, outbox (default
                 $STELLA_DB, else stella.db in the current directory; ":memory:" keeps
                 nothing; redis://[[user]:password@]host[:port][/db] a Redis store)
  --dry-run      decide and validate, but send nothing and write nothing
  --format FMT   jsonl or csv, when the file name and content do not tell
  --connections N  send up to N requests at once, each on its own connection (1 to 64;
                 default 1): for a distant API, where each request mostly waits
]] .. args.KEEP_HELP .. args.OUTPUT_HELP .. [[

A malformed line is reported on standard error as FILE:LINE: message and skipped. At the
end a summary by outcome and reason goes to standard output. Ctrl-C (SIGINT), SIGTERM
or SIGHUP stops it after the sends in flight; what was not sent waits in the outbox.
Exit status: 0 when nothing failed, 1 when an event was failed, invalid or malformed,
2 on bad usage, 3 when the API could not be reached (the circuit breaker opened: the
rest is queued), 128+N when stopped by signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP).
]] .. setup.KEYS_HELP

-- its options: "flag" or "value"
M.options = args.with_output{ rules = "value", db = "value", ["dry-run"] = "flag", format = "value",
                               connections = "value", keep = "value" }

-- Events per batch of the trigger's pipeline: a batch costs two store transactions
-- whatever its size, and a bigger one spreads them over more events (200 ran ~15% faster
-- than 50 in bench/pipeline.lua); a batch's outcomes are printed when it completes.
local BATCH_SIZE = 200
M.BATCH_SIZE = BATCH_SIZE

-- Events per batch over `connections` connections (bench/lanes.lua).
function M.batch_size(connections)
  return math.max(BATCH_SIZE, 32 * connections)
end

-- The sizes of the batches one after another: the first small (two requests per
-- connection, at least 8), each next twice the one before, up to batch_size. Nothing goes
-- on the wire before the first batch is decided, and a first batch of 2,048 events (64
-- connections) kept them idle for 60-150 ms; the next batch is decided while the one
-- before is out, so from then on the size no longer keeps them waiting (bench/lanes.lua).
function M.batch_sizes(connections)
  local full = M.batch_size(connections)
  local size = math.min(full, math.max(8, 2 * connections))
  return function()
    local this = size
    size = math.min(full, size * 2)
    return this
  end
end

function M.run(ctx, opts, inputs)
  if not opts.rules then return ctx:usage_error("trigger", "--rules FILE is required") end
  local mode, merr = args.output_mode(opts, true)
  if merr then return ctx:usage_error("trigger", "%s", merr) end
  if #inputs == 0 then inputs = { "-" } end
  local dry_run = opts["dry-run"] == true
  local db = setup.db(ctx, opts)
  -- a dry run reads an existing store but does not create one; it sends nothing, so it
  -- needs no key
  if dry_run and db ~= ":memory:" and not setup.is_url(db) and not setup.file_exists(db) then db = ":memory:" end
  local connections = args.connections(opts)
  if not connections then
    return ctx:usage_error("trigger", "--connections must be a whole number from 1 to 64")
  end
  local retention, kerr = args.keep(opts)
  if retention == false then return ctx:usage_error("trigger", "%s", kerr) end
  -- SIGINT, SIGTERM, SIGHUP: no new batch; the sends in flight settle, the rest goes back
  -- to the outbox (stella.cli.signals)
  local sig = signals.catch()
  local run, rstatus = setup.start(ctx, "trigger", { rules = opts.rules, send = not dry_run, db = db,
                                                     dry_run = dry_run, connections = connections,
                                                     stop = sig.caught, retention = retention })
  if not run then sig:release() return rstatus end
  local trigger = run.trigger
  -- the ledger and dead items past the retention window and expired marks go once per run
  if not dry_run then setup.purge(ctx, "trigger", run, opts) end

  local tally, order = {}, {}
  local bad = 0
  local bar = not opts.quiet and progress.new(ctx) or nil

  local function count(status, reason)
    local key = status .. "\0" .. tostring(reason)
    local t = tally[key]
    if not t then
      t = { status = status, reason = reason, count = 0 }
      tally[key] = t
      order[#order + 1] = t
    end
    t.count = t.count + 1
  end

  local first_due   -- the earliest send_at of the requests scheduled for later
  -- What the store could not take (locked, read-only, damaged) is said once per distinct
  -- message at the end, with the count and the first and last place, not once per event:
  -- a batch that raised, and events whose decide failed with store_error.
  local failures, failure_order = {}, {}
  local function note_failure(message, n, first, last)
    local f = failures[message]
    if not f then
      f = { message = message, count = 0, first = first }
      failures[message] = f
      failure_order[#failure_order + 1] = f
    end
    f.count, f.last = f.count + n, last or f.last
  end
  local function fail_batch(events, places, err)
    for _ = 1, #events do count("failed", "error") end
    bad = bad + #events
    note_failure(tostring(err), #events, places[1], places[#places])
  end

  local function tally_outcome(name, line_no, outcome)
    local status = tostring(outcome.status)
    local at = outcome.send_at
    if at and (not first_due or at < first_due) then first_due = at end
    count(status, outcome.reason)
    local failed = status == "failed" or status == "invalid"
    if failed then bad = bad + 1 end
    if mode == "json-lines" then ctx:say("%s", output.outcome_line(name, line_no, outcome)) end
    if status == "failed" and outcome.reason == "store_error" and not opts.verbose then
      note_failure(cli_events.outcome_message(outcome), 1, { name, line_no }, { name, line_no })
    elseif (failed and not opts.quiet) or opts.verbose then
      local id = outcome.event_id
      ctx:warn("%s:%d: %s%s: %s", name, line_no, status,
        id ~= nil and (" (event " .. tostring(id) .. ")") or "", cli_events.outcome_message(outcome))
    end
  end

  -- Malformed lines go to the ledger too (status invalid, reason malformed_input), so
  -- that stella status shows them; written with each batch.
  local malformed_entries = {}
  local function record_malformed()
    if dry_run or #malformed_entries == 0 then return end
    local entries = malformed_entries
    malformed_entries = {}
    local ok, res, err = pcall(run.store.record_many, run.store, entries)
    if not ok or not res then fail_batch(entries, {}, ok and err or res) end
  end

  -- Events go to the trigger in batches through its pipeline: one transaction to decide
  -- and queue a batch, one to settle it, instead of two per event; a batch's sends
  -- overlap the store work of the batches beside it.
  local pipeline = trigger:pipeline(function(outcomes, events, where)
    for i = 1, #events do
      local outcome = type(outcomes[i]) == "table" and outcomes[i] or
        { status = "failed", reason = "error", error = "no outcome" }
      tally_outcome(where[i][1], where[i][2], outcome)
    end
  end)
  local batch, where = {}, {}
  local next_size = M.batch_sizes(connections)
  local batch_size = next_size()
  local function run_batch()
    record_malformed()
    if #batch == 0 then return end
    local events, places = batch, where
    batch, where = {}, {}
    local pok, perr = pcall(pipeline.process, pipeline, events, places)
    if not pok then fail_batch(events, places, perr) end
  end

  local malformed, unreadable, stopped = cli_events.each(ctx, inputs, opts.format, function(reader, line_no, event)
    if sig.caught() then return false end   -- checked between events: no new batch
    batch[#batch + 1] = event
    where[#where + 1] = { reader.name, line_no }
    if #batch >= batch_size then
      run_batch()
      batch_size = next_size()
    end
  end, function(message)
    if not opts.quiet then ctx:warn("%s", message) end
    malformed_entries[#malformed_entries + 1] = { time = ctx.time(), status = "invalid",
                                                  reason = "malformed_input", detail = message }
  end, bar)
  -- a batch read before the signal is still decided and queued (its sends are not made)
  run_batch()
  local fok, ferr = pcall(pipeline.finish, pipeline)
  if not fok then ctx:warn("error: %s", tostring(ferr)) bad = bad + 1 end
  record_malformed()

  -- sent, but the store did not take the settle (locked past its busy timeout): say so,
  -- and where it is kept until the next run writes it (stella.trigger.settle)
  local unrecorded = tally["sent\0unrecorded"] or tally["recorded\0unrecorded"]
  local pending = not dry_run and require("stella.trigger.settle").pending(trigger) or 0
  if unrecorded then bad = bad + 1 end
  setup.stop(run)
  if unrecorded or pending > 0 then
    local where = require("stella.trigger.unsettled").path_of(run.store)
    ctx:warn("stella trigger: the store could not record every outcome in time; %s", pending == 0
      and "they were all recorded before the end"
      or ("%d not recorded yet%s: the next `stella retry` or `stella trigger` records them, and sends nothing of them again"):format(
        pending, where and (", kept in " .. where) or ""))
  end
  for _, f in ipairs(failure_order) do
    local first, last = f.first, f.last
    ctx:warn("stella trigger: %d event%s not processed%s: %s", f.count, f.count == 1 and "" or "s",
      first and last and (" (%s:%d to %s:%d)"):format(first[1], first[2], last[1], last[2]) or "", f.message)
  end

  local interrupted = tally["queued\0interrupted"]
  local open = tally["queued\0circuit_open"]
  local signal_status = sig:status()
  local signal_name = sig.name()
  sig:release()
  local status = signal_status or (open and EXIT.UNREACHABLE)
    or ((bad > 0 or malformed > 0 or unreadable > 0) and EXIT.FAILED or EXIT.OK)
  if signal_status then
    local n = interrupted and interrupted.count or 0
    ctx:warn("stella trigger: stopped by %s%s; %d request%s not sent wait%s in the outbox for `stella retry`",
      signal_name, stopped and (" before %s:%d (that line and the rest were not read)"):format(stopped[1], stopped[2]) or "",
      n, n == 1 and "" or "s", n == 1 and "s" or "")
  elseif open then
    ctx:warn("stella trigger: the API could not be reached: the circuit breaker opened after repeated "
      .. "connection failures, and %d request%s wait in the outbox untried; run `stella retry` once it is back",
      open.count, open.count == 1 and "" or "s")
  end
  if mode == "json" then
    ctx:say("%s", output.encode{ command = "trigger", dry_run = dry_run, counts = output.counts(order),
      total = output.total(order), malformed = malformed, unreadable = unreadable, exit_status = status })
    return status
  elseif mode == "json-lines" then
    return status
  end
  if dry_run then ctx:say("dry run: nothing was sent and nothing was written") end
  local rows, total = tables.outcome_rows(order)
  rows[#rows + 1] = { "total", "", tostring(total) }
  tables.print(ctx, { "outcome", "reason", "count" }, rows, { [3] = true })
  ctx:say("malformed lines: %d", malformed)
  if unreadable > 0 then ctx:say("unreadable inputs: %d", unreadable) end
  local scheduled = tally["queued\0scheduled"]
  if scheduled and not dry_run then
    ctx:say("scheduled: %d request%s wait%s in the outbox (the rules' delay or quiet hours), the first due at %s; "
      .. "`stella retry` sends each once it is due", scheduled.count, scheduled.count == 1 and "" or "s",
      scheduled.count == 1 and "s" or "", os.date("%Y-%m-%d %H:%M:%S", math.floor(first_due)))
  end
  return status
end

return M
