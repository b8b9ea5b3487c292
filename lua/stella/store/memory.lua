-- stella.store.memory: the store backend in Lua tables, for one process (tests, one-shot
-- runs). Nothing here fails at run time. A transaction keeps a journal of the old values
-- it changed, so a rollback leaves the store as it was, as with SQLite. The primitives are
-- those of the contract in stella.store (lua/stella/store/init.lua).
local store = require "stella.store"
local rows = require "stella.store.rows"
local lists = require "stella.store.lists"

local pairs, setmetatable = pairs, setmetatable
local copy, layout_copy = lists.copy, lists.layout_copy

local ITEM, ENTRY = rows.item, rows.entry

local M = {}

local Backend = {}
Backend.__index = Backend
Backend.name = "stella.store.memory"

-- stella.store.memory() -> store
function M.new()
  return store.open(setmetatable({
    marks = {},        -- key -> { until = t, outbox_id = id|nil }
    reserved = {},     -- outbox_id -> { key = true }: the marks a reservation holds
    unsubs = {},       -- hash -> time of unsubscribing
    unsub_count = 0,
    items = {},        -- id -> item
    next_id = 1,
    entries = {},      -- ledger, in insertion order
    meta = {},
    journal = nil,     -- while a transaction is open
  }, Backend))
end

local function restore(tbl, key, old)
  tbl[key] = old
end

-- tbl[key] = value, journalled inside a transaction.
local function set(self, tbl, key, value)
  local j = self.journal
  if j then j:note(restore, tbl, key, tbl[key]) end
  tbl[key] = value
end

function Backend:begin()
  self.journal = lists.journal()
  return true
end

function Backend:commit()
  self.journal = nil
  return true
end

function Backend:rollback()
  local j = self.journal
  self.journal = nil
  if j then j:undo() end
end

-- Marks --------------------------------------------------------------------------------

function Backend:read_marks(keys, n, now)
  local marks, untils, owners = self.marks, {}, {}
  for i = 1, n do
    local mark = marks[keys[i]]
    if mark and mark["until"] > now then untils[i], owners[i] = mark["until"], mark.outbox_id end
  end
  return untils, owners
end

function Backend:put_marks(list, n)
  local marks, reserved = self.marks, self.reserved
  for i = 1, n do
    local r = list[i]
    local key, until_, outbox_id = r.key, r["until"], r.outbox_id
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
  return true
end

function Backend:settle_marks(ids, n, keep)
  local marks, reserved, count = self.marks, self.reserved, 0
  for i = 1, n do
    local id = ids[i]
    local keys = reserved[id]
    if keys then
      for key in pairs(keys) do
        local mark = marks[key]
        if mark and mark.outbox_id == id then
          set(self, marks, key, keep and { ["until"] = mark["until"] } or nil)
          count = count + 1
        end
      end
      set(self, reserved, id, nil)
    end
  end
  return count
end

function Backend:purge_marks(now)
  local n, marks, reserved = 0, self.marks, self.reserved
  for key, mark in pairs(marks) do
    if mark["until"] <= now then
      set(self, marks, key, nil)   -- clearing a field while iterating is allowed
      local keys = mark.outbox_id ~= nil and reserved[mark.outbox_id]
      if keys then set(self, keys, key, nil) end
      n = n + 1
    end
  end
  return n
end

-- Unsubscribes -------------------------------------------------------------------------

function Backend:set_unsubscribed(hashes, n, now)
  local unsub = self.unsubs
  for i = 1, n do
    local h = hashes[i]
    if now ~= nil then
      if unsub[h] == nil then set(self, self, "unsub_count", self.unsub_count + 1) end
      set(self, unsub, h, now)
    elseif unsub[h] ~= nil then
      set(self, self, "unsub_count", self.unsub_count - 1)
      set(self, unsub, h, nil)
    end
  end
  return true
end

function Backend:unsubscribed(hashes, n)
  local flags = {}
  for i = 1, n do flags[i] = self.unsubs[hashes[i]] ~= nil end
  return flags
end

function Backend:count_unsubscribed()
  return self.unsub_count
end

-- Outbox -------------------------------------------------------------------------------

function Backend:enqueue(list, n)
  local ids = {}
  for i = 1, n do
    local it = layout_copy(ITEM, list[i])
    it.state = "queued"
    local id = self.next_id
    set(self, self, "next_id", id + 1)
    it.id = id
    set(self, self.items, id, it)
    ids[i] = id
  end
  return ids
end

-- The items as an array.
local function all_items(self)
  local list = {}
  for _, it in pairs(self.items) do list[#list + 1] = it end
  return list
end

function Backend:lease(now, lease, limit)
  local due = lists.select_items(all_items(self), "queued", now)
  local out = {}
  for i = 1, limit < #due and limit or #due do
    local it = copy(due[i])
    it.next_at = now + lease
    set(self, self.items, it.id, it)
    out[i] = copy(it)
  end
  return out
end

-- The changes of update_items, on a copy of the item (the journal keeps the old one).
local UPDATE = lists.update_item

function Backend:update_items(op, list, n)
  local items, change, count = self.items, UPDATE[op], 0
  for i = 1, n do
    local r = list[i]
    local id = change and r.id or r
    local it = items[id]
    if it then
      count = count + 1
      if change then
        it = copy(it)
        change(it, r)
        set(self, items, id, it)
      else
        set(self, items, id, nil)
      end
    end
  end
  return count
end

function Backend:list_items(state, limit)
  return lists.first(lists.select_items(all_items(self), state), limit)
end

function Backend:count_items()
  return lists.count_items(all_items(self))
end

-- Ledger -------------------------------------------------------------------------------

function Backend:record(list, n)
  local all = self.entries
  for i = 1, n do set(self, all, #all + 1, layout_copy(ENTRY, list[i])) end
  return true
end

function Backend:ledger(since, status, limit)
  return lists.ledger(self.entries, since, status, limit)
end

function Backend:tally(since, bucket)
  return lists.tally(self.entries, since, bucket)
end

-- Retention ----------------------------------------------------------------------------

function Backend:purge(before, limit)
  local items, dead = self.items, 0
  for id, it in pairs(items) do
    if dead >= limit then break end
    if it.state == "dead" and it.died_at < before then
      set(self, items, id, nil)   -- clearing a field while iterating is allowed
      dead = dead + 1
    end
  end
  -- the ledger is a list in the order of recording: the kept entries make a new one (the
  -- journal puts the old list back)
  local entries, kept, n = self.entries, {}, 0
  for i = 1, #entries do
    local e = entries[i]
    if n < limit and e.time < before then n = n + 1 else kept[#kept + 1] = e end
  end
  if n > 0 then set(self, self, "entries", kept) end
  return { ledger = n, dead = dead }
end

-- Meta and life ------------------------------------------------------------------------

function Backend:get_meta(name)
  return self.meta[name]
end

function Backend:set_meta(name, value, only_if_absent)
  if not (only_if_absent and self.meta[name] ~= nil) then set(self, self.meta, name, value) end
  return true
end

function Backend:close()
end

M.Backend = Backend
return M
