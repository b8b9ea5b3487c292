-- tools/soak.lua: a randomized fault schedule against the loopback test server, then a
-- strict check of what the server received against the ledger and the outbox.
--
--   lua5.4 tools/soak.lua [--seconds N] [--seed N] [--tap] [--keep]
--   make soak SOAK_SECONDS=120 [SOAK_SEED=N]
--
-- Rounds until the time is up: a file of events (some meant to be skipped, suppressed or
-- invalid), `stella trigger` on it (tools/soak_stella.lua: the command with a 2 s client
-- timeout) while the server answers with a random mix of 200, 5xx, 429 + Retry-After,
-- resets, timeouts and slow answers; and, at random, a kill -9 of the trigger (then it
-- is started again on the same file), a SIGINT, a database lock held by another process
-- (support/sqlite_lock.lua) for up to 18 s, and a `stella retry` (sometimes SIGINTed).
-- Then the faults stop, `stella retry` drains the outbox, and every event is checked:
--
--   sent        the ledger has exactly one sent/recorded entry for it, the server answered
--               it 2xx at least once, and it is not in the outbox
--   not sent    skipped/suppressed/invalid/failed with a reason in the ledger, no 2xx
--               answer for it, not in the outbox
--   queued/dead in the outbox (dead with its last error), no sent entry
--   repeated    answered 2xx more than once: allowed only for events of a trigger run
--               killed with -9 (its batch on the wire), at most kills x 200 (one batch)
-- Anything else is a violation (lost: no state at all; or two sent entries, a sent entry
-- with no delivery, a delivery with no sent entry outside a killed run, ...).
-- It prints the seed, the events, the faults injected by kind, lost and repeated; a run
-- that fails can be replayed with --seed (the schedule is the same; the timings of the
-- processes are not). --tap prints TAP lines for tools/run-tests.
package.path = "./lua/?.lua;./lua/?/init.lua;./spec/?.lua;" .. package.path
package.cpath = (jit and "./build/luajit/?.so;" or "./build/5.4/?.so;") .. package.cpath
local testserver = require "support.testserver"
local child = require "support.child"
local nginx = require "stella.nginx"
local store_mod = require "stella.store"
local cjson = require "cjson"
local socket = require "socket"

local q = child.quote
local LUA = os.getenv("SOAK_LUA") or (jit and "luajit" or "lua5.4")
local KEY = "tk_soak_0123456789abcdef"

-- Options --------------------------------------------------------------------------------
local opts = { seconds = 120, seed = os.time(), tap = false, keep = false }
do
  local i = 1
  while i <= #arg do
    local a = arg[i]
    if a == "--seconds" then opts.seconds = assert(tonumber(arg[i + 1]), "--seconds N") i = i + 1
    elseif a == "--seed" then opts.seed = assert(tonumber(arg[i + 1]), "--seed N") i = i + 1
    elseif a == "--tap" then opts.tap = true
    elseif a == "--keep" then opts.keep = true
    else io.stderr:write("usage: tools/soak.lua [--seconds N] [--seed N] [--tap] [--keep]\n") os.exit(2) end
    i = i + 1
  end
end
local out = opts.tap and function(fmt, ...) print("# " .. fmt:format(...)) end
                     or function(fmt, ...) print(fmt:format(...)) end
out("soak: seed %d, %d s (replay: tools/soak.lua --seed %d --seconds %d)", opts.seed, opts.seconds, opts.seed,
  opts.seconds)
math.randomseed(opts.seed)
local random = math.random
local function chance(p) return random() < p end

-- Set-up ---------------------------------------------------------------------------------
local server = testserver.start()
local dir = assert(nginx.temp_dir("stella-soak"))
local db = dir .. "/soak.db"
local rules = dir .. "/rules.lua"
assert(nginx.write_file(rules, [[
return {
  -- the event's id is ours, not a request field
  map = function(e) local r = {} for k, v in pairs(e) do if k ~= "id" then r[k] = v end end return r end,
  exclude_tags = { "spam" },
  once_per_interaction = true,
  suppression = { days = 7 },
  outbox = { lease = 30, base_delay = 1, max_delay = 4, max_attempts = 6 },
}
]]))

local faults = {}   -- kind -> count
local function fault(kind, n) faults[kind] = (faults[kind] or 0) + (n or 1) end

