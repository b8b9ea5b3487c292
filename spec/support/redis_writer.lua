-- A child process for spec/redis_store_cli_spec.lua's AOF case: commits decide-like
-- transactions (an outbox item, two marks it reserves, a ledger entry) on a Redis store
-- one after another, logging each committed item id to LOG (flushed line by line), until
-- the store fails (the parent kills the server) or COUNT are done.
--
--   redis_writer.lua URL LOG COUNT
local store = require "stella.store"

local url, log, count = arg[1], arg[2], tonumber(arg[3])
local f = assert(io.open(log, "a"))
local s = assert(store.redis(url))
local now = os.time()
for _ = 1, count do
  local id, err = s:atomic(function()
    local ids = s:enqueue_many{ { kind = "request", body = "{}", created_at = now, next_at = now + 3600 } }
    local i = ids[1]
    s:put_mark_many{ { key = "a" .. i, ["until"] = now + 3600, outbox_id = i },
                     { key = "b" .. i, ["until"] = now + 3600, outbox_id = i } }
    s:record_many{ { time = now, status = "queued", event_id = tostring(i) } }
    return i
  end)
  if not id then
    f:write("error ", tostring(err), "\n")
    break
  end
  f:write("ok ", id, "\n")
  f:flush()
end
f:close()
s:close()
