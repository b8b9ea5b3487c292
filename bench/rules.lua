-- bench/rules.lua: what the rules budget costs. Decisions per second of stella.rules.evaluate
-- over the same events and a realistic rules table (map, when, channels, tags, brands,
-- sampling, once per interaction, suppression, a custom rule) with the default budget
-- against the same rules with `budget = false`, measured in the same run. Under LuaJIT the
-- budget also keeps the rule functions out of the JIT (count hooks do not fire in compiled
-- code), so the ratio there includes that. Prints both rates and one ratio line.
--
-- From the repository root:
--   LUA_PATH="./lua/?.lua;;" lua5.4 bench/rules.lua      (or luajit)
-- Environment: BENCH_RULES_SECONDS (length of each timed phase, default 1).
local rules = require "stella.rules"

local clock, fmt = os.clock, string.format
local DURATION = tonumber(os.getenv("BENCH_RULES_SECONDS")) or 1
local interp = rawget(_G, "jit") and rawget(_G, "jit").version or _VERSION

local TEST_DOMAINS = { ["qa.blancapeak.com"] = true }

-- A fresh copy of the rules each time: compile() takes its functions out of the JIT when
-- the budget is on, and that must not reach the unlimited run.
local function spec(budget)
  return {
    budget = budget,
    when = function(e) return e.status == "solved" or e.status == "closed" end,
    map = function(e)
      local tags = {}
      for i, t in ipairs(e.tags or {}) do tags[i] = t end
      return {
        customer = { name = e.requester.name, email = e.requester.email },
        employee = { email = e.assignee.email }, channel = e.channel,
        ext_interaction_id = e.id, tags = tags, brand = e.brand,
      }
    end,
    channels = { phone = "integrated", chat = "integrated", email = "manual" },
    exclude_tags = { "spam", "internal" },
    do_not_send_tags = { "vip-no-survey" },
    brands = { ["blancapeak"] = { language = "en" }, ["blancapeak-es"] = { language = "es" } },
    default_brand = "blancapeak",
    suppression = { days = 7, per = "brand" },
    once_per_interaction = true,
    rules = {
      function(request)
        local domain = request.customer.email:match("@([^@]+)$")
        if domain and TEST_DOMAINS[domain:lower()] then return "skip", "test_account" end
      end,
    },
  }
end

local EVENTS = {}
for n = 1, 1000 do
  EVENTS[n] = {
    id = n, status = "solved", channel = n % 2 == 0 and "phone" or "chat",
    brand = n % 3 == 0 and "blancapeak-es" or nil,
    requester = { name = "Customer " .. n, email = fmt("customer.%d@example.com", n) },
    assignee = { email = "paulagent@blancapeak.com" }, tags = { "billing", "refund" },
  }
end
local ENV = { now = 1700000000, lookup = function() return nil end }

-- decisions per second over DURATION seconds of CPU time
local function rate(r)
  local n, evaluate = 0, rules.evaluate
  local start = clock()
  repeat
    for i = 1, #EVENTS do
      local d = evaluate(r, EVENTS[i], ENV)
      if d.action ~= "send" then error("unexpected decision " .. d.action .. " " .. tostring(d.detail)) end
    end
    n = n + #EVENTS
  until clock() - start >= DURATION
  return n / (clock() - start)
end

local unlimited, limited = rules.compile(spec(false)), rules.compile(spec(nil))
assert(limited.budget and not unlimited.budget)
rate(unlimited); rate(limited)   -- warm-up
local results = { unlimited = {}, limited = {} }
for round = 1, 3 do   -- alternating which goes first; the median round counts
  if round % 2 == 1 then
    results.unlimited[round] = rate(unlimited); results.limited[round] = rate(limited)
  else
    results.limited[round] = rate(limited); results.unlimited[round] = rate(unlimited)
  end
end
table.sort(results.unlimited); table.sort(results.limited)
local u, l = results.unlimited[2], results.limited[2]
print(fmt("%s: rules without a budget  %9.0f decisions/s (%.2f us each)", interp, u, 1e6 / u))
print(fmt("%s: rules with the budget   %9.0f decisions/s (%.2f us each)", interp, l, 1e6 / l))
print(fmt("ratio (%s): with the budget / without = %.2f", interp, l / u))
