-- stella.store.sqlite: the store interface on an SQLite file (through LuaDBI), safe for
-- several processes on one machine: WAL journal, a busy timeout, every write in a
-- `BEGIN IMMEDIATE` transaction retried while the database is busy.
--
-- Every statement is prepared once per connection and kept (self.stmts, by SQL text);
-- values reach SQL as bound parameters, never as text. LuaDBI's own transaction handling
-- is off (autocommit): the BEGIN IMMEDIATE / COMMIT here are the only transactions.
--
-- What LuaDBI (0.7) does that shapes this file:
--   * it binds every Lua number as a double: integral ids in `marks.outbox_id` (a column
--     with no affinity) come back as floats and are turned back into integers on 5.4;
--   * it reads TEXT and BLOB values up to their first NUL byte: columns that can hold any
--     bytes are read through bin() (the value, and its hex when it holds a NUL);
--   * after a failed execute, the statement's next execute reports the same failure
--     again: a statement that failed is closed and prepared afresh on its next use;
--   * fetch raises on a failed step: rows are read under pcall.
--
-- The *_many methods write n rows with multi-row statements (32, 16, ... rows each; see
-- MULTI). The connection runs with secure_delete ON (deleted outbox bodies are
-- overwritten), synchronous NORMAL, statement journals in memory (temp_store) and a WAL
-- checkpointed every WAL_CHECKPOINT pages.
local store = require "stella.store"
local core = require "stella.core"
local DBI = require "DBI"
require "dbd.sqlite3"   -- LuaDBI's SQLite driver: fail on load, not on first use, without it

local U = store._util
local error, ipairs, pairs, setmetatable, tonumber, tostring, type, pcall =
  error, ipairs, pairs, setmetatable, tonumber, tostring, type, pcall
local concat, floor, format, char = table.concat, math.floor, string.format, string.char
local pack, unpack = U.pack, U.unpack
local math_type, tointeger = math.type, math.tointeger   -- nil on LuaJIT

-- The clock for the busy timeout (not for the data: those times are passed in), and a
-- short sleep between retries of a busy BEGIN when SQLite's own busy handler did not wait:
-- LuaSocket's when it is installed, else os.time and no sleep.
local sleep, time = nil, os.time
do
  local ok, socket = pcall(require, "socket")
  if ok and type(socket) == "table" and type(socket.sleep) == "function" and type(socket.gettime) == "function" then
    sleep, time = socket.sleep, socket.gettime
  end
end

local SCHEMA_VERSION = 1

local WAL_CHECKPOINT = 10000              -- pages (40 MiB of 4 KiB pages)
local WAL_LIMIT = 64 * 1024 * 1024        -- bytes

local SCHEMA = {
  [[CREATE TABLE IF NOT EXISTS meta (
      name  TEXT PRIMARY KEY NOT NULL,
      value TEXT NOT NULL)]],
  [[CREATE TABLE IF NOT EXISTS marks (
      key       TEXT PRIMARY KEY NOT NULL,
      until_at  NUMERIC NOT NULL,
      outbox_id)]],
  "CREATE INDEX IF NOT EXISTS marks_outbox ON marks (outbox_id)",
  "CREATE INDEX IF NOT EXISTS marks_until ON marks (until_at)",
  [[CREATE TABLE IF NOT EXISTS unsubscribes (
      hash TEXT PRIMARY KEY NOT NULL,
      time NUMERIC NOT NULL)]],
  [[CREATE TABLE IF NOT EXISTS outbox (
      id             INTEGER PRIMARY KEY AUTOINCREMENT,
      kind           TEXT NOT NULL,
      body           BLOB NOT NULL,
      brand          TEXT,
      event_id       TEXT,
      interaction_id TEXT,
      customer_hash  TEXT,
      created_at     NUMERIC NOT NULL,
      next_at        NUMERIC NOT NULL,
      attempts       INTEGER NOT NULL DEFAULT 0,
      state          TEXT NOT NULL DEFAULT 'queued',
      last_error     TEXT,
      died_at        NUMERIC)]],
  "CREATE INDEX IF NOT EXISTS outbox_state_next ON outbox (state, next_at, id)",
  "CREATE INDEX IF NOT EXISTS outbox_state_died ON outbox (state, died_at)",
  [[CREATE TABLE IF NOT EXISTS ledger (
      id             INTEGER PRIMARY KEY,
      time           NUMERIC NOT NULL,
      status         TEXT NOT NULL,
      reason         TEXT,
      event_id       TEXT,
      interaction_id TEXT,
      brand          TEXT,
      channel        TEXT,
      detail         TEXT,
      request_id     TEXT,
      error_kind     TEXT,
      error_message  TEXT,
      customer_hash  TEXT,
      attempts       INTEGER)]],
  "CREATE INDEX IF NOT EXISTS ledger_time ON ledger (time)",
  "CREATE INDEX IF NOT EXISTS ledger_status_time ON ledger (status, time)",
}

