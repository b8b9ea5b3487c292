-- stella.transport.cosocket: the transport for OpenResty (nginx with its Lua module).
-- Same interface as stella.transport.curl:
--   new(opts) -> transport | nil, message
--     opts: base_url, api_key, user_agent, ca_file, timeout, connect_timeout (seconds),
--           and, for this transport only: pool (name of the keep-alive pool, default
--           "HOST:PORT", with ":tls" added for https), pool_size (default: nginx's
--           lua_socket_pool_size), keepalive_timeout (seconds a pooled connection may
--           stay idle, default 60)
--   transport:post(path, body) -> { status, body, content_type, retry_after (ms) }
--                               | { failure = "timeout"|"network"|"protocol"|"tls", message }
--   transport:connects() -> connections this transport has opened (not taken from the pool)
--   transport:close()
--
-- Built on ngx.socket.tcp, so a send yields to nginx's event loop instead of blocking the
-- worker: it runs in the phases where cosockets exist (rewrite, access, content, timer,
-- ssl_cert, ssl_session_fetch). stella.new picks it there automatically.
--
-- The object holds no socket between calls: each post takes a connection from the
-- worker's keep-alive pool (or opens one), and gives it back after a complete answer. So
-- one client can be created once per worker and shared by every request and timer.
--
-- nginx configuration this transport relies on:
--   lua_ssl_trusted_certificate /etc/ssl/certs/ca-certificates.crt;   # https: the CAs to
--       trust. Verification is always on, and opts.ca_file cannot be applied per socket:
--       this directive is the only trust store cosockets use.
--   lua_ssl_verify_depth 5;        # the default (1) is too short for public CA chains
--   resolver 127.0.0.53 ipv6=off;  # any host name but localhost needs nginx's resolver
-- "localhost" is connected to as 127.0.0.1 (no resolver needed). For https, give a host
-- name: the certificate is checked against it (nginx matches names, not IP addresses).
--
-- Like libcurl, a request that fails on a connection taken from the pool before any byte
-- of an answer arrived (the server had closed the idle connection) is sent again on
-- another connection.
local core = require "stella.core"

local ngx = rawget(_G, "ngx")   -- nil outside nginx: new() then refuses
local error, setmetatable, tonumber, tostring, type, concat, min, floor =
      error, setmetatable, tonumber, tostring, type, table.concat, math.min, math.floor
local find, lower, match, sub = string.find, string.lower, string.match, string.sub

local M = {}

local Transport = {}
Transport.__index = Transport
M.Transport = Transport

-- transport -> the header block holding the key. Kept out of the object (a dump or a
-- log of the transport never shows the key) and dropped with it.
local secrets = setmetatable({}, { __mode = "k" })

local MAX_HEADERS = 100                  -- header lines in one answer
local MAX_BODY = 8 * 1024 * 1024         -- an answer body larger than this is refused
local MAX_STALE_RETRIES = 8              -- dead pooled connections skipped in one post

---------------------------------------------------------------------------------------
-- Option checks: the C client's own (core.check_http_options), so both transports refuse
-- the same things with the same words
---------------------------------------------------------------------------------------

local function seconds(opts, name, default)
  local v = opts[name]
  if v == nil then return default end
  if type(v) ~= "number" then error("option " .. name .. " must be a number of seconds", 3) end
  if not (v > 0) then error("option " .. name .. " must be positive", 3) end
  return v
end

local function ms(s)
  local v = floor(s * 1000 + 0.5)
  return v > 0 and v or 1
end

---------------------------------------------------------------------------------------
-- Construction
---------------------------------------------------------------------------------------

