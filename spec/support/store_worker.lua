-- A child process for the SQLite store's concurrency specs (spec/store_spec.lua).
--
--   store_worker.lua marks DB WORKER GO NOW   25 times, in store:atomic: take the mark
--                                             "suppress:x" if nobody holds it, and enqueue
--   store_worker.lua claim DB WORKER GO NOW   claim(NOW, 60, 10) until nothing is left
--
-- It opens the store, waits until the file GO exists (so that the workers start together),
-- and prints one line per event: "won OUTBOX_ID", "enqueued ID", "claimed ID", then "done",
-- or "error MESSAGE" if anything failed.
local store = require "stella.store"

local mode, path, worker, go, now = arg[1], arg[2], tonumber(arg[3]), arg[4], tonumber(arg[5])

local sleep
do
  local ok, socket = pcall(require, "socket")
  if ok and type(socket) == "table" then sleep = socket.sleep end
end

local out = {}
local function say(...)
  out[#out + 1] = table.concat({ ... }, " ")
end

local function wait_for(file)
  local deadline = os.time() + 30
  while os.time() <= deadline do
    local f = io.open(file, "r")
    if f then
      f:close()
      return
    end
    if sleep then sleep(0.002) end
  end
  error("timed out waiting for " .. file)
end

local function marks(s)
  for i = 1, 25 do
    local outbox_id = worker * 1000 + i
    local won, id = s:atomic(function()
      local until_, err = s:get_mark("suppress:x", now)
      if until_ == nil and err ~= nil then error(err) end
      local taken = false
      if until_ == nil then
        assert(s:put_mark("suppress:x", now + 3600, outbox_id))
        taken = true
      end
      local item_id = assert(s:enqueue{
        kind = "request", body = "{\"worker\":" .. worker .. ",\"n\":" .. i .. "}",
        created_at = now, next_at = now, event_id = worker .. ":" .. i,
      })
      return taken, item_id
    end)
    if won == nil then error("atomic failed: " .. tostring(id)) end
    if won then say("won", outbox_id) end
    say("enqueued", id)
  end
end

local function claim(s)
  while true do
    local items = assert(s:claim(now, 60, 10))
    if #items == 0 then return end
    for _, it in ipairs(items) do say("claimed", it.id) end
  end
end

local ok, err = pcall(function()
  local s = assert(store.sqlite(path))
  wait_for(go)
  if mode == "marks" then marks(s)
  elseif mode == "claim" then claim(s)
  else error("unknown mode " .. tostring(mode)) end
  s:close()
end)
if ok then say("done") else say("error", tostring(err)) end
io.write(table.concat(out, "\n"), "\n")
io.stdout:flush()
