-- stella.client: validate, encode and POST requests, with retries.
local core = require "stella.core"
local errors = require "stella.error"

local assert, error, ipairs, pairs, setmetatable, getmetatable, tostring, type, tonumber =
      assert, error, ipairs, pairs, setmetatable, getmetatable, tostring, type, tonumber
local floor, random = math.floor, math.random

local cjson_ok, cjson = pcall(require, "cjson.safe")

local M = {}

local DEFAULT_BASE_URL = core.default_base_url
local KNOWN_OPTIONS = {
  api_key = true, keys = true, mode = true, base_url = true, timeout = true,
  connect_timeout = true, retry = true, channels = true, user_agent = true, ca_file = true,
  transport = true, sleep = true, random = true, breaker = true,
}

-- The circuit breaker's defaults: after this many connection-level failures in a row
-- (no answer: refused, reset, timed out), the client stops trying for `cooldown` seconds.
local BREAKER_DEFAULTS = { failures = 5, cooldown = 30 }

local STRING_OPTIONS = { "base_url", "user_agent", "ca_file" }   -- api_key: pick_key

local Client = {}
Client.__index = Client

local in_cosocket_phase = require("stella.openresty.phase").cosockets

-- The transport factory stella.new uses without opts.transport: cosockets where nginx
-- offers them (libcurl would block the whole worker), libcurl everywhere else.
function M.default_transport()
  if in_cosocket_phase() then return require("stella.transport.cosocket").new end
  return require("stella.transport.curl").new
end

-- The pause between retries: ngx.sleep where it can run (the worker keeps serving),
-- else a blocking sleep.
local function default_sleep(seconds)
  if in_cosocket_phase() then return rawget(_G, "ngx").sleep(seconds) end
  return core.sleep(seconds)
end

