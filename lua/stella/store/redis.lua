-- stella.store.redis: the store backend on Redis 7 (several processes and hosts on one
-- server), over stella.redis (hiredis in plain Lua, cosockets inside OpenResty).
--
--   local s = assert(store.redis("redis://app:secret@127.0.0.1:6379/0"))
--   local s = assert(store.redis{ url = "redis://...", prefix = "stella:", tag = "main",
--                                 connect_timeout = 2, timeout = 2, history = 90 * 86400 })
--
-- Atomicity. Redis has no rollback, and no state change may be a client-side
-- read-modify-write across round trips. So a transaction (begin .. commit) buffers its
-- writes here and sends them at commit as ONE call of the Function stella_commit
-- (lua/stella/store/redis_lib.lua), which Redis runs alone, all of it. Reads inside the
-- transaction (read_marks, unsubscribed, count_unsubscribed, lease) go to the server at
-- once, and the backend notes what they saw; stella_commit first checks that all of it
-- is still so (optimistic concurrency) and otherwise writes nothing and answers
-- CONFLICT, which the store returns as a retryable error: the trigger's decide then
-- decides the batch again (it retries up to 3 times), now seeing the other writer's
-- marks. So "unsubscribed? suppression mark? interaction already seen? then reserve the
-- marks and enqueue the requests" is one atomic server-side state change, and so are a
-- batch's settling (marks confirmed or released, items finished, requeued or killed,
-- ledger entries and counters) and a lease (stella_lease). A write outside a
-- transaction is one stella_commit of its own.
--
-- What differs from SQLite inside a transaction: reads see the server, not the
-- transaction's own buffered writes (the trigger never reads what it wrote in the same
-- transaction); settle_marks and update_items answer the number asked for (n), not the
-- number that existed (the server knows that only at commit; outside a transaction
-- they answer the exact count). enqueue takes its ids at once (INCRBY): ids of a
-- transaction that rolls back are skipped, never reused.
--
-- Round trips: decide = 1 (HLEN) + 1 per mark look-up the rules make (MGET; get_marks
-- batches them) + 1 (INCRBY ids) + 1 (stella_commit); settle = 1 (stella_commit);
-- claim = 1 (stella_lease). A commit whose reply is lost (network) fails with a
-- non-retryable error: it may have been applied, so the batch is not decided again
-- (its requests, if queued, go out with `stella retry`).
--
-- Keys (BASE = prefix .. "{" .. tag .. "}:", default "stella:{main}:"; one hash tag,
-- so every call touches one slot):
--   BASE meta          hash    -                 named values (salt, last_alert)
--   BASE m:KEY         string  PXAT until        a mark: "until|owner" (owner "" or
--                                                "i<id>" / "s<string>")
--   BASE mx            zset    -                 marks by until (purge_marks; trimmed of
--                                                expired ones on every put)
--   BASE r:OWNER       set     PXAT max until    the marks an outbox item reserves
--   BASE u             hash    -                 unsubscribes: e-mail hash -> time
--   BASE id            string  -                 the last outbox id (INCRBY)
--   BASE i:ID          hash    -                 an outbox item (ID zero-padded)
--   BASE due           zset    -                 queued items by next_at
--   BASE dead          zset    -                 dead items by died_at
--   BASE lseq          string  -                 the ledger's sequence
--   BASE log           zset    trimmed           ledger entries by time (history back)
--   BASE h:HOUR        hash    history + 1 h     counts per "status|reason" that hour
--   BASE hours         zset    trimmed           the hours that have counters
-- Retention (purge): the entries and dead items read, then removed by one commit (an
-- entry's removal takes one off its hour's counter).
-- Marks expire by TTL on Redis' clock: the `now` given to the store must be the real
-- time (as it is in the trigger and the command).
--
-- Inside OpenResty one store serves every request and timer of a worker (the salt read
-- once, when it opens): a transaction belongs to the coroutine that began it (its
-- buffered writes and reads too: per_coroutine), and each operation takes a connection
-- of its own from nginx's keep-alive pool (a fork of the store's stella.redis conn) and
-- gives it back when it has its answer, so no connection is shared by two coroutines
-- and a request waiting on Redis holds one connection only while it waits. Outside
-- nginx the store keeps its one connection.
local store = require "stella.store"
local lib = require "stella.store.redis_lib"
local text = require "stella.store.text"

