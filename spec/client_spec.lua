-- Specs for the client: real HTTP over loopback to the nginx test server.
local stella = require "stella"
local testserver = require "support.testserver"
local cjson = require "cjson"

local TEST_KEY = "tk_live_0123456789abcdefSECRET"
local PROD_KEY = "pk_prod_9876543210fedcbaSECRET"

local function request(overrides)
  local r = {
    customer = { name = "Zoë Åkesson", email = "zoe@example.com" },
    employee = { email = "paulagent@blancapeak.com" },
    channel = "phone",
    ext_interaction_id = 123456,
  }
  for k, v in pairs(overrides or {}) do r[k] = v end
  return r
end

describe("stella client", function()
  local server
  local sleeps

  local function client(opts)
    opts = opts or {}
    local o = {
      keys = { test = TEST_KEY, production = PROD_KEY },
      base_url = server.url,
      timeout = 2,
      retry = { attempts = 3, base_delay = 0.01, max_delay = 5 },
      sleep = function(s) sleeps[#sleeps + 1] = s end,
      random = function() return 0.5 end,
    }
    for k, v in pairs(opts) do o[k] = v end
    return stella.new(o)
  end

  local function assert_no_key(text)
    text = tostring(text)
    assert.is_nil(text:find(TEST_KEY, 1, true), "key leaked: " .. text)
    assert.is_nil(text:find(PROD_KEY, 1, true), "key leaked: " .. text)
  end

  lazy_setup(function() server = testserver.start() end)
  lazy_teardown(function() if server then server:stop() end end)
  before_each(function()
    server:reset()
    sleeps = {}
  end)

  describe("on the wire", function()
    it("POSTs the canonical JSON to /v1/requests with the documented headers", function()
      local c = client()
      local req = request()
      local res, err = c:send(req)
      assert.is_nil(err)
      local reqs = server:requests()
      assert.equal(1, #reqs)
      local r = reqs[1]
      assert.equal("POST", r.method)
      assert.equal("/v1/requests", r.path)
      assert.equal("application/json", r.headers["accept"])
      assert.equal("application/json", r.headers["content-type"])
      assert.equal(TEST_KEY, r.headers["x-api-key"])
      assert.equal("lua-stella/" .. stella.version, r.headers["user-agent"])
      assert.is_nil(r.headers["expect"])
      assert.equal(stella.encode(req), r.body)
      assert.equal('{"customer":{"name":"Zoë Åkesson","email":"zoe@example.com"},'
        .. '"employee":{"email":"paulagent@blancapeak.com"},"channel":"phone",'
        .. '"ext_interaction_id":"123456"}', r.body)
      assert.equal(200, res.status)
      c:close()
    end)

    it("sends the production key in production mode and a custom user agent", function()
      local c = client{ mode = "production", user_agent = "helpdesk-bridge/2" }
      assert.truthy(c:send(request()))
      local r = server:requests()[1]
      assert.equal(PROD_KEY, r.headers["x-api-key"])
      assert.equal("helpdesk-bridge/2", r.headers["user-agent"])
      c:close()
    end)

    it("POSTs recoveries to /v1/recoveries", function()
      local c = client()
      local res = assert(c:recover{ employee = { custom_id = "agent-7" },
                                    initial_feedback_request_id = "fr-1" })
      local r = server:requests()[1]
      assert.equal("/v1/recoveries", r.path)
      assert.equal('{"employee":{"custom_id":"agent-7"},"initial_feedback_request_id":"fr-1"}', r.body)
      assert.equal(200, res.status)
      c:close()
    end)

    it("switches between the two paths on one connection (the handle keeps its URL until the path changes)", function()
      local c = client()
      assert(c:send(request()))
      assert(c:recover{ employee = { custom_id = "agent-7" }, initial_feedback_request_id = "fr-1" })
      assert(c:recover{ employee = { custom_id = "agent-8" }, initial_feedback_request_id = "fr-2" })
      assert(c:send(request()))
      local paths = {}
      for i, r in ipairs(server:requests()) do paths[i] = r.path end
      assert.same({ "/v1/requests", "/v1/recoveries", "/v1/recoveries", "/v1/requests" }, paths)
      assert.equal('{"employee":{"custom_id":"agent-8"},"initial_feedback_request_id":"fr-2"}',
                   server:requests()[3].body)
      assert.equal(1, c:connections())
      c:close()
    end)

    it("never sends an invalid request", function()
      local c = client()
      local res, err = c:send(request{ channel = "", ext_interactionid = 5 })
      assert.is_nil(res)
      assert.equal("invalid", err.kind)
      assert.equal(0, err.attempts)
      assert.equal(false, err.retryable)
      assert.same({ "channel", "ext_interactionid" }, { err.errors[1].path, err.errors[2].path })
      assert.truthy(tostring(err):find("channel", 1, true))
      assert.equal(0, #server:requests())
      c:close()
    end)

    it("applies the channels option before sending", function()
      local c = client{ channels = { "chat", "email" } }
      local res, err = c:send(request{ channel = "phone" })
      assert.is_nil(res)
      assert.equal("unknown_channel", err.errors[1].code)
      assert.equal(0, #server:requests())
      c:close()
    end)
  end)

  describe("responses", function()
    it("reads request_id from the body", function()
      server:script{ { status = 200, body = { request_id = "abc-123" } } }
      local c = client()
      local res = assert(c:send(request()))
      assert.equal("abc-123", res.request_id)
      assert.same({ request_id = "abc-123" }, res.body)
      assert.equal(1, res.attempts)
      c:close()
    end)

    it("falls back to id, and does not require one", function()
      server:script{ { status = 200, body = { id = 42 } },
                     { status = 200, body = { customer = { name = "Jane" } } },
                     { status = 200, body = "OK", headers = { ["Content-Type"] = "text/plain" } } }
      local c = client()
      assert.equal("42", (assert(c:send(request()))).request_id)
      local echo = assert(c:send(request()))
      assert.is_nil(echo.request_id)
      assert.equal("Jane", echo.body.customer.name)
      local text = assert(c:send(request()))
      assert.is_nil(text.request_id)
      assert.equal("OK", text.body)
      c:close()
    end)

    it("reuses one keep-alive connection for 100 sends", function()
      local c = client()
      for i = 1, 100 do
        assert(c:send(request{ ext_interaction_id = i }))
      end
      local reqs = server:requests()
      assert.equal(100, #reqs)
      for i = 2, 100 do assert.equal(reqs[1].connection, reqs[i].connection) end
      assert.equal(100, reqs[100].connection_requests)
      assert.equal(1, c:connections())
      c:close()
    end)

    it("reconnects after the server closes the connection", function()
      server:script{ { status = 200, close = true }, { status = 200 } }
      local c = client()
      assert(c:send(request()))
      assert(c:send(request()))
      local reqs = server:requests()
      assert.are_not.equal(reqs[1].connection, reqs[2].connection)
      assert.equal(2, c:connections())
      c:close()
    end)
  end)

  describe("error kinds", function()
    local cases = {
      { 400, "rejected", false }, { 401, "auth", false }, { 403, "auth", false },
      { 404, "not_found", false }, { 429, "rate_limited", true }, { 500, "server", true },
      { 503, "server", true },
    }
    for _, case in ipairs(cases) do
      local status, kind, retryable = case[1], case[2], case[3]
      it(("maps HTTP %d to %s (retryable: %s)"):format(status, kind, tostring(retryable)), function()
        server:script{ { status = status, body = "Employee not found" } }
        local c = client{ retry = { attempts = 1 } }
        local res, err = c:send(request())
        assert.is_nil(res)
        assert.equal(kind, err.kind)
        assert.equal(status, err.status)
        assert.equal(retryable, err.retryable)
        assert.equal(1, err.attempts)
        assert.is_string(err.message)
        assert.equal(err.message, tostring(err))
        assert_no_key(err.message)
        c:close()
      end)
    end

    it("keeps the server's text of a 400", function()
      server:script{ { status = 400, body = "Channel is in manual mode",
                       headers = { ["Content-Type"] = "text/plain" } } }
      local c = client()
      local _, err = c:send(request())
      assert.equal("rejected", err.kind)
      assert.equal("Channel is in manual mode", err.body)
      assert.truthy(err.message:find("Channel is in manual mode", 1, true))
      c:close()
    end)

    it("says to check the key and the mode on 403", function()
      server:script{ { status = 403 } }
      local c = client{ mode = "production" }
      local _, err = c:send(request())
      assert.equal("auth", err.kind)
      assert.truthy(err.message:find("production", 1, true))
      assert.truthy(err.message:find(PROD_KEY:sub(-4), 1, true))
      assert_no_key(err.message)
      c:close()
    end)

    it("points at base_url on 404", function()
      server:script{ { status = 404 } }
      local c = client()
      local _, err = c:send(request())
      assert.equal("not_found", err.kind)
      assert.truthy(err.message:find(server.url, 1, true))
      assert.truthy(err.message:find("base_url", 1, true))
      c:close()
    end)

    it("reports a timeout", function()
      server:script{ { delay = 2 } }
      local c = client{ timeout = 0.3, retry = { attempts = 1 } }
      local res, err = c:send(request())
      assert.is_nil(res)
      assert.equal("timeout", err.kind)
      assert.is_true(err.retryable)
      assert.is_nil(err.status)
      c:close()
    end)

    it("reports a dropped connection as a network error", function()
      server:script{ { drop = true } }
      local c = client{ retry = { attempts = 1 } }
      local _, err = c:send(request())
      assert.equal("network", err.kind)
      assert.is_true(err.retryable)
      c:close()
    end)

    it("reports a refused connection as a network error", function()
      local c = client{ base_url = "http://127.0.0.1:1", retry = { attempts = 2 } }
      local _, err = c:send(request())
      assert.equal("network", err.kind)
      assert.equal(2, err.attempts)
      assert_no_key(err.message)
      c:close()
    end)

    it("reports an answer that is not HTTP as a protocol error", function()
      local socket = require "socket"
      local srv = assert(socket.bind("127.0.0.1", 0))
      local _, port = srv:getsockname()
      srv:close()
      -- a second process that answers one connection with garbage
      local lua = os.getenv("STELLA_TEST_LUA") or "lua5.4"
      local script = ([[local s=require"socket"; local l=assert(s.bind("127.0.0.1",%d));
        l:settimeout(5); local c=l:accept(); if c then c:settimeout(1); c:receive("*l");
        c:send("SSH-2.0-OpenSSH_9.2\r\n\r\n"); c:close() end]]):format(port)
      local proc = io.popen(lua .. " -e '" .. script .. "' 2>&1", "r")
      socket.sleep(0.3)
      local c = client{ base_url = "http://127.0.0.1:" .. port, retry = { attempts = 1 } }
      local _, err = c:send(request())
      proc:close()
      assert.equal("protocol", err.kind)
      assert.is_false(err.retryable)
      c:close()
    end)
  end)

  describe("retries", function()
    it("retries 5xx and succeeds, with exponential backoff and full jitter", function()
      server:script{ { status = 503 }, { status = 502 }, { status = 200, body = { request_id = "r9" } } }
      local c = client{ retry = { attempts = 3, base_delay = 0.1, max_delay = 5 } }
      local res = assert(c:send(request()))
      assert.equal("r9", res.request_id)
      assert.equal(3, res.attempts)
      assert.equal(3, #server:requests())
      -- random() = 0.5: half of 0.1 * 2^(n-1)
      assert.same({ 0.05, 0.1 }, sleeps)
      c:close()
    end)

    it("gives up after retry.attempts", function()
      server:script{ { status = 500 }, { status = 500 }, { status = 500 }, { status = 200 } }
      local c = client{ retry = { attempts = 3 } }
      local _, err = c:send(request())
      assert.equal("server", err.kind)
      assert.equal(3, err.attempts)
      assert.equal(3, #server:requests())
      c:close()
    end)

    it("never retries 400, 401, 403 or 404", function()
      for _, status in ipairs{ 400, 401, 403, 404 } do
        server:reset()
        server:script{ { status = status }, { status = 200 } }
        local c = client{ retry = { attempts = 5 } }
        local _, err = c:send(request())
        assert.equal(1, err.attempts)
        assert.equal(1, #server:requests())
        c:close()
      end
      assert.same({}, sleeps)
    end)

    it("retries timeouts and dropped connections", function()
      server:script{ { delay = 1 }, { drop = true }, { status = 200 } }
      local c = client{ timeout = 0.3, retry = { attempts = 3 } }
      local res = assert(c:send(request()))
      assert.equal(3, res.attempts)
      c:close()
    end)

    it("honours Retry-After in seconds, capped at max_delay", function()
      server:script{ { status = 429, headers = { ["Retry-After"] = "2" } },
                     { status = 429, headers = { ["Retry-After"] = "120" } },
                     { status = 200 } }
      local c = client{ retry = { attempts = 3, base_delay = 0.01, max_delay = 10 } }
      local res = assert(c:send(request()))
      assert.equal(3, res.attempts)
      assert.same({ 2, 10 }, sleeps)
      c:close()
    end)

    it("honours Retry-After as an HTTP-date", function()
      local when = os.date("!%a, %d %b %Y %H:%M:%S GMT", os.time() + 4)
      server:script{ { status = 503, headers = { ["Retry-After"] = when } }, { status = 200 } }
      local c = client{ retry = { attempts = 2, max_delay = 30 } }
      assert(c:send(request()))
      assert.equal(1, #sleeps)
      assert.is_true(sleeps[1] >= 2 and sleeps[1] <= 4, "slept " .. tostring(sleeps[1]))
      c:close()
    end)
  end)

  describe("the key", function()
    it("never appears in tostring(client), only its last 4 characters", function()
      local c = client()
      local s = tostring(c)
      assert_no_key(s)
      assert.truthy(s:find(TEST_KEY:sub(-4), 1, true))
      c:close()
      assert_no_key(tostring(c))
    end)

    it("is redacted when a server echoes it back", function()
      server:script{ { status = 400, body = "bad key " .. TEST_KEY .. " for channel" } }
      local c = client()
      local _, err = c:send(request())
      assert_no_key(err.message)
      assert_no_key(err.body)
      assert.truthy(err.message:find("[redacted]", 1, true))
      c:close()
    end)

    it("is not in the errors of refused options", function()
      local ok, msg = pcall(stella.new, { api_key = "abc def" .. TEST_KEY })
      assert.is_false(ok)
      assert_no_key(msg)
      ok, msg = pcall(stella.new, { api_key = TEST_KEY, base_url = "http://api.example.com" })
      assert.is_false(ok)
      assert_no_key(msg)
      assert.truthy(msg:find("https", 1, true))
    end)
  end)

  describe("options", function()
    it("refuses plain http to a non-loopback host", function()
      assert.has_error(function() stella.new{ api_key = "k", base_url = "http://10.0.0.1" } end)
    end)

    it("accepts https and loopback http", function()
      stella.new{ api_key = "k", base_url = "https://acme.api.stellaconnect.net" }:close()
      stella.new{ api_key = "k", base_url = "http://localhost:9" }:close()
      stella.new{ api_key = "k", base_url = "http://[::1]:9" }:close()
    end)

    it("refuses keys with whitespace or control characters", function()
      assert.has_error(function() stella.new{ api_key = "" } end)
      assert.has_error(function() stella.new{ api_key = "a\r\nX-Evil: 1" } end)
    end)

    it("refuses a key with a NUL in it rather than cutting it off there", function()
      assert.has_error(function() stella.new{ api_key = "abc\0def", base_url = server.url } end,
        "stella.new: api_key must be a non-empty string without whitespace or control characters")
    end)

    it("refuses user credentials, a query or a fragment in base_url", function()
      assert.has_error(function() stella.new{ api_key = "k", base_url = "https://user:pw@acme.api.stellaconnect.net" } end,
        "stella.new: base_url must not hold user credentials")
      assert.has_error(function() stella.new{ api_key = "k", base_url = "https://acme.api.stellaconnect.net/#x" } end,
        "stella.new: base_url must not have a fragment")
      assert.has_error(function() stella.new{ api_key = "k", base_url = "https://acme.api.stellaconnect.net/?a=1" } end,
        "stella.new: base_url must not have a query string")
      assert.has_error(function() stella.new{ api_key = "k", base_url = server.url .. "\0.example.com" } end,
        "stella.new: base_url is not a valid URL (expected https://HOST)")
    end)

    it("refuses a user agent that would break the header", function()
      assert.has_error(function() stella.new{ api_key = "k", base_url = server.url, user_agent = "a\r\nX-Evil: 1" } end,
        "stella.new: user_agent must not contain control characters")
    end)

    it("refuses unknown options, a missing key and a bad mode", function()
      assert.has_error(function() stella.new{ api_key = "k", retries = 3 } end)
      assert.has_error(function() stella.new{} end)
      assert.has_error(function() stella.new{ keys = { test = "k" }, mode = "live" } end)
      assert.has_error(function() stella.new{ keys = { test = "k" }, mode = "production" } end)
    end)

    it("defaults to the test key and the documented host", function()
      local c = stella.new{ keys = { test = "k123", production = "p456" } }
      assert.equal("test", c.mode)
      assert.equal("https://api.stellaconnect.net", c.base_url)
      c:close()
    end)

    it("closes idempotently; a closed client raises", function()
      local c = client()
      c:close()
      c:close()
      assert.has_error(function() c:send(request()) end)
    end)

    if _VERSION == "Lua 5.4" and not rawget(_G, "jit") then
      it("closes at the end of a <close> scope (Lua 5.4)", function()
        local chunk = assert(load([[
          local stella, url = ...
          local c <close> = stella.new{ api_key = "k", base_url = url }
          return c
        ]]))
        local c = chunk(stella, server.url)
        assert.is_nil(c.transport)
      end)
    end
  end)
end)
