-- examples/rules_test.lua: cases for examples/rules.lua, one or more for each of its rules.
--
--   stella test --rules examples/rules.lua examples/rules_test.lua
--
-- Each case is a helpdesk event, the outcome it should get ("sent", "recorded", "skipped",
-- "suppressed" or "invalid") and, optionally, the reason and request fields to check.
-- Cases run in order against one memory store per group (nothing is sent), so an event
-- that is sent suppresses the same customer's later ones; `advance` moves the clock
-- between events. Every event starts from `base`, with the case's fields over it.
return {
  now = "2026-01-05T10:00:00Z",
  base = {
    id = 1000, status = "solved", channel = "phone", brand = "blancapeak",
    requester = { name = "Jane Doe", email = "jane.doe@example.com" },
    assignee = { name = "Paul Agent", email = "paulagent@blancapeak.com" },
    tags = { "billing" }, locale = "en-US", url = "https://support.blancapeak.com/tickets/1000",
  },

  groups = {
    {
      name = "which events get a request",
      -- unsubscribed with `stella unsubscribe` (the store's list), not in the rules file
      state = { unsubscribes = { "gone@example.org" } },
      cases = {
        -- map, rules[2]: the request the ticket makes, tagged batch-export
        { name = "solved phone ticket", event = { id = 1001 }, expect = "sent",
          request = { brand = "blancapeak", channel = "phone", language = "en-US", ext_interaction_id = 1001,
                      customer = { name = "Jane Doe", email = "jane.doe@example.com" },
                      employee = { email = "paulagent@blancapeak.com" },
                      external_url = "https://support.blancapeak.com/tickets/1000",
                      tags = { "billing", "batch-export" } } },
        -- when
        { name = "closed chat ticket", expect = "sent",
          event = { id = 1002, status = "closed", channel = "chat", requester = { email = "omar@example.net" } } },
        { name = "open ticket", expect = "skipped", reason = "not_eligible",
          event = { id = 1003, status = "open", requester = { email = "li.wei@example.org" } } },
        { name = "pending ticket", expect = "skipped", reason = "not_eligible",
          event = { id = 1004, status = "pending", requester = { email = "li.wei@example.org" } } },
        -- channels
        { name = "e-mail channel is manual", expect = "skipped", reason = "channel_manual",
          event = { id = 1005, channel = "email", requester = { email = "anna@example.de" } } },
        { name = "sms is not a channel of the rules", expect = "skipped", reason = "channel_disabled",
          event = { id = 1006, channel = "sms", requester = { email = "anna@example.de" } } },
        -- exclude_tags
        { name = "spam tag", expect = "skipped", reason = "excluded_tag",
          event = { id = 1007, tags = { "billing", "spam" }, requester = { email = "bob@example.com" } } },
        { name = "internal tag", expect = "skipped", reason = "excluded_tag",
          event = { id = 1008, tags = { "internal" }, requester = { email = "bob@example.com" } } },
        -- do_not_send_tags: recorded with do_not_send, no e-mail
        { name = "vip-no-survey tag", expect = "recorded", reason = "do_not_send_tag",
          event = { id = 1009, tags = { "vip-no-survey" }, requester = { email = "vip@example.com" } },
          request = { do_not_send = true, tags = { "vip-no-survey", "batch-export" } } },
        -- unsubscribes: the rules file's list (any case) and the store's
        { name = "unsubscribed in the rules file", expect = "skipped", reason = "unsubscribed",
          event = { id = 1010, requester = { email = "No.Surveys@Example.com" } } },
        { name = "unsubscribed in the store", expect = "skipped", reason = "unsubscribed",
          event = { id = 1011, requester = { email = "gone@example.org" } } },
        -- rules[1]: the company's test accounts
        { name = "QA robot", expect = "skipped", reason = "test_account",
          event = { id = 1012, requester = { name = "QA Bot", email = "qa.bot@test.blancapeak.com" } } },
        { name = "load test account, any case", expect = "skipped", reason = "test_account",
          event = { id = 1013, requester = { name = "Load", email = "load1@QA.BlancaPeak.com" } } },
        -- brands, default_brand
        { name = "unknown brand", expect = "skipped", reason = "unknown_brand",
          event = { id = 1014, brand = "acme", requester = { email = "carl@example.com" } } },
        { name = "no brand: the default brand, its language when the ticket has none", expect = "sent",
          base = false,
          event = { id = 1015, status = "solved", channel = "phone",
                    requester = { name = "Dana", email = "dana@example.com" },
                    assignee = { email = "paulagent@blancapeak.com" } },
          request = { brand = "blancapeak", language = "en", tags = { "batch-export" } } },
        { name = "Spanish brand: its language", expect = "sent",
          base = false,
          event = { id = 1016, status = "closed", channel = "chat", brand = "blancapeak-es",
                    requester = { name = "Lucía García", email = "lucia@example.com" },
                    assignee = { email = "sofia.ruiz@blancapeak.com" } },
          request = { brand = "blancapeak-es", language = "es" } },
        -- the request is checked against the API's schema: no agent, no request
        { name = "no assignee", expect = "invalid", reason = "invalid_request",
          base = false,
          event = { id = 1017, status = "solved", channel = "phone",
                    requester = { name = "Eve", email = "eve@example.com" } } },
        -- once_per_interaction: ticket 1001 solved again (another requester: not suppression)
        { name = "ticket already surveyed", expect = "skipped", reason = "duplicate",
          event = { id = 1001, requester = { email = "someone.else@example.com" } } },
        -- sample = 1 in the rules file: every eligible event is kept (no sample verdict)
      },
    },

    {
      name = "suppression windows",
      -- a customer who got a request three days ago
      state = { sent = { { ago = "3d", event = { id = 2000, requester = { email = "repeat@example.com" } } } } },
      cases = {
        { name = "contacted 3 days ago", expect = "suppressed", reason = "suppressed",
          event = { id = 2001, requester = { email = "repeat@example.com" } } },
        { name = "the window is per brand", expect = "sent",
          event = { id = 2002, brand = "blancapeak-es", requester = { email = "repeat@example.com" } } },
        { name = "an hour before the 7 days end", advance = "95h", expect = "suppressed", reason = "suppressed",
          event = { id = 2003, requester = { email = "repeat@example.com" } } },
        { name = "an hour after", advance = "2h", expect = "sent",
          event = { id = 2004, requester = { email = "repeat@example.com" } } },
        { name = "which starts a new window", advance = "1d", expect = "suppressed",
          event = { id = 2005, requester = { email = "repeat@example.com" } } },
        -- a do_not_send request sends no e-mail: it is neither suppressed nor suppresses
        { name = "vip recorded", expect = "recorded",
          event = { id = 2006, tags = { "vip-no-survey" }, requester = { email = "vip2@example.com" } } },
        { name = "the same customer's next ticket", expect = "sent",
          event = { id = 2007, requester = { email = "vip2@example.com" } } },
        -- blancapeak-es: suppression_days = 14, the brand's own
        { name = "Spanish brand, 8 days after the last request", advance = "8d", expect = "suppressed",
          event = { id = 2008, brand = "blancapeak-es", requester = { email = "repeat@example.com" } } },
        { name = "14 days after", advance = "6d", expect = "sent",
          event = { id = 2009, brand = "blancapeak-es", requester = { email = "repeat@example.com" } } },
        -- once_per_interaction lasts 365 days
        { name = "ticket 2004 solved again two weeks on", expect = "skipped", reason = "duplicate",
          event = { id = 2004, requester = { email = "repeat@example.com" } } },
      },
    },
  },
}
