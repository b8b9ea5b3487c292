-- stella.sandbox.server: the Requests API sandbox inside nginx (its Lua module, LuaJIT).
-- Loaded by files/nginx.conf; lua/stella/sandbox/init.lua starts nginx with it.
--
--   POST /v1/requests     x-api-key, then the schema (stella.validate_json: the C core
--                         parses the body and makes exactly the client's checks, plus
--                         repeated keys and {}/[] mix-ups, which a Lua table cannot
--                         carry), then the company's settings; 200 with the request
--                         echoed, request_id (UUID v4) and delivery
--   POST /v1/recoveries   the same checks for a recovery, which must name a known
--                         feedback request or interaction; 200 {"request_id": ...}
--   GET  /status          the API status page (HTML); GET /status.json the same data
--   /_sandbox/ping        200 "ok TOKEN" (the launcher's); with test_controls: POST /_sandbox/reset,
--                         POST /_sandbox/clock {"advance": seconds}
--
-- Answers: 403 {"message":"Forbidden"} for a missing or unknown key (counted, not logged);
-- 400 {"errors":[{path,code,message}...]} for schema errors; 400 {"error": LABEL} for the
-- service's processing errors (and the sandbox's own two recovery labels).
--
-- Processing order (the service does not publish one; this follows the order of its
-- status page): employee, customer, channel, brand, language. For recoveries: employee
-- (when given), then the original request.
--
-- One nginx worker: nothing between reading and writing a mark yields, so the checks
-- need no locks, and an accepted request's writes can wait in the worker for one batched
-- flush (see "batched" below) that every reader runs first. State lives in four
-- lua_shared_dicts (ids, marks, log, counts: see files/nginx.conf and
-- stella.sandbox.status).
local cjson = require "cjson.safe"
local stella = require "stella"
local config = require "stella.sandbox.config"
local status = require "stella.sandbox.status"
local check_json = require "stella.check_json"

local ngx = ngx
local ngx_now, ngx_print, ngx_say, ngx_header = ngx.now, ngx.print, ngx.say, ngx.header
local req_read_body, req_get_body_data, req_get_body_file, req_get_method =
      ngx.req.read_body, ngx.req.get_body_data, ngx.req.get_body_file, ngx.req.get_method
local validate_json, encode_json = stella.validate_json, stella.encode_json
local utf8_valid = require("stella.core").utf8_valid
local json_decode, json_encode = cjson.decode, cjson.encode
local fmt, lower, byte, sub, find = string.format, string.lower, string.byte, string.sub, string.find
local floor, random = math.floor, math.random
local bit = require "bit"
local band, bor, bxor, lshift, rshift, tobit =
      bit.band, bit.bor, bit.bxor, bit.lshift, bit.rshift, bit.tobit
local type, tostring, tonumber, pairs, ipairs = type, tostring, tonumber, pairs, ipairs

local M = {}

local LABELS = {
  employee_not_found = "Employee not found",
  deactivated = "Deactivated employee",
  profile = "Employee profile not complete",
  customer = "Invalid customer",
  channel_disabled = "Channel not enabled for company",
  channel_manual = "Channel is in manual mode",
  brand_missing = "Brand signifier not provided",
  brand_invalid = "Invalid/inactive brand signifier",
  language = "Language not specified",
  -- the sandbox's own, for recoveries (the service publishes none)
  request_unknown = "Feedback request not found",
  interaction_unknown = "Interaction not found",
}
M.LABELS = LABELS

local FORBIDDEN = '{"message":"Forbidden"}'
local NOT_ALLOWED = '{"message":"Method Not Allowed"}'
local DAY = 86400
local MINUTE_TTL = 25 * 3600      -- per-minute buckets cover the status page's 24 hours
local BODY_KEEP = 8192            -- bytes of an invalid body kept for the status page

local FLUSH_EVERY = 0.05   -- seconds between flushes of the batched writes (see flush)
local flush

local conf          -- the normalised config, loaded in init_by_lua (shared by the workers)
local assets        -- the status page's template, style and script
local logs, ids, marks, counts   -- the shared dicts (see files/nginx.conf)
local log_limit

---------------------------------------------------------------------------
-- Start-up
---------------------------------------------------------------------------

