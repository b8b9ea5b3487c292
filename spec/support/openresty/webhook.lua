-- The webhook of examples/openresty/ for the specs and benchmarks that run it as an
-- operator does: its shipped nginx.conf in a real nginx (support.openresty.harness) in
-- front of a loopback API, and the few ways they talk to it over 127.0.0.1. Runs under
-- Lua 5.4 and LuaJIT; needs luasocket and cjson. What it asserts (marked below) it
-- asserts with luassert, as busted does: a failure fails the calling test.
--
--   local webhook = require "support.openresty.webhook"
--   local n = webhook.start{
--     key = "...", base_url = api.url,      -- STELLA_TEST_KEY, STELLA_BASE_URL (STELLA_MODE=test)
--     workers = 2,                          -- worker_processes N instead of auto (optional)
--     edit = { [old] = new }, env = {...},  -- more edits of nginx.conf, more environment
--     prefix = dir, http = "server {...}",  -- as harness.start; ports (default { "PORT" })
--     probe = "/events/status",             -- the path that says it is up (/events/health)
--   }
--   local nodes = webhook.nodes()         the nginx a spec starts, kept so that its teardown
--                                         stops what a failed test left running:
--                                         nodes:start(opts) (as webhook.start), nodes:stop(n),
--                                         nodes:stop_all()
--   webhook.http(port, method, path [, body [, timeout]]) -> status, body, headers
--   webhook.wait_for(timeout, pred)       pred's first true value, or nil after timeout s
--   webhook.events(first [, letter])      an event maker: a fresh id and customer per call
--   webhook.post_all(posts)               { { port =, event = }, ... } one connection each,
--                                         all sent before any answer is read -> statuses
--   webhook.burst(port, events)           post_all to one port -> { [id] = status }
--   webhook.burst_accepted(port, event, count)  `count` new events (event()) in a burst,
--                                         each answered 202 (asserted) -> { [id] = true }
--   webhook.post_until_full(port, event, count, words)  `count` new events one at a time;
--       each answered 202 or 503 with Retry-After: 30 and an error naming `words`
--       (asserted) -> accepted, refused ({ [id] = true } each), how many were accepted
--   webhook.post_reloading(n, event, count, at)  `count` new events one at a time, nginx
--       n reloaded (SIGHUP) before the at-th -> accepted ({ [id] = true }), refused
--       ({ [id] = "STATUS BODY" })
--   webhook.received_count(api, accepted)  how many ids of `accepted` reached the API
--   webhook.quit(n)                       nginx -s quit, waited for (asserted) -> its error log
--   webhook.pool_used(api, size)          the API held at most `size` requests at once, and
--                                         `size` at some moment (asserted): the consumer pool
--   webhook.all_sent_once(api, accepted, refused, timeout [, log])
--       waits until every id in `accepted` reached the API (support.openresty.slow_api),
--       then checks each did exactly once and no id in `refused` did; log() adds to the
--       message when some never arrived
local harness = require "support.openresty.harness"
local socket = require "socket"
local cjson = require "cjson"
local luassert = require "luassert"

local M = {}

function M.start(o)
  local edit = {}
  for k, v in pairs(o.edit or {}) do edit[k] = v end
  if o.workers then edit["worker_processes auto;"] = "worker_processes " .. o.workers .. ";" end
  local env = { STELLA_TEST_KEY = o.key, STELLA_BASE_URL = o.base_url, STELLA_MODE = "test" }
  for k, v in pairs(o.env or {}) do env[k] = v end
  local root = harness.ROOT
  return harness.start{
    template = root .. "/examples/openresty/nginx.conf",
    vars = {
      STELLA_ROOT = root, EXAMPLE_DIR = root .. "/examples/openresty",
      CA_FILE = "/etc/ssl/certs/ca-certificates.crt", RESOLVER = "127.0.0.1",
      NDK_MODULE = harness.find_module("ndk_http_module.so"),
      LUA_MODULE = harness.find_module("ngx_http_lua_module.so"),
    },
    ports = o.ports or { "PORT" }, edit = edit, prefix = o.prefix, http = o.http, env = env,
    probe = { port = "PORT", path = o.probe or "/events/health" },
  }
end

local Nodes = {}
Nodes.__index = Nodes

function M.nodes()
  return setmetatable({ running = {} }, Nodes)
end

function Nodes:start(o)
  local n = M.start(o)
  self.running[n] = true
  return n
end

function Nodes:stop(n)
  n:stop()
  self.running[n] = nil
end

function Nodes:stop_all()
  for n in pairs(self.running) do self:stop(n) end
end

