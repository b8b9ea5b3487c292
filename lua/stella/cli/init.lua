-- stella.cli: the `stella` command: finds the command, reads its options and runs it.
--
--   os.exit(require("stella.cli").main(arg))
--
-- cli.main(argv [, env]) -> exit status (0 fine, 1 something failed, 2 bad usage, 3 the
-- API could not be reached, 128+N stopped by signal N: stella.cli.signals.EXIT)
--   argv  the command line without the program name (argv[1] is the command)
--   env   { getenv = os.getenv, stdout = io.stdout, stderr = io.stderr, stdin = io.stdin,
--           isatty = function() -> is stderr a terminal, time = os.time }, for tests
--
-- Each command is a module stella.cli.NAME with its help text, its options and
-- run(ctx, opts, positional) -> exit status. What they share: stella.cli.context (the
-- output, with every API key the command knows of replaced by "[redacted]"),
-- stella.cli.args, stella.cli.setup (rules, client, store, trigger), stella.cli.events,
-- stella.cli.table and stella.cli.progress.
local error, ipairs, tostring, type, xpcall = error, ipairs, tostring, type, xpcall

local args = require "stella.cli.args"
local context = require "stella.cli.context"

local M = {}

local USAGE = [[
usage: stella COMMAND [OPTIONS] [ARGS]

commands:
  trigger      send feedback requests for the events of export files, through rules
  submit       append the events of export files to the work queue on Redis
  worker       process the work queue on Redis (a consumer group; run several)
  send         send one request given as JSON
  validate     check export files offline; one line per problem
  test         check a rules file against cases: events and the outcome each should get
  status       counts, error rate per hour, outbox and latest errors from the local store
  retry        send what the outbox holds
  dashboard    a read-only web page of the pipeline: outcomes over time, outbox, dead letters
  unsubscribe  stop requests to e-mail addresses
  doctor       check the store: SQLite's integrity check, then a read of it
  sandbox      run a local emulation of the Requests API with a status page
  redis        load the rules into a Redis store (FCALL stella_decide from any client)
  help         this text, or `stella help COMMAND`

Run `stella COMMAND --help` for a command's options.]]

local commands = {}
for _, name in ipairs{ "trigger", "submit", "worker", "send", "validate", "test", "status", "retry", "dashboard", "unsubscribe", "doctor", "sandbox", "redis", "help" } do
  commands[name] = require("stella.cli." .. name)
end

M.parse_duration = args.parse_duration
M.BATCH_SIZE = commands.trigger.BATCH_SIZE   -- events per pipeline batch (bench/pipeline.lua)

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
  if args.wants_help(argv, 2) then
    ctx:say("%s", (command.help:gsub("\n$", "")))
    return 0
  end
  local opts, positional = args.parse(argv, 2, command.options)
  if not opts then return ctx:usage_error(name, "%s", positional) end
  if opts.format and opts.format ~= "jsonl" and opts.format ~= "csv" then
    return ctx:usage_error(name, "--format must be jsonl or csv")
  end
  return command.run(ctx, opts, positional)
end

function M.main(argv, env)
  if type(argv) ~= "table" then error("cli.main: argument list expected", 2) end
  if env ~= nil and type(env) ~= "table" then error("cli.main: env table expected", 2) end
  local words = {}
  for i = 1, #argv do words[i] = tostring(argv[i]) end
  local ctx = context.new(env, commands, USAGE)
  -- a closure: Lua 5.1's xpcall passes no arguments to the function it calls
  local ok, status = xpcall(function() return run(ctx, words) end, function(e)
    local getenv = ctx.getenv
    if getenv("STELLA_DEBUG") then return debug.traceback(tostring(e), 2) end
    return tostring(e)
  end)
  if not ok then
    ctx:warn("stella: internal error: %s", tostring(status))
    status = 1
  end
  ctx.stdout:flush()
  ctx.stderr:flush()
  return status
end

return M
