-- stella.store.sqlite: the store interface on an SQLite file (through LuaSQL), safe for
-- several processes on one machine: WAL journal, a busy timeout, every write in a
-- `BEGIN IMMEDIATE` transaction retried while the database is busy.
--
-- LuaSQL has no bound parameters, so every value reaches SQL through sql_value(): strings
-- through conn:escape (or as a hex blob literal when they hold a NUL byte, which escape
-- cannot carry), numbers through a checked formatter, nil as NULL. Statements are written
-- with "?" placeholders that bind() fills in with sql_value().
local store = require "stella.store"
local core = require "stella.core"
local driver = require "luasql.sqlite3"

local U = store._util
local error, getmetatable, ipairs, setmetatable, tonumber, tostring, type, pcall, select =
  error, getmetatable, ipairs, setmetatable, tonumber, tostring, type, pcall, select
local concat, floor, format = table.concat, math.floor, string.format
local pack, unpack = U.pack, U.unpack

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

local ITEM_COLUMNS = "id, kind, body, brand, event_id, interaction_id, customer_hash, created_at, " ..
  "next_at, attempts, state, last_error, died_at"
local LEDGER_COLUMNS = "time, status, reason, event_id, interaction_id, brand, channel, detail, " ..
  "request_id, error_kind, error_message, customer_hash, attempts"

local M = {}

local Store = {}
Store.__index = Store

-- SQL values ---------------------------------------------------------------------------

local function hex(s)
  return (s:gsub(".", function(c) return format("%02X", c:byte()) end))
end

-- One value as an SQL literal.
local function sql_value(conn, v)
  local t = type(v)
  if v == nil then return "NULL" end
  if t == "number" then return U.number_text(v) end   -- raises on NaN and infinities
  if t == "string" then
    if v:find("\0", 1, true) then return "X'" .. hex(v) .. "'" end
    return "'" .. conn:escape(v) .. "'"
  end
  if t == "boolean" then return v and "1" or "0" end
  error("stella.store.sqlite: cannot write a " .. t .. " to SQL", 2)
end

-- sql with each "?" replaced by the next argument as a literal.
local function bind(conn, sql, n, args)
  if n == 0 then return sql end
  local i = 0
  local out = sql:gsub("%?", function()
    i = i + 1
    return sql_value(conn, args[i])
  end)
  if i ~= n then error("stella.store.sqlite: " .. n .. " values for " .. i .. " placeholders", 3) end
  return out
end

-- Running statements -------------------------------------------------------------------

local function clean(msg)
  return (tostring(msg or "unknown error"):gsub("^LuaSQL: ", ""))
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

-- A statement that returns no rows: the number of changed rows, or nil, err.
local function exec(self, sql, ...)
  local res, err = self.conn:execute(bind(self.conn, sql, select("#", ...), { ... }))
  if not res then return failure(self, err) end
  if type(res) ~= "number" then   -- a statement with rows (PRAGMA): drop them
    res:close()
    return 0
  end
  return floor(res)
end

