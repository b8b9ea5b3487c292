-- A child process for the crash spec of spec/pipeline_spec.lua: feeds COUNT events
-- (tickets FIRST .. FIRST + COUNT - 1, one customer each) to a trigger's pipeline in
-- batches of BATCH, on an SQLite store at a fixed clock, and logs each completed outcome
-- to LOG, flushed line by line:
--
--   done TICKET STATUS REASON    when its batch completes
--   finished                     after pipeline:finish()
--
-- The parent kills it with SIGKILL while the background thread waits for an answer.
--
--   pipeline_crash.lua DB URL NOW FIRST COUNT BATCH LOG RULES
local stella = require "stella"
local store = require "stella.store"

local db, url, now, first, count, size, log, rules =
  arg[1], arg[2], tonumber(arg[3]), tonumber(arg[4]), tonumber(arg[5]), tonumber(arg[6]), arg[7], arg[8]

local f = assert(io.open(log, "a"))
local function say(...)
  f:write(table.concat({ ... }, " "), "\n")
  f:flush()
end

local ok, err = pcall(function()
  local s = assert(store.sqlite(db))
  local t = stella.trigger{
    rules = rules, store = s, clock = function() return now end,
    client = { api_key = "crash-key", base_url = url, timeout = 20, retry = { attempts = 1 } },
  }
  local p = t:pipeline(function(outcomes)
    for _, o in ipairs(outcomes) do say("done", o.event_id, o.status, tostring(o.reason)) end
  end)
  local batch = {}
  for ticket = first, first + count - 1 do
    batch[#batch + 1] = { ticket = ticket, email = ("pipe.crash.%d@example.com"):format(ticket) }
    if #batch == size then
      p:process(batch)
      batch = {}
    end
  end
  if #batch > 0 then p:process(batch) end
  p:finish()
  t:close()
  s:close()
end)
if not ok then say("error", tostring(err)) end
say("finished")
f:close()