-- Reading any bytes ------------------------------------------------------------------------

-- The select-list entries for a column that may hold any bytes: the value, and under
-- NAME_hex its hex digits when it holds a NUL (NULL otherwise; see unnul).
local function bin(col)
  return col .. ", CASE WHEN instr(CAST(" .. col .. " AS BLOB), X'00') THEN hex(" .. col .. ") END AS " ..
    col .. "_hex"
end

-- { name = name .. "_hex" } for the columns read through bin().
local function hex_names(list)
  local t = {}
  for _, name in ipairs(list) do t[name] = name .. "_hex" end
  return t
end

local function unhex(h)
  return (h:gsub("%x%x", function(x) return char(tonumber(x, 16)) end))
end

-- Puts back the whole value of each column that was cut at a NUL byte.
local function unnul(row, names)
  for name, hex_name in pairs(names) do
    local h = row[hex_name]
    if h ~= nil then
      row[name], row[hex_name] = unhex(h), nil
    end
  end
end

-- An outbox id as it was given: integral numbers come back from LuaDBI as floats.
local function reservation(v)
  if tointeger and math_type(v) == "float" then return tointeger(v) or v end
  return v
end

-- Statements -------------------------------------------------------------------------------

local ITEM_TEXT = { "body", "brand", "event_id", "interaction_id", "customer_hash", "last_error" }
local ITEM_HEX = hex_names(ITEM_TEXT)
local ITEM_COLUMNS = "id, kind, " .. bin("body") .. ", " .. bin("brand") .. ", " .. bin("event_id") .. ", " ..
  bin("interaction_id") .. ", " .. bin("customer_hash") .. ", created_at, next_at, attempts, state, " ..
  bin("last_error") .. ", died_at"

