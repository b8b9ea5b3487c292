-- Specs for stella.redis in plain Lua (the C module stella.redis.core over hiredis),
-- against real redis-servers started by spec/support/redis.lua: one with a password for
-- the default user and an ACL user, one without any (and a unix socket).
local redis = require "stella.redis"
local redis_server = require "support.redis"

local PASSWORD = "pw-Kx7#q:@/s3cret"    -- needs %-escapes in a URL
local ACL_PASSWORD = "acl-Zq93-hunter2"
local ESCAPED = "pw-Kx7%23q%3A%40%2Fs3cret"

-- Every string an error or object shows: its fields and tostring.
local function texts(v)
  local list = { tostring(v) }
  if type(v) == "table" then
    for k, x in pairs(v) do
      if type(x) == "string" then list[#list + 1] = k .. "=" .. x end
    end
  end
  return list
end

local function assert_no_secret(v)
  for _, text in ipairs(texts(v)) do
    for _, secret in ipairs{ PASSWORD, ESCAPED, ACL_PASSWORD, "s3cret", "hunter2" } do
      assert(not text:find(secret, 1, true), "a password shows in: " .. text:gsub(secret, "<the password>"))
    end
  end
end

local function one_line(err)
  local text = tostring(err)
  assert.is_nil(text:find("\n"), "more than one line")
  return text
end

describe("stella.redis URLs", function()
  it("parses host, port, db, user and password, with defaults and %-escapes", function()
    local u = assert(redis.parse_url("redis://app:" .. ESCAPED .. "@db.example:6380/4"))
    assert.same({ host = "db.example", port = 6380, db = 4, user = "app", password = PASSWORD }, u)
    u = assert(redis.parse_url("redis://127.0.0.1"))
    assert.same({ host = "127.0.0.1", port = 6379, db = 0 }, u)
    u = assert(redis.parse_url("redis://:pw@[::1]:7000/"))
    assert.same({ host = "::1", port = 7000, db = 0, password = "pw" }, u)
    u = assert(redis.parse_url("unix://:pw@/run/redis/redis.sock?db=2"))
    assert.same({ path = "/run/redis/redis.sock", db = 2, password = "pw" }, u)
  end)

  it("refuses bad URLs with a message that never repeats the password", function()
    for _, url in ipairs{
      "http://h", "rediss://:" .. PASSWORD .. "@h", "redis://" .. ESCAPED .. "@h",   -- no colon
      "redis://:" .. ESCAPED .. "@h:port", "redis://:" .. ESCAPED .. "@h:70000",
      "redis://:" .. ESCAPED .. "@h/db", "redis://:" .. ESCAPED .. "@", "redis://:%zz@h",
      "redis://:@h", "unix://:" .. ESCAPED .. "@/s?x=1",
    } do
      local u, msg = redis.parse_url(url)
      assert.is_nil(u, url)
      assert.matches("^invalid redis URL", msg)
      assert_no_secret(msg)
      local conn, err = redis.connect(url)
      assert.is_nil(conn)
      assert.equal("invalid", err.kind)
      assert.is_false(err.retryable)
      assert_no_secret(err)
    end
  end)

  it("raises on misuse", function()
    assert.has_error(function() redis.connect(42) end)
    assert.has_error(function() redis.connect{ url = "redis://h", colour = "red" } end)
    assert.has_error(function() redis.connect{ url = "redis://h", timeout = "2" } end)
    assert.has_error(function() redis.connect{ url = "redis://h", timeout = 0 } end)
  end)
end)

describe("stella.redis.core", function()
  local core = require "stella.redis.core"
  local srv

  lazy_setup(function() srv = redis_server.start{} end)
  lazy_teardown(function() if srv then srv:remove() end end)

  it("makes plain error tables without a constructor, and closes idempotently", function()
    local c = assert(core.connect("127.0.0.1", srv.port, 1000, 1000))
    local v, err = c:command("NOSUCHCOMMAND")
    assert.is_nil(v)
    assert.same({ kind = "redis", code = "ERR", retryable = false }, { kind = err.kind, code = err.code,
                                                                      retryable = err.retryable })
    assert.is_nil(getmetatable(err))
    assert.is_true(c:connected())
    c:close()
    c:close()
    assert.is_false(c:connected())
    v, err = c:command("PING")
    assert.is_nil(v)
    assert.equal("stale", err.code)
    assert.has_error(function() core.connect("127.0.0.1", 0, 1000, 1000) end)
    assert.has_error(function() core.connect("127.0.0.1", srv.port, 0, 1000) end)
  end)

  -- An error raised while a reply is converted (here by the error constructor) leaves the
  -- reply owned by the connection (no leak: make asan checks) and its connection out of
  -- step: the next call refuses it as "stale", without sending anything.
  it("refuses a connection whose replies were interrupted by a Lua error", function()
    local armed
    local function once(kind, code, message)   -- raises the first time after being armed
      if armed then armed = false error("boom from the error constructor") end
      return { kind = kind, code = code, message = message }
    end
    for _, call in ipairs{
      function(c) return c:command("EVAL", "return {1, redis.error_reply('X y')}", 0) end,
      function(c) return c:pipeline{ { "EVAL", "return {1, redis.error_reply('X y')}", 0 }, { "PING" }, { "PING" } } end,
    } do
      local c = assert(core.connect("127.0.0.1", srv.port, 1000, 1000, once))
      armed = true
      assert.has_error(function() call(c) end, "boom from the error constructor")
      local v, err = c:command("PING")
      assert.is_nil(v)
      assert.equal("network", err.kind)
      assert.equal("stale", err.code)
      assert.is_false(c:connected())
      c:close()
    end
  end)
end)

describe("stella.redis in plain Lua", function()
  local srv, plain

  local function url(o)
    o = o or {}
    if o.password == nil then o.password = ESCAPED end
    if o.password == false then o.password = nil end
    return srv:url(o)
  end

  local function connect(o, extra)
    local opts = { url = url(o) }
    for k, v in pairs(extra or {}) do opts[k] = v end
    return assert(redis.connect(opts))
  end

  lazy_setup(function()
    srv = redis_server.start{ requirepass = PASSWORD,
                              users = { { name = "app", password = ACL_PASSWORD, rules = "~* &* +@all" } } }
    plain = redis_server.start{ extra = { "unixsocket " .. "@DIR@/redis.sock", "unixsocketperm 700" } }
  end)

  lazy_teardown(function()
    if srv then srv:remove() end
    if plain then plain:remove() end
  end)

  describe("connecting", function()
    it("authenticates the default user and selects the db", function()
      local c3 = connect{ db = 3 }
      local c0 = connect()
      assert.equal("OK", c3:call("SET", "where", "three"))
      assert.equal("three", c3:call("GET", "where"))
      assert.is_false(c0:call("GET", "where"))
      assert.equal(3, c3:call("CLIENT", "INFO"):match(" db=(%d+) ") + 0)
      c3:close() c0:close()
    end)

    it("authenticates an ACL user", function()
      local c = connect{ user = "app", password = ACL_PASSWORD }
      assert.equal("app", c:call("ACL", "WHOAMI"))
      c:close()
    end)

    it("connects over IPv6 loopback and a unix socket", function()
      if srv.ipv6 then
        local c = connect{ host = "::1" }
        assert.equal("PONG", c:call("PING"))
        assert.equal("stella.redis(redis://:***@[::1]:" .. srv.port .. "/0)", tostring(c))
        c:close()
      end
      local c = assert(redis.connect("unix://" .. plain.dir .. "/redis.sock?db=1"))
      assert.equal("PONG", c:call("PING"))
      assert.equal(1, c:call("CLIENT", "INFO"):match(" db=(%d+) ") + 0)
      assert.equal("stella.redis(unix://" .. plain.dir .. "/redis.sock?db=1)", tostring(c))
      c:close()
    end)

    it("shows the URL without the password in tostring", function()
      local c = connect{ user = "app", password = ACL_PASSWORD, db = 2 }
      assert.equal("stella.redis(redis://app:***@127.0.0.1:" .. srv.port .. "/2)", tostring(c))
      assert_no_secret(c)
      c:close()
      c = assert(redis.connect(plain:url()))
      assert.equal("stella.redis(redis://127.0.0.1:" .. plain.port .. "/0)", tostring(c))
      assert.equal("stella:", c.prefix)
      c:close()
      c = assert(redis.connect{ url = plain:url(), prefix = "app1:" })
      assert.equal("app1:", c.prefix)
      c:close()
    end)

    it("refuses a wrong password, an ACL user's wrong password and a missing one without showing them", function()
      for _, case in ipairs{
        { url = url{ password = "wrong-" .. ESCAPED }, code = "WRONGPASS" },
        { url = url{ user = "app", password = "x" .. ACL_PASSWORD }, code = "WRONGPASS" },
        { url = url{ user = "nobody", password = ACL_PASSWORD }, code = "WRONGPASS" },
        { url = url{ password = false }, code = "NOAUTH" },
        { url = plain:url{ password = ESCAPED }, code = "ERR" },   -- the server has no password
      } do
        local c, err = redis.connect(case.url)
        assert.is_nil(c)
        assert.equal("auth", err.kind)
        assert.equal(case.code, err.code)
        assert.is_false(err.retryable)
        assert.truthy(redis.is_error(err))
        assert.matches("^redis 127%.0%.0%.1:%d+: ", one_line(err))
        assert_no_secret(err)
      end
    end)

    it("gives a one-line network error when nothing listens", function()
      local port = redis_server.closed_port()
      local c, err = redis.connect("redis://:" .. ESCAPED .. "@127.0.0.1:" .. port)
      assert.is_nil(c)
      assert.equal("network", err.kind)
      assert.equal("connect", err.code)
      assert.is_true(err.retryable)
      assert.equal("redis 127.0.0.1:" .. port .. ": Connection refused", one_line(err))
      assert_no_secret(err)
      c, err = redis.connect("unix:///nonexistent/redis.sock")
      assert.is_nil(c)
      assert.equal("network", err.kind)
      assert.matches("^redis unix:/nonexistent/redis%.sock: ", one_line(err))
    end)

    it("reports a bad db as a redis error naming the server", function()
      local c, err = redis.connect(url{ db = 99 })
      assert.is_nil(c)
      assert.equal("redis", err.kind)
      assert.equal("redis 127.0.0.1:" .. srv.port .. ": ERR DB index is out of range", one_line(err))
    end)
  end)

  describe("commands", function()
    local c
    before_each(function() c = connect{ db = 5 } end)
    after_each(function() c:close() end)

    it("converts replies: status, integer, bulk, nil, nested arrays", function()
      assert.equal("OK", c:call("SET", "s", "v"))
      assert.equal("PONG", c:call("PING"))
      assert.equal(1, c:call("DEL", "s"))
      assert.is_false(c:call("GET", "s"))
      assert.equal(3, c:call("RPUSH", "list", "a", "b", "c"))
      assert.same({ "a", "b", "c" }, c:call("LRANGE", "list", 0, -1))
      assert.same({}, c:call("LRANGE", "nothing", 0, -1))
      local v = c:call("EVAL", "return {1, 'two', false, {3, {'four'}}, redis.status_reply('FINE')}", 0)
      assert.same({ 1, "two", false, { 3, { "four" } }, "FINE" }, v)
      assert.equal(math.type and "integer" or "number", math.type and math.type(c:call("INCR", "n")) or "number")
    end)

    it("passes binary values both ways and numbers as arguments", function()
      local bytes = {}
      for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
      local all = table.concat(bytes) .. "\r\n$3\r\n*1\r\n\0"
      assert.equal("OK", c:call("SET", "bin\0key", all))
      assert.equal(all, c:call("GET", "bin\0key"))
      assert.equal("OK", c:call("SET", "num", 12))
      assert.equal(17, c:call("INCRBY", "num", 5))
      assert.equal("", (c:call("SET", "empty", "") and c:call("GET", "empty")))
    end)

    it("returns an error reply as nil, err with its code", function()
      c:call("SET", "str", "x")
      local v, err = c:call("LPUSH", "str", "y")
      assert.is_nil(v)
      assert.equal("redis", err.kind)
      assert.equal("WRONGTYPE", err.code)
      assert.is_false(err.retryable)
      assert.matches("^WRONGTYPE Operation against a key holding the wrong kind of value", tostring(err))
      v, err = c:call("NOSUCHCOMMAND", "arg")
      assert.is_nil(v)
      assert.equal("ERR", err.code)
      -- an error inside an array stands in its place
      v = c:call("EVAL", "return {1, redis.error_reply('MYCODE went wrong'), 3}", 0)
      assert.equal(1, v[1])
      assert.truthy(redis.is_error(v[2]))
      assert.equal("MYCODE", v[2].code)
      assert.equal("MYCODE went wrong", v[2].message)
      assert.equal(3, v[3])
      -- the connection is fine afterwards
      assert.equal("PONG", c:call("PING"))
    end)

    it("raises on misuse and sends nothing", function()
      assert.has_error(function() c:call() end)
      assert.has_error(function() c:call("SET", "k", { 1 }) end)
      assert.has_error(function() c:call("SET", "k", true) end)
      assert.has_error(function() c:pipeline("GET k") end)
      assert.has_error(function() c:pipeline{ { "SET", "a", "1" }, { "SET", "b", nil, "x" }, "GET" } end)
      assert.has_error(function() c:pipeline{ { "SET", "p", "1" }, {} } end)
      assert.is_false(c:call("GET", "p"))
      assert.equal("PONG", c:call("PING"))
    end)

    it("runs a pipeline in order, with error replies in their places", function()
      c:call("SET", "str", "x")
      local r = assert(c:pipeline{
        { "SET", "a", "1" }, { "INCR", "a" }, { "LPUSH", "str", "y" }, { "GET", "a" }, { "GET", "missing" },
        { "MGET", "a", "missing" },
      })
      assert.equal(6, #r)
      assert.equal("OK", r[1])
      assert.equal(2, r[2])
      assert.truthy(redis.is_error(r[3]))
      assert.equal("WRONGTYPE", r[3].code)
      assert.equal("2", r[4])
      assert.is_false(r[5])
      assert.same({ "2", false }, r[6])
      assert.same({}, c:pipeline{})
      -- a long one (more than hiredis' reader buffers at once)
      local cmds = {}
      for i = 1, 2000 do cmds[i] = { "SET", "k" .. i, ("v"):rep(100) .. i } end
      r = assert(c:pipeline(cmds))
      assert.equal(2000, #r)
      assert.equal("OK", r[2000])
      assert.equal(("v"):rep(100) .. "1999", c:call("GET", "k1999"))
    end)
  end)

  describe("when the server goes away", function()
    it("times out a slow command as a network error, then connects again", function()
      local c = connect({ db = 1 }, { timeout = 0.2 })
      c:call("SET", "after", "timeout")
      local v, err = c:call("DEBUG", "SLEEP", "1")
      assert.is_nil(v)
      assert.equal("network", err.kind)
      assert.equal("timeout", err.code)
      assert.is_true(err.retryable)
      one_line(err)
      -- the next call opens a new connection (authenticated, db 1 again)
      local again
      for _ = 1, 20 do   -- the server may still be sleeping
        again, err = c:call("GET", "after")
        if again then break end
      end
      assert.equal("timeout", again, tostring(err))
      c:close()
    end)

    it("returns nil, err while it is down and reconnects after it restarts", function()
      local srv2 = redis_server.start{ requirepass = PASSWORD, appendonly = true }
      finally(function() srv2:remove() end)
      local c = assert(redis.connect(srv2:url{ password = ESCAPED, db = 2 }))
      assert.equal("OK", c:call("SET", "kept", "yes"))
      srv2:stop()   -- a clean shutdown: the AOF has everything
      srv2:start()
      -- the server closed the idle connection: the next call opens another, nothing lost
      assert.equal("yes", c:call("GET", "kept"))

      srv2:kill()
      local v, err = c:call("GET", "kept")
      assert.is_nil(v)
      assert.equal("network", err.kind)
      assert.is_true(err.retryable)
      assert_no_secret(err)
      v, err = c:call("GET", "kept")   -- still down: a connect error
      assert.is_nil(v)
      assert.equal("network", err.kind)
      assert.equal("connect", err.code)
      assert.matches("Connection refused", one_line(err))
      assert.is_nil(c:pipeline{ { "GET", "kept" } })

      assert(srv2:start())
      assert.equal("yes", c:call("GET", "kept"))   -- db 2 selected again, after AUTH
      assert.same({ "yes" }, c:pipeline{ { "GET", "kept" } })
      c:close()
    end)
  end)

  describe("functions", function()
    local LIB = [[#!lua name=stellatest
redis.register_function('stellatest_incr', function(keys, args)
  return redis.call('INCRBY', keys[1], args[1])
end)
redis.register_function{function_name = 'stellatest_get', flags = {'no-writes'},
  callback = function(keys) return redis.call('GET', keys[1]) end}
]]
    local c
    before_each(function()
      c = connect{ db = 6 }
      c:call("FUNCTION", "FLUSH")
    end)
    after_each(function() c:close() end)

    it("loads a library once per version and calls its functions", function()
      assert.same({ true, "loaded" }, { c:load_library("stellatest", LIB, 3) })
      assert.same({ true, "current" }, { c:load_library("stellatest", LIB, 3) })
      assert.equal(3, c:call("FCALL_RO", "stellatest_version", 0))   -- for any client
      assert.equal(5, c:fcall("stellatest_incr", { "counter" }, { 5 }))
      assert.equal(7, c:fcall("stellatest_incr", { "counter" }, { "2" }))
      assert.equal("7", c:fcall_ro("stellatest_get", { "counter" }))
      -- an older version never replaces a newer one; a newer one replaces an older one
      assert.same({ true, "newer" }, { c:load_library("stellatest", LIB, 2) })
      assert.equal(3, c:call("FCALL_RO", "stellatest_version", 0))
      assert.same({ true, "loaded" }, { c:load_library("stellatest", LIB, 4) })
      assert.equal(4, c:call("FCALL_RO", "stellatest_version", 0))
    end)

    it("loads the library again when the server lost it, and calls once more", function()
      assert(c:load_library("stellatest", LIB, 1))
      assert.equal(1, c:fcall("stellatest_incr", { "n" }, { 1 }))
      assert.equal("OK", c:call("FUNCTION", "FLUSH"))
      assert.equal(2, c:fcall("stellatest_incr", { "n" }, { 1 }))
      -- a conn that was given the library as an option, on a server that never had it
      c:call("FUNCTION", "FLUSH")
      local other = connect({ db = 6 }, { libraries = { { name = "stellatest", code = LIB, version = 1 } } })
      assert.equal(3, other:fcall("stellatest_incr", { "n" }, { 1 }))
      other:close()
      -- a function no library has stays an error
      local v, err = c:fcall("no_such_function", {}, {})
      assert.is_nil(v)
      assert.equal("redis", err.kind)
      assert.matches("Function not found", err.message)
      -- errors raised in the function come back as error values
      v, err = c:fcall("stellatest_incr", { "n" }, { "not a number" })
      assert.is_nil(v)
      assert.equal("ERR", err.code)
    end)

    it("refuses a library whose code does not name it", function()
      assert.has_error(function() c:load_library("stellatest", "#!lua name=other\n", 1) end)
      assert.has_error(function() c:load_library("bad-name", LIB, 1) end)
      assert.has_error(function() c:load_library("stellatest", LIB, 0) end)
      assert.has_error(function() c:fcall(nil, {}, {}) end)
    end)
  end)
end)
