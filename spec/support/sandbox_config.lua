-- The company the sandbox specs run against (spec/sandbox_spec.lua): multi-brand, two
-- languages, every kind of employee, test controls on. single_brand() is a variant
-- with one brand and one language.
local M = {}

M.TEST_KEY = "spec-sandbox-test-key-aaaaaaaaaaaa"
M.PRODUCTION_KEY = "spec-sandbox-prod-key-bbbbbbbbbbbb"
M.TEST_EMAIL = "monitor@spec.example.com"

function M.multi_brand()
  return {
    company = "Spec & Co <Outfitters>",
    test_email = M.TEST_EMAIL,
    keys = { test = M.TEST_KEY, production = M.PRODUCTION_KEY },
    channels = { phone = "integrated", chat = "integrated", email = "manual" },
    employees = {
      { email = "paul@spec.example.com", custom_id = "E-1", name = "Paul" },
      { email = "maria@spec.example.com", custom_id = "E-2" },
      { custom_id = "E-3" },                                           -- custom_id only
      { email = "gone@spec.example.com", custom_id = "E-4", active = false },
      { email = "new@spec.example.com", custom_id = "E-5", profile_complete = false },
    },
    brands = {
      { name = "main" },
      { name = "second", active = true },
      { name = "retired", active = false },
    },
    languages = { "en", "es" },
    suppression_days = 7,
    unsubscribed = { "Opted.Out@example.com" },
    invalid_customers = { "bounced@example.com" },
    log_limit = 50,
    test_controls = true,
  }
end

function M.single_brand()
  local c = M.multi_brand()
  c.company = "Solo Brand Ltd"
  c.brands = { { name = "solo" } }
  c.languages = { "en" }
  return c
end

return M
