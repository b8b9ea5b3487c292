-- stella.store.sqlite: the store backend on an SQLite file (through LuaDBI), safe for
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
-- The primitives are those of the contract in stella.store (lua/stella/store/init.lua);
-- the tables, column lists and INSERTs come from the row layouts of stella.store.rows.
-- n rows are written with multi-row statements (up to 32 rows each; see MULTI), their
-- parameters bound straight from the row tables by code made from those layouts. The
-- connection runs with secure_delete ON (deleted outbox bodies are overwritten),
-- synchronous NORMAL, statement journals in memory (temp_store) and a WAL checkpointed
-- every WAL_CHECKPOINT pages, and emptied after every transaction that deleted outbox
-- items (see checkpoint below).
local store = require "stella.store"
local layouts = require "stella.store.rows"
local DBI = require "DBI"
require "dbd.sqlite3"   -- LuaDBI's SQLite driver: fail on load, not on first use, without it

local assert, error, ipairs, load, pairs, setmetatable, tonumber, tostring, type, pcall =
  assert, error, ipairs, load, pairs, setmetatable, tonumber, tostring, type, pcall
local concat, floor, format, char, rep = table.concat, math.floor, string.format, string.char, string.rep
local unpack = table.unpack or unpack   -- luacheck: ignore (unpack is the 5.1 name)
local math_type, tointeger = math.type, math.tointeger   -- nil on LuaJIT

local ITEM, STORED_ITEM, ENTRY, MARK = layouts.item, layouts.stored_item, layouts.entry, layouts.mark

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

