-- GET /case?name=NAME: runs one case of stella.redis inside nginx (content phase, or a
-- timer for "timer") over cosockets and answers {"ok":true,"result":...} as JSON, for
-- spec/redis_openresty_spec.lua. The servers' URLs (with their passwords) come from the
-- environment (nginx.conf's env lines), never from the request.
local cjson = require "cjson"
local redis = require "stella.redis"
local cosocket = require "stella.redis.cosocket"

local args = ngx.req.get_uri_args()
local URL = os.getenv("STELLA_REDIS_URL")               -- the default user, with its password
local ACL_URL = os.getenv("STELLA_REDIS_ACL_URL")       -- the ACL user
local BAD_URL = os.getenv("STELLA_REDIS_BAD_URL")       -- a wrong password
local ACL_BAD_URL = os.getenv("STELLA_REDIS_ACL_BAD_URL")

local LIB = [[#!lua name=stellanginx
redis.register_function('stellanginx_incr', function(keys, args)
  return redis.call('INCRBY', keys[1], args[1])
end)
]]

local function answer(v)
  ngx.status = 200
  ngx.header["Content-Type"] = "application/json"
  ngx.say(cjson.encode(v))
  return ngx.exit(ngx.HTTP_OK)
end

local function err_fields(err)
  if not err then return nil end
  return { kind = err.kind, code = err.code, message = err.message, retryable = err.retryable,
           text = tostring(err), is_error = redis.is_error(err) }
end

local function all_bytes()
  local t = {}
  for i = 0, 255 do t[#t + 1] = string.char(i) end
  return table.concat(t) .. "\r\n$3\r\n*1\r\n\0"
end

local cases = {}

function cases.basic()
  local conn = assert(redis.connect(URL .. "/4"))
  local out = { cosocket = conn.cosocket, tostring = tostring(conn) }
  out.set = conn:call("SET", "k", "v")
  out.get = conn:call("GET", "k")
  out.missing = conn:call("GET", "missing")
  out.incr = conn:call("INCRBY", "n", 5)
  local bytes = all_bytes()
  out.binary = conn:call("SET", "bin\0key", bytes) == "OK" and conn:call("GET", "bin\0key") == bytes
  out.nested = conn:call("EVAL", "return {1, 'two', false, {3, {'four'}}, redis.status_reply('FINE')}", 0)
  local v, err = conn:call("LPUSH", "k", "x")
  out.wrongtype = { value = v, err = err_fields(err) }
  local inner = conn:call("EVAL", "return {1, redis.error_reply('MYCODE went wrong'), 3}", 0)
  out.inner = { inner[1], err_fields(inner[2]), inner[3] }
  local r = assert(conn:pipeline{ { "SET", "a", "1" }, { "INCR", "a" }, { "LPUSH", "k", "y" }, { "GET", "nope" },
                                  { "MGET", "a", "nope" } })
  out.pipeline = { r[1], r[2], err_fields(r[3]), r[4], r[5] }
  out.empty_pipeline = conn:pipeline{}
  out.misuse = not pcall(conn.call, conn, "SET", "k", {}) and not pcall(conn.pipeline, conn, { { "GET", true } })
  out.db = conn:call("CLIENT", "INFO"):match(" db=(%d+) ")
  conn:close()
  return out
end

-- close() gives the connection back to the pool; one that ran SELECT is closed instead.
function cases.pool()
  local out = {}
  local pool = "spec-pool-" .. ngx.now()
  local a = assert(redis.connect{ url = URL .. "/4", pool = pool })
  out.first_reused = a.link.reused
  a:call("SET", "pooled", "db4")
  a:close()
  local b = assert(redis.connect{ url = URL .. "/4", pool = pool })
  out.second_reused = b.link.reused
  out.second_get = b:call("GET", "pooled")
  b:call("SELECT", 0)          -- this connection now talks to db 0: it must not be pooled
  b:close()
  local c = assert(redis.connect{ url = URL .. "/4", pool = pool })
  out.third_get = c:call("GET", "pooled")
  c:close()
  -- the conn stays usable after close: its next call takes a connection again
  out.after_close = c:call("GET", "pooled")
  c:close()
  return out
end

function cases.functions()
  local conn = assert(redis.connect(URL .. "/4"))
  conn:call("DEL", "fn")
  conn:call("FUNCTION", "FLUSH")
  local out = {}
  out.load = { conn:load_library("stellanginx", LIB, 2) }
  out.again = { conn:load_library("stellanginx", LIB, 2) }
  out.version = conn:call("FCALL_RO", "stellanginx_version", 0)
  out.first = conn:fcall("stellanginx_incr", { "fn" }, { 2 })
  conn:call("FUNCTION", "FLUSH")
  out.after_flush = conn:fcall("stellanginx_incr", { "fn" }, { 3 })
  conn:close()
  return out
end

function cases.auth()
  local out = {}
  local acl = assert(redis.connect(ACL_URL))
  out.whoami = acl:call("ACL", "WHOAMI")
  out.acl_tostring = tostring(acl)
  acl:close()
  for name, url in pairs{ bad = BAD_URL, acl_bad = ACL_BAD_URL } do
    local c, err = redis.connect(url)
    out[name] = { conn = c ~= nil, err = err_fields(err) }
  end
  local c, err = redis.connect("redis://127.0.0.1:" .. args.closed_port)
  out.down = { conn = c ~= nil, err = err_fields(err) }
  return out
end

-- The server closes a connection that is in use: nil, err, then the next call connects again.
function cases.reconnect()
  local a = assert(redis.connect(URL .. "/4"))
  local b = assert(redis.connect(URL .. "/4"))
  local id = b:call("CLIENT", "ID")
  local out = { killed = a:call("CLIENT", "KILL", "ID", id) }
  local v, err = b:call("PING")
  out.failed = { value = v, err = err_fields(err) }
  out.again = b:call("PING")
  out.new_id = b:call("CLIENT", "ID") ~= id
  out.db = b:call("CLIENT", "INFO"):match(" db=(%d+) ")
  a:close() b:close()
  return out
end

-- In a timer (a cosocket phase without a request).
function cases.timer()
  local out = {}
  local done = false
  local ok, terr = ngx.timer.at(0, function()
    out.phase = ngx.get_phase()
    local conn, err = redis.connect(URL .. "/4")
    if conn then
      out.cosocket = conn.cosocket
      out.pong = conn:call("PING")
      conn:close()
    else
      out.err = tostring(err)
    end
    done = true
  end)
  if not ok then error(terr) end
  for _ = 1, 500 do
    if done then break end
    ngx.sleep(0.01)
  end
  out.done = done
  return out
end

function cases.ping()
  return { driver = cosocket.driver() }
end

local case = cases[args.name]
if not case then return answer{ ok = false, error = "unknown case " .. tostring(args.name) } end
local ok, res = pcall(case)
if not ok then return answer{ ok = false, error = tostring(res) } end
return answer{ ok = true, result = res }
