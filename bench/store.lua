-- bench/store.lua: CPU time per event of the trigger's decide and settle stages over the
-- memory and SQLite stores (trigger:process_many, batches of 200, every event a new
-- customer and sent; the client answers at once, so no network and no sends are timed).
-- CPU time (os.clock), not wall time: the figure is what the rules, the encoding and the
-- store cost this process, and other processes on the machine barely move it. Each store
-- runs ROUNDS times, alternating; the best round counts.
--
-- From the repository root:
--   LUA_PATH="./lua/?.lua;./lua/?/init.lua;;" LUA_CPATH="./build/5.4/?.so;;" lua5.4 bench/store.lua
-- To compare with another tree (an older commit), run this file from that tree's root
-- (its LUA_PATH), alternating: for d in /tmp/old .; do (cd $d && ... lua5.4 $OLDPWD/bench/store.lua); done
-- Environment: BENCH_STORE_ROUNDS (default 5), BENCH_STORE_EVENTS (per round, default 4000).
local stella = require "stella"
local store_mod = require "stella.store"

local fmt, clock = string.format, os.clock

local ROUNDS = tonumber(os.getenv("BENCH_STORE_ROUNDS")) or 5
local EVENTS = tonumber(os.getenv("BENCH_STORE_EVENTS")) or 4000
local BATCH = 200
local NOW = 1700000000

local RULES = {
  map = function(e)
    return {
      customer = { name = e.name, email = e.email }, employee = { email = "agent@example.com" },
      channel = e.channel, ext_interaction_id = e.id, tags = { "billing" }, brand = e.brand,
    }
  end,
  channels = { phone = "integrated", chat = "integrated" },
  brands = { acme = { language = "en" }, ["acme-es"] = { language = "es" } },
  default_brand = "acme",
  suppression = { days = 7, per = "brand" },
  once_per_interaction = true,
}

local CLIENT = { post = function() return { status = 200, request_id = "r", attempts = 1 } end }

local seq = 0
local function batch()
  local list = {}
  for i = 1, BATCH do
    seq = seq + 1
    list[i] = { id = seq, name = "Customer " .. seq, email = fmt("customer.%d@example.com", seq),
                channel = seq % 2 == 0 and "phone" or "chat", brand = seq % 3 == 0 and "acme-es" or nil }
  end
  return list
end

-- One round on a new store: CPU seconds per event (event tables made outside the timing).
local function round(open)
  local s, path = open()
  local t = stella.trigger{ rules = RULES, store = s, client = CLIENT, clock = function() return NOW end }
  t:process_many(batch())   -- warm up: statements prepared, code paths run once
  local cpu = 0
  for _ = 1, EVENTS / BATCH do
    local events = batch()
    local t0 = clock()
    local out = t:process_many(events)
    cpu = cpu + (clock() - t0)
    assert(out[BATCH].status == "sent", "every event is sent")
  end
  s:close()
  if path then for _, x in ipairs{ "", "-wal", "-shm" } do os.remove(path .. x) end end
  return cpu / EVENTS
end

local STORES = {
  { "memory", function() return store_mod.memory() end },
  { "sqlite", function()
      local path = os.tmpname()
      return assert(store_mod.sqlite(path)), path
    end },
}

local best = {}
for _ = 1, ROUNDS do
  for _, st in ipairs(STORES) do
    local us = round(st[2]) * 1e6
    if not best[st[1]] or us < best[st[1]] then best[st[1]] = us end
  end
end
print(fmt("store: trigger decide+settle CPU per event (best of %d rounds of %d events, batches of %d): " ..
  "memory %.1f us, sqlite %.1f us", ROUNDS, EVENTS, BATCH, best.memory, best.sqlite))
