-- A child process for spec/trigger_spec.lua: one event through a trigger on an SQLite
-- store, as another process would do it.
--
--   trigger_once.lua DB URL NOW TICKET EMAIL RULES
--
-- Prints "STATUS REASON" (REASON is "nil" when there is none), or "error MESSAGE".
local stella = require "stella"
local store = require "stella.store"

local db, url, now, ticket, email, rules = arg[1], arg[2], tonumber(arg[3]), tonumber(arg[4]), arg[5], arg[6]

local ok, err = pcall(function()
  local s = assert(store.sqlite(db))
  local t = stella.trigger{
    rules = rules, store = s, clock = function() return now end,
    client = { api_key = "once-key", base_url = url, timeout = 5, retry = { attempts = 1 } },
  }
  local out = t:process{ ticket = ticket, email = email }
  io.write(out.status, " ", tostring(out.reason), "\n")
  t:close()
  s:close()
end)
if not ok then io.write("error ", tostring(err), "\n") end
