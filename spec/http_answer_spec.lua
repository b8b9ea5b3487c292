-- Specs for the plain-http path of the C client (stella_http.c writing the request,
-- stella_answer.c reading the answer over a connection libcurl opened): answers put on
-- the wire by a raw server (spec/support/raw_server.lua) in pieces, in chunks, closing or
-- resetting the connection; the request's bytes.
local core = require "stella.core"
local stella = require "stella"

local LUA = os.getenv("STELLA_TEST_LUA") or "lua5.4"
local SERVER = (debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or ".") .. "/support/raw_server.lua"
local KEY = "tk_raw_0123456789SECRET"
local OK_BODY = '{"request_id":"raw-1"}'

local function ok_answer(extra)
  return "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" .. (extra or "")
    .. "Content-Length: " .. #OK_BODY .. "\r\n\r\n" .. OK_BODY
end

local function chunk(data, ext)
  return ("%x"):format(#data) .. (ext or "") .. "\r\n" .. data .. "\r\n"
end

-- The script as Lua source (strings with %q: the bytes stay as they are).
local function source(script)
  local out = { "return {" }
  for _, steps in ipairs(script) do
    out[#out + 1] = "{"
    for _, step in ipairs(steps) do
      if type(step) == "string" then out[#out + 1] = ("%q,"):format(step)
      elseif step.send then out[#out + 1] = ("{ send = %q },"):format(step.send)
      else out[#out + 1] = ("{ sleep = %s },"):format(step.sleep) end
    end
    out[#out + 1] = "},"
  end
  out[#out + 1] = "}"
  return table.concat(out, "\n")
end

-- Starts a raw server on `script`; returns its URL and a function that waits for it to
-- end and returns the requests it read: { { connection = N, bytes = "..." }, ... }.
local function serve(script)
  local file = os.tmpname()
  local f = assert(io.open(file, "wb"))
  assert(f:write(source(script)))
  assert(f:close())
  local proc = assert(io.popen(LUA .. " " .. SERVER .. " " .. file))
  local port = assert(tonumber((proc:read("*l") or ""):match("^ready (%d+)")), "the raw server did not start")
  return "http://127.0.0.1:" .. port, function()
    local reqs = {}
    for line in proc:lines() do
      local conn, len = line:match("^request (%d+) (%d+)$")
      reqs[#reqs + 1] = { connection = tonumber(conn), bytes = proc:read(tonumber(len)) }
    end
    proc:close()
    os.remove(file)
    return reqs
  end
end

local function pause(s) return { sleep = s } end
local function send(s) return { send = s } end

describe("the plain-http path", function()
  it("writes the bytes libcurl writes: target without dot segments, Host, headers, body", function()
    local url, done = serve{ { "read", send(ok_answer()), "close" } }
    local h = assert(core.http_new{ api_key = KEY, base_url = url .. "/api/./x/../v2%20b/" })
    local r = h:post("/v1/requests?x=%C3%A9", '{"a":1}')
    h:close()
    local reqs = done()
    assert.equal(200, r.status)
    assert.equal(1, #reqs)
    assert.equal("POST /api/v2%20b/v1/requests?x=%C3%A9 HTTP/1.1\r\nHost: " .. url:match("//(.*)$")
      .. "\r\nUser-Agent: lua-stella/" .. core.version .. "\r\nAccept: application/json"
      .. "\r\nContent-Type: application/json\r\nx-api-key: " .. KEY .. "\r\nContent-Length: 7\r\n\r\n"
      .. '{"a":1}', reqs[1].bytes)
  end)

  it("sends no User-Agent when it is empty, and an empty body with Content-Length: 0", function()
    local url, done = serve{ { "read", send(ok_answer()), "close" } }
    local h = assert(core.http_new{ api_key = KEY, base_url = url, user_agent = "" })
    assert.equal(200, h:post("/v1/requests", "").status)
    h:close()
    local reqs = done()
    assert.equal("POST /v1/requests HTTP/1.1\r\nHost: " .. url:match("//(.*)$")
      .. "\r\nAccept: application/json\r\nContent-Type: application/json\r\nx-api-key: " .. KEY
      .. "\r\nContent-Length: 0\r\n\r\n", reqs[1].bytes)
  end)

  it("reads an answer that arrives in pieces (split inside lines and line ends), then keeps the connection", function()
    local url, done = serve{ {
      "read",
      send("HTTP/1.1 20"), pause(0.03), send("1 Created\r\nContent-Type: applic"), pause(0.03),
      send("ation/json\r"), pause(0.03), send("\nRetry-After: 3\r\nContent-Len"), pause(0.03),
      send("gth: " .. #OK_BODY .. "\r\n\r"), pause(0.03), send("\n" .. OK_BODY:sub(1, 9)), pause(0.03),
      send(OK_BODY:sub(10)),
      "read", send(ok_answer()),
      "read", send("HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n"), pause(0.05), send("\r\n{}"),
      "close",
    } }
    local h = assert(core.http_new{ api_key = KEY, base_url = url })
    local r = h:post("/v1/requests", "{}")
    assert.same({ status = 201, body = OK_BODY, content_type = "application/json", retry_after = 3000 }, r)
    assert.equal(200, h:post("/v1/requests", "{}").status)
    -- the same without blocking: started, then stepped without waiting until it ends
    assert.is_true(h:start("/v1/requests", "{}"))
    local steps = 0
    repeat
      r = h:step()
      steps = steps + 1
      if r == false then require("socket").sleep(0.005) end
    until r ~= false
    assert.same({ status = 202, body = "{}" }, r)
    assert.is_true(steps > 1)
    assert.equal(1, h:connects())
    h:close()
    local reqs = done()
    assert.equal(3, #reqs)
    for _, q in ipairs(reqs) do assert.equal(1, q.connection) end
  end)

  it("reads a chunked answer in pieces, with a chunk extension and a trailer, and keeps the connection", function()
    local url, done = serve{ {
      "read",
      send("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"),
      pause(0.03), send(chunk(OK_BODY:sub(1, 5)):sub(1, 4)), pause(0.03), send(chunk(OK_BODY:sub(1, 5)):sub(5)),
      pause(0.03), send(chunk(OK_BODY:sub(6), ";ext=1")), pause(0.03), send("0\r\nX-Trailer: yes\r"),
      pause(0.03), send("\n\r\n"),
      "read", send(ok_answer()),
      "close",
    } }
    local h = assert(core.http_new{ api_key = KEY, base_url = url })
    local r = h:post("/v1/requests", "{}")
    assert.same({ status = 200, body = OK_BODY, content_type = "application/json" }, r)
    assert.equal(200, h:post("/v1/requests", "{}").status)
    assert.equal(1, h:connects())
    h:close()
    assert.equal(2, #done())
  end)

  it("opens a new connection after an answer that closes its own (Connection: close, HTTP/1.0, a body up to the end)", function()
    local url, done = serve{
      { "read", send(ok_answer("Connection: close\r\n")), "close" },
      { "read", send("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}"), "close" },
      { "read", send("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" .. OK_BODY:sub(1, 7)),
        pause(0.05), send(OK_BODY:sub(8)), "close" },
      { "read", send(ok_answer()), "close" },
    }
    local h = assert(core.http_new{ api_key = KEY, base_url = url })
    for _ = 1, 2 do assert.equal(200, h:post("/v1/requests", "{}").status) end
    assert.same({ status = 200, body = OK_BODY, content_type = "application/json" }, h:post("/v1/requests", "{}"))
    assert.equal(200, h:post("/v1/requests", "{}").status)
    assert.equal(4, h:connects())
    h:close()
    local reqs = done()
    assert.equal(4, #reqs)
    for i, q in ipairs(reqs) do assert.equal(i, q.connection) end
  end)

  it("sends again on a fresh connection when the kept one was closed before any answer, once", function()
    local url, done = serve{
      { "read", send(ok_answer()), "read", "close" },
      { "read", send(ok_answer()), "read", "close" },
      { "read", "close" },
    }
    local c = stella.new{ api_key = KEY, base_url = url, retry = { attempts = 1 } }
    assert(c:post("/v1/requests", "{}"))
    local res, err = c:post("/v1/requests", "{}")
    assert.is_nil(err)
    assert.equal(1, res.attempts)
    assert.equal(2, c:connections())
    -- sent again once only: a fresh connection that closes without an answer is a failure
    res, err = c:post("/v1/requests", "{}")
    assert.is_nil(res)
    assert.equal("network", err.kind)
    assert.is_true(err.retryable)
    assert.matches("Empty reply from server", err.message, 1, true)
    assert.equal(3, c:connections())
    c:close()
    local conns = {}
    for i, q in ipairs(done()) do conns[i] = q.connection end
    assert.same({ 1, 1, 2, 2, 3 }, conns)
  end)

  it("fails a post whose answer is reset mid-body as a network failure, not sent again", function()
    local url, done = serve{
      { "read", send(ok_answer()),
        "read", send("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" .. OK_BODY), pause(0.1), "reset" },
      { "read", send(ok_answer()), "close" },
    }
    local c = stella.new{ api_key = KEY, base_url = url, retry = { attempts = 1 } }
    assert(c:post("/v1/requests", "{}"))
    local res, err = c:post("/v1/requests", "{}")
    assert.is_nil(res)
    assert.equal("network", err.kind)
    assert.equal("network", err.failure)
    assert.is_true(err.retryable)
    assert(c:post("/v1/requests", "{}"))   -- on a new connection
    assert.equal(2, c:connections())
    c:close()
    local reqs = done()
    assert.equal(3, #reqs)
    assert.same({ 1, 1, 2 }, { reqs[1].connection, reqs[2].connection, reqs[3].connection })
  end)

  it("fails a post whose connection ends in the middle of a body or of a chunk", function()
    local url, done = serve{
      { "read", send("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" .. OK_BODY), "close" },
      { "read", send("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n" .. OK_BODY), "close" },
    }
    local h = assert(core.http_new{ api_key = KEY, base_url = url })
    local r = h:post("/v1/requests", "{}")
    assert.equal("network", r.failure)
    assert.matches("transfer closed", r.message, 1, true)
    r = h:post("/v1/requests", "{}")
    assert.equal("network", r.failure)
    h:close()
    assert.equal(2, #done())
  end)

  it("times out in the middle of a body, and closes that connection", function()
    local url, done = serve{
      { "read", send("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" .. OK_BODY), pause(0.6), "close" },
      { "read", send(ok_answer()), "close" },
    }
    local h = assert(core.http_new{ api_key = KEY, base_url = url, timeout = 0.2 })
    local r = h:post("/v1/requests", "{}")
    assert.equal("timeout", r.failure)
    assert.matches("Operation timed out after %d+ milliseconds with %d+ bytes received", r.message)
    require("socket").sleep(0.5)   -- the raw server serves one connection at a time
    assert.equal(200, h:post("/v1/requests", "{}").status)
    assert.equal(2, h:connects())
    h:close()
    assert.equal(2, #done())
  end)

  it("refuses an answer that is not HTTP and an announced body over the cap, closing the connection", function()
    local url, done = serve{
      { "read", send("SSH-2.0-OpenSSH_9.2\r\n"), pause(0.05), "close" },
      { "read", send("HTTP/1.1 200 OK\r\nContent-Length: " .. (core.max_answer_bytes + 1) .. "\r\n\r\n"),
        pause(0.05), "close" },
    }
    local h = assert(core.http_new{ api_key = KEY, base_url = url })
    local r = h:post("/v1/requests", "{}")
    assert.equal("protocol", r.failure)
    r = h:post("/v1/requests", "{}")
    assert.equal("too_large", r.failure)
    assert.matches("larger than " .. core.max_answer_bytes .. " bytes", r.message, 1, true)
    assert.equal(2, h:connects())
    h:close()
    assert.equal(2, #done())
  end)
end)
