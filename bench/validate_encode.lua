-- bench/validate_encode.lua: throughput of stella.encode (C core: validate + canonical
-- JSON) against a plain-Lua validator of the same schema + cjson.encode
-- (bench/lua_baseline.lua), measured in the same run. Prints the measurements and
-- one ratio line; never fails on a missed target (only on a crash or a disagreement
-- between the two implementations, which would make the comparison meaningless).
--
-- From the repository root:
--   LUA_PATH="./lua/?.lua;./lua/?/init.lua;./spec/?.lua;;" LUA_CPATH="./build/5.4/?.so;;" \
--     lua5.4 bench/validate_encode.lua
-- Environment: BENCH_SECONDS (target CPU seconds per timed run, default 1.5).

package.path = "./bench/?.lua;" .. package.path

local stella = require "stella"
local cjson = require "cjson"
local base = require "lua_baseline"

local clock, fmt, concat, sort = os.clock, string.format, table.concat, table.sort

local TARGET = tonumber(os.getenv("BENCH_SECONDS")) or 1.5   -- CPU seconds per timed run
local REPEATS = 3
local interp = (jit and jit.version or _VERSION)

---------------------------------------------------------------------------
-- The request mix
---------------------------------------------------------------------------

local function minimal(i)
  return {
    customer = { name = "Jane Customer", email = "jane" .. i .. "@example.com" },
    employee = { email = "paulagent@blancapeak.com" },
    channel = "phone",
    ext_interaction_id = 1000000 + i,
  }
end

local function minimal_custom_id(i)
  return {
    customer = { name = "Sam Lee", email = "sam.lee+" .. i .. "@mail.example.org", custom_id = "C-" .. i },
    employee = { custom_id = "agent-042" },
    channel = "chat",
    ext_interaction_id = "ticket-" .. i,
  }
end

local function non_ascii(i)
  return {
    customer = { name = "Zoë Åkesson-Ørsted", email = "zoe" .. i .. "@example.se" },
    employee = { email = "bjorn.agent@blancapeak.com", custom_id = "Björn" },
    channel = "email",
    ext_interaction_id = 2000000 + i,
    language = "sv-SE",
    country = "se",
  }
end

local function full(i)
  return {
    customer = { name = "Jane Customer", email = "janecustomer" .. i .. "@example.com",
                 custom_id = "cust-" .. i },
    employee = { email = "paulagent@blancapeak.com", custom_id = "emp-77" },
    channel = "phone",
    ext_interaction_id = 3000000 + i,
    external_url = "https://helpdesk.example.com/tickets/" .. i .. "?view=full",
    do_not_send = false,
    tags = { "billing", "refund", "priority-high", "escalated" },
    brand = "Blanca Peak Outfitters",
    language = "en-US",
    country = "US",
    custom_properties = {
      order_id = "ORD-" .. i, plan = "premium", region = "north-east", seats = 12,
      nps_segment = "promoter",
    },
  }
end

local function full_non_ascii(i)
  return {
    customer = { name = "山田 太郎", email = "taro.yamada" .. i .. "@example.jp" },
    employee = { email = "agent.sato@blancapeak.com" },
    channel = "chat",
    ext_interaction_id = "JP-" .. i,
    tags = { "返品", "配送遅延", "VIP" },
    brand = "Blanca Peak 日本",
    language = "ja",
    country = "jp",
    custom_properties = { store = "渋谷店", order_total = 12800, note = "「至急」対応済み" },
  }
end

local function mid(i)
  return {
    customer = { name = "José Álvarez", email = "jose.alvarez" .. i .. "@example.mx" },
    employee = { email = "ana.agent@blancapeak.com" },
    channel = "whatsapp",
    ext_interaction_id = 4000000 + i,
    tags = { "onboarding", "es" },
    language = "es-419",
    custom_properties = { segment = "smb", score = 0.75 },
  }
end

local MIX = {}
do
  local makers = { minimal, full, minimal_custom_id, non_ascii, minimal, full_non_ascii, mid,
                   full, minimal, mid, non_ascii, full }
  for i, make in ipairs(makers) do MIX[i] = make(i) end
end

---------------------------------------------------------------------------
-- Checks before timing: both sides must accept and reject the same inputs
---------------------------------------------------------------------------