local LEDGER_TEXT = U.ledger_text_fields   -- every text field of an entry may hold any bytes
local LEDGER_HEX = hex_names(LEDGER_TEXT)
local LEDGER_SELECT
do
  local cols = { "time", "status", "attempts" }
  for _, name in ipairs(LEDGER_TEXT) do cols[#cols + 1] = bin(name) end
  LEDGER_SELECT = concat(cols, ", ")
end
local LEDGER_COLUMNS = "time, status, reason, event_id, interaction_id, brand, channel, detail, " ..
  "request_id, error_kind, error_message, customer_hash, attempts"

local MARK_HEX = hex_names{ "outbox_id" }
local VALUE_HEX = hex_names{ "value" }
local REASON_HEX = hex_names{ "reason" }

local SQL = {
  get_mark = "SELECT until_at, " .. bin("outbox_id") .. " FROM marks WHERE key = ? AND until_at > ?",
  put_mark = "INSERT OR REPLACE INTO marks (key, until_at, outbox_id) VALUES (?, ?, ?)",
  confirm_marks = "UPDATE marks SET outbox_id = NULL WHERE outbox_id = ?",
  release_marks = "DELETE FROM marks WHERE outbox_id = ?",
  purge_marks = "DELETE FROM marks WHERE until_at <= ?",
  unsubscribe = "INSERT OR REPLACE INTO unsubscribes (hash, time) VALUES (?, ?)",
  resubscribe = "DELETE FROM unsubscribes WHERE hash = ?",
  is_unsubscribed = "SELECT 1 AS x FROM unsubscribes WHERE hash = ?",
  any_unsubscribes = "SELECT 1 AS x FROM unsubscribes LIMIT 1",
  mark_until = "SELECT until_at FROM marks WHERE key = ? AND until_at > ?",
  unsubscribed_count = "SELECT COUNT(*) AS n FROM unsubscribes",
  enqueue = "INSERT INTO outbox (kind, body, brand, event_id, interaction_id, customer_hash, " ..
    "created_at, next_at, attempts, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued')",
  any_due = "SELECT 1 AS x FROM outbox WHERE state = 'queued' AND next_at <= ? LIMIT 1",
  due = "SELECT " .. ITEM_COLUMNS .. " FROM outbox WHERE state = 'queued' AND next_at <= ? " ..
    "ORDER BY next_at, id LIMIT ?",
  lease = "UPDATE outbox SET next_at = ? WHERE id = ?",
  reschedule = "UPDATE outbox SET state = 'queued', next_at = ?, attempts = COALESCE(?, attempts), " ..
    "last_error = ?, died_at = NULL WHERE id = ?",
  finish = "DELETE FROM outbox WHERE id = ?",
  kill = "UPDATE outbox SET state = 'dead', last_error = ?, died_at = ?, attempts = COALESCE(?, attempts) " ..
    "WHERE id = ?",
  outbox_queued = "SELECT " .. ITEM_COLUMNS .. " FROM outbox WHERE state = 'queued' ORDER BY next_at, id LIMIT ?",
  outbox_dead = "SELECT " .. ITEM_COLUMNS .. " FROM outbox WHERE state = 'dead' " ..
    "ORDER BY died_at DESC, id DESC LIMIT ?",
  outbox_counts = "SELECT state, COUNT(*) AS n FROM outbox GROUP BY state",
  record = "INSERT INTO ledger (" .. LEDGER_COLUMNS .. ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
  get_meta = "SELECT " .. bin("value") .. " FROM meta WHERE name = ?",
  set_meta = "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
  delete_meta = "DELETE FROM meta WHERE name = ?",
  read_meta = "SELECT name, value FROM meta WHERE name IN ('schema_version', 'salt')",
  salt = "INSERT OR IGNORE INTO meta (name, value) VALUES ('salt', ?)",
  schema_version = "INSERT OR REPLACE INTO meta (name, value) VALUES ('schema_version', ?)",
}

-- Multi-row statements for the *_many methods: a list of n rows goes through statements of
-- 32, 16, 8, 4, 2 and 1 rows (at most six executes, and six cached statements per kind,
-- for any n below 64).
local CHUNKS = { 32, 16, 8, 4, 2, 1 }

local MULTI = {
  put_mark = { "INSERT OR REPLACE INTO marks (key, until_at, outbox_id) VALUES ", 3 },
  enqueue = { "INSERT INTO outbox (kind, body, brand, event_id, interaction_id, customer_hash, " ..
    "created_at, next_at, attempts, state) VALUES ", 9, ", 'queued'" },
  record = { "INSERT INTO ledger (" .. LEDGER_COLUMNS .. ") VALUES ", 13 },
  confirm_marks = { "UPDATE marks SET outbox_id = NULL WHERE outbox_id IN ", 1, nil, true },
  finish = { "DELETE FROM outbox WHERE id IN ", 1, nil, true },
}
for _, m in pairs(MULTI) do
  local prefix, width, extra, list = m[1], m[2], m[3] or "", m[4]
  local sql = {}
  for _, n in ipairs(CHUNKS) do
    if list then   -- "... IN (?, ?, ?)"
      sql[n] = prefix .. "(" .. string.rep("?", n, ", ") .. ")"
    else           -- "... VALUES (?, ?, 'queued'), (?, ?, 'queued')"
      sql[n] = prefix .. string.rep("(" .. string.rep("?", width, ", ") .. extra .. ")", n, ", ")
    end
  end
  m.sql, m.width = sql, width
end

local M = {}

local Store = {}
Store.__index = Store

local check_open, check = U.guards(Store)

-- Running statements -----------------------------------------------------------------------

local function clean(msg)
  msg = tostring(msg or "unknown error")
  return (msg:gsub("^Execute failed ", ""):gsub("^Error preparing statement handle: ", "")
    :gsub("^Failed to connect to database: ", ""):gsub("^Fetch failed ", ""))
end

local function is_busy(msg)
  return msg:find("locked", 1, true) ~= nil or msg:find("busy", 1, true) ~= nil
end

local function failure(self, msg)
  msg = clean(msg)
  local err = store.error(self.path .. ": " .. msg, is_busy(msg))
  -- a failed statement inside atomic makes the whole transaction roll back
  if self.depth > 0 and not self.failed then self.failed = err end
  return nil, err
end

-- Forgets a statement that failed (see the top of the file).
local function drop(self, sql, sth)
  self.stmts[sql] = nil
  pcall(sth.close, sth)
end

-- Runs sql with the values bound: the statement, its first row (if any) ready to fetch,
-- or nil, message.
local function run_raw(self, sql, ...)
  local stmts = self.stmts
  local sth = stmts[sql]
  if not sth then
    local err
    sth, err = self.db:prepare(sql)
    if not sth then return nil, err end
    stmts[sql] = sth
  end
  local ok, err = sth:execute(...)
  if ok then return sth end
  drop(self, sql, sth)
  return nil, err
end

-- Every row of an executed statement, run to completion (so that it holds no read
-- transaction open). Raises when a step fails (call it under pcall).
local function fetch_all(sth)
  local list, n = {}, 0
  local row = sth:fetch(true)
  while row do
    n = n + 1
    list[n] = row
    row = sth:fetch(true)
  end
  return list
end

-- A statement that returns no rows: the number of changed rows, or nil, err.
local function exec(self, sql, ...)
  local sth, err = run_raw(self, sql, ...)
  if not sth then return failure(self, err) end
  return sth:affected()
end

-- Runs the statements of MULTI[kind] over the rows held in `values` (row after row, `width`
-- values each, `count` rows). Calls after(self, first_row, rows) after each statement when
-- given. The number of changed rows, or nil, err.
local function exec_multi(self, kind, values, count, after)
  local m = MULTI[kind]
  local sql, width = m.sql, m.width
  local row, total = 1, 0
  while row <= count do
    local left = count - row + 1
    local n = 1
    for _, c in ipairs(CHUNKS) do
      if c <= left then n = c; break end
    end
    local first = (row - 1) * width + 1
    local changed, err = exec(self, sql[n], unpack(values, first, first + n * width - 1))
    if not changed then return nil, err end
    total = total + changed
    if after then after(self, row, n) end
    row = row + n
  end
  return total
end

-- A query: an array of rows (tables keyed by column name, NULL columns absent), or nil,
-- err. `names`: the columns read through bin(), or nil.
local function rows(self, sql, names, ...)
  local sth, err = run_raw(self, sql, ...)
  if not sth then return failure(self, err) end
  local ok, list = pcall(fetch_all, sth)
  if not ok then
    drop(self, sql, sth)
    return failure(self, list)
  end
  if names then
    for i = 1, #list do unnul(list[i], names) end
  end
  return list
end

-- The row of an executed query that has at most one (a primary key lookup, a count), or
-- false; run to completion. Raises when a step fails (call it under pcall).
local function fetch_one(sth)
  local r = sth:fetch(true)
  if r and sth:fetch(true) then   -- more than one after all: run it to completion
    while sth:fetch(true) do end
  end
  return r or false
end

-- The row of a query that has at most one, false when it has none, or nil, err.
local function row(self, sql, names, ...)
  local sth, err = run_raw(self, sql, ...)
  if not sth then return failure(self, err) end
  local ok, r = pcall(fetch_one, sth)
  if not ok then
    drop(self, sql, sth)
    return failure(self, r)
  end
  if r and names then unnul(r, names) end
  return r
end

-- Transactions -----------------------------------------------------------------------------

-- Runs a statement, retrying while the database is busy until the busy timeout has passed.
-- SQLite's busy handler (PRAGMA busy_timeout) already waits inside each attempt; the loop
-- covers the cases where SQLite reports busy without calling it.
local function exec_retry(self, sql)
  local deadline = time() + self.busy_timeout
  while true do
    local sth, err = run_raw(self, sql)
    if sth then
      local ok, ferr = pcall(fetch_all, sth)   -- PRAGMA journal_mode answers with a row
      if ok then return true end
      drop(self, sql, sth)
      err = ferr
    end
    err = clean(err)
    if not is_busy(err) or time() > deadline then
      return nil, store.error(self.path .. ": " .. err, is_busy(err))
    end
    if sleep then sleep(0.01) end
  end
end

local function rollback(self)
  run_raw(self, "ROLLBACK")   -- fails harmlessly if SQLite already rolled back
end

function Store:atomic(fn, ...)
  check(self, "atomic", fn)
  if self.depth > 0 then return fn(...) end   -- nested: part of the outer transaction
  local ok, err = exec_retry(self, "BEGIN IMMEDIATE")
  if not ok then return nil, err end
  self.depth, self.failed = 1, nil
  local res = pack(pcall(fn, ...))
  self.depth = 0
  local failed = self.failed
  self.failed = nil
  if not res[1] then
    rollback(self)
    error(res[2], 0)
  end
  if failed then
    rollback(self)
    return nil, failed
  end
  ok, err = exec_retry(self, "COMMIT")
  if not ok then
    rollback(self)
    return nil, err
  end
  return unpack(res, 2, res.n)
end

-- Runs fn(self, ...) in a transaction of its own, or in the caller's when inside atomic.
local function write(self, fn, ...)
  if self.depth > 0 then return fn(self, ...) end
  return self:atomic(fn, self, ...)
end

-- Opening ----------------------------------------------------------------------------------

local function read_meta(self)
  local list = rows(self, SQL.read_meta, nil)   -- both are ASCII
  local meta = {}
  for _, r in ipairs(list or {}) do meta[r.name] = r.value end
  return meta
end

local function create_schema(self, salt)
  for _, sql in ipairs(SCHEMA) do
    local sth, err = run_raw(self, sql)
    if not sth then return failure(self, err) end
    drop(self, sql, sth)   -- used once
  end
  local done, err = exec(self, SQL.salt, salt)
  if not done then return nil, err end
  return exec(self, SQL.schema_version, tostring(SCHEMA_VERSION))
end

local function pragma(self, sql)
  local list, err = rows(self, sql)
  if not list then return nil, err end
  local sth = self.stmts[sql]
  if sth then drop(self, sql, sth) end   -- used once
  return true
end

local function init(self)
  local ok, err = pragma(self, format("PRAGMA busy_timeout = %d", floor(self.busy_timeout * 1000 + 0.5)))
  if not ok then return nil, err end
  ok, err = exec_retry(self, "PRAGMA journal_mode = WAL")
  if not ok then return nil, err end
  ok, err = pragma(self, "PRAGMA synchronous = NORMAL")
  if not ok then return nil, err end
  -- deleted rows (sent outbox bodies, which hold the customer's address) are overwritten
  ok, err = pragma(self, "PRAGMA secure_delete = ON")
  if not ok then return nil, err end
  -- statement journals (what a multi-row statement of the *_many methods may have to undo)
  -- in memory: on disk they cost more than the statement, and would be one more file with
  -- page images (customers' addresses) in it
  ok, err = pragma(self, "PRAGMA temp_store = MEMORY")
  if not ok then return nil, err end
  -- checkpoint the WAL every WAL_CHECKPOINT pages rather than SQLite's 1000: a checkpoint
  -- costs two fsyncs whatever it copies, and a batch of events dirties ~100 pages (mostly
  -- leaves of the marks index, keyed by hashes, so all over it); the WAL file is cut back
  -- to WAL_LIMIT bytes after a checkpoint
  ok, err = pragma(self, "PRAGMA wal_autocheckpoint = " .. WAL_CHECKPOINT)
  if not ok then return nil, err end
  ok, err = pragma(self, "PRAGMA journal_size_limit = " .. WAL_LIMIT)
  if not ok then return nil, err end

  local meta = read_meta(self)
  local version = tonumber(meta.schema_version)
  if not (version == SCHEMA_VERSION and meta.salt) then
    if version and version > SCHEMA_VERSION then
      return nil, store.error(self.path .. ": schema version " .. version ..
        " is newer than this version of stella supports (" .. SCHEMA_VERSION .. ")", false)
    end
    local salt, serr = U.new_salt()
    if not salt then return nil, serr end
    ok, err = self:atomic(create_schema, self, salt)
    if not ok then return nil, err end
    meta = read_meta(self)
  end
  if type(meta.salt) ~= "string" or #meta.salt < 32 then
    return nil, store.error(self.path .. ": cannot read the salt", false)
  end
  self.salt = meta.salt
  return true
end

-- stella.store.sqlite(path [, opts]) -> store | nil, err
function M.new(path, opts)
  if type(path) ~= "string" or path == "" then
    error("stella.store.sqlite: path must be a non-empty string, got " .. (path == "" and "\"\"" or type(path)), 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("stella.store.sqlite: opts must be a table or nil, got " .. type(opts), 2)
  end
  local timeout = opts and opts.busy_timeout
  if timeout == nil then timeout = 5 end
  if not U.is_finite(timeout) or timeout < 0 then
    error("stella.store.sqlite: opts.busy_timeout must be a non-negative number of seconds", 2)
  end

  local db, cerr = DBI.Connect("SQLite3", path)
  if not db then return nil, store.error(path .. ": " .. clean(cerr), false) end
  -- no implicit BEGIN before each statement (the call answers false when there was no
  -- transaction to roll back, which is the case here)
  db:autocommit(true)
  local self = setmetatable({
    path = path, db = db, stmts = {}, busy_timeout = timeout, depth = 0, closed = false,
  }, Store)
  local ok, err = init(self)
  if not ok then
    self:close()
    return nil, err
  end
  return self
end

-- Hashing ----------------------------------------------------------------------------------

function Store:hash_email(email)
  check(self, "hash_email", email)
  return core.sha256(self.salt .. U.normalize_email(email))
end

-- Marks ------------------------------------------------------------------------------------

function Store:get_mark(key, now)
  check(self, "get_mark", key, now)
  local r, err = row(self, SQL.get_mark, MARK_HEX, key, now)
  if not r then return nil, err end
  return r.until_at, reservation(r.outbox_id)
end

-- For the trigger (not part of the interface; key and now already checked by the caller):
-- the until of the active mark under key, or nil (nil, err on a failure).
local function fetch_until(sth)
  local r = sth:fetch(false)
  if r and sth:fetch(false) then
    while sth:fetch(false) do end
  end
  return r and r[1]
end

function Store:_mark_until(key, now)
  check_open(self, "_mark_until")
  local sql = SQL.mark_until
  local sth, err = run_raw(self, sql, key, now)
  if not sth then return failure(self, err) end
  local ok, u = pcall(fetch_until, sth)
  if not ok then
    drop(self, sql, sth)
    return failure(self, u)
  end
  return u
end

local function put_mark(self, key, until_, outbox_id)
  local n, err = exec(self, SQL.put_mark, key, until_, outbox_id)
  if not n then return nil, err end
  return true
end

function Store:put_mark(key, until_, outbox_id)
  check(self, "put_mark", key, until_, outbox_id)
  return write(self, put_mark, key, until_, outbox_id)
end

function Store:confirm_marks(outbox_id)
  check(self, "confirm_marks", outbox_id)
  return write(self, exec, SQL.confirm_marks, outbox_id)
end

local function put_mark_many(self, values, count)
  local n, err = exec_multi(self, "put_mark", values, count)
  if not n then return nil, err end
  return true
end

-- put_mark_many{ { key = k, ["until"] = t, outbox_id = id|nil }, ... } -> true: put_mark for
-- each, in order, in one transaction.
function Store:put_mark_many(marks)
  check_open(self, "put_mark_many")
  local values, n = U.mark_values(marks)
  if n == 0 then return true end
  return write(self, put_mark_many, values, n)
end

-- confirm_marks_many{ id, ... } -> n: confirm_marks for each, in one transaction; the number
-- of marks confirmed.
function Store:confirm_marks_many(ids)
  check_open(self, "confirm_marks_many")
  local n = U.check_ids(ids, "confirm_marks_many", true)
  if n == 0 then return 0 end
  return write(self, exec_multi, "confirm_marks", ids, n)
end

function Store:release_marks(outbox_id)
  check(self, "release_marks", outbox_id)
  return write(self, exec, SQL.release_marks, outbox_id)
end

function Store:purge_marks(now)
  check(self, "purge_marks", now)
  return write(self, exec, SQL.purge_marks, now)
end

-- Unsubscribes -----------------------------------------------------------------------------

local function exec_true(self, sql, ...)
  local n, err = exec(self, sql, ...)
  if not n then return nil, err end
  return true
end

function Store:unsubscribe(hash, now)
  check(self, "unsubscribe", hash, now)
  return write(self, exec_true, SQL.unsubscribe, hash, now)
end

function Store:resubscribe(hash)
  check(self, "resubscribe", hash)
  return write(self, exec_true, SQL.resubscribe, hash)
end

function Store:is_unsubscribed(hash)
  check(self, "is_unsubscribed", hash)
  local r, err = row(self, SQL.is_unsubscribed, nil, hash)
  if r == nil then return nil, err end
  return r ~= false
end

-- For the trigger (not part of the interface): false when no address is unsubscribed,
-- true otherwise (and when the answer is unknown).
function Store:_any_unsubscribes()
  check_open(self, "_any_unsubscribes")
  local r = row(self, SQL.any_unsubscribes, nil)
  return r ~= false
end

function Store:unsubscribed_count()
  check_open(self, "unsubscribed_count")
  local r, err = row(self, SQL.unsubscribed_count, nil)
  if not r then return nil, err end
  return r.n
end

-- Outbox -----------------------------------------------------------------------------------

local function enqueue(self, it)
  local n, err = exec(self, SQL.enqueue, it.kind, it.body, it.brand, it.event_id, it.interaction_id,
    it.customer_hash, it.created_at, it.next_at, it.attempts)
  if not n then return nil, err end
  return self.db:last_id()
end

function Store:enqueue(item)
  local it = check(self, "enqueue", item)
  return write(self, enqueue, it)
end

local function enqueue_many(self, values, count)
  local ids = {}
  -- one INSERT of n rows gives them consecutive ids (the write lock is held): the last
  -- one's and the n - 1 before it
  local n, err = exec_multi(self, "enqueue", values, count, function(s, first, rows)
    local last = s.db:last_id()
    for i = 0, rows - 1 do ids[first + i] = last - rows + 1 + i end
  end)
  if not n then return nil, err end
  return ids
end

-- enqueue_many{ item, ... } -> { id, ... }: enqueue for each, in order, in one transaction.
function Store:enqueue_many(items)
  check_open(self, "enqueue_many")
  local values, n = U.outbox_values(items)
  if n == 0 then return {} end
  return write(self, enqueue_many, values, n)
end

local function claim(self, now, lease, limit)
  local list, err = rows(self, SQL.due, ITEM_HEX, now, limit)
  if not list or #list == 0 then return list, err end
  local until_ = now + lease
  for _, it in ipairs(list) do
    local n
    n, err = exec(self, SQL.lease, until_, it.id)
    if not n then return nil, err end
    it.next_at = until_
  end
  return list
end

function Store:claim(now, lease, limit)
  now, lease, limit = check(self, "claim", now, lease, limit)
  if self.depth == 0 then
    -- nothing due: answer without taking the write lock (workers poll)
    local due, err = row(self, SQL.any_due, nil, now)
    if due == nil then return nil, err end
    if not due or limit == 0 then return {} end
  end
  return write(self, claim, now, lease, limit)
end

local function changed(self, sql, ...)
  local n, err = exec(self, sql, ...)
  if not n then return nil, err end
  return n > 0
end

function Store:reschedule(id, next_at, attempts, last_error)
  id, next_at, attempts, last_error = check(self, "reschedule", id, next_at, attempts, last_error)
  return write(self, changed, SQL.reschedule, next_at, attempts, last_error, id)
end

function Store:finish(id)
  check(self, "finish", id)
  return write(self, changed, SQL.finish, id)
end

-- finish_many{ id, ... } -> n: finish for each, in one transaction; the number of items
-- deleted.
function Store:finish_many(ids)
  check_open(self, "finish_many")
  local n = U.check_ids(ids, "finish_many")
  if n == 0 then return 0 end
  return write(self, exec_multi, "finish", ids, n)
end

function Store:kill(id, last_error, now, attempts)
  id, last_error, now, attempts = check(self, "kill", id, last_error, now, attempts)
  return write(self, changed, SQL.kill, last_error, now, attempts, id)
end

function Store:outbox(state, limit)
  state, limit = check(self, "outbox", state, limit)
  return rows(self, state == "dead" and SQL.outbox_dead or SQL.outbox_queued, ITEM_HEX, limit)
end

function Store:outbox_counts()
  check_open(self, "outbox_counts")
  local list, err = rows(self, SQL.outbox_counts, nil)
  if not list then return nil, err end
  local counts = { queued = 0, dead = 0 }
  for _, r in ipairs(list) do counts[r.state] = r.n end
  return counts
end

-- Ledger -----------------------------------------------------------------------------------

local function record(self, e)
  local n, err = exec(self, SQL.record, e.time, e.status, e.reason, e.event_id, e.interaction_id, e.brand,
    e.channel, e.detail, e.request_id, e.error_kind, e.error_message, e.customer_hash, e.attempts)
  if not n then return nil, err end
  return true
end

function Store:record(entry)
  local e = check(self, "record", entry)
  return write(self, record, e)
end

local function record_many(self, values, count)
  local n, err = exec_multi(self, "record", values, count)
  if not n then return nil, err end
  return true
end

-- record_many{ entry, ... } -> true: record for each, in order, in one transaction.
function Store:record_many(entries)
  check_open(self, "record_many")
  local values, n = U.ledger_values(entries)
  if n == 0 then return true end
  return write(self, record_many, values, n)
end

-- For the trigger (not part of the interface): the writes of enqueue_many ("enqueue", 9 values
-- a row), put_mark_many ("put_mark", 3), record_many ("record", 13), confirm_marks_many
-- ("confirm_marks", 1) and finish_many ("finish", 1) from rows already flat in `values`, in
-- the column order of those methods, and already checked by the caller: strings or nil in
-- the text columns, finite numbers in the numeric ones, integer ids. Returns what the public
-- method would.
local WRITERS = {
  enqueue = enqueue_many, put_mark = put_mark_many, record = record_many,
}

function Store:_write_values(kind, values, count)
  check_open(self, "_write_values")
  local fn = WRITERS[kind]
  if fn then
    if count == 0 then return kind == "enqueue" and {} or true end
    return write(self, fn, values, count)
  end
  if kind ~= "confirm_marks" and kind ~= "finish" then
    error("stella.store: _write_values: unknown kind " .. tostring(kind), 2)
  end
  if count == 0 then return 0 end
  return write(self, exec_multi, kind, values, count)
end

-- " WHERE ..." for the query options (with the extra condition `also`), and its values.
local function where(o, also)
  local parts, values = {}, {}
  if o.since ~= nil then
    parts[#parts + 1] = "time >= ?"
    values[#values + 1] = o.since
  end
  if o.status ~= nil then
    parts[#parts + 1] = "status = ?"
    values[#values + 1] = o.status
  end
  if also then parts[#parts + 1] = also end
  return #parts > 0 and (" WHERE " .. concat(parts, " AND ")) or "", values
end

function Store:ledger(opts)
  local o = check(self, "ledger", opts)
  local w, values = where(o)
  values[#values + 1] = o.limit
  return rows(self, "SELECT " .. LEDGER_SELECT .. " FROM ledger" .. w .. " ORDER BY time DESC, id DESC LIMIT ?",
    LEDGER_HEX, unpack(values, 1, #values))
end

function Store:counts(opts)
  local o = check(self, "counts", opts)
  o.status = nil
  local w, values = where(o)
  local list, err = rows(self, "SELECT status, " .. bin("reason") .. ", COUNT(*) AS n FROM ledger" .. w ..
    " GROUP BY status, reason ORDER BY status, reason", REASON_HEX, unpack(values, 1, #values))
  if not list then return nil, err end
  for _, r in ipairs(list) do
    r.count, r.n = r.n, nil
  end
  return list
end

function Store:rate(opts)
  local o = check(self, "rate", opts)
  o.status = nil
  local w, values = where(o, "status IN ('sent', 'recorded', 'failed', 'invalid', 'queued')")
  table.insert(values, 1, o.bucket)
  -- k = floor(time / bucket) in real arithmetic (CAST truncates towards zero)
  local list, err = rows(self, "SELECT k, COUNT(*) AS total, " ..
    "SUM(CASE WHEN status IN ('failed', 'invalid') OR (status = 'queued' AND " ..
    "(reason IS NULL OR reason <> 'deferred')) THEN 1 ELSE 0 END) AS errors FROM (" ..   -- U.is_rate_error
    "SELECT CAST(q AS INTEGER) - (q < CAST(q AS INTEGER)) AS k, status, reason FROM (" ..
    "SELECT time * 1.0 / ? AS q, status, reason FROM ledger" .. w .. ")) GROUP BY k ORDER BY k",
    nil, unpack(values, 1, #values))
  if not list then return nil, err end
  local out = {}
  for i, r in ipairs(list) do
    out[i] = { start = r.k * o.bucket, total = r.total, errors = r.errors }
  end
  return out
end

-- Meta -------------------------------------------------------------------------------------

function Store:get_meta(name)
  check(self, "get_meta", name)
  local r, err = row(self, SQL.get_meta, VALUE_HEX, name)
  if r == nil then return nil, err end
  return r and r.value or nil
end

function Store:set_meta(name, value)
  name, value = check(self, "set_meta", name, value)
  if value == nil then return write(self, exec_true, SQL.delete_meta, name) end
  return write(self, exec_true, SQL.set_meta, name, value)
end

-- Life -------------------------------------------------------------------------------------

function Store:close()
  if self.closed then return true end
  self.closed = true
  if self.db then
    if self.depth > 0 then rollback(self) end
    for _, sth in pairs(self.stmts) do pcall(sth.close, sth) end
    pcall(self.db.close, self.db)
  end
  self.db, self.stmts = nil, {}
  return true
end

-- Lua 5.4 closes a forgotten store when it is collected; LuaJIT ignores __gc on tables.
Store.__gc = function(self)
  if not self.closed then pcall(Store.close, self) end
end

Store.__tostring = function(self)
  return "stella.store.sqlite(" .. self.path .. ")" .. (self.closed and " (closed)" or "")
end

return M
