-- stella.rate_limit: one rate limit per API key for every sender on one Redis (the fleet
-- of `stella worker`s, `stella trigger`/`retry` with --db redis://..., the consumers and
-- outbox replays of examples/openresty with its store on Redis), and a pause for
-- the key that every sender honours once any of them gets a 429 with Retry-After.
--
-- In the rules file (off unless given):
--   rate_limit = { per_second = 50 }        -- or per_minute = 600; burst = 1; max_wait = 1
--   brands = { acme = { api_key = "...", rate_limit = { per_minute = 120 } } }
-- The limit belongs to the key: every brand sending with one key shares its bucket. A
-- brand with a key of its own has the top-level limit unless it sets its own (false: none).
-- `rate_limit = {}` sets no rate but keeps the shared pause on 429.
--
-- The bucket is a GCRA (generic cell rate algorithm) kept in one Redis hash per key,
-- changed only by the two scripts below (EVALSHA, EVAL when the server lost them), which
-- read the time from Redis (TIME): the hosts' clocks do not matter. A sender asks for
-- tokens for the requests in hand and gets slots: times, from now, at which each may go,
-- at most max_wait ahead; it sleeps until each slot (short waits) and hands the requests
-- it got no slot for back to the outbox, due when the next slot is free ("scheduled, not
-- slept on", as retries). The hash's name holds the key's id, a hash of it (key_id); the
-- key itself never reaches Redis, a log or an error.
--
-- Keys (P = the prefix, default "stella:"):
--   P rate:ID   hash  tat (µs, Redis time: the theoretical arrival time of the next
--                     request), until (µs: paused until), interval (µs), burst, label,
--                     seen, pauses, paused_at; expires an hour after its last use
local core = require "stella.core"

local ceil, floor, max, min = math.ceil, math.floor, math.max, math.min
local error, getmetatable, ipairs, pairs, setmetatable, tonumber, tostring, type =
      error, getmetatable, ipairs, pairs, setmetatable, tonumber, tostring, type
local running = coroutine.running

local M = {}

local KEEP_MS = 3600 * 1000   -- a key's hash kept this long after its last use (status)
local MAX_RUN = 1000          -- tokens asked for at once
M.PACE = 0.05                 -- over several connections: requests whose slots fall within this many
                              -- seconds go together (over one, each goes at its own slot)

-- The settings (rules.lua checks them when it compiles the rules): rate_limit/settings.lua.
local settings = require "stella.rate_limit.settings"
M.settings, M.of_rules = settings.settings, settings.of_rules

-- key_id(key) -> 16 hex digits naming the key in Redis (a hash: the key cannot be read back).
function M.key_id(key)
  return core.sha256("stella rate limit\0" .. key):sub(1, 16)
end

---------------------------------------------------------------------------------------
-- The limiter: the bucket and the pause in Redis
---------------------------------------------------------------------------------------

-- KEYS[1] the key's hash. ARGV: interval (µs; 0: no rate), burst, tokens wanted, longest
-- wait (µs), label. Returns { granted, base, interval, paused }: slot k (1..granted) is
-- max(0, base + (k - 1) * interval) µs from now; paused > 0: nothing granted, the key is
-- paused for that many µs. The next slot free after these: max(0, base + granted * interval).
local TAKE = [[
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local h = redis.call('HMGET', KEYS[1], 'tat', 'until')
local tat, pause = tonumber(h[1]) or 0, tonumber(h[2]) or 0
local T, burst, want, W = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'interval', T, 'burst', burst, 'label', ARGV[5], 'seen', now)
if pause > now then
  redis.call('PEXPIRE', KEYS[1], math.floor((pause - now) / 1000) + tonumber(ARGV[6]))
  return { 0, 0, T, pause - now }
end
local granted, base = want, 0
if T > 0 then
  if tat < now then tat = now end
  base = tat - (burst - 1) * T - now
  granted = 0
  if base <= W then granted = math.min(want, math.floor((W - base) / T) + 1) end
  tat = tat + granted * T
  redis.call('HSET', KEYS[1], 'tat', tat)
end
redis.call('PEXPIRE', KEYS[1], math.floor((math.max(tat, pause, now) - now) / 1000) + tonumber(ARGV[6]))
return { granted, base, T, 0 }
]]

