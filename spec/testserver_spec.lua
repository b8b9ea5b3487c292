-- Specs for the test-server harness itself (spec/support/testserver.lua).
local socket = require "socket"
local cjson = require "cjson"
local testserver = require "support.testserver"

-- A minimal HTTP/1.1 client over a raw luasocket connection, so the specs control
-- exactly which requests share a connection.

local function connect(server)
  local sock = assert(socket.tcp())
  sock:settimeout(5)
  assert(sock:connect("127.0.0.1", server.port))
  return sock
end

local function send_request(sock, method, path, headers, body)
  body = body or ""
  local lines = { method .. " " .. path .. " HTTP/1.1", "Host: 127.0.0.1" }
  for name, value in pairs(headers or {}) do
    lines[#lines + 1] = name .. ": " .. value
  end
  lines[#lines + 1] = "Content-Length: " .. #body
  assert(sock:send(table.concat(lines, "\r\n") .. "\r\n\r\n" .. body))
end

-- Returns { status =, headers = { lowercase name = value }, body = } or nil, err.
local function read_response(sock)
  local line, err = sock:receive("*l")
  if not line then return nil, err end
  local res = { status = tonumber(line:match("^HTTP/1%.%d (%d%d%d)")), headers = {} }
  while true do
    line, err = sock:receive("*l")
    if not line then return nil, err end
    if line == "" then break end
    local name, value = line:match("^([^:]+):%s*(.-)%s*$")
    res.headers[name:lower()] = value
  end
  local len = tonumber(res.headers["content-length"] or 0)
  if len == 0 then  -- luasocket's receive(0) waits for the timeout
    res.body = ""
    return res
  end
  res.body, err = sock:receive(len)
  if not res.body then return nil, err end
  return res
end

-- One request on a fresh connection.
local function request(server, method, path, headers, body)
  local sock = connect(server)
  send_request(sock, method, path, headers, body)
  local res, err = read_response(sock)
  sock:close()
  return res, err
end

describe("testserver", function()
  local server

  lazy_setup(function()
    server = testserver.start()
  end)

  lazy_teardown(function()
    if server then server:stop() end
  end)

  before_each(function()
    server:reset()
  end)

  it("listens on a loopback port and reports its url", function()
    assert.is_number(server.port)
    assert.equal("http://127.0.0.1:" .. server.port, server.url)
    assert.is_string(server.prefix)
  end)

  it("answers 200 with a counting request id by default", function()
    for n = 1, 2 do
      local res = assert(request(server, "POST", "/v1/requests", nil, "{}"))
      assert.equal(200, res.status)
      assert.equal("application/json", res.headers["content-type"])
      assert.same({ request_id = "req-" .. n }, cjson.decode(res.body))
    end
  end)

  it("answers with scripted status, body and headers, in order, then the default", function()
    server:script{
      { status = 422, body = { errors = { "bad email" } }, headers = { ["Retry-After"] = "2" } },
      { status = 503, body = "busy" },
      { status = 500 },
    }
    local res = assert(request(server, "POST", "/v1/requests"))
    assert.equal(422, res.status)
    assert.equal("2", res.headers["retry-after"])
    assert.same({ errors = { "bad email" } }, cjson.decode(res.body))

    res = assert(request(server, "POST", "/v1/recoveries"))
    assert.equal(503, res.status)
    assert.equal("busy", res.body)

    res = assert(request(server, "POST", "/v1/requests"))
    assert.equal(500, res.status)
    assert.equal("", res.body)  -- no body given and not a success: empty

    res = assert(request(server, "POST", "/v1/requests"))
    assert.equal(200, res.status)
    assert.same({ request_id = "req-4" }, cjson.decode(res.body))
  end)

  it("accepts a single item as well as a list, and rejects unknown fields", function()
    server:script{ status = 201 }
    local res = assert(request(server, "POST", "/v1/requests"))
    assert.equal(201, res.status)
    assert.same({ request_id = "req-1" }, cjson.decode(res.body))

    assert.has_error(function() server:script{ { stauts = 500 } } end,
      "script: item 1 has unknown field 'stauts'")
  end)

  it("delays a scripted answer", function()
    server:script{ { delay = 0.3 } }
    local t0 = socket.gettime()
    local res = assert(request(server, "POST", "/v1/requests"))
    local elapsed = socket.gettime() - t0
    assert.equal(200, res.status)
    assert.is_true(elapsed >= 0.29, "answered after " .. elapsed .. " s")
  end)

  it("drops the connection without any response", function()
    server:script{ { drop = true } }
    local sock = connect(server)
    send_request(sock, "POST", "/v1/requests", nil, "{}")
    local data, err, partial = sock:receive("*a")
    sock:close()
    -- receive("*a") succeeds with "" on a clean close; either way nothing arrived.
    assert.equal("", data or partial)
    if not data then assert.equal("closed", err) end

    -- The dropped request was still recorded, and the server carries on.
    local res = assert(request(server, "POST", "/v1/requests"))
    assert.equal(200, res.status)
    assert.equal(2, #server:requests())
  end)

  it("answers with Connection: close and closes the connection", function()
    server:script{ { close = true } }
    local sock = connect(server)
    send_request(sock, "POST", "/v1/requests")
    local res = assert(read_response(sock))
    assert.equal(200, res.status)
    assert.equal("close", res.headers["connection"])
    local data, err = sock:receive("*l")
    sock:close()
    assert.is_nil(data)
    assert.equal("closed", err)
  end)

  it("records method, path, headers and body; never control requests", function()
    local body = '{"customer":{"email":"jane@example.com"}}'
    assert(request(server, "POST", "/v1/requests?mode=test&x=1",
      { ["Authorization"] = "Bearer k", ["X-Custom-Thing"] = "yes",
        ["Content-Type"] = "application/json" }, body))
    assert(request(server, "GET", "/anything/else"))
    server:script{ { status = 200 } }  -- control traffic in between

    local reqs = server:requests()
    assert.equal(2, #reqs)
    local r = reqs[1]
    assert.equal("POST", r.method)
    assert.equal("/v1/requests?mode=test&x=1", r.path)
    assert.equal("Bearer k", r.headers["authorization"])
    assert.equal("yes", r.headers["x-custom-thing"])
    assert.equal("application/json", r.headers["content-type"])
    assert.equal(tostring(#body), r.headers["content-length"])
    assert.equal(body, r.body)
    assert.is_number(r.connection)
    assert.equal(1, r.connection_requests)
    assert.is_true(math.abs(r.time - socket.gettime()) < 5)

    assert.equal("GET", reqs[2].method)
    assert.equal("/anything/else", reqs[2].path)
    assert.equal("", reqs[2].body)
    assert.is_true(reqs[2].time >= r.time)
    assert.not_equal(r.connection, reqs[2].connection)
  end)

  it("keeps a connection alive across sequential requests", function()
    local sock = connect(server)
    for _ = 1, 3 do
      send_request(sock, "POST", "/v1/requests", nil, "{}")
      assert.equal(200, assert(read_response(sock)).status)
    end
    sock:close()

    local reqs = server:requests()
    assert.equal(3, #reqs)
    for i, r in ipairs(reqs) do
      assert.equal(reqs[1].connection, r.connection)
      assert.equal(i, r.connection_requests)
    end
  end)

  it("lets well over 100 requests share one connection", function()
    local sock = connect(server)
    for i = 1, 150 do
      send_request(sock, "POST", "/v1/requests", nil, "{}")
      local res = assert(read_response(sock))
      assert.same({ request_id = "req-" .. i }, cjson.decode(res.body))
    end
    sock:close()
    local reqs = server:requests()
    assert.equal(150, reqs[150].connection_requests)
    assert.equal(reqs[1].connection, reqs[150].connection)
  end)

  it("reset forgets requests, queued items and the counter", function()
    server:script{ { status = 500 }, { status = 500 } }
    assert.equal(500, assert(request(server, "POST", "/v1/requests")).status)
    server:reset()
    assert.same({}, server:requests())
    local res = assert(request(server, "POST", "/v1/requests"))
    assert.equal(200, res.status)
    assert.same({ request_id = "req-1" }, cjson.decode(res.body))
  end)

  it("runs several servers at once, each with its own state", function()
    local other = testserver.start()
    finally(function() other:stop() end)
    assert.not_equal(server.port, other.port)
    assert.not_equal(server.prefix, other.prefix)

    other:script{ { status = 418 } }
    assert.equal(200, assert(request(server, "POST", "/v1/requests")).status)
    assert.equal(418, assert(request(other, "POST", "/v1/requests")).status)
    assert.equal(1, #server:requests())
    assert.equal(1, #other:requests())
  end)

  it("stop is idempotent and cleans up", function()
    local other = testserver.start()
    local prefix, port = other.prefix, other.port
    other:stop()
    other:stop()
    assert.is_nil(io.open(prefix .. "/nginx.conf"))
    local sock = socket.tcp()
    sock:settimeout(1)
    assert.is_nil(sock:connect("127.0.0.1", port))
    sock:close()
  end)

  it("raises a clear error when nginx cannot start", function()
    local ok, err = pcall(testserver.start, { nginx = "/bin/false" })
    assert.is_false(ok)
    assert.matches("nginx failed to start", err, 1, true)

    ok, err = pcall(testserver.start, { module_dirs = { "/nonexistent" } })
    assert.is_false(ok)
    assert.matches("ndk_http_module.so not found", err, 1, true)
  end)
end)