local concat, floor, ceil, format, sort = table.concat, math.floor, math.ceil, string.format, table.sort
local ipairs, pairs, setmetatable, tonumber, tostring, type, error, rawget =
      ipairs, pairs, setmetatable, tonumber, tostring, type, error, rawget
local math_type = math.type
local running = coroutine.running
local number_text = text.number_text
local unpack = table.unpack or unpack   -- luacheck: ignore

local M = {}

local DEFAULT_PREFIX, DEFAULT_TAG = "stella:", "main"
local DEFAULT_HISTORY = 90 * 86400   -- as the trigger's default retention window
local ITEM_FIELDS = { "kind", "body", "brand", "event_id", "interaction_id", "customer_hash",
                      "created_at", "next_at", "attempts", "state", "last_error", "died_at" }
local ITEM_NUMBERS = { created_at = true, next_at = true, attempts = true, died_at = true }

local Backend = {}
Backend.__index = Backend
Backend.name = "stella.store.redis"
Backend.remote = true   -- the trigger batches its look-ups (stella.trigger.decide)
Backend.per_coroutine = true   -- a transaction belongs to the running coroutine

local MAIN = {}   -- the transaction key outside coroutines (LuaJIT's running() gives nil there)

local function tx_of(self)
  return self.txs[running() or MAIN]
end

-- The connection for one operation, and its return: the store's own one outside nginx;
-- inside it a fork, whose connection goes back to nginx's pool when the operation is done.
local function take(self)
  if self.forking then return self.conn:fork() end
  return self.conn
end

local function give(self, c)
  if c ~= self.conn then c:close() end
end

-- A store error from a stella.redis error (its message is redacted already).
local function fail(err, retryable)
  if retryable == nil then retryable = type(err) == "table" and err.retryable end
  return nil, store.error("stella.store.redis: " .. tostring(err), retryable)
end

-- Zero-padded ids: their text order is their number order (sorted sets' ties).
local function pad(id) return format("%015d", id) end

local function owner_text(o)
  if o == nil then return "" end
  if type(o) == "string" then return "s" .. o end
  return "i" .. format("%d", o)
end

local function owner_value(t)
  if t == "" then return nil end
  local v = t:sub(2)
  if t:byte(1) == 105 then   -- "i"
    local n = tonumber(v)
    if math_type then n = math.tointeger(n) or n end
    return n
  end
  return v
end

local int = text.int   -- "12" -> 12 (an integer in Lua 5.4)

---------------------------------------------------------------------------------------
-- Opening
---------------------------------------------------------------------------------------

local KNOWN = { url = true, prefix = true, tag = true, connect_timeout = true, timeout = true, history = true }

-- stella.store.redis(url | options) -> store | nil, err
function M.new(opts)
  if type(opts) == "string" then opts = { url = opts } end
  if type(opts) ~= "table" then error("stella.store.redis: a redis:// URL or an options table expected", 2) end
  for k in pairs(opts) do
    if not KNOWN[k] then error("stella.store.redis: unknown option " .. tostring(k), 2) end
  end
  local prefix, tag = opts.prefix or DEFAULT_PREFIX, opts.tag or DEFAULT_TAG
  if type(prefix) ~= "string" or prefix:find("[{}]") then
    error("stella.store.redis: option prefix must be a string without { or }", 2)
  end
  if type(tag) ~= "string" or tag == "" or tag:find("[{}]") then
    error("stella.store.redis: option tag must be a non-empty string without { or }", 2)
  end
  local history = opts.history or DEFAULT_HISTORY
  if type(history) ~= "number" or history < 3600 or history ~= floor(history) then
    error("stella.store.redis: option history must be a whole number of seconds >= 3600", 2)
  end
  local redis = require "stella.redis"
  local conn, err = redis.connect{ url = opts.url, connect_timeout = opts.connect_timeout, timeout = opts.timeout,
                                   libraries = { { name = lib.name, code = lib.code, version = lib.version } } }
  if not conn then return fail(err, err.retryable) end
  local ok, lerr = conn:load_library(lib.name, lib.code, lib.version)
  if not ok then
    conn:close()
    return fail(lerr)
  end
  local B = prefix .. "{" .. tag .. "}:"
  local ngx = rawget(_G, "ngx")
  local forking = type(ngx) == "table" and ngx.get_phase ~= nil   -- inside nginx
  if forking then conn:close() end   -- back to the pool: every operation takes its own
  return store.open(setmetatable({
    conn = conn, B = B, meta_key = B .. "meta", history = number_text(history),
    url = conn.url, forking = forking,
    txs = {},   -- coroutine (or MAIN) -> { obs, nobs, args }
  }, Backend))
end

---------------------------------------------------------------------------------------
-- Writes: ops of stella_commit
---------------------------------------------------------------------------------------

-- Runs stella_commit with observations obs and ops args: the list of op counts, or nil, err.
local function commit_call(self, nobs, obs, args)
  local argv = { tostring(nobs) }
  for i = 1, #obs do argv[#argv + 1] = obs[i] end
  for i = 1, #args do argv[#argv + 1] = args[i] end
  local c = take(self)
  local res, err = c:fcall("stella_commit", { self.meta_key }, argv)
  give(self, c)
  if res == nil then
    if err.kind == "redis" and err.code == "CONFLICT" then
      local _, cerr = fail(err, true)
      cerr.conflict = true   -- the trigger's decide tries again (stella.trigger.decide)
      return nil, cerr
    end
    -- lost on the way back: it may have been applied; not to be decided again
    return fail(err, err.kind ~= "network" and err.retryable)
  end
  return res
end

-- One op: buffered inside a transaction (answering `n`), else committed at once
-- (answering the server's count). args: the op's arguments after NAME and N.
local function write(self, op, n, args)
  local tx = tx_of(self)
  if tx then
    local a = tx.args
    a[#a + 1] = op
    a[#a + 1] = tostring(n)
    for i = 1, #args do a[#a + 1] = args[i] end
    return n
  end
  local all = { op, tostring(n) }
  for i = 1, #args do all[#all + 1] = args[i] end
  local res, err = commit_call(self, 0, {}, all)
  if not res then return nil, err end
  return res[1]
end

function Backend:begin()
  self.txs[running() or MAIN] = { obs = {}, nobs = 0, args = {} }
  return true
end

function Backend:commit()
  local key = running() or MAIN
  local tx = self.txs[key]
  self.txs[key] = nil
  if not tx or #tx.args == 0 then return true end   -- read only: nothing to check
  local res, err = commit_call(self, tx.nobs, tx.obs, tx.args)
  if not res then return nil, err end
  return true
end

function Backend:rollback()
  self.txs[running() or MAIN] = nil
end

local function observe(self, a, b, c)
  local tx = tx_of(self)
  if not tx then return end
  local o = tx.obs
  o[#o + 1] = a
  o[#o + 1] = b
  if c ~= nil then o[#o + 1] = c end
  tx.nobs = tx.nobs + 1
end

---------------------------------------------------------------------------------------
-- Marks
---------------------------------------------------------------------------------------

function Backend:read_marks(keys, n, now)
  local B, cmd = self.B, { "MGET" }
  for i = 1, n do cmd[i + 1] = B .. "m:" .. keys[i] end
  local c = take(self)
  local vals, err = c:call(unpack(cmd, 1, n + 1))
  give(self, c)
  if not vals then return fail(err) end
  local untils, owners = {}, {}
  local tx = tx_of(self)
  for i = 1, n do
    local v = vals[i]
    if tx then observe(self, "m", keys[i], v or "") end
    if v then
      local p = v:find("|", 1, true)
      local u = tonumber(v:sub(1, p - 1))
      if u > now then untils[i], owners[i] = u, owner_value(v:sub(p + 1)) end
    end
  end
  return untils, owners
end

function Backend:put_marks(list, n)
  local args = {}
  for i = 1, n do
    local r = list[i]
    local u = r["until"]
    args[#args + 1] = r.key
    args[#args + 1] = number_text(u)
    args[#args + 1] = format("%.0f", ceil(u * 1000))
    args[#args + 1] = owner_text(r.outbox_id)
  end
  local ok, err = write(self, "marks", n, args)
  if not ok then return nil, err end
  return true
end

function Backend:settle_marks(ids, n, keep)
  local args = { keep and "1" or "0" }
  for i = 1, n do args[i + 1] = owner_text(ids[i]) end
  return write(self, "settle", n, args)
end

function Backend:purge_marks(now)
  return write(self, "purge", 1, { number_text(now) })
end

---------------------------------------------------------------------------------------
-- Unsubscribes
---------------------------------------------------------------------------------------

function Backend:set_unsubscribed(hashes, n, now)
  local args = { now and number_text(now) or "" }
  for i = 1, n do args[i + 1] = hashes[i] end
  local ok, err = write(self, "unsub", n, args)
  if not ok then return nil, err end
  return true
end

function Backend:unsubscribed(hashes, n)
  local cmd = { "HMGET", self.B .. "u" }
  for i = 1, n do cmd[i + 2] = hashes[i] end
  local c = take(self)
  local vals, err = c:call(unpack(cmd, 1, n + 2))
  give(self, c)
  if not vals then return fail(err) end
  local flags = {}
  local tx = tx_of(self)
  for i = 1, n do
    flags[i] = vals[i] and true or false
    if tx then observe(self, "u", hashes[i], flags[i] and "1" or "0") end
  end
  return flags
end

function Backend:count_unsubscribed()
  local c = take(self)
  local n, err = c:call("HLEN", self.B .. "u")
  give(self, c)
  if not n then return fail(err) end
  if tx_of(self) then observe(self, "c", tostring(n)) end
  return n
end

---------------------------------------------------------------------------------------
-- Outbox
---------------------------------------------------------------------------------------

-- An item from stella_lease / stella_items: { ID, field, value, ... }.
local function decode_item(flat)
  local it = { id = int(flat[1]) }
  for j = 2, #flat, 2 do
    local k, v = flat[j], flat[j + 1]
    if ITEM_NUMBERS[k] then v = int(v) end
    it[k] = v
  end
  return it
end

local function decode_items(list)
  local out = {}
  for i = 1, #list do out[i] = decode_item(list[i]) end
  return out
end

function Backend:enqueue(list, n)
  local c = take(self)
  local last, err = c:call("INCRBY", self.B .. "id", n)
  give(self, c)
  if not last then return fail(err) end
  local ids, args = {}, {}
  for i = 1, n do
    local id = last - n + i
    if math_type then id = math.tointeger(id) or id end
    ids[i] = id
    local r = list[i]
    local fields = {}
    for _, f in ipairs(ITEM_FIELDS) do
      local v = r[f]
      if f == "next_at" and v == nil then v = r.created_at end
      if f == "attempts" and v == nil then v = 0 end
      if f == "state" then v = "queued" end
      if v ~= nil then
        fields[#fields + 1] = f
        fields[#fields + 1] = type(v) == "number" and number_text(v) or v
      end
    end
    args[#args + 1] = pad(id)
    args[#args + 1] = number_text(r.next_at or r.created_at)
    args[#args + 1] = tostring(#fields / 2)
    for j = 1, #fields do args[#args + 1] = fields[j] end
  end
  local ok, werr = write(self, "enqueue", n, args)
  if not ok then return nil, werr end
  return ids
end

function Backend:lease(now, lease, limit)
  local next_at = number_text(now + lease)
  local c = take(self)
  if not tx_of(self) then
    local list, err = c:fcall("stella_lease", { self.meta_key }, { number_text(now), next_at, tostring(limit) })
    give(self, c)
    if not list then return fail(err) end
    return decode_items(list)
  end
  -- inside a transaction: read the due items, lease them at commit if still so
  local list, err = c:fcall_ro("stella_items", { self.meta_key }, { "due", tostring(limit), number_text(now) })
  give(self, c)
  if not list then return fail(err) end
  local items, args = decode_items(list), {}
  for i = 1, #items do
    local it = items[i]
    observe(self, "l", list[i][1], number_text(it.next_at))
    args[#args + 1] = list[i][1]
    args[#args + 1] = next_at
    it.next_at = now + lease
  end
  if #items > 0 then write(self, "lease", #items, args) end
  return items
end

function Backend:update_items(op, list, n)
  local args = {}
  if op == "delete" then
    for i = 1, n do args[i] = pad(list[i]) end
    return write(self, "delete", n, args)
  end
  for i = 1, n do
    local r = list[i]
    args[#args + 1] = pad(r.id)
    args[#args + 1] = number_text(op == "kill" and r.died_at or r.next_at)
    args[#args + 1] = r.attempts and number_text(r.attempts) or ""
    args[#args + 1] = r.last_error ~= nil and "1" or "0"
    args[#args + 1] = r.last_error or ""
  end
  return write(self, op, n, args)
end

function Backend:list_items(state, limit)
  local c = take(self)
  local list, err = c:fcall_ro("stella_items", { self.meta_key }, { state, tostring(limit) })
  give(self, c)
  if not list then return fail(err) end
  return decode_items(list)
end

function Backend:count_items()
  local c = take(self)
  local res, err = c:pipeline{ { "ZCARD", self.B .. "due" }, { "ZCARD", self.B .. "dead" } }
  give(self, c)
  if not res then return fail(err) end
  return { queued = res[1], dead = res[2] }
end

---------------------------------------------------------------------------------------
-- Ledger: entries as length-prefixed fields ("~" for nil) in rows.entry's order
---------------------------------------------------------------------------------------

local encode_entry = text.encode_entry

-- A ledger member (15-digit sequence, then the entry) as an entry.
local function decode_entry(member) return text.decode_entry(member, 16) end

local function counter_field(status, reason)
  return reason == nil and status or (status .. "|" .. reason)
end

function Backend:record(list, n)
  local args = { self.history }
  for i = 1, n do
    local e = list[i]
    args[#args + 1] = number_text(e.time)
    args[#args + 1] = number_text(floor(e.time / 3600) * 3600)
    args[#args + 1] = counter_field(e.status, e.reason)
    args[#args + 1] = encode_entry(e)
  end
  local ok, err = write(self, "record", n, args)
  if not ok then return nil, err end
  return true
end

local PAGE = 500

function Backend:ledger(since, status, limit)
  local out = {}
  if limit == 0 then return out end
  local min = since and number_text(since) or "-inf"
  local offset = 0
  while #out < limit do
    local c = take(self)
    local page, err = c:call("ZREVRANGEBYSCORE", self.B .. "log", "+inf", min, "LIMIT", offset, PAGE)
    give(self, c)
    if not page then return fail(err) end
    for i = 1, #page do
      local e = decode_entry(page[i])
      if status == nil or e.status == status then
        out[#out + 1] = e
        if #out == limit then break end
      end
    end
    if #page < PAGE then break end
    offset = offset + PAGE
  end
  return out
end

-- Adds the entries of the log with since <= time < before (nil: no bound) to groups.
local function tally_log(self, since, before, bucket, add)
  local min = since and number_text(since) or "-inf"
  local max = before and ("(" .. number_text(before)) or "+inf"
  local offset = 0
  while true do
    local c = take(self)
    local page, err = c:call("ZRANGEBYSCORE", self.B .. "log", min, max, "LIMIT", offset, PAGE * 4)
    give(self, c)
    if not page then return fail(err) end
    for i = 1, #page do
      local e = decode_entry(page[i])
      add(bucket and floor(e.time / bucket) * bucket, e.status, e.reason, 1)
    end
    if #page < PAGE * 4 then return true end
    offset = offset + PAGE * 4
  end
end

-- Whole hours from the hourly counters; a partial first hour (and any bucket that is
-- not whole hours) from the log itself.
function Backend:tally(since, bucket)
  local out, index = {}, {}
  local function add(start, status, reason, count)
    local k = (start or "") .. "\0" .. status .. "\0" .. (reason and ("+" .. reason) or "-")
    local g = index[k]
    if not g then
      g = { start = start, status = status, reason = reason, count = 0 }
      index[k] = g
      out[#out + 1] = g
    end
    g.count = g.count + count
  end
  if bucket and bucket % 3600 ~= 0 then
    local ok, err = tally_log(self, since, nil, bucket, add)
    if not ok then return nil, err end
    return out
  end
  local first_hour = since and ceil(since / 3600) * 3600
  if since and first_hour > since then
    local ok, err = tally_log(self, since, first_hour, bucket, add)
    if not ok then return nil, err end
  end
  local c = take(self)
  local hours, err = c:call("ZRANGEBYSCORE", self.B .. "hours", first_hour and number_text(first_hour) or "-inf", "+inf")
  if not hours or #hours == 0 then
    give(self, c)
    if not hours then return fail(err) end
    return out
  end
  local cmds = {}
  for i = 1, #hours do cmds[i] = { "HGETALL", self.B .. "h:" .. hours[i] } end
  local res, perr = c:pipeline(cmds)
  give(self, c)
  if not res then return fail(perr) end
  for i = 1, #hours do
    local hour, flat = tonumber(hours[i]), res[i]
    if type(flat) ~= "table" then return fail(flat, false) end
    for j = 1, #flat, 2 do
      local field = flat[j]
      local bar = field:find("|", 1, true)
      local status, reason = field, nil
      if bar then status, reason = field:sub(1, bar - 1), field:sub(bar + 1) end
      add(bucket and floor(hour / bucket) * bucket, status, reason, tonumber(flat[j + 1]))
    end
  end
  return out
end

-- Retention: the ledger entries and dead items older than `before` (at most limit of
-- each) are read, then removed by one commit (each only if still there; a removed entry
-- takes one off its hour's counter). Inside a transaction the counts are those read.
function Backend:purge(before, limit)
  local max = "(" .. number_text(before)
  local c = take(self)
  local res, err = c:pipeline{
    { "ZRANGEBYSCORE", self.B .. "log", "-inf", max, "LIMIT", 0, limit },
    { "ZRANGEBYSCORE", self.B .. "dead", "-inf", max, "LIMIT", 0, limit },
  }
  give(self, c)
  if not res then return fail(err) end
  local members, ids = res[1], res[2]
  if type(members) ~= "table" then return fail(members) end
  if type(ids) ~= "table" then return fail(ids) end
  local log_args = {}
  for i = 1, #members do
    local e = decode_entry(members[i])
    log_args[#log_args + 1] = members[i]
    log_args[#log_args + 1] = number_text(floor(e.time / 3600) * 3600)
    log_args[#log_args + 1] = counter_field(e.status, e.reason)
  end
  if tx_of(self) then
    if #members > 0 then write(self, "purge_log", #members, log_args) end
    if #ids > 0 then write(self, "purge_dead", #ids, ids) end
    return { ledger = #members, dead = #ids }
  end
  if #members == 0 and #ids == 0 then return { ledger = 0, dead = 0 } end
  local all = { "purge_log", tostring(#members) }
  for i = 1, #log_args do all[#all + 1] = log_args[i] end
  all[#all + 1] = "purge_dead"
  all[#all + 1] = tostring(#ids)
  for i = 1, #ids do all[#all + 1] = ids[i] end
  local counts, cerr = commit_call(self, 0, {}, all)
  if not counts then return nil, cerr end
  return { ledger = counts[1], dead = counts[2] }
end

---------------------------------------------------------------------------------------
-- Meta and life
---------------------------------------------------------------------------------------

function Backend:get_meta(name)
  local c = take(self)
  local v, err = c:call("HGET", self.meta_key, name)
  give(self, c)
  if v == nil then return fail(err) end
  return v or nil
end

function Backend:set_meta(name, value, only_if_absent)
  local mode = value == nil and "del" or (only_if_absent and "setnx" or "set")
  local ok, err = write(self, "meta", 1, { name, mode, value or "" })
  if not ok then return nil, err end
  return true
end

function Backend:close()
  self.txs = {}
  self.conn:close()
end

Backend.__tostring = function(self) return "stella.store.redis(" .. self.url .. ")" end

M.Backend = Backend
M.pad = pad
return M
