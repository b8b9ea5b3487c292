-- stella.store.memory: the store interface kept in Lua tables, for one process (tests,
-- one-shot runs). Nothing here fails at run time; misuse raises. store:atomic keeps an undo
-- journal, so a function that raises leaves the store as it was, as with SQLite.
local store = require "stella.store"
local core = require "stella.core"

local U = store._util
local error, pairs, setmetatable, pcall = error, pairs, setmetatable, pcall
local pack, unpack, copy = U.pack, U.unpack, U.copy

local M = {}

local Store = {}
Store.__index = Store

local check_open, check = U.guards(Store)

-- tbl[key] = value, remembering the old value while inside atomic.
local function set(self, tbl, key, value)
  local journal = self.journal
  if journal then
    journal[#journal + 1] = { tbl, key, tbl[key] }
  end
  tbl[key] = value
end

function M.new()
  local salt, err = U.new_salt()
  if not salt then return nil, err end
  return setmetatable({
    salt = salt,
    marks = {},        -- key -> { until = t, outbox_id = id|nil }
    reserved = {},     -- outbox_id -> { key = true }: the marks a reservation holds
    unsubscribed = {}, -- hash -> time
    unsub_count = 0,
    items = {},        -- id -> item
    next_id = 1,
    entries = {},      -- ledger, in insertion order (seq = index)
    meta = {},
    closed = false,
  }, Store)
end

function Store:hash_email(email)
  check(self, "hash_email", email)
  return core.sha256(self.salt .. U.normalize_email(email))
end

function Store:atomic(fn, ...)
  check(self, "atomic", fn)
  if self.journal then return fn(...) end   -- nested: part of the outer transaction
  self.journal = {}
  local res = pack(pcall(fn, ...))
  local journal = self.journal
  self.journal = nil
  if not res[1] then
    for i = #journal, 1, -1 do
      local j = journal[i]
      j[1][j[2]] = j[3]
    end
    error(res[2], 0)
  end
  return unpack(res, 2, res.n)
end

-- Marks --------------------------------------------------------------------------------

function Store:get_mark(key, now)
  check(self, "get_mark", key, now)
  local mark = self.marks[key]
  if mark and mark["until"] > now then return mark["until"], mark.outbox_id end
  return nil
end

local function put_mark(self, key, until_, outbox_id)
  local marks, reserved = self.marks, self.reserved
  local old = marks[key]
  local held = old and old.outbox_id ~= nil and reserved[old.outbox_id]
  if held then set(self, held, key, nil) end
  set(self, marks, key, { ["until"] = until_, outbox_id = outbox_id })
  if outbox_id ~= nil then
    local keys = reserved[outbox_id]
    if not keys then
      keys = {}
      set(self, reserved, outbox_id, keys)
    end
    set(self, keys, key, true)
  end
end

function Store:put_mark(key, until_, outbox_id)
  check(self, "put_mark", key, until_, outbox_id)
  put_mark(self, key, until_, outbox_id)
  return true
end

-- put_mark_many{ { key = k, ["until"] = t, outbox_id = id|nil }, ... } -> true
function Store:put_mark_many(marks)
  check_open(self, "put_mark_many")
  local v, n = U.mark_values(marks)
  for k = 0, 3 * n - 1, 3 do put_mark(self, v[k + 1], v[k + 2], v[k + 3]) end
  return true
end

-- The marks reserved for outbox_id: confirmed (keep = true) or deleted. Their number.
local function settle_marks(self, outbox_id, keep)
  local keys = self.reserved[outbox_id]
  if not keys then return 0 end
  local marks, n = self.marks, 0
  for key in pairs(keys) do
    local mark = marks[key]
    if mark and mark.outbox_id == outbox_id then
      set(self, marks, key, keep and { ["until"] = mark["until"] } or nil)
      n = n + 1
    end
  end
  set(self, self.reserved, outbox_id, nil)
  return n
end

function Store:confirm_marks(outbox_id)
  check(self, "confirm_marks", outbox_id)
  return settle_marks(self, outbox_id, true)
end

-- confirm_marks_many{ id, ... } -> the number of marks confirmed
function Store:confirm_marks_many(ids)
  check_open(self, "confirm_marks_many")
  local count, n = U.check_ids(ids, "confirm_marks_many", true), 0
  for i = 1, count do n = n + settle_marks(self, ids[i], true) end
  return n
end

function Store:release_marks(outbox_id)
  check(self, "release_marks", outbox_id)
  return settle_marks(self, outbox_id, false)
end

function Store:purge_marks(now)
  check(self, "purge_marks", now)
  local n = 0
  local reserved = self.reserved
  for key, mark in pairs(self.marks) do
    if mark["until"] <= now then
      set(self, self.marks, key, nil)   -- clearing a field while iterating is allowed
      local keys = mark.outbox_id ~= nil and reserved[mark.outbox_id]
      if keys then set(self, keys, key, nil) end
      n = n + 1
    end
  end
  return n
end

-- Unsubscribes -------------------------------------------------------------------------

function Store:unsubscribe(hash, now)
  check(self, "unsubscribe", hash, now)
  if self.unsubscribed[hash] == nil then set(self, self, "unsub_count", self.unsub_count + 1) end
  set(self, self.unsubscribed, hash, now)
  return true
end

function Store:resubscribe(hash)
  check(self, "resubscribe", hash)
  if self.unsubscribed[hash] ~= nil then
    set(self, self, "unsub_count", self.unsub_count - 1)
    set(self, self.unsubscribed, hash, nil)
  end
  return true
end

function Store:is_unsubscribed(hash)
  check(self, "is_unsubscribed", hash)
  return self.unsubscribed[hash] ~= nil
end

-- For the trigger (not part of the interface): false when no address is unsubscribed.
function Store:_any_unsubscribes()
  check_open(self, "_any_unsubscribes")
  return self.unsub_count > 0
end

-- For the trigger (not part of the interface): the until of the active mark under key, or nil.
function Store:_mark_until(key, now)
  check_open(self, "_mark_until")
  local mark = self.marks[key]
  if mark and mark["until"] > now then return mark["until"] end
  return nil
end

function Store:unsubscribed_count()
  check_open(self, "unsubscribed_count")
  return self.unsub_count
end

-- Outbox -------------------------------------------------------------------------------

-- One checked item (a new table) into the outbox: its id.
local function enqueue(self, it)
  local id = self.next_id
  set(self, self, "next_id", id + 1)
  it.id = id
  set(self, self.items, id, it)
  return id
end

function Store:enqueue(item)
  local it = check(self, "enqueue", item)
  return enqueue(self, it)
end

-- enqueue_many{ item, ... } -> { id, ... }
function Store:enqueue_many(items)
  check_open(self, "enqueue_many")
  local list, ids = U.outbox_items(items), {}
  for i = 1, #list do ids[i] = enqueue(self, list[i]) end
  return ids
end

-- The items as an array.
local function all_items(self)
  local list = {}
  for _, it in pairs(self.items) do list[#list + 1] = it end
  return list
end

function Store:claim(now, lease, limit)
  now, lease, limit = check(self, "claim", now, lease, limit)
  local due = U.select_items(all_items(self), "queued", now)
  local out = {}
  for i = 1, limit < #due and limit or #due do
    local it = copy(due[i])
    it.next_at = now + lease
    set(self, self.items, it.id, it)
    out[i] = copy(it)
  end
  return out
end

function Store:reschedule(id, next_at, attempts, last_error)
  id, next_at, attempts, last_error = check(self, "reschedule", id, next_at, attempts, last_error)
  local it = self.items[id]
  if not it then return false end
  it = copy(it)
  it.state, it.next_at, it.died_at = "queued", next_at, nil
  if attempts ~= nil then it.attempts = attempts end
  it.last_error = last_error
  set(self, self.items, id, it)
  return true
end

function Store:finish(id)
  check(self, "finish", id)
  if self.items[id] == nil then return false end
  set(self, self.items, id, nil)
  return true
end

-- finish_many{ id, ... } -> the number of items deleted
function Store:finish_many(ids)
  check_open(self, "finish_many")
  local n = 0
  for i = 1, U.check_ids(ids, "finish_many") do
    if self.items[ids[i]] ~= nil then
      set(self, self.items, ids[i], nil)
      n = n + 1
    end
  end
  return n
end

function Store:kill(id, last_error, now, attempts)
  id, last_error, now, attempts = check(self, "kill", id, last_error, now, attempts)
  local it = self.items[id]
  if not it then return false end
  it = copy(it)
  it.state, it.died_at = "dead", now
  if last_error ~= nil then it.last_error = last_error end   -- (nil keeps the last one)
  if attempts ~= nil then it.attempts = attempts end
  set(self, self.items, id, it)
  return true
end

function Store:outbox(state, limit)
  state, limit = check(self, "outbox", state, limit)
  return U.first(U.select_items(all_items(self), state), limit)
end

function Store:outbox_counts()
  check_open(self, "outbox_counts")
  return U.outbox_counts(all_items(self))
end

-- Ledger -------------------------------------------------------------------------------

function Store:record(entry)
  local e = check(self, "record", entry)
  set(self, self.entries, #self.entries + 1, e)
  return true
end

-- record_many{ entry, ... } -> true
function Store:record_many(entries)
  check_open(self, "record_many")
  local list, all = U.ledger_entries(entries), self.entries
  for i = 1, #list do set(self, all, #all + 1, list[i]) end
  return true
end

function Store:ledger(opts)
  local o = check(self, "ledger", opts)
  return U.ledger_list(self.entries, o)
end

function Store:counts(opts)
  local o = check(self, "counts", opts)
  return U.count_entries(self.entries, o.since)
end

function Store:rate(opts)
  local o = check(self, "rate", opts)
  return U.rate_entries(self.entries, o.since, o.bucket)
end

-- Meta ---------------------------------------------------------------------------------

function Store:get_meta(name)
  check(self, "get_meta", name)
  return self.meta[name]
end

function Store:set_meta(name, value)
  name, value = check(self, "set_meta", name, value)
  set(self, self.meta, name, value)
  return true
end

-- Life ---------------------------------------------------------------------------------

function Store:close()
  self.closed = true
  return true
end

Store.__tostring = function(self)
  return "stella.store.memory" .. (self.closed and " (closed)" or "")
end

return M
