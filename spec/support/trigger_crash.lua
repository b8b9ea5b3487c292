-- A child process for the crash-safety spec of spec/trigger_spec.lua: processes COUNT
-- events (tickets FIRST .. FIRST + COUNT - 1, one customer each) through a trigger on an
-- SQLite store, at a fixed clock, and logs its progress to LOG, flushed line by line:
--
--   start TICKET                 before process(event)
--   done TICKET STATUS REASON    after it
--   finished                     after the last one
--
-- The parent kills it with SIGKILL part-way through, so any line may be the last.
--
--   trigger_crash.lua DB URL NOW FIRST COUNT LOG RULES
local stella = require "stella"
local store = require "stella.store"

local db, url, now, first, count, log, rules =
  arg[1], arg[2], tonumber(arg[3]), tonumber(arg[4]), tonumber(arg[5]), arg[6], arg[7]

local f = assert(io.open(log, "a"))
local function say(...)
  f:write(table.concat({ ... }, " "), "\n")
  f:flush()
end

local ok, err = pcall(function()
  local s = assert(store.sqlite(db))
  local t = stella.trigger{
    rules = rules, store = s, clock = function() return now end,
    -- one attempt per process() call: a retryable failure goes to the outbox at once
    client = { api_key = "crash-key", base_url = url, timeout = 20, retry = { attempts = 1 } },
  }
  for ticket = first, first + count - 1 do
    say("start", ticket)
    local out = t:process{ ticket = ticket, email = ("crash.customer.%d@example.com"):format(ticket) }
    say("done", ticket, out.status, tostring(out.reason))
  end
  t:close()
  s:close()
end)
if not ok then say("error", tostring(err)) end
say("finished")
f:close()
