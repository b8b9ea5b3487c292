-- bench/retention.lua: how big the SQLite store of `stella trigger` gets, and what purging
-- costs. N events (default 1,000,000) go through `stella trigger` (cli.main in this
-- process, the SQLite store in a temporary file, sends to the loopback nginx test server)
-- in RUNS runs spread over DAYS days of a moved clock (env.time: the ledger's times, the
-- marks and the retention window all follow it), as a job every day would: once with the
-- default window (90 days, purged once per run) and once with --keep forever (what every
-- store did before retention). Prints, for each: the file's size (database + WAL) and its
-- rows by table; the time of each run's purge (ms per 10,000 rows deleted); then, on the
-- "forever" store, one purge of everything past 90 days at once (a store upgraded from a
-- version without retention: the cost of that first purge, and the file size before and
-- after, and after VACUUM); and the cost of the WAL checkpoint after a settle.
--
-- Not part of `make test` or tools/run-bench (it runs for minutes). From the repository
-- root, after `make`:
--   LUA_PATH="./lua/?.lua;./lua/?/init.lua;./spec/?.lua;;" LUA_CPATH="./build/5.4/?.so;;" \
--     nice lua5.4 bench/retention.lua
-- Environment: BENCH_RETENTION_EVENTS (default 1000000), BENCH_RETENTION_DAYS (200),
-- BENCH_RETENTION_ONLY (default or forever: one of the two stores only).

local cli = require "stella.cli"
local store_mod = require "stella.store"
local retention = require "stella.trigger.retention"
local testserver = require "support.testserver"
local socket = require "socket"

local gettime, fmt = socket.gettime, string.format

local EVENTS = tonumber(os.getenv("BENCH_RETENTION_EVENTS")) or 1000000
local DAYS = tonumber(os.getenv("BENCH_RETENTION_DAYS")) or 200
local ONLY = os.getenv("BENCH_RETENTION_ONLY")
local DAY = 86400
local T0 = 1700000000
local API_KEY = "bench-retention-key"
local PER_RUN = math.ceil(EVENTS / DAYS)

local RULES_TEXT = [[
return {
  map = function(e)
    return {
      customer = { name = e.requester.name, email = e.requester.email },
      employee = { email = e.assignee.email },
      channel = e.channel,
      ext_interaction_id = e.id,
      external_url = e.url,
      tags = e.tags,
    }
  end,
  when = function(e) return e.status == "solved" end,
  channels = { phone = "integrated", chat = "integrated" },
  suppression = { days = 7, per = "brand" },
  once_per_interaction = true,
}
]]

local function write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end

local function size(path)
  local f = io.open(path, "rb")
  if not f then return 0 end
  local n = f:seek("end")
  f:close()
  return n
end

local function mb(bytes) return fmt("%.1f MB", bytes / 1e6) end

local function remove_db(path)
  os.remove(path); os.remove(path .. "-wal"); os.remove(path .. "-shm")
end

-- The events of day d, a customer and a ticket each (nothing suppressed: every one sent).
local function events_file(path, d)
  local lines = {}
  for i = 1, PER_RUN do
    local n = d * PER_RUN + i
    lines[i] = fmt('{"id":%d,"status":"solved","channel":"%s","requester":{"name":"Customer %d",' ..
      '"email":"customer.%d@example.com"},"assignee":{"email":"paulagent@blancapeak.com"},' ..
      '"tags":["billing","refund"],"url":"https://helpdesk.example.com/tickets/%d"}',
      n, n % 2 == 0 and "phone" or "chat", n, n, n)
  end
  write(path, table.concat(lines, "\n") .. "\n")
end