-- KEYS[1] the key's hash. ARGV: pause (ms), label. Pauses the key until now + pause (or
-- later, if it is paused longer already); the bucket starts again from there. Returns the
-- pause left, µs.
local PAUSE = [[
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local h = redis.call('HMGET', KEYS[1], 'tat', 'until')
local tat, u = tonumber(h[1]) or 0, tonumber(h[2]) or 0
local want = now + tonumber(ARGV[1]) * 1000
if want > u then u = want end
if tat < u then tat = u end
redis.call('HSET', KEYS[1], 'until', u, 'tat', tat, 'label', ARGV[2], 'paused_at', now)
redis.call('HINCRBY', KEYS[1], 'pauses', 1)
redis.call('PEXPIRE', KEYS[1], math.floor((u - now) / 1000) + tonumber(ARGV[3]))
return u - now
]]

local Limiter = {}
Limiter.__index = Limiter
M.Limiter = Limiter

-- open(url | { url, prefix, timeout } | conn) -> limiter | nil, err. A conn given is
-- borrowed (not closed by close()). Inside nginx (the conn on cosockets, which belong to
-- the request or timer that opened them) the conn is a template: each operation takes a
-- connection of its own from nginx's keep-alive pool (a fork) and gives it back, as
-- stella.store.redis does, so that the consumers' coroutines never share one.
function M.open(opts)
  local redis = require "stella.redis"
  if type(opts) == "string" then opts = { url = opts } end
  if type(opts) ~= "table" then error("stella.rate_limit.open: a URL, an options table or a connection expected", 2) end
  local conn, own = opts, false
  if getmetatable(opts) ~= redis.Conn then
    local err
    conn, err = redis.connect{ url = opts.url, prefix = opts.prefix, timeout = opts.timeout }
    if not conn then return nil, err end
    own = true
  end
  local forking = conn.cosocket and true or false
  if forking and own then conn:close() end   -- back to nginx's pool: every operation takes its own
  return setmetatable({ conn = conn, own = own, forking = forking, prefix = conn.prefix .. "rate:", sha = {} },
                      Limiter)
end

function Limiter:close()
  if self.own and self.conn then self.conn:close() end
  self.conn = nil
end

-- The connection for one operation, and its return (see open).
local function take_conn(self)
  if self.forking then return self.conn:fork() end
  return self.conn
end

local function give_conn(self, c)
  if c ~= self.conn then c:close() end
end

-- EVALSHA, loading the script first (SCRIPT LOAD) or running it whole (EVAL) when the
-- server does not have it (a restart, SCRIPT FLUSH).
local function script(self, code, key, ...)
  local conn = take_conn(self)
  local sha = self.sha[code]
  if not sha then
    local loaded, err = conn:call("SCRIPT", "LOAD", code)
    if not loaded then give_conn(self, conn) return nil, err end
    sha = loaded
    self.sha[code] = sha
  end
  local res, err = conn:call("EVALSHA", sha, 1, key, ...)
  if res == nil and type(err) == "table" and err.code == "NOSCRIPT" then
    res, err = conn:call("EVAL", code, 1, key, ...)
  end
  give_conn(self, conn)
  return res, err
end

-- take(id, settings, n, label) -> grant | nil, err. grant = { granted, base, interval,
-- paused } in seconds (see TAKE), and at: core.monotonic() when the answer came.
function Limiter:take(id, s, n, label)
  local res, err = script(self, TAKE, self.prefix .. id, s.interval_us, s.burst, min(n, MAX_RUN),
                          floor(s.max_wait * 1e6), label or "", KEEP_MS)
  if not res then return nil, err end
  local at = core.monotonic()
  return { granted = tonumber(res[1]) or 0, base = (tonumber(res[2]) or 0) / 1e6,
           interval = (tonumber(res[3]) or 0) / 1e6, paused = (tonumber(res[4]) or 0) / 1e6, at = at }
end

-- pause(id, seconds, label) -> seconds the key stays paused | nil, err
function Limiter:pause(id, seconds, label)
  local res, err = script(self, PAUSE, self.prefix .. id, floor(seconds * 1000 + 0.5), label or "", KEEP_MS)
  if not res then return nil, err end
  return (tonumber(res) or 0) / 1e6
end

