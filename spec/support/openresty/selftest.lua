-- GET /selftest?case=NAME&...: runs one case of cases.lua inside nginx (content phase),
-- through the cosocket transport, and answers {"ok":true,"result":...} as JSON.
-- Loaded with content_by_lua_file by the server block spec/openresty_spec.lua adds to the
-- example's nginx.conf. Query parameters:
--   case      a name in cases.lua, or auto / store / store_race below
--   base_url  where the client sends
--   pool      the keep-alive pool for this run (fresh per run, as libcurl's fresh handle)
--   t0, prefix, dict    for the store cases
-- Case store_contract runs the store contract's suite (spec/support/store_contract.lua)
-- on the shared dict with spec/support/mini_suite.lua, each store under a prefix of its
-- own, and answers the result of every test.
local cjson = require "cjson"
local stella = require "stella"
local cosocket = require "stella.transport.cosocket"
local shdict = require "stella.store.shdict"

local HERE = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$")
local C = dofile(HERE .. "/cases.lua")

local args = ngx.req.get_uri_args()

local function clock()
  ngx.update_time()
  return ngx.now()
end

local function answer(v)
  ngx.status = 200
  ngx.header["Content-Type"] = "application/json"
  ngx.say(cjson.encode(v))
  return ngx.exit(ngx.HTTP_OK)
end

local special = {}

-- stella.new without a transport picks cosockets here, and its retry pause yields.
function special.auto()
  local client = require "stella.client"
  local c = stella.new{ api_key = C.TEST_KEY, base_url = args.base_url, random = function() return 0.5 end,
                        retry = { attempts = 2, max_delay = 5 } }
  local out = {
    phase = ngx.get_phase(),
    cosocket = getmetatable(c.transport) == cosocket.Transport,
    default_is_cosocket = client.default_transport() == cosocket.new,
  }
  local ticks = 0
  local th = ngx.thread.spawn(function()
    for _ = 1, 400 do ngx.sleep(0.01) ticks = ticks + 1 end
  end)
  local t0 = clock()
  local res, err = c:send(C.request())   -- 503 with Retry-After: 1, then 200
  out.elapsed = clock() - t0
  out.ok = res ~= nil
  out.err = err and tostring(err)
  out.attempts = res and res.attempts
  out.ticks = ticks          -- the light thread ran while the client slept
  ngx.thread.kill(th)
  c:close()
  return out
end

-- The store interface on the shared dict, for comparison with the memory store.
function special.store()
  local s = assert(shdict.new(args.dict or "stella", { prefix = args.prefix }))
  return C.store_script(s, tonumber(args.t0))
end

-- The store contract's suite on the shared dict, "now" the real time (marks expire on it).
function special.store_contract()
  local suite = dofile(HERE .. "/../mini_suite.lua")
  local contract = dofile(HERE .. "/../store_contract.lua")
  local n = 0
  local now = ngx.time()
  return suite.run(function(b)
    b.now = now
    contract(b, "shdict", function()
      n = n + 1
      return shdict.new(args.dict or "stella", { prefix = args.prefix .. n .. ":" })
    end)
  end)
end

-- Two transactions on one mark, interleaved as two workers could: the one that looked
-- first and writes last must fail and leave nothing behind.
function special.store_race()
  local s = assert(shdict(args.dict or "stella", { prefix = args.prefix }))
  local now = ngx.time()
  local function reserve(pause)
    return s:atomic(function()
      local seen = s:get_mark("suppress|g|x", now)
      if pause then coroutine.yield() end
      local id = s:enqueue{ kind = "request", body = "{}", created_at = now }
      s:put_mark("suppress|g|x", now + 100, id)
      s:put_mark("once|g|" .. (pause and "a" or "b"), now + 100, id)
      return id, seen
    end)
  end
  local slow = coroutine.create(function() return reserve(true) end)
  assert(coroutine.resume(slow))                        -- looked: no mark; now paused
  local fast_id = reserve(false)                        -- looks, reserves, commits
  local _, slow_id, slow_err = coroutine.resume(slow)   -- writes: must fail
  local _, owner = s:get_mark("suppress|g|x", now)
  local out = {
    fast_id = fast_id, slow_id = slow_id or false,
    slow_err = slow_err and tostring(slow_err) or false,
    slow_retryable = type(slow_err) == "table" and slow_err.retryable or false,
    owner = owner, other_mark = s:get_mark("once|g|a", now) or false,
    counts = s:outbox_counts(),
  }
  -- an old, inactive mark: the compare-and-set path
  s:put_mark("old", now + 100)
  local ok = s:atomic(function()
    s:get_mark("old", now + 200)             -- inactive at that time
    return s:put_mark("old", now + 300, 77)
  end)
  out.old_ok = ok
  out.old = { s:get_mark("old", now + 200) }
  ok = s:atomic(function()
    s:get_mark("old2", now)
    s.backend.dict:set(s.backend.p .. "m:old2", tostring(now + 50) .. "|")   -- another worker, meanwhile
    return s:put_mark("old2", now + 300, 78)
  end)
  out.old2_ok = ok or false
  out.old2 = { s:get_mark("old2", now) }
  return out
end

local ok, result = pcall(function()
  local name = args.case
  if special[name] then return special[name]() end
  local case = C.cases[name]
  if not case then error("no case " .. tostring(name)) end
  local pool = args.pool
  return case.run{
    stella = stella, base_url = args.base_url, params = args, clock = clock,
    transport = function(o)
      o.pool = pool
      return cosocket.new(o)
    end,
  }
end)
if ok then return answer{ ok = true, result = result } end
return answer{ ok = false, error = tostring(result) }
