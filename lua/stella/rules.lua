-- stella.rules: load a rules file and turn an event into a decision.
--
-- Pure Lua 5.1-compatible code with no C module and no I/O beyond loading the
-- file, so the same evaluation can run in Lua 5.4, LuaJIT/OpenResty and a Redis
-- script. Everything it needs from the outside comes in `env`:
--   env.now                 seconds since the epoch
--   env.lookup(mark)        -> until (number) if such a mark is active, else nil
--   env.unsubscribed(email) -> true if the address never receives requests
--   env.zone_offset(name, t) -> seconds east of UTC in time zone `name` at t, or nil
--                              (optional: without it only UTC offsets are zones)
-- and what it wants written comes back as `decision.marks` for the caller to
-- commit only once the request is sent (or safely queued); `decision.send_at`, when the
-- request is to go later (delay, quiet_hours), says when.
local rate_limit = require "stella.rate_limit.settings"

local type, pairs, ipairs, tostring, tonumber, error, pcall, setmetatable, select =
      type, pairs, ipairs, tostring, tonumber, error, pcall, setmetatable, select
local floor, huge = math.floor, math.huge
local lower, byte, format = string.lower, string.byte, string.format
local concat = table.concat
local rawget, rawequal, G = rawget, rawequal, _G
-- 5.1 or 5.2+ loaders (rawget: Redis has neither setfenv nor a readable unset global)
local setfenv, loadstring, load = rawget(G, "setfenv"), rawget(G, "loadstring"), rawget(G, "load")
-- Optional: absent in a Redis script (no debug), in Lua 5.4 (no jit). rawget: Redis raises
-- on reading an unset global.
local debug_lib, jit_lib = rawget(G, "debug"), rawget(G, "jit")
local sethook = type(debug_lib) == "table" and debug_lib.sethook or nil
local gethook = sethook and debug_lib.gethook
local getinfo = sethook and debug_lib.getinfo
local jit_off = type(jit_lib) == "table" and jit_lib.off or nil

local M = {}

local DAY = 86400

-- Keys a rules file may set; anything else is a typo worth an error.
local KNOWN = {
  map = "function", when = "function", channels = "table", exclude_tags = "table",
  do_not_send_tags = "table", brands = "table", default_brand = "string",
  suppression = "table", once_per_interaction = "any", unsubscribes = "table",
  sample = "number", rules = "table", on_alert = "function", alert = "table",
  outbox = "table", budget = "any", retention = "table",
  rate_limit = "any",   -- the fleet's rate limit per API key (stella.rate_limit)
  -- scheduled sends: see "Scheduled sends" below
  delay = "any", event_time = "any", quiet_hours = "table",
  -- read by the client / command line, not by the evaluation
  api_key = "string", keys = "table", mode = "string", base_url = "string",
}

local SAFE_GLOBALS = {
  "assert", "error", "ipairs", "next", "pairs", "pcall", "select", "tonumber", "tostring",
  "type", "unpack", "xpcall", "print", "rawequal", "rawget", "rawlen", "rawset",
  "setmetatable", "getmetatable",
}
local SAFE_LIBS = { "string", "table", "math" }

