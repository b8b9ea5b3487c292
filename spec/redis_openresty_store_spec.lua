-- Specs for stella.store.redis inside nginx (OpenResty): over cosockets, one store shared
-- by a worker's requests, light threads and timers (a transaction per coroutine, a pooled
-- connection per operation); the store contract's suite run there; a custom rule waiting
-- on Redis leaves no budget hook for the rest of the worker. Against a real redis-server
-- (spec/support/redis.lua); the cases run in spec/support/openresty/redis_store_cases.lua.
local cjson = require "cjson"
local socket = require "socket"
local nginx = require "stella.nginx"
local redis_server = require "support.redis"

local SPEC_DIR = nginx.absolute(debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or ".")
local ROOT = SPEC_DIR:gsub("/spec$", ""):gsub("/%./spec$", "")
local SUPPORT = SPEC_DIR .. "/support/openresty"

local CONFIG = [[
load_module @NDK_MODULE@;
load_module @LUA_MODULE@;
worker_processes 1;
pid @PREFIX@/nginx.pid;
error_log @PREFIX@/error.log notice;
env STELLA_REDIS_URL;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path @PREFIX@/client_body_temp;
    proxy_temp_path       @PREFIX@/proxy_temp;
    fastcgi_temp_path     @PREFIX@/fastcgi_temp;
    uwsgi_temp_path       @PREFIX@/uwsgi_temp;
    scgi_temp_path        @PREFIX@/scgi_temp;
    lua_package_path  "@ROOT@/lua/?.lua;@ROOT@/lua/?/init.lua;;";
    lua_package_cpath "@ROOT@/build/luajit/?.so;;";
    lua_socket_log_errors off;
    server {
        listen 127.0.0.1:@PORT@;
        location = /case { content_by_lua_file @SUPPORT@/redis_store_cases.lua; }
    }
}
]]

