-- GET /case?name=NAME&prefix=P: runs one case of stella.store.redis inside nginx (content
-- phase, over cosockets) and answers {"ok":true,"result":...} as JSON, for
-- spec/redis_openresty_store_spec.lua. The server's URL comes from the environment
-- (STELLA_REDIS_URL, an env line of the spec's nginx.conf), never from the request.
local cjson = require "cjson"
local stella = require "stella"
local store = require "stella.store"
local redis = require "stella.redis"

local HERE = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$")
local URL = os.getenv("STELLA_REDIS_URL")
local args = ngx.req.get_uri_args()
local PREFIX = args.prefix or "spec:"

local function answer(v)
  ngx.status = 200
  ngx.header["Content-Type"] = "application/json"
  ngx.say(cjson.encode(v))
  return ngx.exit(ngx.HTTP_OK)
end

-- INFO's fields of one section as numbers where they are.
local function info(conn, section)
  local out = {}
  for k, v in (conn:call("INFO", section) or ""):gmatch("([%w_]+):([^\r\n]*)") do out[k] = tonumber(v) or v end
  return out
end

local cases = {}

-- The store contract's suite on the Redis store over cosockets (one store per test, each
-- under a prefix of its own); "now" a day ahead, as in spec/store_redis_spec.lua (marks
-- expire on Redis' clock).
function cases.contract()
  local suite = dofile(HERE .. "/../mini_suite.lua")
  local contract = dofile(HERE .. "/../store_contract.lua")
  local n = 0
  return suite.run(function(b)
    b.now = ngx.time() + 86400
    contract(b, "redis", function()
      n = n + 1
      return store.redis{ url = URL, prefix = PREFIX .. n .. ":" }
    end)
  end)
end

-- One store, opened here, used at once by light threads of this request and by timers
-- (other requests' contexts: a cosocket of this request would fail there). Each thread
-- runs transactions that wait on Redis in the middle; all of them also try to reserve
-- one shared mark: exactly one may win; the others see it taken, or (when they looked
-- before the winner's commit) a conflict, and write nothing.
function cases.shared()
  local admin = assert(redis.connect(URL))
  local before = info(admin, "stats")
  local s = assert(store.redis{ url = URL, prefix = PREFIX })
  local now = ngx.time()
  local THREADS, ROUNDS = 8, 20
  local results, done = {}, 0

  local function work(k)
    local r = { own = 0, won = false, conflicts = 0, taken = false, errors = {} }
    results[k] = r
    for i = 1, ROUNDS do
      -- a transaction of its own: read, wait, enqueue, mark; commit
      local id, err = s:atomic(function()
        assert(s:get_mark("own|" .. k .. "|" .. i, now) == nil)
        local id = s:enqueue{ kind = "request", body = "{}", created_at = now, event_id = k .. "-" .. i }
        s:put_mark("own|" .. k .. "|" .. i, now + 600, id)
        return id
      end)
      if id then r.own = r.own + 1 else r.errors[#r.errors + 1] = tostring(err) end
      ngx.sleep(0.001)
    end
    -- the shared mark: looked at, then reserved at commit unless taken meanwhile
    local id, err = s:atomic(function()
      if s:get_mark("race", now) then return false end
      local id = s:enqueue{ kind = "request", body = "{}", created_at = now, event_id = "race-" .. k }
      s:put_mark("race", now + 600, id)
      return id
    end)
    if id then r.won = id
    elseif id == false then r.taken = true   -- looked after the winner's commit
    elseif type(err) == "table" and err.conflict then r.conflicts = r.conflicts + 1
    elseif err then r.errors[#r.errors + 1] = tostring(err) end
    done = done + 1
  end

  local threads = {}
  for k = 1, THREADS - 2 do threads[#threads + 1] = ngx.thread.spawn(work, k) end
  for k = THREADS - 1, THREADS do
    assert(ngx.timer.at(0, function(premature) if not premature then work(k) end end))
  end
  for _, t in ipairs(threads) do ngx.thread.wait(t) end
  for _ = 1, 2000 do
    if done == THREADS then break end
    ngx.sleep(0.01)
  end
  local after = info(admin, "stats")
  local _, owner = s:get_mark("race", now)
  local out = {
    done = done, results = results, owner = owner, counts = s:outbox_counts(),
    salt_same = s.salt == admin:call("HGET", PREFIX .. "{main}:meta", "salt"),
    connections = after.total_connections_received - before.total_connections_received,
    commands = after.total_commands_processed - before.total_commands_processed,
    clients = info(admin, "clients").connected_clients,
    ops = THREADS * (ROUNDS * 4 + 4),   -- round trips at least: MGET, INCRBY, FCALL (+ the race's)
  }
  admin:close()
  return out
end

-- A custom rule waiting on Redis (look-ups the speculative pass did not make: each link
-- of a chain of marks, one round trip each) while this request's main thread runs rules
-- of its own with no budget and more instructions than the first one's budget: those
-- must never fail, and no budget hook may be set whenever the main thread runs. The rule
-- goes on looking (past the chain) until the main thread has had 3 turns while it ran.
function cases.budget()
  local s = assert(store.redis{ url = URL, prefix = PREFIX })
  local now = ngx.time()
  local LINKS = 20
  for i = 1, LINKS do assert(s:put_mark("once|brand:|chain" .. i, now + 600)) end
  local in_rule, turns_in_rule = false, 0
  local trigger = stella.trigger{
    store = s, clock = ngx.time,
    client = { keys = { test = "test-key-budget-0123456789" }, mode = "test", base_url = "http://127.0.0.1:9" },
    rules = {
      budget = { instructions = 20000 },
      rules = { function(_, ctx)
        -- (the speculative pass sees no marks: it stops here, having asked for chain1 only)
        if not ctx.seen("chain1") then return "skip", "speculative" end
        in_rule = true
        local i, links = 2, 1
        while true do   -- a round trip each, one at a time
          if ctx.seen("chain" .. i) then links = links + 1
          elseif turns_in_rule >= 3 then break end
          i = i + 1
        end
        in_rule = false
        return "skip", "chain_of_" .. links
      end },
    },
  }
  local event = { customer = { name = "Jane Doe", email = "jane@example.com" }, channel = "chat",
                  employee = { email = "paulagent@blancapeak.com" }, ext_interaction_id = "budget-1" }
  local finished, outcome = false, nil
  ngx.thread.spawn(function()
    local ok, o = pcall(trigger.process, trigger, event)
    finished, outcome = true, ok and o or { status = "raised", detail = tostring(o) }
  end)
  local rules = require "stella.rules"
  local function heavy(req)
    local x = 0
    for i = 1, 50000 do x = x + i end   -- 2.5x the waiting rule's budget
    req.ext_interaction_id = x
  end
  jit.off(heavy)   -- interpreted, as a budgeted rule is: a hook left on would count it
  local busy = rules.compile{ budget = false, rules = { heavy } }
  local out = { turns = 0, hooked = 0, failed = {} }
  while not finished do
    out.turns = out.turns + 1
    if in_rule then turns_in_rule = turns_in_rule + 1 end
    if debug.gethook() then out.hooked = out.hooked + 1 end
    local d = rules.evaluate(busy, { channel = "chat", customer = { email = "x@example.com" },
                                     employee = { email = "e@example.com" }, ext_interaction_id = "x" },
                             { now = now })
    if d.action ~= "send" then out.failed[#out.failed + 1] = tostring(d.detail) end
    ngx.sleep(0.001)
  end
  out.status, out.reason, out.detail = outcome.status, outcome.reason, outcome.detail
  out.turns_in_rule = turns_in_rule
  out.hook_after = debug.gethook() ~= nil
  trigger:close()
  s:close()
  return out
end

local case = cases[args.name]
if not case then return answer{ ok = false, error = "unknown case " .. tostring(args.name) } end
local ok, res = pcall(case)
if not ok then return answer{ ok = false, error = tostring(res) } end
return answer{ ok = true, result = res }
