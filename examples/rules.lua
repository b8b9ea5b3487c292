-- examples/rules.lua: rules for a helpdesk export, one event per ticket update:
--
--   { id = 48201, status = "solved", channel = "phone", brand = "blancapeak",
--     requester = { name = "Jane Doe", email = "jane.doe@example.com" },
--     assignee = { name = "Paul Agent", email = "paulagent@blancapeak.com" },
--     tags = { "billing" }, locale = "en-US", url = "https://support.../tickets/48201" }
--
-- Use it with:   stella trigger --rules examples/rules.lua examples/interactions.jsonl
-- Keys come from the environment (STELLA_TEST_KEY, STELLA_PRODUCTION_KEY, STELLA_MODE);
-- do not write them here if this file is kept in version control.
--
-- Everything in this table is optional. Every function gets plain Lua tables and must not
-- keep state between calls: the same rules may run in several processes at once.

-- Test accounts: tickets opened by QA robots and load tests.
local TEST_DOMAINS = { ["test.blancapeak.com"] = true, ["qa.blancapeak.com"] = true }

return {
  -- The key and mode the command uses when the environment sets none (the environment wins).
  -- api_key = "...", keys = { test = "...", production = "..." },
  mode = "test",
  -- base_url = "https://blancapeak.api.stellaconnect.net",
  -- One rate limit per API key for every sender on the Redis store (workers, stella trigger
  -- and retry with --db redis://...), and a pause for all of them after a 429 with
  -- Retry-After; a brand with its own key may set its own (README, "Work queue"):
  -- rate_limit = { per_second = 50 },

  -- Which events are worth a survey: the service advises triggering when a case is
  -- solved or closed. Anything else is skipped.
  when = function(event)
    return event.status == "solved" or event.status == "closed"
  end,

  -- The request for an event. Fields the event lacks are left out; the trigger checks the
  -- result against the API's schema before anything is sent.
  map = function(event)
    local requester, assignee = event.requester or {}, event.assignee or {}
    local tags = {}
    for i, tag in ipairs(event.tags or {}) do tags[i] = tag end
    return {
      customer = { name = requester.name, email = requester.email },
      employee = { email = assignee.email },
      channel = event.channel,
      ext_interaction_id = event.id,           -- a number or a string; both are fine
      external_url = event.url,
      tags = tags,
      brand = event.brand,                     -- nil: default_brand below
      language = event.locale,                 -- "en-US", "es-ES", ...
    }
  end,

  -- Channels and their mode on the service. "manual" channels are surveyed by hand in
  -- the service's own tool (a production request on them would fail with "Channel is in
  -- manual mode"), so the trigger skips them; so it does a channel missing here.
  channels = { phone = "integrated", chat = "integrated", email = "manual" },

  -- Tickets with any of these tags get no request at all ...
  exclude_tags = { "spam", "internal" },
  -- ... and these are recorded on the service with do_not_send = true (counted in its
  -- reports, no e-mail to the customer): the helpdesk's opt-out flag.
  do_not_send_tags = { "vip-no-survey" },

  -- A multi-brand company: each brand may have its own suppression period and language
  -- (and its own keys: keys = { test = ..., production = ... }).
  brands = {
    ["blancapeak"] = { suppression_days = 7, language = "en" },
    ["blancapeak-es"] = { suppression_days = 14, language = "es" },
  },
  default_brand = "blancapeak",   -- for events without a brand

  -- At most one request per customer e-mail per brand in 7 days (a brand's own
  -- suppression_days wins); per = "channel" or "global" are the other choices.
  suppression = { days = 7, per = "brand" },

  -- A ticket that shows up again (reopened and solved twice, or the same export read
  -- twice) is surveyed once.
  once_per_interaction = true,

  -- Addresses that never get a request. `stella unsubscribe EMAIL` adds to the list kept
  -- in the store; these are for addresses known when the rules are written.
  unsubscribes = { "no.surveys@example.com" },

  -- The share of eligible events that get a request: 1 = all of them. Lower it (0.25 =
  -- one in four, chosen at random) when a busy queue would over-survey customers.
  sample = 1,

  -- Custom rules, run in order on the request the map made, with a context (ctx.event, the
  -- source event; ctx.brand; ctx.now). A rule returns nothing to let the request through
  -- (it may change it), "skip" and a reason to drop it, or "do_not_send" and a reason to
  -- have it recorded without an e-mail.
  rules = {
    -- No surveys for the company's own test accounts.
    function(request)
      local email = request.customer and request.customer.email
      local domain = type(email) == "string" and email:match("@([^@]+)$")
      if domain and TEST_DOMAINS[domain:lower()] then
        return "skip", "test_account"
      end
    end,
    -- Tag requests that went through this batch job, to tell them apart in the service's
    -- reports.
    function(request)
      request.tags = request.tags or {}
      request.tags[#request.tags + 1] = "batch-export"
    end,
  },

  -- Called (at most once an hour) when more than 5% of the last hour's requests failed or
  -- were invalid, mirroring the alert the service e-mails to its monitoring address.
  -- info = { rate, errors, total, threshold, window, time }. The `stella` command lets a
  -- rules file use io; a program loading this file itself passes allow = { io = true }.
  on_alert = function(info)
    io.stderr:write(("stella alert: %d of the last %d requests failed (%.1f%%, threshold %.0f%%)\n")
      :format(info.errors, info.total, info.rate * 100, info.threshold * 100))
  end,
}
