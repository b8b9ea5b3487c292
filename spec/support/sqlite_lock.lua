-- A child process of spec/settle_spec.lua (and of the soak) that holds an SQLite
-- database's write lock from outside: BEGIN EXCLUSIVE on its own connection, then it
-- writes DIR/locked and holds the lock until DIR/release exists (or SECONDS have passed,
-- when given; at most 120 s, and no longer than DIR exists: a failed spec leaves no
-- locker behind), commits, and writes DIR/unlocked.
--
--   sqlite_lock.lua DB DIR [SECONDS]
local DBI = require "DBI"
require "dbd.sqlite3"
local socket = require "socket"

local db_path, dir, seconds = arg[1], arg[2], tonumber(arg[3])

local function touch(name)
  local f = assert(io.open(dir .. "/" .. name, "w"))
  f:close()
end

local function exists(name)
  local f = io.open(dir .. "/" .. name, "r")
  if f then f:close() return true end
  return false
end

local db = assert(DBI.Connect("SQLite3", db_path))
db:autocommit(true)
-- the other connections wait up to their busy timeout; this one waits a little longer
-- for a writer in the middle of its transaction
assert(db:prepare("PRAGMA busy_timeout = 10000")):execute()
local sth = assert(db:prepare("BEGIN EXCLUSIVE"))
assert(sth:execute())
touch("locked")
local deadline = socket.gettime() + (seconds or 120)
while not exists("release") and socket.gettime() < deadline and exists("locked") do socket.sleep(0.01) end
assert(assert(db:prepare("COMMIT")):execute())
db:close()
pcall(touch, "unlocked")
