-- stella.openresty.queue: accepted events waiting for a consumer, in a lua_shared_dict of
-- their own (never the store's: a full queue cannot starve the marks, nor the marks the
-- queue), shared by every worker of one nginx. First in, first out (across workers:
-- nearly, see push).
--
--   local queue = require "stella.openresty.queue"
--   local q = queue.new("stella_queue", { capacity = 10000 })
--   q:push({ json1, json2 }, ngx.now()) -> true | nil, err   (err.full: refuse the event)
--   q:pop()                  -> { id, at, payload } | nil     (the oldest entry, taken)
--   q:restore(entries)       -> n put back (capacity not checked: they were accepted)
--   q:depth()                -> entries queued
--   q:oldest_age(now)        -> seconds the oldest queued entry has waited (0 when empty)
--   q:memory()               -> { capacity = bytes, free = bytes } of the dict
--
-- This is the interface stella.openresty.service uses; another backend (a Redis list or
-- stream, for acceptance that survives the machine) plugs in by offering the same methods.
-- Payloads are strings (the event's JSON); entries carry the time they were accepted.
--
-- Keys in the dict: "n" entries queued (reserved by incr before writing, so the capacity
-- holds across workers), "id" the id counter, "q" the list of queued ids, "e:ID" an
-- entry ("AT PAYLOAD"), "h" the id popped last (for oldest_age). Writes never evict
-- (safe_set): a dict out of memory refuses the push like a full queue.
local ngx = rawget(_G, "ngx")
local error, tonumber, tostring, type, setmetatable, floor =
      error, tonumber, tostring, type, setmetatable, math.floor
local find, sub, format = string.find, string.sub, string.format

local M = {}

local Queue = {}
Queue.__index = Queue
M.Queue = Queue

local OLDEST_SCAN = 32   -- ids looked at past the last popped one for oldest_age

-- A run-time failure: { kind = "queue", full = bool, message }.
local function failure(message, full)
  return setmetatable({ kind = "queue", full = full, message = message },
    { __tostring = function(e) return e.message end })
end
M.failure = failure

local function id_text(id)
  return format("%d", id)
end

-- new(dict [, { capacity = n }]): dict is a lua_shared_dict name or ngx.shared.NAME.
function M.new(dict, opts)
  local name = "queue"
  if type(dict) == "string" then
    name = dict
    dict = ngx and ngx.shared and ngx.shared[name]
    if not dict then
      error("stella.openresty.queue: no lua_shared_dict named \"" .. name .. "\" (add `lua_shared_dict "
        .. name .. " 10m;` to nginx's http block)", 2)
    end
  elseif type(dict) ~= "table" and type(dict) ~= "userdata" then
    error("stella.openresty.queue: a lua_shared_dict name or ngx.shared.NAME expected, got " .. type(dict), 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("stella.openresty.queue: opts must be a table or nil", 2)
  end
  local capacity = opts and opts.capacity or 10000
  if type(capacity) ~= "number" or capacity < 1 or capacity ~= floor(capacity) then
    error("stella.openresty.queue: capacity must be a whole number >= 1", 2)
  end
  return setmetatable({ dict = dict, name = name, capacity = capacity }, Queue)
end

-- Deletes entries first .. last (a failed push) and gives back their reservation.
local function undo(dict, first, last, reserved)
  for id = first, last do dict:delete("e:" .. id_text(id)) end
  dict:incr("n", -reserved, 0)
end

-- push(payloads, now): all of them or none. Two workers pushing at once may interleave
-- their entries; each worker's own stay in order.
function Queue:push(payloads, now)
  if type(payloads) ~= "table" then error("queue:push: a list of strings expected", 2) end
  local k = #payloads
  if k == 0 then return true end
  for i = 1, k do
    if type(payloads[i]) ~= "string" then error("queue:push: payload " .. i .. " is not a string", 2) end
  end
  local dict = self.dict
  local n, err = dict:incr("n", k, 0)
  if not n then return nil, failure(self.name .. ": cannot count the queue: " .. tostring(err), true) end
  if n > self.capacity then
    dict:incr("n", -k, 0)
    return nil, failure(self.name .. ": the queue holds its capacity of " .. self.capacity .. " events", true)
  end
  local last, ierr = dict:incr("id", k, 0)
  if not last then
    dict:incr("n", -k, 0)
    return nil, failure(self.name .. ": cannot allocate an id: " .. tostring(ierr), true)
  end
  local first = last - k + 1
  local at = format("%.3f ", now)
  for i = 1, k do
    local ok, serr = dict:safe_set("e:" .. id_text(first + i - 1), at .. payloads[i])
    if not ok then
      undo(dict, first, first + i - 2, k)
      return nil, failure(self.name .. ": no memory for the event (" .. tostring(serr) .. ")", true)
    end
  end
  for i = 1, k do
    local len, lerr = dict:rpush("q", first + i - 1)
    if not len then
      -- ids already in the list point at deleted entries: pop skips them
      undo(dict, first, last, k)
      return nil, failure(self.name .. ": no memory for the event (" .. tostring(lerr) .. ")", true)
    end
  end
  return true
end

local function parse(id, v)
  local sp = find(v, " ", 1, true)
  return { id = id, at = tonumber(sub(v, 1, sp - 1)), payload = sub(v, sp + 1) }
end

-- pop() -> the oldest entry, no longer in the queue, or nil when it is empty.
function Queue:pop()
  local dict = self.dict
  while true do
    local id = dict:lpop("q")
    if id == nil then return nil end
    local k = "e:" .. id_text(id)
    local v = dict:get(k)
    if v ~= nil then
      dict:delete(k)
      dict:incr("n", -1, 0)
      dict:set("h", id)
      return parse(id, v)
    end
  end
end

-- restore(entries): entries taken from this queue (or a spool file) back at its end,
-- beyond the capacity if need be. -> the number restored (fewer when memory ran out),
-- and an error for the first one that did not fit.
function Queue:restore(entries)
  local dict = self.dict
  for i = 1, #entries do
    local e = entries[i]
    local id, err = dict:incr("id", 1, 0)
    if not id then return i - 1, failure(self.name .. ": " .. tostring(err), true) end
    local k = "e:" .. id_text(id)
    local ok, serr = dict:safe_set(k, format("%.3f ", e.at) .. e.payload)
    if not ok then return i - 1, failure(self.name .. ": no memory (" .. tostring(serr) .. ")", true) end
    local len, lerr = dict:rpush("q", id)
    if not len then
      dict:delete(k)
      return i - 1, failure(self.name .. ": no memory (" .. tostring(lerr) .. ")", true)
    end
    dict:incr("n", 1, 0)
  end
  return #entries
end

function Queue:depth()
  local n = self.dict:get("n") or 0
  return n > 0 and n or 0
end

function Queue:oldest_age(now)
  if self:depth() == 0 then return 0 end
  local dict = self.dict
  local h = dict:get("h") or 0
  for id = h + 1, h + OLDEST_SCAN do
    local v = dict:get("e:" .. id_text(id))
    if v then
      local age = now - parse(id, v).at
      return age > 0 and age or 0
    end
  end
  return nil   -- not found near the head: unknown
end

function Queue:memory()
  return { capacity = self.dict:capacity(), free = self.dict:free_space() }
end

Queue.__tostring = function(self)
  return "stella.openresty.queue (" .. self.name .. ")"
end

return M