local function read_asset(dir, name)
  local f = assert(io.open(dir .. "/" .. name, "rb"), "sandbox: cannot read " .. dir .. "/" .. name)
  local s = f:read("*a")
  f:close()
  return s
end

-- init_by_lua: load and check the config (an error stops nginx, with the reason in
-- error.log) and the status page's files.
local token = ""    -- the launcher's, answered by /_sandbox/ping

function M.init(config_file, sandbox_dir, start_token)
  token = start_token or ""
  local c, err = config.load(config_file)
  if not c then error(err, 0) end
  c.error_labels = {}
  for _, label in pairs(LABELS) do c.error_labels[label] = true end
  conf = c
  log_limit = c.log_limit
  assets = {
    html = read_asset(sandbox_dir, "status.html"),
    css = read_asset(sandbox_dir, "status.css"),
    js = read_asset(sandbox_dir, "status.js"),
  }
  -- fail now, not on the first request, when the LuaJIT core cannot be loaded
  assert(validate_json, "sandbox: the stella core has no validate_json (rebuild: make LUA=luajit)")
  assert(encode_json('{"customer":{"name":"a","email":"a@example.com"},'
    .. '"employee":{"email":"e@example.com"},"channel":"phone","ext_interaction_id":"1"}'))
end

-- init_worker_by_lua: the dicts, and math.random seeded from the kernel (it draws the
-- key of the request ids).
function M.init_worker()
  logs = ngx.shared.stella_sandbox_log
  ids = ngx.shared.stella_sandbox_ids
  marks = ngx.shared.stella_sandbox_marks
  counts = ngx.shared.stella_sandbox_counts
  local seed = floor(ngx_now() * 1000) + ngx.worker.pid()
  local f = io.open("/dev/urandom", "rb")
  if f then
    local b = f:read(6)
    f:close()
    if b and #b == 6 then
      local a1, a2, a3, a4, a5, a6 = byte(b, 1, 6)
      seed = ((((a1 * 256 + a2) * 256 + a3) * 256 + a4) * 256 + a5) * 256 + a6
    end
  end
  math.randomseed(seed)
  local ok, err = ngx.timer.every(FLUSH_EVERY, flush)
  if not ok then ngx.log(ngx.ERR, "sandbox: no flush timer: ", err) end
end

---------------------------------------------------------------------------
-- Helpers
---------------------------------------------------------------------------

-- The sandbox's clock: real time, moved forward by /_sandbox/clock (test_controls).
local function now()
  local t = ngx_now()
  if conf.test_controls then t = t + (counts:get("clock") or 0) end
  return t
end

---------------------------------------------------------------------------
-- Request ids
--
-- Every accepted call takes the next number of its key mode (the counters q:test and
-- q:production, which also place its row in the status log). Its request id is that
-- number through a keyed 32-bit permutation, followed by 90 bits of a keyed hash of it,
-- laid out as a UUID v4: random-looking, unique, and naming its request without a table
-- of ids (one new shared-dict key per request would cost more than all the checks). An
-- id is known when it decodes to a number already issued to that key mode and encodes
-- back to itself. The key comes from a random seed in the counts dict; a reset draws a
-- new one, so ids do not repeat.
---------------------------------------------------------------------------

local K = {}         -- 8 round keys, from the seed
local K_seed         -- the seed they came from

