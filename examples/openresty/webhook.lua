-- examples/openresty/webhook.lua: the Lua side of nginx.conf in this directory.
--
--   POST /events         a helpdesk event (a JSON object) or a batch (a JSON array of them).
--                        Answers 202 once the events are in the queue (a shared dict of
--                        their own, or with configure{ queue = "redis://..." } the work
--                        queue's stream on Redis), 503 with Retry-After when the queue or
--                        the store cannot take them. A fixed pool of consumers per worker
--                        (stella.openresty.consumers) drains the queue through
--                        stella.trigger and the cosocket transport: the helpdesk never
--                        waits for the Requests API and the worker never blocks.
--   GET  /events/status  outbox and ledger counts from the shared dict (loopback only)
--   GET  /events/health  queue depth, oldest age, dict use and free space (loopback only)
--
-- Each worker builds one trigger on first use and keeps it: the store is the shared dict
-- (suppression, dedupe marks and the outbox are shared by all workers), or Redis when
-- configure{ store = "redis://..." } or $STELLA_DB says so (shared by every nginx on that
-- Redis). configure{ queue = "redis://..." } puts accepted events on Redis instead of the
-- queue's dict (stella.openresty.redis_queue: the stream `stella worker` reads; the store
-- is then Redis too, the queue's URL unless store says another); the client talks
-- through cosockets. With the store on Redis, the rules' rate_limit holds for every send
-- (the fleet's limit per API key: stella.rate_limit). Worker 0 replays the outbox every
-- flush_every seconds (requests that failed with a retryable error: 429, 5xx, timeouts,
-- network), restores what a stopping nginx spooled, and logs a warning when the queue or a
-- dict fills up.
--
-- Settings: M.configure{...} in nginx.conf's init_by_lua_block (see there).
--
-- Optional: STELLA_WEBHOOK_TOKEN in the environment makes /events require
-- "Authorization: Bearer <token>".
local cjson = require "cjson.safe"
local stella = require "stella"
local shdict = require "stella.store.shdict"
local store_mod = require "stella.store"
local cosocket = require "stella.transport.cosocket"
local queue = require "stella.openresty.queue"
local redis_queue = require "stella.openresty.redis_queue"
local service = require "stella.openresty.service"
local rules_mod = require "stella.rules"
local rate_limit = require "stella.rate_limit"

local ngx = ngx
local getenv, io_open, type, tostring, ipairs, pairs, next, error =
      os.getenv, io.open, type, tostring, ipairs, pairs, next, error
local byte, find = string.byte, string.find

local M = {}

local HERE = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."

-- The defaults; nginx.conf's M.configure{...} overrides them.
local settings = {
  store_dict = "stella",        -- lua_shared_dict: marks, unsubscribes, outbox, ledger
  store = nil,                  -- a redis:// URL: that store instead of store_dict ($STELLA_DB too)
  queue_dict = "stella_queue",  -- lua_shared_dict: accepted events waiting for a consumer
  queue = nil,                  -- a redis:// URL: accepted events on Redis instead (the work queue)
  queue_capacity = 10000,       -- events queued at most (all workers; Redis: all producers); then 503
  redis_timeout = 1,            -- Redis queue: seconds to connect and for each command; then 503
  lease = 30,                   -- Redis queue: an entry held unacknowledged this long is taken over
  max_deliveries = 5,           -- Redis queue: then it goes to the dead-letter stream
  consumers = 8,                -- per worker: events handled at once (sends in flight); Redis
                                -- queue: 0 for none (`stella worker` processes send)
  batch = 1,                    -- events a consumer takes at a time
  store_reserve = nil,          -- bytes the store's dict keeps free (default 5%); below: 503
  spool = nil,                  -- file for what is queued when nginx stops (nil: lost, logged)
  retry_after = 30,             -- seconds, in a 503's Retry-After
  flush_every = 60,             -- seconds between outbox replays (worker 0)
  check_every = 5,              -- seconds between health checks (worker 0)
  warn_at = 0.8,                -- warn in the log when the queue or a dict is this full
  rules = HERE .. "/rules.lua",
}

-- configure{ name = value, ... } (init_by_lua): settings above.
function M.configure(opts)
  for k, v in pairs(opts) do
    if settings[k] == nil and k ~= "store_reserve" and k ~= "spool" and k ~= "store" and k ~= "queue" then
      error("webhook.configure: unknown setting " .. tostring(k), 2)
    end
    settings[k] = v
  end
end

-- Per worker, built on first use (in a request or a timer, never in init_by_lua).
local store, trigger, svc, rules

local function env(name)
  local v = getenv(name)
  if v == "" then return nil end
  return v
end

local function check_url(url, what)
  if url and not (url:find("^redis://") or url:find("^unix://")) then
    error("webhook: " .. what .. " must be a redis:// or unix:// URL", 3)
  end
  return url
end

-- The Redis queue's URL, or nil: the queue's shared dict.
local function queue_url()
  return check_url(settings.queue, "queue")
end

-- The Redis store's URL (settings.store, else $STELLA_DB, else the Redis queue's), or
-- nil: the shared dict.
local function redis_url()
  return check_url(settings.store or env("STELLA_DB"), "store (or STELLA_DB)") or queue_url()
end

local function get_store()
  if store then return store end
  local url = redis_url()
  -- (a Redis that cannot be reached raises here: the consumers keep the events queued)
  if url then store = assert(store_mod.redis(url)) else store = assert(shdict.new(settings.store_dict)) end
  return store
end

-- The rules file, compiled once per worker.
local function get_rules()
  if rules then return rules end
  local compiled, err = rules_mod.load(settings.rules)
  if not compiled then error("webhook: " .. tostring(err), 2) end
  rules = compiled
  return rules
end

-- The fleet's rate limit (stella.rate_limit), when the rules set rate_limit and the store
-- is on Redis: the consumers' sends and the outbox replays of every worker (and of every
-- nginx and `stella worker` on that Redis) share one limit per API key, and a 429 with
-- Retry-After pauses the key for all of them. Waits for a slot are ngx.sleep (the worker
-- serves other requests meanwhile), at most max_wait each and `budget` seconds per send
-- call, as `stella worker` paces a round (half the lease, 0.5 to 5 s); what has no slot
-- then goes back to the outbox, due at its slot, and is replayed then (service.lua).
local function get_gate(compiled)
  if not (compiled.rate_limit and redis_url()) then return nil end
  local limiter = assert(rate_limit.open(redis_url()))
  return rate_limit.gate{ limiter = limiter, rules = compiled, sleep = ngx.sleep,
                          budget = math.max(0.5, math.min(5, settings.lease / 2)) }
