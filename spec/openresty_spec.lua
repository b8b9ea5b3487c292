-- Specs for stella on OpenResty: the webhook of examples/openresty/ running in a real nginx
-- (LuaJIT, build/luajit/stella/core.so) in front of the fault-injecting test server, the
-- cosocket transport run inside that nginx on the same scripted answers as the libcurl
-- transport run here, and stella.store.shdict against the memory store.
local stella = require "stella"
local testserver = require "support.testserver"
local harness = require "support.openresty.harness"
local C = require "support.openresty.cases"
local store = require "stella.store"
local socket = require "socket"
local cjson = require "cjson"

local ROOT, SUPPORT = harness.ROOT, harness.SUPPORT
local LUA = os.getenv("STELLA_TEST_LUA") or (rawget(_G, "jit") and "luajit" or "lua5.4")
local DELAY = 2   -- seconds the fake API waits before answering, in the non-blocking spec

local function json_copy(v) return cjson.decode(cjson.encode(v)) end

local function urlencode(s)
  return (tostring(s):gsub("[^%w%-_%.~]", function(c) return ("%%%02X"):format(c:byte()) end))
end

-- One HTTP/1.1 exchange over a fresh connection: status, body, seconds taken (from
-- before connecting to the last byte of the answer).
local function http(port, method, path, body, headers, timeout)
  local c = socket.tcp()
  c:settimeout(timeout or 20)
  local t0 = socket.gettime()
  assert(c:connect("127.0.0.1", port))
  local lines = { method .. " " .. path .. " HTTP/1.0", "Host: 127.0.0.1" }   -- 1.0: no chunked answers
  for k, v in pairs(headers or {}) do lines[#lines + 1] = k .. ": " .. v end
  if body then
    lines[#lines + 1] = "Content-Type: application/json"
    lines[#lines + 1] = "Content-Length: " .. #body
  end
  assert(c:send(table.concat(lines, "\r\n") .. "\r\n\r\n" .. (body or "")))
  local answer, err, partial = c:receive("*a")
  local elapsed = socket.gettime() - t0
  c:close()
  answer = answer or partial
  assert(answer and answer ~= "", "no answer: " .. tostring(err))
  local status = tonumber(answer:match("^HTTP/1%.%d (%d%d%d)"))
  return status, answer:match("\r\n\r\n(.*)$"), elapsed
end

local wait_for = require("support.openresty.webhook").wait_for   -- pred's first true value, or nil

describe("stella on OpenResty", function()
  local api, web, certdir

  -- The requests the fake API received for the given interaction ids (or customer e-mail).
  local function api_requests(match)
    local list = {}
    for _, r in ipairs(api:requests()) do
      local body = cjson.decode(r.body)
      if match(body) then list[#list + 1] = r end
    end
    return list
  end

  local function status()
    local code, body = http(web.ports.PORT, "GET", "/events/status")
    assert.equal(200, code)
    return cjson.decode(body)
  end

  local function ledger_total()
    local n = 0
    for _, g in ipairs(status().ledger) do n = n + g.count end
    return n
  end

  local function outcome_of(event_id)
    for _, e in ipairs(status().recent) do
      if e.event_id == tostring(event_id) then return e end
    end
  end

  local seq = 0
  local function event(fields)
    seq = seq + 1
    local e = {
      id = 48000 + seq, status = "solved", channel = "chat",
      requester = { name = "Customer " .. seq, email = ("customer%d@example.com"):format(seq) },
      assignee = { name = "Paul Agent", email = "paulagent@blancapeak.com" },
      tags = { "billing" }, locale = "en-US",
    }
    for k, v in pairs(fields or {}) do e[k] = v end
    return e
  end

  local function post(value)
    return http(web.ports.PORT, "POST", "/events", type(value) == "string" and value or cjson.encode(value))
  end

  lazy_setup(function()
    if not harness.read_file(ROOT .. "/build/luajit/stella/core.so") then
      harness.run("cd " .. harness.shell_quote(ROOT) .. " && make LUA=luajit module")
    end
    assert(harness.read_file(ROOT .. "/build/luajit/stella/core.so"),
      "build/luajit/stella/core.so is missing: run make LUA=luajit")

    local code, out = harness.run("mktemp -d \"${TMPDIR:-/tmp}/stella-certs-XXXXXX\"")
    assert(code == 0, out)
    certdir = out:gsub("%s+$", "")
    code, out = harness.run("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
      .. " -days 2 -subj /CN=localhost -addext subjectAltName=DNS:localhost"
      .. " -keyout " .. certdir .. "/key.pem -out " .. certdir .. "/cert.pem")
    assert(code == 0, "openssl: " .. out)

    api = testserver.start()
    web = harness.start{
      template = ROOT .. "/examples/openresty/nginx.conf",
      vars = {
        STELLA_ROOT = ROOT, EXAMPLE_DIR = ROOT .. "/examples/openresty", SUPPORT = SUPPORT,
        CA_FILE = certdir .. "/cert.pem", CERT = certdir .. "/cert.pem", KEY = certdir .. "/key.pem",
        RESOLVER = "127.0.0.1", API_URL = api.url,
        NDK_MODULE = harness.find_module("ndk_http_module.so"),
        LUA_MODULE = harness.find_module("ngx_http_lua_module.so"),
      },
      ports = { "PORT", "SELFTEST_PORT", "TLS_PORT" },
      http = [[
    # added by spec/openresty_spec.lua: the cosocket self-test, and TLS in front of the fake API
    server {
        listen 127.0.0.1:@SELFTEST_PORT@;
        location = /selftest { content_by_lua_file @SUPPORT@/selftest.lua; }
    }
    server {
        listen 127.0.0.1:@TLS_PORT@ ssl;
        server_name localhost;
        ssl_certificate     @CERT@;
        ssl_certificate_key @KEY@;
        location / {
            proxy_pass @API_URL@;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
]],
      env = { STELLA_TEST_KEY = C.TEST_KEY, STELLA_BASE_URL = api.url, STELLA_MODE = "test" },
      probe = { port = "SELFTEST_PORT", path = "/selftest?case=ping" },
    }
  end)

  lazy_teardown(function()
    local pids = web and web:pids() or {}
    if api and api.pid then pids[#pids + 1] = api.pid end
    if web then web:stop() end
    if api then api:stop() end
    if certdir then harness.run("rm -rf " .. harness.shell_quote(certdir)) end
    for _, pid in ipairs(pids) do
      assert.is_false(harness.alive(pid), "nginx process " .. pid .. " is still running")
    end
  end)

  before_each(function() api:reset() end)

  ---------------------------------------------------------------------------------------
  describe("the webhook example", function()
    it("answers 202 at once and the request reaches the API", function()
      local e = event{ url = "https://support.example.com/tickets/1" }
      local code, body, elapsed = post(e)
      assert.equal(202, code, body)
      assert.same({ accepted = 1 }, cjson.decode(body))
      assert.is_true(elapsed < 1, "answered in " .. elapsed .. " s")
      local reqs = wait_for(5, function()
        local l = api_requests(function(b) return b.ext_interaction_id == tostring(e.id) end)
        return #l > 0 and l
      end)
      assert.truthy(reqs, "the request did not reach the API\n" .. web:error_log())
      assert.equal(1, #reqs)
      local r = reqs[1]
      assert.equal("POST", r.method)
      assert.equal("/v1/requests", r.path)
      assert.equal(C.TEST_KEY, r.headers["x-api-key"])
      assert.equal("lua-stella/" .. stella.version, r.headers["user-agent"])
      assert.equal('{"customer":{"name":"' .. e.requester.name .. '","email":"' .. e.requester.email .. '"},'
        .. '"employee":{"email":"paulagent@blancapeak.com"},"channel":"chat","ext_interaction_id":"'
        .. e.id .. '","external_url":"https://support.example.com/tickets/1","tags":["billing","webhook"],'
        .. '"brand":"blancapeak","language":"en-US"}', r.body)
      local o = wait_for(5, function() return outcome_of(e.id) end)
      assert.equal("sent", o.status)
      assert.truthy(o.request_id:match("^req%-%d+$"))
      assert.is_nil(o.customer, "no address in the ledger")
      assert.equal(64, #o.customer_hash)
    end)

    it("answers every call well before a slow API (" .. DELAY .. " s) does: the worker never blocks", function()
      local items = {}
      for i = 1, 10 do items[i] = { delay = DELAY } end
      api:script(items)
      local before = ledger_total()
      local ids = {}
      for i = 1, 10 do
        local e = event()
        ids[tostring(e.id)] = true
        local code, body, elapsed = post(e)
        assert.equal(202, code, body)
        assert.is_true(elapsed < DELAY, ("call %d answered after %.3f s, not before the API's %d s delay")
          :format(i, elapsed, DELAY))
      end
      -- all ten reached the API while it was still sleeping on the first
      local reqs = wait_for(DELAY + 3, function()
        local l = api_requests(function(b) return ids[b.ext_interaction_id] end)
        return #l == 10 and l
      end)
      assert.truthy(reqs, "the API did not get the 10 requests\n" .. web:error_log())
      local first, last = math.huge, 0
      for _, r in ipairs(reqs) do first, last = math.min(first, r.time), math.max(last, r.time) end
      assert.is_true(last - first < DELAY, "sends were serialised: " .. (last - first) .. " s apart")
      assert.truthy(wait_for(DELAY + 5, function() return ledger_total() >= before + 10 end),
        "the timers did not finish\n" .. web:error_log())
    end)

    it("suppresses a second request to the same customer (shared dict store)", function()
      local a = event()
      local b = event{ requester = a.requester }
      assert.equal(202, (post(a)))
      assert.truthy(wait_for(5, function() return outcome_of(a.id) end))
      assert.equal(202, (post(b)))
      local o = wait_for(5, function() return outcome_of(b.id) end)
      assert.truthy(o, web:error_log())
      assert.equal("suppressed", o.status)
      local reqs = api_requests(function(x) return x.customer.email == a.requester.email end)
      assert.equal(1, #reqs)
      assert.equal(tostring(a.id), cjson.decode(reqs[1].body).ext_interaction_id)
    end)

    it("sends once for concurrent events of one customer, whichever worker takes them", function()
      local who = event().requester
      local before = ledger_total()
      local conns = {}
      for i = 1, 12 do
        local body = cjson.encode(event{ requester = who })
        local c = socket.tcp()
        c:settimeout(10)
        assert(c:connect("127.0.0.1", web.ports.PORT))
        c:send("POST /events HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
          .. "Content-Length: " .. #body .. "\r\n\r\n" .. body)
        conns[i] = c
      end
      local ids = {}
      for i, c in ipairs(conns) do
        local answer = c:receive("*a")
        c:close()
        assert.truthy(answer:match("^HTTP/1%.1 202"), answer)
        ids[i] = tostring(48000 + seq - 12 + i)
      end
      -- Each event ends in the ledger, sent or suppressed. When two workers reserve the
      -- same mark at once, the loser's transaction is rolled back and its batch decided
      -- again, seeing the winner's mark: suppressed, never failed, never sent twice.
      local function conflicts()
        local n, log = 0, web:error_log()
        for _, id in ipairs(ids) do
          if log:find("event " .. id .. ": failed (store_error)", 1, true) then n = n + 1 end
        end
        return n
      end
      assert.truthy(wait_for(8, function() return ledger_total() - before >= 12 end), web:error_log())
      assert.equal(0, conflicts())
      local reqs = api_requests(function(x) return x.customer.email == who.email end)
      assert.equal(1, #reqs)
    end)

    it("keeps an event the API keeps failing in the shared outbox, for the flush timer", function()
      api:script{ { status = 503 }, { status = 503 }, { status = 503 } }
      local queued = status().outbox.queued
      local e = event()
      assert.equal(202, (post(e)))
      local o = wait_for(8, function()
        local x = outcome_of(e.id)
        return x and x.status ~= nil and x
      end)
      assert.truthy(o, web:error_log())
      assert.equal("queued", o.status)
      assert.equal("server", o.reason)
      assert.equal(3, #api_requests(function(b) return b.ext_interaction_id == tostring(e.id) end))
      assert.equal(queued + 1, status().outbox.queued)
    end)

    it("sends a batch (a JSON array) and refuses what is not an event", function()
      local a, b = event(), event{ status = "open" }
      local code, body = post{ a, b }
      assert.equal(202, code)
      assert.same({ accepted = 2 }, cjson.decode(body))
      assert.truthy(wait_for(5, function()
        local oa, ob = outcome_of(a.id), outcome_of(b.id)
        return oa and ob and oa.status == "sent" and ob.status == "skipped"
      end), web:error_log())
      for _, bad in ipairs{ "not json", "", "  ", '"text"', "[1, 2]", "[]", "[{}]", '[{"id":1}, 2]',
                            '[{"id":1}', "{}", " {\n } ", '{"id": 1', '"id": 1}' } do
        local code, answer = post(bad)
        assert.equal(400, code, bad)
        assert.truthy(cjson.decode(answer).error, answer)
      end
      assert.equal(405, (http(web.ports.PORT, "GET", "/events")))
      assert.equal(404, (http(web.ports.PORT, "GET", "/elsewhere")))
    end)

    it("takes one event unread: one whose braces hold no JSON is ledgered invalid, malformed_input", function()
      local before = status().ledger
      local code, body = post('{"id": 48999, "note": "broken-body-marker", oops}')
      assert.equal(202, code, body)
      local entry = wait_for(5, function()
        for _, e in ipairs(status().recent) do
          if tostring(e.detail):find("broken-body-marker", 1, true) then return e end
        end
      end)
      assert.truthy(entry, web:error_log())
      assert.equal("invalid", entry.status)
      assert.equal("malformed_input", entry.reason)
      assert.truthy(entry.detail:find("not a JSON object", 1, true), entry.detail)
      local function invalid(ledger)
        for _, g in ipairs(ledger) do
          if g.status == "invalid" and g.reason == "malformed_input" then return g.count end
        end
        return 0
      end
      assert.equal(invalid(before) + 1, invalid(status().ledger))
      assert.truthy(web:error_log():find("invalid (malformed_input)", 1, true))
    end)
  end)

  ---------------------------------------------------------------------------------------
  describe("the cosocket transport inside nginx, against libcurl here", function()
    local runs = 0

    local function inside(name, params)
      runs = runs + 1
      local q = { "case=" .. urlencode(name), "pool=" .. urlencode("selftest-" .. runs) }
      for k, v in pairs(params or {}) do q[#q + 1] = k .. "=" .. urlencode(v) end
      local code, body = http(web.ports.SELFTEST_PORT, "GET", "/selftest?" .. table.concat(q, "&"))
      assert.equal(200, code, body)
      local v = cjson.decode(body)
      assert.is_true(v.ok, v.error)
      return v.result
    end

    local function outside(name, params)
      params = params or {}
      return json_copy(C.cases[name].run{
        stella = stella, base_url = params.base_url, params = params, clock = socket.gettime,
        ca_file = params.ca_file,
      })
    end

    -- Runs a case both ways on the same scripted answers. -> inside, outside, and the
    -- requests the API recorded for each.
    local function both(name, params)
      params = params or {}
      params.base_url = params.base_url or api.url
      local case = C.cases[name]
      api:reset()
      if case.script then api:script(case.script(params)) end
      local a = inside(name, params)
      local ra = api:requests()
      api:reset()
      if case.script then api:script(case.script(params)) end
      local b = outside(name, params)
      local rb = api:requests()
      return a, b, ra, rb
    end

    it("puts the same request on the wire", function()
      local a, b, ra, rb = both("wire")
      assert.same(b, a)
      assert.is_true(a.ok)
      assert.equal(1, #ra)
      assert.equal(1, #rb)
      local names = {}
      for k in pairs(ra[1].headers) do names[#names + 1] = k end
      table.sort(names)
      assert.same({ "accept", "content-length", "content-type", "host", "user-agent", "x-api-key" }, names)
      assert.same(rb[1].headers, ra[1].headers)
      assert.equal("127.0.0.1:" .. api.port, ra[1].headers.host)
      assert.equal(rb[1].body, ra[1].body)
      assert.equal(stella.encode(C.request()), ra[1].body)
      assert.equal(rb[1].method, ra[1].method)
      assert.equal(rb[1].path, ra[1].path)
    end)

    it("sends the production key, a custom user agent, and recoveries", function()
      local a, b, ra, rb = both("production_agent")
      assert.same(b, a)
      assert.equal(C.PROD_KEY, ra[1].headers["x-api-key"])
      assert.equal("helpdesk-bridge/2", ra[1].headers["user-agent"])
      assert.same(rb[1].headers, ra[1].headers)
      a, b, ra, rb = both("recover")
      assert.same(b, a)
      assert.equal("/v1/recoveries", ra[1].path)
      assert.equal(rb[1].body, ra[1].body)
    end)

    it("reads request ids, echoes and text bodies alike", function()
      local a, b = both("response_ids")
      assert.same(b, a)
      assert.equal("42", a[1].request_id)
      assert.equal("OK", a[3].body)
    end)

    it("never sends an invalid request", function()
      local a, b, ra = both("invalid")
      assert.same(b, a)
      assert.equal(0, #ra)
    end)

    it("keeps one connection for several sends", function()
      local a, b, ra, rb = both("keepalive")
      assert.same(b, a)
      assert.equal(1, a.connects)
      assert.equal(5, #ra)
      for i = 2, 5 do assert.equal(ra[1].connection, ra[i].connection) end
      for i = 2, 5 do assert.equal(rb[1].connection, rb[i].connection) end
      assert.equal(5, ra[5].connection_requests)
    end)

    it("reconnects after the server closes the connection", function()
      local a, b, ra = both("reconnect")
      assert.same(b, a)
      assert.equal(2, a.connects)
      assert.are_not.equal(ra[1].connection, ra[2].connection)
    end)

    for _, status in ipairs{ 400, 401, 403, 404, 408, 429, 500, 503 } do
      it("gives HTTP " .. status .. " the same error kind, message and retryability", function()
        local a, b = both("status_" .. status)
        assert.same(b, a)
        assert.is_false(a.ok)
        assert.equal(status, a.status)
        assert.is_false(a.leaked)
      end)
    end

    it("keeps the text of a 400, names the production key on 403, redacts an echoed key", function()
      for _, name in ipairs{ "text_400", "auth_production", "redacted" } do
        local a, b = both(name)
        assert.same(b, a)
        assert.is_false(a.leaked)
      end
    end)

    it("times out alike", function()
      local a, b = both("timeout")
      assert.same(b, a)
      assert.equal("timeout", a.kind)
      assert.is_true(a.retryable)
      assert.is_true(a.quick)
    end)

    it("reports a dropped and a refused connection as network errors", function()
      local a, b = both("drop")
      assert.same(b, a)
      assert.equal("network", a.kind)
      a, b = both("refused")
      assert.same(b, a)
      assert.equal("network", a.kind)
      assert.equal(2, a.attempts)
    end)

    it("retries alike, with the same backoff", function()
      for _, name in ipairs{ "retries", "give_up", "retry_failures" } do
        local a, b = both(name)
        assert.same(b, a)
      end
    end)

    it("honours Retry-After in seconds and as an HTTP-date", function()
      local a, b = both("retry_after")
      assert.same(b, a)
      assert.same({ 2, 10 }, a.sleeps)
      a, b = both("retry_after_date", { date = os.date("!%a, %d %b %Y %H:%M:%S GMT", os.time() + 4) })
      assert.same(b, a)
      assert.same({ true }, a.sleeps)
    end)

    it("accepts and refuses the same options with the same words, never showing the key", function()
      local a, b = both("refusals")
      for name in pairs(C.OPTIONS) do
        assert.same(b[name], a[name], name .. ": libcurl " .. cjson.encode(b[name]) .. ", cosocket "
          .. cjson.encode(a[name]))
      end
      assert.same(b, a)
      for name, r in pairs(a) do
        assert.equal(name:find("_ok$") == nil, r.refused, name)
        assert.is_false(r.leaked, name)
      end
      assert.is_true(a.http_remote.says_https)
      assert.equal("stella.new: base_url must not hold user credentials", a.userinfo.message)
      assert.equal("stella.new: base_url must not have a fragment", a.fragment.message)
      assert.equal("stella.new: api_key must be a non-empty string without whitespace or control characters",
        a.nul_in_key.message)
      assert.equal("stella.new: user_agent must not contain control characters", a.crlf_user_agent.message)
      assert.equal("stella.new: option base_url must be a string", a.number_base_url.message)
    end)

    -- Raw answers from a socket server, each read by both transports.
    local function chunk(data, ext) return ("%x"):format(#data) .. (ext or "") .. "\r\n" .. data .. "\r\n" end
    local ok_body = '{"request_id":"raw-1"}'
    local CANNED = {
      chunked = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        .. chunk('{"request_id"') .. chunk(':"ch-1"}', ";ext=1") .. chunk(string.rep(" ", 300))
        .. "0\r\nX-Trailer: yes\r\n\r\n",
      until_close = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" .. ok_body,
      continue = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
        .. "Content-Length: " .. #ok_body .. "\r\n\r\n" .. ok_body,
      http10 = "HTTP/1.0 200 OK\r\nContent-Length: " .. #ok_body .. "\r\n\r\n" .. ok_body,
      lower_case = "HTTP/1.1 202 Accepted\r\ncontent-type:application/json; charset=utf-8\r\n"
        .. "CONTENT-LENGTH:    " .. #ok_body .. "\r\n\r\n" .. ok_body,
      no_content = "HTTP/1.1 204 No Content\r\n\r\n",
      no_reason = "HTTP/1.1 503\r\nContent-Length: 4\r\n\r\nbusy",
      not_http = "SSH-2.0-OpenSSH_9.2\r\n\r\n",
      truncated = "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" .. ok_body,
      truncated_chunk = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n{\"request_id\"",
      empty = "",
      bad_header = "HTTP/1.1 200 OK\r\nContent-Type application/json\r\nContent-Length: 22\r\n\r\n" .. ok_body,
      bad_chunk = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" .. ok_body .. "\r\n0\r\n\r\n",
      two_lengths = "HTTP/1.1 200 OK\r\nContent-Length: 22\r\nContent-Length: 30\r\n\r\n" .. ok_body,
    }
    local names = {}
    for name in pairs(CANNED) do names[#names + 1] = name end
    table.sort(names)

    for _, name in ipairs(names) do
      it("reads a raw answer alike: " .. name, function()
        local file = os.tmpname()
        harness.write_file(file, CANNED[name])
        local proc = assert(io.popen(LUA .. " " .. SUPPORT .. "/canned.lua " .. file .. " 2"))
        local port = assert(tonumber((proc:read("*l") or ""):match("^ready (%d+)")))
        local url = "http://127.0.0.1:" .. port
        local a = inside("canned", { base_url = url })
        local b = outside("canned", { base_url = url })
        proc:close()
        os.remove(file)
        assert.same(b, a)
      end)
    end

    it("sends again on a fresh connection when the kept-alive one was dropped", function()
      local file = os.tmpname()
      harness.write_file(file, "HTTP/1.1 200 OK\r\nContent-Length: " .. #ok_body .. "\r\n\r\n" .. ok_body)
      local proc = assert(io.popen(LUA .. " " .. SUPPORT .. "/canned.lua " .. file .. " 4 stale"))
      local port = assert(tonumber((proc:read("*l") or ""):match("^ready (%d+)")))
      local url = "http://127.0.0.1:" .. port
      local a = inside("stale", { base_url = url })
      local b = outside("stale", { base_url = url })
      proc:close()
      os.remove(file)
      assert.same(b, a)
      assert.is_true(a.first.ok)
      assert.is_true(a.second.ok)
      assert.equal(1, a.second.attempts)
      assert.equal(2, a.connects)
    end)

    it("is stricter than libcurl about a bad Content-Length", function()
      local file = os.tmpname()
      harness.write_file(file, "HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n" .. ok_body)
      local proc = assert(io.popen(LUA .. " " .. SUPPORT .. "/canned.lua " .. file .. " 2"))
      local port = assert(tonumber((proc:read("*l") or ""):match("^ready (%d+)")))
      local url = "http://127.0.0.1:" .. port
      local a = inside("canned", { base_url = url })
      local b = outside("canned", { base_url = url })
      proc:close()
      os.remove(file)
      assert.equal("protocol", a.kind)   -- the cosocket transport refuses "1x"
      assert.is_false(a.retryable)
      assert.is_true(b.ok)                -- libcurl reads it as 1 and returns "{"
      assert.equal("{", b.body)
    end)

    it("speaks TLS, verifying the certificate, on one connection", function()
      local params = { base_url = "https://localhost:" .. web.ports.TLS_PORT, ca_file = certdir .. "/cert.pem" }
      local a, b, ra, rb = both("tls", params)
      assert.same(b, a)
      assert.is_true(a.first.ok, cjson.encode(a))
      assert.is_true(a.second.ok, cjson.encode(a))
      assert.equal(1, a.connects)
      assert.equal(2, #ra)
      assert.equal(2, #rb)
    end)

    it("refuses a certificate for another name", function()
      local params = { base_url = "https://127.0.0.1:" .. web.ports.TLS_PORT, ca_file = certdir .. "/cert.pem" }
      local a, b, ra = both("canned", params)
      assert.same(b, a)
      assert.equal("network", a.kind)
      assert.is_false(a.retryable)
      assert.equal(0, #ra)
    end)

    it("is what stella.new picks inside nginx, and its retry pause lets the worker run", function()
      api:script{ { status = 503, headers = { ["Retry-After"] = "1" } }, { status = 200 } }
      local r = inside("auto", { base_url = api.url })
      assert.equal("content", r.phase)
      assert.is_true(r.cosocket)
      assert.is_true(r.default_is_cosocket)
      assert.is_true(r.ok, r.err)
      assert.equal(2, r.attempts)
      assert.is_true(r.elapsed >= 0.9, "slept " .. r.elapsed)
      -- a blocking sleep would have stopped the light thread for the whole second
      assert.is_true(r.ticks >= 50, "the light thread ticked " .. r.ticks .. " times")
    end)
  end)

  ---------------------------------------------------------------------------------------
  describe("stella.store.shdict inside nginx", function()
    it("answers every call of the store interface as the memory store does", function()
      local t0 = os.time()
      local code, body = http(web.ports.SELFTEST_PORT, "GET",
        ("/selftest?case=store&t0=%d&prefix=%s"):format(t0, urlencode("spec-store-" .. t0 .. ":")))
      assert.equal(200, code)
      local v = cjson.decode(body)
      assert.is_true(v.ok, v.error)
      local expected = json_copy(C.store_script(assert(store.memory()), t0))
      assert.equal(#expected, #v.result)
      for i, step in ipairs(expected) do
        assert.same(step, v.result[i], "step " .. step[1] .. ": memory " .. cjson.encode(step)
          .. ", shdict " .. cjson.encode(v.result[i]))
      end
    end)

    it("passes the store contract's suite (spec/support/store_contract.lua), every test of it", function()
      local code, body = http(web.ports.SELFTEST_PORT, "GET",
        "/selftest?case=store_contract&prefix=" .. urlencode("spec-contract-" .. os.time() .. ":"))
      assert.equal(200, code)
      local v = cjson.decode(body)
      assert.is_true(v.ok, v.error)
      local contract = require "support.store_contract"
      local names = require("support.mini_suite").names(function(b) contract(b, "shdict", store.memory) end)
      assert.equal(#names, #v.result)
      local failed = {}
      for i, r in ipairs(v.result) do
        assert.equal(names[i], r.name)
        if not r.ok then failed[#failed + 1] = "not ok " .. i .. " - " .. r.name .. "\n# " .. tostring(r.err) end
      end
      assert.equal("", table.concat(failed, "\n"))
    end)

    it("lets only one of two interleaved transactions reserve a mark, rolling the other back", function()
      local code, body = http(web.ports.SELFTEST_PORT, "GET",
        "/selftest?case=store_race&prefix=" .. urlencode("spec-race-" .. os.time() .. ":"))
      assert.equal(200, code)
      local v = cjson.decode(body)
      assert.is_true(v.ok, v.error)
      local r = v.result
      assert.equal(1, r.fast_id)
      assert.is_false(r.slow_id)           -- it took id 2, then lost it
      assert.truthy(r.slow_err:find("taken by another worker", 1, true))
      assert.is_true(r.slow_retryable)
      assert.equal(1, r.owner)
      assert.is_false(r.other_mark)        -- the loser's other mark was rolled back
      assert.same({ queued = 1, dead = 0 }, r.counts)
      assert.is_true(r.old_ok)
      assert.equal(77, r.old[2])
      assert.is_false(r.old2_ok)
      assert.is_nil(r.old2[2])
    end)
  end)

  ---------------------------------------------------------------------------------------
  describe("outside nginx", function()
    it("stella.new keeps libcurl and the blocking sleep", function()
      local client = require "stella.client"
      assert.equal(require("stella.transport.curl").new, client.default_transport())
      local c = stella.new{ api_key = "k", base_url = api.url }
      assert.are_not.equal(require("stella.transport.cosocket").Transport, getmetatable(c.transport))
      assert.truthy(tostring(c.transport):find("stella.http", 1, true))
      c:close()
    end)

    it("the cosocket transport and the shdict store say they need nginx", function()
      local t, err = require("stella.transport.cosocket").new{ api_key = "k", base_url = api.url }
      assert.is_nil(t)
      assert.truthy(err:find("nginx", 1, true))
      assert.has_error(function() require("stella.store.shdict").new("stella") end)
    end)
  end)
end)