-- A keyed 32-bit mix: shifts, additions and xors only (exact in LuaJIT's doubles).
local function mix(x, k)
  x = bxor(x, k)
  x = tobit(x + lshift(x, 10))
  x = bxor(x, rshift(x, 6))
  x = tobit(x + lshift(x, 3))
  x = bxor(x, rshift(x, 11))
  return tobit(x + lshift(x, 15))
end

local function load_keys()
  if K_seed then return end    -- one worker: a reset (M.control) forgets it
  local seed = counts:get("seed")
  if not seed then
    counts:add("seed", random(1, 0x7fffffff) * 0x200000 + random(0, 0x1fffff))
    seed = counts:get("seed")
  end
  if seed ~= K_seed then
    local lo, hi = tobit(seed % 0x100000000), tobit(floor(seed / 0x100000000))
    for i = 1, 8 do K[i] = mix(mix(bxor(lo, i * 0x9e3779b), hi), lo) end
    K_seed = seed
  end
end

-- a 4-round Feistel network on 16-bit halves: a bijection of 32-bit numbers (the rounds
-- written out: a 4-turn loop is a trace of its own, entered and left on every request)
local function permute(v)
  local l, r = band(rshift(v, 16), 0xffff), band(v, 0xffff)
  l, r = r, bxor(l, band(mix(r, K[1]), 0xffff))
  l, r = r, bxor(l, band(mix(r, K[2]), 0xffff))
  l, r = r, bxor(l, band(mix(r, K[3]), 0xffff))
  l, r = r, bxor(l, band(mix(r, K[4]), 0xffff))
  return bor(lshift(l, 16), r)
end

local function unpermute(v)
  local l, r = band(rshift(v, 16), 0xffff), band(v, 0xffff)
  for i = 4, 1, -1 do l, r = bxor(r, band(mix(l, K[i]), 0xffff)), l end
  return bor(lshift(l, 16), r) % 0x100000000
end

local MODE_KEY = { test = 0, production = 8 }   -- index into K (0: none)

local function request_id(mode, seq)
  local e = permute(seq)
  local mk = MODE_KEY[mode]
  local w1 = mix(mk > 0 and bxor(e, K[mk]) or e, K[5])
  local w2 = mix(w1, K[6])
  local w3 = mix(bxor(w2, e), K[7])
  -- one format: six bit.tohex strings and their concatenation cost three times as much
  return fmt("%08x-%04x-4%03x-%04x-%04x%08x", e % 0x100000000, band(w1, 0xffff),
             band(rshift(w1, 16), 0xfff), bor(0x8000, band(w2, 0x3fff)), rshift(w2, 16),
             w3 % 0x100000000)
end

local QUEUE = { test = "q:test", production = "q:production" }
local TAB = { test = "test", production = "delivered" }

-- The number of an id issued to this key mode, or nil.
local function issued(mode, id)
  if type(id) ~= "string" then return nil end
  id = lower(id)
  local a = id:match("^(%x%x%x%x%x%x%x%x)%-%x%x%x%x%-4%x%x%x%-[89ab]%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$")
  if not a then return nil end
  load_keys()
  local seq = unpermute(tonumber(a, 16))
  if seq < 1 or seq > (counts:get(QUEUE[mode]) or 0) then return nil end
  if request_id(mode, seq) ~= id then return nil end
  return seq
end

local function reply(status, body)
  ngx.status = status
  ngx_print(body)
end

local function body_text()
  req_read_body()
  local body = req_get_body_data()
  if body then return body end
  local path = req_get_body_file()
  if not path then return "" end
  local f = io.open(path, "rb")
  if not f then return "" end
  body = f:read("*a")
  f:close()
  return body
end

-- The x-api-key's mode ("test" | "production"), or nil after answering 403.
local function authenticate()
  local key = ngx.var.http_x_api_key
  local mode = key and conf.modes[key]
  if not mode then
    counts:incr("auth", 1, 0)
    reply(403, FORBIDDEN)
    return nil
  end
  if req_get_method() ~= "POST" then
    ngx.header["Allow"] = "POST"
    reply(405, NOT_ALLOWED)
    return nil
  end
  return mode
end

-- Counts one call in its minute (and as an error) for the error rate.
local function count_call(t, is_error)
  local m = floor(t / 60)
  counts:incr("m:" .. m, 1, 0, MINUTE_TTL)
  if is_error then counts:incr("x:" .. m, 1, 0, MINUTE_TTL) end
end

-- Puts the row of call number seq into a tab of the status page (a ring of log_limit
-- rows per tab). With `body`, the row is `row .. body .. "}"`, kept in two parts (see
-- stella.sandbox.status.row): a request's row is mostly its body, and building one long
-- string per request costs more than a second dict entry (LuaJIT hashes a long string
-- from a few sampled bytes, so rows that differ only in their id all collide).
local function put_row(tab, seq, row, body)
  local slot = tab .. ":" .. (seq % log_limit)
  if body then logs:set("r:" .. slot, body) else logs:delete("r:" .. slot) end
  logs:set("l:" .. slot, row)
end

---------------------------------------------------------------------------
-- The accepted requests' writes, batched: a request's row, its interaction's id and its
-- counters wait in this worker's tables and reach the dicts in one loop (flush), run by a
-- timer every FLUSH_EVERY seconds and before anything reads them (the status pages,
-- recoveries, the controls). One worker: every reader is in this worker, so none sees a
-- dict without its pending writes. A flush writes only what the dicts keep: the newest
-- log_limit rows of each tab, the latest id of each interaction.
---------------------------------------------------------------------------

local FLUSH_AT = 8192                  -- pending rows that force a flush
local pend_n = 0
local p_tab, p_seq, p_time, p_id, p_mode, p_delivery, p_to, p_until, p_body, p_ikey =
      {}, {}, {}, {}, {}, {}, {}, {}, {}, {}
local p_counts, p_minutes = {}, {}     -- key -> n (p_minutes: with MINUTE_TTL)
-- The marks this worker has read (key -> until), so a suppressed customer's next request
-- skips the dict; one worker writes every mark, and a reset empties it.
local MARK_CACHE_MAX = 10000
local mark_cache, mark_cached = {}, 0
local q_next = {}   -- mode -> the last number given (q:MODE with the pending ones added)
local p_any = false

function flush()    -- (declared above init_worker, which starts its timer)
  if not p_any then return end
  p_any = false
  local n = pend_n
  pend_n = 0
  local written, seen = {}, {}
  for i = n, 1, -1 do
    local tab = p_tab[i]
    local w = written[tab] or 0
    if w < log_limit then
      written[tab] = w + 1
      -- e-mail addresses hold no '"' or '\' (the schema's e-mail check): no escaping
      local to, until_t = p_to[i], p_until[i]
      put_row(tab, p_seq[i], '{"time":' .. fmt("%.3f", p_time[i])
        .. ',"request_id":"' .. p_id[i] .. '","mode":"' .. p_mode[i] .. '","call":"request","delivery":"'
        .. p_delivery[i] .. '"' .. (to and (',"to":"' .. to .. '"') or "")
        .. (until_t and (',"until":' .. fmt("%.0f", until_t)) or "") .. ',"request":', p_body[i])
    end
    local ik = p_ikey[i]
    if not seen[ik] then
      seen[ik] = true
      ids:set(ik, p_id[i])
    end
  end
  for i = 1, n do p_id[i], p_to[i], p_until[i], p_body[i], p_ikey[i] = nil, nil, nil, nil, nil end
  for k, v in pairs(p_minutes) do
    counts:incr(k, v, 0, MINUTE_TTL)
    p_minutes[k] = nil
  end
  for k, v in pairs(p_counts) do
    counts:incr(k, v, 0)
    p_counts[k] = nil
  end
  q_next.test, q_next.production = nil, nil
