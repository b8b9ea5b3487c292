-- stella.cli.setup: what a command needs before it runs: the rules file, the API key
-- and client, the store, the trigger; and closing them again.
--
--   local run, status = setup.start(ctx, "trigger", { rules = FILE, send = true, db = FILE })
--   ...
--   setup.stop(run)
--
-- Every key it meets (rules file, brands) is handed to ctx:secret before anything is
-- printed.
local ipairs, pcall, tostring, type = ipairs, pcall, tostring, type

local keys = require "stella.keys"

local M = {}

M.DEFAULT_DB = "stella.db"

-- the part of a sending command's help about keys
M.KEYS_HELP = [[
API keys and host (never printed):
  STELLA_TEST_KEY, STELLA_PRODUCTION_KEY   the company's two keys
  STELLA_API_KEY                           one key, whatever the mode
  STELLA_MODE                              test (default) or production
  STELLA_BASE_URL                          the API host (default https://api.stellaconnect.net)
  A rules file may set api_key, keys = { test = ..., production = ... }, mode and base_url;
  the environment wins over the file.]]

-- Loads and compiles a rules file with stella.rules (the same rule environment the
-- library uses, plus io, so that on_alert can write to stderr). Returns the compiled
-- rules, or nil and a message. They, not the file name, go to the trigger: the file is
-- read and compiled once.
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
function M.new_client(ctx, rules, mode, channels)
  local client, err = keys.from_environment(rules, { mode = mode, channels = channels, getenv = ctx.getenv })
  if not client then return nil, ctx:redact(err), 2 end
  return client
end

function M.file_exists(path)
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

-- Whether --db names a Redis server (redis://... or unix://...) rather than a file.
function M.is_url(db)
  return type(db) == "string" and (db:match("^[Rr][Ee][Dd][Ii][Ss]://") or db:match("^[Uu][Nn][Ii][Xx]://")) ~= nil
end

-- The store a command uses: --db, else STELLA_DB in the environment, else stella.db.
-- A Redis URL's password becomes one of ctx's secrets (never printed).
function M.db(ctx, opts)
  local db = opts.db or ctx.getenv("STELLA_DB") or M.DEFAULT_DB
  if M.is_url(db) then
    local u = require("stella.redis").parse_url(db)
    if u and u.password then ctx:secret(u.password) end
  end
  return db
end

-- --db as messages show it: a Redis URL without its password.
function M.label(db)
  if not M.is_url(db) then return db end
  local u = require("stella.redis").parse_url(db)
  if not u then return (db:gsub("^(%a+://)[^@/]*@", "%1***@")) end
  local auth = u.password and ((u.user or "") .. ":***@") or ""
  if u.path then return "unix://" .. auth .. u.path .. (u.db ~= 0 and "?db=" .. u.db or "") end
  local host = u.host:find(":", 1, true) and "[" .. u.host .. "]" or u.host
  return "redis://" .. auth .. host .. ":" .. u.port .. "/" .. u.db
end

-- Opens the store named by --db (":memory:" for the memory store, a redis:// URL for the
-- Redis store). opts.must_exist: fail when the file is not there rather than create it.
function M.open_store(path, opts)
  local store_mod = require "stella.store"
  if path == ":memory:" then return store_mod.memory() end
  if M.is_url(path) then
    local ok, store, err = pcall(store_mod.redis, path)
    if not ok or not store then
      return nil, ("cannot open the store %s: %s"):format(M.label(path), tostring(ok and err or store))
    end
    return store
  end
  if opts and opts.must_exist and not M.file_exists(path) then
    return nil, ("no store at %s (run `stella trigger` first, or give --db)"):format(path)
  end
  local ok, store, err = pcall(store_mod.sqlite, path)
  if not ok or not store then
    return nil, ("cannot open the store %s: %s"):format(path, tostring(ok and err or store))
  end
  return store
end

-- Purges the store of a started run (trigger:purge): what is past the retention window,
-- expired marks. A failure is said (unless --quiet) and fails nothing: the next run
-- tries again. --verbose says what went.
function M.purge(ctx, command, run, opts)
  local ok, res, err = pcall(run.trigger.purge, run.trigger)
  if not ok or not res then
    if not opts.quiet then ctx:warn("stella %s: purge: %s", command, tostring(ok and err or res)) end
    return
  end
  if opts.verbose then
    local days = run.trigger.retention.days
    ctx:warn("stella %s: purged %d ledger entr%s and %d dead outbox item%s %s, %d expired mark%s", command,
      res.ledger, res.ledger == 1 and "y" or "ies", res.dead, res.dead == 1 and "" or "s",
      days == math.huge and "(retention: forever)" or ("older than " .. M.days_text(days)),
      res.marks, res.marks == 1 and "" or "s")
  end
end

-- "90 days", "1.5 days", "forever"
function M.days_text(days)
  if days == math.huge then return "forever" end
  local text = ("%.2f"):format(days):gsub("%.?0+$", "")
  return text .. (text == "1" and " day" or " days")
end

-- Closes what start() opened; safe on a partly started run.
function M.stop(run)
  if run.trigger then pcall(run.trigger.close, run.trigger) end
  if run.store then pcall(run.store.close, run.store) end
  if run.limiter then pcall(run.limiter.close, run.limiter) end
  if run.client then pcall(run.client.close, run.client) end
end

-- Loads the rules, makes the client (when the command sends), opens the store and starts
-- the trigger. o = { rules = FILE|nil, send = bool, db = FILE|":memory:", must_exist,
-- dry_run, connections, stop (the trigger's: a function saying the run must end),
-- retention (the trigger's: { days = n } from --keep, or nil), rate_budget (the rate
-- limit gate's budget: stella.rate_limit.gate) }. The trigger's clock is
-- the context's (ctx.time).
-- With the Redis store and rules that set rate_limit, the trigger sends through the
-- fleet's rate limit (stella.rate_limit: run.limiter, its gate).
-- Returns run = { rules (compiled), client, store, trigger, limiter }, or
-- nil and the exit status after saying what went wrong.
function M.start(ctx, command, o)
  local run = {}
  local function fail(status, fmt, ...)
    M.stop(run)
    ctx:warn("stella " .. command .. ": " .. fmt, ...)
    return nil, status
  end
  if o.rules then
    local rules, err = load_rules(ctx, o.rules)
    if not rules then return fail(2, "rules: %s", err) end
    run.rules = rules
  end
  if o.send then
    local client, err, status = M.new_client(ctx, run.rules)
    if not client then return fail(status, "%s", err) end
    run.client = client
  end
  local store, serr = M.open_store(o.db, { must_exist = o.must_exist })
  if not store then return fail(1, "%s", serr) end
  run.store = store
  local gate
  if o.send and not o.dry_run and run.rules and run.rules.rate_limit then
    -- the fleet's rate limit lives in Redis: with another store there is no fleet to share it
    if M.is_url(o.db) then
      local rate_limit = require "stella.rate_limit"
      local limiter, lerr = rate_limit.open(o.db)
      if not limiter then return fail(1, "cannot open the rate limit on %s: %s", M.label(o.db), tostring(lerr)) end
      run.limiter = limiter
      gate = rate_limit.gate{ limiter = limiter, rules = run.rules, budget = o.rate_budget }
    else
      ctx:warn("stella %s: the rules' rate_limit is kept in Redis and applies with --db redis://... only; "
        .. "not applied with %s", command, M.label(o.db))
    end
  end
  local trigger, terr = new_trigger{ rules = run.rules or {}, client = run.client, store = store,
                                     dry_run = o.dry_run, connections = o.connections, stop = o.stop,
                                     clock = ctx.time, retention = o.retention, gate = gate }
  if not trigger then return fail(2, "%s", terr) end
  run.trigger = trigger
  return run
end

return M
