-- A raw TCP server for the specs that follows a script, to put an answer on the wire
-- exactly as a spec wants it: in pieces, chunked, closing or resetting the connection.
--   lua raw_server.lua SCRIPT_FILE
-- SCRIPT_FILE is a Lua chunk returning a list of connections, each a list of steps, run
-- in order on the connection accepted next:
--   "read"                read one request (head and Content-Length body)
--   { send = "bytes" }    write them
--   { sleep = seconds }
--   "close"               close the connection (the steps after it are not run)
--   "reset"               close it with a TCP reset (SO_LINGER 0)
-- Binds a free 127.0.0.1 port and prints "ready PORT"; at the end, for each request read,
-- prints "request CONNECTION LENGTH" and then the request's bytes, and exits. Gives up
-- when no connection arrives for 5 seconds.
local socket = require "socket"

local script = assert(dofile(arg[1]))

local server = assert(socket.bind("127.0.0.1", 0))
local _, port = server:getsockname()
server:settimeout(5)
io.stdout:write("ready ", port, "\n")
io.stdout:flush()

local requests = {}

-- Reads one request; nil when the connection ended first.
local function read_request(c)
  local lines, length = {}, 0
  while true do
    local line = c:receive("*l")
    if not line then return nil end
    lines[#lines + 1] = line .. "\r\n"
    if line == "" then break end
    local n = line:lower():match("^content%-length:%s*(%d+)")
    if n then length = tonumber(n) end
  end
  local body = length > 0 and c:receive(length) or ""
  return table.concat(lines) .. (body or "")
end

for i, steps in ipairs(script) do
  local c = server:accept()
  if not c then break end
  c:settimeout(5)
  c:setoption("tcp-nodelay", true)
  for _, step in ipairs(steps) do
    if step == "read" then
      local r = read_request(c)
      if r then requests[#requests + 1] = { i, r } end
    elseif step == "close" then
      break
    elseif step == "reset" then
      c:setoption("linger", { on = true, timeout = 0 })
      break
    elseif step.send then
      c:send(step.send)
    elseif step.sleep then
      socket.sleep(step.sleep)
    end
  end
  c:close()
end
server:close()
for _, r in ipairs(requests) do
  io.stdout:write("request ", r[1], " ", #r[2], "\n", r[2])
end
