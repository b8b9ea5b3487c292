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