-- Accepts {"phone","chat"} or {phone=true, chat=true}; returns a sorted list.
function M.channel_list(channels)
  if channels == nil then return nil end
  if type(channels) ~= "table" then error("channels must be a table", 3) end
  local list, seen = {}, {}
  for k, v in pairs(channels) do
    local name = type(k) == "number" and v or k
    if type(name) ~= "string" or name == "" then
      error("channels must be a list of channel names or a set {name=true}", 3)
    end
    if (type(k) ~= "number" and v) and not seen[name] then list[#list + 1] = name; seen[name] = true
    elseif type(k) == "number" and not seen[name] then list[#list + 1] = name; seen[name] = true end
  end
  table.sort(list)
  return list
end

local function key_hint(key)
  return "..." .. key:sub(-4)
end

local function pick_key(opts)
  if opts.api_key ~= nil and opts.keys ~= nil then
    error("stella.new: give api_key or keys, not both", 3)
  end
  if opts.api_key ~= nil then
    if type(opts.api_key) ~= "string" then error("stella.new: api_key must be a string", 3) end
    return opts.api_key, opts.mode or "custom"
  end
  if type(opts.keys) ~= "table" then
    error("stella.new: an API key is required (api_key = ..., or keys = { test = ..., production = ... })", 3)
  end
  local mode = opts.mode or "test"
  if mode ~= "test" and mode ~= "production" then
    error("stella.new: mode must be \"test\" or \"production\"", 3)
  end
  local key = opts.keys[mode]
  if type(key) ~= "string" then error("stella.new: keys." .. mode .. " is missing", 3) end
  return key, mode
end

local function positive(opts, name, default)
  local v = opts[name]
  if v == nil then return default end
  if type(v) ~= "number" or not (v > 0) then
    error("stella.new: " .. name .. " must be a positive number of seconds", 3)
  end
  return v
end

-- The breaker's state from opts.breaker (nil: the defaults; false: none). A client and
-- its clones share one (a clone talks to the same host).
local function new_breaker(b)
  if b == false then return nil end
  if b ~= nil and type(b) ~= "table" then error("stella.new: breaker must be a table or false", 3) end
  b = b or {}
  for k in pairs(b) do
    if k ~= "failures" and k ~= "cooldown" and k ~= "clock" then
      error("stella.new: unknown breaker option " .. tostring(k), 3)
    end
  end
  local failures, cooldown = b.failures or BREAKER_DEFAULTS.failures, b.cooldown or BREAKER_DEFAULTS.cooldown
  if type(failures) ~= "number" or failures < 1 or failures ~= floor(failures) then
    error("stella.new: breaker.failures must be a whole number >= 1", 3)
  end
  if type(cooldown) ~= "number" or not (cooldown >= 0) then
    error("stella.new: breaker.cooldown must be a number of seconds >= 0", 3)
  end
  if b.clock ~= nil and type(b.clock) ~= "function" then error("stella.new: breaker.clock must be a function", 3) end
  return { threshold = failures, cooldown = cooldown, clock = b.clock or os.time, failures = 0,
           open_until = nil, last = nil }
end

function M.new(opts, shared_breaker)
  if type(opts) ~= "table" then error("stella.new: options table expected", 2) end
  for k in pairs(opts) do
    if not KNOWN_OPTIONS[k] then error("stella.new: unknown option " .. tostring(k), 2) end
  end
  for _, k in ipairs(STRING_OPTIONS) do
    if opts[k] ~= nil and type(opts[k]) ~= "string" then
      error("stella.new: option " .. k .. " must be a string", 2)
    end
  end
  local key, mode = pick_key(opts)
  local retry = opts.retry or {}
  if type(retry) ~= "table" then error("stella.new: retry must be a table", 2) end
  local attempts = retry.attempts or 3
  if type(attempts) ~= "number" or attempts < 1 or attempts ~= floor(attempts) then
    error("stella.new: retry.attempts must be a whole number >= 1", 2)
  end
  local self = setmetatable({
    mode = mode,
    base_url = opts.base_url or DEFAULT_BASE_URL,
    channels = M.channel_list(opts.channels),
    encode_opts = opts.channels ~= nil and { channels = M.channel_list(opts.channels) } or nil,
    timeout = positive(opts, "timeout", 30),
    attempts = attempts,
    base_delay = retry.base_delay or 0.5,
    max_delay = retry.max_delay or 30,
    sleep = opts.sleep or default_sleep,
    random = opts.random or random,
    breaker = shared_breaker or new_breaker(opts.breaker),
  }, Client)
  local transport_new = opts.transport or M.default_transport()
  if type(transport_new) == "table" then transport_new = transport_new.new end
  local transport, terr = transport_new({
    base_url = self.base_url, api_key = key, user_agent = opts.user_agent,
    ca_file = opts.ca_file, timeout = self.timeout,
    connect_timeout = positive(opts, "connect_timeout", 10),
  })
  if not transport then error("stella.new: " .. tostring(terr), 2) end
  self.transport = transport
  -- the key is kept only where redaction needs it, behind a closure, so it is
  -- not a field a dump or a log of the client would show
  self.redact = function(text) return errors.redact(text, key) end
  -- a twin with the same options (and so its own connection), for concurrent sends;
  -- a closure too, for the same reason
  local same = {}
  for k, v in pairs(opts) do same[k] = v end
  local breaker = self.breaker
  self.spawn = function() return M.new(same, breaker) end
  self.key_hint = key_hint(key)
  self.key_id = require("stella.rate_limit").key_id(key)   -- names the key in Redis (a hash of it)
  return self
end

-- client:clone() -> a new client with the same options: its own transport and connection
-- (close it too). The trigger's `connections` option sends over such clones.
function Client:clone()
  return self.spawn()
end

function Client:__tostring()
  return ("stella.client (%s mode, key %s, %s)%s"):format(self.mode, self.key_hint, self.base_url,
    self.transport and "" or " closed")
end

local function decode_body(body, content_type)
  if body == "" then return body end
  if cjson_ok and (content_type and content_type:find("json", 1, true) or body:match("^%s*[{%[]")) then
    local v = cjson.decode(body)
    if v ~= nil then return v end
  end
  return body
end

local function request_id_of(body)
  if type(body) ~= "table" then return nil end
  local id = body.request_id
  if id == nil then id = body.id end
  if type(id) == "number" and id == floor(id) and id > -2^53 and id < 2^53 then
    return ("%d"):format(id)   -- cjson gives 5.4 floats: 42 must not become "42.0"
  end
  if type(id) == "string" or type(id) == "number" then return tostring(id) end
  return nil
end

local OUTCOMES, classify_status = core.outcomes, core.classify_status

-- status -> its outcome's row, filled from classify_status as statuses are met (the
-- mapping itself stays in the C core's table)
local STATUS_OUTCOME = setmetatable({}, { __index = function(t, status)
  local o = OUTCOMES[classify_status(status)]
  if type(status) == "number" and status == floor(status) and status >= 0 and status < 1000 then
    t[status] = o
  end
  return o
end })

-- An outcome's message template (stella_outcome.c) with its {placeholders} filled.
local function message_of(o, vars)
  return (o.message:gsub("{(%w+)}", vars))
end

-- An answered attempt that is not a success -> err.
local function http_error(self, o, r, path)
  local url = self.base_url .. path
  local text = self.redact(r.body)
  local msg = message_of(o, { status = r.status, key = self.key_hint, url = url,
                              mode = self.mode == "production" and "production" or "test" })
  if type(text) == "string" and text ~= "" then
    msg = msg .. ": " .. (#text > 300 and text:sub(1, 300) .. "..." or text)
  end
  return errors.new{ kind = o.kind, status = r.status, message = msg, retryable = o.retryable,
                     body = decode_body(text, nil) }
end

-- A transport failure (no answer) -> err.
local function transport_error(self, o, r)
  local detail = self.redact(r.message or r.failure)
  return errors.new{ kind = o.kind, retryable = o.retryable, failure = r.failure,
                     message = message_of(o, { timeout = self.timeout, detail = detail }) }
end

-- One attempt's response (what transport:post returned: an answer { status, body,
-- content_type, retry_after } or a failure { failure, message }), classified by the C
-- core's outcome table -> res | nil, err, retry_after_ms.
local function answer(self, path, attempt, r)
  local status = type(r) == "table" and r.status
  local o
  if status then o = STATUS_OUTCOME[status] else o = OUTCOMES[type(r) == "table" and r.failure] end
  if o == nil or o.answered ~= (status ~= nil) then
    error("transport:post must return { status = ... } or { failure = NAME } with NAME one of "
      .. "timeout, network, protocol, tls, internal", 2)
  end
  if o.kind == nil then
    local decoded = decode_body(r.body, r.content_type)
    return { status = status, request_id = request_id_of(decoded), body = decoded,
             attempts = attempt }
  end
  local err = status and http_error(self, o, r, path) or transport_error(self, o, r)
  err.attempts = attempt
  return nil, err, status and r.retry_after
end

-- The circuit breaker ------------------------------------------------------------------
-- Counts connection-level failures in a row (no answer, and retryable: refused, reset,
-- timed out); any answer resets the count. At `failures` it opens: for `cooldown`
-- seconds post fails at once with kind "circuit_open", nothing sent; then one attempt
-- goes through (half open): an answer closes it, another failure opens it again.
local function note(self, err)
  local b = self.breaker
  if not b then return end
  if err and err.retryable and err.failure then
    b.failures = b.failures + 1
    b.last = err.message
    if b.failures >= b.threshold then b.open_until = b.clock() + b.cooldown end
  else
    b.failures, b.open_until = 0, nil
  end
end

-- true while the breaker is open (no attempt may go out)
local function is_open(self)
  local b = self.breaker
  return b ~= nil and b.open_until ~= nil and b.clock() < b.open_until
end

local function circuit_open(self)
  local b = self.breaker
  return errors.new{ kind = "circuit_open", retryable = true, handed_back = true, attempts = 0,
    message = ("not sent: the circuit breaker is open after %d failed connections in a row to %s "
      .. "(the last: %s); nothing is tried for %g s"):format(b.failures, self.base_url,
      tostring(b.last), b.cooldown) }
end

-- client:circuit() -> "closed" | "open" | "half_open" (the next attempt is a trial),
-- consecutive failures; "none" without a breaker.
function Client:circuit()
  local b = self.breaker
  if not b then return "none", 0 end
  if b.open_until == nil then return "closed", b.failures end
  return is_open(self) and "open" or "half_open", b.failures
end

-- The retries after attempt number `attempt` failed with err: pause, post again, while
-- the error is retryable and attempts remain. Returns res | nil, err.
-- A sleep that returns false (core.sleep once a signal was caught) ends the retries, as
-- does an open circuit breaker: the last error stands.
-- A 429 goes first to the client's on_rate_limited(err, retry_after_ms), when it has one
-- (the fleet's rate limit, stella.rate_limit): true from it means no retry here (the
-- request goes back to the outbox, due when the key's pause ends).
local function handed_over(self, err, retry_after)
  local f = self.on_rate_limited
  return f ~= nil and err.kind == "rate_limited" and f(err, retry_after) == true
end

local function retry(self, path, body, attempt, err, retry_after)
  while err.retryable and not handed_over(self, err, retry_after) and attempt < self.attempts
        and not is_open(self) do
    local delay = core.retry_delay(attempt, floor(self.base_delay * 1000),
                                   floor(self.max_delay * 1000), retry_after, self.random())
    if self.sleep(delay / 1000) == false then break end
    if not self.transport then error("attempt to use a closed stella client", 3) end
    attempt = attempt + 1
    local res
    res, err, retry_after = answer(self, path, attempt, self.transport:post(path, body))
    note(self, err)
    if res then return res end
  end
  return nil, err
end

-- client:complete(path, body, response) -> res | nil, err: what post returns, given the
-- transport's response to the first attempt (made here by post, or elsewhere: a
-- background send, stella.client.send_many); makes the retries post makes.
function Client:complete(path, body, response)
  local res, err, ra = answer(self, path, 1, response)
  note(self, err)
  if res then return res end
  return retry(self, path, body, 1, err, ra)
end

-- POST one encoded body with retries. Returns res | nil, err; with the circuit breaker
-- open, nil and a "circuit_open" error at once (nothing sent).
function Client:post(path, body)
  if not self.transport then error("attempt to use a closed stella client", 3) end
  if is_open(self) then return nil, circuit_open(self) end
  return self:complete(path, body, self.transport:post(path, body))
end

-- send_many(list, budget) -> sender | nil: posts list = { client, path, body, client,
-- path, body, ... } one after another on a background thread of the C core, when every
-- client's transport is the libcurl one (nil otherwise, or when no thread can start).
-- First attempts only: the thread stops at the first failure or non-2xx answer, and
-- before any but the first item once `budget` seconds have passed. sender:wait() -> the
-- number attempted; sender:result(k) -> the transport's response to item k, for
-- client:complete; sender:close() gives the clients back (their transports are lent to
-- the thread until then; using one meanwhile waits for the thread).
-- groups (optional, one whole number per item): the clients of a group g > 0 share its
-- items, each taking the next one not taken as soon as it is free (whatever client the
-- list names for it); sender:poster(k) -> the list index of an item of the client that
-- posted item k (its first).
function M.send_many(list, budget, groups)
  local flat = {}
  for i = 1, #list, 3 do
    local c = list[i]
    if getmetatable(c) ~= Client then return nil end   -- a client of the caller's own making
    local t = c.transport
    if not t then error("attempt to use a closed stella client", 2) end
    if type(t) ~= "userdata" then return nil end   -- the C core's client is the only userdata transport
    flat[i], flat[i + 1], flat[i + 2] = t, list[i + 1], list[i + 2]
  end
  return (core.send_many(flat, budget, groups))
end

-- open_lanes() -> an appendable sender of the C core (core.sender_open; see
-- stella.trigger.send), or nil when none can be made.
function M.open_lanes()
  return (core.sender_open())
end

-- core_transport(c) -> the C core's transport of client c (what sender:add takes), or nil
-- when c is not a stella client with the libcurl transport.
function M.core_transport(c)
  if getmetatable(c) ~= Client then return nil end   -- a client of the caller's own making
  local t = c.transport
  if not t then error("attempt to use a closed stella client", 2) end
  if type(t) ~= "userdata" then return nil end   -- the C core's client is the only userdata transport
  return t
end

local function invalid(errs)
  return errors.new{ kind = "invalid", message = "invalid request: " .. errors.summarize(errs),
                     retryable = false, errors = errs, attempts = 0 }
end

function Client:send(req)
  if type(req) ~= "table" then error("client:send: request table expected", 2) end
  local body, errs = core.encode(req, "request", self.encode_opts)
  if not body then return nil, invalid(errs) end
  return self:post("/v1/requests", body)
end

function Client:recover(req)
  if type(req) ~= "table" then error("client:recover: recovery table expected", 2) end
  local body, errs = core.encode(req, "recovery")
  if not body then return nil, invalid(errs) end
  return self:post("/v1/recoveries", body)
end

-- Number of TCP connections the transport has opened (keep-alive check).
function Client:connections()
  return self.transport and self.transport.connects and self.transport:connects() or nil
end

function Client:close()
  local t = self.transport
  self.transport = nil
  if t then t:close() end
end
Client.__close = Client.close
Client.__gc = Client.close

return M