-- A query: an array of rows (tables keyed by column name, NULL columns absent), or nil, err.
local function rows(self, sql, ...)
  local cur, err = self.conn:execute(bind(self.conn, sql, select("#", ...), { ... }))
  if not cur then return failure(self, err) end
  local list = {}
  if type(cur) == "number" then return list end
  local row = cur:fetch({}, "a")
  while row do
    list[#list + 1] = row
    row = cur:fetch({}, "a")
  end
  cur:close()
  return list
end

local function check_open(self, method)
  if getmetatable(self) ~= Store then
    error("stella.store: " .. method .. ": called without a store (use store:" .. method .. ")", 3)
  end
  if self.closed then error("stella.store: " .. method .. ": the store is closed", 3) end
end

-- Transactions -------------------------------------------------------------------------

-- Runs a statement, retrying while the database is busy until the busy timeout has passed.
-- SQLite's busy handler (PRAGMA busy_timeout) already waits inside each attempt; the loop
-- covers the cases where SQLite reports busy without calling it.
local function exec_retry(self, sql)
  local deadline = time() + self.busy_timeout
  while true do
    local res, err = self.conn:execute(sql)
    if res then
      if type(res) ~= "number" then res:close() end
      return true
    end
    err = clean(err)
    if not is_busy(err) or time() > deadline then
      return nil, store.error(self.path .. ": " .. err, is_busy(err))
    end
    if sleep then sleep(0.01) end
  end
end

local function rollback(self)
  local res = self.conn:execute("ROLLBACK")   -- fails harmlessly if SQLite already rolled back
  if type(res) == "userdata" then res:close() end
end

function Store:atomic(fn, ...)
  check_open(self, "atomic")
  U.check_function(fn, "atomic", "fn")
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

-- Opening ------------------------------------------------------------------------------

local function read_meta(self)
  local list = rows(self, "SELECT name, value FROM meta WHERE name IN ('schema_version', 'salt')")
  local meta = {}
  for _, r in ipairs(list or {}) do meta[r.name] = r.value end
  return meta
end

local function init(self)
  local ok, err = exec(self, "PRAGMA busy_timeout = ?", floor(self.busy_timeout * 1000 + 0.5))
  if not ok then return nil, err end
  ok, err = exec_retry(self, "PRAGMA journal_mode = WAL")
  if not ok then return nil, err end
  ok, err = exec(self, "PRAGMA synchronous = NORMAL")
  if not ok then return nil, err end
  -- deleted rows (sent outbox bodies, which hold the customer's address) are overwritten
  ok, err = exec(self, "PRAGMA secure_delete = ON")
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
    ok, err = self:atomic(function()
      for _, sql in ipairs(SCHEMA) do
        local done, e = exec(self, sql)
        if not done then return nil, e end
      end
      local done, e = exec(self, "INSERT OR IGNORE INTO meta (name, value) VALUES ('salt', ?)", salt)
      if not done then return nil, e end
      return exec(self, "INSERT OR REPLACE INTO meta (name, value) VALUES ('schema_version', ?)",
        tostring(SCHEMA_VERSION))
    end)
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

  local env, eerr = driver.sqlite3()
  if not env then return nil, store.error("sqlite: " .. clean(eerr), false) end
  local conn, cerr = env:connect(path)
  if not conn then
    env:close()
    return nil, store.error(path .. ": " .. clean(cerr), false)
  end
  local self = setmetatable({
    path = path, env = env, conn = conn, busy_timeout = timeout, depth = 0, closed = false,
  }, Store)
  local ok, err = init(self)
  if not ok then
    self:close()
    return nil, err
  end
  return self
end

-- Hashing ------------------------------------------------------------------------------

function Store:hash_email(email)
  check_open(self, "hash_email")
  U.check_string(email, "hash_email", "email")
  return core.sha256(self.salt .. U.normalize_email(email))
end

-- Marks --------------------------------------------------------------------------------

function Store:get_mark(key, now)
  check_open(self, "get_mark")
  U.check_key(key, "get_mark", "key")
  U.check_number(now, "get_mark", "now")
  local list, err = rows(self, "SELECT until_at, outbox_id FROM marks WHERE key = ? AND until_at > ?", key, now)
  if not list then return nil, err end
  local r = list[1]
  if not r then return nil end
  return r.until_at, r.outbox_id
end

function Store:put_mark(key, until_, outbox_id)
  check_open(self, "put_mark")
  U.check_key(key, "put_mark", "key")
  U.check_number(until_, "put_mark", "until")
  U.check_reservation(outbox_id, "put_mark", "outbox_id", true)
  return self:atomic(function()
    local n, err = exec(self, "INSERT OR REPLACE INTO marks (key, until_at, outbox_id) VALUES (?, ?, ?)",
      key, until_, outbox_id)
    if not n then return nil, err end
    return true
  end)
end

function Store:confirm_marks(outbox_id)
  check_open(self, "confirm_marks")
  U.check_reservation(outbox_id, "confirm_marks", "outbox_id")
  return self:atomic(exec, self, "UPDATE marks SET outbox_id = NULL WHERE outbox_id = ?", outbox_id)
end

function Store:release_marks(outbox_id)
  check_open(self, "release_marks")
  U.check_reservation(outbox_id, "release_marks", "outbox_id")
  return self:atomic(exec, self, "DELETE FROM marks WHERE outbox_id = ?", outbox_id)
end

function Store:purge_marks(now)
  check_open(self, "purge_marks")
  U.check_number(now, "purge_marks", "now")
  return self:atomic(exec, self, "DELETE FROM marks WHERE until_at <= ?", now)
end

-- Unsubscribes -------------------------------------------------------------------------

function Store:unsubscribe(hash, now)
  check_open(self, "unsubscribe")
  U.check_key(hash, "unsubscribe", "hash")
  U.check_number(now, "unsubscribe", "now")
  return self:atomic(function()
    local n, err = exec(self, "INSERT OR REPLACE INTO unsubscribes (hash, time) VALUES (?, ?)", hash, now)
    if not n then return nil, err end
    return true
  end)
end

function Store:resubscribe(hash)
  check_open(self, "resubscribe")
  U.check_key(hash, "resubscribe", "hash")
  return self:atomic(function()
    local n, err = exec(self, "DELETE FROM unsubscribes WHERE hash = ?", hash)
    if not n then return nil, err end
    return true
  end)
end

function Store:is_unsubscribed(hash)
  check_open(self, "is_unsubscribed")
  U.check_key(hash, "is_unsubscribed", "hash")
  local list, err = rows(self, "SELECT 1 AS x FROM unsubscribes WHERE hash = ?", hash)
  if not list then return nil, err end
  return list[1] ~= nil
end

function Store:unsubscribed_count()
  check_open(self, "unsubscribed_count")
  local list, err = rows(self, "SELECT COUNT(*) AS n FROM unsubscribes")
  if not list then return nil, err end
  return list[1].n
end

-- Outbox -------------------------------------------------------------------------------

function Store:enqueue(item)
  check_open(self, "enqueue")
  local it = U.outbox_item(item)
  return self:atomic(function()
    local n, err = exec(self, "INSERT INTO outbox (kind, body, brand, event_id, interaction_id, customer_hash, " ..
      "created_at, next_at, attempts, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued')",
      it.kind, it.body, it.brand, it.event_id, it.interaction_id, it.customer_hash,
      it.created_at, it.next_at, it.attempts)
    if not n then return nil, err end
    local list
    list, err = rows(self, "SELECT last_insert_rowid() AS id")
    if not list then return nil, err end
    return list[1].id
  end)
end

local function claim(self, now, lease, limit)
  local list, err = rows(self, "SELECT " .. ITEM_COLUMNS .. " FROM outbox WHERE state = 'queued' AND next_at <= ? " ..
    "ORDER BY next_at, id LIMIT ?", now, limit)
  if not list or #list == 0 then return list, err end
  local until_, ids = now + lease, {}
  for i, it in ipairs(list) do
    ids[i] = sql_value(self.conn, it.id)
    it.next_at = until_
  end
  local n
  n, err = exec(self, "UPDATE outbox SET next_at = ? WHERE id IN (" .. concat(ids, ", ") .. ")", until_)
  if not n then return nil, err end
  return list
end

function Store:claim(now, lease, limit)
  check_open(self, "claim")
  U.check_number(now, "claim", "now")
  U.check_number(lease, "claim", "lease")
  U.check_count(limit, "claim", "limit", true)
  limit = limit or 100
  if self.depth == 0 then
    -- nothing due: answer without taking the write lock (workers poll)
    local due, err = rows(self, "SELECT 1 AS x FROM outbox WHERE state = 'queued' AND next_at <= ? LIMIT 1", now)
    if not due then return nil, err end
    if #due == 0 or limit == 0 then return {} end
  end
  return self:atomic(claim, self, now, lease, limit)
end

local function changed(self, sql, ...)
  local n, err = exec(self, sql, ...)
  if not n then return nil, err end
  return n > 0
end

function Store:reschedule(id, next_at, attempts, last_error)
  check_open(self, "reschedule")
  U.check_id(id, "reschedule", "id")
  U.check_number(next_at, "reschedule", "next_at")
  U.check_count(attempts, "reschedule", "attempts", true)
  return self:atomic(changed, self, "UPDATE outbox SET state = 'queued', next_at = ?, attempts = COALESCE(?, attempts), " ..
    "last_error = ?, died_at = NULL WHERE id = ?", next_at, attempts, U.error_text(last_error), id)
end

function Store:finish(id)
  check_open(self, "finish")
  U.check_id(id, "finish", "id")
  return self:atomic(changed, self, "DELETE FROM outbox WHERE id = ?", id)
end

function Store:kill(id, last_error, now)
  check_open(self, "kill")
  U.check_id(id, "kill", "id")
  U.check_number(now, "kill", "now")
  return self:atomic(changed, self, "UPDATE outbox SET state = 'dead', last_error = ?, died_at = ? WHERE id = ?",
    U.error_text(last_error), now, id)
end

function Store:outbox(state, limit)
  check_open(self, "outbox")
  U.check_enum(state, U.states, "outbox", "state")
  U.check_count(limit, "outbox", "limit", true)
  local order = state == "dead" and "died_at DESC, id DESC" or "next_at, id"
  return rows(self, "SELECT " .. ITEM_COLUMNS .. " FROM outbox WHERE state = ? ORDER BY " .. order .. " LIMIT ?",
    state, limit or 100)
end

function Store:outbox_counts()
  check_open(self, "outbox_counts")
  local list, err = rows(self, "SELECT state, COUNT(*) AS n FROM outbox GROUP BY state")
  if not list then return nil, err end
  local counts = { queued = 0, dead = 0 }
  for _, r in ipairs(list) do counts[r.state] = r.n end
  return counts
end

-- Ledger -------------------------------------------------------------------------------

function Store:record(entry)
  check_open(self, "record")
  local e = U.ledger_entry(entry)
  return self:atomic(function()
    local n, err = exec(self, "INSERT INTO ledger (" .. LEDGER_COLUMNS .. ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
      e.time, e.status, e.reason, e.event_id, e.interaction_id, e.brand, e.channel, e.detail,
      e.request_id, e.error_kind, e.error_message, e.customer_hash, e.attempts)
    if not n then return nil, err end
    return true
  end)
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
  check_open(self, "ledger")
  local o = U.query_options(opts, "ledger")
  local w, values = where(o)
  values[#values + 1] = o.limit
  return rows(self, "SELECT " .. LEDGER_COLUMNS .. " FROM ledger" .. w .. " ORDER BY time DESC, id DESC LIMIT ?",
    unpack(values, 1, #values))
end

function Store:counts(opts)
  check_open(self, "counts")
  local o = U.query_options(opts, "counts")
  o.status = nil
  local w, values = where(o)
  local list, err = rows(self, "SELECT status, reason, COUNT(*) AS n FROM ledger" .. w ..
    " GROUP BY status, reason ORDER BY status, reason", unpack(values, 1, #values))
  if not list then return nil, err end
  for _, r in ipairs(list) do
    r.count, r.n = r.n, nil
  end
  return list
end

function Store:rate(opts)
  check_open(self, "rate")
  local o = U.query_options(opts, "rate")
  o.status = nil
  local w, values = where(o, "status IN ('sent', 'recorded', 'failed', 'invalid', 'queued')")
  table.insert(values, 1, o.bucket)
  -- k = floor(time / bucket) in real arithmetic (CAST truncates towards zero)
  local list, err = rows(self, "SELECT k, COUNT(*) AS total, " ..
    "SUM(CASE WHEN status IN ('failed', 'invalid') THEN 1 ELSE 0 END) AS errors FROM (" ..
    "SELECT CAST(q AS INTEGER) - (q < CAST(q AS INTEGER)) AS k, status FROM (" ..
    "SELECT time * 1.0 / ? AS q, status FROM ledger" .. w .. ")) GROUP BY k ORDER BY k",
    unpack(values, 1, #values))
  if not list then return nil, err end
  local out = {}
  for i, r in ipairs(list) do
    out[i] = { start = r.k * o.bucket, total = r.total, errors = r.errors }
  end
  return out
end

-- Meta ---------------------------------------------------------------------------------

function Store:get_meta(name)
  check_open(self, "get_meta")
  U.check_key(name, "get_meta", "name")
  local list, err = rows(self, "SELECT value FROM meta WHERE name = ?", name)
  if not list then return nil, err end
  return list[1] and list[1].value
end

function Store:set_meta(name, value)
  check_open(self, "set_meta")
  U.check_key(name, "set_meta", "name")
  if value ~= nil and type(value) ~= "string" then
    if not U.is_finite(value) then
      error("stella.store: set_meta: value must be a string, a number or nil, got " .. type(value), 2)
    end
    value = U.number_text(value)
  end
  return self:atomic(function()
    local n, err
    if value == nil then
      n, err = exec(self, "DELETE FROM meta WHERE name = ?", name)
    else
      n, err = exec(self, "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", name, value)
    end
    if not n then return nil, err end
    return true
  end)
end

-- Life ---------------------------------------------------------------------------------

function Store:close()
  if self.closed then return true end
  self.closed = true
  if self.depth > 0 then rollback(self) end
  if self.conn then self.conn:close() end
  if self.env then self.env:close() end
  self.conn, self.env = nil, nil
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