function M.new(opts)
  if type(opts) ~= "table" then error("stella.transport.cosocket: options table expected", 2) end
  if type(ngx) ~= "table" or type(ngx.socket) ~= "table" then
    return nil, "the cosocket transport runs only inside nginx with its Lua module (OpenResty)"
  end
  -- base_url, api_key, user_agent, ca_file: raises or refuses exactly as the C client does
  local u, uerr = core.check_http_options(opts)
  if not u then return nil, uerr end
  if opts.pool ~= nil and type(opts.pool) ~= "string" then error("option pool must be a string", 2) end
  local key = opts.api_key
  local agent = opts.user_agent or ("lua-stella/" .. core.version)
  local pool_size = opts.pool_size
  if pool_size ~= nil and (type(pool_size) ~= "number" or pool_size < 1 or pool_size ~= floor(pool_size)) then
    error("option pool_size must be a whole number >= 1", 2)
  end

  local authority = u.host .. ":" .. u.port
  local self = setmetatable({
    base_url = u.base_url,
    tls = u.tls,
    host = u.host,
    port = u.port,
    -- "localhost" needs no resolver; IPv6 literals keep their brackets for ngx_parse_url
    connect_host = u.host == "localhost" and "127.0.0.1" or u.host,
    sni = u.host:gsub("^%[(.*)%]$", "%1"),
    authority = authority,
    path_prefix = u.path,
    timeout = seconds(opts, "timeout", 30),
    connect_timeout = seconds(opts, "connect_timeout", 10),
    keepalive_ms = ms(seconds(opts, "keepalive_timeout", 60)),
    pool_size = pool_size,
    pool_options = { pool = opts.pool or (authority .. (u.tls and ":tls" or "")) },
    nconnects = 0,
    closed = false,
  }, Transport)
  -- everything after the request line, up to the Content-Length value
  secrets[self] = "\r\nHost: " .. (u.port_given and authority or u.host)
    .. "\r\nAccept: application/json\r\nContent-Type: application/json\r\nx-api-key: " .. key
    .. "\r\nUser-Agent: " .. agent .. "\r\nContent-Length: "
  return self
end

---------------------------------------------------------------------------------------
-- One exchange
---------------------------------------------------------------------------------------

local function now()
  return ngx.now()
end

-- Milliseconds left before the deadline (at least 1), or nil when it has passed.
local function left(deadline)
  local l = deadline - now()
  if l <= 0 then return nil end
  return ms(l)
end

-- A failed exchange. `stale` marks a pooled connection that died before answering.
local function fail(sock, failure, message, stale)
  if sock then sock:close() end
  return nil, failure, message, stale
end

local function io_failure(self, sock, err, what, stale)
  if err == "timeout" then
    return fail(sock, "timeout", "no answer from " .. self.authority .. " while " .. what)
  end
  return fail(sock, "network", "connection to " .. self.authority .. " failed while " .. what
    .. ": " .. tostring(err), stale)
end

-- Reads one line within the deadline.
local function line_of(sock, deadline)
  local t = left(deadline)
  if not t then return nil, "timeout" end
  sock:settimeout(t)
  return sock:receive("*l")
end

local function bytes_of(sock, n, deadline)
  local t = left(deadline)
  if not t then return nil, "timeout" end
  sock:settimeout(t)
  return sock:receive(n)
end

