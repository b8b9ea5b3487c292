-- stella.store.memory: the store interface kept in Lua tables, for one process (tests,
-- one-shot runs). Nothing here fails at run time; misuse raises. store:atomic keeps an undo
-- journal, so a function that raises leaves the store as it was, as with SQLite.
local store = require "stella.store"
local core = require "stella.core"

local U = store._util
local error, getmetatable, pairs, setmetatable, type, sort, pcall =
  error, getmetatable, pairs, setmetatable, type, table.sort, pcall
local pack, unpack = U.pack, U.unpack

local M = {}

local Store = {}
Store.__index = Store

local function check_open(self, method)
  if getmetatable(self) ~= Store then
    error("stella.store: " .. method .. ": called without a store (use store:" .. method .. ")", 3)
  end
  if self.closed then error("stella.store: " .. method .. ": the store is closed", 3) end
end

-- tbl[key] = value, remembering the old value while inside atomic.
local function set(self, tbl, key, value)
  local journal = self.journal
  if journal then
    journal[#journal + 1] = { tbl, key, tbl[key] }
  end
  tbl[key] = value
end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
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
  check_open(self, "hash_email")
  U.check_string(email, "hash_email", "email")
  return core.sha256(self.salt .. U.normalize_email(email))
end

function Store:atomic(fn, ...)
  check_open(self, "atomic")
  U.check_function(fn, "atomic", "fn")
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
  check_open(self, "get_mark")
  U.check_key(key, "get_mark", "key")
  U.check_number(now, "get_mark", "now")
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
  check_open(self, "put_mark")
  U.check_key(key, "put_mark", "key")
  U.check_number(until_, "put_mark", "until")
  U.check_reservation(outbox_id, "put_mark", "outbox_id", true)
  put_mark(self, key, until_, outbox_id)
  return true
end

-- put_mark_many{ { key = k, ["until"] = t, outbox_id = id|nil }, ... } -> true
function Store:put_mark_many(marks)
  check_open(self, "put_mark_many")
  U.check_list(marks, "put_mark_many", "marks")
  local list = {}
  for i = 1, #marks do list[i] = { U.mark_entry(marks[i], "put_mark_many", i) } end
  for i = 1, #list do
    local m = list[i]
    put_mark(self, m[1], m[2], m[3])
  end
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
  check_open(self, "confirm_marks")
  U.check_reservation(outbox_id, "confirm_marks", "outbox_id")
  return settle_marks(self, outbox_id, true)
end

-- confirm_marks_many{ id, ... } -> the number of marks confirmed
function Store:confirm_marks_many(ids)
  check_open(self, "confirm_marks_many")
  U.check_list(ids, "confirm_marks_many", "ids")
  for i = 1, #ids do
    local v = ids[i]
    if not (U.is_integer(v) or (type(v) == "string" and v ~= "")) then
      U.check_reservation(v, "confirm_marks_many", "ids[" .. i .. "]")
    end
  end
  local n = 0
  for i = 1, #ids do n = n + settle_marks(self, ids[i], true) end
  return n
end

function Store:release_marks(outbox_id)
  check_open(self, "release_marks")
  U.check_reservation(outbox_id, "release_marks", "outbox_id")
  return settle_marks(self, outbox_id, false)
end

function Store:purge_marks(now)
  check_open(self, "purge_marks")
  U.check_number(now, "purge_marks", "now")
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
  check_open(self, "unsubscribe")
  U.check_key(hash, "unsubscribe", "hash")
  U.check_number(now, "unsubscribe", "now")
  if self.unsubscribed[hash] == nil then set(self, self, "unsub_count", self.unsub_count + 1) end
  set(self, self.unsubscribed, hash, now)
  return true
end

function Store:resubscribe(hash)
  check_open(self, "resubscribe")
  U.check_key(hash, "resubscribe", "hash")
  if self.unsubscribed[hash] ~= nil then
    set(self, self, "unsub_count", self.unsub_count - 1)
    set(self, self.unsubscribed, hash, nil)
  end
  return true
end

function Store:is_unsubscribed(hash)
  check_open(self, "is_unsubscribed")
  U.check_key(hash, "is_unsubscribed", "hash")
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

function Store:enqueue(item)
  check_open(self, "enqueue")
  local it = U.outbox_item(item)
  local id = self.next_id
  set(self, self, "next_id", id + 1)
  it.id = id
  set(self, self.items, id, it)
  return id
end

-- enqueue_many{ item, ... } -> { id, ... }
function Store:enqueue_many(items)
  check_open(self, "enqueue_many")
  U.check_list(items, "enqueue_many", "items")
  local list = {}
  for i = 1, #items do list[i] = U.outbox_item(items[i], "enqueue_many", "items[" .. i .. "]") end
  local ids = {}
  for i = 1, #list do
    local it, id = list[i], self.next_id
    set(self, self, "next_id", id + 1)
    it.id = id
    set(self, self.items, id, it)
    ids[i] = id
  end
  return ids
end

local function by_next_at(a, b)
  if a.next_at ~= b.next_at then return a.next_at < b.next_at end
  return a.id < b.id
end

local function by_death(a, b)   -- most recent first
  local da, db = a.died_at or 0, b.died_at or 0
  if da ~= db then return da > db end
  return a.id > b.id
end

function Store:claim(now, lease, limit)
  check_open(self, "claim")
  U.check_number(now, "claim", "now")
  U.check_number(lease, "claim", "lease")
  U.check_count(limit, "claim", "limit", true)
  limit = limit or 100
  local due = {}
  for _, it in pairs(self.items) do
    if it.state == "queued" and it.next_at <= now then due[#due + 1] = it end
  end
  sort(due, by_next_at)
  local out = {}
  for i = 1, limit < #due and limit or #due do
    local it = copy(due[i])
    it.next_at = now + lease
    set(self, self.items, it.id, it)
    out[i] = copy(it)
  end
  return out
end

local function update(self, id, changes)
  local it = self.items[id]
  if not it then return false end
  it = copy(it)
  for k, v in pairs(changes) do it[k] = v end
  set(self, self.items, id, it)
  return true
end

function Store:reschedule(id, next_at, attempts, last_error)
  check_open(self, "reschedule")
  U.check_id(id, "reschedule", "id")
  U.check_number(next_at, "reschedule", "next_at")
  U.check_count(attempts, "reschedule", "attempts", true)
  local it = self.items[id]
  if not it then return false end
  it = copy(it)
  it.state, it.next_at, it.died_at = "queued", next_at, nil
  if attempts ~= nil then it.attempts = attempts end
  it.last_error = U.error_text(last_error)
  set(self, self.items, id, it)
  return true
end

function Store:finish(id)
  check_open(self, "finish")
  U.check_id(id, "finish", "id")
  if self.items[id] == nil then return false end
  set(self, self.items, id, nil)
  return true
end

-- finish_many{ id, ... } -> the number of items deleted
function Store:finish_many(ids)
  check_open(self, "finish_many")
  U.check_list(ids, "finish_many", "ids")
  for i = 1, #ids do
    if not U.is_integer(ids[i]) then U.check_id(ids[i], "finish_many", "ids[" .. i .. "]") end
  end
  local n = 0
  for i = 1, #ids do
    if self.items[ids[i]] ~= nil then
      set(self, self.items, ids[i], nil)
      n = n + 1
    end
  end
  return n
end

function Store:kill(id, last_error, now, attempts)
  check_open(self, "kill")
  U.check_id(id, "kill", "id")
  U.check_number(now, "kill", "now")
  U.check_count(attempts, "kill", "attempts", true)
  return update(self, id, { state = "dead", last_error = U.error_text(last_error), died_at = now,
                            attempts = attempts })
end

function Store:outbox(state, limit)
  check_open(self, "outbox")
  U.check_enum(state, U.states, "outbox", "state")
  U.check_count(limit, "outbox", "limit", true)
  limit = limit or 100
  local list = {}
  for _, it in pairs(self.items) do
    if it.state == state then list[#list + 1] = it end
  end
  sort(list, state == "dead" and by_death or by_next_at)
  local out = {}
  for i = 1, limit < #list and limit or #list do out[i] = copy(list[i]) end
  return out
end

function Store:outbox_counts()
  check_open(self, "outbox_counts")
  local counts = { queued = 0, dead = 0 }
  for _, it in pairs(self.items) do counts[it.state] = counts[it.state] + 1 end
  return counts
end

-- Ledger -------------------------------------------------------------------------------

function Store:record(entry)
  check_open(self, "record")
  local e = U.ledger_entry(entry)
  set(self, self.entries, #self.entries + 1, e)
  return true
end

-- record_many{ entry, ... } -> true
function Store:record_many(entries)
  check_open(self, "record_many")
  U.check_list(entries, "record_many", "entries")
  local list = {}
  for i = 1, #entries do list[i] = U.ledger_entry(entries[i], "record_many", "entries[" .. i .. "]") end
  local all = self.entries
  for i = 1, #list do set(self, all, #all + 1, list[i]) end
  return true
end

function Store:ledger(opts)
  check_open(self, "ledger")
  local o = U.query_options(opts, "ledger")
  local list, entries = {}, self.entries
  for i = 1, #entries do
    local e = entries[i]
    if (o.since == nil or e.time >= o.since) and (o.status == nil or e.status == o.status) then
      list[#list + 1] = { i, e }
    end
  end
  sort(list, function(a, b)   -- newest first, then latest recorded first
    if a[2].time ~= b[2].time then return a[2].time > b[2].time end
    return a[1] > b[1]
  end)
  local out = {}
  for i = 1, o.limit < #list and o.limit or #list do out[i] = copy(list[i][2]) end
  return out
end

function Store:counts(opts)
  check_open(self, "counts")
  local o = U.query_options(opts, "counts")
  return U.count_entries(self.entries, o.since)
end

function Store:rate(opts)
  check_open(self, "rate")
  local o = U.query_options(opts, "rate")
  return U.rate_entries(self.entries, o.since, o.bucket)
end

-- Meta ---------------------------------------------------------------------------------

function Store:get_meta(name)
  check_open(self, "get_meta")
  U.check_key(name, "get_meta", "name")
  return self.meta[name]
end

function Store:set_meta(name, value)
  check_open(self, "set_meta")
  U.check_key(name, "set_meta", "name")
  if value ~= nil and type(value) ~= "string" then
    if not U.is_finite(value) then
      error("stella.store: set_meta: value must be a string, a number or nil, got " .. type(value), 2)
    end
    value = U.number_text(value)
  end
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