-- One HTTP/1.0 exchange: status, body, headers (lower-case names).
function M.http(port, method, path, body, timeout)
  local c = socket.tcp()
  c:settimeout(timeout or 20)
  assert(c:connect("127.0.0.1", port))
  local head = method .. " " .. path .. " HTTP/1.0\r\nHost: 127.0.0.1\r\n"
  if body then
    head = head .. "Content-Type: application/json\r\nContent-Length: " .. #body .. "\r\n"
  end
  assert(c:send(head .. "\r\n" .. (body or "")))
  local answer, err, partial = c:receive("*a")
  c:close()
  answer = answer or partial
  assert(answer and answer ~= "", "no answer: " .. tostring(err))
  local headers = {}
  for name, value in (answer:match("^(.-)\r\n\r\n") or ""):gmatch("\n([^:\r\n]+):%s*([^\r\n]*)") do
    headers[name:lower()] = value
  end
  return tonumber(answer:match("^HTTP/1%.%d (%d%d%d)")), answer:match("\r\n\r\n(.*)$"), headers
end

function M.wait_for(timeout, pred)
  local deadline = socket.gettime() + timeout
  while true do
    local v = pred()
    if v then return v end
    if socket.gettime() > deadline then return nil end
    socket.sleep(0.05)
  end
end

-- A function returning a new helpdesk event each call: ids first+1, first+2, ...; the
-- customer's address LETTER..ID@example.com (letter "c" by default).
function M.events(first, letter)
  local seq = first
  letter = letter or "c"
  return function()
    seq = seq + 1
    return {
      id = seq, status = "solved", channel = "chat",
      requester = { name = "Customer " .. seq, email = ("%s%d@example.com"):format(letter, seq) },
      assignee = { name = "Paul Agent", email = "paulagent@blancapeak.com" },
      tags = { "billing" }, locale = "en-US",
    }
  end
end

function M.post_all(posts)
  local conns = {}
  for i, p in ipairs(posts) do
    local body = cjson.encode(p.event)
    local c = socket.tcp()
    c:settimeout(20)
    assert(c:connect("127.0.0.1", p.port))
    assert(c:send("POST /events HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
      .. "Content-Length: " .. #body .. "\r\n\r\n" .. body))
    conns[i] = c
  end
  local status = {}
  for i, c in ipairs(conns) do
    local answer = assert(c:receive("*a"))
    c:close()
    status[i] = tonumber(answer:match("^HTTP/1%.%d (%d%d%d)"))
  end
  return status
end

function M.burst(port, events)
  local posts = {}
  for i, e in ipairs(events) do posts[i] = { port = port, event = e } end
  local by_id = {}
  for i, s in ipairs(M.post_all(posts)) do by_id[events[i].id] = s end
  return by_id
end

function M.burst_accepted(port, event, count)
  local events = {}
  for i = 1, count do events[i] = event() end
  local accepted = {}
  for id, s in pairs(M.burst(port, events)) do
    luassert.equal(202, s)
    accepted[id] = true
  end
  return accepted
end

function M.post_until_full(port, event, count, words)
  local accepted, refused, n = {}, {}, 0
  for _ = 1, count do
    local e = event()
    local code, body, headers = M.http(port, "POST", "/events", cjson.encode(e))
    if code == 202 then
      accepted[e.id] = true
      n = n + 1
    else
      luassert.equal(503, code, body)
      luassert.equal("30", headers["retry-after"])
      luassert.truthy(cjson.decode(body).error:find(words, 1, true), body)
      refused[e.id] = true
    end
  end
  return accepted, refused, n
end

function M.post_reloading(n, event, count, at)
  local accepted, refused = {}, {}
  for i = 1, count do
    if i == at then harness.run("kill -HUP " .. n.pid) end
    local e = event()
    local code, body = M.http(n.ports.PORT, "POST", "/events", cjson.encode(e))
    if code == 202 then accepted[e.id] = true else refused[e.id] = tostring(code) .. " " .. tostring(body) end
  end
  return accepted, refused
end

function M.received_count(api, accepted)
  local got, k = api:received(), 0
  for id in pairs(accepted) do if got[tostring(id)] then k = k + 1 end end
  return k
end

function M.quit(n)
  harness.run("kill -QUIT " .. n.pid)
  luassert.truthy(M.wait_for(10, function() return not harness.alive(n.pid) end), "nginx did not quit")
  return harness.read_file(n.prefix .. "/error.log")
end

function M.pool_used(api, size)
  local _, _, most = api:received()
  luassert.is_true(most <= size, "the API held " .. most .. " requests at once: more than the pool")
  luassert.equal(size, most)   -- and the pool was used
end

function M.all_sent_once(api, accepted, refused, timeout, log)
  local want = 0
  for _ in pairs(accepted) do want = want + 1 end
  local got
  local done = M.wait_for(timeout, function()
    got = api:received()
    local have = 0
    for id in pairs(accepted) do if got[tostring(id)] then have = have + 1 end end
    return have == want
  end)
  local missing = {}
  for id in pairs(accepted) do
    if not got[tostring(id)] then missing[#missing + 1] = tostring(id) end
  end
  luassert.truthy(done, #missing .. " accepted event(s) never reached the API: "
    .. table.concat(missing, ",") .. "\n" .. (log and log() or ""))
  for id in pairs(accepted) do luassert.equal(1, got[tostring(id)], "event " .. id .. " sent twice") end
  for id in pairs(refused or {}) do luassert.is_nil(got[tostring(id)], "refused event " .. id .. " was sent") end
end

return M
