-- stella.store.shdict: the store interface on an nginx shared dictionary (lua_shared_dict),
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
--   salt                 the e-mail hashing salt, the same for every worker (added once)
--   m:KEY                a suppression / dedupe mark "UNTIL|[n|s]OUTBOX_ID", expiring with
--                        the dict's exptime at UNTIL (+1 s), so nothing needs purging
--   r:[n|s]OUTBOX_ID     the keys of the marks an outbox item reserves
--   u:HASH, u#           unsubscribes (never expire) and their count
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
-- Across workers: atomic(fn) runs fn with an undo journal (per coroutine), so an error
-- or a failed write inside it rolls back this worker's changes, but it locks nothing:
-- nginx workers run truly in parallel. Where a race matters the store uses the dict's
-- own atomic operations:
--   * a mark reserved for an outbox item (put_mark with an outbox_id) is written with
--     safe_add when the key was free at get_mark, and with a short add-based lock and a
--     compare when it held an old mark. If another worker wrote the mark after this one
--     looked at it, put_mark fails and atomic returns nil, err (retryable), with
--     everything rolled back: the other worker sends, this event is not sent twice.
--   * ids come from incr; unsubscribe uses safe_add; claim takes a token with safe_add,
--     so two workers never claim the same item at once.
-- stella.trigger then decides the losing batch again (it sees the winner's mark: the
-- event comes out suppressed or duplicate): the winner's request is the customer's one.
-- The counters (unsubscribed_count) and the ledger are approximate under concurrent
-- writers. fn must not rely on another coroutine's uncommitted writes.
--
-- Every method of the store interface is here, the batch ones (put_mark_many,
-- confirm_marks_many, enqueue_many, finish_many, record_many) included. purge_marks has
-- nothing to do (marks expire by themselves): it frees expired items and counts them.
local store = require "stella.store"
local core = require "stella.core"
local cjson = require "cjson.safe"

local U = store._util
local ngx = rawget(_G, "ngx")
local error, ipairs, pairs, setmetatable, tonumber, tostring, type, pcall =
      error, ipairs, pairs, setmetatable, tonumber, tostring, type, pcall
local running = coroutine.running
local pack, unpack, copy = U.pack, U.unpack, U.copy
local number_text = U.number_text

local clock = ngx and ngx.now or os.time

local M = {}

local Store = {}
Store.__index = Store
M.Store = Store

local check_open, check = U.guards(Store)