end
M.flush = flush

-- Forgets the pending writes (a reset).
local function drop_pending()
  for i = 1, pend_n do p_id[i], p_to[i], p_until[i], p_body[i], p_ikey[i] = nil, nil, nil, nil, nil end
  pend_n, p_any = 0, false
  for k in pairs(p_minutes) do p_minutes[k] = nil end
  for k in pairs(p_counts) do p_counts[k] = nil end
  q_next.test, q_next.production = nil, nil
  mark_cache, mark_cached = {}, 0
end

local minute_of, minute_key = nil, nil
local D_KEY = {}
for _, mode in ipairs{ "test", "production" } do
  D_KEY[mode] = {}
  for _, d in ipairs{ "test_inbox", "customer", "suppressed", "unsubscribed", "do_not_send" } do
    D_KEY[mode][d] = "d:" .. mode .. ":" .. d
  end
end

local function pend(tab, seq, t, id, mode, delivery, to, until_t, body, ikey, dkey)
  local i = pend_n + 1
  pend_n, p_any = i, true
  p_tab[i], p_seq[i], p_time[i], p_id[i], p_mode[i], p_delivery[i] = tab, seq, t, id, mode, delivery
  p_to[i], p_until[i], p_body[i], p_ikey[i] = to or false, until_t or false, body, ikey
  local m = floor(t / 60)
  if m ~= minute_of then minute_of, minute_key = m, "m:" .. m end
  p_minutes[minute_key] = (p_minutes[minute_key] or 0) + 1
  p_counts[dkey] = (p_counts[dkey] or 0) + 1
  p_counts[QUEUE[mode]] = (p_counts[QUEUE[mode]] or 0) + 1
  if i >= FLUSH_AT then flush() end
end

