-- stella.store.rows: the layout of every row the store keeps, defined once. The base
-- (stella.store) checks rows against these layouts and hands them to the backends as
-- tables (fields by name); SQLite builds its tables, column lists, INSERTs and the binding
-- of rows to them from these layouts; the trigger and the specs name fields as here.
--
-- A layout is a list of fields { name, kind, column = SQL name (default name),
-- sql = SQL type and constraints }, with layout.width (its number of fields),
-- layout.index[name] (a field's position) and layout.name (how an element is named in
-- messages). The kinds (what a value must be, and what the store keeps):
--   text      a string or nil; a finite number is kept as its text
--   any_text  nil or a string; anything else is kept as tostring(v)
--   bytes     a string (any bytes)
--   time      a finite number (seconds since the epoch)
--   count     a non-negative integer, or nil (layouts may give a default)
--   key       a non-empty string
--   owner     an outbox id a mark is reserved for: an integer, a non-empty string, or nil
--   one of    a string from the field's `values` set
local M = {}

-- The ledger statuses; those counted by rate(); the outbox item kinds and states.
M.statuses = {
  sent = true, recorded = true, skipped = true, suppressed = true,
  invalid = true, failed = true, queued = true,
}
M.status_list = "sent, recorded, skipped, suppressed, invalid, failed, queued"   -- (messages)
M.rate_total = { sent = true, recorded = true, failed = true, invalid = true, queued = true }
M.kinds = { request = true, recovery = true }
M.states = { queued = true, dead = true }

-- The rate-error rule, the only one: a ledger entry counts as an error in rate() when
-- it failed, was invalid, or was queued after a failed send (an outage that queues
-- everything must show; a request merely deferred to a later flush, reason "deferred",
-- or scheduled for later, reason "scheduled", is no error). Backends never apply it: they tally entries by status and reason.
function M.is_rate_error(status, reason)
  return status == "failed" or status == "invalid"
      or (status == "queued" and reason ~= "deferred" and reason ~= "scheduled")
end

-- Whether an entry counts in rate()'s total: a request queued to go later (reason
-- "scheduled": the rules' delay or quiet hours) is no attempt; its send is counted then.
function M.is_rate_counted(status, reason)
  return M.rate_total[status] == true and not (status == "queued" and reason == "scheduled")
end

local function layout(name, fields)
  local index = {}
  for i, f in ipairs(fields) do
    f.name, f.kind, f.column = f[1], f[2], f.column or f[1]
    index[f.name] = i
  end
  fields.name, fields.width, fields.index = name, #fields, index
  return fields
end
M.layout = layout

-- An outbox item as enqueue takes it. next_at defaults to created_at, attempts to 0.
-- Stored items also have id, state ("queued" or "dead"), last_error and died_at
-- (M.stored_item).
M.item = layout("item", {
  { "kind", "one of", values = M.kinds, sql = "TEXT NOT NULL" },
  { "body", "bytes", sql = "BLOB NOT NULL" },
  { "brand", "text", sql = "TEXT" },
  { "event_id", "text", sql = "TEXT" },
  { "interaction_id", "text", sql = "TEXT" },
  { "customer_hash", "text", sql = "TEXT" },
  { "created_at", "time", sql = "NUMERIC NOT NULL" },
  { "next_at", "time", default = "created_at", sql = "NUMERIC NOT NULL" },
  { "attempts", "count", default = 0, sql = "INTEGER NOT NULL DEFAULT 0" },
})

-- The fields an item read back from the store may have, in the SQLite column order.
M.stored_item = layout("item", {
  { "id", "count", sql = "INTEGER PRIMARY KEY AUTOINCREMENT" },
  M.item[1], M.item[2], M.item[3], M.item[4], M.item[5], M.item[6], M.item[7], M.item[8], M.item[9],
  { "state", "one of", values = M.states, sql = "TEXT NOT NULL DEFAULT 'queued'" },
  { "last_error", "any_text", sql = "TEXT" },
  { "died_at", "time", sql = "NUMERIC" },
})

-- A ledger entry: one processed event (or flushed item) and what became of it.
M.entry = layout("entry", {
  { "time", "time", sql = "NUMERIC NOT NULL" },
  { "status", "one of", values = M.statuses, sql = "TEXT NOT NULL" },
  { "reason", "text", sql = "TEXT" },
  { "event_id", "text", sql = "TEXT" },
  { "interaction_id", "text", sql = "TEXT" },
  { "brand", "text", sql = "TEXT" },
  { "channel", "text", sql = "TEXT" },
  { "detail", "any_text", sql = "TEXT" },
  { "request_id", "text", sql = "TEXT" },
  { "error_kind", "text", sql = "TEXT" },
  { "error_message", "any_text", sql = "TEXT" },
  { "customer_hash", "text", sql = "TEXT" },
  { "attempts", "count", sql = "INTEGER" },
})

-- A suppression / dedupe mark: active while until > now; reserved by an outbox item
-- (outbox_id) until that item is settled (confirmed: kept, unreserved; released: deleted).
M.mark = layout("marks[]", {
  { "key", "key", sql = "TEXT PRIMARY KEY NOT NULL" },
  { "until", "time", column = "until_at", sql = "NUMERIC NOT NULL" },
  { "outbox_id", "owner", sql = "" },   -- (no affinity: integers and strings both)
})

-- The changes of update_items, one row per item: requeue (reschedule) and kill.
M.requeue = layout("requeue", {
  { "id", "count" }, { "next_at", "time" }, { "attempts", "count" }, { "last_error", "any_text" },
})
M.kill = layout("kill", {
  { "id", "count" }, { "last_error", "any_text" }, { "died_at", "time" }, { "attempts", "count" },
})

-- The field names of a layout joined by ", " (SQL column lists).
function M.columns(l, first, last)
  local names = {}
  for j = first or 1, last or l.width do names[#names + 1] = l[j].column end
  return table.concat(names, ", ")
end

return M
