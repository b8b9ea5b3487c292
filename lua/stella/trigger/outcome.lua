-- stella.trigger.outcome: what a decision of the rules (stella.rules.evaluate) becomes,
-- the pure part of deciding an event. Shared by the Lua trigger (decide.lua) and the
-- rules inside Redis (stella.redis_rules: `stella redis load`), so that both decide the
-- same way and put the same marks under the same keys:
--   mark_key(mark, hash)       the store key of a mark (hash(email): the store's salted hash)
--   event_id(event, request)   the id an outcome and its outbox item carry
--   interaction_id(request)    the request's ext_interaction_id as text
--   of(d, event)               the outcome: status, reason, detail (skipped, suppressed,
--                              invalid), or no status yet for a request to send
--   do_not_send_reason(d)      the reason a request to send is recorded without an e-mail
-- Lua 5.1-compatible, no C module, no global beyond the base library (it runs in Redis).
local type, tostring = type, tostring
local floor = math.floor

local M = {}

-- Store keys for rule marks. E-mails become salted hashes here, never stored in clear.
function M.mark_key(mark, hash)
  if mark.type == "suppress" then
    return "suppress|" .. mark.scope .. "|" .. hash(mark.email)
  end
  return "once|" .. mark.scope .. "|" .. mark.id
end

function M.event_id(event, request)
  local id = type(event) == "table" and (event.event_id or event.id)
  if id == nil and type(request) == "table" then id = request.ext_interaction_id end
  -- no request (map raised): a request-shaped event still names its interaction
  if id == nil and type(event) == "table" then id = event.ext_interaction_id end
  if id == nil then return nil end
  return tostring(id)
end

function M.interaction_id(request)
  local id = type(request) == "table" and request.ext_interaction_id
  if type(id) == "number" then   -- "%d" raises in 5.4 on 1.5, NaN, 2^63 (invalid anyway)
    if id == floor(id) and id > -2^53 and id < 2^53 then return ("%d"):format(id) end
    return tostring(id)
  end
  return type(id) == "string" and id or nil
end

local STATUS = { skip = "skipped", suppressed = "suppressed", invalid = "invalid" }

-- The outcome of decision d for event: { event_id, brand, request, interaction_id,
-- verdicts, status, reason, detail [, until] }. status is nil when the request is to be
-- sent (d.action "send"): the caller encodes it, and its marks (d.marks) are reserved by
-- its outbox item.
function M.of(d, event)
  local outcome = {
    event_id = M.event_id(event, d.request), brand = d.brand, request = d.request,
    interaction_id = M.interaction_id(d.request), verdicts = d.verdicts,
  }
  local status = STATUS[d.action]
  if status then
    outcome.status, outcome.reason, outcome.detail = status, d.reason, d.detail
    if status == "suppressed" then outcome["until"] = d["until"] end
  end
  return outcome
end

function M.do_not_send_reason(d)
  return d.request.do_not_send == true and (d.do_not_send_reason or "do_not_send") or nil
end

return M