local MAIN = {}   -- journal key outside any coroutine (LuaJIT's running() gives nil there)

---------------------------------------------------------------------------------------
-- Journal and writes
---------------------------------------------------------------------------------------

local function journal(self)
  return self.journals[running() or MAIN]
end

-- Remembers key k's value and remaining life before its first change in a transaction.
local function remember(self, k)
  local j = journal(self)
  if not j or j.seen[k] then return end
  j.seen[k] = true
  local v = self.dict:get(k)
  local ttl = v ~= nil and self.dict:ttl(k) or nil
  j[#j + 1] = { k, v, ttl }
end

-- A run-time failure; inside atomic it also makes the transaction roll back.
local function failure(self, message, retryable)
  local err = store.error(self.name .. ": " .. message, retryable)
  local j = journal(self)
  if j and not j.failed then j.failed = err end
  return err
end

-- After a successful add: the key held nothing before (rollback deletes it). Not
-- remembered before the add, which could then undo another worker's value.
local function added(self, k)
  local j = journal(self)
  if not j or j.seen[k] then return end
  j.seen[k] = true
  j[#j + 1] = { k }
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

local function rollback(self, j)
  local dict = self.dict
  for i = #j, 1, -1 do
    local e = j[i]
    if e[2] == nil then
      dict:delete(e[1])
    else
      local ttl = e[3]
      if ttl and ttl < 0 then ttl = 0.001 end
      dict:set(e[1], e[2], ttl or 0)
    end
  end
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
  if not U.is_integer(ledger_size) or ledger_size < 1 then
    error("stella.store.shdict: opts.ledger_size must be a whole number >= 1", 2)
  end
  local dead_ttl = opts.dead_ttl or 7 * 86400
  if not U.is_finite(dead_ttl) or dead_ttl <= 0 then
    error("stella.store.shdict: opts.dead_ttl must be a positive number of seconds", 2)
  end

  local salt_key = prefix .. "salt"
  local salt = dict:get(salt_key)
  if salt == nil then
    local fresh, serr = U.new_salt()
    if not fresh then return nil, serr end
    local ok, err = dict:safe_add(salt_key, fresh)   -- the first worker's salt wins
    if not ok and err ~= "exists" then
      return nil, store.error(name .. ": cannot store the salt: " .. tostring(err), false)
    end
    salt = dict:get(salt_key)
  end
  if type(salt) ~= "string" or #salt < 32 then
    return nil, store.error(name .. ": cannot read the salt", false)
  end
  return setmetatable({
    dict = dict, name = name, p = prefix, salt = salt,
    ledger_size = ledger_size, dead_ttl = dead_ttl,
    journals = setmetatable({}, { __mode = "k" }),
    closed = false,
  }, Store)
end

function Store:hash_email(email)
  check(self, "hash_email", email)
  return core.sha256(self.salt .. U.normalize_email(email))
end

-- atomic(fn, ...): fn's results, or nil, err when a write inside failed (rolled back);
-- an error raised by fn rolls back and is raised again.
function Store:atomic(fn, ...)
  check(self, "atomic", fn)
  local key = running() or MAIN
  if self.journals[key] then return fn(...) end   -- nested: part of the outer transaction
  local j = { seen = {}, looked = {} }
  self.journals[key] = j
  local res = pack(pcall(fn, ...))
  self.journals[key] = nil
  if not res[1] then
    rollback(self, j)
    error(res[2], 0)
  end
  if j.failed then
    rollback(self, j)
    return nil, j.failed
  end
  return unpack(res, 2, res.n)
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

function Store:get_mark(key, now)
  check(self, "get_mark", key, now)
  local k = self.p .. "m:" .. key
  local v = self.dict:get(k)
  local j = journal(self)
  if j and j.looked[k] == nil then j.looked[k] = v or false end
  local until_, outbox_id = decode_mark(v)
  if until_ and until_ > now then return until_, outbox_id end
  return nil
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

-- One mark, checked by the caller. true | nil, err
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

function Store:put_mark(key, until_, outbox_id)
  check(self, "put_mark", key, until_, outbox_id)
  return put_mark(self, key, until_, outbox_id)
end

-- put_mark_many{ { key = k, ["until"] = t, outbox_id = id|nil }, ... } -> true | nil, err
function Store:put_mark_many(marks)
  check_open(self, "put_mark_many")
  local v, n = U.mark_values(marks)
  for k = 0, 3 * n - 1, 3 do
    local ok, err = put_mark(self, v[k + 1], v[k + 2], v[k + 3])
    if not ok then return nil, err end
  end
  return true
end

local function settle_marks(self, outbox_id, confirm)
  local keys, rk = reserved_keys(self, outbox_id)
  local n = 0
  for _, k in ipairs(keys) do
    local until_, id = decode_mark(self.dict:get(k))
    if until_ and id == outbox_id then
      n = n + 1
      local exptime = until_ - clock() + 1
      if confirm and exptime > 0 then
        local ok, err = put(self, k, encode_mark(until_, nil), exptime)
        if not ok then return nil, err end
      else
        del(self, k)
      end
    end
  end
  del(self, rk)
  return n
end

function Store:confirm_marks(outbox_id)
  check(self, "confirm_marks", outbox_id)
  return settle_marks(self, outbox_id, true)
end

-- confirm_marks_many{ id, ... } -> the number of marks confirmed
function Store:confirm_marks_many(ids)
  check_open(self, "confirm_marks_many")
  local n = 0
  for i = 1, U.check_ids(ids, "confirm_marks_many", true) do
    local c, err = settle_marks(self, ids[i], true)
    if not c then return nil, err end
    n = n + c
  end
  return n
end

function Store:release_marks(outbox_id)
  check(self, "release_marks", outbox_id)
  return settle_marks(self, outbox_id, false)
end

-- Marks expire by themselves; this frees the memory of everything expired in the dict
-- now and returns how many items that was.
function Store:purge_marks(now)
  check(self, "purge_marks", now)
  return self.dict:flush_expired()
end

---------------------------------------------------------------------------------------
-- Unsubscribes
---------------------------------------------------------------------------------------

local function count_by(self, k, delta)
  remember(self, k)
  local v, err = self.dict:incr(k, delta, 0)
  if not v then return nil, failure(self, "cannot count: " .. tostring(err), false) end
  return v
end

function Store:unsubscribe(hash, now)
  check(self, "unsubscribe", hash, now)
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

function Store:resubscribe(hash)
  check(self, "resubscribe", hash)
  local k = self.p .. "u:" .. hash
  if self.dict:get(k) ~= nil then
    del(self, k)
    local c, err = count_by(self, self.p .. "u#", -1)
    if not c then return nil, err end
  end
  return true
end

function Store:is_unsubscribed(hash)
  check(self, "is_unsubscribed", hash)
  return self.dict:get(self.p .. "u:" .. hash) ~= nil
end

function Store:unsubscribed_count()
  check_open(self, "unsubscribed_count")
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

-- One checked item into the outbox. id | nil, err
local function enqueue(self, it)
  local id, err = self.dict:incr(self.p .. "o#", 1, 0)
  if not id then return nil, failure(self, "cannot allocate an outbox id: " .. tostring(err), false) end
  it.id = id
  local ok, perr = put(self, item_key(self, id), encode_item(it))
  if not ok then return nil, perr end
  local len, lerr = self.dict:rpush(self.p .. "o@", number_text(id))
  if not len then
    del(self, item_key(self, id))
    return nil, failure(self, "cannot queue the outbox item: " .. tostring(lerr), false)
  end
  return id
end

function Store:enqueue(item)
  local it = check(self, "enqueue", item)
  return enqueue(self, it)
end

-- enqueue_many{ item, ... } -> { id, ... } | nil, err
function Store:enqueue_many(items)
  check_open(self, "enqueue_many")
  local list, ids = U.outbox_items(items), {}
  for i = 1, #list do
    local id, err = enqueue(self, list[i])
    if not id then return nil, err end
    ids[i] = id
  end
  return ids
end

function Store:claim(now, lease, limit)
  now, lease, limit = check(self, "claim", now, lease, limit)
  local items, raws = live_items(self)
  local due = U.select_items(items, "queued", now)
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

local function update(self, id, changes, exptime)
  local k = item_key(self, id)
  local it = decode_item(self.dict:get(k))
  if not it then return false end
  for f, v in pairs(changes) do it[f] = v end
  if changes.died_at == nil then it.died_at = nil end
  local ok, err = put(self, k, encode_item(it), exptime)
  if not ok then return nil, err end
  return true
end

function Store:reschedule(id, next_at, attempts, last_error)
  id, next_at, attempts, last_error = check(self, "reschedule", id, next_at, attempts, last_error)
  local it = decode_item(self.dict:get(item_key(self, id)))
  if not it then return false end
  return update(self, id, { state = "queued", next_at = next_at, attempts = attempts or it.attempts,
                            last_error = last_error })
end

function Store:finish(id)
  check(self, "finish", id)
  local k = item_key(self, id)
  if self.dict:get(k) == nil then return false end
  del(self, k)
  return true
end

-- finish_many{ id, ... } -> the number of items deleted
function Store:finish_many(ids)
  check_open(self, "finish_many")
  local n = 0
  for i = 1, U.check_ids(ids, "finish_many") do
    local k = item_key(self, ids[i])
    if self.dict:get(k) ~= nil then
      del(self, k)
      n = n + 1
    end
  end
  return n
end

function Store:kill(id, last_error, now, attempts)
  id, last_error, now, attempts = check(self, "kill", id, last_error, now, attempts)
  return update(self, id, { state = "dead", last_error = last_error, died_at = now,
                            attempts = attempts }, self.dead_ttl)
end

function Store:outbox(state, limit)
  state, limit = check(self, "outbox", state, limit)
  return U.first(U.select_items((live_items(self)), state), limit)
end

function Store:outbox_counts()
  check_open(self, "outbox_counts")
  return U.outbox_counts((live_items(self)))
end

---------------------------------------------------------------------------------------
-- Ledger (a ring of the last ledger_size entries)
---------------------------------------------------------------------------------------

local function slot_key(self, seq)
  return self.p .. "l:" .. ((seq - 1) % self.ledger_size + 1)
end

-- One checked entry into the ring; a full dict drops it.
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

function Store:record(entry)
  local e = check(self, "record", entry)
  record(self, e)
  return true
end

-- record_many{ entry, ... } -> true
function Store:record_many(entries)
  check_open(self, "record_many")
  local list = U.ledger_entries(entries)
  for i = 1, #list do record(self, list[i]) end
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

function Store:ledger(opts)
  local o = check(self, "ledger", opts)
  return U.ledger_list(entries(self), o)
end

function Store:counts(opts)
  local o = check(self, "counts", opts)
  return U.count_entries(entries(self), o.since)
end

function Store:rate(opts)
  local o = check(self, "rate", opts)
  return U.rate_entries(entries(self), o.since, o.bucket)
end

---------------------------------------------------------------------------------------
-- Meta and life
---------------------------------------------------------------------------------------

function Store:get_meta(name)
  check(self, "get_meta", name)
  return self.dict:get(self.p .. "meta:" .. name)
end

function Store:set_meta(name, value)
  name, value = check(self, "set_meta", name, value)
  local k = self.p .. "meta:" .. name
  if value == nil then
    del(self, k)
    return true
  end
  return put(self, k, value)
end

function Store:close()
  self.closed = true
  return true
end

Store.__tostring = function(self)
  return "stella.store.shdict (" .. self.name .. ")" .. (self.closed and " (closed)" or "")
end

return setmetatable(M, { __call = function(_, ...) return M.new(...) end })
