-- Server side of the lua-stella test server. Runs inside nginx's Lua module (LuaJIT)
-- and is driven by spec/support/testserver.lua through the /_control/ endpoints.
--
-- Every request outside /_control/ is recorded, then answered by the next scripted
-- item or, when the script queue is empty, by the default answer
-- 200 {"request_id":"req-N"} (N = how many requests have been recorded, this one
-- included).
--
-- State lives in the "stella_testserver" lua_shared_dict so it survives between
-- requests. nginx runs a single worker and none of the dict sequences below yields,
-- so they need no locking.
--   nreq          number of recorded requests
--   req:<i>       i-th recorded request, as JSON
--   script:head   index of the next scripted item to use (absent means 1)
--   script:tail   index of the last queued scripted item (absent means 0)
--   script:<i>    i-th scripted item, as JSON

local cjson = require "cjson"

local ngx = ngx
local dict = ngx.shared.stella_testserver

local M = {}

local CLOSE_LOCATION = "/_stella_internal/close"

-- Answer a control request and finish it.
local function reply(status, body)
  ngx.status = status
  ngx.header["Content-Type"] = "application/json"
  ngx.header["Content-Length"] = #body
  ngx.print(body)
  return ngx.exit(ngx.HTTP_OK)
end

-- The raw request body as a string ("" when there is none). Bodies larger than
-- client_body_buffer_size are spooled to a file by nginx; read them back from there.
local function request_body()
  ngx.req.read_body()
  local body = ngx.req.get_body_data()
  if body then return body end
  local path = ngx.req.get_body_file()
  if not path then return "" end
  local f = assert(io.open(path, "rb"))
  body = f:read("*a")
  f:close()
  return body
end

-- Pops the next scripted item, or returns nil when the queue is empty.
local function next_item()
  local head = dict:get("script:head") or 1
  local tail = dict:get("script:tail") or 0
  if head > tail then return nil end
  local json = dict:get("script:" .. head)
  dict:delete("script:" .. head)
  dict:set("script:head", head + 1)
  return cjson.decode(json)
end

-- Sends a response described by { status =, headers =, body = }.
local function respond(res)
  ngx.status = res.status
  -- Always send an explicit length: without it nginx would use chunked encoding
  -- (or, for an empty body, no framing at all). Scripted headers come afterwards so a
  -- spec can still override Content-Length or Content-Type on purpose.
  if not res.chunked then ngx.header["Content-Length"] = #res.body end
  if res.body ~= "" then ngx.header["Content-Type"] = "application/json" end
  for name, value in pairs(res.headers) do
    ngx.header[name] = value
  end
  if res.body ~= "" then ngx.print(res.body) end
  return ngx.exit(ngx.HTTP_OK)
end

-- POST /_control/script   body: JSON array of items; appended to the queue
-- GET  /_control/requests recorded requests, as a JSON array in arrival order
-- POST /_control/reset    forget requests, queued items and the counter
-- GET  /_control/ping     readiness probe used by the harness
function M.control()
  local uri, method = ngx.var.uri, ngx.req.get_method()

  if uri == "/_control/ping" then
    return reply(200, '"pong"')

  elseif uri == "/_control/requests" and method == "GET" then
    local parts = {}
    for i = 1, dict:get("nreq") or 0 do
      parts[#parts + 1] = dict:get("req:" .. i)
    end
    return reply(200, "[" .. table.concat(parts, ",") .. "]")

  elseif uri == "/_control/reset" and method == "POST" then
    dict:flush_all()
    dict:flush_expired()  -- flush_all only marks items expired; free them now
    return reply(200, "true")

  elseif uri == "/_control/script" and method == "POST" then
    local ok, items = pcall(cjson.decode, request_body())
    if not ok or type(items) ~= "table" then
      return reply(400, cjson.encode { error = "script: body must be a JSON array" })
    end
    for i, item in ipairs(items) do
      if type(item) ~= "table" then
        return reply(400, cjson.encode { error = "script: item " .. i .. " is not an object" })
      end
      local tail = dict:incr("script:tail", 1, 0)
      local stored, err = dict:safe_set("script:" .. tail, cjson.encode(item))
      if not stored then
        return reply(500, cjson.encode { error = "script: cannot store item: " .. tostring(err) })
      end
    end
    return reply(200, tostring(#items))
  end

  return reply(404, cjson.encode { error = "unknown control endpoint " .. method .. " " .. uri })
end

-- Records the request, then answers it as scripted.
function M.serve()
  local body = request_body()
  ngx.update_time()  -- ngx.now() is cached per event-loop iteration

  local n = dict:incr("nreq", 1, 0)
  local item = next_item() or {}
  local headers = ngx.req.get_headers(0)  -- 0: no limit; names come lowercased
  local record = {
    method = ngx.req.get_method(),
    path = ngx.var.request_uri,
    headers = headers,
    body = body,
    connection = tonumber(ngx.var.connection),
    connection_requests = tonumber(ngx.var.connection_requests),
    time = ngx.now(),
    answer = item,   -- the script item it gets ({}: the default answer)
  }
  local stored, err = dict:safe_set("req:" .. n, cjson.encode(record))
  if not stored then
    ngx.log(ngx.ERR, "testserver: cannot record request ", n, ": ", err)
    return reply(500, cjson.encode { error = "testserver: cannot record request: " .. tostring(err) })
  end

  local delay = tonumber(item.delay)
  if delay and delay > 0 then ngx.sleep(delay) end

  if item.drop then
    -- 444 is nginx's "close the connection without sending anything".
    return ngx.exit(444)
  end

  local status = tonumber(item.status) or 200
  local res_body = item.body
  if tonumber(item.body_bytes) then res_body = string.rep("x", tonumber(item.body_bytes)) end
  if type(res_body) ~= "string" then
    -- No body given: successes carry the default request id, anything else is empty.
    if status == 200 or status == 201 then
      res_body = cjson.encode { request_id = "req-" .. n }
    else
      res_body = ""
    end
  end
  local res = {
    status = status,
    headers = type(item.headers) == "table" and item.headers or {},
    body = res_body,
    chunked = item.chunked and true or nil,
  }

  if item.close then
    -- Re-dispatch to the location with keepalive_timeout 0 (see nginx.conf); ngx.exec
    -- clears ngx.ctx, so the response travels in the query string.
    return ngx.exec(CLOSE_LOCATION, { res = cjson.encode(res) })
  end
  return respond(res)
end

-- Content handler of the internal close location.
function M.respond_closing()
  return respond(cjson.decode(ngx.req.get_uri_args().res))
end

return M
