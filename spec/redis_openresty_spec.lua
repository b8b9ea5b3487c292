-- Specs for stella.redis inside nginx with its Lua module: the same interface over
-- resty.redis / nginx.redis on cosockets, with nginx's keep-alive pool, against a real
-- redis-server (spec/support/redis.lua). The cases run in spec/support/openresty/redis_cases.lua.
local cjson = require "cjson"
local socket = require "socket"
local nginx = require "stella.nginx"
local redis_server = require "support.redis"

local SPEC_DIR = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
SPEC_DIR = nginx.absolute(SPEC_DIR)
local ROOT = SPEC_DIR:gsub("/spec$", ""):gsub("/%./spec$", "")
local SUPPORT = SPEC_DIR .. "/support/openresty"

local PASSWORD = "ngx-pw-Wq8:@/s3cret"
local ESCAPED = "ngx-pw-Wq8%3A%40%2Fs3cret"
local ACL_PASSWORD = "ngx-acl-hunter2"

local CONFIG = [[
load_module @NDK_MODULE@;
load_module @LUA_MODULE@;
worker_processes 1;
pid @PREFIX@/nginx.pid;
error_log @PREFIX@/error.log notice;
env STELLA_REDIS_URL;
env STELLA_REDIS_ACL_URL;
env STELLA_REDIS_BAD_URL;
env STELLA_REDIS_ACL_BAD_URL;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path @PREFIX@/client_body_temp;
    proxy_temp_path       @PREFIX@/proxy_temp;
    fastcgi_temp_path     @PREFIX@/fastcgi_temp;
    uwsgi_temp_path       @PREFIX@/uwsgi_temp;
    scgi_temp_path        @PREFIX@/scgi_temp;
    lua_package_path  "@ROOT@/lua/?.lua;@ROOT@/lua/?/init.lua;;";
    lua_socket_log_errors off;
    server {
        listen 127.0.0.1:@PORT@;
        location = /case { content_by_lua_file @SUPPORT@/redis_cases.lua; }
    }
}
]]

