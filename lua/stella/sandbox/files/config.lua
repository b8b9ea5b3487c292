-- The company the local Requests API sandbox pretends to be (`stella sandbox`'s default).
--
--   stella sandbox                          # this file, on http://127.0.0.1:8787
--   stella sandbox --config my-company.lua  # a copy you edited
--
-- The sandbox answers POST /v1/requests and POST /v1/recoveries the way the service
-- does for this company, and shows what happened on http://127.0.0.1:8787/status.
-- Every setting is optional except test_email and keys. The file runs with only
-- harmless globals (string, table, math, os.getenv, os.time): it may read its keys from
-- the environment, e.g.  keys = { test = os.getenv("MY_TEST_KEY") or "...", ... }.
--
-- This default matches examples/rules.lua and examples/interactions.jsonl (`make demo`):
-- their agents, channels and brands are all here, so the demo shows mostly successes, a
-- customer who unsubscribed on the service's side, and a few realistic invalid requests
-- (a new agent whose profile is not complete yet).

return {
  -- Shown on the status page.
  company = "Blanca Peak Outfitters",

  -- The company's test/monitoring address: requests made with the test key are
  -- "delivered" here, never to the customer (and the service e-mails its error-rate
  -- alerts here).
  test_email = "cx-monitoring@blancapeak.com",

  -- Exactly one test key and one production key, as the service gives each company.
  -- The sandbox answers 403 to any other key (or none). These are not secrets: they
  -- only open this local sandbox.
  keys = {
    test = "sandbox-test-key-0000000000000000",
    production = "sandbox-prod-key-1111111111111111",
  },

  -- The company's channels and their mode. A channel that is not listed gives
  -- "Channel not enabled for company"; a "manual" channel gives "Channel is in manual
  -- mode", with the production key only (test requests on it go through).
  channels = {
    phone = "integrated",
    chat = "integrated",
    email = "manual",
  },

  -- Agents with a profile on the service, matched by e-mail (any case) and/or
  -- custom_id; when a request gives both they must name the same agent.
  --   active = false            -> "Deactivated employee"
  --   profile_complete = false  -> "Employee profile not complete"
  -- Anyone not listed           -> "Employee not found"
  -- (Both flags default to true.)
  employees = {
    { email = "paulagent@blancapeak.com", custom_id = "BP-1001", name = "Paul Agent" },
    { email = "maria.lopez@blancapeak.com", custom_id = "BP-1002", name = "Maria Lopez" },
    { email = "dev.kumar@blancapeak.com", custom_id = "BP-1003", name = "Dev Kumar" },
    { email = "tom.becker@blancapeak.com", custom_id = "BP-1004", name = "Tom Becker" },
    -- joined the Spanish desk last week; her agent profile is still awaiting approval
    { email = "sofia.ruiz@blancapeak.com", custom_id = "BP-1005", name = "Sofía Ruiz",
      profile_complete = false },
    { email = "lena.ward@blancapeak.com", custom_id = "BP-0907", name = "Lena Ward", active = false },
  },

  -- Brands, by the signifier requests carry in `brand`. With more than one brand the
  -- company is multi-brand: a request without a brand gives "Brand signifier not
  -- provided", an unknown or inactive one "Invalid/inactive brand signifier".
  -- With one brand (or none) `brand` may be left out.
  brands = {
    { name = "blancapeak", active = true },
    { name = "blancapeak-es", active = true },
    { name = "blancapeak-outlet", active = false },
  },

  -- Survey languages. With more than one, a request without `language` gives
  -- "Language not specified". (Any valid code is accepted.)
  languages = { "en", "es" },

  -- At most one e-mail per customer address per brand within this many days; later
  -- requests are accepted and recorded with delivery = "suppressed". 0 turns it off.
  -- Test-key and production-key requests are counted separately.
  suppression_days = 7,

  -- Customers who unsubscribed from survey e-mails on the service's side: requests for
  -- them are accepted and recorded with delivery = "unsubscribed", no e-mail.
  unsubscribed = { "hannah.berg@example.se" },

  -- Addresses the service treats as "Invalid customer" (say, known to bounce), besides
  -- the ones it cannot deliver to at all (a domain without a dot, like jane@localhost).
  invalid_customers = { "bounced@example.com" },

  -- How many rows each tab of the status page keeps (the counts are never trimmed).
  log_limit = 500,

  -- POST /_sandbox/reset (forget everything) and POST /_sandbox/clock (move the
  -- sandbox's clock forward, {"advance": seconds}) for automated tests. Off by default.
  test_controls = false,
}
