-- stella.openresty.queue: accepted events waiting for a consumer, in a lua_shared_dict of
-- their own (never the store's: a full queue cannot starve the marks, nor the marks the
-- queue), shared by every worker of one nginx. First in, first out.
--
--   local queue = require "stella.openresty.queue"
--   local q = queue.new("stella_queue", { capacity = 10000 })
--   q:push(payload, now)        -> true | nil, err   (err.full: refuse the event)
--   q:push({ json1, json2 }, now)                     (a batch: all of them or none)
--   q:pop()                  -> { { id, at, payload }, ... } | nil   (the oldest push's
--                               events, taken; id numbers entries within this worker)
--   q:restore(entries)       -> n put back (capacity not checked: they were accepted)
--   q:depth()                -> events queued
--   q:oldest_age(now)        -> seconds the head of the queue has waited, at most (0 when
--                               empty)
--   q:memory()               -> { capacity = bytes, free = bytes } of the dict
--
-- This is the interface stella.openresty.service uses; another backend (a Redis list or
-- stream, for acceptance that survives the machine) plugs in by offering the same methods.
-- Payloads are strings (the event's JSON, not decoded here); entries carry the time they
-- were accepted.
--
-- The accept path is two dict operations per push, whatever its size: "n" (events queued,
-- reserved by incr before writing, so the capacity holds exactly across workers) and one
-- rpush of the push's events onto the list "q" as one value, "AT K\nPAYLOAD" (K events;
-- for K > 1 their payloads one per line: cjson never writes a raw newline). One value per
-- push makes a batch all or none. Nothing here writes with set/add, which evict the least
-- recently used keys of a full dict (the list "q" among them): list pushes and safe_set
-- never evict, and out of memory refuses the push like a full queue. "h" is when the head of the queue was accepted, as far as known: set
-- by each pop to the popped value's time and by a push into an empty queue.
local ngx = rawget(_G, "ngx")
local error, tonumber, tostring, type, setmetatable, floor, concat =
      error, tonumber, tostring, type, setmetatable, math.floor, table.concat
local find, sub, format = string.find, string.sub, string.format

local M = {}

local Queue = {}
Queue.__index = Queue
M.Queue = Queue

local LIST, COUNT, HEAD = "q", "n", "h"

-- A run-time failure: { kind = "queue", full = bool, message }.
local function failure(message, full)
  return setmetatable({ kind = "queue", full = full, message = message },
    { __tostring = function(e) return e.message end })
end
M.failure = failure

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
  return setmetatable({ dict = dict, name = name, capacity = capacity, seq = 0,
                        stamp_at = nil, stamp = nil }, Queue)
end

-- "AT 1\n" for this time: one format per distinct ngx.now() (many pushes share one).
local function stamp(self, now, k)
  if k ~= 1 then return format("%.3f %d\n", now, k) end
  if self.stamp_at ~= now then
    self.stamp_at, self.stamp = now, format("%.3f 1\n", now)
  end
  return self.stamp
end

-- push(payload or { payloads }, now): all of them or none.
function Queue:push(payloads, now)
  local k, value
  if type(payloads) == "string" then
    k, value = 1, payloads
  elseif type(payloads) == "table" then
    k = #payloads
    if k == 0 then return true end
    for i = 1, k do
      local p = payloads[i]
      if type(p) ~= "string" then error("queue:push: payload " .. i .. " is not a string", 2) end
      if k > 1 and find(p, "\n", 1, true) then error("queue:push: payload " .. i .. " of a batch has a newline", 2) end
    end
    value = k == 1 and payloads[1] or concat(payloads, "\n")
  else
    error("queue:push: a string or a list of strings expected", 2)
  end
  local dict = self.dict
  local n, err = dict:incr(COUNT, k, 0)
  if not n then return nil, failure(self.name .. ": cannot count the queue: " .. tostring(err), true) end
  if n > self.capacity then
    dict:incr(COUNT, -k, 0)
    return nil, failure(self.name .. ": the queue holds its capacity of " .. self.capacity .. " events", true)
  end
  local len, lerr = dict:rpush(LIST, stamp(self, now, k) .. value)
  if not len then
    dict:incr(COUNT, -k, 0)
    return nil, failure(self.name .. ": no memory for the event (" .. tostring(lerr) .. ")", true)
  end
  if n == k then dict:safe_set(HEAD, now) end   -- the queue was empty: its head is this push
  return true
end

-- The entries of one list value.
local function parse(self, v)
  local nl = find(v, "\n", 1, true)
  local sp = find(v, " ", 1, true)
  local at, k = tonumber(sub(v, 1, sp - 1)), tonumber(sub(v, sp + 1, nl - 1))
  local entries = {}
  if k == 1 then
    self.seq = self.seq + 1
    entries[1] = { id = self.seq, at = at, payload = sub(v, nl + 1) }
    return entries, 1, at
  end
  local from = nl + 1
  for i = 1, k do
    local to = find(v, "\n", from, true)
    self.seq = self.seq + 1
    entries[i] = { id = self.seq, at = at, payload = sub(v, from, to and to - 1 or -1) }
    if not to then break end
    from = to + 1
  end
  return entries, k, at
end

-- pop() -> the oldest push's entries, no longer in the queue, or nil when it is empty.
function Queue:pop()
  local dict = self.dict
  local v = dict:lpop(LIST)
  if v == nil then return nil end
  local entries, k, at = parse(self, v)
  dict:incr(COUNT, -k, 0)
  dict:safe_set(HEAD, at)
  return entries
end

-- restore(entries): entries taken from this queue (or a spool file) back at its end,
-- beyond the capacity if need be. -> the number restored (fewer when memory ran out),
-- and an error for the first one that did not fit.
function Queue:restore(entries)
  local dict = self.dict
  for i = 1, #entries do
    local e = entries[i]
    local len, err = dict:rpush(LIST, format("%.3f 1\n", e.at) .. e.payload)
    if not len then return i - 1, failure(self.name .. ": no memory (" .. tostring(err) .. ")", true) end
    local n = dict:incr(COUNT, 1, 0)
    if n == 1 then dict:safe_set(HEAD, e.at) end
  end
  return #entries
end

function Queue:depth()
  local n = self.dict:get(COUNT) or 0
  return n > 0 and n or 0
end

-- An upper bound: the head was accepted no earlier than the last value taken (or the push
-- into an empty queue). Under a steady flow the two are close; when the consumers stall,
-- it grows as the head's wait does.
function Queue:oldest_age(now)
  if self:depth() == 0 then return 0 end
  local h = self.dict:get(HEAD)
  if not h then return nil end
  local age = now - h
  return age > 0 and age or 0
end

function Queue:memory()
  return { capacity = self.dict:capacity(), free = self.dict:free_space() }
end

Queue.__tostring = function(self)
  return "stella.openresty.queue (" .. self.name .. ")"
end

return M
