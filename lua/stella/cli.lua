-- stella.cli: the `stella` command.
--
--   os.exit(require("stella.cli").main(arg))
--
-- cli.main(argv [, env]) -> exit status (0 fine, 1 something failed, 2 bad usage)
--   argv  the command line without the program name (argv[1] is the command)
--   env   { getenv = os.getenv, stdout = io.stdout, stderr = io.stderr, stdin = io.stdin,
--           isatty = function() -> is stderr a terminal, time = os.time }, for tests
--
-- No API key is ever printed: everything written goes through a filter that replaces
-- every key the command knows of (environment and rules file) with "[redacted]".
local error, ipairs, pairs, pcall, select, setmetatable, tonumber, tostring, type, xpcall =
      error, ipairs, pairs, pcall, select, setmetatable, tonumber, tostring, type, xpcall
local concat, sort = table.concat, table.sort
local floor, max = math.floor, math.max

local input = require "stella.input"
local errors = require "stella.error"
local keys = require "stella.keys"

local M = {}

local KEY_VARIABLES = keys.VARIABLES
local DEFAULT_DB = "stella.db"

---------------------------------------------------------------------------
-- Help texts
---------------------------------------------------------------------------

local USAGE = [[
usage: stella COMMAND [OPTIONS] [ARGS]

commands:
  trigger      send feedback requests for the events of export files, through rules
  send         send one request given as JSON
  validate     check export files offline; one line per problem
  status       counts, error rate per hour, outbox and latest errors from the local store
  retry        send what the outbox holds
  unsubscribe  stop requests to e-mail addresses
  sandbox      run a local emulation of the Requests API with a status page
  help         this text, or `stella help COMMAND`

Run `stella COMMAND --help` for a command's options.]]

local KEYS_HELP = [[
API keys and host (never printed):
  STELLA_TEST_KEY, STELLA_PRODUCTION_KEY   the company's two keys
  STELLA_API_KEY                           one key, whatever the mode
  STELLA_MODE                              test (default) or production
  STELLA_BASE_URL                          the API host (default https://api.stellaconnect.net)
  A rules file may set api_key, keys = { test = ..., production = ... }, mode and base_url;
  the environment wins over the file.]]

local HELP = {
  trigger = [[
usage: stella trigger --rules FILE [--db FILE] [--dry-run] [--format FMT] [--connections N] [INPUT...]

Runs every event of each INPUT (a JSON Lines or CSV export file; "-" or nothing is
standard input) through the rules and sends the requests they decide on.

  --rules FILE   the rules file (Lua, returns a table); required
  --db FILE      the store: suppression marks, ledger, unsubscribes, outbox
                 (default stella.db in the current directory; ":memory:" keeps nothing)
  --dry-run      decide and validate, but send nothing and write nothing
  --format FMT   jsonl or csv, when the file name and content do not tell
  --connections N  send up to N requests at once, each on its own connection (1 to 64;
                 default 1): for a distant API, where each request mostly waits

A malformed line is reported on standard error as FILE:LINE: message and skipped. At the
end a summary by outcome and reason goes to standard output. Exit status: 0 when nothing
failed, 1 when an event was failed, invalid or malformed, 2 on bad usage.
]] .. KEYS_HELP,

  send = [[
usage: stella send [--test|--production] [--channels a,b] (JSON | -)

Sends one request to POST /v1/requests. The request is a JSON object given as the
argument, or read from standard input with "-". Prints the request id.

  --test          use the test key (the default, or STELLA_MODE)
  --production    use the production key
  --channels a,b  the channels the company has enabled; others are refused before sending

On failure prints "error: KIND: message" on standard error and exits with status 1.
]] .. KEYS_HELP,

  validate = [[
usage: stella validate [--rules FILE] [--channels a,b] [--format FMT] [INPUT...]

Checks export files offline; sends nothing, needs no key. Without --rules each line is a
request as the API takes it; with --rules each event is first mapped by the rules (a dry
run) and the request it gives is checked. Prints one line per problem,
FILE:LINE: PATH: message (CODE), then "N events, M invalid". Exit status 1 when any
event is invalid or malformed.

  --rules FILE    map events through this rules file first
  --channels a,b  without --rules: the channels the company has enabled (with --rules,
                  the rules file's channels apply)
  --format FMT    jsonl or csv, when the file name and content do not tell
]],

  status = [[
usage: stella status [--db FILE] [--since DURATION]

A local status page from the store: outcomes by reason, the error rate per hour (the
service alerts above 5% in an hour), what the outbox holds, and the latest invalid and
failed events with their messages.

  --db FILE         the store (default stella.db)
  --since DURATION  how far back: 90m, 24h, 7d, 2w (default 24h)
]],

  retry = [[
usage: stella retry [--rules FILE] [--db FILE] [--connections N]

Sends the requests waiting in the outbox (those that failed with a retryable error) and
prints how many were sent, are still queued, or were given up (dead). Exit status 1 when
any failed or was given up.

  --rules FILE   the rules file (for keys, brands and alerts); optional
  --db FILE      the store (default stella.db)
  --connections N  send up to N requests at once (1 to 64; default 1)
]] .. KEYS_HELP,

  unsubscribe = [[
usage: stella unsubscribe [--db FILE] EMAIL...

Stops all further requests to each EMAIL. The store keeps a salted hash of the address,
not the address itself.

  --db FILE   the store (default stella.db)
]],
}

HELP.sandbox = [[
usage: stella sandbox [--port N] [--config FILE] [--prefix DIR] [--quiet]

Runs a local emulation of the Requests API (nginx with its Lua module) in the foreground
until Ctrl-C. POST /v1/requests and POST /v1/recoveries are answered as the service would
answer the company described by the config file, after the same checks the client makes
(the C core); GET /status is an API status page (Invalid Requests, Test Requests,
Delivered, error rate per hour) and GET /status.json the same data. One line per request
goes to standard output.

  --port N       the 127.0.0.1 port (default 8787; 0 picks a free one)
  --config FILE  the company: its test and production keys, test e-mail, channels,
                 employees, brands, languages, suppression days, unsubscribed customers
                 (default sandbox/config.lua, which documents every setting)
  --prefix DIR   keep nginx's config, logs and the pid file DIR/sandbox.pid in DIR
                 (default: a temporary directory, removed on exit)
  --quiet        no line per request

Point the client or the other commands at it with the config's keys (never printed):
  STELLA_BASE_URL=http://127.0.0.1:8787 STELLA_TEST_KEY=<keys.test> stella trigger ...
Stop it with Ctrl-C, or from elsewhere with kill -TERM $(cat DIR/sandbox.pid).
Needs nginx, libnginx-mod-http-lua, luasocket and the C core built for LuaJIT
(make LUA=luajit).
]]

HELP.help = "usage: stella help [COMMAND]\n\nShows the list of commands, or one command's help.\n"

-- options each command takes: "flag" or "value"
local OPTIONS = {
  trigger = { rules = "value", db = "value", ["dry-run"] = "flag", format = "value", connections = "value" },
  send = { test = "flag", production = "flag", channels = "value" },
  validate = { rules = "value", channels = "value", format = "value" },
  status = { db = "value", since = "value" },
  retry = { rules = "value", db = "value", connections = "value" },
  unsubscribe = { db = "value" },
  sandbox = { port = "value", config = "value", prefix = "value", quiet = "flag" },
  help = {},
}

---------------------------------------------------------------------------
-- Output, with keys redacted
---------------------------------------------------------------------------

local Ctx = {}
Ctx.__index = Ctx

function Ctx:secret(value)
  if type(value) == "string" and #value >= 4 then self.secrets[#self.secrets + 1] = value end
end

function Ctx:redact(text)
  text = tostring(text)
  for _, s in ipairs(self.secrets) do text = errors.redact(text, s) end
  return text
end

function Ctx:write(stream, text)
  stream:write(self:redact(text))
end

-- a line on stdout
function Ctx:say(fmt, ...)
  local text = select("#", ...) > 0 and fmt:format(...) or fmt
  self:write(self.stdout, text .. "\n")
end

-- a line on stderr (clearing the progress bar first)
function Ctx:warn(fmt, ...)
  local text = select("#", ...) > 0 and fmt:format(...) or fmt
  if self.bar_shown then self.stderr:write("\r\27[K"); self.bar_shown = false end
  self:write(self.stderr, text .. "\n")
end

-- bad usage: the message and the command's usage line(s), status 2
function Ctx:usage_error(command, fmt, ...)
  self:warn("stella%s: " .. fmt, command and (" " .. command) or "", ...)
  local help = command and HELP[command]
  local usage = help and help:match("^(usage:.-)\n\n") or USAGE:match("^(usage:[^\n]*)")
  self:warn(usage)
  self:warn("Run `stella %s--help` for more.", command and (command .. " ") or "")
  return 2
end

local function default_isatty()
  local ok, a, _, c = pcall(os.execute, "test -t 2")
  if not ok then return false end
  return a == true or a == 0 or (a == nil and c == 0)
end

local function new_ctx(env)
  env = env or {}
  local getenv = env.getenv or os.getenv
  local ctx = setmetatable({
    -- an empty variable counts as unset
    getenv = function(name)
      local v = getenv(name)
      if v == "" then return nil end
      return v
    end,
    stdout = env.stdout or io.stdout,
    stderr = env.stderr or io.stderr,
    stdin = env.stdin or io.stdin,
    isatty = env.isatty or default_isatty,
    time = env.time or os.time,
    secrets = {},
  }, Ctx)
  for _, name in ipairs(KEY_VARIABLES) do ctx:secret(ctx.getenv(name)) end
  return ctx
end

---------------------------------------------------------------------------
-- Arguments
---------------------------------------------------------------------------

-- Returns opts, positional | nil, message. "--" ends the options; "-" is positional.
local function parse_args(argv, first, spec)
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

local function wants_help(argv, first)
  for i = first, #argv do
    local a = argv[i]
    if a == "--" then return false end
    if a == "--help" or a == "-h" then return true end
  end
  return false
end

local function split_list(text)
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

---------------------------------------------------------------------------
-- Loading the parts: rules, keys, client, store, trigger
---------------------------------------------------------------------------

-- Loads and checks a rules file with stella.rules (the same sandbox the library uses,
-- plus io, so that on_alert can write to stderr). Returns the compiled rules, or nil and
-- a message. They, not the file name, go to the trigger: the file is read and compiled
-- once.
local function load_rules(ctx, path)
  local compiled, err = require("stella.rules").load(path, { allow = { io = true } })
  if not compiled then
    -- a syntax error quotes the token it stopped at: never a string, which may be a key
    return nil, (tostring(err):gsub("near '[\"'%[].*'$", "near a string (not shown)"))
  end
  for _, key in ipairs(keys.of_rules(compiled)) do ctx:secret(key) end
  return compiled
end

-- A client with the key, mode and host of the environment and the rules (stella.keys).
-- Returns the client | nil, message, exit status.
local function new_client(ctx, rules, mode, channels)
  local client, err = keys.from_environment(rules, { mode = mode, channels = channels, getenv = ctx.getenv })
  if not client then return nil, ctx:redact(err), 2 end
  return client
end

local function file_exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

-- stella.trigger(opts), with a failure to start (a rules mistake) as nil, message.
local function new_trigger(opts)
  local ok, trigger = pcall(require("stella").trigger, opts)
  if not ok then return nil, tostring(trigger) end
  return trigger
end

-- Opens the store named by --db (":memory:" for the memory store). opts.must_exist:
-- fail when the file is not there rather than create it.
local function open_store(path, opts)
  local store_mod = require "stella.store"
  if path == ":memory:" then return store_mod.memory() end
  if opts and opts.must_exist and not file_exists(path) then
    return nil, ("no store at %s (run `stella trigger` first, or give --db)"):format(path)
  end
  local ok, store, err = pcall(store_mod.sqlite, path)
  if not ok or not store then
    return nil, ("cannot open the store %s: %s"):format(path, tostring(ok and err or store))
  end
  return store
end

-- Closes what start() opened; safe on a partly started run.
local function stop(run)
  if run.trigger then pcall(run.trigger.close, run.trigger) end
  if run.store then pcall(run.store.close, run.store) end
  if run.client then pcall(run.client.close, run.client) end
end

-- Loads the rules, makes the client (when the command sends), opens the store and starts
-- the trigger. o = { rules = FILE|nil, send = bool, db = FILE|":memory:", must_exist,
-- dry_run }. Returns run = { rules, client, store, trigger }, or nil and the exit status
-- after saying what went wrong.
local function start(ctx, command, o)
  local run = { rules = {} }
  local function fail(status, fmt, ...)
    stop(run)
    ctx:warn("stella " .. command .. ": " .. fmt, ...)
    return nil, status
  end
  if o.rules then
    local rules, err = load_rules(ctx, o.rules)
    if not rules then return fail(2, "rules: %s", err) end
    run.rules = rules
  end
  if o.send then
    local client, err, status = new_client(ctx, run.rules)
    if not client then return fail(status, "%s", err) end
    run.client = client
  end
  local store, serr = open_store(o.db, { must_exist = o.must_exist })
  if not store then return fail(1, "%s", serr) end
  run.store = store
  local trigger, terr = new_trigger{ rules = run.rules, client = run.client, store = store,
                                     dry_run = o.dry_run, connections = o.connections }
  if not trigger then return fail(2, "%s", terr) end
  run.trigger = trigger
  return run
end

---------------------------------------------------------------------------
-- Tables
---------------------------------------------------------------------------

-- Prints rows (lists of strings) with aligned columns; `right` marks right-aligned ones.
local function print_table(ctx, header, rows, right)
  right = right or {}
  local widths = {}
  local function measure(row)
    for i, cell in ipairs(row) do widths[i] = max(widths[i] or 0, #tostring(cell)) end
  end
  measure(header)
  for _, row in ipairs(rows) do measure(row) end
  local function line(row)
    local cells = {}
    for i, cell in ipairs(row) do
      cell = tostring(cell)
      local pad = (" "):rep(widths[i] - #cell)
      cells[i] = right[i] and (pad .. cell) or (i < #row and cell .. pad or cell)
    end
    return (concat(cells, "  "):gsub("%s+$", ""))
  end
  ctx:say(line(header))
  for _, row in ipairs(rows) do ctx:say(line(row)) end
end

local STATUS_ORDER = { sent = 1, recorded = 2, queued = 3, skipped = 4, suppressed = 5,
                       invalid = 6, failed = 7 }

local function status_rank(status)
  return STATUS_ORDER[status] or 100
end

-- counts: list of { status, reason, count } -> rows sorted by status, then count.
local function outcome_rows(counts)
  local list = {}
  for _, c in ipairs(counts) do list[#list + 1] = c end
  sort(list, function(a, b)
    local ra, rb = status_rank(a.status), status_rank(b.status)
    if ra ~= rb then return ra < rb end
    if a.status ~= b.status then return tostring(a.status) < tostring(b.status) end
    if a.count ~= b.count then return a.count > b.count end
    return tostring(a.reason or "") < tostring(b.reason or "")
  end)
  local rows, total = {}, 0
  for _, c in ipairs(list) do
    local reason = c.reason
    if reason == nil or reason == "" then reason = "-" end
    rows[#rows + 1] = { tostring(c.status), tostring(reason), tostring(c.count) }
    total = total + c.count
  end
  return rows, total
end

---------------------------------------------------------------------------
-- Progress bar (stderr, only on a terminal)
---------------------------------------------------------------------------

local function new_progress(ctx)
  if not ctx.isatty() then return nil end
  local p = { events = 0, last_events = -1, last_time = 0, last_pct = -1 }
  -- one more event read: redraws when the percentage or the second changed, or every 50
  function p.update(reader)
    p.events = p.events + 1
    local now = os.time()
    local pos, size = reader:progress()
    local pct = (pos and size and size > 0) and floor(pos * 100 / size) or nil
    if p.events - p.last_events < 50 and now == p.last_time and pct == p.last_pct then return end
    p.last_events, p.last_time, p.last_pct = p.events, now, pct
    local text
    if pct then
      local width = 30
      local filled = floor(width * pct / 100)
      text = ("%s [%s%s] %3d%%  %d events"):format(reader.name, ("#"):rep(filled),
        ("."):rep(width - filled), pct, p.events)
    else
      text = ("%s  %d events"):format(reader.name, p.events)
    end
    ctx.stderr:write("\r" .. ctx:redact(text) .. "\27[K")
    ctx.bar_shown = true
  end
  function p.done()
    if ctx.bar_shown then ctx.stderr:write("\r\27[K"); ctx.bar_shown = false end
  end
  return p
end

---------------------------------------------------------------------------
-- Validation problems
---------------------------------------------------------------------------

local function problem_lines(ctx, name, line_no, errors)
  for _, e in ipairs(errors) do
    ctx:say("%s:%d: %s: %s (%s)", name, line_no, tostring(e.path), tostring(e.message), tostring(e.code))
  end
end

local function outcome_message(outcome)
  local err = outcome.error
  if err ~= nil then
    local kind = type(err) == "table" and err.kind
    if kind == outcome.status then kind = nil end
    return (kind and (kind .. ": ") or "") .. tostring(type(err) == "table" and err.message or err)
  end
  return tostring(outcome.detail or outcome.reason or outcome.status)
end

---------------------------------------------------------------------------
-- Commands
---------------------------------------------------------------------------

local commands = {}

-- Reads the events of each input; calls on_event(reader, line_no, event), and
-- report(message) for each malformed record. Returns the number of malformed records
-- and of unreadable inputs.
local function each_event(ctx, inputs, format, on_event, report, progress)
  local malformed, unreadable = 0, 0
  for _, path in ipairs(inputs) do
    local reader, err = input.open(path, format, { stdin = ctx.stdin })
    if not reader then
      ctx:warn("stella: %s", err)
      unreadable = unreadable + 1
    else
      for line_no, event, lerr in reader:lines() do
        if event then
          on_event(reader, line_no, event)
        else
          malformed = malformed + 1
          report(lerr)
        end
        if progress then progress.update(reader) end
      end
      reader:close()
    end
  end
  if progress then progress.done() end
  return malformed, unreadable
end

-- Events per batch of the trigger's pipeline: a batch costs two store transactions
-- whatever its size, and a bigger one spreads them over more events (200 ran ~15% faster
-- than 50 in bench/pipeline.lua); a batch's outcomes are printed when it completes.
-- --connections N: a whole number from 1 to 64 (1 when absent), or nil.
local function connections_option(opts)
  local n = tonumber(opts.connections or "1")
  if not n or n < 1 or n > 64 or n % 1 ~= 0 then return nil end
  return n
end

local BATCH_SIZE = 200
M.BATCH_SIZE = BATCH_SIZE

function commands.trigger(ctx, opts, inputs)
  if not opts.rules then return ctx:usage_error("trigger", "--rules FILE is required") end
  if #inputs == 0 then inputs = { "-" } end
  local dry_run = opts["dry-run"] == true
  local db = opts.db or DEFAULT_DB
  -- a dry run reads an existing store but does not create one; it sends nothing, so it
  -- needs no key
  if dry_run and db ~= ":memory:" and not file_exists(db) then db = ":memory:" end
  local connections = connections_option(opts)
  if not connections then
    return ctx:usage_error("trigger", "--connections must be a whole number from 1 to 64")
  end
  local run, rstatus = start(ctx, "trigger", { rules = opts.rules, send = not dry_run, db = db,
                                               dry_run = dry_run, connections = connections })
  if not run then return rstatus end
  local trigger = run.trigger
  -- expired suppression and dedupe marks are dead weight: drop them once per run
  if not dry_run and run.store.purge_marks then pcall(run.store.purge_marks, run.store, os.time()) end

  local tally, order = {}, {}
  local bad = 0
  local progress = new_progress(ctx)

  local function tally_outcome(name, line_no, outcome)
    local status, reason = tostring(outcome.status), outcome.reason
    local key = status .. "\0" .. tostring(reason)
    local t = tally[key]
    if not t then
      t = { status = status, reason = reason, count = 0 }
      tally[key] = t
      order[#order + 1] = t
    end
    t.count = t.count + 1
    if status == "failed" or status == "invalid" then
      bad = bad + 1
      local id = outcome.event_id
      ctx:warn("%s:%d: %s%s: %s", name, line_no, status,
        id ~= nil and (" (event " .. tostring(id) .. ")") or "", outcome_message(outcome))
    end
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
  local function fail_batch(events, places, err)
    for i = 1, #events do
      tally_outcome(places[i][1], places[i][2], { status = "failed", reason = "error", error = tostring(err) })
    end
  end
  local function run_batch()
    if #batch == 0 then return end
    local events, places = batch, where
    batch, where = {}, {}
    local pok, perr = pcall(pipeline.process, pipeline, events, places)
    if not pok then fail_batch(events, places, perr) end
  end

  local malformed, unreadable = each_event(ctx, inputs, opts.format, function(reader, line_no, event)
    batch[#batch + 1] = event
    where[#where + 1] = { reader.name, line_no }
    if #batch >= BATCH_SIZE then run_batch() end
  end, function(message) ctx:warn("%s", message) end, progress)
  run_batch()
  local fok, ferr = pcall(pipeline.finish, pipeline)
  if not fok then ctx:warn("error: %s", tostring(ferr)) bad = bad + 1 end

  stop(run)

  if dry_run then ctx:say("dry run: nothing was sent and nothing was written") end
  local rows, total = outcome_rows(order)
  rows[#rows + 1] = { "total", "", tostring(total) }
  print_table(ctx, { "outcome", "reason", "count" }, rows, { [3] = true })
  ctx:say("malformed lines: %d", malformed)
  if unreadable > 0 then ctx:say("unreadable inputs: %d", unreadable) end
  return (bad > 0 or malformed > 0 or unreadable > 0) and 1 or 0
end

function commands.send(ctx, opts, args)
  if opts.test and opts.production then
    return ctx:usage_error("send", "give --test or --production, not both")
  end
  if #args ~= 1 then
    return ctx:usage_error("send", #args == 0 and "the request is missing (JSON or -)" or "give one request")
  end
  local text = args[1] == "-" and (ctx.stdin:read("*a") or "") or args[1]
  local req, jerr = input.decode_json(text)
  if not req then ctx:warn("error: invalid: %s", jerr) return 1 end
  local mode = opts.test and "test" or opts.production and "production" or nil
  local channels = opts.channels and split_list(opts.channels) or nil
  local client, cerr, cstatus = new_client(ctx, nil, mode, channels)
  if not client then ctx:warn("stella send: %s", cerr) return cstatus or 2 end
  local res, err = client:send(req)
  client:close()
  if not res then
    ctx:warn("error: %s: %s", tostring(err.kind), tostring(err.message or err))
    if err.kind == "invalid" and type(err.errors) == "table" then
      for _, e in ipairs(err.errors) do
        ctx:warn("  %s: %s (%s)", tostring(e.path), tostring(e.message), tostring(e.code))
      end
    end
    return 1
  end
  if res.request_id then ctx:say("%s", res.request_id) else ctx:say("sent (no request id returned)") end
  return 0
end

function commands.validate(ctx, opts, inputs)
  if opts.rules and opts.channels then
    return ctx:usage_error("validate", "give --rules or --channels, not both (the rules file lists its channels)")
  end
  if #inputs == 0 then inputs = { "-" } end
  local stella = require "stella"
  local channels = opts.channels and split_list(opts.channels) or nil
  local check
  local run
  if opts.rules then
    local rstatus
    run, rstatus = start(ctx, "validate", { rules = opts.rules, db = ":memory:", dry_run = true })
    if not run then return rstatus end
    local trigger = run.trigger
    check = function(reader, line_no, event)
      local pok, outcome = pcall(trigger.process, trigger, event)
      if not pok then
        ctx:say("%s:%d: rules: %s", reader.name, line_no, tostring(outcome))
        return false
      end
      if outcome.status ~= "invalid" and outcome.status ~= "failed" then return true end
      local problems = outcome.errors   -- the request's validation errors, when it has them
      if type(problems) == "table" and problems[1] then
        problem_lines(ctx, reader.name, line_no, problems)
      else
        ctx:say("%s:%d: %s", reader.name, line_no, outcome_message(outcome))
      end
      return false
    end
  else
    local vopts = channels and { channels = channels } or nil
    check = function(reader, line_no, event)
      local ok, errors = stella.validate(event, vopts)
      if ok then return true end
      problem_lines(ctx, reader.name, line_no, errors)
      return false
    end
  end

  local events, invalid = 0, 0
  local malformed, unreadable = each_event(ctx, inputs, opts.format, function(reader, line_no, event)
    events = events + 1
    if not check(reader, line_no, event) then invalid = invalid + 1 end
  end, function(message) ctx:say("%s", message) end)  -- malformed lines are problems too
  if run then stop(run) end
  events, invalid = events + malformed, invalid + malformed
  ctx:say("%d event%s, %d invalid", events, events == 1 and "" or "s", invalid)
  return (invalid > 0 or unreadable > 0) and 1 or 0
end

local function fmt_time(t)
  if type(t) ~= "number" then return tostring(t) end
  return os.date("%Y-%m-%d %H:%M:%S", floor(t))
end

function commands.status(ctx, opts, args)
  if #args > 0 then return ctx:usage_error("status", "unexpected argument %s", args[1]) end
  local window = M.parse_duration(opts.since or "24h")
  if not window then
    return ctx:usage_error("status", "--since takes a duration like 90m, 24h or 7d, not %s", opts.since)
  end
  local db = opts.db or DEFAULT_DB
  local store, serr = open_store(db, { must_exist = true })
  if not store then ctx:warn("stella status: %s", serr) return 1 end
  local now = ctx.time()
  local since = now - window

  local ok, err = pcall(function()
    ctx:say("stella status: %s, since %s (%s)", db, fmt_time(since), opts.since or "24h")
    ctx:say("")

    local rows, total = outcome_rows(store:counts{ since = since } or {})
    if #rows == 0 then
      ctx:say("no events")
    else
      rows[#rows + 1] = { "total", "", tostring(total) }
      print_table(ctx, { "outcome", "reason", "count" }, rows, { [3] = true })
    end
    ctx:say("")

    ctx:say("error rate per hour")
    local rate = store:rate{ since = since, bucket = 3600 } or {}
    if #rate == 0 then
      ctx:say("no requests")
    else
      local rrows, alert = {}, false
      for _, r in ipairs(rate) do
        local pct = (r.total or 0) > 0 and (r.errors or 0) * 100 / r.total or 0
        local mark = pct > 5 and "!" or ""
        if pct > 5 then alert = true end
        rrows[#rrows + 1] = { os.date("%Y-%m-%d %H:%M", floor(r.start)), tostring(r.total or 0),
                              tostring(r.errors or 0), ("%.1f%%"):format(pct), mark }
      end
      print_table(ctx, { "hour", "total", "errors", "rate", "" }, rrows,
                  { [2] = true, [3] = true, [4] = true })
      if alert then ctx:say("! more than 5% errors in the hour: the service e-mails an alert") end
    end
    ctx:say("")

    local oc = store:outbox_counts() or {}
    ctx:say("outbox: %d queued, %d dead", oc.queued or 0, oc.dead or 0)
    ctx:say("")

    local latest = {}
    for _, st in ipairs{ "invalid", "failed" } do
      for _, e in ipairs(store:ledger{ since = since, status = st, limit = 10 } or {}) do
        latest[#latest + 1] = e
      end
    end
    sort(latest, function(a, b) return (a.time or 0) > (b.time or 0) end)
    ctx:say("latest invalid and failed events")
    if #latest == 0 then
      ctx:say("none")
    else
      local lrows = {}
      for i = 1, math.min(10, #latest) do
        local e = latest[i]
        local msg = e.error_message or e.detail or e.reason or ""
        if e.error_kind then msg = e.error_kind .. ": " .. msg end
        msg = tostring(msg):gsub("%s+", " ")
        if #msg > 160 then msg = msg:sub(1, 157) .. "..." end
        lrows[i] = { fmt_time(e.time), tostring(e.status), tostring(e.event_id or e.interaction_id or "-"), msg }
      end
      print_table(ctx, { "time", "outcome", "event", "message" }, lrows)
    end
  end)
  store:close()
  if not ok then ctx:warn("stella status: %s", tostring(err)) return 1 end
  return 0
end

function commands.retry(ctx, opts, args)
  if #args > 0 then return ctx:usage_error("retry", "unexpected argument %s", args[1]) end
  local connections = connections_option(opts)
  if not connections then
    return ctx:usage_error("retry", "--connections must be a whole number from 1 to 64")
  end
  local run, rstatus = start(ctx, "retry", { rules = opts.rules, send = true, connections = connections,
                                             db = opts.db or DEFAULT_DB, must_exist = true })
  if not run then return rstatus end
  local fok, res, flush_err = pcall(run.trigger.flush, run.trigger)
  local left = fok and res and run.store:outbox_counts() or nil
  stop(run)
  if not fok or not res then ctx:warn("stella retry: %s", tostring(fok and flush_err or res)) return 1 end
  ctx:say("sent %d, recorded %d, still queued %d, failed %d (of which %d given up: dead)",
    res.sent or 0, res.recorded or 0, res.queued or 0, res.failed or 0, res.dead or 0)
  if left then ctx:say("outbox: %d queued, %d dead", left.queued or 0, left.dead or 0) end
  return (res.failed or 0) > 0 and 1 or 0
end

function commands.unsubscribe(ctx, opts, emails)
  if #emails == 0 then return ctx:usage_error("unsubscribe", "give at least one e-mail address") end
  for _, e in ipairs(emails) do
    if not e:match("^[^@%s]+@[^@%s]+$") then
      return ctx:usage_error("unsubscribe", "not an e-mail address: %s", e)
    end
  end
  local store, serr = open_store(opts.db or DEFAULT_DB)
  if not store then ctx:warn("stella unsubscribe: %s", serr) return 1 end
  local now = ctx.time()
  local ok, err = pcall(function()
    for _, e in ipairs(emails) do
      local done, uerr = store:unsubscribe(store:hash_email(e), now)
      if done == nil and uerr ~= nil then error(uerr, 0) end
    end
  end)
  store:close()
  if not ok then ctx:warn("stella unsubscribe: %s", tostring(err)) return 1 end
  ctx:say("unsubscribed %d address%s", #emails, #emails == 1 and "" or "es")
  return 0
end

-- The local Requests API sandbox (lua/stella/sandbox), in the foreground.
function commands.sandbox(ctx, opts, args)
  if #args > 0 then return ctx:usage_error("sandbox", "unexpected argument %s", args[1]) end
  local port = 8787
  if opts.port then
    port = tonumber(opts.port)
    if not port or port ~= floor(port) or port < 0 or port > 65535 then
      return ctx:usage_error("sandbox", "--port takes a number from 0 to 65535, not %s", opts.port)
    end
  end
  local lok, sandbox = pcall(require, "stella.sandbox")
  if not lok then ctx:warn("stella sandbox: %s", tostring(sandbox)) return 1 end
  local sb, err = sandbox.start{ port = port, config = opts.config, prefix = opts.prefix,
                                 access_log = not opts.quiet }
  if not sb then ctx:warn("stella sandbox: %s", tostring(err)) return 1 end
  ctx:secret(sb.config.keys.test)
  ctx:secret(sb.config.keys.production)
  ctx:say("stella sandbox: %s on %s", sb.config.company, sb.url)
  ctx:say("  API     POST %s/v1/requests  POST %s/v1/recoveries", sb.url, sb.url)
  ctx:say("  status  %s/status  (data: %s/status.json)", sb.url, sb.url)
  ctx:say("  config  %s (its keys.test and keys.production open the API)", sb.config_file)
  ctx:say("  pid     %d in %s", sb.pid, sb.pid_file)
  ctx:say("Ctrl-C stops it.")
  ctx.stdout:flush()
  local wok, werr = pcall(sb.wait, sb, function(line)
    ctx:say("%s", line)
    ctx.stdout:flush()
  end)
  sb:stop()
  if not wok and not tostring(werr):find("interrupted", 1, true) then
    ctx:warn("stella sandbox: %s", tostring(werr))
    return 1
  end
  ctx:say("stella sandbox: stopped")
  return 0
end

function commands.help(ctx, _, args)
  local name = args[1]
  if name == nil then ctx:say("%s", USAGE) return 0 end
  if not HELP[name] then return ctx:usage_error(nil, "unknown command %s", name) end
  ctx:say("%s", (HELP[name]:gsub("\n$", "")))
  return 0
end

---------------------------------------------------------------------------
-- Entry point
---------------------------------------------------------------------------

local function run(ctx, argv)
  local name = argv[1]
  if name == nil then
    ctx:warn("%s", USAGE)
    return 2
  end
  if name == "--help" or name == "-h" then name = "help" end
  if name == "--version" or name == "version" then
    ctx:say("%s", require("stella")._VERSION)
    return 0
  end
  local command = commands[name]
  if not command then
    if name:sub(1, 1) == "-" then return ctx:usage_error(nil, "unknown option %s", name) end
    return ctx:usage_error(nil, "unknown command %s", name)
  end
  if wants_help(argv, 2) then
    ctx:say("%s", (HELP[name]:gsub("\n$", "")))
    return 0
  end
  local opts, args = parse_args(argv, 2, OPTIONS[name])
  if not opts then return ctx:usage_error(name, "%s", args) end
  if opts.format and opts.format ~= "jsonl" and opts.format ~= "csv" then
    return ctx:usage_error(name, "--format must be jsonl or csv")
  end
  return command(ctx, opts, args)
end

function M.main(argv, env)
  if type(argv) ~= "table" then error("cli.main: argument list expected", 2) end
  if env ~= nil and type(env) ~= "table" then error("cli.main: env table expected", 2) end
  local args = {}
  for i = 1, #argv do args[i] = tostring(argv[i]) end
  local ctx = new_ctx(env)
  local ok, status = xpcall(run, function(e)
    local getenv = ctx.getenv
    if getenv("STELLA_DEBUG") then return debug.traceback(tostring(e), 2) end
    return tostring(e)
  end, ctx, args)
  if not ok then
    ctx:warn("stella: internal error: %s", tostring(status))
    status = 1
  end
  ctx.stdout:flush()
  ctx.stderr:flush()
  return status
end

return M
