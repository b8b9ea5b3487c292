-- stella.store: where the trigger keeps its state - suppression and dedupe marks,
-- unsubscribes, the outbox of requests still to send, the ledger of processed events, and
-- a few named values (meta). One interface, several backends:
--
--   local store = require "stella.store"
--   local s = store.memory()                       -- per process, gone on exit
--   local s = assert(store.sqlite("stella.db", { busy_timeout = 5 }))
--   local s = assert(store.shdict("stella"))       -- inside OpenResty
--   local s = assert(store.redis("redis://127.0.0.1:6379/0"))   -- Redis 7, shared
--
-- Backends are loaded on first use, so `require "stella.store"` works without LuaDBI.
--
-- This module is the store every caller sees. It checks every argument and row (against
-- the layouts of stella.store.rows, converting what needs it), hashes e-mails, runs
-- transactions, and offers singular methods (put_mark, enqueue, record, ...) over the
-- batch ones; a backend only does the primitives of the contract below, on input already
-- checked.
--
-- Interface (the store s; times are seconds since the epoch, always passed in):
--   s:hash_email(email) -> hex       salted SHA-256 of the trimmed, lower-cased address
--   s:atomic(fn, ...) -> fn's results | nil, err      (see "Transactions" below)
--   s:get_mark(key, now) -> until, outbox_id | nil
--   s:get_marks({ key, ... }, now) -> { until|nil, ... }, { outbox_id|nil, ... }
--   s:put_mark(key, until [, outbox_id]) -> true;  s:put_mark_many{ mark, ... } -> true
--   s:confirm_marks(id) -> n;  s:confirm_marks_many{ id, ... } -> n;  s:release_marks(id) -> n
--   s:purge_marks(now) -> n
--   s:unsubscribe(hash, now), s:resubscribe(hash) -> true; s:is_unsubscribed(hash) -> bool;
--   s:unsubscribed_many{ hash, ... } -> { bool, ... };  s:unsubscribed_count() -> n
--   s.remote                         true for a networked backend (Redis): a round trip
--                                    per call, so callers batch look-ups (get_marks)
--   s:enqueue(item) -> id;  s:enqueue_many{ item, ... } -> { id, ... }
--   s:claim(now, lease [, limit=100]) -> items (leased until now + lease)
--   s:reschedule(id, next_at [, attempts], last_error) -> bool;  s:finish(id) -> bool;
--   s:finish_many{ id, ... } -> n;  s:kill(id, last_error, now [, attempts]) -> bool
--   s:outbox(state [, limit=100]) -> items;  s:outbox_counts() -> { queued = n, dead = n }
--   s:record(entry) -> true;  s:record_many{ entry, ... } -> true
--   s:ledger{ since, status, limit=100 } -> entries, newest first
--   s:counts{ since } -> { { status, reason, count }, ... }
--   s:rate{ since, bucket=3600 } -> { { start, total, errors }, ... }
--   s:purge(before [, limit=10000]) -> { ledger = n, dead = n }   retention: deletes at
--                                    most limit ledger entries with time < before and at
--                                    most limit dead outbox items with died_at < before
--                                    (a count below limit: none is left); a caller that
--                                    wants them all calls again, outside a transaction,
--                                    so each call commits and the write lock is let go
--   s:timeline{ since, bucket=3600 } -> { { start, status, reason, count }, ... }
--   s:get_meta(name) -> string | nil;  s:set_meta(name, value|nil) -> true
--   s:close() -> true
-- Rows (item, entry, mark = { key, until, outbox_id }) are laid out in stella.store.rows.
-- A *_many method does what a loop of its singular method would, in order, in one
-- transaction (or the caller's); a bad element raises before anything is written.
--
-- Misuse (a wrong argument type, a closed store) raises; a run-time failure (database
-- locked past the busy timeout, disk I/O, a full shared dict) returns nil, err where err
-- is { kind = "store", message = ..., retryable = true|false } and prints as its message.
--
-- Transactions: s:atomic(fn, ...) runs fn(...) so that its writes happen all or not at
-- all. It returns fn's results; or nil, err - after undoing everything - when fn returned
-- nil, err (a nil first result and a non-nil second), when a store call inside failed
-- (even if fn went on), or when the transaction could not begin or commit. If fn raises,
-- everything is undone and the error is raised again. Nested calls are part of the
-- outermost one.
--
-- Backend contract ----------------------------------------------------------------------
-- A backend is an object with the fields and methods below; `store.open(backend)` makes
-- the store of it. Every argument has been checked: a backend trusts its input and does
-- no checks of its own. Every method that can fail at run time returns nil, err on
-- failure (err from store.error(message, retryable)), never raises for it; "-> x" below
-- is the answer on success. Rows come as a list: `rows` holds n row tables of layout L
-- (stella.store.rows), each with its fields by name (nil ones absent); they are the
-- caller's, so a backend neither changes them nor keeps them (it copies what it keeps).
-- Ids are the integers enqueue gave; `owners` (mark reservations) are integers or
-- non-empty strings and must come back as given (an integer as an integer).
--
--   name                       text for tostring, e.g. "stella.store.memory"
--   per_coroutine              true when a transaction belongs to the running coroutine
--                              (several coroutines share one object, as in OpenResty)
--   remote                     true when every call is a network round trip (Redis)
-- Transactions (the base nests and decides; the backend only does):
--   begin() -> true            start one; nothing else of this caller runs in between
--   commit() -> true           make its writes durable and visible
--   rollback()                 undo every write since begin (never fails)
--   Outside begin/commit a write method must still be all or nothing by itself.
-- Marks (rows.mark: key, until, outbox_id):
--   read_marks(keys, n, now) -> untils, owners   for keys[1..n]: untils[i] and owners[i]
--                              of the mark under keys[i] if its until > now, else nil
--                              (one call for a batch: a networked backend makes it one
--                              round trip)
--   put_marks(rows, n) -> true        insert or replace each, in order (a later row with
--                              the same key wins)
--   settle_marks(ids, n, keep) -> count   for every mark reserved by one of ids[1..n]:
--                              keep = true: drop the reservation (outbox_id = nil), keep
--                              the mark; keep = false: delete it. The number of marks.
--   purge_marks(now) -> count  delete the marks with until <= now (their reservations
--                              too); count: how many this call deleted (a backend whose
--                              marks expire by themselves counts those still there)
-- Unsubscribes (by e-mail hash):
--   set_unsubscribed(hashes, n, now) -> true    now: unsubscribe each (at that time; once
--                              only, however often); now = nil: resubscribe each
--   unsubscribed(hashes, n) -> flags            flags[i] = true | false
--   count_unsubscribed() -> n  how many; if not exact, never 0 while any is stored (the
--                              trigger skips its look-ups on 0)
-- Outbox (rows.item in; rows.stored_item out, each a new table):
--   enqueue(rows, n) -> ids    store each with state "queued" and a new id, larger than
--                              every id given before (ids[i] for row i)
--   lease(now, lease, limit) -> items   the queued items with next_at <= now, by next_at
--                              then id, at most limit; each gets next_at = now + lease
--                              (returned that way). Two callers never get one item for
--                              the same lease.
--   update_items(op, rows, n) -> count  the number of items that existed, of:
--     "requeue" rows.requeue   state "queued", next_at, attempts (nil: unchanged),
--                              last_error (as given, nil too), died_at = nil
--     "kill"    rows.kill      state "dead", died_at, last_error and attempts (nil:
--                              unchanged for both); never leased again
--     "delete"  rows = ids     remove them (a list of ids, not of tables)
--   list_items(state, limit) -> items   queued: by next_at, id; dead: died_at descending,
--                              then id descending
--   count_items() -> { queued = n, dead = n }
-- Ledger (rows.entry):
--   record(rows, n) -> true    append each (a backend with a bounded ledger may drop the
--                              oldest, or an entry it has no room for)
--   ledger(since, status, limit) -> entries   those with time >= since (nil: any) and the
--                              status (nil: any), newest first, the later recorded first
--                              among equal times, at most limit
--   tally(since, bucket) -> groups   the entries with time >= since (nil: any), counted:
--                              one { status, reason, count } per status and reason, and
--                              with bucket also per start = floor(time / bucket) * bucket
--                              ({ start, status, reason, count }); in any order
-- Retention (ledger and outbox):
--   purge(before, limit) -> { ledger = n, dead = n }   deletes at most limit ledger
--                              entries with time < before (any of them: the oldest first
--                              is not required) and at most limit dead outbox items with
--                              died_at < before (never a queued item); n: how many of
--                              each this call deleted. limit >= 1. Bounded work: the
--                              base loops, not the backend. A backend that drops old
--                              entries by itself counts only what this call deleted.
-- Meta (named strings; "salt" holds the e-mail hashing salt):
--   get_meta(name) -> value | nil
--   set_meta(name, value, only_if_absent) -> true   value nil deletes; only_if_absent
--                              leaves a value that is there (the first writer wins)
-- Life:
--   close()                    release everything (called once)
--
-- The test a backend must pass: spec/support/store_contract.lua, a suite that takes the
-- backend's constructor (spec/store_spec.lua runs it for memory and SQLite).
local core = require "stella.core"
local rows = require "stella.store.rows"
local text = require "stella.store.text"
local lists = require "stella.store.lists"

local assert, error, format, floor, getmetatable, ipairs, load, pairs, setmetatable, tostring, type, select, pcall =
  assert, error, string.format, math.floor, getmetatable, ipairs, load, pairs, setmetatable, tostring, type, select, pcall
local concat, sort = table.concat, table.sort
local running = coroutine.running
local math_type = math.type   -- nil on LuaJIT
local unpack = table.unpack or unpack   -- luacheck: ignore (unpack is the 5.1 name)

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

-- stella.store.shdict(name_or_dict): marks, unsubscribes and a small outbox/ledger in
-- an ngx.shared dict (one nginx node; see lua/stella/store/shdict.lua).
function M.shdict(...)
  return require("stella.store.shdict").new(...)
end

-- stella.store.redis(url_or_options): on a Redis 7 server, shared by every process and
-- host that uses it (see lua/stella/store/redis.lua; needs stella.redis).
function M.redis(...)
  return require("stella.store.redis").new(...)
end

-- Errors -------------------------------------------------------------------------------

local StoreError = {}
StoreError.__index = StoreError
StoreError.__tostring = function(e) return e.message end

-- A run-time failure: { kind = "store", message = ..., retryable = ... }.
function M.error(message, retryable)
  return setmetatable({ kind = "store", message = message, retryable = retryable and true or false },
    StoreError)
end

function M.is_error(v)
  return type(v) == "table" and getmetatable(v) == StoreError
end

-- Values -------------------------------------------------------------------------------

-- (v - v is 0 for every finite number, NaN for NaN and the infinities)
local function is_finite(v)
  return type(v) == "number" and v - v == 0
end
M.is_finite = is_finite

local function is_integer(v)
  return type(v) == "number" and v - v == 0 and v % 1 == 0
end
M.is_integer = is_integer

local function is_owner(v)   -- an outbox id a mark may be reserved for
  return is_integer(v) or (type(v) == "string" and v ~= "")
end

-- A number as text that reads back as the same number (stella.store.text).
local number_text = text.number_text
M.number_text = number_text

-- 16 random bytes from /dev/urandom, hex-encoded (32 characters), or nil, err.
local function new_salt()
  local f, err = io.open("/dev/urandom", "rb")
  if not f then return nil, M.error("cannot read /dev/urandom: " .. tostring(err), false) end
  local bytes = f:read(16)
  f:close()
  if type(bytes) ~= "string" or #bytes ~= 16 then
    return nil, M.error("short read from /dev/urandom", false)
  end
  return (bytes:gsub(".", function(c) return format("%02x", c:byte()) end))
end

-- Argument checks ----------------------------------------------------------------------
-- Misuse raises at the level of the store method's caller: every raising helper takes
-- `level`, the level error() would need if called from that helper itself (3 for a helper
-- the method calls, one more per call in between). No helper on such a path may be
-- reached by a tail call (Lua 5.1 counts those as levels, 5.4 and LuaJIT do not).

local function fail(method, what, level)
  error("stella.store: " .. method .. ": " .. what, level + 1)
end

local function got(v)   -- ", got ..." in messages
  return ", got " .. (type(v) == "number" and tostring(v) or type(v))
end

-- The value of field f (a rows layout field) in row `where` ("item", "items[3]") as the
-- store keeps it; raises when it does not fit.
local function field_value(f, v, method, where, level)
  local kind = f.kind
  if kind == "text" then
    if v == nil or type(v) == "string" then return v end
    if is_finite(v) then return number_text(v) end
    fail(method, where .. "." .. f.name .. " must be a string, a number or nil, got " .. type(v), level)
  elseif kind == "any_text" then
    if v == nil or type(v) == "string" then return v end
    return tostring(v)
  elseif kind == "time" then
    if is_finite(v) then return v end
    fail(method, where .. "." .. f.name .. " must be a finite number" .. (f.default and " or nil" or "") ..
      got(v), level)
  elseif kind == "count" then
    if v == nil or (is_integer(v) and v >= 0) then return v end
    fail(method, where .. "." .. f.name .. " must be a non-negative integer or nil" .. got(v), level)
  elseif kind == "bytes" then
    if type(v) == "string" then return v end
    fail(method, where .. "." .. f.name .. " must be a string, got " .. type(v), level)
  elseif kind == "key" then
    if type(v) == "string" and v ~= "" then return v end
    fail(method, where .. "." .. f.name .. " must be a non-empty string, got " ..
      (v == "" and "\"\"" or type(v)), level)
  elseif kind == "owner" then
    if v == nil or is_owner(v) then return v end
    fail(method, where .. "." .. f.name .. " must be an integer or a non-empty string or nil" .. got(v), level)
  elseif kind == "one of" then
    if f.values[v] then return v end
    local names = {}
    for k in pairs(f.values) do names[#names + 1] = k end
    sort(names)
    fail(method, where .. "." .. f.name .. " must be one of " ..
      (f.values == rows.statuses and rows.status_list or concat(names, ", ")), level)
  end
  error("stella.store: unknown field kind " .. tostring(kind))
end

-- What passes each kind of field as it is (v, the field's value; S, its set of values).
local QUICK = {
  text = "v == nil or type(v) == 'string'",
  any_text = "v == nil or type(v) == 'string'",
  time = "type(v) == 'number' and v - v == 0",
  count = "type(v) == 'number' and v >= 0 and v % 1 == 0 and v - v == 0",
  bytes = "type(v) == 'string'",
  key = "type(v) == 'string' and v ~= ''",
  owner = "v == nil or (type(v) == 'string' and v ~= '') or (type(v) == 'number' and v % 1 == 0 and v - v == 0)",
  ["one of"] = "S[v]",
}

-- A field of row c (a copy) that failed its quick check: its default (a value, or the
-- name of an earlier field whose value it takes), or field_value's answer.
local function slow(l, j, c, method, name, i, level)
  local f = l[j]
  local v = c[f.name]
  if v == nil and f.default ~= nil then
    v = f.default
    if type(v) == "string" then v = c[v] end
  else
    v = field_value(f, v, method, i and (name .. "[" .. i .. "]") or name, level + 1)
  end
  c[f.name] = v
end

-- The checker of a layout, made once from it: check(t, method, name, i, level) -> t when
-- every field of row t passes its kind's quick test (written out in line), else a copy
-- of t's fields with the rest done by slow (defaults, conversions; raising with the row
-- named name or name[i]). The caller's table is never changed. (Written out because it
-- runs for every row the trigger writes.)
local function checker(l)
  local src = { "local type, slow, copy, l, sets = ...\nreturn function(t, method, name, i, level)\n" ..
    "local type, v, S = type\nlocal c = t\n" }
  for j, f in ipairs(l) do
    local nil_ok = f.kind == "count" and f.default == nil
    src[#src + 1] = format("v%s = c[%q]%s\nif not (%s%s) then\n" ..
      "if c == t then c = copy(l, t) end\nslow(l, %d, c, method, name, i, level + 1)\nend\n",
      f.values and ", S" or "", f.name, f.values and (", sets[" .. j .. "]") or "",
      nil_ok and "v == nil or " or "", QUICK[f.kind], j)
  end
  src[#src + 1] = "return c\nend\n"
  local sets = {}
  for j, f in ipairs(l) do sets[j] = f.values or false end
  return assert(load(concat(src), "=stella.store checker(" .. l.name .. ")"))(type, slow, lists.layout_copy, l, sets)
end
for _, l in ipairs{ rows.item, rows.entry, rows.mark } do l.check = checker(l) end

-- One row (a singular method's argument), checked: the row for the backend.
local function one_row(l, t, method, level)
  if type(t) ~= "table" then fail(method, l.name .. " must be a table, got " .. type(t), level) end
  local r = l.check(t, method, l.name, nil, level + 1)
  return r
end

-- A list of rows (a *_many method's argument), checked: the list for the backend (the
-- caller's, or a copy holding the rows that needed converting) and its length.
local function row_list(l, list, method, name, level)
  if type(list) ~= "table" then fail(method, name .. " must be a list (a table), got " .. type(list), level) end
  local out, n, check, l1 = list, #list, l.check, level + 1
  for i = 1, n do
    local t = list[i]
    if type(t) ~= "table" then fail(method, name .. "[" .. i .. "] must be a table, got " .. type(t), level) end
    local r = check(t, method, name, i, l1)
    if r ~= t then
      if out == list then
        out = {}
        for k = 1, n do out[k] = list[k] end
      end
      out[i] = r
    end
  end
  return out, n
end

-- The ids of confirm_marks_many (owners = true) or finish_many, checked; their number.
local function id_list(ids, method, owners, level)
  if type(ids) ~= "table" then fail(method, "ids must be a list (a table), got " .. type(ids), level) end
  local n = #ids
  for i = 1, n do
    local v = ids[i]
    if owners then
      if not is_owner(v) then fail(method, "ids[" .. i .. "] must be an integer or a non-empty string" .. got(v), level) end
    elseif not is_integer(v) then
      fail(method, "ids[" .. i .. "] must be an integer" .. got(v), level)
    end
  end
  return n
end

-- The options of ledger/counts/rate: { since = t, status = s, limit = n, bucket = s }.
local function query_options(opts, method, level)
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then fail(method, "options must be a table or nil, got " .. type(opts), level) end
  if opts.since ~= nil and not is_finite(opts.since) then fail(method, "since must be a finite number or nil", level) end
  if opts.status ~= nil and (type(opts.status) ~= "string" or not rows.statuses[opts.status]) then
    fail(method, "status must be a ledger status or nil", level)
  end
  if opts.limit ~= nil and (not is_integer(opts.limit) or opts.limit < 0) then
    fail(method, "limit must be a non-negative integer or nil", level)
  end
  if opts.bucket ~= nil and (not is_finite(opts.bucket) or opts.bucket <= 0) then
    fail(method, "bucket must be a positive number or nil", level)
  end
  return opts.since, opts.status, opts.limit or 100, opts.bucket or 3600
end

-- The kinds of argument of the methods: KINDS[kind](v, method, spec, level) -> v as the
-- backend takes it. spec = { kind, name, optional = true|nil, default = value|nil }.
local KINDS = {}

function KINDS.string(v, method, s, level)
  if type(v) ~= "string" then fail(method, s[2] .. " must be a string, got " .. type(v), level) end
  return v
end

function KINDS.key(v, method, s, level)
  if type(v) ~= "string" or v == "" then
    fail(method, s[2] .. " must be a non-empty string, got " .. (v == "" and "\"\"" or type(v)), level)
  end
  return v
end

function KINDS.number(v, method, s, level)
  if not is_finite(v) then fail(method, s[2] .. " must be a finite number" .. got(v), level) end
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

function KINDS.owner(v, method, s, level)
  if not is_owner(v) then
    fail(method, s[2] .. " must be an integer or a non-empty string" .. (s.optional and " or nil" or "") .. got(v),
      level)
  end
  return v
end

function KINDS.list(v, method, s, level)
  if type(v) ~= "table" then fail(method, s[2] .. " must be a list (a table), got " .. type(v), level) end
  return v
end

KINDS["function"] = function(v, method, s, level)
  if type(v) ~= "function" then fail(method, s[2] .. " must be a function, got " .. type(v), level) end
  return v
end

function KINDS.state(v, method, s, level)   -- an outbox state
  if type(v) ~= "string" or not rows.states[v] then
    fail(method, s[2] .. " must be one of dead, queued, got " ..
      (type(v) == "string" and ("\"" .. v .. "\"") or type(v)), level)
  end
  return v
end

function KINDS.error_text(v)   -- anything given as an error: its text (nil stays nil)
  if v == nil or type(v) == "string" then return v end
  return tostring(v)
end

function KINDS.meta(v, method, s, level)   -- a meta value: a string, or a number kept as text
  if type(v) == "string" then return v end
  if not is_finite(v) then fail(method, s[2] .. " must be a string, a number or nil, got " .. type(v), level) end
  return number_text(v)
end

-- The arguments of each method that takes any (lists and options are checked above).
local function opt(kind, name, default)
  return { kind, name, optional = true, default = default }
end
local SIGNATURES = {
  hash_email = { { "string", "email" } },
  atomic = { { "function", "fn" } },
  get_mark = { { "key", "key" }, { "number", "now" } },
  get_marks = { { "list", "keys" }, { "number", "now" } },
  put_mark = { { "key", "key" }, { "number", "until" }, opt("owner", "outbox_id") },
  confirm_marks = { { "owner", "outbox_id" } },
  release_marks = { { "owner", "outbox_id" } },
  purge_marks = { { "number", "now" } },
  purge = { { "number", "before" }, opt("count", "limit", 10000) },
  unsubscribe = { { "key", "hash" }, { "number", "now" } },
  resubscribe = { { "key", "hash" } },
  is_unsubscribed = { { "key", "hash" } },
  claim = { { "number", "now" }, { "number", "lease" }, opt("count", "limit", 100) },
  reschedule = { { "id", "id" }, { "number", "next_at" }, opt("count", "attempts"), { "error_text", "last_error" } },
  finish = { { "id", "id" } },
  kill = { { "id", "id" }, { "error_text", "last_error" }, { "number", "now" }, opt("count", "attempts") },
  outbox = { { "state", "state" }, opt("count", "limit", 100) },
  get_meta = { { "key", "name" } },
  set_meta = { { "key", "name" }, opt("meta", "value") },
}
for _, sig in pairs(SIGNATURES) do   -- resolved once: checks run on every call
  sig.n = #sig
  for i = 1, #sig do sig[i].check = KINDS[sig[i][1]] end
end

local function arg(s, v, method)
  if v == nil and s.optional then return s.default end
  v = s.check(v, method, s, 5)   -- the kind's check, arg, check, the method, its caller
  return v
end

local Store = {}
Store.__index = Store

-- Raises unless self is an open store (call from the method itself, not in a tail call).
local function check_open(self, method)
  if getmetatable(self) ~= Store then
    error("stella.store: " .. method .. ": called without a store (use store:" .. method .. ")", 3)
  elseif self.closed then
    error("stella.store: " .. method .. ": the store is closed", 3)
  end
end

-- check_open, then the method's arguments (SIGNATURES) as the backend takes them.
local function check(self, method, a, b, c, d)
  if getmetatable(self) ~= Store then
    error("stella.store: " .. method .. ": called without a store (use store:" .. method .. ")", 3)
  elseif self.closed then
    error("stella.store: " .. method .. ": the store is closed", 3)
  end
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

-- The store ----------------------------------------------------------------------------

local MAIN = {}   -- the transaction key outside coroutines (and of per-store backends)

local function tx_key(self)
  if self.per_coroutine then return running() or MAIN end
  return MAIN
end

-- A backend's failure: inside a transaction it makes the whole transaction fail.
local function failed(self, err)
  local tx = self.txs[tx_key(self)]
  if tx and not tx.failed then tx.failed = err end
  return nil, err
end

-- A backend answer r, err as the method's: r, or nil, err (marking the transaction).
local function answer(self, r, err)
  if r == nil and err ~= nil then return failed(self, err) end
  return r
end

-- store.open(backend) -> store | nil, err: the store over a backend (see the contract
-- above); reads the salt from the backend's meta, adding one if it has none.
function M.open(b)
  local function give_up(err)
    b:close()
    return nil, err
  end
  local salt, err = b:get_meta("salt")
  if salt == nil and err ~= nil then return give_up(err) end
  if salt == nil then
    local fresh, serr = new_salt()
    if not fresh then return give_up(serr) end
    local ok, werr = b:set_meta("salt", fresh, true)   -- another process's salt may win
    if not ok then return give_up(werr) end
    salt, err = b:get_meta("salt")
    if salt == nil and err ~= nil then return give_up(err) end
  end
  if type(salt) ~= "string" or #salt < 32 then return give_up(M.error(b.name .. ": cannot read the salt", false)) end
  return setmetatable({ backend = b, salt = salt, txs = {}, per_coroutine = b.per_coroutine and true,
                        remote = b.remote and true or false, closed = false }, Store)
end

-- "a@b" from " A@B\n": lower-cased (ASCII), surrounding white space removed.
local function normalize_email(email)
  return (email:match("^%s*(.*%S)") or ""):lower()
end

function Store:hash_email(email)
  check(self, "hash_email", email)
  return core.sha256(self.salt .. normalize_email(email))
end

local function pack(...)
  return { n = select("#", ...), ... }
end

function Store:atomic(fn, ...)
  check(self, "atomic", fn)
  local key, txs = tx_key(self), self.txs
  if txs[key] then return fn(...) end   -- nested: part of the outer transaction
  local b = self.backend
  local ok, err = b:begin()
  if not ok then return nil, err end
  local tx = {}
  txs[key] = tx
  local res = pack(pcall(fn, ...))
  txs[key] = nil
  if not res[1] then
    b:rollback()
    error(res[2], 0)
  end
  local why = tx.failed or (res[2] == nil and res.n >= 3 and res[3]) or nil
  if why then
    b:rollback()
    return nil, why
  end
  ok, err = b:commit()
  if not ok then
    b:rollback()
    return nil, err
  end
  return unpack(res, 2, res.n)
end

-- Marks --------------------------------------------------------------------------------

function Store:get_mark(key, now)
  -- the trigger's look-up, once or twice per event: the common case checked in line
  if not (getmetatable(self) == Store and not self.closed and type(key) == "string" and key ~= "" and
          type(now) == "number" and now - now == 0) then
    check(self, "get_mark", key, now)
  end
  local untils, owners = self.backend:read_marks({ key }, 1, now)
  if not untils then return failed(self, owners) end
  return untils[1], owners[1]
end

-- get_marks({ key, ... }, now) -> untils, owners: untils[i], owners[i] of the mark under
-- keys[i] while it is active (nil otherwise), in one call to the backend.
function Store:get_marks(keys, now)
  check(self, "get_marks", keys, now)
  local n = #keys
  for i = 1, n do
    local k = keys[i]
    if type(k) ~= "string" or k == "" then
      fail("get_marks", "keys[" .. i .. "] must be a non-empty string, got " .. (k == "" and "\"\"" or type(k)), 2)
    end
  end
  if n == 0 then return {}, {} end
  local untils, owners = self.backend:read_marks(keys, n, now)
  if not untils then return failed(self, owners) end
  return untils, owners
end

function Store:put_mark(key, until_, outbox_id)
  check(self, "put_mark", key, until_, outbox_id)
  return answer(self, self.backend:put_marks({ { key = key, ["until"] = until_, outbox_id = outbox_id } }, 1))
end

-- put_mark_many{ { key = k, ["until"] = t, outbox_id = id|nil }, ... } -> true
function Store:put_mark_many(marks)
  check_open(self, "put_mark_many")
  local list, n = row_list(rows.mark, marks, "put_mark_many", "marks", 3)
  if n == 0 then return true end
  return answer(self, self.backend:put_marks(list, n))
end

function Store:confirm_marks(outbox_id)
  check(self, "confirm_marks", outbox_id)
  return answer(self, self.backend:settle_marks({ outbox_id }, 1, true))
end

-- confirm_marks_many{ id, ... } -> the number of marks confirmed
function Store:confirm_marks_many(ids)
  check_open(self, "confirm_marks_many")
  local n = id_list(ids, "confirm_marks_many", true, 3)
  if n == 0 then return 0 end
  return answer(self, self.backend:settle_marks(ids, n, true))
end

function Store:release_marks(outbox_id)
  check(self, "release_marks", outbox_id)
  return answer(self, self.backend:settle_marks({ outbox_id }, 1, false))
end

function Store:purge_marks(now)
  check(self, "purge_marks", now)
  return answer(self, self.backend:purge_marks(now))
end

-- Unsubscribes -------------------------------------------------------------------------

function Store:unsubscribe(hash, now)
  check(self, "unsubscribe", hash, now)
  return answer(self, self.backend:set_unsubscribed({ hash }, 1, now))
end

function Store:resubscribe(hash)
  check(self, "resubscribe", hash)
  return answer(self, self.backend:set_unsubscribed({ hash }, 1, nil))
end

function Store:is_unsubscribed(hash)
  check(self, "is_unsubscribed", hash)
  local flags, err = self.backend:unsubscribed({ hash }, 1)
  if not flags then return failed(self, err) end
  return flags[1]
end

-- unsubscribed_many{ hash, ... } -> { true|false, ... } (one call to the backend)
function Store:unsubscribed_many(hashes)
  check_open(self, "unsubscribed_many")
  if type(hashes) ~= "table" then fail("unsubscribed_many", "hashes must be a list (a table), got " .. type(hashes), 2) end
  local n = #hashes
  for i = 1, n do
    local h = hashes[i]
    if type(h) ~= "string" or h == "" then
      fail("unsubscribed_many", "hashes[" .. i .. "] must be a non-empty string, got " .. (h == "" and "\"\"" or type(h)), 2)
    end
  end
  if n == 0 then return {} end
  local flags, err = self.backend:unsubscribed(hashes, n)
  if not flags then return failed(self, err) end
  return flags
end

function Store:unsubscribed_count()
  check_open(self, "unsubscribed_count")
  return answer(self, self.backend:count_unsubscribed())
end

-- Outbox -------------------------------------------------------------------------------

function Store:enqueue(item)
  check_open(self, "enqueue")
  local ids, err = self.backend:enqueue({ one_row(rows.item, item, "enqueue", 3) }, 1)
  if not ids then return failed(self, err) end
  return ids[1]
end

-- enqueue_many{ item, ... } -> { id, ... }
function Store:enqueue_many(items)
  check_open(self, "enqueue_many")
  local list, n = row_list(rows.item, items, "enqueue_many", "items", 3)
  if n == 0 then return {} end
  return answer(self, self.backend:enqueue(list, n))
end

function Store:claim(now, lease, limit)
  now, lease, limit = check(self, "claim", now, lease, limit)
  if limit == 0 then return {} end
  return answer(self, self.backend:lease(now, lease, limit))
end

-- update_items(op, rows, n) as a yes/no: whether the item was there.
local function changed(self, n, err)
  if n == nil then return failed(self, err) end
  return n > 0
end

function Store:reschedule(id, next_at, attempts, last_error)
  id, next_at, attempts, last_error = check(self, "reschedule", id, next_at, attempts, last_error)
  return changed(self, self.backend:update_items("requeue",
    { { id = id, next_at = next_at, attempts = attempts, last_error = last_error } }, 1))
end

function Store:finish(id)
  check(self, "finish", id)
  return changed(self, self.backend:update_items("delete", { id }, 1))
end

-- finish_many{ id, ... } -> the number of items deleted
function Store:finish_many(ids)
  check_open(self, "finish_many")
  local n = id_list(ids, "finish_many", false, 3)
  if n == 0 then return 0 end
  return answer(self, self.backend:update_items("delete", ids, n))
end

function Store:kill(id, last_error, now, attempts)
  id, last_error, now, attempts = check(self, "kill", id, last_error, now, attempts)
  return changed(self, self.backend:update_items("kill",
    { { id = id, last_error = last_error, died_at = now, attempts = attempts } }, 1))
end

function Store:outbox(state, limit)
  state, limit = check(self, "outbox", state, limit)
  return answer(self, self.backend:list_items(state, limit))
end

function Store:outbox_counts()
  check_open(self, "outbox_counts")
  return answer(self, self.backend:count_items())
end

-- Ledger -------------------------------------------------------------------------------

function Store:record(entry)
  check_open(self, "record")
  return answer(self, self.backend:record({ one_row(rows.entry, entry, "record", 3) }, 1))
end

-- record_many{ entry, ... } -> true
function Store:record_many(entries)
  check_open(self, "record_many")
  local list, n = row_list(rows.entry, entries, "record_many", "entries", 3)
  if n == 0 then return true end
  return answer(self, self.backend:record(list, n))
end

function Store:ledger(opts)
  check_open(self, "ledger")
  local since, status, limit = query_options(opts, "ledger", 3)
  return answer(self, self.backend:ledger(since, status, limit))
end

local function by_status_reason(a, b)   -- by status, then reason with no reason first
  if a.status ~= b.status then return a.status < b.status end
  if a.reason == nil then return b.reason ~= nil end
  if b.reason == nil then return false end
  return a.reason < b.reason
end

-- purge(before [, limit]) -> { ledger = n, dead = n }: one bounded step of retention
-- (see the interface above); stella.trigger's purge loops over it.
function Store:purge(before, limit)
  before, limit = check(self, "purge", before, limit)
  if limit == 0 then return { ledger = 0, dead = 0 } end
  return answer(self, self.backend:purge(before, limit))
end

function Store:counts(opts)
  check_open(self, "counts")
  local since = query_options(opts, "counts", 3)
  local groups, err = self.backend:tally(since, nil)
  if not groups then return failed(self, err) end
  local out = {}
  for i = 1, #groups do
    local g = groups[i]
    out[i] = { status = g.status, reason = g.reason, count = g.count }
  end
  sort(out, by_status_reason)
  return out
end

function Store:rate(opts)
  check_open(self, "rate")
  local since, _, _, bucket = query_options(opts, "rate", 3)
  local groups, err = self.backend:tally(since, bucket)
  if not groups then return failed(self, err) end
  local buckets, out = {}, {}
  for i = 1, #groups do
    local g = groups[i]
    if rows.is_rate_counted(g.status, g.reason) then
      local b = buckets[g.start]
      if not b then
        b = { start = g.start, total = 0, errors = 0 }
        buckets[g.start] = b
        out[#out + 1] = b
      end
      b.total = b.total + g.count
      if rows.is_rate_error(g.status, g.reason) then b.errors = b.errors + g.count end
    end
  end
  sort(out, function(a, b) return a.start < b.start end)
  return out
end

-- timeline{ since, bucket=3600 } -> { { start, status, reason, count }, ... }: the ledger
-- counted per bucket (start = floor(time / bucket) * bucket), status and reason; by start,
-- then status and reason (stella dashboard's chart)
function Store:timeline(opts)
  check_open(self, "timeline")
  local since, _, _, bucket = query_options(opts, "timeline", 3)
  local groups, err = self.backend:tally(since, bucket)
  if not groups then return failed(self, err) end
  local out = {}
  for i = 1, #groups do
    local g = groups[i]
    out[i] = { start = g.start, status = g.status, reason = g.reason, count = g.count }
  end
  sort(out, function(a, b)
    if a.start ~= b.start then return a.start < b.start end
    return by_status_reason(a, b)
  end)
  return out
end

-- Meta ---------------------------------------------------------------------------------

function Store:get_meta(name)
  check(self, "get_meta", name)
  return answer(self, self.backend:get_meta(name))
end

function Store:set_meta(name, value)
  name, value = check(self, "set_meta", name, value)
  return answer(self, self.backend:set_meta(name, value, false))
end

-- Life ---------------------------------------------------------------------------------

function Store:close()
  if getmetatable(self) ~= Store then error("stella.store: close: called without a store (use store:close)", 2) end
  if not self.closed then
    self.closed = true
    self.backend:close()
  end
  return true
end

Store.__tostring = function(self)
  return self.backend.name .. (self.closed and " (closed)" or "")
end

return M