-- A row must stay valid JSON text: a body that is not UTF-8 (answered invalid_utf8) keeps
-- its ASCII, every other byte shown as U+FFFD.
local function utf8_row(row)
  if utf8_valid(row) then return row end
  return (row:gsub("[\128-\255]", "\239\191\189"))
end

-- Logs the call under Invalid Requests; returns 400 and the answer. `label` is a processing error,
-- `errors` a list of schema errors.
local function reject(t, mode, call, body, label, errors)
  count_call(t, true)
  if label then
    counts:incr("e:" .. label, 1, 0)
  else
    local seen = {}
    for _, e in ipairs(errors) do
      if not seen[e.code] then
        seen[e.code] = true
        counts:incr("e:schema:" .. tostring(e.code), 1, 0)
      end
    end
  end
  if #body > BODY_KEEP then body = sub(body, 1, BODY_KEEP) end
  put_row("invalid", counts:incr("q:invalid", 1, 0), utf8_row(json_encode{
    time = t, mode = mode, call = call, error = label, errors = errors, body = body,
  } or "{}"))
  if label then return 400, json_encode{ error = label } end
  return 400, json_encode{ errors = errors }
end

-- nil when the body can be a JSON object, else the schema-style error list (validate_json
-- reports everything else: a syntax error as invalid_json, with its line and column).
local function not_an_object(body)
  if byte(body, 1) == 123 then return nil end   -- "{": the usual case
  local first = find(body, "%S")
  if first and byte(body, first) == 123 then return nil end
  return { { path = "", code = "invalid_json", message = "the body must be a JSON object" } }
end

local function id_text(v)
  if type(v) == "number" then return fmt("%.0f", v) end
  return v
end

-- (lemail: the employee's e-mail in lower case, or nil)
local function employee_error(lemail, custom_id)
  local a = lemail and conf.by_email[lemail]
  local b = custom_id and conf.by_custom_id[custom_id]
  if (lemail and not a) or (custom_id and not b) or (a and b and a ~= b) then
    return LABELS.employee_not_found
  end
  local e = a or b
  if not e.active then return LABELS.deactivated end
  if not e.profile_complete then return LABELS.profile end
  return nil
end

-- A customer the service cannot deliver to: listed in invalid_customers, or an address
-- whose domain has no dot (valid for the schema, e.g. jane@localhost, but not on the
-- internet).
local function customer_error(e)
  if conf.invalid_customer_set[e] then return LABELS.customer end
  -- the last "@" (plain finds, which LuaJIT compiles, rather than a loop over the bytes)
  local at = find(e, "@", 1, true)
  if not at then return LABELS.customer end
  local more = find(e, "@", at + 1, true)
  while more do at, more = more, find(e, "@", more + 1, true) end
  if not find(e, ".", at + 1, true) then return LABELS.customer end
  return nil
end

---------------------------------------------------------------------------
-- POST /v1/requests
---------------------------------------------------------------------------

-- The body without its closing "}" (and what follows it): a valid JSON object's members.
local function echo_head(body)
  local last = #body
  while byte(body, last) ~= 125 do last = last - 1 end   -- its closing "}"
  return sub(body, 1, last - 1)
end

-- What a request's checks read of a valid body (stella.check_json: under LuaJIT the C
-- core's check is an FFI call, compiled into the handler's trace, and only the values
-- read become Lua strings).
local F_EMP_EMAIL, F_EMP_ID, F_EMAIL, F_CHANNEL, F_BRAND, F_LANGUAGE, F_DO_NOT_SEND, F_IX = 1, 2, 3, 4, 5, 6, 7, 8
local request_check = check_json.new("request", { "employee.email", "employee.custom_id", "customer.email",
                                                  "channel", "brand", "language", "do_not_send",
                                                  "ext_interaction_id" })
M.request_check = request_check

