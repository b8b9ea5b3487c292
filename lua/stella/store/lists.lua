-- stella.store.lists: what the backends that keep their rows as Lua tables (memory,
-- shdict) share: the journal their transactions undo, and the contract's queries over
-- lists of items and ledger entries. (SQLite does the same in SQL.)
local pairs, setmetatable, sort, floor = pairs, setmetatable, table.sort, math.floor

local M = {}

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end
M.copy = copy

-- A copy of row t with the fields of layout l (stella.store.rows) only.
function M.layout_copy(l, t)
  local c = {}
  for j = 1, l.width do
    local name = l[j].name
    c[name] = t[name]
  end
  return c
end

-- The changes of update_items to an item (a copy the backend keeps), by op: r is the
-- row (stella.store.rows.requeue or .kill).
M.update_item = {
  requeue = function(it, r)
    it.state, it.next_at, it.died_at, it.last_error = "queued", r.next_at, nil, r.last_error
    if r.attempts ~= nil then it.attempts = r.attempts end
  end,
  kill = function(it, r)
    it.state, it.died_at = "dead", r.died_at
    if r.last_error ~= nil then it.last_error = r.last_error end   -- (nil keeps the last one)
    if r.attempts ~= nil then it.attempts = r.attempts end
  end,
}

-- Journals ----------------------------------------------------------------------------
-- A journal is a list of undo steps: journal:note(undo, a, b, c, d) remembers that
-- undo(a, b, c, d) puts back what the next change alters; journal:undo() runs the steps,
-- last first. A backend's begin makes one, its writes note their changes while one is
-- open, commit drops it and rollback undoes it.
local Journal = {}
Journal.__index = Journal

function M.journal()
  return setmetatable({ n = 0 }, Journal)
end

function Journal:note(undo, a, b, c, d)
  local n = self.n + 1
  self[n], self.n = { undo, a, b, c, d }, n
end

function Journal:undo()
  for i = self.n, 1, -1 do
    local s = self[i]
    s[1](s[2], s[3], s[4], s[5])
  end
  self.n = 0
end

-- Items -------------------------------------------------------------------------------

local function by_next_at(a, b)
  if a.next_at ~= b.next_at then return a.next_at < b.next_at end
  return a.id < b.id
end

local function by_death(a, b)   -- most recent first
  local da, db = a.died_at or 0, b.died_at or 0
  if da ~= db then return da > db end
  return a.id > b.id
end

-- The items of the array `items` in `state` (and, given `now`, due by then), in the
-- order list_items gives them: the next due first, or the last to die first.
function M.select_items(items, state, now)
  local list = {}
  for i = 1, #items do
    local it = items[i]
    if it.state == state and (now == nil or it.next_at <= now) then list[#list + 1] = it end
  end
  sort(list, state == "dead" and by_death or by_next_at)
  return list
end

-- Copies of the first `limit` tables of list.
function M.first(list, limit)
  local out = {}
  for i = 1, limit < #list and limit or #list do out[i] = copy(list[i]) end
  return out
end

-- count_items over an array of items.
function M.count_items(items)
  local counts = { queued = 0, dead = 0 }
  for i = 1, #items do
    local s = items[i].state
    if counts[s] then counts[s] = counts[s] + 1 end
  end
  return counts
end

-- Ledger ------------------------------------------------------------------------------

-- ledger(since, status, limit) over an array of entries in the order they were recorded.
function M.ledger(entries, since, status, limit)
  local list = {}
  for i = 1, #entries do   -- positions, not entries: the position breaks ties
    local e = entries[i]
    if (since == nil or e.time >= since) and (status == nil or e.status == status) then list[#list + 1] = i end
  end
  sort(list, function(a, b)
    local ta, tb = entries[a].time, entries[b].time
    if ta ~= tb then return ta > tb end
    return a > b
  end)
  local out = {}
  for i = 1, limit < #list and limit or #list do out[i] = copy(entries[list[i]]) end
  return out
end

-- tally(since, bucket) over an array of entries.
function M.tally(entries, since, bucket)
  local by_start, out = {}, {}
  for i = 1, #entries do
    local e = entries[i]
    if since == nil or e.time >= since then
      local start = bucket and floor(e.time / bucket) * bucket
      local groups = by_start[start or out]
      if not groups then
        groups = {}
        by_start[start or out] = groups
      end
      local k = e.status .. "\0" .. (e.reason and ("+" .. e.reason) or "-")
      local g = groups[k]
      if not g then
        g = { start = start, status = e.status, reason = e.reason, count = 0 }
        groups[k] = g
        out[#out + 1] = g
      end
      g.count = g.count + 1
    end
  end
  return out
end

return M
