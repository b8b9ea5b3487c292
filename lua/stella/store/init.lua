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
local concat, sort = table.concat, table.sort
local math_type = math.type   -- nil on LuaJIT

local M = {}

function M.memory(...)
  return require("stella.store.memory").new(...)
end

-- LuaDBI's SQLite3 driver is an optional dependency: without it, an error naming the
-- package rather than "module 'DBI' not found"
function M.sqlite(...)
  local ok, dbi = pcall(require, "DBI")
  if not ok or not pcall(require, "dbd.sqlite3") then
    error("the SQLite store needs LuaDBI's SQLite3 driver: install the Debian package "
      .. "lua-dbi-sqlite3 or the rock luadbi-sqlite3" .. (ok and "" or (" (" .. tostring(dbi):match("^[^\n]*") .. ")")), 2)
  end
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
-- An entry that counts as an error in rate(): failed, invalid, or queued after a failed
-- send (an outage that queues everything must show; a request merely deferred to a
-- later flush, reason "deferred", is no error).
function U.is_rate_error(status, reason)
  return U.rate_errors[status] == true or (status == "queued" and reason ~= "deferred")
end
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

local function is_reservation(v)   -- an outbox id a mark may refer to
  return is_integer(v) or (type(v) == "string" and v ~= "")
end

-- A number as text that reads back as the same number: integers in decimal, other
-- finite numbers with 17 significant digits. Raises on NaN and infinities.
local function number_text(v)
  if not is_finite(v) then error("stella.store: not a finite number", 2) end
  if math_type and math_type(v) == "integer" then return format("%d", v) end
  if v == floor(v) and v > -9.2233720368547758e18 and v < 9.2233720368547758e18 then
    return format("%.0f", v)
  end
  return format("%.17g", v)
end
U.number_text = number_text

-- Anything given as an error text: nil stays nil, the rest goes through tostring.
local function error_text(v)
  if v == nil or type(v) == "string" then return v end
  return tostring(v)
end

-- Misuse raises at the level of the store method's caller. Every raising helper below takes
-- `level`: the level error() would need if called from that helper itself (3 for a helper
-- the method calls, one more per call in between). No helper on such a path may be reached
-- by a tail call (Lua 5.1 counts those as levels, 5.4 and LuaJIT do not).
local function fail(method, what, level)
  error("stella.store: " .. method .. ": " .. what, level + 1)
end

local function got(v)   -- ", got ..." in messages
  return ", got " .. (type(v) == "number" and tostring(v) or type(v))
end

-- Argument checks ----------------------------------------------------------------------

local outbox_item, ledger_entry, query_options   -- (below)

-- The kinds of argument of the public methods: check(v, method, spec, level) -> v as the
-- backend takes it. spec = { kind, name, optional = true|nil, default = value|nil }.
local KINDS = {}

function KINDS.string(v, method, s, level)
  if type(v) ~= "string" then
    fail(method, s[2] .. " must be a string" .. (s.optional and " or nil" or "") .. ", got " .. type(v), level)
  end
  return v
end

function KINDS.key(v, method, s, level)
  if type(v) ~= "string" or v == "" then
    fail(method, s[2] .. " must be a non-empty string, got " .. (v == "" and "\"\"" or type(v)), level)
  end
  return v
end

function KINDS.number(v, method, s, level)
  if not is_finite(v) then
    fail(method, s[2] .. " must be a finite number" .. (s.optional and " or nil" or "") .. got(v), level)
  end
  return v
end

function KINDS.count(v, method, s, level)   -- a non-negative integer
  if not is_integer(v) or v < 0 then
    fail(method, s[2] .. " must be a non-negative integer" .. (s.optional and " or nil" or "") .. got(v), level)
  end
  return v
end

function KINDS.id(v, method, s, level)   -- an outbox id as returned by enqueue
  if not is_integer(v) then fail(method, s[2] .. " must be an integer" .. got(v), level) end
  return v
end

function KINDS.reservation(v, method, s, level)
  if not is_reservation(v) then
    fail(method, s[2] .. " must be an integer or a non-empty string" .. (s.optional and " or nil" or "") .. got(v),
      level)
  end
  return v
end

KINDS["function"] = function(v, method, s, level)
  if type(v) ~= "function" then fail(method, s[2] .. " must be a function, got " .. type(v), level) end
  return v