local function read_chunked(self, sock, deadline)
  local parts, total = {}, 0
  while true do
    local line, err = line_of(sock, deadline)
    if not line then return io_failure(self, sock, err, "reading a chunked body") end
    local hex = match(line, "^(%x+)[ \t]*;") or match(line, "^(%x+)[ \t]*$")
    -- broken framing counts as a broken transfer (network, retried), as libcurl has it
    if not hex or #hex > 8 then
      return fail(sock, "network", "bad chunk size in the answer from " .. self.authority)
    end
    local size = tonumber(hex, 16)
    if size == 0 then break end
    total = total + size
    if total > MAX_BODY then
      return fail(sock, "protocol", "the answer from " .. self.authority .. " is larger than "
        .. MAX_BODY .. " bytes")
    end
    local data, derr = bytes_of(sock, size, deadline)
    if not data then return io_failure(self, sock, derr, "reading a chunked body") end
    parts[#parts + 1] = data
    local crlf, cerr = line_of(sock, deadline)
    if not crlf then return io_failure(self, sock, cerr, "reading a chunked body") end
    if crlf ~= "" then
      return fail(sock, "network", "bad chunk framing in the answer from " .. self.authority)
    end
  end
  -- trailer fields, up to the empty line
  for _ = 1, MAX_HEADERS do
    local line, err = line_of(sock, deadline)
    if not line then return io_failure(self, sock, err, "reading the trailer") end
    if line == "" then return concat(parts) end
  end
  return fail(sock, "protocol", "too many trailer fields from " .. self.authority)
end

-- Reads a status line and the header fields. -> head table | nil, failure, message, stale
local function read_head(self, sock, deadline, reused, first)
  local line, err, partial = line_of(sock, deadline)
  if not line then
    -- a pooled connection the server had closed: nothing at all came back
    local stale = first and reused > 0 and err ~= "timeout" and (partial == nil or partial == "")
    return io_failure(self, sock, err, "waiting for the answer", stale)
  end
  local major, minor, status, rest = match(line, "^HTTP/(%d)%.(%d) (%d%d%d)(.*)$")
  if not major or (rest ~= "" and not find(rest, "^[ \t]")) or major ~= "1" then
    return fail(sock, "protocol", "the answer from " .. self.authority .. " is not HTTP/1.x")
  end
  local head = { status = tonumber(status), minor = tonumber(minor) }
  for _ = 1, MAX_HEADERS do
    local h, herr = line_of(sock, deadline)
    if not h then return io_failure(self, sock, herr, "reading the answer's header") end
    if h == "" then return head end
    local name, value = match(h, "^([^:%s]+):[ \t]*(.-)[ \t]*$")
    if name then
      name = lower(name)
      if name == "content-length" then
        local n = match(value, "^%d+$") and tonumber(value)
        if not n then   -- stricter than libcurl, which reads "1x" as 1
          return fail(sock, "protocol", "bad Content-Length in the answer from " .. self.authority)
        end
        if head.length and head.length ~= n then
          return fail(sock, "network", "conflicting Content-Length in the answer from " .. self.authority)
        end
        head.length = n
      elseif name == "transfer-encoding" then
        if find(lower(value), "chunked[ \t]*$") then head.chunked = true else head.other_encoding = true end
      elseif name == "connection" then
        local v = lower(value)
        if find(v, "close", 1, true) then head.close = true end
        if find(v, "keep-alive", 1, true) then head.keep_alive = true end
      elseif name == "content-type" then
        head.content_type = value
      elseif name == "retry-after" then
        head.retry_after = value
      end
    elseif not find(h, "^[ \t]") then   -- a folded continuation line is ignored
      return fail(sock, "protocol", "bad header line in the answer from " .. self.authority)
    end
  end
  return fail(sock, "protocol", "too many header lines in the answer from " .. self.authority)
end

-- One attempt on one connection. -> status, body, content_type, retry_after_ms
--                                  | nil, failure, message, stale
local function exchange(self, path, body, deadline)
  local t = left(deadline)
  if not t then return nil, "timeout", "no time left to connect to " .. self.authority end
  local sock = ngx.socket.tcp()
  sock:settimeout(min(t, ms(self.connect_timeout)))
  local ok, err = sock:connect(self.connect_host, self.port, self.pool_options)
  if not ok then
    if err == "timeout" then
      return fail(sock, "timeout", "cannot connect to " .. self.authority .. " in time")
    end
    return fail(sock, "network", "cannot connect to " .. self.authority .. ": " .. tostring(err))
  end
  local reused = sock:getreusedtimes() or 0
  if reused == 0 then
    self.nconnects = self.nconnects + 1
    if self.tls then
      t = left(deadline)
      if not t then return fail(sock, "timeout", "no time left for the TLS handshake") end
      sock:settimeout(t)
      -- nil, never false, as the session: with false, this lua-resty-core returns true
      -- for a handshake that completed at once even when the verification failed; with
      -- nil that case raises (an assertion), caught here as the failure it is
      local done, session, herr = pcall(sock.sslhandshake, sock, nil, self.sni, true)
      if not done then session, herr = nil, "the certificate did not verify" end
      if not session then
        if herr == "timeout" then
          return fail(sock, "timeout", "TLS handshake with " .. self.authority .. " timed out")
        end
        return fail(sock, "tls", "TLS handshake with " .. self.authority .. " failed: " .. tostring(herr))
      end
    end
  end

  t = left(deadline)
  if not t then return fail(sock, "timeout", "no time left to send to " .. self.authority) end
  sock:settimeout(t)
  local sent, serr = sock:send{ "POST ", self.path_prefix, path, " HTTP/1.1", secrets[self],
                                tostring(#body), "\r\n\r\n", body }
  if not sent then
    return io_failure(self, sock, serr, "sending the request", reused > 0 and serr ~= "timeout")
  end

  local head, failure, message, stale = read_head(self, sock, deadline, reused, true)
  while head and head.status >= 100 and head.status < 200 do
    if head.status == 101 then
      return fail(sock, "protocol", "unexpected protocol switch from " .. self.authority)
    end
    head, failure, message, stale = read_head(self, sock, deadline, reused, false)   -- 100 Continue & co
  end
  if not head then return nil, failure, message, stale end

  local rbody, rerr
  local reusable = not head.close and (head.minor >= 1 or head.keep_alive)
  local status = head.status
  if status == 204 or status == 304 then
    rbody = ""
  elseif head.chunked then
    rbody, failure, message = read_chunked(self, sock, deadline)
    if not rbody then return nil, failure, message end
  elseif head.length and not head.other_encoding then
    if head.length > MAX_BODY then
      return fail(sock, "protocol", "the answer from " .. self.authority .. " is larger than "
        .. MAX_BODY .. " bytes")
    end
    if head.length == 0 then
      rbody = ""
    else
      rbody, rerr = bytes_of(sock, head.length, deadline)
      if not rbody then return io_failure(self, sock, rerr, "reading the answer's body") end
    end
  else
    -- no framing: the body ends when the server closes the connection
    t = left(deadline)
    if not t then return fail(sock, "timeout", "no answer from " .. self.authority .. " in time") end
    sock:settimeout(t)
    rbody, rerr = sock:receive("*a")
    if not rbody then return io_failure(self, sock, rerr, "reading the answer's body") end
    if #rbody > MAX_BODY then
      return fail(sock, "protocol", "the answer from " .. self.authority .. " is larger than "
        .. MAX_BODY .. " bytes")
    end
    reusable = false
  end

  if reusable then
    sock:setkeepalive(self.keepalive_ms, self.pool_size)   -- on failure it is closed: fine
  else
    sock:close()
  end
  local retry_after
  if head.retry_after then retry_after = core.parse_retry_after(head.retry_after, ngx.time()) end
  return status, rbody, head.content_type, retry_after
end

---------------------------------------------------------------------------------------
-- The interface
---------------------------------------------------------------------------------------

function Transport:post(path, body)
  if self.closed then error("attempt to use a closed stella client", 2) end
  if type(path) ~= "string" or sub(path, 1, 1) ~= "/" or find(path, "[%z\1-\32\127]") then
    error("post: path must be a string starting with / without spaces or control characters", 2)
  end
  if type(body) ~= "string" then error("post: body must be a string", 2) end
  ngx.update_time()
  local deadline = now() + self.timeout
  local status, a, b, c
  for _ = 0, MAX_STALE_RETRIES do
    status, a, b, c = exchange(self, path, body, deadline)
    if status then return { status = status, body = a, content_type = b, retry_after = c } end
    if not c then break end   -- c: it was a dead pooled connection; take another
  end
  return { failure = a, message = b }
end

function Transport:connects()
  return self.nconnects
end

function Transport:close()
  self.closed = true
  secrets[self] = nil
end

function Transport:__tostring()
  return "stella.transport.cosocket (" .. self.base_url .. ")" .. (self.closed and " closed" or "")
end

return M
