-- stella.store: where the trigger keeps its state - suppression and dedupe marks,
-- unsubscribes, the outbox of requests still to send, the ledger of processed events, and
-- a few named values (meta). One small interface, several backends:
--
--   local store = require "stella.store"
--   local s = store.memory()                       -- per process, gone on exit
--   local s = assert(store.sqlite("stella.db", { busy_timeout = 5 }))
--
-- Backends are loaded on first use, so `require "stella.store"` works without LuaDBI.
--
-- Batches: enqueue_many(items) -> ids, put_mark_many(marks), confirm_marks_many(ids),
-- finish_many(ids) and record_many(entries) do what a loop of enqueue, put_mark,
-- confirm_marks, finish and record would, in order, in one transaction (or in the
-- caller's), with fewer statements; a mark there is { key = k, ["until"] = t,
-- outbox_id = id|nil }. confirm_marks_many and finish_many return how many marks were
-- confirmed and how many items deleted. A bad element raises before anything is written.
--
-- Times are seconds since the epoch, always passed in by the caller.
--
-- Misuse (a wrong argument type) raises; a run-time failure (database locked past the
-- busy timeout, disk I/O) returns nil, err where err is { kind = "store", message = ...,
-- retryable = true|false } and prints as its message.
--
-- The helpers under M._util are shared by the backends and are not part of the interface.
-- Nor are methods whose names start with "_" (_mark_until, _any_unsubscribes, _write_values):
-- fast paths for the trigger's batches, which skip the checks; a backend may lack them.
local error, format, floor, getmetatable, pairs, setmetatable, tostring, type, select =
  error, string.format, math.floor, getmetatable, pairs, setmetatable, tostring, type, select
local math_type = math.type   -- nil on LuaJIT

local M = {}

function M.memory(...)
  return require("stella.store.memory").new(...)
end

function M.sqlite(...)
  return require("stella.store.sqlite").new(...)
end

-- Errors -------------------------------------------------------------------------------

local StoreError = {}
StoreError.__index = StoreError
StoreError.__tostring = function(e) return e.message end

-- A run-time failure: { kind = "store", message = ..., retryable = ... }.
-- stella.store.shdict(name_or_dict): marks, unsubscribes and a small outbox/ledger in
-- an ngx.shared dict (one nginx node; see lua/stella/store/shdict.lua).
function M.shdict(...)
  return require("stella.store.shdict").new(...)
end

function M.error(message, retryable)
  return setmetatable({ kind = "store", message = message, retryable = retryable and true or false },
    StoreError)
end

function M.is_error(v)
  return type(v) == "table" and getmetatable(v) == StoreError
end

-- Shared helpers -----------------------------------------------------------------------

local U = {}
M._util = U

-- The ledger statuses, and those counted by rate().
U.statuses = {
  sent = true, recorded = true, skipped = true, suppressed = true,
  invalid = true, failed = true, queued = true,
}
U.rate_total = { sent = true, recorded = true, failed = true, invalid = true, queued = true }
U.rate_errors = { failed = true, invalid = true }
U.kinds = { request = true, recovery = true }
U.states = { queued = true, dead = true }

-- (v - v is 0 for every finite number, NaN for NaN and the infinities)
local function is_finite(v)
  return type(v) == "number" and v - v == 0
end
U.is_finite = is_finite

local function is_integer(v)
  return type(v) == "number" and v - v == 0 and v % 1 == 0
end
U.is_integer = is_integer

-- A number as text that reads back as the same number: integers in decimal, other
-- finite numbers with 17 significant digits. Raises on NaN and infinities.
function U.number_text(v)
  if not U.is_finite(v) then error("stella.store: not a finite number", 2) end
  if math_type and math_type(v) == "integer" then return format("%d", v) end
  if v == floor(v) and v > -9.2233720368547758e18 and v < 9.2233720368547758e18 then
    return format("%.0f", v)
  end
  return format("%.17g", v)