end

function KINDS.state(v, method, s, level)   -- an outbox state
  if type(v) ~= "string" or not U.states[v] then
    local names = {}
    for k in pairs(U.states) do names[#names + 1] = k end
    sort(names)
    fail(method, s[2] .. " must be one of " .. concat(names, ", ") .. ", got " ..
      (type(v) == "string" and ("\"" .. v .. "\"") or type(v)), level)
  end
  return v
end

function KINDS.error_text(v)
  return error_text(v)
end

function KINDS.meta(v, method, s, level)   -- a meta value: a string, or a number kept as text
  if type(v) == "string" then return v end
  if not is_finite(v) then fail(method, s[2] .. " must be a string, a number or nil, got " .. type(v), level) end
  return number_text(v)
end

function KINDS.item(v, method, _, level)
  local it = outbox_item(v, method, nil, level + 1)
  return it
end

function KINDS.entry(v, method, _, level)
  local e = ledger_entry(v, method, nil, level + 1)
  return e
end

function KINDS.query(v, method, _, level)
  local o = query_options(v, method, level + 1)
  return o
end

-- The arguments of each public method that takes any (the *_many methods check their
-- lists themselves, below).
local function opt(kind, name, default)
  return { kind, name, optional = true, default = default }
end
local SIGNATURES = {
  hash_email = { { "string", "email" } },
  atomic = { { "function", "fn" } },
  get_mark = { { "key", "key" }, { "number", "now" } },
  put_mark = { { "key", "key" }, { "number", "until" }, opt("reservation", "outbox_id") },
  confirm_marks = { { "reservation", "outbox_id" } },
  release_marks = { { "reservation", "outbox_id" } },
  purge_marks = { { "number", "now" } },
  unsubscribe = { { "key", "hash" }, { "number", "now" } },
  resubscribe = { { "key", "hash" } },
  is_unsubscribed = { { "key", "hash" } },
  enqueue = { { "item", "item" } },
  claim = { { "number", "now" }, { "number", "lease" }, opt("count", "limit", 100) },
  reschedule = { { "id", "id" }, { "number", "next_at" }, opt("count", "attempts"), { "error_text", "last_error" } },
  finish = { { "id", "id" } },
  kill = { { "id", "id" }, { "error_text", "last_error" }, { "number", "now" }, opt("count", "attempts") },
  outbox = { { "state", "state" }, opt("count", "limit", 100) },
  record = { { "entry", "entry" } },
  ledger = { { "query", "options" } },
  counts = { { "query", "options" } },
  rate = { { "query", "options" } },
  get_meta = { { "key", "name" } },
  set_meta = { { "key", "name" }, opt("meta", "value") },
}

for _, sig in pairs(SIGNATURES) do   -- resolved once: check runs on every call
  sig.n = #sig
  for i = 1, #sig do sig[i].check = KINDS[sig[i][1]] end
end

local function arg(s, v, method)
  if v == nil and s.optional then return s.default end
  v = s.check(v, method, s, 5)   -- the kind's check, arg, check, the method, its caller
  return v
end

-- Why self is not an open store (see U.guards).
local function not_open(self, Store, method)
  if getmetatable(self) ~= Store then
    return "stella.store: " .. method .. ": called without a store (use store:" .. method .. ")"
  end
  return "stella.store: " .. method .. ": the store is closed"
end

-- The guards of a backend's methods (Store: its metatable), made once per backend:
--   check_open(self, method) raises unless self is an open store;
--   check(self, method, a, b, c, d) also checks the method's arguments (SIGNATURES) and
--     returns them as the backend takes them (a default limit, error texts, a copied item,
--     query options, ...).
-- Both must be called from the method itself, not in a tail call. check_open is the one
-- for the methods without arguments and the trusted fast paths (no look-up).
function U.guards(Store)
  local function check_open(self, method)
    if getmetatable(self) ~= Store or self.closed then error(not_open(self, Store, method), 3) end
  end
  local function check(self, method, a, b, c, d)
    if getmetatable(self) ~= Store or self.closed then error(not_open(self, Store, method), 3) end
    local sig = SIGNATURES[method]
    local n = sig.n
    a = arg(sig[1], a, method)
    if n > 1 then
      b = arg(sig[2], b, method)
      if n > 2 then
        c = arg(sig[3], c, method)
        if n > 3 then d = arg(sig[4], d, method) end
      end
    end
    return a, b, c, d
  end
  return check_open, check
end

-- Items and ledger entries --------------------------------------------------------------

-- How an element of a list is named in messages: "item", or "items[3]" (i: its index).
local ELEMENT = { enqueue = "item", enqueue_many = "items", record = "entry", record_many = "entries" }
local function element(method, i)
  return i and (ELEMENT[method] .. "[" .. i .. "]") or ELEMENT[method]
end

-- A text field: a string or nil as it is, a number written as text; else raises.
local function text_field(v, k, method, i, level)
  if v == nil or type(v) == "string" then return v end
  if is_finite(v) then return number_text(v) end
  fail(method, element(method, i) .. "." .. k .. " must be a string, a number or nil, got " .. type(v), level)
end

-- The fields of an outbox item from the caller, checked, with defaults, in the column order
-- of the SQLite store: kind, body, brand, event_id, interaction_id, customer_hash,
-- created_at, next_at, attempts. `i`: the item's index in enqueue_many's list, or nil.
local function item_fields(item, method, i, level)
  if type(item) ~= "table" then fail(method, element(method, i) .. " must be a table, got " .. type(item), level) end
  local kind, body, created_at, next_at, attempts = item.kind, item.body, item.created_at, item.next_at, item.attempts
  if not U.kinds[kind] then
    fail(method, element(method, i) .. ".kind must be \"request\" or \"recovery\"", level)
  end
  if type(body) ~= "string" then
    fail(method, element(method, i) .. ".body must be a string, got " .. type(body), level)
  end
  if not is_finite(created_at) then fail(method, element(method, i) .. ".created_at must be a finite number", level) end
  if next_at == nil then
    next_at = created_at
  elseif not is_finite(next_at) then
    fail(method, element(method, i) .. ".next_at must be a finite number or nil", level)
  end
  if attempts == nil then
    attempts = 0
  elseif not is_integer(attempts) or attempts < 0 then
    fail(method, element(method, i) .. ".attempts must be a non-negative integer or nil", level)
  end
  local l = level + 1
  return kind, body, text_field(item.brand, "brand", method, i, l), text_field(item.event_id, "event_id", method, i, l),
    text_field(item.interaction_id, "interaction_id", method, i, l),
    text_field(item.customer_hash, "customer_hash", method, i, l), created_at, next_at, attempts
end

-- An outbox item from the caller as a new table (state "queued", no id yet).
function outbox_item(item, method, i, level)
  local kind, body, brand, event_id, interaction_id, customer_hash, created_at, next_at, attempts =
    item_fields(item, method, i, level + 1)
  return {
    kind = kind, body = body, brand = brand, event_id = event_id, interaction_id = interaction_id,
    customer_hash = customer_hash, created_at = created_at, next_at = next_at, attempts = attempts,
    state = "queued",
  }
end

U.ledger_text_fields = {
  "event_id", "interaction_id", "brand", "channel", "reason", "detail", "request_id",
  "error_kind", "error_message", "customer_hash",
}

-- The fields of a ledger entry from the caller, checked, in the column order of the SQLite
-- store: time, status, reason, event_id, interaction_id, brand, channel, detail,
-- request_id, error_kind, error_message, customer_hash, attempts. `i` as for item_fields.
local function entry_fields(entry, method, i, level)
  if type(entry) ~= "table" then fail(method, element(method, i) .. " must be a table, got " .. type(entry), level) end
  local time, status, attempts = entry.time, entry.status, entry.attempts
  if not is_finite(time) then fail(method, element(method, i) .. ".time must be a finite number", level) end
  if not U.statuses[status] then
    fail(method, element(method, i) ..
      ".status must be one of sent, recorded, skipped, suppressed, invalid, failed, queued", level)
  end
  if attempts ~= nil and (not is_integer(attempts) or attempts < 0) then
    fail(method, element(method, i) .. ".attempts must be a non-negative integer or nil", level)
  end
  -- (checked in the order of U.ledger_text_fields; detail and error_message take anything)
  local l = level + 1
  local event_id = text_field(entry.event_id, "event_id", method, i, l)
  local interaction_id = text_field(entry.interaction_id, "interaction_id", method, i, l)
  local brand = text_field(entry.brand, "brand", method, i, l)
  local channel = text_field(entry.channel, "channel", method, i, l)
  local reason = text_field(entry.reason, "reason", method, i, l)
  local detail = error_text(entry.detail)
  local request_id = text_field(entry.request_id, "request_id", method, i, l)
  local error_kind = text_field(entry.error_kind, "error_kind", method, i, l)
  local error_message = error_text(entry.error_message)
  local customer_hash = text_field(entry.customer_hash, "customer_hash", method, i, l)
  return time, status, reason, event_id, interaction_id, brand, channel, detail, request_id, error_kind,
    error_message, customer_hash, attempts
end

-- A ledger entry from the caller as a new table (filled field by field: a constructor would
-- size every entry for all 13 fields, and most are nil).
function ledger_entry(entry, method, i, level)
  local e = {}
  e.time, e.status, e.reason, e.event_id, e.interaction_id, e.brand, e.channel, e.detail, e.request_id,
    e.error_kind, e.error_message, e.customer_hash, e.attempts = entry_fields(entry, method, i, level + 1)
  return e
end

-- The lists of the *_many methods ------------------------------------------------------
-- Each is checked whole before the backend writes anything, and raises at the level of the
-- method's caller (call these from the method itself).

local function check_list(v, method, name)
  if type(v) ~= "table" then fail(method, name .. " must be a list (a table), got " .. type(v), 4) end
end

-- enqueue_many's items as new tables (see outbox_item).
function U.outbox_items(items)
  check_list(items, "enqueue_many", "items")
  local list = {}
  for i = 1, #items do list[i] = outbox_item(items[i], "enqueue_many", i, 4) end
  return list
end

-- enqueue_many's items as flat values, 9 a row (item_fields), and their number.
function U.outbox_values(items)
  check_list(items, "enqueue_many", "items")
  local values, k, n = {}, 0, #items
  for i = 1, n do
    values[k + 1], values[k + 2], values[k + 3], values[k + 4], values[k + 5], values[k + 6],
      values[k + 7], values[k + 8], values[k + 9] = item_fields(items[i], "enqueue_many", i, 4)
    k = k + 9
  end
  return values, n
end

-- record_many's entries as new tables (see ledger_entry).
function U.ledger_entries(entries)
  check_list(entries, "record_many", "entries")
  local list = {}
  for i = 1, #entries do list[i] = ledger_entry(entries[i], "record_many", i, 4) end
  return list
end

-- record_many's entries as flat values, 13 a row (entry_fields), and their number.
function U.ledger_values(entries)
  check_list(entries, "record_many", "entries")
  local values, k, n = {}, 0, #entries
  for i = 1, n do
    values[k + 1], values[k + 2], values[k + 3], values[k + 4], values[k + 5], values[k + 6], values[k + 7],
      values[k + 8], values[k + 9], values[k + 10], values[k + 11], values[k + 12], values[k + 13] =
      entry_fields(entries[i], "record_many", i, 4)
    k = k + 13
  end
  return values, n
end

-- The message for a bad mark of put_mark_many (marks[i]).
local function bad_mark(m, i)
  local name = "marks[" .. i .. "]"
  if type(m) ~= "table" then fail("put_mark_many", name .. " must be a table, got " .. type(m), 4) end
  local key, until_, id = m.key, m["until"], m.outbox_id
  if type(key) ~= "string" or key == "" then
    fail("put_mark_many", name .. ".key must be a non-empty string, got " .. (key == "" and "\"\"" or type(key)), 4)
  end
  if not is_finite(until_) then fail("put_mark_many", name .. ".until must be a finite number" .. got(until_), 4) end
  fail("put_mark_many", name .. ".outbox_id must be an integer or a non-empty string or nil" .. got(id), 4)
end

-- put_mark_many's marks, { key = k, ["until"] = t, outbox_id = id|nil } each, as flat
-- values (key, until, outbox_id a row), and their number.
function U.mark_values(marks)
  check_list(marks, "put_mark_many", "marks")
  local values, k, n = {}, 0, #marks
  for i = 1, n do
    local m = marks[i]
    local key, until_, id
    if type(m) == "table" then key, until_, id = m.key, m["until"], m.outbox_id end
    if not (type(key) == "string" and key ~= "" and is_finite(until_) and (id == nil or is_reservation(id))) then
      bad_mark(m, i)
    end
    values[k + 1], values[k + 2], values[k + 3] = key, until_, id
    k = k + 3
  end
  return values, n
end

-- The ids of finish_many (outbox ids) or confirm_marks_many (reservations = true), checked;
-- their number.
function U.check_ids(ids, method, reservations)
  check_list(ids, method, "ids")
  local n = #ids
  for i = 1, n do
    local v = ids[i]
    if reservations then
      if not is_reservation(v) then
        fail(method, "ids[" .. i .. "] must be an integer or a non-empty string" .. got(v), 3)
      end
    elseif not is_integer(v) then
      fail(method, "ids[" .. i .. "] must be an integer" .. got(v), 3)
    end
  end
  return n
end

-- The options of ledger/counts/rate: { since = t, status = s, limit = n, bucket = s }.
function query_options(opts, method, level)
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then fail(method, "options must be a table or nil, got " .. type(opts), level) end
  if opts.since ~= nil and not is_finite(opts.since) then fail(method, "since must be a finite number or nil", level) end
  if opts.status ~= nil and (type(opts.status) ~= "string" or not U.statuses[opts.status]) then
    fail(method, "status must be a ledger status or nil", level)
  end
  if opts.limit ~= nil and (not is_integer(opts.limit) or opts.limit < 0) then
    fail(method, "limit must be a non-negative integer or nil", level)
  end
  if opts.bucket ~= nil and (not is_finite(opts.bucket) or opts.bucket <= 0) then
    fail(method, "bucket must be a positive number or nil", level)
  end
  return { since = opts.since, status = opts.status, limit = opts.limit or 100, bucket = opts.bucket or 3600 }
end

-- Misc ---------------------------------------------------------------------------------

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

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end
U.copy = copy

-- Lists kept in Lua (memory, shdict) ---------------------------------------------------
-- The memory and shdict stores hold their items and entries as Lua tables and share what
-- they do with them; SQLite does the same in SQL.

local function by_next_at(a, b)
  if a.next_at ~= b.next_at then return a.next_at < b.next_at end
  return a.id < b.id
end

local function by_death(a, b)   -- most recent first
  local da, db = a.died_at or 0, b.died_at or 0
  if da ~= db then return da > db end
  return a.id > b.id
end

-- The outbox items of the array `items` in `state` (and, given `now`, due by then), in the
-- order outbox(state) lists them: the next due first, or the last to die first.
function U.select_items(items, state, now)
  local list = {}
  for i = 1, #items do
    local it = items[i]
    if it.state == state and (now == nil or it.next_at <= now) then list[#list + 1] = it end
  end
  sort(list, state == "dead" and by_death or by_next_at)
  return list
end

-- Copies of the first `limit` tables of list.
function U.first(list, limit)
  local out = {}
  for i = 1, limit < #list and limit or #list do out[i] = copy(list[i]) end
  return out
end

-- outbox_counts over an array of items.
function U.outbox_counts(items)
  local counts = { queued = 0, dead = 0 }
  for i = 1, #items do
    local s = items[i].state
    if counts[s] then counts[s] = counts[s] + 1 end
  end
  return counts
end

-- ledger(o) over an array of entries in the order they were recorded: copies of those
-- that match o, newest first, the latest recorded first among equal times.
function U.ledger_list(entries, o)
  local since, status, list = o.since, o.status, {}
  for i = 1, #entries do   -- positions, not entries: the position breaks ties
    local e = entries[i]
    if (since == nil or e.time >= since) and (status == nil or e.status == status) then list[#list + 1] = i end
  end
  sort(list, function(a, b)
    local ta, tb = entries[a].time, entries[b].time
    if ta ~= tb then return ta > tb end
    return a > b
  end)
  local out = {}
  for i = 1, o.limit < #list and o.limit or #list do out[i] = copy(entries[list[i]]) end
  return out
end

-- counts/rate over an array of ledger entries.
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
  sort(out, function(a, b)   -- by status, then reason with no reason first
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
      if U.is_rate_error(e.status, e.reason) then b.errors = b.errors + 1 end
    end
  end
  sort(out, function(a, b) return a.start < b.start end)
  return out
end

return M