local function get(port, path)
  local c = socket.tcp()
  c:settimeout(120)
  local ok, err = c:connect("127.0.0.1", port)
  if not ok then c:close() return nil, err end
  c:send("GET " .. path .. " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
  local data = c:receive("*a") or ""
  c:close()
  return tonumber(data:match("^HTTP/1%.%d (%d%d%d)")), data:match("\r\n\r\n(.*)$")
end

describe("stella.store.redis inside OpenResty", function()
  local srv, web
  local runs = 0

  local function case(name)
    runs = runs + 1
    local code, body = get(web.port, "/case?name=" .. name .. "&prefix=spec" .. runs .. ":")
    assert.equal(200, code, body)
    local v = cjson.decode(body)
    assert(v.ok, v.error)
    return v.result
  end

  lazy_setup(function()
    local root = ROOT
    if not nginx.read_file(root .. "/build/luajit/stella/redis/core.so") then
      nginx.run("cd " .. nginx.shell_quote(root) .. " && make LUA=luajit module")
    end
    srv = redis_server.start{}
    local prefix = assert(nginx.temp_dir("stella-redis-store-nginx"))
    local log
    web, log = nginx.start{
      nginx = assert(nginx.find_nginx()), prefix = prefix, temporary = not os.getenv("STELLA_KEEP_PREFIX"),
      config = CONFIG, ports = { "PORT" },
      vars = { ROOT = ROOT, SUPPORT = SUPPORT,
               NDK_MODULE = assert(nginx.find_module("ndk_http_module.so")),
               LUA_MODULE = assert(nginx.find_module("ngx_http_lua_module.so")) },
      globals = "daemon off; master_process on;" .. (nginx.is_root() and " user root;" or ""),
      env = { STELLA_REDIS_URL = srv:url() },
      ready = function(n) return (get(n.port, "/case?name=none")) == 200 end,
    }
    assert(web, "nginx failed to start: " .. tostring(log))
  end)

  lazy_teardown(function()
    if web then web:stop() end
    if srv then srv:remove() end
  end)

  it("passes the store contract's suite over cosockets, every test of it", function()
    local results = case("contract")
    local contract = require "support.store_contract"
    local names = require("support.mini_suite").names(function(b) contract(b, "redis", function() end) end)
    assert.equal(#names, #results)
    for i, r in ipairs(results) do
      assert.equal(names[i], r.name)
      assert(r.ok, r.name .. ": " .. tostring(r.err))
    end
  end)

  it("serves light threads and timers at once from one store: a transaction each, pooled connections", function()
    local r = case("shared")
    assert.equal(8, r.done)
    local winners = {}
    for k, t in pairs(r.results) do
      assert.same({}, t.errors, "thread " .. k)
      assert.equal(20, t.own, "thread " .. k)
      if t.won then winners[#winners + 1] = t.won
      else assert.is_true(t.taken or t.conflicts == 1, "thread " .. k) end
    end
    assert.equal(1, #winners)              -- the shared mark: one reservation, the others wrote nothing
    assert.equal(winners[1], r.owner)
    assert.equal(8 * 20 + 1, r.counts.queued)
    assert.is_true(r.salt_same)
    -- pooled: a connection is taken per operation, not opened per operation
    assert.is_true(r.commands >= r.ops, r.commands .. " commands")
    assert.is_true(r.connections <= 8 + 2, r.connections .. " connections for " .. r.commands .. " commands")
    assert.is_true(r.clients <= 8 + 2, r.clients .. " clients connected")
  end)

  it("runs another request's rules unhindered while a custom rule waits on Redis", function()
    local r = case("budget")
    assert.equal("skipped", r.status, tostring(r.detail))
    assert.equal("chain_of_20", r.reason)
    assert.is_true(r.turns_in_rule >= 3, r.turns_in_rule .. " turns")   -- ran while the rule waited
    assert.equal(0, r.hooked)
    assert.same({}, r.failed)
    assert.is_false(r.hook_after)
  end)

  it("logged no Lua error", function()
    assert.is_nil(web:error_log():find("[error]", 1, true), web:error_log())
  end)
end)

-- examples/openresty/ as two nodes would run it: two nginx (2 workers each) on one Redis
-- (one pointed at it by configure{ store = ... }, the other by $STELLA_DB), in front of one
-- slow loopback API that counts what it received. The same customers' events reach both
-- at once, some of them twice (a helpdesk retrying on the other node).
describe("the OpenResty webhook on Redis, two nginx", function()
  local harness = require "support.openresty.harness"
  local slow_api = require "support.openresty.slow_api"
  local webhook_nginx = require "support.openresty.webhook"
  local store = require "stella.store"
  local redis = require "stella.redis"
  local KEY = "test-key-webhook-redis-0123456789"
  local srv, api
  local nodes = webhook_nginx.nodes()

  lazy_setup(function()
    srv = redis_server.start{}
    api = slow_api.start{ delay = 0.2 }
  end)

  lazy_teardown(function()
    nodes:stop_all()
    if api then api:stop() end
    if srv then srv:remove() end
  end)

  local function webhook(edit, env)
    return nodes:start{ key = KEY, base_url = api.url, workers = 2, edit = edit, env = env }
  end

  it("suppresses each customer across both, sends each interaction once, and pools its connections", function()
    local admin = assert(redis.connect(srv:url()))
    local a = webhook({ ['-- store = "redis://127.0.0.1:6379/0",'] = 'store = "' .. srv:url() .. '",' }, {})
    local b = webhook({}, { STELLA_DB = srv:url() })
    local function stats()
      local t = {}
      for k, v in admin:call("INFO", "stats"):gmatch("([%w_]+):(%d+)") do t[k] = tonumber(v) end
      return t
    end
    local before = stats()
    -- 8 customers, 5 tickets each; every event to one node, every third also to the other
    local posts, times, base = {}, {}, os.time() % 100000 * 1000
    for c = 1, 8 do
      for t = 1, 5 do
        local id = base + c * 10 + t
        local e = { id = id, status = "solved", channel = "chat",
                    requester = { name = "Customer " .. c, email = ("cust%d-%d@example.com"):format(c, base) },
                    assignee = { name = "Paul Agent", email = "paulagent@blancapeak.com" }, locale = "en-US" }
        local first = (c + t) % 2 == 0 and a or b
        posts[#posts + 1] = { port = first.ports.PORT, event = e }
        times[tostring(id)] = 1
        if t % 3 == 0 then
          posts[#posts + 1] = { port = (first == a and b or a).ports.PORT, event = e }
          times[tostring(id)] = 2
        end
      end
    end
    -- each post on a connection of its own to its node, all sent before any answer is read
    for i, s in ipairs(webhook_nginx.post_all(posts)) do assert.equal(202, s, "post " .. i) end
    -- every post decided: the one ledger (in Redis) has an entry for each
    local s = assert(store.redis(srv:url()))
    local entries
    local done = harness.wait_until(30, function()
      entries = assert(s:ledger{ limit = 1000 })
      return #entries >= #posts
    end)
    assert.truthy(done, #entries .. " of " .. #posts .. " posts in the ledger\n" .. a:error_log() .. b:error_log())
    assert.equal(#posts, #entries)
    local by_id, sent = {}, {}
    for _, e in ipairs(entries) do
      by_id[e.event_id] = (by_id[e.event_id] or 0) + 1
      if e.status == "sent" then sent[#sent + 1] = e end
      assert.truthy(e.status == "sent" or e.status == "suppressed" or e.status == "skipped",
        e.status .. " " .. tostring(e.reason) .. " " .. tostring(e.detail))
    end
    assert.same(times, by_id)   -- each post accounted for, once
    assert.equal(8, #sent)      -- one request per customer
    local ids, _, _, _, customers = api:received()
    local nids, ncust = 0, 0
    for id, k in pairs(ids) do
      nids = nids + 1
      assert.equal(1, k, "interaction " .. id .. " sent " .. k .. " times")
    end
    for email, k in pairs(customers) do
      ncust = ncust + 1
      assert.equal(1, k, email .. " got " .. k .. " requests")
    end
    assert.equal(8, nids)
    assert.equal(8, ncust)
    assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
    -- pooled: 2 nodes x 2 workers x (8 consumers + a request and timers) at most, for
    -- several round trips per post
    local after = stats()
    local connections = after.total_connections_received - before.total_connections_received
    local commands = after.total_commands_processed - before.total_commands_processed
    assert.is_true(connections <= 2 * 2 * (8 + 3), connections .. " connections")
    assert.is_true(commands >= 4 * #posts, commands .. " commands")
    -- either node's /events/status reads the one store
    for _, n in ipairs{ a, b } do
      local code, body = get(n.ports.PORT, "/events/status")
      assert.equal(200, code, body)
      local st, total = cjson.decode(body), 0
      for _, c in ipairs(st.ledger) do total = total + c.count end
      assert.equal(#posts, total)
      assert.same({ queued = 0, dead = 0 }, st.outbox)
    end
    s:close()
    admin:close()
    for _, n in ipairs{ a, b } do
      local log = n:error_log()
      assert.falsy(log:find("[error]", 1, true), log)
      nodes:stop(n)
    end
  end)
end)