end

local function get_trigger()
  if trigger then return trigger end
  local compiled = get_rules()
  local gate = get_gate(compiled)
  local keys
  if env("STELLA_TEST_KEY") or env("STELLA_PRODUCTION_KEY") then
    keys = { test = env("STELLA_TEST_KEY"), production = env("STELLA_PRODUCTION_KEY") }
  end
  trigger = stella.trigger{
    rules = compiled,
    gate = gate,
    store = get_store(),
    clock = ngx.time,
    -- no purge by the trigger every hour in every worker: the shdict store bounds its ledger
    -- (a ring) and its dead items (dead_ttl) itself, and its purge_marks walks every key of
    -- the dict (housekeeping frees expired marks when the dict runs low); Redis: the default
    retention = not redis_url() and { every = 0 } or nil,
    client = {
      keys = keys,                          -- nil: the rules file's keys
      mode = env("STELLA_MODE"),            -- nil: the rules file's mode
      base_url = env("STELLA_BASE_URL"),    -- nil: the rules file's, else the service's
      transport = cosocket,                 -- what stella.new picks here anyway
    },
    on_alert = function(info)
      ngx.log(ngx.ALERT, "stella: ", info.errors, " of the last ", info.total,
        " requests failed (threshold ", info.threshold * 100, "%)")
    end,
  }
  return trigger
end

local function log_outcome(o)
  -- (a request the rate limit handed back to the outbox, "queued (deferred)", is no failure)
  local failed = o.status == "failed" or o.status == "invalid" or (o.status == "queued" and o.reason ~= "deferred")
  ngx.log(failed and ngx.WARN or ngx.INFO, "stella: event ", tostring(o.event_id or "(no id)"), ": ", o.status,
    o.reason and (" (" .. o.reason .. ")") or "", o.request_id and (" request " .. o.request_id) or "",
    o.detail and failed and (": " .. o.detail) or "")
end

local function get_service()
  if svc then return svc end
  local q
  if queue_url() then
    q = redis_queue.new{ url = queue_url(), capacity = settings.queue_capacity, timeout = settings.redis_timeout,
                         lease = settings.lease, max_deliveries = settings.max_deliveries }
  else
    q = queue.new(settings.queue_dict, { capacity = settings.queue_capacity })
  end
  svc = service.new{
    queue = q,
    store_dict = not redis_url() and settings.store_dict or nil,   -- its free space gates 202
    shared_store = redis_url() ~= nil,   -- the outbox outlives nginx: a stop spools only the queue
    store = get_store,
    trigger = get_trigger,
    consumers = settings.consumers,
    batch = settings.batch,
    reserve = settings.store_reserve,
    spool = not queue_url() and settings.spool or nil,   -- Redis keeps its queue itself
    retry_after = settings.retry_after,
    flush_every = settings.flush_every,
    check_every = settings.check_every,
    warn_at = settings.warn_at,
    on_outcome = log_outcome,
  }
  return svc
