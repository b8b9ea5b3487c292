-- stella.store.redis_lib: the Redis 7 Function library of the Redis store (library
-- "stella", loaded once per server by stella.store.redis with stella.redis's
-- load_library, versioned: a newer version replaces an older one, never the reverse).
-- Every function takes KEYS[1] = BASE .. "meta" (BASE: the store's prefix and hash tag,
-- "stella:{main}:"); every key it touches is BASE .. something, so all of them hash to
-- the slot of that one tag (usable on Redis Cluster). The key layout is in the header
-- of lua/stella/store/redis.lua and in the README.
--
-- The client computes every value (times as exact number text, ids padded, owners
-- encoded); these functions only check and apply, so that a state change is one call.
-- Numbers are never formatted here except the ledger's sequence and trimming bounds.
--
--   stella_commit   the writes of one transaction (or of one write outside any), after
--                   checking what the transaction read is still so (else -CONFLICT,
--                   nothing written); answers the count of each op
--   stella_lease    claims due outbox items: their next_at moves to now + lease
--   stella_items    (read-only) items: queued by next_at, dead newest first, or due
--
-- Part 2 of the Redis work (rules inside Redis) adds its functions to this library
-- (with a new version), so that one named library holds all of Stella's server code.
local M = {}

M.name = "stella"
M.version = 1

