-- stella.cli.redis: `stella redis load`, the rules inside Redis (stella.redis_rules): the
-- store's Function library loaded again with the rule engine and a rules file, so that
-- any Redis client decides and enqueues an event with FCALL stella_decide.
local pcall, tostring = pcall, tostring
local setup = require "stella.cli.setup"

local M = {}

M.help = [[
usage: stella redis load --rules FILE [--db URL] [--json]

Loads the rule engine and the rules FILE into the Redis store's Function library, so
that any Redis client (redis-cli, Python, Node, ...) decides an event and queues its
request with one call:

  FCALL stella_decide 1 stella:{main}:meta EVENT_JSON [NOW]
    -> status, reason, detail, outbox id (see README, "Rules inside Redis")

The same rule code as `stella trigger`. A rules file using what Redis's Lua (5.1) lacks
(io, os, require, print, utf8, string.pack, goto, //, bit operators, ...) is refused,
naming what and where (on_alert is not run in Redis: it may use them). A request decided
in Redis is validated by whoever sends it (`stella retry`): an invalid one releases its
marks and is recorded invalid. Load again after changing the rules.

  --rules FILE   the rules file
  --db URL       the Redis store (redis://[[user]:password@]host[:port][/db]; default $STELLA_DB)
  --json         print the result as one JSON object
]]

-- its options: "flag" or "value"
M.options = { rules = "value", db = "value", json = "flag" }

function M.run(ctx, opts, positional)
  local sub = positional[1]
  if sub == nil then return ctx:usage_error("redis", "give a subcommand: load") end
  if sub ~= "load" then return ctx:usage_error("redis", "unknown subcommand %s (known: load)", sub) end
  if positional[2] ~= nil then return ctx:usage_error("redis", "unexpected argument %s", positional[2]) end
  if not opts.rules then return ctx:usage_error("redis", "--rules FILE is required") end
  local db = opts.db or ctx.getenv("STELLA_DB")
  if not setup.is_url(db) then
    return ctx:usage_error("redis", "--db must be a Redis URL (redis://... or unix://...)")
  end
  db = setup.db(ctx, { db = db })   -- (its password becomes a secret)
  local redis_rules = require "stella.redis_rules"
  local source, rerr = redis_rules.read(opts.rules)
  if not source then ctx:warn("stella redis load: cannot read %s: %s", opts.rules, tostring(rerr)) return 1 end
  -- what Redis's Lua lacks first (a file using // does not even compile under LuaJIT)
  local problems = redis_rules.check(opts.rules, source)
  if #problems > 0 then
    ctx:warn("stella redis load: %s: refused:\n%s", opts.rules, table.concat(problems, "\n"))
    return 1
  end
  -- the file as the Lua trigger loads it: its own mistakes, named as `stella trigger` does
  local compiled, cerr = require("stella.rules").load(opts.rules, { allow = { io = true } })
  if not compiled then ctx:warn("stella redis load: %s", tostring(cerr)) return 1 end
  local store, serr = setup.open_store(db)
  if not store then ctx:warn("stella redis load: %s", serr) return 1 end
  local ok, info, lerr = pcall(redis_rules.load, store, opts.rules, source)
  store:close()
  if not ok or not info then
    ctx:warn("stella redis load: %s: refused:\n%s", opts.rules, tostring(ok and lerr or info))
    return 1
  end
  if opts.json then
    ctx:say("%s", require("stella.cli.output").encode{ command = "redis load", rules = info.name,
      sha256 = info.sha256, library = "stella", version = info.version, bytes = info.bytes,
      db = setup.label(db), meta_key = info.meta_key, exit_status = 0 })
    return 0
  end
  ctx:say("loaded %s into %s (Function library stella version %d, %d bytes)", info.name,
    setup.label(db), info.version, info.bytes)
  ctx:say("decide an event: FCALL stella_decide 1 %s EVENT_JSON [NOW]", info.meta_key)
  return 0
end

return M
