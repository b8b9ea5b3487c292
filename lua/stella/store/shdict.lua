-- stella.store.shdict: the store backend on an nginx shared dictionary (lua_shared_dict),
-- shared by every worker of one nginx node and lost when nginx stops. For OpenResty:
--
--   http { lua_shared_dict stella 10m; ... }
--   local store = assert(require("stella.store.shdict").new("stella"))   -- or ngx.shared.stella
--
-- new(dict [, opts]): dict is the name of a lua_shared_dict or the dict itself; opts:
--   prefix       put before every key (default ""), to share a dict with other data
--   ledger_size  entries the ledger keeps, newest first (default 1000; a ring)
--   dead_ttl     seconds a dead outbox item is kept (default 7 days)
--
-- What lives where (keys after the prefix):
--   salt                 the e-mail hashing salt (meta "salt"), the same for every
--                        worker (added once)
--   m:KEY                a suppression / dedupe mark "UNTIL|[n|s]OUTBOX_ID", expiring with
--                        the dict's exptime at UNTIL (+1 s), so nothing needs purging
--   r:[n|s]OUTBOX_ID     the keys of the marks an outbox item reserves
--   u:HASH, u#           unsubscribes (never expire) and their count (a rollback undoes
--                        its own change of the count, not another worker's)
--   o:ID, o#, o@         outbox items (JSON), the id counter, and the list of live ids
--   c:ID:NEXT_AT         a claim token: one worker only claims an item that is due
--   l:SLOT, l#           the ledger ring and its sequence counter
--   meta:NAME            named values
--
-- Times are seconds since the epoch passed in by the caller, as for every store; a mark's
-- expiry uses the real clock (ngx.now()), so the caller's clock must be the real one
-- (the trigger's default, or clock = ngx.time).
--
-- Writes never evict anything (safe_set/safe_add): a full dict is a run-time failure
-- (nil, err), except for the ledger, which then drops the entry.
--
-- Across workers: a transaction (store:atomic) keeps an undo journal per coroutine, so an
-- error or a failed write inside it rolls back this worker's changes, but it locks nothing:
-- nginx workers run truly in parallel. Where a race matters the store uses the dict's
-- own atomic operations:
--   * a mark reserved for an outbox item (put_marks with an outbox_id) is written with
--     safe_add when the key was free when read (read_marks), and with a short add-based lock and a
--     compare when it held an old mark. If another worker wrote the mark after this one
--     looked at it, put_marks fails and atomic returns nil, err (retryable), with
--     everything rolled back: the other worker sends, this event is not sent twice.
--   * ids come from incr; unsubscribe uses safe_add; claim takes a token with safe_add,
--     so two workers never claim the same item at once.
-- stella.trigger then decides the losing batch again (it sees the winner's mark: the
-- event comes out suppressed or duplicate): the winner's request is the customer's one.
-- The ledger is approximate under concurrent writers. fn must not rely on another
-- coroutine's uncommitted writes.
--
-- The primitives are those of the contract in stella.store (lua/stella/store/init.lua),
-- checked by its suite (spec/support/store_contract.lua, run inside nginx by
-- spec/openresty_spec.lua). purge_marks has nothing to do in normal use (marks expire by
-- themselves); see below.
local store = require "stella.store"
local rows = require "stella.store.rows"
local lists = require "stella.store.lists"
local cjson = require "cjson.safe"

local ngx = rawget(_G, "ngx")
local error, ipairs, pairs, setmetatable, tonumber, tostring, type =
      error, ipairs, pairs, setmetatable, tonumber, tostring, type
local running = coroutine.running
local copy, layout_copy, number_text = lists.copy, lists.layout_copy, store.number_text

local clock = ngx and ngx.now or os.time

local ITEM, ENTRY = rows.item, rows.entry

local M = {}

local Backend = {}
Backend.__index = Backend
Backend.per_coroutine = true
M.Backend = Backend

local MAIN = {}   -- journal key outside any coroutine (LuaJIT's running() gives nil there)

---------------------------------------------------------------------------------------
-- Journal and writes
---------------------------------------------------------------------------------------

local function journal(self)
  return self.journals[running() or MAIN]
end

local function restore(dict, k, v, ttl)
  if v == nil then
    dict:delete(k)
  else
    if ttl and ttl < 0 then ttl = 0.001 end
    dict:set(k, v, ttl or 0)
  end
end

-- Remembers key k's value and remaining life before its first change in a transaction.
local function remember(self, k)
  local j = journal(self)
  if not j or j.seen[k] then return end
  j.seen[k] = true
  local v = self.dict:get(k)
  j:note(restore, self.dict, k, v, v ~= nil and self.dict:ttl(k) or nil)
end

local function failure(self, message, retryable)
  return store.error(self.name .. ": " .. message, retryable)
end

-- After a successful add: the key held nothing before (rollback deletes it). Not
-- remembered before the add, which could then undo another worker's value.
local function added(self, k)
  local j = journal(self)
  if not j or j.seen[k] then return end
  j.seen[k] = true
  j:note(restore, self.dict, k, nil)
end

local function put(self, k, v, exptime)
  remember(self, k)
  local ok, err = self.dict:safe_set(k, v, exptime or 0)
  if not ok then return nil, failure(self, "cannot write to the shared dict: " .. tostring(err), false) end
  return true
end

local function del(self, k)
  remember(self, k)
  self.dict:delete(k)
end

local function incr(dict, k, delta)
  dict:incr(k, delta, 0)
end

-- Adds delta to the counter under k; a rollback takes away this change only.
local function count_by(self, k, delta)
  local v, err = self.dict:incr(k, delta, 0)
  if not v then return nil, failure(self, "cannot count: " .. tostring(err), false) end
  local j = journal(self)
  if j then j:note(incr, self.dict, k, -delta) end
  return v
end

function Backend:begin()
  local j = lists.journal()
  j.seen, j.looked = {}, {}
  self.journals[running() or MAIN] = j
  return true
end

function Backend:commit()
  self.journals[running() or MAIN] = nil
  return true
end

function Backend:rollback()
  local key = running() or MAIN
  local j = self.journals[key]
  self.journals[key] = nil
  if j then j:undo() end
end

---------------------------------------------------------------------------------------
-- Construction
---------------------------------------------------------------------------------------

-- stella.store.shdict(dict [, opts]) -> store | nil, err
function M.new(dict, opts)
  local name = "shdict"
  if type(dict) == "string" then
    name = dict
    local shared = ngx and ngx.shared
    dict = shared and shared[name]
    if not dict then
      error("stella.store.shdict: no lua_shared_dict named \"" .. name .. "\" (add `lua_shared_dict "
        .. name .. " 10m;` to nginx's http block)", 2)
    end
  elseif type(dict) ~= "table" and type(dict) ~= "userdata" then
    error("stella.store.shdict: a lua_shared_dict name or ngx.shared.NAME expected, got " .. type(dict), 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("stella.store.shdict: opts must be a table or nil, got " .. type(opts), 2)
  end
  opts = opts or {}
  local prefix = opts.prefix or ""
  if type(prefix) ~= "string" then error("stella.store.shdict: opts.prefix must be a string", 2) end
  local ledger_size = opts.ledger_size or 1000
  if not store.is_integer(ledger_size) or ledger_size < 1 then
    error("stella.store.shdict: opts.ledger_size must be a whole number >= 1", 2)
  end
  local dead_ttl = opts.dead_ttl or 7 * 86400
  if not store.is_finite(dead_ttl) or dead_ttl <= 0 then
    error("stella.store.shdict: opts.dead_ttl must be a positive number of seconds", 2)
  end
  return store.open(setmetatable({
    dict = dict, name = "stella.store.shdict (" .. name .. ")", p = prefix,
    ledger_size = ledger_size, dead_ttl = dead_ttl,
    journals = setmetatable({}, { __mode = "k" }),
  }, Backend))
end

---------------------------------------------------------------------------------------
-- Marks
---------------------------------------------------------------------------------------

local function reservation_text(id)
  if id == nil then return "" end
  if type(id) == "number" then return "n" .. number_text(id) end
  return "s" .. id
end

local function encode_mark(until_, outbox_id)
  return number_text(until_) .. "|" .. reservation_text(outbox_id)
end

-- -> until, outbox_id
local function decode_mark(v)
  if type(v) ~= "string" then return nil end
  local u, tag, id = v:match("^([^|]*)|(.?)(.*)$")
  local until_ = tonumber(u)
  if not until_ then return nil end
  if tag == "n" then return until_, tonumber(id) end
  if tag == "s" then return until_, id end
  return until_, nil
end

function Backend:read_marks(keys, n, now)
  local dict, j, untils, owners = self.dict, journal(self), {}, {}
  for i = 1, n do
    local k = self.p .. "m:" .. keys[i]
    local v = dict:get(k)
    if j and j.looked[k] == nil then j.looked[k] = v or false end
    local until_, outbox_id = decode_mark(v)
    if until_ and until_ > now then untils[i], owners[i] = until_, outbox_id end
  end
  return untils, owners
end

-- Appends a mark key to the list an outbox item reserves.
local function add_reservation(self, outbox_id, k, exptime)
  local rk = self.p .. "r:" .. reservation_text(outbox_id)
  local old = self.dict:get(rk) or ""
  local ttl = old ~= "" and self.dict:ttl(rk) or 0
  if ttl == 0 or ttl < exptime then ttl = exptime end
  return put(self, rk, old .. #k .. ":" .. k, ttl)
end

local function reserved_keys(self, outbox_id)
  local rk = self.p .. "r:" .. reservation_text(outbox_id)
  local list, v = {}, self.dict:get(rk)
  local pos = 1
  while v and pos <= #v do
    local len, body = v:match("^(%d+):()", pos)
    if not len then break end
    len = tonumber(len)
    list[#list + 1] = v:sub(body, body + len - 1)
    pos = body + len
  end
  return list, rk
end

-- One mark. true | nil, err
local function put_mark(self, key, until_, outbox_id)
  local dict, k = self.dict, self.p .. "m:" .. key
  local exptime = until_ - clock() + 1   -- +1: the caller's whole-second clock lags
  if exptime <= 0 then                   -- already over: nothing to keep
    del(self, k)
    return true
  end
  local v = encode_mark(until_, outbox_id)
  local j = journal(self)
  local looked = j and j.looked[k]
  if outbox_id == nil or looked == nil then
    local ok, err = put(self, k, v, exptime)
    if not ok then return nil, err end
  elseif looked == false then
    -- free when we looked: whoever adds first holds it
    local ok, err = dict:safe_add(k, v, exptime)
    if not ok then
      if err == "exists" then
        return nil, failure(self, "mark " .. key .. " was taken by another worker", true)
      end
      return nil, failure(self, "cannot write to the shared dict: " .. tostring(err), false)
    end
    added(self, k)
  else
    -- it held an old mark: compare and set under a short lock
    local lock = k .. "\0lock"
    if not dict:safe_add(lock, true, 1) then
      return nil, failure(self, "mark " .. key .. " is being written by another worker", true)
    end
    local current, ok, err = dict:get(k), nil, nil
    if current ~= nil and current ~= looked then
      err = failure(self, "mark " .. key .. " was taken by another worker", true)
    else
      ok, err = put(self, k, v, exptime)
    end
    dict:delete(lock)
    if not ok then return nil, err end
  end
  if outbox_id ~= nil then
    local ok, err = add_reservation(self, outbox_id, k, exptime)
    if not ok then return nil, err end
  end
  return true
end

function Backend:put_marks(list, n)
  for i = 1, n do
    local r = list[i]
    local ok, err = put_mark(self, r.key, r["until"], r.outbox_id)
    if not ok then return nil, err end
  end
  return true
end

function Backend:settle_marks(ids, n, keep)
  local count = 0
  for i = 1, n do
    local outbox_id = ids[i]
    local keys, rk = reserved_keys(self, outbox_id)
    for _, k in ipairs(keys) do
      local until_, id = decode_mark(self.dict:get(k))
      if until_ and id == outbox_id then
        count = count + 1
        local exptime = until_ - clock() + 1
        if keep and exptime > 0 then
          local ok, err = put(self, k, encode_mark(until_, nil), exptime)
          if not ok then return nil, err end
        else
          del(self, k)
        end
      end
    end
    del(self, rk)
  end
  return count
end

-- Marks expire by themselves (at their until, on the real clock), so nothing needs this.
-- As the contract says, it deletes the marks with until <= now that are still in the
-- dict (a `now` ahead of the real clock finds some) and returns how many; a mark the dict
-- has expired already is not counted. It walks every key of the dict (get_keys, which
-- locks the dict while it lists them): a maintenance call. It also frees the memory of
-- what has expired (flush_expired).
function Backend:purge_marks(now)
  local dict, prefix = self.dict, self.p .. "m:"
  local n, len = 0, #prefix
  for _, k in ipairs(dict:get_keys(0)) do
    if k:sub(1, len) == prefix then
      local until_ = decode_mark(dict:get(k))   -- (nil for a mark's lock: not a string)
      if until_ and until_ <= now then
        del(self, k)
        n = n + 1
      end
    end
  end
  dict:flush_expired()
  return n
end

---------------------------------------------------------------------------------------
-- Unsubscribes
---------------------------------------------------------------------------------------

local function unsubscribe(self, hash, now)
  local k = self.p .. "u:" .. hash
  local ok, err = self.dict:safe_add(k, number_text(now))
  if ok then
    added(self, k)
    local c, cerr = count_by(self, self.p .. "u#", 1)
    if not c then return nil, cerr end
    return true
  end
  if err ~= "exists" then
    return nil, failure(self, "cannot write to the shared dict: " .. tostring(err), false)
  end
  return put(self, k, number_text(now))
end

local function resubscribe(self, hash)
  local dict, k = self.dict, self.p .. "u:" .. hash
  if dict:get(k) == nil then return true end
  -- one worker deletes and counts it (another one at it has the same result)
  local lock = k .. "\0lock"
  if not dict:safe_add(lock, true, 1) then return true end
  local ok, err = true, nil
  if dict:get(k) ~= nil then
    del(self, k)
    ok, err = count_by(self, self.p .. "u#", -1)
  end
  dict:delete(lock)
  if not ok then return nil, err end
  return true
end

function Backend:set_unsubscribed(hashes, n, now)
  for i = 1, n do
    local ok, err
    if now ~= nil then ok, err = unsubscribe(self, hashes[i], now) else ok, err = resubscribe(self, hashes[i]) end
    if not ok then return nil, err end
  end
  return true
end

function Backend:unsubscribed(hashes, n)
  local flags = {}
  for i = 1, n do flags[i] = self.dict:get(self.p .. "u:" .. hashes[i]) ~= nil end
  return flags
end

function Backend:count_unsubscribed()
  local n = self.dict:get(self.p .. "u#") or 0
  return n > 0 and n or 0
end

---------------------------------------------------------------------------------------
-- Outbox
---------------------------------------------------------------------------------------

local ITEM_NUMBERS = { "id", "created_at", "next_at", "attempts", "died_at" }

-- Items are JSON with their numbers as text (cjson keeps only 14 digits).
local function encode_item(it)
  local t = copy(it)
  for _, f in ipairs(ITEM_NUMBERS) do
    if t[f] ~= nil then t[f] = number_text(t[f]) end
  end
  return cjson.encode(t)
end

local function decode_item(raw)
  local t = raw and cjson.decode(raw)
  if type(t) ~= "table" then return nil end
  for _, f in ipairs(ITEM_NUMBERS) do
    if t[f] ~= nil then t[f] = tonumber(t[f]) end
  end
  return t
end

local function item_key(self, id)
  return self.p .. "o:" .. number_text(id)
end

-- The live items, read through the list of ids (which drops ids whose item is gone), and
-- the JSON each was read from (raws[item]).
local function live_items(self)
  local dict, list = self.dict, self.p .. "o@"
  local ids = {}
  for _ = 1, dict:llen(list) or 0 do
    local id = dict:lpop(list)
    if id == nil then break end
    ids[#ids + 1] = id
  end
  local items, raws = {}, {}
  for _, id in ipairs(ids) do
    local raw = dict:get(self.p .. "o:" .. id)
    if raw ~= nil then
      dict:rpush(list, id)   -- back at once: the list only lives in memory between the two
      local it = decode_item(raw)
      if it then
        items[#items + 1] = it
        raws[it] = raw
      end
    end
  end
  return items, raws
end

-- One item into the outbox. id | nil, err
local function enqueue(self, it)
  local id, err = self.dict:incr(self.p .. "o#", 1, 0)
  if not id then return nil, failure(self, "cannot allocate an outbox id: " .. tostring(err), false) end
  it.id, it.state = id, "queued"
  local ok, perr = put(self, item_key(self, id), encode_item(it))
  if not ok then return nil, perr end
  local len, lerr = self.dict:rpush(self.p .. "o@", number_text(id))
  if not len then
    del(self, item_key(self, id))
    return nil, failure(self, "cannot queue the outbox item: " .. tostring(lerr), false)
  end
  return id
end

function Backend:enqueue(list, n)
  local ids = {}
  for i = 1, n do
    local id, err = enqueue(self, layout_copy(ITEM, list[i]))
    if not id then return nil, err end
    ids[i] = id
  end
  return ids
end

function Backend:lease(now, lease, limit)
  local items, raws = live_items(self)
  local due = lists.select_items(items, "queued", now)
  local out, dict = {}, self.dict
  for _, it in ipairs(due) do
    if #out >= limit then break end
    local k = item_key(self, it.id)
    -- one token per (item, next_at): a second worker that read the same state skips it
    local token = self.p .. "c:" .. number_text(it.id) .. ":" .. number_text(it.next_at)
    if dict:safe_add(token, true, lease > 1 and lease or 1) and dict:get(k) == raws[it] then
      local claimed = copy(it)
      claimed.next_at = now + lease
      local ok, err = put(self, k, encode_item(claimed))
      if not ok then return nil, err end
      out[#out + 1] = claimed
    end
  end
  return out
end

local UPDATE = lists.update_item

function Backend:update_items(op, list, n)
  local change, count = UPDATE[op], 0
  for i = 1, n do
    local r = list[i]
    local key = item_key(self, change and r.id or r)
    local raw = self.dict:get(key)
    local it = change and decode_item(raw)
    if it then
      change(it, r)
      local exptime = op == "kill" and self.dead_ttl or nil   -- a dead item is kept dead_ttl
      local ok, err = put(self, key, encode_item(it), exptime)
      if not ok then return nil, err end
      count = count + 1
    elseif raw ~= nil and not change then
      del(self, key)
      count = count + 1
    end
  end
  return count
end

function Backend:list_items(state, limit)
  return lists.first(lists.select_items((live_items(self)), state), limit)
end

function Backend:count_items()
  return lists.count_items((live_items(self)))
end

---------------------------------------------------------------------------------------
-- Ledger (a ring of the last ledger_size entries)
---------------------------------------------------------------------------------------

local function slot_key(self, seq)
  return self.p .. "l:" .. ((seq - 1) % self.ledger_size + 1)
end

-- One entry into the ring; a full dict drops it.
local function record(self, e)
  local seq = self.dict:incr(self.p .. "l#", 1, 0)
  if not seq then return end
  e.seq = seq
  e.time = number_text(e.time)
  if e.attempts ~= nil then e.attempts = number_text(e.attempts) end
  local k = slot_key(self, seq)
  remember(self, k)
  self.dict:safe_set(k, cjson.encode(e))
end

function Backend:record(list, n)
  for i = 1, n do record(self, layout_copy(ENTRY, list[i])) end
  return true
end

-- Entries still in the ring, oldest first.
local function entries(self)
  local last = self.dict:get(self.p .. "l#") or 0
  local list = {}
  for seq = last - self.ledger_size + 1 > 1 and last - self.ledger_size + 1 or 1, last do
    local e = cjson.decode(self.dict:get(slot_key(self, seq)) or "null")
    if type(e) == "table" and tonumber(e.seq) == seq then
      e.seq, e.time, e.attempts = nil, tonumber(e.time), tonumber(e.attempts)
      list[#list + 1] = e
    end
  end
  return list
end

function Backend:ledger(since, status, limit)
  return lists.ledger(entries(self), since, status, limit)
end

function Backend:tally(since, bucket)
  return lists.tally(entries(self), since, bucket)
end

---------------------------------------------------------------------------------------
-- Retention (the ring and dead_ttl bound both already; purge drops what is older than
-- the caller's window too)
---------------------------------------------------------------------------------------

function Backend:purge(before, limit)
  local dict, n = self.dict, 0
  local last = dict:get(self.p .. "l#") or 0
  local first = last - self.ledger_size + 1
  for seq = first > 1 and first or 1, last do
    if n >= limit then break end
    local k = slot_key(self, seq)
    local e = cjson.decode(dict:get(k) or "null")
    if type(e) == "table" and tonumber(e.seq) == seq and (tonumber(e.time) or before) < before then
      del(self, k)
      n = n + 1
    end
  end
  local dead = 0
  for _, it in ipairs((live_items(self))) do
    if dead >= limit then break end
    if it.state == "dead" and it.died_at and it.died_at < before then
      del(self, item_key(self, it.id))
      dead = dead + 1
    end
  end
  return { ledger = n, dead = dead }
end

---------------------------------------------------------------------------------------
-- Meta and life
---------------------------------------------------------------------------------------

-- (the salt keeps the key it had before it was a meta value: a reload keeps the hashes)
local function meta_key(self, name)
  if name == "salt" then return self.p .. "salt" end
  return self.p .. "meta:" .. name
end

function Backend:get_meta(name)
  return self.dict:get(meta_key(self, name))
end

function Backend:set_meta(name, value, only_if_absent)
  local k = meta_key(self, name)
  if value == nil then
    del(self, k)
    return true
  end
  if only_if_absent then
    local ok, err = self.dict:safe_add(k, value)   -- the first worker's value wins
    if ok then
      added(self, k)
    elseif err ~= "exists" then
      return nil, failure(self, "cannot write to the shared dict: " .. tostring(err), false)
    end
    return true
  end
  return put(self, k, value)
end

function Backend:close()
end

return setmetatable(M, { __call = function(_, ...) return M.new(...) end })