local function copy_table(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

-- The globals a rules file runs with (its _ENV): no io, no os.execute, no require,
-- unless the caller opts in with allow = { io = true, os = true, require = true }.
-- (Not `env` below: that is what an evaluation is given, the clock and the marks.)
-- Inside Redis (stella.redis_rules) the same function makes the rules' globals: there
-- print, rawlen and os are absent (rawget: Redis raises on reading an unset global).
local function rule_globals(allow)
  local G = _G
  local env = {}
  for _, name in ipairs(SAFE_GLOBALS) do env[name] = rawget(G, name) end
  for _, name in ipairs(SAFE_LIBS) do env[name] = copy_table(G[name]) end
  local os = rawget(G, "os") or {}
  env.os = { time = os.time, clock = os.clock, date = os.date, getenv = os.getenv }
  allow = allow or {}
  if allow.io then env.io = G.io end
  if allow.os then env.os = G.os end
  if allow.require then env.require = G.require end
  env._G = env
  return env
end

M.globals = rule_globals

local function load_chunk(path, env)
  local f, err = io.open(path, "r")
  if not f then return nil, "cannot open rules file " .. tostring(err) end
  local text = f:read("*a")
  f:close()
  if text:sub(1, 1) == "#" then text = "--" .. text end   -- allow a shebang line
  local chunk, cerr
  if setfenv then   -- Lua 5.1 / LuaJIT
    chunk, cerr = loadstring(text, "@" .. path)
    if chunk then setfenv(chunk, env) end
  else
    chunk, cerr = load(text, "@" .. path, "t", env)
  end
  if not chunk then return nil, cerr end
  local ok, rules = pcall(chunk)
  if not ok then return nil, tostring(rules) end
  if type(rules) ~= "table" then
    return nil, path .. ": a rules file must return a table, got " .. type(rules)
  end
  return rules, chunk
end

local function set_of(list, what, lowercase)
  local set = {}
  for k, v in pairs(list) do
    local item = type(k) == "number" and v or k
    if type(item) ~= "string" then error(what .. " must be a list of strings", 0) end
    set[lowercase and lower(item) or item] = true
  end
  return set
end

-- Checks a rules table and returns the compiled form used by evaluate().
-- Raises with a message naming the key on a mistake.
-- The typed fields of a brand; a mistake here would otherwise surface only when an event
-- of that brand comes (or never: a suppression_days of "7" would silently not suppress).
local BRAND_FIELDS = { suppression_days = "number", language = "string", signifier = "string",
                       api_key = "string", keys = "table", mode = "string" }

local function check_brand(b, where)
  for field, want in pairs(BRAND_FIELDS) do
    local v = b[field]
    if v ~= nil and type(v) ~= want then
      error(where .. "." .. field .. " must be a " .. want .. ", got " .. type(v), 0)
    end
  end
  local days = b.suppression_days
  if days ~= nil and not (days >= 0 and days < huge) then
    error(where .. ".suppression_days must be a number of days (0 or more)", 0)
  end
  if b.mode ~= nil and b.mode ~= "test" and b.mode ~= "production" then
    error(where .. ".mode must be \"test\" or \"production\"", 0)
  end
end

-- The tables compile() made (weak keys: a compiled rules table is not kept alive here).
local compiled_set = setmetatable({}, { __mode = "k" })

-- true when v is what compile() (or load()) returned.
function M.is_compiled(v)
  return compiled_set[v] == true
end

-- The rules budget: VM instructions one call of map, when or a custom rule may run before
-- it fails its event with rule_error. Counted, not timed, so a decision does not depend
-- on the machine's load (a dry run decides as the real run does).
M.DEFAULT_BUDGET = 10000000

-- budget = { instructions = N } | false (no limit); absent: the default.
local function compile_budget(b, name)
  if b == nil then return M.DEFAULT_BUDGET end
  if b == false then return nil end
  if type(b) ~= "table" then error(name .. ": budget must be a table or false, got " .. type(b), 0) end
  for k in pairs(b) do
    if k ~= "instructions" then error(name .. ": unknown key 'budget." .. tostring(k) .. "'", 0) end
  end
  local n = b.instructions
  if n == nil then return M.DEFAULT_BUDGET end
  if type(n) ~= "number" or n < 1 or n >= 2^31 or n ~= floor(n) then
    error(name .. ": budget.instructions must be a whole number from 1 to 2^31 - 1", 0)
  end
  return n
end

-- "21:00" -> seconds after midnight | nil
local function clock_time(v)
  if type(v) ~= "string" then return nil end
  local h, m = v:match("^(%d%d?):(%d%d)$")
  h, m = tonumber(h), tonumber(m)
  if not h or h > 23 or m > 59 then return nil end
  return h * 3600 + m * 60
end

local function field_path(v, what)
  if type(v) ~= "string" or not v:match("^[%w_%-]+[%w_%-.]*$") or v:find("..", 1, true) or v:sub(-1) == "." then
    error(what .. " must be a field name like \"solved_at\" or \"requester.time_zone\"", 0)
  end
  local parts = {}
  for part in v:gmatch("[^.]+") do parts[#parts + 1] = part end
  return parts
end

-- The schedule keys (delay, event_time, quiet_hours) checked and compiled; nil when none
-- is set. A named fallback zone is checked by the trigger (it has the zone files).
local QUIET_KEYS = { from = true, to = true, zone_field = true, fallback_zone = true }
local function compile_schedule(spec, name)
  if spec.delay == nil and spec.quiet_hours == nil then
    if spec.event_time ~= nil then error(name .. ": event_time is for delay (there is none)", 0) end
    return nil
  end
  local s = {}
  if spec.delay ~= nil then
    s.delay = M.parse_duration(spec.delay)
    if not s.delay then
      error(name .. ": delay must be a duration like \"2h\", \"90m\" or \"1h30m\", or seconds", 0)
    end
    s.delay_text = type(spec.delay) == "string" and spec.delay or format("%ds", s.delay)
  end
  local et = spec.event_time
  if type(et) == "function" then
    s.event_time_fn = et
  elseif et ~= nil then
    s.event_time_path = field_path(et, name .. ": event_time")
    s.event_time_name = et
  end
  local q = spec.quiet_hours
  if q ~= nil then
    for k in pairs(q) do
      if not QUIET_KEYS[k] then error(name .. ": unknown key 'quiet_hours." .. tostring(k) .. "'", 0) end
    end
    local from, to = clock_time(q.from), clock_time(q.to)
    if not from or not to then
      error(name .. ": quiet_hours.from and quiet_hours.to must be local times like \"21:00\"", 0)
    end
    if from == to then error(name .. ": quiet_hours.from and quiet_hours.to must differ", 0) end
    local fallback = q.fallback_zone or "UTC"
    if type(fallback) ~= "string" or fallback == "" then
      error(name .. ": quiet_hours.fallback_zone must be a time zone name or a UTC offset", 0)
    end
    s.quiet = { from = from, to = to, text = q.from .. "-" .. q.to, fallback = fallback,
                zone_path = q.zone_field ~= nil and field_path(q.zone_field, name .. ": quiet_hours.zone_field") or nil,
                zone_field = q.zone_field }
  end
  return s
end

function M.compile(spec, name)
  name = name or "rules"
  if type(spec) ~= "table" then error(name .. ": rules must be a table", 0) end
  for k, v in pairs(spec) do
    local want = KNOWN[k]
    if not want then error(name .. ": unknown key '" .. tostring(k) .. "'", 0) end
    if want ~= "any" and type(v) ~= want then
      error(name .. ": " .. k .. " must be a " .. want .. ", got " .. type(v), 0)
    end
  end
  local r = {
    source = spec, name = name, map = spec.map, when = spec.when, on_alert = spec.on_alert,
    default_brand = spec.default_brand, rules = {},
  }
  if spec.channels then
    r.channels = {}
    for ch, mode in pairs(spec.channels) do
      if mode ~= "integrated" and mode ~= "manual" then
        error(name .. ": channels." .. tostring(ch) .. " must be \"integrated\" or \"manual\"", 0)
      end
      r.channels[ch] = mode
    end
  end
  r.exclude_tags = spec.exclude_tags and set_of(spec.exclude_tags, name .. ": exclude_tags")
  r.do_not_send_tags = spec.do_not_send_tags and set_of(spec.do_not_send_tags, name .. ": do_not_send_tags")
  r.unsubscribes = spec.unsubscribes and set_of(spec.unsubscribes, name .. ": unsubscribes", true)
  if spec.brands then
    r.brands = {}
    for bname, b in pairs(spec.brands) do
      if type(bname) ~= "string" or type(b) ~= "table" then
        error(name .. ": brands must map a brand name to a table", 0)
      end
      check_brand(b, name .. ": brands." .. bname)
      r.brands[bname] = b
    end
    if r.default_brand and not r.brands[r.default_brand] then
      error(name .. ": default_brand '" .. r.default_brand .. "' is not in brands", 0)
    end
  end
  r.rate_limit = rate_limit.of_rules(spec, name)   -- nil: none (the gate is off)
  if spec.suppression then
    local s = spec.suppression
    local per = s.per or "brand"
    if per ~= "brand" and per ~= "channel" and per ~= "global" then
      error(name .. ": suppression.per must be \"brand\", \"channel\" or \"global\"", 0)
    end
    if type(s.days) ~= "number" or s.days < 0 then
      error(name .. ": suppression.days must be a number of days", 0)
    end
    r.suppression = { days = s.days, per = per }
  end
  local once = spec.once_per_interaction
  if once then
    r.once_days = type(once) == "number" and once or 365
  end
  if spec.sample ~= nil then
    if spec.sample < 0 or spec.sample > 1 then error(name .. ": sample must be between 0 and 1", 0) end
    r.sample = spec.sample
  end
  if spec.retention then
    -- how long the ledger and dead outbox items are kept (read by the trigger's purge)
    for k in pairs(spec.retention) do
      if k ~= "days" then error(name .. ": retention." .. tostring(k) .. " is not a retention setting (days)", 0) end
    end
    local days = spec.retention.days
    if type(days) ~= "number" or not (days > 0) then
      error(name .. ": retention.days must be a number of days above 0 (math.huge: keep everything)", 0)
    end
    r.retention_days = days
  end
  for i, rule in ipairs(spec.rules or {}) do
    if type(rule) ~= "function" then error(name .. ": rules[" .. i .. "] must be a function", 0) end
    r.rules[i] = rule
  end
  r.schedule = compile_schedule(spec, name)
  compiled_set[r] = true
  r.budget = compile_budget(spec.budget, name)
  if r.budget and not sethook then r.budget = nil end   -- no debug library (Redis): no budget
  if r.budget and jit_off then
    -- LuaJIT runs compiled traces without count hooks: the rule functions (and the
    -- functions defined inside them) stay in the interpreter, where the budget holds
    if r.map then jit_off(r.map, true) end
    if r.when then jit_off(r.when, true) end
    if r.schedule and r.schedule.event_time_fn then jit_off(r.schedule.event_time_fn, true) end
    for i = 1, #r.rules do jit_off(r.rules[i], true) end
  end
  return r
end

-- load(path_or_table [, opts]) -> compiled rules | nil, err (file problems).
-- Compiled rules (what load returned before) come back as they are: compiled once.
function M.load(source, opts)
  if compiled_set[source] then return source end
  if type(source) == "table" then return M.compile(source, "rules") end
  if type(source) ~= "string" then error("rules must be a file name, a table or compiled rules", 2) end
  local spec, chunk = load_chunk(source, rule_globals(opts and opts.allow))
  if not spec then return nil, chunk end
  local ok, compiled = pcall(M.compile, spec, source)
  if not ok then return nil, compiled end
  -- the helpers the file's rules call are the file's functions too (see compile)
  if compiled.budget and jit_off then jit_off(chunk, true) end
  return compiled
end

-- Deterministic sampling: a 32-bit string hash (no bit operators: 5.1-safe),
-- mapped to [0, 1).
function M.unit_hash(s)
  local h = 5381
  for i = 1, #s do
    h = (h * 33 + byte(s, i)) % 4294967296
  end
  -- djb2 alone leaves ids of one length (sequential ticket numbers) in one narrow band
  -- of [0, 1): spread it with Fibonacci hashing, h * floor(2^32 / phi) mod 2^32, in two
  -- 16-bit halves so every product stays exact in a double.
  local hi, lo = floor(h / 65536), h % 65536
  h = ((hi * 2654435769) % 65536 * 65536 + lo * 2654435769) % 4294967296
  return h / 4294967296
end

local function deep_copy(v)
  if type(v) ~= "table" then return v end
  local c = {}
  for k, x in pairs(v) do c[k] = deep_copy(x) end
  return c
end

local function tag_list(request)
  local tags = request.tags
  if type(tags) ~= "table" then return {} end
  return tags
end

local function customer_email(request)
  local c = request.customer
  local e = type(c) == "table" and c.email
  return type(e) == "string" and lower(e) or nil
end

local function interaction_id(request)
  local id = request.ext_interaction_id
  if type(id) == "number" then   -- "%d" raises in 5.4 on 1.5, NaN, 2^63 (invalid anyway)
    if id == floor(id) and id > -2^53 and id < 2^53 then return format("%d", id) end
    return tostring(id)
  end
  if type(id) == "string" then return id end
  return nil
end

-- Days since 1970-01-01 of a civil date, and back (proleptic Gregorian), after Howard
-- Hinnant's public-domain algorithms: no os.date / os.time, which Redis lacks.
function M.days_from_civil(y, m, d)
  y = m <= 2 and y - 1 or y
  local era = floor(y / 400)
  local yoe = y - era * 400
  local doy = floor((153 * (m > 2 and m - 3 or m + 9) + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

function M.civil_from_days(days)
  local z = days + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local day = doy - floor((153 * mp + 2) / 5) + 1
  local month = mp < 10 and mp + 3 or mp - 9
  return yoe + era * 400 + (month <= 2 and 1 or 0), month, day
end

-- Epoch seconds as ISO 8601 local time at a UTC offset (seconds east): "...T08:00:00-04:00";
-- offset 0 (or nil) gives "...Z".
function M.iso_time(t, offset)
  offset = offset or 0
  t = floor(t) + offset
  local days = floor(t / DAY)
  local secs = t - days * DAY
  local year, month, day = M.civil_from_days(days)
  local zone = "Z"
  if offset ~= 0 then
    local a = offset < 0 and -offset or offset
    zone = format("%s%02d:%02d", offset < 0 and "-" or "+", floor(a / 3600), floor(a % 3600 / 60))
  end
  return format("%04d-%02d-%02dT%02d:%02d:%02d%s", year, month, day,
                floor(secs / 3600), floor(secs % 3600 / 60), secs % 60, zone)
end

-- Epoch seconds as an ISO 8601 UTC string.
function M.iso_utc(t)
  return M.iso_time(t, 0)
end

local MONTH_DAYS = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 }

-- "+05:30", "-0800", "+05", "UTC", "GMT", "Z", "UTC+05:30" -> seconds east of UTC | nil.
-- (What the rules resolve themselves, also inside Redis; IANA names need env.zone_offset.)
function M.fixed_offset(text)
  if type(text) ~= "string" then return nil end
  if text == "UTC" or text == "GMT" or text == "Z" or text == "Etc/UTC" then return 0 end
  local body = text:match("^UTC([+-].*)$") or text:match("^GMT([+-].*)$") or text
  local sign, h, m = body:match("^([+-])(%d%d):?(%d%d)$")
  if not sign then sign, h = body:match("^([+-])(%d%d?)$") m = "00" end
  if not sign then return nil end
  h, m = tonumber(h), tonumber(m)
  if h > 18 or m > 59 or (h == 18 and m > 0) then return nil end
  local s = (h * 60 + m) * 60
  return sign == "-" and -s or s
end

-- An event's time: epoch seconds (a number), or ISO 8601 text with a zone
-- ("2026-01-05T10:00:00Z", "2026-01-05 10:00:00.250+02:00") -> seconds | nil
function M.parse_time(v)
  if type(v) == "number" then
    if v - v ~= 0 then return nil end   -- NaN, infinities
    return v
  end
  if type(v) ~= "string" then return nil end
  local y, mo, d, h, mi, s, rest = v:match("^(%d%d%d%d)%-(%d%d)%-(%d%d)[T ](%d%d):(%d%d):(%d%d)(.*)$")
  if not y then
    y, mo, d, h, mi, rest = v:match("^(%d%d%d%d)%-(%d%d)%-(%d%d)[T ](%d%d):(%d%d)(.*)$")
    s = "00"
  end
  if not y then return nil end
  y, mo, d, h, mi, s = tonumber(y), tonumber(mo), tonumber(d), tonumber(h), tonumber(mi), tonumber(s)
  local frac, zone = rest:match("^(%.%d+)(.*)$")
  if not frac then frac, zone = "", rest end
  local offset = zone ~= "" and M.fixed_offset(zone) or nil
  if offset == nil then return nil end   -- no zone: which day is meant is unknown
  if mo < 1 or mo > 12 or d < 1 or h > 23 or mi > 59 or s > 59 then return nil end
  local leap = (y % 4 == 0 and y % 100 ~= 0) or y % 400 == 0
  if d > MONTH_DAYS[mo] + ((mo == 2 and leap) and 1 or 0) then return nil end
  local t = M.days_from_civil(y, mo, d) * DAY + h * 3600 + mi * 60 + s - offset
  if frac ~= "" then t = t + tonumber("0" .. frac) end
  return t
end

local DURATION_UNITS = { s = 1, m = 60, h = 3600, d = DAY, w = 7 * DAY }

-- "90s", "15m", "2h", "1d", "1w", "1h30m" or seconds (a number) -> seconds (>= 0) | nil
function M.parse_duration(v)
  if type(v) == "number" then
    if v >= 0 and v - v == 0 then return v end
    return nil
  end
  if type(v) ~= "string" or v == "" then return nil end
  local total, pos = 0, 1
  while pos <= #v do
    local n, unit, after = v:match("^(%d+%.?%d*)([smhdw])()", pos)
    if not n then return nil end
    total = total + tonumber(n) * DURATION_UNITS[unit]
    pos = after
  end
  return total
end

-- What a rule call that ran out of its budget returns in place of the error.
local EXCEEDED = setmetatable({}, { __tostring = function() return "exceeded its budget" end })

-- Under LuaJIT a hook is one for all coroutines (Lua 5.4 has one per coroutine): there the
-- budget is counted in steps of limit / STEPS instructions (a count hook each step; the
-- hook's own instructions count for nothing there), so that it can be paused around a
-- look-up that may yield (see unmetered below). Lua 5.4 counts the hook's instructions
-- too: one step there, and no pause (a suspended coroutine takes its hook along).
local SHARED_HOOK = type(jit_lib) == "table"
local STEPS = SHARED_HOOK and 1000 or 1

-- The next step of meter m: the rest of its budget, at most one step.
local function arm(m)
  local n = m.limit - m.used
  if n > m.step then n = m.step end
  m.armed = n
  sethook(m.hook, m.mask, n)
end

-- Over the budget: raised now, and again at every instruction until the call is over.
local function exceed(m)
  m.over = true
  sethook(m.hook, m.mask, 1)
  error(EXCEEDED, 0)
end

-- pcall(fn, a, b), stopped after `limit` VM instructions (false, EXCEEDED) when a limit is
-- given. Another Lua hook (a debugger's) gets its line, call and return events meanwhile
-- (not its count events) and is put back after; a hook set from C (reported as "external
-- hook") is left alone, and the call runs unlimited. An error a rule catches with pcall is
-- raised again at its next instruction, so a rule cannot outlive its budget by catching it.
-- meter: a table that unmetered(meter, ...) calls made by fn (the rule's look-ups) use.
local limited_call
function limited_call(limit, fn, a, b, meter)
  if not limit then return pcall(fn, a, b) end
  local prev, mask, count = gethook()
  if prev ~= nil and type(prev) ~= "function" then return pcall(fn, a, b) end
  if mask == "" and count == 0 then prev = nil end   -- LuaJIT: a cleared hook (see below)
  local m = meter or {}
  local step = floor(limit / STEPS)
  m.limit, m.step, m.used, m.over = limit, step > 0 and step or 1, 0, false
  m.prev, m.prev_mask, m.prev_count = prev, mask, count
  m.mask = prev and mask or ""
  local hook
  hook = function(event, line)
    if event ~= "count" then return prev(event, line) end   -- a tail call: the levels prev expects
    if getinfo(2, "f").func == limited_call then return end  -- our code, once the rule returned
    if m.over then error(EXCEEDED, 0) end
    local used = m.used + m.armed
    m.used = used
    if used < limit then
      if limit - used < m.step then arm(m) end   -- the last step is shorter
      return
    end
    exceed(m)
  end
  m.hook = hook
  arm(m)
  local ok, x, y = pcall(fn, a, b)
  m.hook = nil   -- unmetered calls from now on run as they are
  local now_hook, _, now_count = gethook()
  -- (LuaJIT's gethook names the last Lua hook even once a C hook cleared it: count 0)
  if now_hook == hook and now_count ~= 0 then
    if prev then sethook(prev, mask, count) else sethook() end
  elseif not ok then
    -- our hook was replaced during the call, and the call failed: an interrupt (the lua
    -- interpreter's Ctrl-C handler sets a hook that raises), not the rule's failure
    error(x, 0)
  end
  if m.over then return false, EXCEEDED end
  return ok, x, y
end

-- f(x) from inside a budgeted call (a custom rule's look-up in the store), under LuaJIT
-- with the budget paused: while f runs, the hook is the one from before the call (usually
-- none). f may yield - a Redis store waits on cosockets - and a LuaJIT hook is one for all
-- coroutines: left on, it would count, and fail, whatever another request runs meanwhile.
-- So no budget hook is set while a coroutine is suspended in a look-up. The step the
-- look-up interrupted counts as used whole: a look-up costs at most limit / STEPS
-- instructions of the budget (a rule cannot outrun it by looking things up in a loop).
local function unmetered(m, f, x)
  if not (SHARED_HOOK and m and m.hook) then return f(x) end
  local prev = m.prev
  if prev then sethook(prev, m.prev_mask, m.prev_count) else sethook() end
  local ok, r = pcall(f, x)
  m.used = m.used + m.armed
  if m.over or m.used >= m.limit then exceed(m) end
  arm(m)
  if not ok then error(r, 0) end
  return r
end

-- "<label> (file:line) exceeded its budget of N instructions"
local function over_budget(label, fn, limit)
  local where = ""
  local info = getinfo and getinfo(fn, "S")
  if info and info.linedefined and info.linedefined > 0 then
    local src = info.source
    src = type(src) == "string" and src:sub(1, 1) == "@" and src:sub(2) or info.short_src
    where = " (" .. tostring(src) .. ":" .. info.linedefined .. ")"
  end
  return label .. where .. " exceeded its budget of " .. format("%d", limit) .. " instructions"
end

local LABELS = {}   -- "rules[i]"
for i = 1, 32 do LABELS[i] = "rules[" .. i .. "]" end

local function add_verdict(verdicts, rule, result, reason, detail)
  verdicts[#verdicts + 1] = { rule = rule, verdict = result, reason = reason, detail = detail }
end

-- The first non-pass verdict decides; returns true when evaluation should stop.
-- (d.verdicts is there in explain mode only)
local function decide(d, rule, action, reason, detail, extra)
  local verdicts = d.verdicts
  if verdicts then add_verdict(verdicts, rule, action, reason, detail) end
  if d.action == "send" then
    d.action, d.reason, d.detail = action, reason, detail
    if extra then for k, v in pairs(extra) do d[k] = v end end
    d.marks = {}   -- an early return must not hand back marks of earlier checks
  end
  return verdicts == nil
end

-- The scope of a request's suppression mark.
local function suppression_scope(r, request, brand_scope)
  local per = r.suppression and r.suppression.per or "brand"
  return per == "brand" and brand_scope
      or per == "channel" and ("channel:" .. tostring(request.channel))
      or "global"
end

-- Scheduled sends -----------------------------------------------------------------------
-- delay: the request goes `delay` after the event's time (event_time: a field of the
-- event, or a function of it; without it, the time of the decision). quiet_hours: no send
-- between two local times in the customer's zone (a field of the event holding an IANA
-- name or a UTC offset, else the fallback zone); a send that would fall inside goes at
-- their end. A time zone name is resolved by env.zone_offset(name, t) -> seconds east of
-- UTC (the trigger's, from the system's zone files); UTC offsets need nothing, so inside
-- Redis (no files) the rules handle offsets only.

local function get_path(t, path)
  for i = 1, #path do
    if type(t) ~= "table" then return nil end
    t = t[path[i]]
  end
  return t
end

local function zone_offset(env, zone, t)
  local off = M.fixed_offset(zone)
  if off then return off end
  local resolve = env.zone_offset
  if resolve and type(zone) == "string" then return resolve(zone, t) end
  return nil
end

-- The first moment at or after t outside the quiet hours, in a zone whose offset at t is
-- off. The end's wall time goes back to UTC with the offset in force then (a daylight
-- saving change may lie in between); an end inside a skipped hour goes at the hour after.
local function after_quiet(q, env, zone, t, off)
  local wall = t + off
  local day = floor(wall / DAY) * DAY
  local sod = wall - day
  local target
  if q.from < q.to then
    if sod >= q.from and sod < q.to then target = day + q.to end
  elseif sod >= q.from then
    target = day + DAY + q.to
  elseif sod < q.to then
    target = day + q.to
  end
  if not target then return t end
  local u = target - off
  local off2 = zone_offset(env, zone, u)
  if off2 and off2 ~= off and zone_offset(env, zone, target - off2) == off2 then u = target - off2 end
  return u
end

-- When the decided request goes: send_at (epoch seconds), and a text saying why; or nil,
-- detail when the event's time cannot be read (the event is invalid: invalid_time).
-- A ruled time at or before now means now.
local function schedule_of(r, s, event, env, now)
  local at, why = now, {}
  if s.delay then
    local base, from_event = now, false
    if s.event_time_fn then
      local ok, v = limited_call(r.budget, s.event_time_fn, event)
      if not ok then
        return nil, rawequal(v, EXCEEDED) and over_budget("event_time", s.event_time_fn, r.budget)
                    or "event_time: " .. tostring(v), "rule_error"
      end
      if v ~= nil then
        base, from_event = M.parse_time(v), true
        if not base then return nil, "event_time returned " .. tostring(v) .. ", not a time", "invalid_time" end
      end
    elseif s.event_time_path then
      local v = get_path(event, s.event_time_path)
      base, from_event = M.parse_time(v), true
      if not base then
        return nil, "the event's " .. s.event_time_name .. (v == nil and " is missing" or
                    (" (" .. tostring(v) .. ") is not a time with a zone, like 2026-01-05T10:00:00Z")), "invalid_time"
      end
    end
    at = base + s.delay
    why[#why + 1] = s.delay_text .. " after " .. (from_event and ("the event's time " .. M.iso_utc(base))
                                                  or "the decision")
    if at < now then at = now end
  end
  local q = s.quiet
  if q then
    local zone, note = q.fallback, nil
    local given = q.zone_path and get_path(event, q.zone_path)
    local off = nil
    if given ~= nil then
      off = zone_offset(env, given, at)
      if off then zone = given
      else note = "the event's " .. q.zone_field .. " " .. tostring(given) .. " is not a known zone" end
    elseif q.zone_path then
      note = "the event has no " .. q.zone_field
    end
    if not off then off = zone_offset(env, zone, at) end
    if not off then
      return nil, "time zone " .. zone .. " is unknown here (only UTC offsets where there are no zone files)",
             "invalid_time"
    end
    local later = after_quiet(q, env, zone, at, off)
    if later > at then
      local loff = zone_offset(env, zone, later) or off
      why[#why + 1] = "quiet hours " .. q.text .. " in " .. zone .. (note and (" (" .. note .. ", so the fallback)") or "")
                      .. ": at their end, " .. M.iso_time(later, loff)
      at = later
    end
  end
  return at, concat(why, "; ")
end

-- decision.action: "send" | "skip" | "suppressed" | "invalid"
-- In explain mode every check still runs, each leaving a verdict.
function M.evaluate(r, event, env, explain)
  local now = env.now
  local verdicts = explain and {} or nil
  local d = { action = "send", verdicts = verdicts, marks = {} }

  -- 1. map the source record to a request
  local request
  if r.map then
    local ok, res = limited_call(r.budget, r.map, event)
    if not ok and rawequal(res, EXCEEDED) then
      decide(d, "map", "invalid", "rule_error", over_budget("map", r.map, r.budget))
      return d
    elseif not ok then
      decide(d, "map", "invalid", "map_error", tostring(res))
      return d
    end
    if type(res) ~= "table" then
      decide(d, "map", "invalid", "map_error", "map(event) must return a request table, got " .. type(res))
      return d
    end
    request = res
  else
    request = deep_copy(event)
  end
  d.request = request
  if verdicts then add_verdict(verdicts, "map", "pass") end

  -- 2. eligibility
  if r.when then
    local ok, res = limited_call(r.budget, r.when, event)
    if not ok then
      local detail = rawequal(res, EXCEEDED) and over_budget("when", r.when, r.budget)
                     or "when: " .. tostring(res)
      if decide(d, "when", "invalid", "rule_error", detail) then return d end
    elseif not res then
      if decide(d, "when", "skip", "not_eligible", "when(event) returned " .. tostring(res)) then return d end
    else
      if verdicts then add_verdict(verdicts, "when", "pass") end
    end
  end

  -- 3. brand
  local brand_name = request.brand
  if brand_name == nil then brand_name = r.default_brand end
  local brand = nil
  if r.brands then
    brand = brand_name ~= nil and r.brands[brand_name] or nil
    if not brand then
      if decide(d, "brand", "skip", "unknown_brand",
                "brand " .. tostring(brand_name) .. " is not in the rules' brands") then return d end
    else
      -- the service knows a brand by its signifier, when the rules give one
      if brand.signifier ~= nil then request.brand = brand.signifier
      elseif request.brand == nil then request.brand = brand_name end
      if request.language == nil and brand.language then request.language = brand.language end
      if verdicts then add_verdict(verdicts, "brand", "pass", nil, tostring(brand_name)) end
    end
  end
  d.brand = brand_name
  brand = brand or {}

  -- 4. channel mode
  if r.channels then
    local ch = request.channel
    local mode = type(ch) == "string" and r.channels[ch] or nil
    if mode == "manual" then
      if decide(d, "channels", "skip", "channel_manual",
                "channel " .. tostring(ch) .. " is in manual mode") then return d end
    elseif mode == nil then
      if decide(d, "channels", "skip", "channel_disabled",
                "channel " .. tostring(ch) .. " is not enabled in the rules") then return d end
    else
      if verdicts then add_verdict(verdicts, "channels", "pass") end
    end
  end

  -- 5. tags
  if r.exclude_tags then
    local hit
    for _, t in ipairs(tag_list(request)) do if r.exclude_tags[t] then hit = t break end end
    if hit then
      if decide(d, "exclude_tags", "skip", "excluded_tag", "tag " .. tostring(hit)) then return d end
    else
      if verdicts then add_verdict(verdicts, "exclude_tags", "pass") end
    end
  end

  local email = customer_email(request)
  local iid = interaction_id(request)
  local brand_scope = "brand:" .. tostring(brand_name or "")

  -- 6. unsubscribes: the rules' own list and the store's
  if r.unsubscribes or env.unsubscribed then
    if email and ((r.unsubscribes and r.unsubscribes[email]) or
                  (env.unsubscribed and env.unsubscribed(email))) then
      if decide(d, "unsubscribes", "skip", "unsubscribed", "the customer has unsubscribed") then return d end
    else
      if verdicts then add_verdict(verdicts, "unsubscribes", "pass") end
    end
  end

  -- 7. one request per interaction
  if r.once_days and iid then
    local mark = { type = "once", scope = brand_scope, id = iid, ["until"] = now + r.once_days * DAY }
    local seen = env.lookup and env.lookup(mark)
    if seen then
      if decide(d, "once_per_interaction", "skip", "duplicate",
                "interaction " .. iid .. " already triggered a request") then return d end
    else
      if verdicts then add_verdict(verdicts, "once_per_interaction", "pass") end
      d.marks[#d.marks + 1] = mark
    end
  end

  -- 8. sampling
  if r.sample and r.sample < 1 then
    local h = M.unit_hash(iid or tostring(event.id or ""))
    if h >= r.sample then
      if decide(d, "sample", "skip", "sampled_out",
                format("hash %.3f is above the sample rate %.3f", h, r.sample)) then return d end
    else
      if verdicts then add_verdict(verdicts, "sample", "pass") end
    end
  end

  -- 9. custom rules, in order
  local custom = r.rules
  if custom[1] ~= nil then
    local meter = {}   -- the running rule's budget, paused around its look-ups
    local ctx = {
      event = event, brand = brand_name, brand_config = brand, now = now,
      clock = function() return now end,
      suppressed_until = function(addr)
        if not (env.lookup and type(addr) == "string") then return nil end
        return unmetered(meter, env.lookup, { type = "suppress", email = lower(addr),
                                              scope = suppression_scope(r, request, brand_scope) })
      end,
      seen = function(id)
        if not env.lookup then return false end
        return unmetered(meter, env.lookup, { type = "once", scope = brand_scope, id = tostring(id) }) ~= nil
      end,
      unsubscribed = function(addr)
        if type(addr) ~= "string" then return false end
        addr = lower(addr)
        return (r.unsubscribes and r.unsubscribes[addr]) or
               (env.unsubscribed and unmetered(meter, env.unsubscribed, addr)) or false
      end,
    }
    for i, rule in ipairs(custom) do
      local label = LABELS[i] or ("rules[" .. i .. "]")
      local ok, verdict_name, reason = limited_call(r.budget, rule, request, ctx, meter)
      if not ok then
        local detail = rawequal(verdict_name, EXCEEDED) and over_budget(label, rule, r.budget)
                       or label .. ": " .. tostring(verdict_name)
        if decide(d, label, "invalid", "rule_error", detail) then return d end
      elseif verdict_name == "skip" then
        if decide(d, label, "skip", reason or "custom_rule",
                     label .. " skipped the event") then return d end
      elseif verdict_name == "do_not_send" then
        request.do_not_send = true
        d.do_not_send_reason = d.do_not_send_reason or reason or "custom_rule"
        if verdicts then add_verdict(verdicts, label, "do_not_send", reason or "custom_rule") end
      elseif verdict_name == nil or verdict_name == true then
        if verdicts then add_verdict(verdicts, label, "pass") end
      else
        if decide(d, label, "invalid", "rule_error",
                  label .. " returned " .. tostring(verdict_name) ..
                  " (expected nothing, \"skip\" or \"do_not_send\")") then return d end
      end
    end
  end

  -- 10. do-not-send tags: recorded by the service, no e-mail
  if r.do_not_send_tags then
    local hit
    for _, t in ipairs(tag_list(request)) do if r.do_not_send_tags[t] then hit = t break end end
    if hit then
      request.do_not_send = true
      d.do_not_send_reason = d.do_not_send_reason or "do_not_send_tag"
      if verdicts then
        add_verdict(verdicts, "do_not_send_tags", "do_not_send", "do_not_send_tag", "tag " .. tostring(hit))
      end
    else
      if verdicts then add_verdict(verdicts, "do_not_send_tags", "pass") end
    end
  end

  -- 11. suppression window per customer e-mail (a do_not_send request sends no
  -- e-mail, so it neither is suppressed nor suppresses)
  if r.suppression and email and request.do_not_send ~= true then
    local days = brand.suppression_days or r.suppression.days
    local mark = { type = "suppress", scope = suppression_scope(r, request, brand_scope), email = email,
                   ["until"] = now + days * DAY }
    local active = days > 0 and env.lookup and env.lookup(mark)
    if active then
      if decide(d, "suppression", "suppressed", "suppressed",
                "a request reached this customer recently; next possible at " ..
                M.iso_utc(active), { ["until"] = active }) then return d end
    else
      if verdicts then add_verdict(verdicts, "suppression", "pass") end
      if days > 0 then d.marks[#d.marks + 1] = mark end
    end
  end

  -- 12. when it goes: now, or later (scheduled sends)
  local s = r.schedule
  if s then
    local at, why, bad = schedule_of(r, s, event, env, now)
    if not at then
      if decide(d, "schedule", "invalid", bad, why) then return d end
    elseif at > now then
      d.send_at = at
      if verdicts then add_verdict(verdicts, "schedule", "scheduled", "scheduled", "will send at " .. M.iso_utc(at) .. " (" .. why .. ")") end
      -- the windows count from the send: its marks end as much later as it goes
      for _, mark in ipairs(d.marks) do mark["until"] = mark["until"] + (at - now) end
      d.schedule = why
    elseif verdicts then
      add_verdict(verdicts, "schedule", "pass", nil, "sends now" .. (why ~= "" and (" (" .. why .. ")") or ""))
    end
  end

  if d.action ~= "send" then d.marks, d.send_at = {}, nil end
  return d
end

return M
