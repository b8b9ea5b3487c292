-- stella.trigger.unsettled: the settles the store could not take, kept outside the store
-- until it can. A settle (settle.lua) is a plan: the outbox items to finish, requeue or
-- kill, the marks to confirm or release, the ledger entries to write. When its
-- transaction fails past its retries (a database locked for longer than the busy timeout,
-- several times over), the requests it settles have been sent already: sending them again
-- would be a duplicate, and forgetting them would leave them leased in the outbox for a
-- later flush() to send again. So the plan is written, as one JSON line, to a file beside
-- the database (its path .. "-unsettled"), and kept in memory; it is applied later, by
-- this process at its next settle or by any process before it claims from the outbox.
--
-- Each plan carries a token; applying it writes the meta value "unsettled:TOKEN" in the
-- same transaction, and a plan whose token is there is skipped. So a plan is applied
-- exactly once, whoever gets there first, however often its line is read. The file is
-- removed once every plan in it is applied (and nothing was appended meanwhile).
--
-- Why this is enough: the items of a plan stay leased (next_at = decide time + lease,
-- or claim time + lease) until the plan is applied; the line is written well before that
-- lease ends (a batch sends for at most half of it, the settle's tries take a few busy
-- timeouts); and flush() applies the file before each claim, claiming nothing when it
-- cannot. No other process can get the items before their settle is in the store.
local cjson = require "cjson"

local io, os, type, tostring, pcall, ipairs, format = io, os, type, tostring, pcall, ipairs, string.format

local M = {}

M.META = "unsettled:"   -- meta name prefix of an applied plan's token
M.SUFFIX = "-unsettled"

-- The file for a store's unsettled plans: beside an SQLite file; nil for stores without
-- one (memory: lost with the process anyway; shdict, Redis: plans stay in memory only).
function M.path_of(store)
  local b = type(store) == "table" and store.backend
  local path = type(b) == "table" and type(b.path) == "string" and b.path or nil
  if not path or path == "" or path == ":memory:" or path:sub(1, 5) == "file:" then return nil end
  return path .. M.SUFFIX
end

local counter = 0

-- A token no other plan has: the time, a counter, and random bytes.
function M.token()
  counter = counter + 1
  local rnd = ""
  local f = io.open("/dev/urandom", "rb")
  if f then
    local bytes = f:read(8) or ""
    f:close()
    rnd = (bytes:gsub(".", function(c) return format("%02x", c:byte()) end))
  end
  return format("%d.%d.%s", os.time(), counter, rnd ~= "" and rnd or tostring(math.random(1e9)))
end

-- Appends a plan as one line (one write: appends of processes sharing the file do not
-- interleave). true, or nil, message.
function M.write(path, plan)
  local ok, line = pcall(cjson.encode, plan)
  if not ok then return nil, "cannot encode the settle: " .. tostring(line) end
  local f, err = io.open(path, "ab")
  if not f then return nil, err end
  local wok, werr = f:write(line .. "\n")
  local cok, cerr = f:close()
  if not wok then return nil, werr end
  if not cok then return nil, cerr end
  return true
end

-- The plans in the file (a line that does not decode, e.g. cut short by a crash, is
-- skipped: a plan is only written whole or not at all), and the file's size; {}, 0 when
-- there is no file.
function M.read(path)
  local f = io.open(path, "rb")
  if not f then return {}, 0 end
  local text = f:read("*a") or ""
  f:close()
  local plans = {}
  for line in text:gmatch("[^\n]+") do
    local ok, plan = pcall(cjson.decode, line)
    if ok and type(plan) == "table" and type(plan.token) == "string" then plans[#plans + 1] = plan end
  end
  return plans, #text
end

-- Removes the file when it still has `size` bytes (no plan was appended since it was
-- read; a plan appended later stays for the next reader).
function M.remove_if(path, size)
  local f = io.open(path, "rb")
  if not f then return end
  local now_size = f:seek("end")
  f:close()
  if now_size == size then os.remove(path) end
end

-- The number of items in plans (what a plan settles: sent, requeued, killed, finished).
function M.items_of(plan)
  local n = #(plan.sent or {})
  for _, k in ipairs{ "requeue", "kill", "finish" } do n = n + #(plan[k] or {}) end
  return n
end

return M