local function deep_equal(a, b)
  if type(a) ~= type(b) then return false end
  if type(a) ~= "table" then return a == b end
  for k, v in pairs(a) do if not deep_equal(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end

local function error_set(errs)
  local list = {}
  for i, e in ipairs(errs or {}) do list[i] = tostring(e.path) .. " " .. tostring(e.code) end
  sort(list)
  return concat(list, "; ")
end

local function copy(v)
  if type(v) ~= "table" then return v end
  local t = {}
  for k, x in pairs(v) do t[k] = copy(x) end
  return t
end

-- A variant of the minimal request: path "a.b" or "a", value (NONE removes).
local NONE = {}
local function variant(path, value)
  local r = copy(MIX[1])
  r.customer.email = "jane@example.com"
  local head, key = path:match("^([^.]+)%.(.+)$")
  local parent = r
  if head then
    if type(r[head]) ~= "table" then r[head] = {} end
    parent = r[head]
  else
    key = path
  end
  if value == NONE then parent[key] = nil else parent[key] = value end
  return r
end

local long_label = string.rep("a", 63)
local EDGE = {
  { "customer.email", "a@b" }, { "customer.email", "a.b!#$%&'*+/=?^_`{|}~-@c-d.e" },
  { "customer.email", "a@-b.c" }, { "customer.email", "a@b-.c" }, { "customer.email", "a@b..c" },
  { "customer.email", "@b.c" }, { "customer.email", "a@" }, { "customer.email", "a@b.c." },
  { "customer.email", "a b@c.d" }, { "customer.email", "a@" .. long_label .. ".com" },
  { "customer.email", "a@" .. long_label .. "a.com" }, { "customer.email", "a@b@c" },
  { "customer.email", string.rep("x", 245) .. "@example.com" }, { "customer.email", "é@x.y" },
  { "customer.email", "a@b_c.d" }, { "customer.email", "" }, { "customer.email", 42 },
  { "customer.name", "\192\128" }, { "customer.name", "\237\160\128" },
  { "customer.name", "\244\144\128\128" }, { "customer.name", "\224\128\128" },
  { "customer.name", "ok\195" }, { "customer.name", "\240\159\152\128 ok" },
  { "customer.name", "\128" }, { "customer.name", NONE }, { "customer.nmae", "x" },
  { "customer", "not a table" }, { "employee", {} }, { "employee", { custom_id = "" } },
  { "language", "en" }, { "language", "EN" }, { "language", "en-us" }, { "language", "es-419" },
  { "language", "en-XK" }, { "language", "xx" }, { "language", "en_US" }, { "language", "en-123" },
  { "language", "en-U" }, { "language", "" }, { "language", 5 },
  { "country", "us" }, { "country", "XK" }, { "country", "uk" }, { "country", "usa" },
  { "tags", {} }, { "tags", { "a", "b" } }, { "tags", { "a", nil, "c" } }, { "tags", { a = "x" } },
  { "tags", { [1] = "a", [2] = "b", x = "c" } }, { "tags", { "a", "" } }, { "tags", { "a", 7 } },
  { "tags", { string.rep("t", 2001) } }, { "tags", { string.rep("é", 2000) } },
  { "tags", { string.rep("é", 2001) } }, { "tags", "billing" },
  { "ext_interaction_id", 1.5 }, { "ext_interaction_id", "" }, { "ext_interaction_id", true },
  { "ext_interaction_id", 2 ^ 53 }, { "ext_interaction_id", -7 }, { "ext_interaction_id", NONE },
  { "do_not_send", "true" }, { "do_not_send", 1 }, { "do_not_send", true },
  { "custom_properties", { a = { b = "c" } } }, { "custom_properties", { a = 0.25, b = 42, c = "" } },
  { "custom_properties", { a = 0 / 0 } }, { "custom_properties", { a = math.huge } },
  { "custom_properties", { [""] = "x" } }, { "custom_properties", { [1] = "x" } },
  { "custom_properties", { a = true } }, { "custom_properties", { ["k\255"] = "x" } },
  { "custom_properties", { a = string.rep("v", 2001) } }, { "custom_properties", "x" },
  { "external_url", "https://x.example/a b" }, { "external_url", "https://x.example/\194\160" },
  { "external_url", "https://x.example/\226\128\168" }, { "external_url", "https://x.example/ok?a=1" },
  { "external_url", "https://x.example/\127" }, { "external_url", "https://x.example/é" },
  { "channel", "" }, { "channel", 3 }, { "brand", "" }, { "chanel", "phone" }, { "extra", 1 },
}

local function verify()
  local valid, edge = 0, 0
  for i, r in ipairs(MIX) do
    local cj, cerr = stella.encode(r)
    local lj, lerr = base.encode(r)
    local lc = base.encode_canonical(r)
    if not cj then error(fmt("mix[%d]: C core rejects it: %s", i, error_set(cerr))) end
    if not lj then error(fmt("mix[%d]: baseline rejects it: %s", i, error_set(lerr))) end
    if not deep_equal(cjson.decode(cj), cjson.decode(lj)) then
      error(fmt("mix[%d]: outputs differ:\n  C:   %s\n  Lua: %s", i, cj, lj))
    end
    if lc ~= cj then
      error(fmt("mix[%d]: canonical outputs differ:\n  C:   %s\n  Lua: %s", i, cj, lc))
    end
    valid = valid + 1
  end
  local rejected = 0
  for i, case in ipairs(EDGE) do
    local r = variant(case[1], case[2])
    local cj, cerr = stella.encode(r)
    local lj, lerr = base.encode(r)
    if (cj == nil) ~= (lj == nil) then
      error(fmt("edge %d (%s): C %s, baseline %s (%s | %s)", i, case[1],
        cj and "accepts" or "rejects", lj and "accepts" or "rejects", error_set(cerr), error_set(lerr)))
    end
    if cj then
      if not deep_equal(cjson.decode(cj), cjson.decode(lj)) then
        error(fmt("edge %d (%s): outputs differ:\n  C:   %s\n  Lua: %s", i, case[1], cj, lj))
      end
      local lc = base.encode_canonical(r)
      if lc ~= cj then error(fmt("edge %d (%s): canonical differs:\n  C:   %s\n  Lua: %s", i, case[1], cj, lc)) end
    else
      rejected = rejected + 1
      if error_set(cerr) ~= error_set(lerr) then
        error(fmt("edge %d (%s): errors differ:\n  C:   %s\n  Lua: %s", i, case[1],
          error_set(cerr), error_set(lerr)))
      end
    end
    edge = edge + 1
  end
  -- the LuaJIT fallback validator agrees with the one in use
  for _, s in ipairs({ "abc", "Zoë", "\192\128", "\237\160\128", "\244\144\128\128", "ok\195",
                       "\240\159\152\128", "\224\160\128", "\239\191\191" }) do
    assert(base.utf8_valid_slow(s) == base.utf8_valid(s), "utf8 fallback disagrees on " .. s:byte(1))
  end
  return valid, edge, rejected
end

---------------------------------------------------------------------------
-- Timing
---------------------------------------------------------------------------

-- Each side gets its own copy of the timing loop (compiled from source), so that
-- under LuaJIT the sides do not share, and fight over, one trace.
local RUN_SOURCE = [[
  local MIX, clock, collectgarbage, error, fn = ...
  return function(iters)
    local reqs, n = MIX, #MIX
    collectgarbage()
    collectgarbage()
    local j = 1
    local t0 = clock()
    for _ = 1, iters do
      if not fn(reqs[j]) then error("a request was rejected while timing") end
      j = j + 1
      if j > n then j = 1 end
    end
    return clock() - t0
  end
]]

local function make_run(fn)
  local chunk = assert((loadstring or load)(RUN_SOURCE, "=timing loop"))
  return chunk(MIX, clock, collectgarbage, error, fn)
end

-- A fixed iteration count per side, chosen from a short calibration so that one
-- timed run takes about TARGET CPU seconds.
local function calibrate(run)
  local iters = 1000
  while true do
    local t = run(iters)
    if t >= 0.2 then return math.max(1000, math.floor(iters * TARGET / t)) end
    iters = iters * 2
  end
end

-- The sides take turns (A B C, A B C, ...) so that a slow spell of a shared machine
-- hits all of them rather than one; each keeps the best of its REPEATS runs.
local function measure_all(sides)
  for _, side in ipairs(sides) do
    side.run = make_run(side.fn)
    side.iters = calibrate(side.run)
    side.rates = {}
  end
  for k = 1, REPEATS do
    for _, side in ipairs(sides) do
      side.rates[k] = side.iters / side.run(side.iters)
    end
  end
  for _, side in ipairs(sides) do
    side.best = math.max((table.unpack or unpack)(side.rates))
  end
end

local function fmt_rate(r) return fmt("%.0f", r) end

local function fmt_runs(rates)
  local t = {}
  for i, r in ipairs(rates) do t[i] = fmt_rate(r) end
  return concat(t, " / ")
end

local valid, edge, rejected = verify()
local bytes = 0
for _, r in ipairs(MIX) do bytes = bytes + #stella.encode(r) end

print(fmt("validate+encode benchmark under %s: mix of %d requests (avg %d bytes of JSON); "
  .. "checked first: %d valid agree byte-for-byte, %d edge cases agree (%d rejected with the same errors)",
  interp, #MIX, math.floor(bytes / #MIX), valid, edge, rejected))

local encode, lencode, lcanon = stella.encode, base.encode, base.encode_canonical
local C = { name = "C core (stella.encode)          ", fn = function(r) return encode(r) end }
local L = { name = "plain Lua + cjson.encode        ", fn = function(r) return lencode(r) end }
local K = { name = "plain Lua canonical (same bytes)", fn = function(r) return lcanon(r) end,
            note = "  [info]" }
measure_all({ C, L, K })
for _, side in ipairs({ C, L, K }) do
  print(fmt("  %s %s req/s  (runs of %d: %s)%s", side.name, fmt_rate(side.best), side.iters,
    fmt_runs(side.rates), side.note or ""))
end

-- the target is set for Lua 5.4; LuaJIT compiles the plain Lua side, so its ratio is information
print(fmt("validate+encode: C core %s req/s, plain Lua + cjson %s req/s, ratio %.2f x (%s)",
  fmt_rate(C.best), fmt_rate(L.best), C.best / L.best,
  rawget(_G, "jit") and "no target under LuaJIT; target >= 4x under Lua 5.4" or "target >= 4x"))