-- Rows per table, through the sqlite3 shell when it is installed (read only).
local function rows_by_table(path)
  local p = io.popen("sqlite3 -readonly " .. path .. " \"SELECT 'ledger', COUNT(*) FROM ledger UNION ALL " ..
    "SELECT 'marks', COUNT(*) FROM marks UNION ALL SELECT 'outbox', COUNT(*) FROM outbox; " ..
    "PRAGMA freelist_count; PRAGMA page_count;\" 2>/dev/null")
  local out = p and p:read("*a") or ""
  if p then p:close() end
  local v = {}
  for n in out:gmatch("(%d+)\n") do v[#v + 1] = n end
  if #v < 5 then return "(no sqlite3 shell)" end
  return fmt("ledger %s, marks %s, outbox %s; %s pages, %s of them free", v[1], v[2], v[3], v[5], v[4])
end

local function sink()
  return { write = function(self) return self end, flush = function(self) return self end }
end

-- Times each purge of the trigger (wrapping stella.trigger.retention.purge).
local purges = { n = 0, seconds = 0, rows = 0, worst = 0 }
do
  local purge = retention.purge
  retention.purge = function(self, now)
    local t = gettime()
    local res, err = purge(self, now)
    local dt = gettime() - t
    if res then
      purges.n, purges.seconds = purges.n + 1, purges.seconds + dt
      purges.rows = purges.rows + res.ledger + res.dead + res.marks
      if dt > purges.worst then purges.worst = dt end
    end
    return res, err
  end
end

local function per_10k(seconds, rows)
  if rows == 0 then return "no rows" end
  return fmt("%.1f ms per 10,000 rows", seconds * 1e3 / rows * 1e4)
end

local server = testserver.start()
local dir = os.tmpname()
os.remove(dir)
assert(os.execute("mkdir -p " .. dir))
local rules = dir .. "/rules.lua"
write(rules, RULES_TEXT)
local events = dir .. "/events.jsonl"

print(fmt("%d events in %d runs of %d over %d days (%s)", PER_RUN * DAYS, DAYS, PER_RUN, DAYS,
  rawget(_G, "jit") and jit.version or _VERSION))

-- Runs every day's events through `stella trigger`; returns the store's path.
local function fill(label, keep)
  local db = dir .. "/" .. label .. ".db"
  remove_db(db)
  purges.n, purges.seconds, purges.rows, purges.worst = 0, 0, 0, 0
  local started, sent = gettime(), 0
  for d = 0, DAYS - 1 do
    events_file(events, d)
    server:reset()
    local now = T0 + d * DAY
    local args = { "trigger", "--rules", rules, "--db", db, "-q" }
    if keep then args[#args + 1] = "--keep"; args[#args + 1] = keep end
    args[#args + 1] = events
    local status = cli.main(args, {
      getenv = function(name)
        if name == "STELLA_TEST_KEY" then return API_KEY end
        if name == "STELLA_BASE_URL" then return server.url end
        return nil
      end,
      stdout = sink(), stderr = io.stderr, isatty = function() return false end,
      time = function() return now end,
    })
    assert(status == 0, "stella trigger exited " .. tostring(status) .. " on day " .. d)
    sent = sent + PER_RUN
    if (d + 1) % 20 == 0 then
      io.stderr:write(fmt("  %s: day %d, %d events, %.0f events/s, %s\n", label, d + 1, sent,
        sent / (gettime() - started), mb(size(db) + size(db .. "-wal"))))
    end
  end
  local elapsed = gettime() - started
  print(fmt("%-8s %s (database %s + WAL %s) after %d events, %.0f events/s; rows: %s", label,
    mb(size(db) + size(db .. "-wal")), mb(size(db)), mb(size(db .. "-wal")), sent, sent / elapsed,
    rows_by_table(db)))
  print(fmt("         purges: %d, %d rows deleted, %.1f ms each on average, %.0f ms at most; %s", purges.n,
    purges.rows, purges.seconds * 1e3 / math.max(purges.n, 1), purges.worst * 1e3,
    per_10k(purges.seconds, purges.rows)))
  return db
end

if ONLY ~= "forever" then fill("default") end
if ONLY ~= "default" then
  local db = fill("forever", "forever")
  -- the first purge of a store kept forever: everything past 90 days at once, in steps
  local s = assert(store_mod.sqlite(db))
  local now = T0 + (DAYS - 1) * DAY
  local before = now - retention.DEFAULTS.days * DAY
  local t, total, steps, worst = gettime(), 0, 0, 0
  while true do
    local ts = gettime()
    local n = assert(s:purge(before, retention.STEP))
    local dt = gettime() - ts
    if dt > worst then worst = dt end
    steps, total = steps + 1, total + n.ledger + n.dead
    if n.ledger < retention.STEP and n.dead < retention.STEP then break end
  end
  local marks = assert(s:purge_marks(now))
  local dt = gettime() - t
  s:close()
  print(fmt("first purge of the forever store (90 days): %d ledger rows and %d expired marks in %.1f s, " ..
    "%d steps of %d (the longest %.0f ms: the write lock's longest hold); %s",
    total, marks, dt, steps, retention.STEP, worst * 1e3, per_10k(dt, total + marks)))
  print(fmt("         file after it: %s (freed pages are reused; rows: %s)", mb(size(db) + size(db .. "-wal")),
    rows_by_table(db)))
  local vt = gettime()
  assert(os.execute("sqlite3 " .. db .. " VACUUM"))
  print(fmt("         after VACUUM: %s (%.1f s)", mb(size(db) + size(db .. "-wal")), gettime() - vt))
end

-- The checkpoint that empties the WAL after a transaction that deleted outbox items.
do
  local db = dir .. "/checkpoint.db"
  local body = '{"customer":{"name":"Customer %d","email":"customer.%d@example.com"},"x":"' ..
    string.rep("y", 300) .. '"}'
  local results = {}
  for _, scrub in ipairs{ true, false } do
    remove_db(db)
    local s = assert(store_mod.sqlite(db, { scrub_wal = scrub }))
    local n = 3000
    local t = gettime()
    for i = 1, n do
      local id = s:enqueue{ kind = "request", body = body:format(i, i), created_at = T0 }
      s:atomic(function()
        s:finish(id)
        s:record{ time = T0, status = "sent" }
      end)
    end
    results[scrub] = (gettime() - t) / n
    s:close()
  end
  remove_db(db)
  print(fmt("checkpoint after a settle: %.2f ms (an enqueue + a settle of one item: %.2f ms with it, " ..
    "%.2f ms without)", (results[true] - results[false]) * 1e3, results[true] * 1e3, results[false] * 1e3))
end

server:stop()
os.execute("rm -rf " .. dir)
