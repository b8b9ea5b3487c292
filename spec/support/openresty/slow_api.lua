-- A loopback Requests API that answers slowly and counts what it received, for
-- spec/openresty_webhook_spec.lua and bench/webhook.lua: its own nginx (so it keeps
-- running while the webhook's nginx stops and starts), started with stella.nginx.
--
--   local slow_api = require "support.openresty.slow_api"
--   local api = slow_api.start{ delay = 1 }    -- seconds before each answer
--   api.url; api:set_delay(0.02); api:set_status(503)   -- 201 again: set_status(201)
--   api:received() -> { [ext_interaction_id] = times received }, total, the most
--                     requests it held at once, requests answered with an error,
--                     { [customer e-mail] = times received }
--   api:span() -> the first request's arrival and the last counted answer (ngx.now(), s;
--                 nil before any), and the seconds the counted requests were held in all
--   api:answered(k) -> when the k-th counted answer went (ngx.now(), s), nil before
--   api:reset(); api:stop()
--
-- POST /v1/requests answers 201 {"request_id":"slow-N"} after `delay` seconds (ngx.sleep:
-- many requests wait at once; lowering the delay shortens the waits under way); with set_status, that status instead (not counted as
-- received). GET /_received, /_answered?n=K and POST /_reset /_delay?s=D /_status?code=C are
-- its controls.
local socket = require "socket"
local cjson = require "cjson"
local nginx = require "stella.nginx"

local M = {}

local CONFIG = [[
worker_processes 1;
pid @PREFIX@/nginx.pid;
error_log @PREFIX@/error.log warn;
load_module @NDK_MODULE@;
load_module @LUA_MODULE@;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path @PREFIX@/body;
    proxy_temp_path @PREFIX@/proxy;
    fastcgi_temp_path @PREFIX@/fastcgi;
    uwsgi_temp_path @PREFIX@/uwsgi;
    scgi_temp_path @PREFIX@/scgi;
    client_body_buffer_size 64k;
    keepalive_requests 100000;
    lua_shared_dict api 64m;
    init_by_lua_block { ngx.shared.api:set("delay", @DELAY@) }
    server {
        listen 127.0.0.1:@PORT@ backlog=4096;
        location = /v1/requests {
            content_by_lua_block {
                local cjson = require "cjson.safe"
                local api = ngx.shared.api
                ngx.req.read_body()
                local body = cjson.decode(ngx.req.get_body_data() or "") or {}
                local id = tostring(body.ext_interaction_id)
                local d = api:get("delay") or 0
                local now = api:incr("busy", 1, 0)
                if now > (api:get("max") or 0) then api:set("max", now) end
                ngx.update_time()
                local t0 = ngx.now()
                api:add("first", t0)   -- the first request's arrival (bench/queue.lua)
                while d > 0 and ngx.now() - t0 < d do   -- a lower delay set meanwhile ends the wait
                    -- what is left of it (a whole `d` again would answer a 20 ms delay in 40)
                    ngx.sleep(math.min(0.05, d - (ngx.now() - t0)))
                    ngx.update_time()
                    d = api:get("delay") or 0
                end
                api:incr("busy", -1, 0)
                ngx.header["Content-Type"] = "application/json"
                local status = api:get("status") or 201
                if status ~= 201 then
                    api:incr("failed", 1, 0)   -- answered an error: not received
                    ngx.status = status
                    ngx.print('{"message":"unavailable"}')
                    return
                end
                local n = api:incr("n", 1, 0)
                api:set("last", ngx.now())   -- the last counted answer
                api:set("t:" .. n, ngx.now())  -- when the n-th was answered
                api:incr("held", ngx.now() - t0, 0)   -- the time the answers were held, in all
                api:incr("r:" .. id, 1, 0)
                local email = type(body.customer) == "table" and body.customer.email
                if type(email) == "string" then api:incr("c:" .. email, 1, 0) end
                ngx.status = 201
                ngx.print('{"request_id":"slow-', n, '"}')
            }
        }
        location = /_received {
            content_by_lua_block {
                local cjson = require "cjson.safe"
                local api = ngx.shared.api
                local ids, customers = {}, {}
                for _, k in ipairs(api:get_keys(0)) do
                    if k:sub(1, 2) == "r:" then ids[k:sub(3)] = api:get(k) end
                    if k:sub(1, 2) == "c:" then customers[k:sub(3)] = api:get(k) end
                end
                ngx.print(cjson.encode({ total = api:get("n") or 0, ids = ids, max = api:get("max") or 0,
                                         failed = api:get("failed") or 0, customers = customers,
                                         first = api:get("first"), last = api:get("last"),
                                         held = api:get("held") or 0, busy = api:get("busy") or 0 }))
            }
        }
        location = /_answered {
            content_by_lua_block {
                ngx.print(ngx.shared.api:get("t:" .. tostring(ngx.var.arg_n)) or "null")
            }
        }
        location = /_reset {
            content_by_lua_block {
                local api = ngx.shared.api
                local d, st = api:get("delay"), api:get("status")
                api:flush_all()
                api:flush_expired()
                api:set("delay", d)
                api:set("status", st)
                ngx.print("{}")
            }
        }
        location = /_status {
            content_by_lua_block {
                ngx.shared.api:set("status", tonumber(ngx.var.arg_code) or 201)
                ngx.print("{}")
            }
        }
        location = /_delay {
            content_by_lua_block {
                ngx.shared.api:set("delay", tonumber(ngx.var.arg_s) or 0)
                ngx.print("{}")
            }
        }
    }
}
]]