-- A request body -> status, answer; for 200, the answer is the body without its closing
-- "}", then the request id and the delivery (M.requests prints the echo from these).
-- (Public for a profile of the Lua side; M.requests is the handler.)
function M.handle_request(mode, body, t)
  local perr = not_an_object(body)
  if perr then return reject(t, mode, "request", body, nil, perr) end
  -- the C core: the checks the client makes before sending, on the text itself
  local rc = request_check
  local ok, errors = rc:check(body)
  if not ok then return reject(t, mode, "request", body, nil, errors) end

  local label = employee_error(rc:present(F_EMP_EMAIL) and rc:lower(F_EMP_EMAIL) or nil, rc:get(F_EMP_ID))
  local lemail = rc:lower(F_EMAIL)
  if not label then label = customer_error(lemail) end
  local brand = rc:get(F_BRAND)
  if not label then
    local cm = conf.channels[rc:get(F_CHANNEL)]
    if not cm then label = LABELS.channel_disabled
    elseif cm == "manual" and mode == "production" then label = LABELS.channel_manual end
  end
  if not label then
    if brand == nil then
      if conf.multi_brand then label = LABELS.brand_missing end
    else
      local b = conf.brand_by_name[brand]
      if not b or not b.active then label = LABELS.brand_invalid end
    end
  end
  if not label and conf.multi_language and not rc:present(F_LANGUAGE) then label = LABELS.language end
  if label then return reject(t, mode, "request", body, label) end

  -- accepted: where does it go?
  local delivery, to, until_t
  if rc:get(F_DO_NOT_SEND) == true then
    delivery = "do_not_send"
  elseif conf.unsubscribed_set[lemail] then
    delivery = "unsubscribed"
  else
    local days = conf.suppression_days
    if days > 0 then
      local key = "s:" .. mode .. ":" .. (brand or conf.default_brand) .. "\0" .. lemail
      local u = mark_cache[key]
      if not (u and u > t) then u = marks:get(key) end
      if u and u > t then
        delivery, until_t = "suppressed", u
        if mark_cache[key] ~= u then
          if mark_cached >= MARK_CACHE_MAX then mark_cache, mark_cached = {}, 0 end
          mark_cache[key], mark_cached = u, mark_cached + 1
        end
      else
        marks:set(key, t + days * DAY, days * DAY + 3600)
      end
    end
    if not delivery then
      if mode == "test" then delivery, to = "test_inbox", conf.test_email
      else delivery, to = "customer", rc:get(F_EMAIL) end
    end
  end

  load_keys()
  local seq = (q_next[mode] or counts:get(QUEUE[mode]) or 0) + 1   -- its q counter: see pend
  q_next[mode] = seq
  local id = request_id(mode, seq)
  pend(TAB[mode], seq, t, id, mode, delivery, to, until_t, body,
       "i:" .. mode .. ":" .. id_text(rc:get(F_IX)), D_KEY[mode][delivery])
  -- the echo: the body as sent (a valid JSON object) with two more members, as parts for
  -- ngx.print (one long string per request, unlike every other one, would cost LuaJIT's
  -- string table a search through the others: their sampled hashes are all alike)
  return 200, echo_head(body), id, delivery
end

-- the echo's members after the body's own (see M.requests)
local ECHO_ID, ECHO_DELIVERY, ECHO_END = ',"request_id":"', '","delivery":"', '"}'
local ECHO_EXTRA = #ECHO_ID + #ECHO_DELIVERY + #ECHO_END

-- POST /v1/requests
function M.requests()
  local mode = authenticate()
  if not mode then return end
  local status, answer, id, delivery = M.handle_request(mode, body_text(), now())
  if status ~= 200 then
    ngx.status = status
    return ngx_print(answer)
  end
  -- arguments, not a table: no table per request, and ngx.print's C side need not check
  -- that a table is a list
  -- with its length, nginx sends the answer as it is, not in chunks
  ngx_header["Content-Length"] = #answer + #id + #delivery + ECHO_EXTRA
  ngx_print(answer, ECHO_ID, id, ECHO_DELIVERY, delivery, ECHO_END)
end

---------------------------------------------------------------------------
-- POST /v1/recoveries
---------------------------------------------------------------------------

-- The original request of a recovery: its id and its customer's e-mail (nil once its row
-- has left the status log), or nil when it is not a feedback request of this key mode.
local function original_request(mode, id)
  local seq = issued(mode, id)
  if not seq then return nil end
  id = lower(id)
  local row = json_decode(status.row(logs, TAB[mode] .. ":" .. (seq % log_limit)) or "")
  if type(row) == "table" and row.request_id == id then
    if row.call ~= "request" then return nil end     -- a recovery is no feedback request
    local c = type(row.request) == "table" and row.request.customer
    return id, type(c) == "table" and c.email or nil
  end
  return id, nil
end

