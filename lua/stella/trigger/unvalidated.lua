-- stella.trigger.unvalidated: outbox items decided inside Redis (`stella redis load`,
-- FCALL stella_decide) are queued as kind "unvalidated": their body is the rules'
-- request as JSON, never checked against the API's schema (Redis has no C core). The
-- sender (flush: `stella retry`, a worker) validates and encodes each with the C core
-- before it is sent, as the trigger's decide does: a valid one goes on as a request with
-- its canonical body; an invalid one is sent by nobody: its marks are released, the item
-- leaves the outbox and the ledger records it invalid (reason invalid_request) with its
-- errors.
local stella = require "stella"
local errors_mod = require "stella.error"
local rows = require "stella.trigger.rows"

local ipairs, tostring, type, concat = ipairs, tostring, type, table.concat

local M = {}

M.KIND = "unvalidated"

-- The request and its canonical body, or nil, the request (if it decoded) and the errors.
local function validate(body)
  local req, derr = stella.decode_json(body)
  if req == nil then
    return nil, nil, { { path = "request", code = "invalid_json",
                         message = tostring(type(derr) == "table" and derr.message or derr) } }
  end
  local encoded, errs = stella.encode(req, "request")
  if not encoded then return nil, req, errs end
  return encoded, req
end

-- Splits claimed items: those to send (unvalidated ones made requests with their
-- canonical bodies), and the outcomes of the invalid ones, settled here in one
-- transaction (batch: decide.new_batch's, for the ledger's e-mail hashes). Counts the
-- invalid in summary.invalid.
function M.check(self, items, batch, now, summary)
  local keep, bad = {}, nil
  for _, item in ipairs(items) do
    if item.kind == M.KIND then
      local body, req, errs = validate(item.body)
      if body then
        item.body, item.kind = body, "request"
        keep[#keep + 1] = item
      else
        bad = bad or {}
        bad[#bad + 1] = { item = item, request = req, errors = errs }
      end
    else
      keep[#keep + 1] = item
    end
  end
  if not bad then return keep, {} end
  local outcomes = {}
  local store = self.store
  store:atomic(function()
    local entries = {}
    for i, b in ipairs(bad) do
      local it, errs = b.item, b.errors
      store:release_marks(it.id)
      store:finish(it.id)
      local all = {}
      for j, e in ipairs(errs) do all[j] = tostring(e.path) .. ": " .. tostring(e.message) end
      local o = { status = "invalid", reason = "invalid_request", detail = errors_mod.summarize(errs),
                  errors = errs, event_id = it.event_id, brand = it.brand, interaction_id = it.interaction_id,
                  customer_hash = it.customer_hash, request = b.request, outbox_id = it.id,
                  error = errors_mod.new{ kind = "invalid", retryable = false, message = concat(all, "; ") } }
      entries[i] = rows.ledger_entry(batch, o, now)
      outcomes[i] = o
    end
    store:record_many(entries)
  end)
  summary.invalid = (summary.invalid or 0) + #outcomes
  return keep, outcomes
end

return M