local function get(port, path, timeout)
  local c = socket.tcp()
  c:settimeout(timeout or 10)
  local ok, err = c:connect("127.0.0.1", port)
  if not ok then c:close() return nil, err end
  c:send("GET " .. path .. " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
  local data = c:receive("*a")
  c:close()
  if not data then return nil, "no answer" end
  return tonumber(data:match("^HTTP/1%.%d (%d%d%d)")), data:match("\r\n\r\n(.*)$")
end

local Api = {}
Api.__index = Api

function M.start(opts)
  opts = opts or {}
  local prefix = assert(nginx.temp_dir("stella-slow-api"))
  local n, log = nginx.start{
    nginx = assert(nginx.find_nginx()), prefix = prefix, temporary = true,
    config = CONFIG, ports = { "PORT" },
    vars = { DELAY = opts.delay or 0,
             NDK_MODULE = assert(nginx.find_module("ndk_http_module.so")),
             LUA_MODULE = assert(nginx.find_module("ngx_http_lua_module.so")) },
    globals = "daemon off; master_process on;" .. (nginx.is_root() and " user root;" or ""),
    ready = function(self) return get(self.port, "/_received", 0.5) == 200 end,
  }
  if not n then error("slow_api: nginx failed to start:\n" .. nginx.tail(log, 16), 2) end
  return setmetatable({ nginx = n, url = n.url, port = n.port }, Api)
end

function Api:received()
  local code, body = get(self.port, "/_received")
  assert(code == 200, "slow_api: /_received failed: " .. tostring(body))
  local v = cjson.decode(body)
  return v.ids, v.total, v.max, v.failed, v.customers
end

-- how many requests the API holds right now (arrived, not yet answered)
function Api:busy()
  local code, body = get(self.port, "/_received")
  assert(code == 200, "slow_api: /_received failed: " .. tostring(body))
  return cjson.decode(body).busy
end

function Api:span()
  local code, body = get(self.port, "/_received")
  assert(code == 200, "slow_api: /_received failed: " .. tostring(body))
  local v = cjson.decode(body)
  return tonumber(v.first), tonumber(v.last), tonumber(v.held)
end

function Api:answered(k)
  local code, body = get(self.port, "/_answered?n=" .. math.floor(k))
  assert(code == 200, "slow_api: /_answered failed: " .. tostring(body))
  return tonumber(body)
end

function Api:reset()
  assert(get(self.port, "/_reset") == 200)
end

function Api:set_status(code)
  assert(get(self.port, "/_status?code=" .. code) == 200)
end

function Api:set_delay(s)
  assert(get(self.port, "/_delay?s=" .. s) == 200)
end

function Api:stop()
  self.nginx:stop()
end

return M
