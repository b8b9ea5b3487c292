-- bench/encode_cjson.lua: stella.encode (validation + canonical JSON, the one pass of
-- csrc/lstella_encode.c) against bare cjson.encode, which checks nothing, on the same
-- tables: the full example request and a minimal one. Both run in this Lua state, in
-- alternating rounds (stella first in odd rounds, cjson first in even ones), each timed
-- in CPU time (os.clock); prints every round's ratio, the medians and the load average.
-- Also, for information, the value-tree path alone (stella.core.encode_tree: the way
-- stella.encode went before the one pass, and still goes for the errors).
--
-- From the repository root:
--   LUA_PATH="./lua/?.lua;./lua/?/init.lua;./bench/?.lua;;" LUA_CPATH="./build/5.4/?.so;;" \
--     lua5.4 bench/encode_cjson.lua
-- Environment: BENCH_ROUNDS (default 7), BENCH_SECONDS (CPU seconds per timing, default 0.3).
package.path = "./bench/?.lua;" .. package.path

local stella = require "stella"
local core = require "stella.core"
local cjson = require "cjson"
local common = require "common"

local clock, fmt = os.clock, string.format
local ROUNDS = math.max(1, math.floor(tonumber(os.getenv("BENCH_ROUNDS")) or 7))
local SECONDS = tonumber(os.getenv("BENCH_SECONDS")) or 0.3
local interp = rawget(_G, "jit") and jit.version or _VERSION

-- The README's full example (every field) and a minimal request.
local FULL = {
  customer = { name = "Jane Customer", email = "janecustomer@example.com", custom_id = "cust-8812" },
  employee = { email = "paulagent@blancapeak.com", custom_id = "emp-77" },
  channel = "phone",
  ext_interaction_id = 123456,
  external_url = "https://helpdesk.example.com/tickets/123456?view=full",
  do_not_send = false,
  tags = { "billing", "refund", "priority-high" },
  brand = "Blanca Peak Outfitters",
  language = "en-US",
  country = "us",
  custom_properties = { order_id = "ORD-99812", plan = "premium", seats = 12 },
}
local MINIMAL = {
  customer = { name = "Jane Customer", email = "jane@example.com" },
  employee = { email = "paulagent@blancapeak.com" },
  channel = "phone",
  ext_interaction_id = 1000001,
}

-- Each side gets its own copy of the loop (compiled from source), so that under LuaJIT
-- the sides do not share one trace.
local LOOP = [[
  local fn, req, clock = ...
  return function(n)
    local t0 = clock()
    for _ = 1, n do fn(req) end
    return clock() - t0
  end
]]

local function timer(fn, req)
  return assert((loadstring or load)(LOOP, "=loop"))(fn, req, clock)
end

local function calibrate(run)
  local n = 1000
  while true do
    local t = run(n)
    if t >= 0.05 then return math.max(1000, math.floor(n * SECONDS / t)) end
    n = n * 2
  end
end

local function bench(name, req)
  assert(stella.encode(req) == core.encode_tree(req), "the one pass and the tree path disagree")
  assert(core.encode_direct(req), "the one pass does not take the " .. name .. " request")
  local sides = {
    stella = timer(stella.encode, req),
    cjson = timer(cjson.encode, req),
    tree = timer(core.encode_tree, req),
  }
  local n = calibrate(sides.cjson)
  local ratios, tree_ratios, s_us, c_us = {}, {}, {}, {}
  local rows = {}
  for r = 1, ROUNDS do
    collectgarbage()
    local ts, tc
    if r % 2 == 1 then ts = sides.stella(n); tc = sides.cjson(n)
    else tc = sides.cjson(n); ts = sides.stella(n) end
    local tt = sides.tree(n)
    ratios[r], tree_ratios[r] = tc / ts, tc / tt
    s_us[r], c_us[r] = ts / n * 1e6, tc / n * 1e6
    rows[r] = fmt("%.2f", tc / ts)
  end
  local m = common.median(ratios)
  print(fmt("  %-8s %4d bytes: stella.encode %.2f us, cjson.encode %.2f us (CPU, medians); "
    .. "rounds %s", name, #stella.encode(req), common.median(s_us), common.median(c_us),
    table.concat(rows, " ")))
  print(fmt("  %-8s stella.encode / cjson.encode speed %.2fx (median of %d; target >= 1.0x); "
    .. "value-tree path alone %.2fx [info]", name, m, ROUNDS, common.median(tree_ratios)))
  return m
end

print(fmt("encode vs cjson benchmark under %s, %d alternating rounds of %.1f CPU s; load average %s",
  interp, ROUNDS, SECONDS, common.loadavg()))
local full = bench("full", FULL)
local minimal = bench("minimal", MINIMAL)
print(fmt("encode vs cjson.encode (%s): full %.2fx, minimal %.2fx (target >= 1.0x); load average %s",
  interp, full, minimal, common.loadavg()))
