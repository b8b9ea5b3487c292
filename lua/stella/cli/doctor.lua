-- stella.cli.doctor: `stella doctor`, a check of the local store: SQLite's own integrity
-- check of every page (PRAGMA integrity_check, or quick_check with --quick), then a read
-- of what `stella status` and `stella retry` read, through the store.
local ipairs, pcall, tostring = ipairs, pcall, tostring
local setup = require "stella.cli.setup"

local M = {}

M.help = [[
usage: stella doctor [--db FILE|URL] [--quick]

Checks the store: SQLite's integrity check over every page of the file (a damaged file
says "database disk image is malformed" and where), then reads the outbox and the ledger
through the store as the other commands do. Exit status 0 when the store is sound, 1 when
it is damaged or cannot be read (keep a copy before anything else: `sqlite3 FILE .recover`
can save what is left). A Redis store (--db redis://...): the server's version and the
store's Function library (loaded when missing), then the same reads.

  --db FILE|URL  the store (default $STELLA_DB, else stella.db; redis://... a Redis store)
  --quick        PRAGMA quick_check instead of integrity_check (faster; skips the
                 indexes' agreement with their tables)
]]

-- its options: "flag" or "value"
M.options = { db = "value", quick = "flag" }

-- The integrity check's lines ({ "ok" } for a sound file), or nil and a message.
local function integrity(path, quick)
  local dok, DBI = pcall(require, "DBI")
  if not dok then return nil, "LuaDBI is not installed (Debian: lua-dbi-sqlite3)" end
  local db, err = DBI.Connect("SQLite3", path)
  if not db then return nil, tostring(err) end
  local lines = {}
  local ok, perr = pcall(function()
    local sth, serr = db:prepare(quick and "PRAGMA quick_check" or "PRAGMA integrity_check")
    if not sth then error(tostring(serr), 0) end
    local eok, eerr = sth:execute()
    if not eok then error(tostring(eerr), 0) end
    for row in sth:rows(false) do lines[#lines + 1] = tostring(row[1]) end
    sth:close()
  end)
  db:close()
  -- LuaDBI raises from rows() with its own position in front
  if not ok then return nil, (tostring(perr):gsub("^[^\n]-:%d+: ", ""):gsub("^Fetch failed ", "")) end
  return lines
end

-- What `stella status` and `stella retry` read, through the store: 0, or 1 after saying
-- what failed. Closes the store.
local function read_through(ctx, label, store)
  local ok, res = pcall(function()
    local oc, oerr = store:outbox_counts()
    if not oc then error("outbox: " .. tostring(oerr), 0) end
    local counts, cerr = store:counts{ since = 0 }
    if not counts then error("ledger: " .. tostring(cerr), 0) end
    local n = 0
    for _, c in ipairs(counts) do n = n + (c.count or 0) end
    return ("outbox: %d queued, %d dead; ledger: %d entries"):format(oc.queued or 0, oc.dead or 0, n)
  end)
  store:close()
  if not ok then ctx:warn("stella doctor: %s: %s", label, tostring(res)) return 1 end
  ctx:say("%s: %s", label, res)
  return 0
end

-- A Redis store: the server answers, its version, the store's Function library loaded
-- (opening the store loads it when missing), then the reads.
local function redis_doctor(ctx, db)
  local label = setup.label(db)
  local store, serr = setup.open_store(db)
  if not store then ctx:warn("stella doctor: %s", serr) return 1 end
  local conn = store.backend.conn
  local info, ierr = conn:call("INFO", "server")
  local version, verr = conn:call("FCALL_RO", "stella_version", 0)
  if not info or not version then
    store:close()
    ctx:warn("stella doctor: %s: %s", label, tostring(info and verr or ierr))
    return 1
  end
  ctx:say("%s: Redis %s, Function library stella version %s", label,
    tostring(info:match("redis_version:([^\r\n]+)")), tostring(version))
  return read_through(ctx, label, store)
end

function M.run(ctx, opts, positional)
  if #positional > 0 then return ctx:usage_error("doctor", "unexpected argument %s", positional[1]) end
  local db = setup.db(ctx, opts)
  if setup.is_url(db) then return redis_doctor(ctx, db) end
  if not setup.file_exists(db) then
    ctx:warn("stella doctor: no store at %s (give --db)", db)
    return 1
  end
  local check = opts.quick and "quick_check" or "integrity_check"
  local lines, err = integrity(db, opts.quick)
  if not lines then
    ctx:warn("stella doctor: %s is damaged or unreadable (PRAGMA %s): %s", db, check, err)
    return 1
  end
  if #lines ~= 1 or lines[1] ~= "ok" then
    ctx:warn("stella doctor: %s is damaged (PRAGMA %s):", db, check)
    for i, line in ipairs(lines) do
      if i > 20 then ctx:warn("  ... and %d more", #lines - 20) break end
      ctx:warn("  %s", line)
    end
    return 1
  end
  ctx:say("%s: PRAGMA %s ok", db, check)
  local store, serr = setup.open_store(db, { must_exist = true })
  if not store then ctx:warn("stella doctor: %s", serr) return 1 end
  return read_through(ctx, db, store)
end

return M