local RECOVERY_FIELDS = { fields = { "employee", "employee.email", "employee.custom_id",
                                     "initial_feedback_request_id", "ext_interaction_id", "do_not_send" } }

-- A recovery body -> status, answer.
function M.handle_recovery(mode, body, t)
  local perr = not_an_object(body)
  if perr then return reject(t, mode, "recovery", body, nil, perr) end
  local ok, employee, emp_email, emp_id, feedback_id, ix, do_not_send =
    validate_json(body, "recovery", RECOVERY_FIELDS)
  if not ok then return reject(t, mode, "recovery", body, nil, employee) end
  local json = assert(encode_json(body, "recovery"))   -- valid: its canonical form, for the row

  local label = employee and employee_error(emp_email and lower(emp_email), emp_id) or nil
  local original, email
  if not label then
    if feedback_id ~= nil then
      original, email = original_request(mode, id_text(feedback_id))
      if not original then label = LABELS.request_unknown end
    else
      original, email = original_request(mode, ids:get("i:" .. mode .. ":" .. id_text(ix)))
      if not original then label = LABELS.interaction_unknown end
    end
  end
  if label then return reject(t, mode, "recovery", body, label) end

  local delivery, to
  if do_not_send == true then delivery = "do_not_send"
  elseif email and conf.unsubscribed_set[lower(email)] then delivery = "unsubscribed"
  elseif mode == "test" then delivery, to = "test_inbox", conf.test_email
  else delivery, to = "customer", email end     -- the address is unknown once the row is gone

  load_keys()
  local seq = counts:incr(QUEUE[mode], 1, 0)
  local id = request_id(mode, seq)
  count_call(t, false)
  counts:incr("d:" .. mode .. ":" .. delivery, 1, 0)
  -- the row is its start and the canonical request (see put_row), without a decode
  local head = json_encode{
    time = t, request_id = id, mode = mode, call = "recovery", delivery = delivery, to = to,
    original = original,
  }
  put_row(TAB[mode], seq, sub(head, 1, -2) .. ',"request":', json)
  return 200, '{"request_id":"' .. id .. '"}'
end

-- POST /v1/recoveries
function M.recoveries()
  flush()
  local mode = authenticate()
  if not mode then return end
  local status, answer = M.handle_recovery(mode, body_text(), now())
  if status ~= 200 then ngx.status = status end
  ngx_print(answer)
end

---------------------------------------------------------------------------
-- Status
---------------------------------------------------------------------------

local function base_url()
  return "http://" .. (ngx.var.http_host or ("127.0.0.1:" .. ngx.var.server_port))
end

function M.status_page()
  flush()
  if req_get_method() ~= "GET" and req_get_method() ~= "HEAD" then return reply(405, NOT_ALLOWED) end
  ngx_print(status.html(conf, logs, counts, now(), assets, base_url()))
end

function M.status_json()
  flush()
  if req_get_method() ~= "GET" and req_get_method() ~= "HEAD" then return reply(405, NOT_ALLOWED) end
  local limit = tonumber(ngx.var.arg_limit)
  ngx_print(status.json(conf, logs, counts, now(), limit and limit >= 0 and floor(limit) or nil))
end

---------------------------------------------------------------------------
-- /_sandbox/ controls
---------------------------------------------------------------------------

function M.control()
  local uri = ngx.var.uri
  if uri == "/_sandbox/ping" then return ngx_say("ok ", token) end
  if not conf.test_controls then
    return reply(404, '{"message":"Not Found (test_controls is off in the sandbox config)"}')
  end
  if req_get_method() ~= "POST" then return reply(405, NOT_ALLOWED) end
  if uri == "/_sandbox/reset" then
    drop_pending()
    K_seed = nil
    for _, d in ipairs{ logs, ids, marks, counts } do
      d:flush_all()
      d:flush_expired()
    end
    return ngx_say('{"reset":true}')
  elseif uri == "/_sandbox/clock" then
    flush()
    local req = json_decode(body_text())
    local advance = type(req) == "table" and tonumber(req.advance)
    if not advance or advance < 0 then
      return reply(400, '{"error":"give {\\"advance\\": seconds} (0 or more)"}')
    end
    local offset = counts:incr("clock", advance, 0)
    return ngx_say(json_encode{ offset = offset, now = now() })
  end
  return reply(404, '{"message":"Not Found"}')
end

return M