end

local ACCEPTED_ONE = '{"accepted":1}\n'

local function reply(status, value, headers)
  local body = (status == 202 and value.accepted == 1) and ACCEPTED_ONE or cjson.encode(value) .. "\n"
  ngx.status = status
  local h = ngx.header
  h["Content-Type"] = "application/json"
  h["Content-Length"] = #body
  if headers then
    for k, v in pairs(headers) do h[k] = v end
  end
  ngx.print(body)
end

local function request_body()
  ngx.req.read_body()
  local body = ngx.req.get_body_data()
  if body then return body end
  local path = ngx.req.get_body_file()   -- larger than client_body_buffer_size
  if not path then return nil end
  local f = io_open(path, "rb")
  if not f then return nil end
  body = f:read("*a")
  f:close()
  return body
end

-- The byte of text's first and last character that is not JSON whitespace, and the
-- position of the first. (Byte tests for the usual body, which starts with its bracket:
-- LuaJIT compiles them, not a pattern's find.)
local function ends_of(text)
  local first = 1
  local b1 = byte(text, 1)
  if b1 ~= 123 and b1 ~= 91 then
    first = find(text, "[^ \t\r\n]")
    if not first then return nil end
  end
  local last = #text
  local b = byte(text, last)
  while b == 32 or b == 10 or b == 13 or b == 9 do
    last = last - 1
    b = byte(text, last)
  end
  return byte(text, first), b, first
end

local NOT_AN_EVENT = { error = "expected a JSON object (one event) or an array of events" }
local token   -- STELLA_WEBHOOK_TOKEN, read once per worker (false: none)

-- POST /events. One event (an object) is queued as it came, unread: checked here only
-- for its braces and for not being {} (a consumer decodes it, and ledgers one that does
-- not decode as invalid, malformed_input). A batch (an array) is decoded here, to count
-- its events and check that each is an object.
function M.receive()
  if ngx.req.get_method() ~= "POST" then
    ngx.header["Allow"] = "POST"
    return reply(405, { error = "POST a JSON event" })
  end
  if token == nil then token = env("STELLA_WEBHOOK_TOKEN") or false end
  if token and ngx.var.http_authorization ~= "Bearer " .. token then
    return reply(401, { error = "missing or wrong bearer token" })
  end
  local text = request_body() or ""
  local first, last, at = ends_of(text)
  if first == 123 and last == 125 then   -- { ... }
    -- not {}: a member's key (the usual case, tested as a byte) or anything but "}"
    if byte(text, at + 1) ~= 34 and not find(text, "^[ \t\r\n]*[^ \t\r\n}]", at + 1) then
      return reply(400, NOT_AN_EVENT)
    end
    return reply(get_service():accept(text))
  end
  if first ~= 91 or last ~= 93 then return reply(400, NOT_AN_EVENT) end   -- not [ ... ]
  local value = cjson.decode(text)
  if type(value) ~= "table" or value[1] == nil then return reply(400, NOT_AN_EVENT) end
  local payloads = {}
  for i, e in ipairs(value) do
    if type(e) ~= "table" or e[1] ~= nil or next(e) == nil then
      return reply(400, { error = "event " .. i .. " is not a JSON object" })
    end
    payloads[i] = cjson.encode(e)
  end
  return reply(get_service():accept(payloads))
end

-- GET /events/status
function M.status()
  local s = get_store()
  return reply(200, {
    outbox = s:outbox_counts(),
    ledger = s:counts(),
    recent = s:ledger{ limit = 20 },
    unsubscribed = s:unsubscribed_count(),
  })
end

-- GET /events/health
function M.health()
  return reply(200, get_service():health())
end

-- init_worker_by_lua
function M.init_worker()
  get_service():init_worker()
  if ngx.worker.id() == 0 and not redis_url() then
    -- the shared dict store: no fleet to share a limit with (a rules mistake: said at first use)
    local ok, compiled = pcall(get_rules)
    if ok and compiled.rate_limit then
      ngx.log(ngx.ERR, "stella: the rules' rate_limit is kept in Redis and applies with the store on Redis ",
        "(configure's store or queue, or STELLA_DB) only; not applied with the shared dict store")
    end
  end
end

-- exit_worker_by_lua
function M.exit_worker()
  get_service():exit_worker()
end

return M