-- paused(id) -> seconds the key stays paused (0: not paused) | nil, err. What a sender
-- checks before each request of its slots after the first: a pause another sender set
-- meanwhile holds them too.
function Limiter:paused(id)
  local conn = take_conn(self)
  local res, err = conn:pipeline{ { "TIME" }, { "HGET", self.prefix .. id, "until" } }
  give_conn(self, conn)
  if not res then return nil, err end
  local time = res[1]
  if type(time) ~= "table" then return nil, time end
  local now = tonumber(time[1]) * 1e6 + tonumber(time[2])
  return max(0, ((tonumber(res[2]) or 0) - now) / 1e6)
end

-- The keys in use (seen within the hour), for `stella status`: a list of { id, label, rate
-- (per second, nil: pause only), burst, paused (seconds left, 0: none), pauses (429s
-- with Retry-After so far), backlog (seconds of slots taken ahead of now), seen (seconds
-- ago) }, sorted by label then id.
local status_on
function Limiter:status()
  local conn = take_conn(self)
  local res, err = status_on(self, conn)
  give_conn(self, conn)
  return res, err
end

status_on = function(self, conn)
  local keys, cursor = {}, "0"
  repeat
    local res, err = conn:call("SCAN", cursor, "MATCH", self.prefix .. "*", "COUNT", 200)
    if not res then return nil, err end
    cursor = res[1]
    for _, k in ipairs(res[2] or {}) do keys[#keys + 1] = k end
  until cursor == "0" or #keys >= 1000
  if #keys == 0 then return {} end
  local cmds = { { "TIME" } }
  for i, k in ipairs(keys) do cmds[i + 1] = { "HGETALL", k } end
  local res, err = conn:pipeline(cmds)
  if not res then return nil, err end
  local time = res[1]
  local now = tonumber(time[1]) * 1e6 + tonumber(time[2])
  local out = {}
  for i, k in ipairs(keys) do
    local flat, f = res[i + 1], {}
    if type(flat) == "table" then
      for j = 1, #flat - 1, 2 do f[flat[j]] = flat[j + 1] end
      local interval = tonumber(f.interval) or 0
      out[#out + 1] = {
        id = k:sub(#self.prefix + 1), label = f.label or "",
        rate = interval > 0 and 1e6 / interval or nil, burst = tonumber(f.burst) or 1,
        paused = max(0, ((tonumber(f["until"]) or 0) - now) / 1e6),
        pauses = tonumber(f.pauses) or 0,
        backlog = interval > 0 and max(0, ((tonumber(f.tat) or 0) - now) / 1e6) or 0,
        seen = max(0, (now - (tonumber(f.seen) or tonumber(f.paused_at) or now)) / 1e6),
      }
    end
  end
  table.sort(out, function(a, b)
    if a.label ~= b.label then return a.label < b.label end
    return a.id < b.id
  end)
  return out
end

---------------------------------------------------------------------------------------
-- The gate: what the trigger's send stage calls (stella.trigger.send)
---------------------------------------------------------------------------------------

local Gate = {}
Gate.__index = Gate
M.Gate = Gate

-- gate{ limiter = limiter, rules = compiled rules, budget = seconds, sleep = fn, clock = fn }
-- -> gate, or nil when the rules set no rate limit. budget: the longest one send call
-- paces its requests before it hands the rest back to the outbox (nil: no limit but the
-- outbox lease's; `stella worker` gives one, so that a round never stalls). sleep(seconds)
-- -> false when a signal ended it (core.sleep); clock: core.monotonic.
-- gate:held_back_here() -> true, due after a send call of the running coroutine that handed
-- requests back for want of a slot (flush.lua then claims no more this time); due: the
-- earliest time (the trigger's clock) one of them is due again, nil if unknown. gate.held_back:
-- the same for the last send call of any coroutine.
-- One gate serves several coroutines at once (inside nginx, the consumers of a worker
-- share its trigger): what one send call changes as it goes (its time budget, a 429
-- met) is that call's own, found by the running coroutine.
function M.gate(o)
  local limits = o.rules and o.rules.rate_limit
  if not limits then return nil end
  if o.budget ~= nil and not (type(o.budget) == "number" and o.budget > 0) then
    error("stella.rate_limit.gate: budget must be a number of seconds above 0", 2)
  end
  local self = setmetatable({ limiter = o.limiter, limits = limits, budget = o.budget, sleep = o.sleep or core.sleep,
                              clock = o.clock or core.monotonic, by_brand = {}, by_id = {}, held_back = false,
                              calls = setmetatable({}, { __mode = "k" }) }, Gate)
  self.call_mt = { __index = self }
  return self
end

local MAIN = {}   -- the calls' key outside coroutines (LuaJIT's running() gives nil there)

function Gate:held_back_here()
  local call = self.calls[running() or MAIN]
  if not (call and call.held_back) then return false end
  return true, call.due
end

-- A hand-back: not sent, back in the outbox due at next_at, attempts unchanged (settle.lua).
-- call.due: the earliest next_at of a send call's hand-backs (held_back_here).
local function held(next_at, message, call)
  if call and not (call.due and call.due <= next_at) then call.due = next_at end
  return require("stella.error").new{ kind = "deferred", retryable = true, handed_back = true, attempts = 0,
                                       next_at = next_at, message = message }
end

-- The limit of a brand's sends: { id, settings, label } (one table per key) or false.
local function limit_of(self, t, brand)
  local key = brand or ""
  local lim = self.by_brand[key]
  if lim ~= nil then return lim end
  local s = self.limits.default
  local own = self.limits.brands[key]
  if own ~= nil then s = own or nil end
  local client = t.clients:for_brand(brand)
  local id = type(client) == "table" and type(client.key_id) == "string" and client.key_id or nil
  lim = false
  if s and id then
    lim = self.by_id[id]
    if not lim then
      lim = { id = id, settings = s, label = (own and ("brand " .. key) or "default key") .. " " .. s.text }
      self.by_id[id] = lim
    end
    -- a 429 with Retry-After on any of the key's connections pauses the key
    local shared = lim
    for _, c in ipairs(t.clients:lanes(brand)) do
      if type(c) == "table" then
        c.on_rate_limited = function(err, retry_after_ms) return self:rate_limited(shared, err, retry_after_ms) end
      end
    end
  end
  self.by_brand[key] = lim
  return lim
end

-- A client's 429 (called by client.lua before any retry of its own): with Retry-After,
-- the key is paused in Redis for every sender until then, the request goes back to the
-- outbox due at the pause's end, and the rest of the chunk is held back (true: the client
-- does not retry). Without Retry-After the client retries as it always does.
function Gate:rate_limited(lim, err, retry_after_ms)
  if type(retry_after_ms) ~= "number" or retry_after_ms < 0 then return false end
  local call = self.calls[running() or MAIN]
  if not (call and call.active) then call = {} end   -- (a send outside gate:send: none is)
  local t = call.trigger
  local cap = t and t.outbox_opts and t.outbox_opts.max_delay or 3600
  local seconds = min(retry_after_ms / 1000, cap)
  local left = self.limiter:pause(lim.id, seconds, lim.label)   -- nil: Redis away; this sender holds back still
  seconds = max(seconds, left or 0)
  local next_at = (t and t.clock() or os.time()) + ceil(seconds)
  err.next_at = next_at
  call.hit = { next_at = next_at, seconds = seconds }
  return true
end

-- The trigger as send.lua's chunk sender sees it: its stop() also says true once a 429
-- paused the key, so that nothing more of the chunk is sent.
local function proxy_of(self, t)
  return setmetatable({ stop = function()
    return self.hit ~= nil or (t.stop ~= nil and t.stop() and true or false)
  end }, { __index = t })
end

-- Sends the items list[idx[a..b]] with chunk, results into results/errs.
local function send_part(self, t, list, idx, a, b, chunk, results, errs, later)
  local sub = {}
  for k = a, b do sub[#sub + 1] = list[idx[k]] end
  local r, e = chunk(proxy_of(self, t), sub, later)
  for k = a, b do
    local i = idx[k]
    results[i], errs[i] = r[k - a + 1], e[k - a + 1]
  end
end

-- After a chunk in which a 429 paused the key: what the stop held back waits for the
-- pause's end, as does everything after it.
local function hold_rest(self, idx, from, results, errs, interrupted)
  local hit = self.hit
  if not (self.due and self.due <= hit.next_at) then self.due = hit.next_at end   -- (the 429's own too)
  local msg = ("not sent yet: the service answered 429; the key is paused for every sender for %g s")
    :format(hit.seconds)
  for k = 1, #idx do
    local i = idx[k]
    if (k >= from and errs[i] == nil and results[i] == nil) or (errs[i] ~= nil and errs[i] == interrupted) then
      errs[i] = held(hit.next_at, msg, self)
    end
  end
end

-- The items of one key, in order (idx: their indices in list), through the bucket.
local function send_limited(self, t, lim, list, idx, chunk, pace, results, errs, later)
  local pos, n = 1, #idx
  while pos <= n do
    if t.stop and t.stop() then   -- the chunk sender marks them interrupted
      send_part(self, t, list, idx, pos, n, chunk, results, errs, later)
      return
    end
    if self.ends and self.clock() >= self.ends then
      local h = held(t.clock() + 1, ("not sent yet: this round's time for rate-limited sends (%g s) is up; "
        .. "it waits in the outbox"):format(self.budget), self)
      for k = pos, n do errs[idx[k]] = h end
      self.held_back = true
      return
    end
    local g, err = self.limiter:take(lim.id, lim.settings, n - pos + 1, lim.label)
    if g then g.at = self.clock() end   -- the slots count from the answer, on the gate's clock
    if not g or g.granted == 0 then
      self.held_back = true
      local wait = g and (g.paused > 0 and g.paused or max(0, g.base)) or 1
      local why = not g and ("the rate limit cannot be read from Redis (" .. tostring(err) .. ")")
        or g.paused > 0 and ("the key is paused for every sender after a 429, for %g s more"):format(g.paused)
        or ("the key's rate limit (%s) has no slot for it within %g s"):format(lim.settings.text, lim.settings.max_wait)
      local h = held(t.clock() + max(1, ceil(wait)), "not sent yet: " .. why .. "; it waits in the outbox", self)
      for k = pos, n do errs[idx[k]] = h end
      return
    end
    local k = 0
    while k < g.granted do
      local first = max(0, g.base + k * g.interval)
      local m = k + 1
      while m < g.granted and max(0, g.base + m * g.interval) <= first + pace do m = m + 1 end
      local wait = g.at + first - self.clock()
      if wait > 0 then self.sleep(wait) end
      if k > 0 or wait > 0 then   -- a pause set by another sender since the slots were taken holds these too
        local left = self.limiter:paused(lim.id)
        if left ~= 0 then
          local h = held(t.clock() + max(1, ceil(left or 1)), left and
            ("not sent yet: the key is paused for every sender after a 429, for %g s more; it waits in the outbox")
              :format(left) or "not sent yet: the rate limit cannot be read from Redis; it waits in the outbox", self)
          for r = pos + k, n do errs[idx[r]] = h end
          self.held_back = true
          return
        end
      end
      self.hit = nil
      send_part(self, t, list, idx, pos + k, pos + m - 1, chunk, results, errs, later)
      later = true
      if self.hit then
        hold_rest(self, idx, pos + k, results, errs, require("stella.trigger.send").INTERRUPTED)
        self.hit = nil
        self.held_back = true
        return
      end
      k = m
    end
    pos = pos + g.granted
  end
end

-- gate:send(trigger, list, chunk [, lanes]) -> results, errs as send.lua's in line sends
-- (list[i]: an outcome or outbox item, or false). chunk(trigger, sublist, later) sends a
-- part as send.lua would without a gate (later: something was sent before it in this
-- call). The items of keys with a limit go through their buckets, a run of one key's
-- items at a time; the others go as they are. A chunk is one request, sent at its slot;
-- with lanes (chunks sent over several connections) the requests whose slots fall within
-- M.PACE s, so that they go side by side.
function Gate:send(t, list, chunk, lanes)
  -- this call's state; the gate's fields through __index
  local call = setmetatable({ trigger = t, held_back = false, hit = nil, active = true,
                              ends = self.budget and self.clock() + self.budget or nil }, self.call_mt)
  self.calls[running() or MAIN] = call
  local pace = lanes and M.PACE or 0
  local results, errs = {}, {}
  local n, i, later = #list, 1, false
  while i <= n do
    local item = list[i]
    if not item then
      i = i + 1
    else
      local lim = limit_of(self, t, item.brand)
      local idx, j = {}, i
      while j <= n and #idx < MAX_RUN do
        local it = list[j]
        if it then
          if limit_of(self, t, it.brand) ~= lim then break end
          idx[#idx + 1] = j
        end
        j = j + 1
      end
      if lim then
        send_limited(call, t, lim, list, idx, chunk, pace, results, errs, later)
      else
        send_part(call, t, list, idx, 1, #idx, chunk, results, errs, later)
      end
      later = true
      i = j
    end
  end
  call.active = false
  self.held_back = call.held_back
  return results, errs
end

return M