local events = {}          -- id -> { interaction, class, round }
local event_order = {}
local by_request = {}      -- ext_interaction_id .. "|" .. customer e-mail -> event id
local killed_events = {}   -- event id -> true: in the file of a trigger run killed with -9
local kills = 0
local received = {}        -- every request the server got, across resets

local function collect()
  for _, r in ipairs(server:requests()) do received[#received + 1] = r end
  server:reset()
end

-- Events ---------------------------------------------------------------------------------
local customer_seq = 0
local function make_round(k)
  local n = random(120, 260)
  local lines, seen_customers, interactions = {}, {}, {}
  for i = 1, n do
    local id = ("e%d-%d"):format(k, i)
    local class, email, interaction, tags = "send", nil, id, nil
    local r = random()
    if r < 0.06 and #seen_customers > 0 then   -- a customer of this round again: suppressed
      class, email = "suppress", seen_customers[random(#seen_customers)]
    elseif r < 0.10 then class, tags = "skip", { "spam" }
    elseif r < 0.13 then class, email = "invalid", "not-an-address"
    elseif r < 0.15 and #interactions > 0 then   -- an interaction of this round again: duplicate
      class, interaction = "duplicate", interactions[random(#interactions)]
    end
    if class ~= "duplicate" then interactions[#interactions + 1] = interaction end
    if not email then
      customer_seq = customer_seq + 1
      email = ("c%d@example.com"):format(customer_seq)
      if class == "send" then seen_customers[#seen_customers + 1] = email end
    end
    events[id] = { interaction = interaction, class = class, round = k }
    event_order[#event_order + 1] = id
    by_request[interaction .. "|" .. email] = id   -- unique: a repeat has a new one of the two
    lines[i] = cjson.encode{ id = id, customer = { name = "C", email = email },
      employee = { email = "agent@example.com" }, channel = "phone", ext_interaction_id = interaction, tags = tags }
  end
  local path = ("%s/in-%d.jsonl"):format(dir, k)
  assert(nginx.write_file(path, table.concat(lines, "\n") .. "\n"))
  return path, n
end

-- The server's answers for the next `n` requests: a random mix of faults.
local function script(n)
  local items = {}
  for i = 1, n do
    local r = random()
    local item = {}
    if r < 0.06 then item = { status = ({ 500, 502, 503, 504 })[random(4)] }
    elseif r < 0.10 then item = { status = 429, headers = { ["Retry-After"] = "1" } }
    elseif r < 0.13 then item = { drop = true }
    elseif r < 0.145 then item = { delay = 2.5, drop = true }   -- past the 2 s timeout
    elseif r < 0.20 then item = { delay = 0.05 + random() * 0.4 }
    elseif r < 0.21 then item = { status = 400, body = { error = "Invalid customer" } }
    end
    items[i] = item
  end
  server:script(items)
end

-- Processes ------------------------------------------------------------------------------
local function stella_command(args)
  local parts = { "env", "STELLA_TEST_KEY=" .. q(KEY), "STELLA_BASE_URL=" .. q(server.url),
    "LUA_PATH=" .. q(package.path), "LUA_CPATH=" .. q(package.cpath), LUA, "tools/soak_stella.lua" }
  for _, a in ipairs(args) do parts[#parts + 1] = q(a) end
  return table.concat(parts, " ")
end

-- Starts a command in the background: a handle with pid, kill(sig), wait() -> status.
local function spawn(cmd, log)
  -- (the outer shell's own stderr, "Killed" after a kill -9, is dropped)
  local p = assert(io.popen("sh -c " .. q("echo $$; exec " .. cmd .. " >>" .. q(log) .. " 2>&1") .. " 2>/dev/null; echo @$?"))
  local pid = assert(tonumber(p:read("*l")))
  return {
    pid = pid,
    alive = function() return os.execute("kill -0 " .. pid .. " 2>/dev/null") == true end,
    kill = function(sig) os.execute("kill -" .. sig .. " " .. pid .. " 2>/dev/null") end,
    wait = function()
      local rest = p:read("*a")
      p:close()
      return tonumber(rest:match("@(%d+)"))
    end,
  }
end

local function lock_for(seconds, k)
  local ldir = ("%s/lock-%d"):format(dir, k)
  os.execute("mkdir -p " .. q(ldir))
  local cmd = ("env LUA_PATH=%s LUA_CPATH=%s %s spec/support/sqlite_lock.lua %s %s %s"):format(q(package.path),
    q(package.cpath), LUA, q(db), q(ldir), tostring(seconds))
  return spawn(cmd, dir .. "/lock.log")
end

-- Runs `stella trigger` on a file, with a process fault (nil, "kill9" or "sigint") and a
-- database lock (nil or its seconds), each at a random moment of the run (a lock may meet
-- a batch's decide, its settle, or nothing). Returns the exit status, the fault that hit,
-- and the lock's process (wait for it).
local function trigger_run(path, what, lock_seconds, k)
  local h = spawn(stella_command{ "trigger", "--rules", rules, "--db", db, "-q", "--json", path }, dir .. "/trigger.log")
  local t_lock = lock_seconds and random() * 2.5 or math.huge
  local t_kill = what and 0.2 + random() * 2.5 or math.huge
  local lock
  if t_lock < t_kill then
    socket.sleep(t_lock)
    lock = lock_for(lock_seconds, k)
    if what then socket.sleep(t_kill - t_lock) end
  elseif what then
    socket.sleep(t_kill)
  end
  if what then
    if h.alive() then
      if what == "kill9" then h.kill("KILL") else h.kill("INT") end
      fault(what)
    else
      what = nil
    end
  end
  if lock_seconds and not lock then
    socket.sleep(t_lock - t_kill)
    lock = lock_for(lock_seconds, k)
  end
  local status = h.wait()
  return status, what, lock
end

local function retry_run(sigint)
  local h = spawn(stella_command{ "retry", "--rules", rules, "--db", db }, dir .. "/retry.log")
  if sigint then
    socket.sleep(0.1 + random() * 1.5)
    if h.alive() then h.kill("INT") fault("sigint") end
  end
  return h.wait()
end

-- The schedule -----------------------------------------------------------------------------
local deadline = socket.gettime() + opts.seconds
local k = 0
local n_events = 0
while socket.gettime() < deadline do
  k = k + 1
  local path, n = make_round(k)
  n_events = n_events + n
  script(math.floor(n * 1.6))
  local lock_seconds
  if chance(0.25) then
    lock_seconds = chance(0.3) and 19 + random() * 5 or 0.5 + random() * 6
    fault(lock_seconds > 15 and "db_lock_long" or "db_lock")
  end
  local r = random()
  local status, what, lock = trigger_run(path, r < 0.15 and "kill9" or (r < 0.25 and "sigint") or nil, lock_seconds, k)
  if what == "kill9" then
    kills = kills + 1
    for i = 1, n do killed_events[("e%d-%d"):format(k, i)] = true end
  end
  -- restart: the file again until it ran to its end without a store error in the decide
  for _ = 1, 6 do
    local log = child.read_file(dir .. "/trigger.log")
    local again = what ~= nil or status == 137 or status == 130 or log:find("not processed", 1, true)
      or log:find("store_error", 1, true)
    if not again then break end
    os.rename(dir .. "/trigger.log", dir .. "/trigger.log." .. k)
    if lock then lock.wait() lock = nil end
    status, what = trigger_run(path, nil)
  end
  os.rename(dir .. "/trigger.log", dir .. "/trigger.log." .. k)
  if lock then lock.wait() end
  if chance(0.5) then retry_run(chance(0.2)) end
  collect()
end

-- Drain: no more faults; the outbox sent until nothing is due (dead items stay).
out("soak: %d rounds, draining the outbox", k)
for _ = 1, 40 do
  local s = assert(store_mod.sqlite(db))
  local counts = assert(s:outbox_counts())
  local first = counts.queued > 0 and s:outbox("queued", 1)[1] or nil
  s:close()
  if counts.queued == 0 then break end
  local wait = first.next_at - os.time()
  if wait > 0 then socket.sleep(math.min(wait + 0.5, 10)) end
  retry_run(false)
end
collect()

-- The check --------------------------------------------------------------------------------
local delivered, attempts = {}, {}   -- event id -> 2xx answers, requests
local violations = {}
for _, r in ipairs(received) do
  local ok, body = pcall(cjson.decode, r.body)
  local id = ok and type(body) == "table" and type(body.customer) == "table"
    and by_request[tostring(body.ext_interaction_id) .. "|" .. tostring(body.customer.email)]
  local a = r.answer or {}
  local st = tonumber(a.status) or 200
  -- the faults the server injected, by kind (what the requests met, not what was scripted)
  if a.drop then fault((a.delay or 0) > 2 and "timeout" or "reset")
  elseif st == 429 then fault("429")
  elseif st >= 500 then fault("5xx")
  elseif st == 400 then fault("400")
  elseif (a.delay or 0) > 0 then fault("slow") end
  if not id then violations[#violations + 1] = "the server received a request of no event: " .. tostring(r.body) end
  if id then
    attempts[id] = (attempts[id] or 0) + 1
    if not a.drop and st >= 200 and st < 300 then delivered[id] = (delivered[id] or 0) + 1 end
  end
end
local s = assert(store_mod.sqlite(db))
local ledger = assert(s:ledger{ limit = 10000000 })
local outbox = {}
for _, state in ipairs{ "queued", "dead" } do
  for _, it in ipairs(assert(s:outbox(state, 10000000))) do outbox[it.event_id] = it end
end
s:close()
local entries = {}   -- event id -> list of ledger entries
for _, e in ipairs(ledger) do
  if e.event_id then
    entries[e.event_id] = entries[e.event_id] or {}
    local list = entries[e.event_id]
    list[#list + 1] = e
  end
end

local states, lost, repeated = {}, 0, 0
local function violation(id, what)
  violations[#violations + 1] = id .. ": " .. what
end
for _, id in ipairs(event_order) do
  local list = entries[id] or {}
  local sent, other = 0, nil
  for _, e in ipairs(list) do
    if e.status == "sent" or e.status == "recorded" then sent = sent + 1
    elseif e.status ~= "queued" then other = other or e end
  end
  local d, item = delivered[id] or 0, outbox[id]
  local state
  if sent > 1 then violation(id, sent .. " sent entries in the ledger")
  elseif sent == 1 then
    state = "sent"
    if item then violation(id, "sent, and still in the outbox (" .. item.state .. ")") end
    if d == 0 then violation(id, "the ledger says sent; the server never answered it 2xx") end
  elseif item then
    state = item.state
    if item.state == "dead" and not item.last_error then violation(id, "dead without a reason") end
    if d > 0 and not killed_events[id] then violation(id, "delivered, yet " .. item.state .. " in the outbox") end
  elseif other then
    state = other.status .. "/" .. tostring(other.reason)
    if not other.reason then violation(id, other.status .. " without a reason") end
    if d > 0 and not killed_events[id] then violation(id, "delivered, yet " .. state .. " in the ledger") end
  else
    lost = lost + 1
    violation(id, "lost: nothing in the ledger or the outbox (" .. d .. " deliveries)")
  end
  if d > 1 then
    repeated = repeated + d - 1
    if not killed_events[id] then violation(id, "delivered " .. d .. " times, with no kill -9 in its run") end
  end
  if state then states[state] = (states[state] or 0) + 1 end
end
if repeated > kills * 200 then violations[#violations + 1] = ("%d repeats for %d kills"):format(repeated, kills) end

-- Figures ----------------------------------------------------------------------------------
local function sorted_pairs(t)
  local keys = {}
  for key in pairs(t) do keys[#keys + 1] = key end
  table.sort(keys)
  local parts = {}
  for _, key in ipairs(keys) do parts[#parts + 1] = key .. " " .. t[key] end
  return table.concat(parts, ", ")
end
out("soak: seed %d, %d rounds, %d events, %d requests received", opts.seed, k, n_events, #received)
out("faults injected: %s", sorted_pairs(faults))
out("end states: %s", sorted_pairs(states))
out("lost %d, repeated %d (kill -9: %d, bound %d)", lost, repeated, kills, kills * 200)
for i = 1, math.min(#violations, 20) do out("violation: %s", violations[i]) end
if #violations > 20 then out("... %d violations in all", #violations) end

if opts.tap then
  print("ok 1 - soak ran " .. k .. " rounds, " .. n_events .. " events (seed " .. opts.seed .. ")")
  print((lost == 0 and "ok" or "not ok") .. " 2 - nothing lost (" .. lost .. ")")
  print((#violations == 0 and "ok" or "not ok") .. " 3 - every event accounted for, repeats only from kill -9 ("
    .. #violations .. " violations)")
  print("1..3")
end
server:stop()
if opts.keep or #violations > 0 then out("soak: files kept in %s", dir) else nginx.remove_dir(dir) end
os.exit(#violations == 0 and 0 or 1)