M.code = [==[#!lua name=stella
-- (redis.call, string, ... exist only while a function runs, not while the library loads)
local function call(...) return redis.call(...) end

-- BASE from KEYS[1] (BASE .. "meta")
local function base(keys) return string.sub(keys[1], 1, -5) end

-- the owner part of a mark's value "until|owner" ("" for none)
local function owner_of(v)
  local p = string.find(v, "|", 1, true)
  return string.sub(v, p + 1)
end

local function until_of(v)
  return tonumber(string.sub(v, 1, string.find(v, "|", 1, true) - 1))
end

-- Observations: what a transaction read, checked before anything is written.
--   m KEY VALUE   the mark under KEY has the raw value VALUE ("" for none)
--   u HASH FLAG   HASH is unsubscribed ("1") or not ("0")
--   c N           N unsubscribes
--   l ID SCORE    item ID is queued with next_at SCORE
local function check(B, argv, i, nobs)
  for _ = 1, nobs do
    local kind = argv[i]
    if kind == "m" then
      local v = call("GET", B .. "m:" .. argv[i + 1]) or ""
      if v ~= argv[i + 2] then return nil, "a mark changed" end
      i = i + 3
    elseif kind == "u" then
      local v = call("HEXISTS", B .. "u", argv[i + 1])
      if tostring(v) ~= argv[i + 2] then return nil, "an unsubscribe changed" end
      i = i + 3
    elseif kind == "c" then
      if call("HLEN", B .. "u") ~= tonumber(argv[i + 1]) then return nil, "the unsubscribes changed" end
      i = i + 2
    elseif kind == "l" then
      local score = call("ZSCORE", B .. "due", argv[i + 1])
      if not score or tonumber(score) ~= tonumber(argv[i + 2]) then return nil, "an item was claimed or changed" end
      i = i + 3
    else
      return nil, "unknown observation " .. tostring(kind)
    end
  end
  return i
end

local OPS = {}

-- marks: n x (KEY, UNTIL, UNTIL_MS, OWNER): insert or replace, expiring at UNTIL_MS;
-- OWNER ("" none) holds it in the set r:OWNER
function OPS.marks(B, argv, i, n)
  local index = B .. "mx"
  local held, owners = {}, {}   -- owner -> { keys..., ms = latest expiry }, in order
  for _ = 1, n do
    local key, untl, ms, own = argv[i], argv[i + 1], argv[i + 2], argv[i + 3]
    i = i + 4
    local mk = B .. "m:" .. key
    local old = call("SET", mk, untl .. "|" .. own, "PXAT", ms, "GET")
    if old then
      local oo = owner_of(old)
      if oo ~= "" then call("SREM", B .. "r:" .. oo, key) end
    end
    call("ZADD", index, untl, key)
    if own ~= "" then
      local h = held[own]
      if not h then
        h = { ms = 0 }
        held[own] = h
        owners[#owners + 1] = own
      end
      h[#h + 1] = key
      if tonumber(ms) > h.ms then h.ms = tonumber(ms) end
    end
  end
  for j = 1, #owners do
    local own = owners[j]
    local h, rk = held[own], B .. "r:" .. own
    call("SADD", rk, unpack(h))
    if call("PEXPIRETIME", rk) < h.ms then call("PEXPIREAT", rk, string.format("%.0f", h.ms)) end
  end
  -- the index forgets marks Redis has expired by itself (no purge job needed)
  local t = call("TIME")
  call("ZREMRANGEBYSCORE", index, "-inf", "(" .. t[1])
  return n, i
end

-- settle: KEEP, then n x OWNER: KEEP "1" drops the reservation of OWNER's marks, "0"
-- deletes them; the count of marks
function OPS.settle(B, argv, i, n)
  local keep = argv[i] == "1"
  i = i + 1
  local count = 0
  for _ = 1, n do
    local own = argv[i]
    i = i + 1
    local rk = B .. "r:" .. own
    local members = call("SMEMBERS", rk)
    for j = 1, #members do
      local key = members[j]
      local mk = B .. "m:" .. key
      local v = call("GET", mk)
      if v and owner_of(v) == own then
        if keep then
          call("SET", mk, string.sub(v, 1, #v - #own), "KEEPTTL")
        else
          call("DEL", mk)
          call("ZREM", B .. "mx", key)
        end
        count = count + 1
      end
    end
    call("DEL", rk)
  end
  return count, i
end

-- purge: NOW (n = 1): deletes the marks with until <= NOW still there
function OPS.purge(B, argv, i)
  local now = argv[i]
  local index = B .. "mx"
  local keys = call("ZRANGEBYSCORE", index, "-inf", now)
  local count = 0
  for j = 1, #keys do
    local key = keys[j]
    local mk = B .. "m:" .. key
    local v = call("GET", mk)
    if v and until_of(v) <= tonumber(now) then
      call("DEL", mk)
      local own = owner_of(v)
      if own ~= "" then call("SREM", B .. "r:" .. own, key) end
      count = count + 1
    end
  end
  call("ZREMRANGEBYSCORE", index, "-inf", now)
  return count, i + 1
end

-- unsub: NOW ("" resubscribes), then n x HASH
function OPS.unsub(B, argv, i, n)
  local now = argv[i]
  i = i + 1
  for _ = 1, n do
    if now == "" then call("HDEL", B .. "u", argv[i]) else call("HSETNX", B .. "u", argv[i], now) end
    i = i + 1
  end
  return n, i
end

-- enqueue: n x (ID, NEXT_AT, NF, NF x (FIELD, VALUE)): the item's hash i:ID, queued
function OPS.enqueue(B, argv, i, n)
  for _ = 1, n do
    local id, next_at, nf = argv[i], argv[i + 1], tonumber(argv[i + 2])
    i = i + 3
    call("HSET", B .. "i:" .. id, unpack(argv, i, i + 2 * nf - 1))
    i = i + 2 * nf
    call("ZADD", B .. "due", next_at, id)
  end
  return n, i
end

-- lease: n x (ID, NEXT_AT) of items checked by "l" observations
function OPS.lease(B, argv, i, n)
  for _ = 1, n do
    local id, next_at = argv[i], argv[i + 1]
    i = i + 2
    call("ZADD", B .. "due", "XX", next_at, id)
    call("HSET", B .. "i:" .. id, "next_at", next_at)
  end
  return n, i
end

-- requeue: n x (ID, NEXT_AT, ATTEMPTS|"", HAS_ERROR, ERROR)
function OPS.requeue(B, argv, i, n)
  local count = 0
  for _ = 1, n do
    local id, next_at, attempts, has_err, err = argv[i], argv[i + 1], argv[i + 2], argv[i + 3], argv[i + 4]
    i = i + 5
    local ik = B .. "i:" .. id
    if call("EXISTS", ik) == 1 then
      count = count + 1
      call("HSET", ik, "state", "queued", "next_at", next_at)
      if attempts ~= "" then call("HSET", ik, "attempts", attempts) end
      if has_err == "1" then call("HSET", ik, "last_error", err) else call("HDEL", ik, "last_error") end
      call("HDEL", ik, "died_at")
      call("ZREM", B .. "dead", id)
      call("ZADD", B .. "due", next_at, id)
    end
  end
  return count, i
end

-- kill: n x (ID, DIED_AT, ATTEMPTS|"", HAS_ERROR, ERROR): dead, never leased again
function OPS.kill(B, argv, i, n)
  local count = 0
  for _ = 1, n do
    local id, died_at, attempts, has_err, err = argv[i], argv[i + 1], argv[i + 2], argv[i + 3], argv[i + 4]
    i = i + 5
    local ik = B .. "i:" .. id
    if call("EXISTS", ik) == 1 then
      count = count + 1
      call("HSET", ik, "state", "dead", "died_at", died_at)
      if attempts ~= "" then call("HSET", ik, "attempts", attempts) end
      if has_err == "1" then call("HSET", ik, "last_error", err) end
      call("ZREM", B .. "due", id)
      call("ZADD", B .. "dead", died_at, id)
    end
  end
  return count, i
end

-- delete: n x ID
function OPS.delete(B, argv, i, n)
  local count = 0
  for _ = 1, n do
    local id = argv[i]
    i = i + 1
    count = count + call("DEL", B .. "i:" .. id)
    call("ZREM", B .. "due", id)
    call("ZREM", B .. "dead", id)
  end
  return count, i
end

-- record: HISTORY (seconds), then n x (TIME, HOUR, FIELD, BLOB): the ledger entry BLOB
-- scored by TIME (its sequence number first: ties come back in order), its hourly
-- counter FIELD ("status" or "status|reason") in h:HOUR; both trimmed HISTORY back from
-- the newest entry's time
function OPS.record(B, argv, i, n)
  local history = tonumber(argv[i])
  i = i + 1
  local log, hours = B .. "log", B .. "hours"
  local newest
  local seq = call("INCRBY", B .. "lseq", n) - n
  local members = {}
  local counts, order = {}, {}   -- hour -> field -> count; the hours in order
  for j = 1, n do
    local t, hour, field, blob = argv[i], argv[i + 1], argv[i + 2], argv[i + 3]
    i = i + 4
    members[2 * j - 1], members[2 * j] = t, string.format("%015d", seq + j) .. blob
    local c = counts[hour]
    if not c then
      c = {}
      counts[hour] = c
      order[#order + 1] = hour
    end
    c[field] = (c[field] or 0) + 1
    local tn = tonumber(t)
    if not newest or tn > newest then newest = tn end
  end
  for j = 1, #members, 2000 do   -- (unpack's limit on arguments)
    call("ZADD", log, unpack(members, j, math.min(j + 1999, #members)))
  end
  for j = 1, #order do
    local hour = order[j]
    local hk = B .. "h:" .. hour
    for field, c in pairs(counts[hour]) do call("HINCRBY", hk, field, c) end
    call("EXPIRE", hk, history + 3600)
    call("ZADD", hours, hour, hour)
  end
  if newest then
    call("ZREMRANGEBYSCORE", log, "-inf", "(" .. string.format("%.17g", newest - history))
    call("ZREMRANGEBYSCORE", hours, "-inf", "(" .. string.format("%.17g", newest - history - 3600))
  end
  return n, i
end

-- purge_log: n x (MEMBER, HOUR, FIELD): ledger entries removed, each taking one off its
-- hour's counter (only if this call removed it: two purges never count one twice)
function OPS.purge_log(B, argv, i, n)
  local count = 0
  for _ = 1, n do
    local member, hour, field = argv[i], argv[i + 1], argv[i + 2]
    i = i + 3
    if call("ZREM", B .. "log", member) == 1 then
      count = count + 1
      local hk = B .. "h:" .. hour
      if call("HINCRBY", hk, field, -1) <= 0 then call("HDEL", hk, field) end
    end
  end
  return count, i
end

-- purge_dead: n x ID: dead items deleted (never a queued one)
function OPS.purge_dead(B, argv, i, n)
  local count = 0
  for _ = 1, n do
    local id = argv[i]
    i = i + 1
    if call("ZREM", B .. "dead", id) == 1 then
      call("DEL", B .. "i:" .. id)
      count = count + 1
    end
  end
  return count, i
end

-- meta: n x (NAME, MODE, VALUE): MODE "set", "setnx" (first writer wins) or "del"
function OPS.meta(B, argv, i, n)
  for _ = 1, n do
    local name, mode, value = argv[i], argv[i + 1], argv[i + 2]
    i = i + 3
    if mode == "del" then call("HDEL", B .. "meta", name)
    elseif mode == "setnx" then call("HSETNX", B .. "meta", name, value)
    else call("HSET", B .. "meta", name, value) end
  end
  return n, i
end

-- ARGV: NOBS, the observations, then ops: NAME, N, their arguments. Checks first (a
-- failed check writes nothing), then applies every op; answers their counts.
local function commit(keys, argv)
  local B = base(keys)
  local i, why = check(B, argv, 2, tonumber(argv[1]))
  if not i then return redis.error_reply("CONFLICT " .. why .. " since the transaction read it") end
  local counts = {}
  while i <= #argv do
    local op = OPS[argv[i]]
    if not op then return redis.error_reply("ERR stella: unknown op " .. tostring(argv[i])) end
    local count
    count, i = op(B, argv, i + 2, tonumber(argv[i + 1]))
    counts[#counts + 1] = count
  end
  return counts
end

-- An item as a flat list: ID, then its hash's fields and values.
local function item(B, id)
  local fields = call("HGETALL", B .. "i:" .. id)
  table.insert(fields, 1, id)
  return fields
end

-- ARGV: NOW, NEXT_AT, LIMIT: the queued items with next_at <= NOW (by next_at, id), at
-- most LIMIT, each leased until NEXT_AT; answers them
local function lease(keys, argv)
  local B = base(keys)
  local due = B .. "due"
  local ids = call("ZRANGEBYSCORE", due, "-inf", argv[1], "LIMIT", 0, tonumber(argv[3]))
  local out = {}
  for j = 1, #ids do
    local id = ids[j]
    call("ZADD", due, "XX", argv[2], id)
    call("HSET", B .. "i:" .. id, "next_at", argv[2])
    out[j] = item(B, id)
  end
  return out
end

-- ARGV: WHICH, LIMIT [, NOW]: "queued" (by next_at, id), "dead" (newest death first) or
-- "due" (queued with next_at <= NOW)
local function items(keys, argv)
  local B = base(keys)
  local which, limit = argv[1], tonumber(argv[2])
  local ids
  if limit == 0 then return {} end
  if which == "dead" then ids = call("ZREVRANGE", B .. "dead", 0, limit - 1)
  elseif which == "due" then ids = call("ZRANGEBYSCORE", B .. "due", "-inf", argv[3], "LIMIT", 0, limit)
  else ids = call("ZRANGE", B .. "due", 0, limit - 1) end
  local out = {}
  for j = 1, #ids do out[j] = item(B, ids[j]) end
  return out
end

redis.register_function("stella_commit", commit)
redis.register_function("stella_lease", lease)
redis.register_function{ function_name = "stella_items", callback = items, flags = { "no-writes" } }
]==]

return M
