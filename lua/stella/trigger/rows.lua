-- stella.trigger.rows: the rows the trigger writes to the store (outbox items, marks,
-- ledger entries), their column order, and the one function that writes a batch of them.
-- Every batch write of the trigger goes through write(); decide.lua and settle.lua fill
-- the flat value lists in these orders.
local type, tostring = type, tostring

local M = {}

-- Column orders, as the stores' *_many methods take them (one table per row) and their
-- _write_values takes them (flat: row after row).
M.ENQUEUE = { "kind", "body", "brand", "event_id", "interaction_id", "customer_hash",
              "created_at", "next_at", "attempts" }
M.MARK = { "key", "until", "outbox_id" }
M.LEDGER = { "time", "status", "reason", "event_id", "interaction_id", "brand", "channel",
             "detail", "request_id", "error_kind", "error_message", "customer_hash", "attempts" }
M.LEDGER_WIDTH = #M.LEDGER

local PUBLIC = {
  enqueue = { "enqueue_many", M.ENQUEUE }, put_mark = { "put_mark_many", M.MARK },
  record = { "record_many", M.LEDGER }, confirm_marks = { "confirm_marks_many" },
  finish = { "finish_many" },
}

function M.is_finite(v) return type(v) == "number" and v - v == 0 end

local function is_text(v) return v == nil or type(v) == "string" end

-- The ledger status of a request that was sent: "recorded" when it asked the service
-- not to e-mail the customer.
function M.sent_status(body)
  -- the body is our own canonical JSON: this byte sequence can only be the field
  return body:find('"do_not_send":true', 1, true) and "recorded" or "sent"
end

-- Appends the 13 values of outcome's ledger entry (M.LEDGER's order) to `values` after
-- its k-th value. Returns false when one of them needs the store's own checks and
-- conversions (a number or table where text goes), true otherwise.
function M.ledger_values(batch, outcome, now, values, k)
  local req = outcome.request
  local channel, hash = nil, outcome.customer_hash
  if type(req) == "table" then
    if type(req.channel) == "string" then channel = req.channel end
    local c = req.customer
    if type(c) == "table" and type(c.email) == "string" then hash = batch.hash(c.email) end
  end
  local err = outcome.error
  local error_kind, error_message
  if err then error_kind, error_message = err.kind, tostring(err) end
  local reason, detail, brand, request_id, attempts =
    outcome.reason, outcome.detail, outcome.brand, outcome.request_id, outcome.attempts
  values[k + 1], values[k + 2], values[k + 3], values[k + 4], values[k + 5], values[k + 6], values[k + 7],
    values[k + 8], values[k + 9], values[k + 10], values[k + 11], values[k + 12], values[k + 13] =
    now, outcome.status, reason, outcome.event_id, outcome.interaction_id, brand, channel, detail,
    request_id, error_kind, error_message, hash, attempts
  return is_text(reason) and is_text(detail) and is_text(brand) and is_text(request_id) and
    is_text(error_kind) and is_text(hash) and is_text(outcome.event_id) and is_text(outcome.interaction_id) and
    (attempts == nil or (type(attempts) == "number" and attempts >= 0 and attempts % 1 == 0))
end

-- A batch write of `count` rows held flat in `values` (kind: "enqueue", "put_mark",
-- "record", or "confirm_marks" / "finish" with outbox ids): through the store's trusted
-- _write_values when it has one and the values need no checks (`trusted`), else through
-- the public *_many method (which checks and converts them).
function M.write(store, kind, values, count, trusted)
  if trusted and store._write_values then return store:_write_values(kind, values, count) end
  local p = PUBLIC[kind]
  local fields = p[2]
  if not fields then
    local list = {}
    for i = 1, count do list[i] = values[i] end
    return store[p[1]](store, list)
  end
  local list, width = {}, #fields
  for i = 1, count do
    local row, base = {}, (i - 1) * width
    for j = 1, width do row[fields[j]] = values[base + j] end
    list[i] = row
  end
  return store[p[1]](store, list)
end

return M
