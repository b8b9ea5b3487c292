-- A child process of spec/settle_spec.lua: a trigger on an SQLite store (busy timeout
-- 0.2 s) whose settle meets a lock held by another process (support/sqlite_lock.lua).
--
--   settle_lock.lua MODE DB URL DIR COUNT RELEASE
--
-- MODE pipeline: decides COUNT events (ext_interaction_id s1 .. sCOUNT) in one batch of
--   the pipeline, writes DIR/ready, waits for DIR/locked, then finishes the pipeline (its
--   settle meets the lock).
-- MODE flush: flushes the outbox; after its claim, writes DIR/ready and waits for
--   DIR/locked before sending.
-- RELEASE first: writes DIR/release after the first failed transaction (the lock goes
--   away between the settle's tries); end: only after everything (the settle fails).
-- Writes DIR/result (JSON): { outcomes = { { event_id, status, reason, unrecorded } },
-- failures = n (transactions that failed), summary = flush's, err = flush's error }.
local stella = require "stella"
local store_mod = require "stella.store"
local cjson = require "cjson"
local socket = require "socket"

local mode, db, url, dir, count, release = arg[1], arg[2], arg[3], arg[4], tonumber(arg[5]), arg[6]

local function touch(name)
  local f = assert(io.open(dir .. "/" .. name, "w"))
  f:close()
end
local function wait_for(name)
  for _ = 1, 3000 do
    local f = io.open(dir .. "/" .. name, "r")
    if f then f:close() return end
    socket.sleep(0.01)
  end
  error("waited 30 s for " .. name)
end

local real = assert(store_mod.sqlite(db, { busy_timeout = 0.2 }))
local failures = 0
-- the store as the trigger sees it: every method goes to the real store; atomic counts
-- the transactions that failed, claim lets the lock come in before the sends
local store = setmetatable({
  atomic = function(_, fn, ...)
    local r = { n = 0 }
    local function pack(...) r.n = select("#", ...) for i = 1, r.n do r[i] = select(i, ...) end end
    pack(real:atomic(fn, ...))
    if r[1] == nil and r[2] ~= nil then
      failures = failures + 1
      if release == "first" and failures == 1 then touch("release") end
    end
    return (table.unpack or unpack)(r, 1, r.n)
  end,
  claim = function(_, ...)
    local items, err = real:claim(...)
    if items and #items > 0 then
      touch("ready")
      wait_for("locked")
    end
    return items, err
  end,
}, { __index = function(_, k)
  local v = real[k]
  if type(v) == "function" then return function(_, ...) return v(real, ...) end end
  return v
end })

local t = stella.trigger{ rules = {}, store = store,
  client = { api_key = "settle-key", base_url = url, retry = { attempts = 1 } } }
local result = { outcomes = {} }
local function keep(outcomes)
  for _, o in ipairs(outcomes) do
    result.outcomes[#result.outcomes + 1] = { event_id = o.event_id, status = o.status, reason = o.reason,
                                              unrecorded = o.unrecorded or false }
  end
end

local ok, err = pcall(function()
  if mode == "pipeline" then
    local events = {}
    for i = 1, count do
      events[i] = { customer = { name = "C", email = ("s%d@example.com"):format(i) },
                    employee = { email = "a@b.com" }, channel = "phone", ext_interaction_id = "s" .. i }
    end
    local p = t:pipeline(keep)
    p:process(events)
    touch("ready")
    wait_for("locked")
    p:finish()
  else
    local summary, ferr = t:flush()
    result.summary, result.err = summary, ferr and tostring(ferr) or nil
  end
end)
if not ok then result.error = tostring(err) end
result.failures = failures
result.pending = require("stella.trigger.settle").pending(t)
local f = assert(io.open(dir .. "/result", "w"))
f:write(cjson.encode(result))
f:close()
t:close()
real:close()
touch("release")
touch("done")
