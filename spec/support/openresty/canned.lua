-- A raw TCP server for the specs: answers each connection with fixed bytes.
--   lua canned.lua FILE [COUNT [MODE]]
-- Binds a free 127.0.0.1 port, prints "ready PORT", then for COUNT connections (default 1)
-- reads one request (head and Content-Length body), writes FILE's bytes and closes.
-- MODE "stale": on every other connection (the 1st, 3rd, ...) it keeps the connection
-- open after the answer, reads the next request and closes without answering, as a
-- server does when it drops an idle keep-alive connection just as a client reuses it.
-- Exits after COUNT connections, or when none arrives for 5 seconds.
local socket = require "socket"

local file, count, mode = arg[1], tonumber(arg[2] or "1"), arg[3]
local f = assert(io.open(file, "rb"))
local answer = f:read("*a")
f:close()

local server = assert(socket.bind("127.0.0.1", 0))
local _, port = server:getsockname()
server:settimeout(5)
io.stdout:write("ready ", port, "\n")
io.stdout:flush()

-- Reads one request; false when the connection ended first.
local function read_request(c)
  local length, any = 0, false
  while true do
    local line = c:receive("*l")
    if not line then return false end
    if line == "" then break end
    any = true
    local n = line:lower():match("^content%-length:%s*(%d+)")
    if n then length = tonumber(n) end
  end
  if length > 0 then c:receive(length) end
  return any
end

for i = 1, count do
  local c = server:accept()
  if not c then break end
  c:settimeout(5)
  read_request(c)
  if answer ~= "" then c:send(answer) end
  if mode == "stale" and i % 2 == 1 then read_request(c) end
  socket.sleep(0.05)
  c:close()
end
server:close()
