-- stella.trigger.rows: what the trigger's rows say that the outcomes do not say directly:
-- a sent request's ledger status, and an outcome's ledger entry (the layout of
-- stella.store.rows.entry). decide.lua and settle.lua build the other rows in place.
local type, tostring = type, tostring

local M = {}

-- A scheduled request (rules' delay, quiet_hours): its ledger reason while it waits, and
-- the last_error its outbox item is queued with until a send is tried (an item's
-- last_error otherwise holds the error of its last try): how `stella status` tells it.
M.SCHEDULED = "scheduled"

function M.is_scheduled(item)
  return item.last_error == M.SCHEDULED and (item.attempts or 0) == 0
end

-- The ledger status of a request that was sent: "recorded" when it asked the service
-- not to e-mail the customer.
function M.sent_status(body)
  -- the body is our own canonical JSON: this byte sequence can only be the field
  return body:find('"do_not_send":true', 1, true) and "recorded" or "sent"
end

-- The ledger entry of an outcome decided or settled at `now`.
function M.ledger_entry(batch, outcome, now)
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
  return {
    time = now, status = outcome.status, reason = outcome.reason, event_id = outcome.event_id,
    interaction_id = outcome.interaction_id, brand = outcome.brand, channel = channel,
    detail = outcome.detail, request_id = outcome.request_id, error_kind = error_kind,
    error_message = error_message, customer_hash = hash, attempts = outcome.attempts,
  }
end

return M
