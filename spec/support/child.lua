-- Helpers of the specs that run Lua child processes and read what they leave behind.
--   child.quote(s)      s quoted for sh
--   child.ENV           "env LUA_PATH=... " so that a child finds the modules as busted
--                       found them ("" when the environment already says)
--   child.read_file(p)  the file's bytes, or "" when it cannot be read
--   child.remove_db(p)  removes an SQLite file and its -wal, -shm and -journal
local M = {}

function M.quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

M.ENV = ""
if not os.getenv("LUA_PATH") then
  M.ENV = "env LUA_PATH=" .. M.quote(package.path) .. " LUA_PATH_5_4=" .. M.quote(package.path) ..
          " LUA_CPATH=" .. M.quote(package.cpath) .. " LUA_CPATH_5_4=" .. M.quote(package.cpath) .. " "
end

function M.read_file(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local data = f:read("*a")
  f:close()
  return data
end

function M.remove_db(path)
  for _, suffix in ipairs{ "", "-wal", "-shm", "-journal" } do os.remove(path .. suffix) end
end

return M