end

-- Argument checks. They raise at the level of the store method's caller, so they must be
-- called directly from the method (as a statement, not a tail call).
local function fail(method, what, level)
  error("stella.store: " .. method .. ": " .. what, level or 4)
end

function U.check_string(v, method, name, optional)
  if v == nil and optional then return end
  if type(v) ~= "string" then
    fail(method, name .. " must be a string" .. (optional and " or nil" or "") .. ", got " .. type(v))
  end
end

function U.check_key(v, method, name)
  if type(v) ~= "string" or v == "" then
    fail(method, name .. " must be a non-empty string, got " .. (v == "" and "\"\"" or type(v)))
  end
end

function U.check_number(v, method, name, optional)
  if v == nil and optional then return end
  if not is_finite(v) then
    fail(method, name .. " must be a finite number" .. (optional and " or nil" or "") ..
      ", got " .. (type(v) == "number" and tostring(v) or type(v)))
  end
end

function U.check_count(v, method, name, optional)   -- a non-negative integer
  if v == nil and optional then return end
  if not is_integer(v) or v < 0 then
    fail(method, name .. " must be a non-negative integer" .. (optional and " or nil" or "") ..
      ", got " .. (type(v) == "number" and tostring(v) or type(v)))
  end
end

function U.check_id(v, method, name)   -- an outbox id as returned by enqueue
  if not is_integer(v) then
    fail(method, name .. " must be an integer, got " .. (type(v) == "number" and tostring(v) or type(v)))
  end
end

function U.check_reservation(v, method, name, optional)   -- an outbox id a mark refers to
  if v == nil and optional then return end
  if not (is_integer(v) or (type(v) == "string" and v ~= "")) then
    fail(method, name .. " must be an integer or a non-empty string" .. (optional and " or nil" or "") ..
      ", got " .. (type(v) == "number" and tostring(v) or type(v)))
  end
end

function U.check_table(v, method, name, optional)
  if v == nil and optional then return end
  if type(v) ~= "table" then
    fail(method, name .. " must be a table" .. (optional and " or nil" or "") .. ", got " .. type(v))
  end
end

function U.check_function(v, method, name)
  if type(v) ~= "function" then fail(method, name .. " must be a function, got " .. type(v)) end
end