local function get(port, path)
  local c = socket.tcp()
  c:settimeout(20)
  local ok, err = c:connect("127.0.0.1", port)
  if not ok then c:close() return nil, err end
  c:send("GET " .. path .. " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
  local data = c:receive("*a") or ""
  c:close()
  return tonumber(data:match("^HTTP/1%.%d (%d%d%d)")), data:match("\r\n\r\n(.*)$")
end

local function assert_no_secret(text)
  for _, secret in ipairs{ PASSWORD, ESCAPED, ACL_PASSWORD, "s3cret", "hunter2" } do
    assert(not text:find(secret, 1, true), "a password shows in an answer")
  end
end

describe("stella.redis inside OpenResty", function()
  local srv, web

  local function case(name, query)
    local code, body = get(web.port, "/case?name=" .. name .. (query or ""))
    assert.equal(200, code)
    assert_no_secret(body)
    local v = cjson.decode(body)
    assert(v.ok, v.error)
    return v.result
  end

  lazy_setup(function()
    srv = redis_server.start{ requirepass = PASSWORD,
                              users = { { name = "app", password = ACL_PASSWORD, rules = "~* &* +@all" } } }
    local prefix = assert(nginx.temp_dir("stella-redis-nginx"))
    local log
    web, log = nginx.start{
      nginx = assert(nginx.find_nginx()), prefix = prefix, temporary = not os.getenv("STELLA_KEEP_PREFIX"),
      config = CONFIG, ports = { "PORT" },
      vars = { ROOT = ROOT, SUPPORT = SUPPORT,
               NDK_MODULE = assert(nginx.find_module("ndk_http_module.so")),
               LUA_MODULE = assert(nginx.find_module("ngx_http_lua_module.so")) },
      globals = "daemon off; master_process on;" .. (nginx.is_root() and " user root;" or ""),
      env = {
        STELLA_REDIS_URL = srv:url{ password = ESCAPED },
        STELLA_REDIS_ACL_URL = srv:url{ user = "app", password = ACL_PASSWORD },
        STELLA_REDIS_BAD_URL = srv:url{ password = "x" .. ESCAPED },
        STELLA_REDIS_ACL_BAD_URL = srv:url{ user = "app", password = "x" .. ACL_PASSWORD },
      },
      ready = function(n) return (get(n.port, "/case?name=ping")) == 200 end,
    }
    assert(web, "nginx failed to start: " .. tostring(log))
  end)

  lazy_teardown(function()
    if web then web:stop() end
    if srv then srv:remove() end
  end)

  it("uses the client library Debian or OpenResty installs", function()
    local r = case("ping")
    assert.is_true(r.driver == "resty.redis" or r.driver == "nginx.redis", r.driver)
  end)

  it("calls, converts replies and pipelines over cosockets", function()
    local r = case("basic")
    assert.is_true(r.cosocket)
    assert.equal("stella.redis(redis://:***@127.0.0.1:" .. srv.port .. "/4)", r.tostring)
    assert.equal("4", r.db)
    assert.equal("OK", r.set)
    assert.equal("v", r.get)
    assert.is_false(r.missing)
    assert.is_number(r.incr)
    assert.is_true(r.binary)
    assert.same({ 1, "two", false, { 3, { "four" } }, "FINE" }, r.nested)
    assert.equal("WRONGTYPE", r.wrongtype.err.code)
    assert.equal("redis", r.wrongtype.err.kind)
    assert.is_true(r.wrongtype.err.is_error)
    assert.same({ kind = "redis", code = "MYCODE", message = "MYCODE went wrong", retryable = false,
                  text = "MYCODE went wrong", is_error = true }, r.inner[2])
    assert.equal("OK", r.pipeline[1])
    assert.equal(2, r.pipeline[2])
    assert.equal("WRONGTYPE", r.pipeline[3].code)
    assert.is_false(r.pipeline[4])
    assert.same({ "2", false }, r.pipeline[5])
    assert.same({}, r.empty_pipeline)
    assert.is_true(r.misuse)
  end)

  it("gives connections back to nginx's pool, except one whose state changed", function()
    local r = case("pool")
    assert.is_false(r.first_reused)
    assert.is_true(r.second_reused)
    assert.equal("db4", r.second_get)
    assert.equal("db4", r.third_get)   -- not the connection that ran SELECT 0
    assert.equal("db4", r.after_close)
  end)

  it("loads a function library and loads it again after FUNCTION FLUSH", function()
    local r = case("functions")
    assert.same({ true, "loaded" }, r.load)
    assert.same({ true, "current" }, r.again)
    assert.equal(2, r.version)
    assert.equal(2, r.first)
    assert.equal(5, r.after_flush)
  end)

  it("authenticates an ACL user and refuses wrong passwords without showing them", function()
    local r = case("auth", "&closed_port=" .. redis_server.closed_port())
    assert.equal("app", r.whoami)
    assert.equal("stella.redis(redis://app:***@127.0.0.1:" .. srv.port .. "/0)", r.acl_tostring)
    for _, name in ipairs{ "bad", "acl_bad" } do
      assert.is_false(r[name].conn)
      assert.equal("auth", r[name].err.kind)
      assert.equal("WRONGPASS", r[name].err.code)
      assert.matches("^redis 127%.0%.0%.1:%d+: authentication failed", r[name].err.text)
    end
    assert.is_false(r.down.conn)
    assert.equal("network", r.down.err.kind)
    assert.is_true(r.down.err.retryable)
    assert.matches("^redis 127%.0%.0%.1:%d+: cannot connect: connection refused$", r.down.err.text)
  end)

  it("returns nil, err when the server closes a connection in use, then connects again", function()
    local r = case("reconnect")
    assert.equal(1, r.killed)
    assert.equal("network", r.failed.err.kind)
    assert.is_true(r.failed.err.retryable)
    assert.equal("PONG", r.again)
    assert.is_true(r.new_id)
    assert.equal("4", r.db)
  end)

  it("works in a timer", function()
    local r = case("timer")
    assert.is_true(r.done)
    assert.equal("timer", r.phase)
    assert.is_true(r.cosocket)
    assert.equal("PONG", r.pong)
  end)

  it("logged no Lua error", function()
    assert.is_nil(web:error_log():find("[error]", 1, true), web:error_log())
  end)
end)
