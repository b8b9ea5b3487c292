-- examples/openresty/rules.lua: rules for the webhook in this directory. The helpdesk
-- POSTs one JSON event per ticket update to /events, for instance
--
--   { "id": 48201, "status": "solved", "channel": "chat", "brand": "blancapeak",
--     "requester": { "name": "Jane Doe", "email": "jane.doe@example.com" },
--     "assignee":  { "name": "Paul Agent", "email": "paulagent@blancapeak.com" },
--     "tags": ["billing"], "locale": "en-US", "url": "https://support.example.com/tickets/48201" }
--
-- Keys come from the environment nginx passes to its workers (the `env` lines of
-- nginx.conf): STELLA_TEST_KEY, STELLA_PRODUCTION_KEY, STELLA_MODE, STELLA_BASE_URL.
--
-- The functions here get plain Lua tables and must keep no state: every nginx worker runs
-- its own copy of them. Suppression and dedupe marks live in the shared dict, so they hold
-- across the workers of this nginx (one node); several nodes need a shared store.
return {
  mode = "test",

  -- A survey when a ticket is solved or closed; every other update is skipped.
  when = function(event)
    return event.status == "solved" or event.status == "closed"
  end,

  map = function(event)
    local requester, assignee = event.requester or {}, event.assignee or {}
    local tags = {}
    for i, tag in ipairs(event.tags or {}) do tags[i] = tag end
    tags[#tags + 1] = "webhook"
    return {
      customer = { name = requester.name, email = requester.email },
      employee = { email = assignee.email },
      channel = event.channel,
      ext_interaction_id = event.id,
      external_url = event.url,
      tags = tags,
      brand = event.brand,
      language = event.locale,
    }
  end,

  -- "manual" channels are surveyed by hand on the service; events on them are skipped, as
  -- are channels missing here.
  channels = { phone = "integrated", chat = "integrated", email = "integrated", sms = "manual" },

  exclude_tags = { "spam", "internal" },
  do_not_send_tags = { "vip-no-survey" },

  -- A multi-brand company: the service wants each request's brand signifier. Events that
  -- name no brand go to the default one.
  brands = { ["blancapeak"] = { language = "en" }, ["blancapeak-es"] = { language = "es" } },
  default_brand = "blancapeak",

  -- At most one request per customer e-mail in 7 days, and one per ticket within 30 days
  -- (a helpdesk re-sends a webhook within hours; a ticket solved again after a month may be
  -- surveyed again). Every mark holds memory in the shared dict for its whole life:
  -- `once_per_interaction = true` keeps one per ticket for 365 days, so size the dict for a
  -- year of tickets then (see nginx.conf).
  suppression = { days = 7, per = "global" },
  once_per_interaction = 30,
}