-- The tables, made from the row layouts (stella.store.rows).
local function create_table(name, layout, first)
  local cols = {}
  if first then cols[1] = first end
  for _, f in ipairs(layout) do cols[#cols + 1] = f.column .. (f.sql ~= "" and (" " .. f.sql) or "") end
  return "CREATE TABLE IF NOT EXISTS " .. name .. " (" .. concat(cols, ", ") .. ")"
end

local SCHEMA = {
  "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)",
  create_table("marks", MARK),
  "CREATE INDEX IF NOT EXISTS marks_outbox ON marks (outbox_id)",
  "CREATE INDEX IF NOT EXISTS marks_until ON marks (until_at)",
  "CREATE TABLE IF NOT EXISTS unsubscribes (hash TEXT PRIMARY KEY NOT NULL, time NUMERIC NOT NULL)",
  create_table("outbox", STORED_ITEM),
  "CREATE INDEX IF NOT EXISTS outbox_state_next ON outbox (state, next_at, id)",
  "CREATE INDEX IF NOT EXISTS outbox_state_died ON outbox (state, died_at)",
  create_table("ledger", ENTRY, "id INTEGER PRIMARY KEY"),
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

-- The select list of a layout's columns, those that may hold any bytes through bin(), and
-- the names read that way.
local function select_list(layout)
  local cols, hex = {}, {}
  for _, f in ipairs(layout) do
    local k = f.kind
    if k == "text" or k == "any_text" or k == "bytes" then
      cols[#cols + 1] = bin(f.column)
      hex[f.column] = f.column .. "_hex"
    else
      cols[#cols + 1] = f.column
    end
  end
  return concat(cols, ", "), hex
end

local ITEM_COLUMNS, ITEM_HEX = select_list(STORED_ITEM)
local LEDGER_SELECT, LEDGER_HEX = select_list(ENTRY)
local VALUE_HEX = hex_names{ "value" }
local REASON_HEX = hex_names{ "reason" }

local SQL = {
  read_mark = "SELECT until_at, outbox_id FROM marks WHERE key = ? AND until_at > ?",
  read_owner_hex = "SELECT hex(outbox_id) FROM marks WHERE key = ?",
  purge_marks = "DELETE FROM marks WHERE until_at <= ?",
  -- (each a range of an index: ledger_time, outbox_state_died)
  purge_ledger = "DELETE FROM ledger WHERE id IN (SELECT id FROM ledger WHERE time < ? LIMIT ?)",
  purge_dead = "DELETE FROM outbox WHERE id IN " ..
    "(SELECT id FROM outbox WHERE state = 'dead' AND died_at < ? LIMIT ?)",
  unsubscribed = "SELECT 1 AS x FROM unsubscribes WHERE hash = ?",
  count_unsubscribed = "SELECT COUNT(*) AS n FROM unsubscribes",
  any_due = "SELECT 1 AS x FROM outbox WHERE state = 'queued' AND next_at <= ? LIMIT 1",
  due = "SELECT " .. ITEM_COLUMNS .. " FROM outbox WHERE state = 'queued' AND next_at <= ? " ..
    "ORDER BY next_at, id LIMIT ?",
  lease = "UPDATE outbox SET next_at = ? WHERE id = ?",
  requeue = "UPDATE outbox SET state = 'queued', next_at = ?, attempts = COALESCE(?, attempts), " ..
    "last_error = ?, died_at = NULL WHERE id = ?",
  kill = "UPDATE outbox SET state = 'dead', last_error = COALESCE(?, last_error), died_at = ?, " ..
    "attempts = COALESCE(?, attempts) WHERE id = ?",
  list_queued = "SELECT " .. ITEM_COLUMNS .. " FROM outbox WHERE state = 'queued' ORDER BY next_at, id LIMIT ?",
  list_dead = "SELECT " .. ITEM_COLUMNS .. " FROM outbox WHERE state = 'dead' " ..
    "ORDER BY died_at DESC, id DESC LIMIT ?",
  count_items = "SELECT state, COUNT(*) AS n FROM outbox GROUP BY state",
  get_meta = "SELECT " .. bin("value") .. " FROM meta WHERE name = ?",
  set_meta = "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
  add_meta = "INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)",
  delete_meta = "DELETE FROM meta WHERE name = ?",
  schema_version = "SELECT value FROM meta WHERE name = 'schema_version'",
  set_schema_version = "INSERT OR REPLACE INTO meta (name, value) VALUES ('schema_version', ?)",
}

-- Multi-row statements: a list of n rows goes through statements of 32 (or fewer, see
-- MAX_SLOTS), 16, 8, 4, 2 and 1 rows (a handful of executes, and at most six cached
-- statements per kind, for any n below 64).
local CHUNKS = { 32, 16, 8, 4, 2, 1 }
local MAX_SLOTS = 240   -- a Lua function's registers (LuaJIT: 250): rows bound at once

local MULTI = {   -- { SQL up to the rows, layout or values a row, after each row's values, "IN" list }
  put_marks = { "INSERT OR REPLACE INTO marks (" .. layouts.columns(MARK) .. ") VALUES ", MARK },
  enqueue = { "INSERT INTO outbox (" .. layouts.columns(ITEM) .. ", state) VALUES ", ITEM, ", 'queued'" },
  record = { "INSERT INTO ledger (" .. layouts.columns(ENTRY) .. ") VALUES ", ENTRY },
  unsubscribe = { "INSERT OR REPLACE INTO unsubscribes (hash, time) VALUES ", 2 },
  resubscribe = { "DELETE FROM unsubscribes WHERE hash IN ", 1, nil, true },
  confirm_marks = { "UPDATE marks SET outbox_id = NULL WHERE outbox_id IN ", 1, nil, true },
  release_marks = { "DELETE FROM marks WHERE outbox_id IN ", 1, nil, true },
  delete_items = { "DELETE FROM outbox WHERE id IN ", 1, nil, true },
}

-- bind(list, i) -> the parameters of rows list[i .. i + n - 1] of a layout, field after
-- field in the layout's order, made once per layout and n. (Written out: it runs for
-- every row the trigger writes.)
local function binder(layout, n)
  local locals, reads, values = {}, {}, {}
  for r = 1, n do
    locals[r], reads[r] = "r" .. r, "list[i + " .. (r - 1) .. "]"
    for j = 1, layout.width do values[#values + 1] = format("r%d[%q]", r, layout[j].name) end
  end
  local src = "return function(list, i)\nlocal " .. concat(locals, ", ") .. " = " .. concat(reads, ", ") ..
    "\nreturn " .. concat(values, ", ") .. "\nend"
  return assert(load(src, "=stella.store.sqlite bind(" .. layout.name .. ", " .. n .. ")"))()
end

-- The same for plain values, `width` a row (ids, hashes; unsubscribes' hash and time).
local function flat_binder(width, n)
  return function(list, i)
    return unpack(list, (i - 1) * width + 1, (i - 1 + n) * width)
  end
end

for _, m in pairs(MULTI) do
  local prefix, layout, extra, list = m[1], m[2], m[3] or "", m[4]
  local width = type(layout) == "table" and layout.width or layout
  local sql, bind, chunks = {}, {}, {}
  for _, n in ipairs(CHUNKS) do
    if n * (width + 1) <= MAX_SLOTS then
      chunks[#chunks + 1] = n
      if list then   -- "... IN (?, ?, ?)"
        sql[n] = prefix .. "(" .. rep("?", n, ", ") .. ")"
      else           -- "... VALUES (?, ?, 'queued'), (?, ?, 'queued')"
        sql[n] = prefix .. rep("(" .. rep("?", width, ", ") .. extra .. ")", n, ", ")
      end
      bind[n] = type(layout) == "table" and binder(layout, n) or flat_binder(width, n)
    end
  end
  m.sql, m.bind, m.chunks = sql, bind, chunks
end

local M = {}

local Backend = {}
Backend.__index = Backend

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
  return nil, store.error(self.path .. ": " .. msg, is_busy(msg))
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

-- Runs the statements of MULTI[kind] over the `count` rows of `list` (tables of the
-- kind's layout, or plain values, as the kind binds them). Calls after(self, first_row,
-- rows) after each statement when given. The number of changed rows, or nil, err.
local function exec_multi(self, kind, list, count, after)
  local m = MULTI[kind]
  local sql, bind, chunks = m.sql, m.bind, m.chunks
  local row, total = 1, 0
  while row <= count do
    local left = count - row + 1
    local n = 1
    for c = 1, #chunks do
      if chunks[c] <= left then n = chunks[c]; break end
    end
    local changed, err = exec(self, sql[n], bind[n](list, row))
    if not changed then return nil, err end
    total = total + changed
    if after then after(self, row, n) end
    row = row + n
  end
  return total
end

-- A query: an array of rows (tables keyed by column name, NULL columns absent), or nil,
-- err. `names`: the columns read through bin(), or nil.
local function query(self, sql, names, ...)
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

function Backend:begin()
  local ok, err = exec_retry(self, "BEGIN IMMEDIATE")
  if not ok then return nil, err end
  self.depth = 1
  return true
end

-- A transaction that deleted outbox items (sent, rejected or purged: their bodies hold
-- customers' names and addresses) is followed by a checkpoint that empties the WAL file:
-- secure_delete zeroes a deleted row in its page, but the WAL keeps the older images of
-- that page (with the body) until it is overwritten, which for a long-running process
-- could be never. TRUNCATE copies every frame into the database and cuts the WAL to 0
-- bytes; if another connection's read keeps it from finishing (it waits at most the busy
-- timeout), the next such transaction tries again. A failed checkpoint fails nothing.
-- It costs ~0.8 ms (bench/retention.lua): nothing next to a batch of 200 events, but most
-- of the store's time for a process that settles one event at a time; opts.scrub_wal =
-- false leaves the WAL to the automatic checkpoints (and the bodies in it till then).
local CHECKPOINT = "PRAGMA wal_checkpoint(TRUNCATE)"

local function checkpoint(self)
  self.shed = false
  local sth = run_raw(self, CHECKPOINT)
  if sth and not pcall(fetch_all, sth) then drop(self, CHECKPOINT, sth) end
end

function Backend:commit()
  local ok, err = exec_retry(self, "COMMIT")
  if not ok then return nil, err end
  self.depth = 0
  if self.shed then
    if self.scrub_wal then checkpoint(self) else self.shed = false end
  end
  return true
end

function Backend:rollback()
  self.depth = 0
  self.shed = false
  rollback(self)
end

-- Runs fn(self, ...) in a transaction of its own, or in the caller's when inside one: a
-- primitive called outside a transaction is all or nothing by itself.
local function write(self, fn, ...)
  if self.depth > 0 then return fn(self, ...) end
  local ok, err = self:begin()
  if not ok then return nil, err end
  local r
  r, err = fn(self, ...)
  if r == nil then
    self:rollback()
    return nil, err
  end
  ok, err = self:commit()
  if not ok then
    self:rollback()
    return nil, err
  end
  return r
end

-- Opening ----------------------------------------------------------------------------------

local function create_schema(self)
  for _, sql in ipairs(SCHEMA) do
    local sth, err = run_raw(self, sql)
    if not sth then return failure(self, err) end
    drop(self, sql, sth)   -- used once
  end
  return exec(self, SQL.set_schema_version, tostring(SCHEMA_VERSION))
end

local function pragma(self, sql)
  local list, err = query(self, sql)
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

  -- (the salt, also in meta, is the base's: stella.store.open)
  local r = row(self, SQL.schema_version, nil)   -- no table yet: nil, err
  local version = r and tonumber(r.value)
  if version and version > SCHEMA_VERSION then
    return nil, store.error(self.path .. ": schema version " .. version ..
      " is newer than this version of stella supports (" .. SCHEMA_VERSION .. ")", false)
  end
  if version ~= SCHEMA_VERSION then return write(self, create_schema) end
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
  local scrub = opts and opts.scrub_wal
  if scrub ~= nil and type(scrub) ~= "boolean" then
    error("stella.store.sqlite: opts.scrub_wal must be a boolean or nil", 2)
  end
  local timeout = opts and opts.busy_timeout
  if timeout == nil then timeout = 5 end
  if not store.is_finite(timeout) or timeout < 0 then
    error("stella.store.sqlite: opts.busy_timeout must be a non-negative number of seconds", 2)
  end

  local db, cerr = DBI.Connect("SQLite3", path)
  if not db then return nil, store.error(path .. ": " .. clean(cerr), false) end
  -- no implicit BEGIN before each statement (the call answers false when there was no
  -- transaction to roll back, which is the case here)
  db:autocommit(true)
  local self = setmetatable({
    name = "stella.store.sqlite(" .. path .. ")", path = path, db = db, stmts = {}, busy_timeout = timeout,
    depth = 0, closed = false, shed = false, scrub_wal = scrub ~= false,
  }, Backend)
  local ok, err = init(self)
  if not ok then
    self:close()
    return nil, err
  end
  return store.open(self)
end
-- Marks ------------------------------------------------------------------------------------

-- until, owner of one mark; run to completion. Raises when a step fails (call it under
-- pcall).
local function fetch_mark(sth)
  local r = sth:fetch(false)
  if r and sth:fetch(false) then
    while sth:fetch(false) do end
  end
  if not r then return nil end
  return r[1], r[2]
end

-- One column of the one row of an executed statement (see fetch_mark).
local function read_one(self, sql, ...)
  local sth, err = run_raw(self, sql, ...)
  if not sth then return failure(self, err) end
  local ok, u, owner = pcall(fetch_mark, sth)
  if not ok then
    drop(self, sql, sth)
    return failure(self, u)
  end
  return true, u, owner
end

function Backend:read_marks(keys, n, now)
  local untils, owners, sql = {}, {}, SQL.read_mark
  for i = 1, n do
    local ok, u, owner = read_one(self, sql, keys[i], now)
    if not ok then return nil, u end
    if owner ~= nil then
      if type(owner) == "string" then   -- (ids are integers) read whole: it may hold a NUL
        local hex
        ok, hex = read_one(self, SQL.read_owner_hex, keys[i])
        if not ok then return nil, hex end
        owner = unhex(hex)
      else
        owner = reservation(owner)
      end
      owners[i] = owner
    end
    untils[i] = u
  end
  return untils, owners
end

local function exec_true(self, ...)
  local n, err = exec_multi(self, ...)
  if not n then return nil, err end
  return true
end

function Backend:put_marks(list, n)
  return write(self, exec_true, "put_marks", list, n)
end

function Backend:settle_marks(ids, n, keep)
  return write(self, exec_multi, keep and "confirm_marks" or "release_marks", ids, n)
end

function Backend:purge_marks(now)
  return write(self, exec, SQL.purge_marks, now)
end

-- Unsubscribes -----------------------------------------------------------------------------

function Backend:set_unsubscribed(hashes, n, now)
  if now == nil then return write(self, exec_true, "resubscribe", hashes, n) end
  local values = {}
  for i = 1, n do values[2 * i - 1], values[2 * i] = hashes[i], now end
  return write(self, exec_true, "unsubscribe", values, n)
end

function Backend:unsubscribed(hashes, n)
  local flags = {}
  for i = 1, n do
    local r, err = row(self, SQL.unsubscribed, nil, hashes[i])
    if r == nil then return nil, err end
    flags[i] = r ~= false
  end
  return flags
end

function Backend:count_unsubscribed()
  local r, err = row(self, SQL.count_unsubscribed, nil)
  if not r then return nil, err end
  return r.n
end

-- Outbox -----------------------------------------------------------------------------------

local function enqueue(self, list, count)
  local ids = {}
  -- one INSERT of n rows gives them consecutive ids (the write lock is held): the last
  -- one's and the n - 1 before it
  local n, err = exec_multi(self, "enqueue", list, count, function(s, first, rows)
    local last = s.db:last_id()
    for i = 0, rows - 1 do ids[first + i] = last - rows + 1 + i end
  end)
  if not n then return nil, err end
  return ids
end

function Backend:enqueue(list, n)
  return write(self, enqueue, list, n)
end

local function lease(self, now, lease_, limit)
  local list, err = query(self, SQL.due, ITEM_HEX, now, limit)
  if not list or #list == 0 then return list, err end
  local until_ = now + lease_
  for _, it in ipairs(list) do
    local n
    n, err = exec(self, SQL.lease, until_, it.id)
    if not n then return nil, err end
    it.next_at = until_
  end
  return list
end

function Backend:lease(now, lease_, limit)
  if self.depth == 0 then
    -- nothing due: answer without taking the write lock (workers poll)
    local due, err = row(self, SQL.any_due, nil, now)
    if due == nil then return nil, err end
    if not due then return {} end
  end
  return write(self, lease, now, lease_, limit)
end

-- update_items' rows as the statement's parameters (the id last).
local UPDATE = {
  requeue = { SQL.requeue, function(r) return r.next_at, r.attempts, r.last_error, r.id end },
  kill = { SQL.kill, function(r) return r.last_error, r.died_at, r.attempts, r.id end },
}

local function update_items(self, op, list, n)
  if op == "delete" then
    local count, err = exec_multi(self, "delete_items", list, n)
    if count and count > 0 then self.shed = true end   -- bodies gone: checkpoint at commit
    return count, err
  end
  local u, total = UPDATE[op], 0
  local sql, params = u[1], u[2]
  for i = 1, n do
    local c, err = exec(self, sql, params(list[i]))
    if not c then return nil, err end
    total = total + c
  end
  return total
end

function Backend:update_items(op, list, n)
  return write(self, update_items, op, list, n)
end

function Backend:list_items(state, limit)
  return query(self, state == "dead" and SQL.list_dead or SQL.list_queued, ITEM_HEX, limit)
end

function Backend:count_items()
  local list, err = query(self, SQL.count_items, nil)
  if not list then return nil, err end
  local counts = { queued = 0, dead = 0 }
  for _, r in ipairs(list) do counts[r.state] = r.n end
  return counts
end

-- Ledger -----------------------------------------------------------------------------------

function Backend:record(list, n)
  return write(self, exec_true, "record", list, n)
end

-- " WHERE ..." for since and status, and its values.
local function where(since, status)
  local parts, values = {}, {}
  if since ~= nil then
    parts[#parts + 1] = "time >= ?"
    values[#values + 1] = since
  end
  if status ~= nil then
    parts[#parts + 1] = "status = ?"
    values[#values + 1] = status
  end
  return #parts > 0 and (" WHERE " .. concat(parts, " AND ")) or "", values
end

function Backend:ledger(since, status, limit)
  local w, values = where(since, status)
  values[#values + 1] = limit
  return query(self, "SELECT " .. LEDGER_SELECT .. " FROM ledger" .. w .. " ORDER BY time DESC, id DESC LIMIT ?",
    LEDGER_HEX, unpack(values, 1, #values))
end

function Backend:tally(since, bucket)
  local w, values = where(since, nil)
  if bucket == nil then
    local list, err = query(self, "SELECT status, " .. bin("reason") .. ", COUNT(*) AS count FROM ledger" .. w ..
      " GROUP BY status, reason", REASON_HEX, unpack(values, 1, #values))
    return list, err
  end
  table.insert(values, 1, bucket)
  -- k = floor(time / bucket) in real arithmetic (CAST truncates towards zero)
  local list, err = query(self, "SELECT k, status, " .. bin("reason") .. ", COUNT(*) AS count FROM (" ..
    "SELECT CAST(q AS INTEGER) - (q < CAST(q AS INTEGER)) AS k, status, reason FROM (" ..
    "SELECT time * 1.0 / ? AS q, status, reason FROM ledger" .. w .. ")) GROUP BY k, status, reason",
    REASON_HEX, unpack(values, 1, #values))
  if not list then return nil, err end
  for _, r in ipairs(list) do r.start, r.k = r.k * bucket, nil end
  return list
end

-- Retention --------------------------------------------------------------------------------

local function purge(self, before, limit)
  local ledger, err = exec(self, SQL.purge_ledger, before, limit)
  if not ledger then return nil, err end
  local dead
  dead, err = exec(self, SQL.purge_dead, before, limit)
  if not dead then return nil, err end
  if dead > 0 then self.shed = true end   -- bodies gone: checkpoint at commit
  return { ledger = ledger, dead = dead }
end

function Backend:purge(before, limit)
  return write(self, purge, before, limit)
end

-- Meta -------------------------------------------------------------------------------------

function Backend:get_meta(name)
  local r, err = row(self, SQL.get_meta, VALUE_HEX, name)
  if r == nil then return nil, err end
  return r and r.value or nil
end

local function set_meta(self, sql, ...)
  local n, err = exec(self, sql, ...)
  if not n then return nil, err end
  return true
end

function Backend:set_meta(name, value, only_if_absent)
  if value == nil then return write(self, set_meta, SQL.delete_meta, name) end
  return write(self, set_meta, only_if_absent and SQL.add_meta or SQL.set_meta, name, value)
end

-- Life -------------------------------------------------------------------------------------

function Backend:close()
  if self.closed then return end
  self.closed = true
  if self.db then
    if self.depth > 0 then rollback(self) end
    for _, sth in pairs(self.stmts) do pcall(sth.close, sth) end
    pcall(self.db.close, self.db)
  end
  self.db, self.stmts = nil, {}
end

-- Lua 5.4 closes a forgotten store when it is collected; LuaJIT ignores __gc on tables.
Backend.__gc = function(self)
  if not self.closed then pcall(Backend.close, self) end
end

M.Backend = Backend
return M