function U.check_enum(v, set, method, name)
  if type(v) ~= "string" or not set[v] then
    local names = {}
    for k in pairs(set) do names[#names + 1] = k end
    table.sort(names)
    fail(method, name .. " must be one of " .. table.concat(names, ", ") .. ", got " ..
      (type(v) == "string" and ("\"" .. v .. "\"") or type(v)))
  end
end

-- A text field: a string, a number (written as text) or nil. Raises at the caller's level.
-- (called only for a value that is not a string or nil; `level` as for error())
local function text_field(v, k, method, where, level)
  if is_finite(v) then return U.number_text(v) end
  error("stella.store: " .. method .. ": " .. where .. "." .. k .. " must be a string, a number or nil, got " ..
    type(v), level)
end

-- Anything given as an error text: nil stays nil, the rest goes through tostring.
function U.error_text(v)
  if v == nil or type(v) == "string" then return v end
  return tostring(v)
end

-- A copy of an outbox item from the caller, checked, with defaults. Raises on misuse at
-- the level of the enqueue caller. `method` and `name` name it in messages (default
-- "enqueue" and "item"; enqueue_many passes "items[3]").
function U.outbox_item(item, method, name)
  method, name = method or "enqueue", name or "item"
  if type(item) ~= "table" then fail(method, name .. " must be a table, got " .. type(item)) end
  local kind, body, created_at, next_at, attempts = item.kind, item.body, item.created_at, item.next_at, item.attempts
  if not U.kinds[kind] then
    fail(method, name .. ".kind must be \"request\" or \"recovery\"")
  end
  if type(body) ~= "string" then fail(method, name .. ".body must be a string, got " .. type(body)) end
  if not is_finite(created_at) then fail(method, name .. ".created_at must be a finite number") end
  if next_at ~= nil and not is_finite(next_at) then
    fail(method, name .. ".next_at must be a finite number or nil")
  end
  if attempts ~= nil and (not is_integer(attempts) or attempts < 0) then
    fail(method, name .. ".attempts must be a non-negative integer or nil")
  end
  local brand, event_id, interaction_id, customer_hash =
    item.brand, item.event_id, item.interaction_id, item.customer_hash
  if brand ~= nil and type(brand) ~= "string" then brand = text_field(brand, "brand", method, name, 4) end
  if event_id ~= nil and type(event_id) ~= "string" then
    event_id = text_field(event_id, "event_id", method, name, 4)
  end
  if interaction_id ~= nil and type(interaction_id) ~= "string" then
    interaction_id = text_field(interaction_id, "interaction_id", method, name, 4)
  end
  if customer_hash ~= nil and type(customer_hash) ~= "string" then
    customer_hash = text_field(customer_hash, "customer_hash", method, name, 4)
  end
  return {
    kind = kind,
    body = body,
    brand = brand,
    event_id = event_id,
    interaction_id = interaction_id,
    customer_hash = customer_hash,
    created_at = created_at,
    next_at = next_at == nil and created_at or next_at,
    attempts = attempts or 0,
    state = "queued",
  }
end

U.ledger_text_fields = {
  "event_id", "interaction_id", "brand", "channel", "reason", "detail", "request_id",
  "error_kind", "error_message", "customer_hash",
}

-- A copy of a ledger entry from the caller, checked. Raises at the level of record's caller.
-- `method` and `name` as for outbox_item (default "record" and "entry").
function U.ledger_entry(entry, method, name)
  method, name = method or "record", name or "entry"
  if type(entry) ~= "table" then fail(method, name .. " must be a table, got " .. type(entry)) end
  local time, status, attempts = entry.time, entry.status, entry.attempts
  if not is_finite(time) then fail(method, name .. ".time must be a finite number") end
  if not U.statuses[status] then
    fail(method, name .. ".status must be one of sent, recorded, skipped, suppressed, invalid, failed, queued")
  end
  if attempts ~= nil and (not is_integer(attempts) or attempts < 0) then
    fail(method, name .. ".attempts must be a non-negative integer or nil")
  end
  local e = { time = time, status = status, attempts = attempts }
  local fields = U.ledger_text_fields
  for i = 1, #fields do
    local k = fields[i]
    local v = entry[k]
    if v ~= nil and type(v) ~= "string" then
      if k == "error_message" or k == "detail" then v = tostring(v)
      else v = text_field(v, k, method, name, 4) end
    end
    e[k] = v
  end
  return e
end

-- A list argument of the *_many methods: a table whose elements 1..#list are checked by
-- the caller. Raises at the level of the method's caller.
function U.check_list(v, method, name)
  if type(v) ~= "table" then fail(method, name .. " must be a list (a table), got " .. type(v)) end
end

-- A mark of put_mark_many, checked: { key = k, ["until"] = t, outbox_id = id|nil } -> key,
-- until, outbox_id. `i`: its index in the list (for messages).
function U.mark_entry(m, method, i)
  if type(m) == "table" then
    local key, until_, id = m.key, m["until"], m.outbox_id
    if type(key) == "string" and key ~= "" and is_finite(until_) and
        (id == nil or is_integer(id) or (type(id) == "string" and id ~= "")) then
      return key, until_, id
    end
  end
  local name = "marks[" .. i .. "]"
  if type(m) ~= "table" then fail(method, name .. " must be a table, got " .. type(m)) end
  local key, until_, id = m.key, m["until"], m.outbox_id
  if type(key) ~= "string" or key == "" then
    fail(method, name .. ".key must be a non-empty string, got " .. (key == "" and "\"\"" or type(key)))
  end
  if not is_finite(until_) then
    fail(method, name .. ".until must be a finite number, got " ..
      (type(until_) == "number" and tostring(until_) or type(until_)))
  end
  fail(method, name .. ".outbox_id must be an integer or a non-empty string or nil, got " ..
    (type(id) == "number" and tostring(id) or type(id)))
end

-- The options of ledger/counts/rate: { since = t, status = s, limit = n, bucket = s }.
function U.query_options(opts, method)
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then fail(method, "options must be a table or nil, got " .. type(opts)) end
  if opts.since ~= nil and not is_finite(opts.since) then fail(method, "since must be a finite number or nil") end
  if opts.status ~= nil and (type(opts.status) ~= "string" or not U.statuses[opts.status]) then
    fail(method, "status must be a ledger status or nil")
  end
  if opts.limit ~= nil and (not is_integer(opts.limit) or opts.limit < 0) then
    fail(method, "limit must be a non-negative integer or nil")
  end
  if opts.bucket ~= nil and (not is_finite(opts.bucket) or opts.bucket <= 0) then
    fail(method, "bucket must be a positive number or nil")
  end
  return { since = opts.since, status = opts.status, limit = opts.limit or 100, bucket = opts.bucket or 3600 }
end

-- The start of the bucket holding time t.
function U.bucket_start(t, bucket)
  return floor(t / bucket) * bucket
end

-- "a@b" from " A@B\n": lower-cased (ASCII), surrounding white space removed.
function U.normalize_email(email)
  return (email:match("^%s*(.*%S)") or ""):lower()
end

-- 16 random bytes from /dev/urandom, hex-encoded (32 characters), or nil, err.
function U.new_salt()
  local f, err = io.open("/dev/urandom", "rb")
  if not f then return nil, M.error("cannot read /dev/urandom: " .. tostring(err), false) end
  local bytes = f:read(16)
  f:close()
  if type(bytes) ~= "string" or #bytes ~= 16 then
    return nil, M.error("short read from /dev/urandom", false)
  end
  return (bytes:gsub(".", function(c) return format("%02x", c:byte()) end))
end

function U.pack(...)
  return { n = select("#", ...), ... }
end

U.unpack = table.unpack or unpack   -- luacheck: ignore (unpack is the 5.1 name)

-- counts/rate over a list of ledger entries: the memory and shdict stores share these
-- (SQLite does the same in SQL).
function U.count_entries(entries, since)
  local groups, out = {}, {}
  for i = 1, #entries do
    local e = entries[i]
    if since == nil or e.time >= since then
      local k = e.status .. "\0" .. (e.reason and ("+" .. e.reason) or "-")
      local g = groups[k]
      if not g then
        g = { status = e.status, reason = e.reason, count = 0 }
        groups[k] = g
        out[#out + 1] = g
      end
      g.count = g.count + 1
    end
  end
  table.sort(out, function(a, b)   -- by status, then reason with no reason first
    if a.status ~= b.status then return a.status < b.status end
    if a.reason == nil then return b.reason ~= nil end
    if b.reason == nil then return false end
    return a.reason < b.reason
  end)
  return out
end

function U.rate_entries(entries, since, bucket)
  local buckets, out = {}, {}
  for i = 1, #entries do
    local e = entries[i]
    if (since == nil or e.time >= since) and U.rate_total[e.status] then
      local start = U.bucket_start(e.time, bucket)
      local b = buckets[start]
      if not b then
        b = { start = start, total = 0, errors = 0 }
        buckets[start] = b
        out[#out + 1] = b
      end
      b.total = b.total + 1
      if U.rate_errors[e.status] then b.errors = b.errors + 1 end
    end
  end
  table.sort(out, function(a, b) return a.start < b.start end)
  return out
end

return M
