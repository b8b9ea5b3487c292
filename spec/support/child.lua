-- Helpers of the specs that run Lua child processes and read what they leave behind.
--   child.quote(s)      s quoted for sh
--   child.ENV           "env LUA_PATH=... " so that a child finds the modules as busted
--                       found them ("" when the environment already says)
--   child.read_file(p)  the file's bytes, or "" when it cannot be read
--   child.remove_db(p)  removes an SQLite file and its -wal, -shm and -journal
--   child.stella_command(lua, args [, env])  "env ... LUA bin/stella ARGS" for sh, with this
--                       process's module paths and no key, mode or store from the caller's
--                       environment (env: more NAME = value)
--   child.background(lua, dir, args [, env [, name]])  bin/stella started in the background
--                       (as stella_command), its output in DIR/NAME.out and .err: its pid and
--                       a function that waits for it -> exit status, stdout, stderr
--   child.run(lua, dir, args [, env [, name]])  bin/stella run to the end (as stella_command),
--                       its output in DIR/NAME.out and .err -> exit status, stdout, stderr
--   child.runners(lua, check)  run and background for one interpreter, with check(stdout ..
--                       stderr) called on every output (a spec's "no secret leaked"):
--                       function(dir, args, env, name) each
--   child.received(server)  { [ext_interaction_id] = times } the test server received, total
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

function M.stella_command(lua, args, env)
  local q = M.quote
  local parts = { "env", "-u", "STELLA_API_KEY", "-u", "STELLA_PRODUCTION_KEY", "-u", "STELLA_MODE", "-u", "STELLA_DB" }
  for _, name in ipairs{ "LUA_PATH", "LUA_CPATH", "LUA_PATH_5_4", "LUA_CPATH_5_4" } do
    local v = os.getenv(name)
    if v then parts[#parts + 1] = name .. "=" .. q(v) end
  end
  if not os.getenv("LUA_PATH") then
    parts[#parts + 1] = "LUA_PATH=" .. q(package.path)
    parts[#parts + 1] = "LUA_CPATH=" .. q(package.cpath)
  end
  for k, v in pairs(env or {}) do parts[#parts + 1] = k .. "=" .. q(v) end
  parts[#parts + 1] = lua
  parts[#parts + 1] = "bin/stella"
  for _, a in ipairs(args) do parts[#parts + 1] = q(a) end
  return table.concat(parts, " ")
end

function M.background(lua, dir, args, env, name)
  name = name or "run"
  local out_file, err_file = dir .. "/" .. name .. ".out", dir .. "/" .. name .. ".err"
  local proc = assert(io.popen("sh -c " .. M.quote("echo $$; exec " .. M.stella_command(lua, args, env) .. " >"
    .. M.quote(out_file) .. " 2>" .. M.quote(err_file)) .. " 2>/dev/null; echo @$?"))
  local pid = assert(tonumber(proc:read("*l")))
  return pid, function()
    local rest = proc:read("*a")
    proc:close()
    return tonumber(rest:match("@(%d+)")), M.read_file(out_file), M.read_file(err_file)
  end
end

function M.run(lua, dir, args, env, name)
  name = name or "run"
  local out_file, err_file = dir .. "/" .. name .. ".out", dir .. "/" .. name .. ".err"
  local status = require("stella.nginx").run(M.stella_command(lua, args, env) .. " >" .. M.quote(out_file)
    .. " 2>" .. M.quote(err_file))
  return status, M.read_file(out_file), M.read_file(err_file)
end

function M.runners(lua, check)
  local function checked(status, out, err)
    check(out .. err)
    return status, out, err
  end
  return function(dir, args, env, name)
    return checked(M.run(lua, dir, args, env, name))
  end, function(dir, args, env, name)
    local pid, wait = M.background(lua, dir, args, env, name)
    return pid, function() return checked(wait()) end
  end
end

function M.received(server)
  local cjson = require "cjson"
  local n, total = {}, 0
  for _, r in ipairs(server:requests()) do
    local id = cjson.decode(r.body).ext_interaction_id
    n[id] = (n[id] or 0) + 1
    total = total + 1
  end
  return n, total
end

return M
