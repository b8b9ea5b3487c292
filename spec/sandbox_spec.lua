-- Specs for the local Requests API sandbox (stella.sandbox): a real nginx with its Lua
-- module on a free 127.0.0.1 port, driven with the real stella client, raw HTTP for what
-- the client refuses to send, and headless Chromium for the status page.
local sandbox = require "stella.sandbox"
local stella = require "stella"
local cjson = require "cjson"
local http = require "socket.http"
local ltn12 = require "ltn12"
local companies = require "support.sandbox_config"
local chromium = require "support.sandbox_chromium"

local TEST_KEY, PRODUCTION_KEY, TEST_EMAIL = companies.TEST_KEY, companies.PRODUCTION_KEY, companies.TEST_EMAIL
local LUA = os.getenv("STELLA_TEST_LUA") or "lua5.4"
local UUID4 = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-4%x%x%x%-[89ab]%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"

local nginx = require "stella.nginx"
local shell_quote, read_file = nginx.shell_quote, nginx.read_file

-- Raw HTTP: status and body (decoded when it is JSON).
local function request(url, method, body, headers)
  local chunks = {}
  local h = { ["Content-Type"] = body and "application/json" or nil,
              ["Content-Length"] = body and tostring(#body) or nil }
  for k, v in pairs(headers or {}) do h[k] = v end
  local saved = http.TIMEOUT
  http.TIMEOUT = 10
  local ok, status, code, rheaders = pcall(http.request, {
    url = url, method = method, headers = h,
    source = body and ltn12.source.string(body) or nil,
    sink = ltn12.sink.table(chunks),
  })
  http.TIMEOUT = saved
  assert(ok and status, "HTTP " .. method .. " " .. url .. " failed: " .. tostring(ok and code or status))
  local text = table.concat(chunks)
  local decoded = text:match("^%s*[{%[]") and cjson.decode(text) or text
  return code, decoded, rheaders, text
end

local function post(sb, path, body, key)
  return request(sb.url .. path, "POST", body, key and { ["x-api-key"] = key } or nil)
end

local function status_json(sb)
  local code, s = request(sb.url .. "/status.json", "GET")
  assert.equal(200, code)
  return s
end

local function control(sb, what, body)
  local code = post(sb, "/_sandbox/" .. what, body or "{}")
  assert.equal(200, code)
end

-- a valid request for the multi-brand company; `over` replaces top-level fields
-- ("nil" removes one)
local seq = 0
local function req(over)
  seq = seq + 1
  local r = {
    customer = { name = "Jane Doe", email = "jane" .. seq .. "@example.com" },
    employee = { email = "paul@spec.example.com" },
    channel = "phone",
    ext_interaction_id = "ix-" .. seq,
    brand = "main",
    language = "en",
  }
  for k, v in pairs(over or {}) do
    if v == "nil" then r[k] = nil else r[k] = v end
  end
  return r
end

local function client(sb, key)
  return stella.new{ api_key = key or TEST_KEY, base_url = sb.url, retry = { attempts = 1 } }
end

local function find_row(rows, pred)
  for _, r in ipairs(rows) do
    if pred(r) then return r end
  end
  return nil
end

-- nginx loads the C core built for LuaJIT; without it (make LUA=luajit) nothing can run
if not sandbox.paths().core_dir then
  describe("stella sandbox", function()
    pending("needs build/luajit/stella/core.so (make LUA=luajit)")
  end)
  return
end

describe("stella sandbox", function()
  local sb, test, prod

  setup(function()
    local err
    sb, err = sandbox.start{ port = 0, config = companies.multi_brand(),
      -- a handler that fails, for nginx's own 500 (see "nginx's own errors")
      extra_locations = 'location = /_spec/fail { content_by_lua_block { error("failing on purpose") } }\n'
        -- how the handler checks a body: "ffi" (stella.check_json through LuaJIT's FFI)
        .. 'location = /_spec/check_json { content_by_lua_block { local cj = require("stella.check_json") '
        .. 'local a = require("stella.sandbox.server").request_check.ffi and "ffi" '
        .. 'or ("validate_json: " .. tostring(cj.ffi_missing)) '
        .. 'ngx.header["Content-Length"] = #a ngx.print(a) } }' }
    assert(sb, err)
    test, prod = client(sb, TEST_KEY), client(sb, PRODUCTION_KEY)
  end)

  teardown(function()
    if test then test:close() end
    if prod then prod:close() end
    if sb then
      local pid = sb.pid
      sb:stop()
      assert.is_false(sandbox.alive(pid), "nginx is still running")
    end
  end)

  before_each(function()
    control(sb, "reset")
  end)

  describe("start and stop", function()
    it("listens on a free loopback port, writes a pid file and cleans up", function()
      local other = assert(sandbox.start{ port = 0, config = companies.single_brand() })
      assert.matches("^http://127%.0%.0%.1:%d+$", other.url)
      assert.not_equal(sb.port, other.port)
      assert.equal(tostring(other.pid), (read_file(other.pid_file) or ""):match("%d+"))
      assert.equal(200, (request(other.url .. "/_sandbox/ping", "GET")))
      local prefix, pid = other.prefix, other.pid
      other:stop()
      other:stop()   -- idempotent
      assert.is_false(sandbox.alive(pid))
      assert.is_nil(read_file(prefix .. "/nginx.conf"))
    end)

    it("refuses a broken config before starting nginx", function()
      local c = companies.multi_brand()
      c.test_email = nil
      local s, err = sandbox.start{ port = 0, config = c }
      assert.is_nil(s)
      assert.matches("test_email", err)
      c = companies.multi_brand()
      c.channels = { phone = "automatic" }
      s, err = sandbox.start{ port = 0, config = c }
      assert.is_nil(s)
      assert.matches("integrated", err)
    end)

    it("ships a default config that loads", function()
      local config = require "stella.sandbox.config"
      local c = assert(config.load(sandbox.paths().sandbox_dir .. "/config.lua"))
      assert.is_true(c.multi_brand)
      assert.truthy(c.by_email["paulagent@blancapeak.com"])
      assert.equal("manual", c.channels.email)
    end)
  end)

  describe("keys", function()
    it("answers 403 to a missing or unknown x-api-key, which the client reports as auth", function()
      local code, body = post(sb, "/v1/requests", assert(stella.encode(req())))
      assert.equal(403, code)
      assert.same({ message = "Forbidden" }, body)
      local wrong = client(sb, "not-a-key-of-this-company")
      local res, err = wrong:send(req())
      wrong:close()
      assert.is_nil(res)
      assert.equal("auth", err.kind)
      assert.equal(403, err.status)
      -- counted apart: a 403 is not an invalid request of the company
      local s = status_json(sb)
      assert.equal(2, s.counts.auth_failures)
      assert.equal(0, s.counts.invalid)
      assert.equal(0, s.last_hour.total)
    end)

    it("answers 405 to other methods and 404 elsewhere", function()
      local code, _, headers = request(sb.url .. "/v1/requests", "GET", nil, { ["x-api-key"] = TEST_KEY })
      assert.equal(405, code)
      assert.equal("POST", headers.allow)
      local c = stella.new{ api_key = TEST_KEY, base_url = sb.url .. "/nowhere", retry = { attempts = 1 } }
      local res, err = c:send(req())
      c:close()
      assert.is_nil(res)
      assert.equal("not_found", err.kind)
    end)
  end)

  describe("nginx's own errors", function()
    local socket = require "socket"

    -- Sends `text` on a new connection and reads one answer by its Content-Length (the
    -- connection is left open: nginx would wait for the body it refused before closing):
    -- status, headers (lower-case names), body.
    local function raw(text)
      local c = assert(socket.connect(sb.url:match("^http://([^:/]+):(%d+)")))
      c:settimeout(10)
      assert(c:send(text))
      local code = tonumber(assert(c:receive("*l")):match("^HTTP/1%.1 (%d+)"))
      local headers = {}
      while true do
        local line = assert(c:receive("*l"))
        if line == "" then break end
        local name, value = line:match("^([^:]+):%s*(.*)$")
        headers[name:lower()] = value
      end
      local body = assert(c:receive(tonumber(headers["content-length"])))
      c:close()
      return code, headers, body
    end

    local function assert_json_answer(code, message, got_code, headers, body)
      assert.equal(code, got_code)
      assert.equal("application/json", headers["content-type"])
      assert.same({ message = message }, cjson.decode(body))
    end

    it("answers a body over the size limit with 413 in JSON, not an HTML page", function()
      assert_json_answer(413, "Request Entity Too Large", raw("POST /v1/requests HTTP/1.1\r\nHost: localhost\r\n"
        .. "x-api-key: " .. TEST_KEY .. "\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n{"))
      -- and the client reports it as the service's answer, with the message
      local c = client(sb)
      local props = {}
      for i = 1, 600 do props["p" .. i] = string.rep("x", 1990) end
      local res, err = c:send(req{ custom_properties = props })
      c:close()
      assert.is_nil(res)
      assert.equal(413, err.status)
      assert.truthy(tostring(err):find("Request Entity Too Large", 1, true), tostring(err))
    end)

    it("answers a request it cannot parse with 400, a long URI with 414, TRACE with 405, in JSON", function()
      assert_json_answer(400, "Bad Request", raw("GARBAGE\r\n\r\n"))
      assert_json_answer(414, "Request-URI Too Large",
        raw("GET /v1/" .. string.rep("a", 20000) .. " HTTP/1.1\r\nHost: localhost\r\n\r\n"))
      assert_json_answer(405, "Method Not Allowed", raw("TRACE /v1/requests HTTP/1.1\r\nHost: localhost\r\n\r\n"))
    end)

    it("answers a failing handler with 500 in JSON", function()
      assert_json_answer(500, "Internal Server Error",
        raw("GET /_spec/fail HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"))
    end)

    it("checks request bodies with the C core through LuaJIT's FFI (stella.check_json)", function()
      local code, _, body = raw("GET /_spec/check_json HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
      assert.equal(200, code)
      assert.equal("ffi", body)
    end)

    it("keeps its error page out of reach", function()
      assert_json_answer(404, "Not Found",
        raw("GET /_sandbox_nginx_error HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"))
    end)
  end)

  describe("schema errors", function()
    -- tables a JSON document can carry unchanged, each with schema problems
    local INVALID = {
      { "an empty object", {} },
      { "missing employee, a bad e-mail", { customer = { name = "Jane", email = "jane@" }, channel = "phone",
                                             ext_interaction_id = "1" } },
      { "wrong types", { customer = { name = 42, email = "j@example.com" }, employee = { email = "paul@spec.example.com" },
                         channel = "phone", ext_interaction_id = true, do_not_send = "true", tags = "billing" } },
      { "a fractional interaction id", req{ ext_interaction_id = 1.5 } },
      { "21 tags, one too long", req{ tags = { "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m",
                                              "n", "o", "p", "q", "r", "s", "t", ("x"):rep(2001) } } },
      { "unknown fields at two levels", req{ priority = "high",
                                             customer = { name = "Jane", email = "j@example.com", phone = "1" } } },
      { "language, country and url", req{ language = "english", country = "zz", external_url = "support/tickets 1" } },
      { "empty strings", req{ channel = "", employee = { email = "" } } },
      { "an employee with neither field", req{ employee = {} } },
      { "nested custom properties", req{ custom_properties = { plan = { tier = "gold" } } } },
      { "bytes that are not UTF-8", req{ customer = { name = "Jos\255", email = "j@example.com" } } },
    }

    for _, case in ipairs(INVALID) do
      it("answers 400 with the errors stella.validate reports: " .. case[1], function()
        local t = case[2]
        local ok, expected = stella.validate(t)
        assert.is_nil(ok)
        local code, body = post(sb, "/v1/requests", cjson.encode(t), TEST_KEY)
        assert.equal(400, code)
        assert.same({ errors = expected }, body)
        -- the client refuses the same table with the same errors, sending nothing
        local res, err = test:send(t)
        assert.is_nil(res)
        assert.equal("invalid", err.kind)
        assert.same(expected, err.errors)
      end)
    end

    it("checks recoveries against the recovery schema", function()
      for _, t in ipairs{
        { employee = { email = "paul@spec.example.com" } },
        { employee = { email = "paul@spec.example.com" }, initial_feedback_request_id = true, tags = { 1 } },
        { initial_feedback_request_id = "x", customer = { name = "J" } },
      } do
        local _, expected = stella.validate(t, "recovery")
        local code, body = post(sb, "/v1/recoveries", cjson.encode(t), TEST_KEY)
        assert.equal(400, code)
        assert.same({ errors = expected }, body)
      end
    end)

    -- a table (or JSON text) as JSON text with one more member at its end, even one it
    -- already has
    local function plus(t, name, json)
      local text = type(t) == "table" and cjson.encode(t) or t
      return text:sub(1, -2) .. ',"' .. name .. '":' .. json .. "}"
    end

    it("answers 400 duplicate_field to a key given twice, at any level, and logs it", function()
      local code, body = post(sb, "/v1/requests", plus(req(), "channel", '"chat"'), TEST_KEY)
      assert.equal(400, code)
      assert.same({ errors = { { path = "channel", code = "duplicate_field",
                                 message = "channel is given more than once" } } }, body)
      code, body = post(sb, "/v1/requests", plus(req{ customer = "nil" }, "customer",
        '{"name":"Jane","email":"a@example.com","email":"b@example.com"}'), TEST_KEY)
      assert.equal(400, code)
      assert.same({ { "customer.email", "duplicate_field" } }, { { body.errors[1].path, body.errors[1].code } })
      assert.equal(1, #body.errors)
      code, body = post(sb, "/v1/requests", plus(req{ custom_properties = { plan = "a" } }, "custom_properties",
        '{"plan":"b"}'), TEST_KEY)
      assert.equal(400, code)
      assert.equal("custom_properties", body.errors[1].path)
      assert.equal("duplicate_field", body.errors[1].code)
      local s = status_json(sb)
      assert.equal(3, s.counts.invalid)
      assert.equal("duplicate_field", s.invalid[3].errors[1].code)
      assert.same({ { label = "schema:duplicate_field", count = 3 } }, s.errors)
    end)

    it("answers 400 invalid_type to {} where a list belongs and [] where an object does", function()
      for _, case in ipairs{ { "tags", "{}" }, { "custom_properties", "[]" }, { "customer", "[]" },
                             { "employee", "[]" } } do
        local code, body = post(sb, "/v1/requests", plus(req{ [case[1]] = "nil" }, case[1], case[2]), TEST_KEY)
        assert.equal(400, code)
        assert.equal(1, #body.errors)
        assert.equal(case[1], body.errors[1].path)
        assert.equal("invalid_type", body.errors[1].code)
      end
      -- where they belong, both are fine
      assert.equal(200, (post(sb, "/v1/requests", plus(plus(req(), "tags", "[]"), "custom_properties", "{}"),
                              TEST_KEY)))
    end)

    it("checks recoveries for repeated keys and {}/[] mix-ups too", function()
      local emp = { email = "paul@spec.example.com" }
      local code, body = post(sb, "/v1/recoveries",
        plus({ employee = emp, initial_feedback_request_id = "x" }, "initial_feedback_request_id", '"y"'), TEST_KEY)
      assert.equal(400, code)
      assert.same({ { "initial_feedback_request_id", "duplicate_field" } },
                  { { body.errors[1].path, body.errors[1].code } })
      code, body = post(sb, "/v1/recoveries", plus({ employee = emp, ext_interaction_id = "x" }, "tags", "{}"), TEST_KEY)
      assert.equal(400, code)
      assert.equal("tags", body.errors[1].path)
      assert.equal("invalid_type", body.errors[1].code)
    end)

    it("answers 400 invalid_json to a body that is not a JSON object", function()
      for _, body in ipairs{ "", "not json", "[1,2]", " \n\t" } do
        for _, path in ipairs{ "/v1/requests", "/v1/recoveries" } do
          local code, res = post(sb, path, body, TEST_KEY)
          assert.equal(400, code)
          assert.same({ errors = { { path = "", code = "invalid_json", message = "the body must be a JSON object" } } },
                      res)
        end
      end
      -- past its first character, the parser says what and where
      for _, case in ipairs{ { '{"customer":', "at line 1, column 13" }, { '  {"a":1,}', "at line 1, column 10" },
                             { '{"channel":"phone"} x', "at line 1, column 21" } } do
        local code, res = post(sb, "/v1/requests", case[1], TEST_KEY)
        assert.equal(400, code)
        assert.equal(1, #res.errors)
        assert.equal("invalid_json", res.errors[1].code)
        assert.truthy(res.errors[1].message:find(case[2], 1, true), res.errors[1].message)
      end
    end)

    it("keeps status.json valid UTF-8 after a body that is not", function()
      local body = cjson.encode(req{ customer = { name = "Jos\255 \195\169", email = "j@example.com" } })
      assert.equal(400, (post(sb, "/v1/requests", body, TEST_KEY)))
      local code, _, _, text = request(sb.url .. "/status.json", "GET")
      assert.equal(200, code)
      assert.truthy(require("stella.core").utf8_valid(text))
      local s = cjson.decode(text)
      assert.matches("Jos\239\191\189", s.invalid[1].body)
      assert.equal("invalid_utf8", s.invalid[1].errors[1].code)
    end)

    it("logs each one under Invalid Requests with its errors", function()
      local t = req{ customer = { name = "Jane", email = "jane@" } }
      post(sb, "/v1/requests", cjson.encode(t), TEST_KEY)
      local s = status_json(sb)
      assert.equal(1, s.counts.invalid)
      assert.equal(1, #s.invalid)
      local row = s.invalid[1]
      assert.equal("test", row.mode)
      assert.equal("request", row.call)
      assert.same(select(2, stella.validate(t)), row.errors)
      assert.equal("schema:invalid_email", s.errors[1].label)
    end)
  end)

  describe("processing errors", function()
    local CASES = {
      { "Employee not found", req{ employee = { email = "nobody@spec.example.com" } } },
      { "Employee not found", req{ employee = { custom_id = "E-404" } } },
      { "Employee not found", req{ employee = { email = "paul@spec.example.com", custom_id = "E-2" } } },
      { "Deactivated employee", req{ employee = { email = "GONE@spec.example.com" } } },
      { "Deactivated employee", req{ employee = { custom_id = "E-4" } } },
      { "Employee profile not complete", req{ employee = { email = "new@spec.example.com" } } },
      { "Invalid customer", req{ customer = { name = "Jane", email = "jane@localhost" } } },
      { "Invalid customer", req{ customer = { name = "Jane", email = "Bounced@example.com" } } },
      { "Channel not enabled for company", req{ channel = "sms" } },
      { "Brand signifier not provided", req{ brand = "nil" } },
      { "Invalid/inactive brand signifier", req{ brand = "unknown" } },
      { "Invalid/inactive brand signifier", req{ brand = "retired" } },
      { "Language not specified", req{ language = "nil" } },
    }

    for _, case in ipairs(CASES) do
      local label, t = case[1], case[2]
      it("answers 400 {\"error\": \"" .. label .. "\"}" .. " for " .. cjson.encode(t.employee) .. " "
         .. tostring(t.channel) .. " " .. tostring(t.brand), function()
        local res, err = test:send(t)
        assert.is_nil(res)
        assert.equal("rejected", err.kind)
        assert.equal(400, err.status)
        assert.same({ error = label }, err.body)
        local s = status_json(sb)
        assert.equal(1, s.counts.invalid)
        assert.equal(label, s.invalid[1].error)
        assert.equal(t.ext_interaction_id, cjson.decode(s.invalid[1].body).ext_interaction_id)
        assert.same({ { label = label, count = 1 } }, s.errors)
      end)
    end

    it("accepts an employee by custom_id alone, or by both fields of one profile", function()
      assert(test:send(req{ employee = { custom_id = "E-3" } }))
      assert(test:send(req{ employee = { email = "Maria@Spec.Example.com", custom_id = "E-2" } }))
    end)

    it("says \"Channel is in manual mode\" to the production key only", function()
      local res, err = prod:send(req{ channel = "email" })
      assert.is_nil(res)
      assert.same({ error = "Channel is in manual mode" }, err.body)
      assert(test:send(req{ channel = "email" }))
      local s = status_json(sb)
      assert.equal("production", s.invalid[1].mode)
    end)

    it("checks the employee first, then the customer, channel, brand and language", function()
      local _, err = test:send(req{ employee = { email = "gone@spec.example.com" }, channel = "sms", brand = "nil" })
      assert.same({ error = "Deactivated employee" }, err.body)
      _, err = test:send(req{ customer = { name = "J", email = "j@localhost" }, channel = "sms" })
      assert.same({ error = "Invalid customer" }, err.body)
      _, err = test:send(req{ channel = "sms", brand = "nil", language = "nil" })
      assert.same({ error = "Channel not enabled for company" }, err.body)
      _, err = test:send(req{ brand = "nil", language = "nil" })
      assert.same({ error = "Brand signifier not provided" }, err.body)
    end)
  end)

  describe("accepted requests", function()
    it("echoes the request with a UUID v4 request_id; the test key delivers to the test inbox", function()
      local t = req{ tags = { "billing" }, custom_properties = { order = 42 }, country = "us" }
      local res = assert(test:send(t))
      assert.equal(200, res.status)
      assert.matches(UUID4, res.request_id)
      local json = assert(stella.encode(t))
      local echo = cjson.decode(json)
      echo.request_id, echo.delivery = res.request_id, "test_inbox"
      assert.same(echo, res.body)
      local s = status_json(sb)
      assert.equal(1, s.counts.test)
      assert.equal(0, s.counts.delivered)
      local row = s.test[1]
      assert.equal(res.request_id, row.request_id)
      assert.equal("test_inbox", row.delivery)
      assert.equal(TEST_EMAIL, row.to)          -- never the customer
      assert.same(cjson.decode(json), row.request)
      assert.equal(1, s.deliveries.test.test_inbox)
    end)

    it("sends the echo with its Content-Length, not in chunks (multi-byte text, space after the body)", function()
      local t = req{ customer = { name = "Zoë Åkesson", email = "zoe" .. seq .. "@example.com" } }
      local body = assert(stella.encode(t)) .. " \n"
      local code, answer, headers, text = post(sb, "/v1/requests", body, TEST_KEY)
      assert.equal(200, code)
      assert.equal(tostring(#text), headers["content-length"])
      assert.is_nil(headers["transfer-encoding"])
      assert.equal("Zoë Åkesson", answer.customer.name)
      assert.matches(UUID4, answer.request_id)
      assert.equal("test_inbox", answer.delivery)
    end)

    it("gives every request its own id, also after a reset", function()
      local seen = {}
      for round = 1, 2 do
        for _ = 1, 50 do
          for _, c in ipairs{ test, prod } do
            local res = assert(c:send(req()))
            assert.matches(UUID4, res.request_id)
            assert.is_nil(seen[res.request_id])
            seen[res.request_id] = true
          end
        end
        if round == 1 then control(sb, "reset") end
      end
    end)

    it("delivers production requests to the customer, listed under Delivered", function()
      local t = req()
      local res = assert(prod:send(t))
      assert.equal("customer", res.body.delivery)
      local s = status_json(sb)
      assert.equal(0, s.counts.test)
      assert.equal(1, s.counts.delivered)
      assert.equal(t.customer.email, s.delivered[1].to)
      assert.equal(res.request_id, s.delivered[1].request_id)
    end)

    it("suppresses a customer e-mail per brand within suppression_days", function()
      local email = "repeat@example.com"
      local function send(c, brand, addr)
        local res = assert(c:send(req{ brand = brand, customer = { name = "R", email = addr or email } }))
        return res.body.delivery
      end
      assert.equal("test_inbox", send(test, "main"))
      assert.equal("suppressed", send(test, "main"))
      assert.equal("suppressed", send(test, "main", "REPEAT@example.com"))
      assert.equal("test_inbox", send(test, "second"))     -- another brand
      assert.equal("customer", send(prod, "main"))         -- the production key keeps its own marks
      assert.equal("suppressed", send(prod, "main"))
      control(sb, "clock", '{"advance": 604700}')           -- 100 s short of 7 days
      assert.equal("suppressed", send(test, "main"))
      control(sb, "clock", '{"advance": 101}')
      assert.equal("test_inbox", send(test, "main"))
      local s = status_json(sb)
      assert.equal(3, s.deliveries.test.suppressed)
      local row = find_row(s.test, function(r) return r.delivery == "suppressed" end)
      assert.is_number(row["until"])
      assert.is_nil(row.to)
    end)

    it("records requests for unsubscribed customers without delivering them", function()
      local res = assert(prod:send(req{ customer = { name = "O", email = "opted.out@EXAMPLE.com" } }))
      assert.equal("unsubscribed", res.body.delivery)
      assert.matches(UUID4, res.request_id)
      local s = status_json(sb)
      assert.equal(1, s.deliveries.production.unsubscribed)
      assert.equal(0, s.deliveries.production.customer)
      assert.equal("unsubscribed", s.delivered[1].delivery)
    end)

    it("records do_not_send requests, which neither send nor suppress", function()
      local who = { name = "D", email = "dns@example.com" }
      local res = assert(test:send(req{ customer = who, do_not_send = true }))
      assert.equal("do_not_send", res.body.delivery)
      assert.is_true(res.body.do_not_send)
      res = assert(test:send(req{ customer = who }))
      assert.equal("test_inbox", res.body.delivery)
      assert.equal(1, status_json(sb).deliveries.test.do_not_send)
    end)
  end)

  describe("recoveries", function()
    local EMP = { email = "paul@spec.example.com" }

    it("follow up a known feedback request or interaction with a new request id", function()
      local orig = assert(test:send(req{ ext_interaction_id = "case-77" }))
      local r1 = assert(test:recover{ employee = EMP, initial_feedback_request_id = orig.request_id })
      assert.equal(200, r1.status)
      assert.matches(UUID4, r1.request_id)
      assert.not_equal(orig.request_id, r1.request_id)
      assert.same({ request_id = r1.request_id }, r1.body)
      local r2 = assert(test:recover{ employee = EMP, ext_interaction_id = "case-77", tags = { "refund" } })
      assert.matches(UUID4, r2.request_id)
      local s = status_json(sb)
      assert.equal(3, s.counts.test)
      local row = find_row(s.test, function(r) return r.request_id == r2.request_id end)
      assert.equal("recovery", row.call)
      assert.equal(orig.request_id, row.original)
      assert.equal(TEST_EMAIL, row.to)
    end)

    it("answer 400 with a clear label for an unknown request or interaction", function()
      local _, err = test:recover{ employee = EMP, initial_feedback_request_id = "8d1c5f0e-0000-4000-8000-000000000000" }
      assert.equal("rejected", err.kind)
      assert.same({ error = "Feedback request not found" }, err.body)
      _, err = test:recover{ employee = EMP, ext_interaction_id = "never-sent" }
      assert.same({ error = "Interaction not found" }, err.body)
      -- a test request is not known to the production key
      local orig = assert(test:send(req()))
      _, err = prod:recover{ employee = EMP, initial_feedback_request_id = orig.request_id }
      assert.same({ error = "Feedback request not found" }, err.body)
      local s = status_json(sb)
      assert.equal(3, s.counts.invalid)
      assert.equal("recovery", s.invalid[1].call)
    end)

    it("refuse a recovery's own id, and ids made up to look like the sandbox's", function()
      local orig = assert(test:send(req()))
      local r = assert(test:recover{ employee = EMP, initial_feedback_request_id = orig.request_id })
      local _, err = test:recover{ employee = EMP, initial_feedback_request_id = r.request_id }
      assert.same({ error = "Feedback request not found" }, err.body)
      local forged = orig.request_id:sub(1, -2) .. (orig.request_id:sub(-1) == "0" and "1" or "0")
      _, err = test:recover{ employee = EMP, initial_feedback_request_id = forged }
      assert.same({ error = "Feedback request not found" }, err.body)
      -- upper case is the same id
      assert(test:recover{ employee = EMP, initial_feedback_request_id = orig.request_id:upper() })
    end)

    it("keep working once the original has left the status log", function()
      local orig = assert(prod:send(req{ ext_interaction_id = "old-1" }))
      for _ = 1, 60 do assert(prod:send(req())) end        -- log_limit is 50
      local r = assert(prod:recover{ employee = EMP, initial_feedback_request_id = orig.request_id })
      assert.matches(UUID4, r.request_id)
      assert(prod:recover{ employee = EMP, ext_interaction_id = "old-1" })
    end)

    it("check the employee like requests do", function()
      local orig = assert(test:send(req()))
      local _, err = test:recover{ employee = { email = "gone@spec.example.com" },
                                   initial_feedback_request_id = orig.request_id }
      assert.same({ error = "Deactivated employee" }, err.body)
    end)
  end)

  describe("status.json", function()
    it("counts requests and errors per hour and raises the alert above 5%", function()
      for _ = 1, 20 do assert(test:send(req())) end
      assert(prod:send(req()))
      assert.is_nil(test:send(req{ channel = "sms" }))
      local s = status_json(sb)
      assert.same({ total = 22, invalid = 1, test = 20, delivered = 1, auth_failures = 0 }, s.counts)
      assert.equal(22, s.last_hour.total)
      assert.equal(1, s.last_hour.errors)
      assert.near(1 / 22, s.last_hour.rate, 1e-9)
      assert.is_false(s.alert.active)            -- 4.5%: not more than 5%
      assert.equal(1, #s.hours)
      assert.equal(22, s.hours[1].total)
      assert.equal(0.05, s.threshold)

      assert.is_nil(test:send(req{ brand = "retired" }))
      s = status_json(sb)
      assert.near(2 / 23, s.last_hour.rate, 1e-9)  -- 8.7%
      assert.is_true(s.alert.active)
      assert.matches("2 of 23", s.alert.message)
      assert.matches(TEST_EMAIL, s.alert.message, 1, true)
      assert.is_true(s.hours[1].over)

      -- an hour later the window is empty again; the hour stays in the table
      control(sb, "clock", '{"advance": 3660}')
      assert(test:send(req()))
      s = status_json(sb)
      assert.equal(1, s.last_hour.total)
      assert.equal(0, s.last_hour.errors)
      assert.is_false(s.alert.active)
      assert.equal(2, #s.hours)
      assert.equal(1, s.hours[1].total)
      assert.equal(23, s.hours[2].total)
    end)

    it("keeps the newest log_limit rows per tab, newest first, and every count", function()
      for i = 1, 60 do assert(test:send(req{ ext_interaction_id = "n" .. i })) end
      local s = status_json(sb)
      assert.equal(60, s.counts.test)
      assert.equal(50, #s.test)
      assert.equal("n60", s.test[1].request.ext_interaction_id)
      assert.equal("n11", s.test[50].request.ext_interaction_id)
      local _, limited = request(sb.url .. "/status.json?limit=5", "GET")
      assert.equal(5, #limited.test)
    end)
  end)

  describe("a single-brand company with one language", function()
    local solo, c

    setup(function()
      solo = assert(sandbox.start{ port = 0, config = companies.single_brand() })
      c = client(solo)
    end)

    teardown(function()
      if c then c:close() end
      if solo then solo:stop() end
    end)

    it("needs neither brand nor language, but refuses an unknown brand", function()
      local t = req{ brand = "nil", language = "nil" }
      assert.equal("test_inbox", assert(c:send(t)).body.delivery)
      -- the one brand named or not is the same suppression scope
      assert.equal("suppressed", assert(c:send(req{ brand = "solo", customer = t.customer })).body.delivery)
      local _, err = c:send(req{ brand = "main" })
      assert.same({ error = "Invalid/inactive brand signifier" }, err.body)
    end)
  end)

  describe("the stella sandbox command", function()
    it("runs in the foreground until its nginx is stopped through the pid file", function()
      local dir = assert(nginx.temp_dir("stella-sbcli"))
      local config = dir .. "/company.lua"
      local f = assert(io.open(config, "wb"))
      f:write(require("stella.sandbox.config").serialize(companies.single_brand()))
      f:close()
      local cmd = ("exec %s bin/stella sandbox --port 0 --prefix %s --config %s 2>&1")
        :format(LUA, shell_quote(dir .. "/run"), shell_quote(config))
      local p = assert(io.popen(cmd))
      local banner = {}
      for line in p:lines() do
        banner[#banner + 1] = line
        if line:match("^Ctrl%-C") then break end
      end
      local text = table.concat(banner, "\n")
      local url = text:match("on (http://127%.0%.0%.1:%d+)")
      local ok, err = pcall(function()
        assert.truthy(url, text)
        assert.is_nil(text:find(TEST_KEY, 1, true))          -- keys are never printed
        local pid = tonumber(read_file(dir .. "/run/sandbox.pid"))
        assert.truthy(pid)
        local c = stella.new{ api_key = TEST_KEY, base_url = url, retry = { attempts = 1 } }
        assert(c:send(req{ brand = "nil", language = "nil" }))
        c:close()
        os.execute("kill -TERM " .. pid)
      end)
      if not ok then
        local pid = tonumber(read_file(dir .. "/run/sandbox.pid") or "")
        if pid then os.execute("kill -TERM " .. pid) end
      end
      local rest = p:read("*a")
      p:close()
      nginx.remove_dir(dir)
      assert(ok, err)
      assert.matches("POST /v1/requests 200", rest)
      assert.matches("stella sandbox: stopped", rest)
    end)

    it("has help and checks its options", function()
      local p = io.popen(LUA .. " bin/stella sandbox --help; echo @$?")
      local out = p:read("*a")
      p:close()
      assert.matches("usage: stella sandbox", out)
      assert.matches("@0", out)
      p = io.popen(LUA .. " bin/stella sandbox --port x 2>&1; echo @$?")
      out = p:read("*a")
      p:close()
      assert.matches("@2", out)
    end)
  end)

  describe("the status page", function()
    local it_chromium = chromium.available() and it or function(name)
      return pending(name .. " (needs " .. chromium.BINARY .. ")")
    end

    teardown(function()
      assert.same({}, chromium.leftovers())
    end)

    it("is self-contained HTML that names the tabs without JavaScript", function()
      local code, html, headers = request(sb.url .. "/status", "GET")
      assert.equal(200, code)
      assert.matches("text/html", headers["content-type"])
      assert.matches("default-src 'none'", headers["content-security-policy"], 1, true)
      assert.is_nil(html:find("<link", 1, true))
      assert.is_nil(html:find("src=", 1, true))
      assert.matches("Spec &amp; Co &lt;Outfitters&gt;", html, 1, true)
      for _, name in ipairs{ "Invalid Requests", "Test Requests", "Delivered" } do
        assert.truthy(html:find(name, 1, true))
      end
    end)

    it_chromium("shows the tabs with their counts, an invalid request's row and the alert banner", function()
      for _ = 1, 3 do assert(test:send(req())) end
      assert(prod:send(req()))
      assert.is_nil(test:send(req{ employee = { email = "ghost@spec.example.com" }, ext_interaction_id = "TICKET-4711",
                                   customer = { name = "<script>alert(1)</script>", email = "x@example.com" } }))
      local dom = chromium.dump_dom(sb.url .. "/status")
      -- scripts ran: tab switching is on, the first tab is shown, the others hidden
      assert.matches('<html lang="en" class="%s*js"', dom)
      assert.matches('aria%-selected="true"[^>]*>Invalid Requests <span class="count">1</span>', dom)
      assert.matches('>Test Requests <span class="count">3</span>', dom)
      assert.matches('>Delivered <span class="count">1</span>', dom)
      assert.matches('id="panel%-test"[^>]*hidden', dom)
      assert.is_nil(dom:match('id="panel%-invalid"[^>]*hidden'))
      -- the row of the invalid request
      local row = dom:match('<tr class="row%-invalid">(.-)</tr>')
      assert.truthy(row)
      assert.matches("Employee not found", row)
      assert.matches("TICKET%-4711", row)
      assert.matches("ghost@spec.example.com", row)
      assert.matches("&lt;script&gt;alert%(1%)&lt;/script&gt;", row)   -- shown, not run
      -- 1 of 5 errored: the banner
      assert.matches('role="alert"', dom)
      assert.matches("More than 5%% of the last hour's requests errored: 1 of 5", dom)
    end)

    it_chromium("shows no banner while errors stay at or under 5% and opens the tab named in the URL", function()
      for _ = 1, 19 do assert(test:send(req())) end
      assert.is_nil(test:send(req{ language = "nil" }))          -- 1 of 20 = 5%
      local dom = chromium.dump_dom(sb.url .. "/status#test")
      assert.is_nil(dom:find('role="alert"', 1, true))
      assert.is_nil(dom:find("More than 5%", 1, true))
      assert.matches('aria%-selected="true"[^>]*>Test Requests <span class="count">19</span>', dom)
      assert.matches('id="panel%-invalid"[^>]*hidden', dom)
      assert.matches("5%.0%%", dom)   -- the error rate is shown
      assert.matches("Language not specified", dom)
    end)
  end)
end)
