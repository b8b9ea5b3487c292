-- stella.zones: the UTC offset of an IANA time zone at a moment, from the system's zone
-- files (TZif, RFC 8536; Debian's tzdata in /usr/share/zoneinfo), for the rules'
-- quiet hours (stella.rules: env.zone_offset).
--
--   local zones = require "stella.zones"
--   zones.offset("America/New_York", t)   --> -14400 (seconds east of UTC) | nil, err
--   zones.offset("+05:30", t)             --> 19800 (UTC offsets need no file)
--
-- Pure Lua (5.4 and LuaJIT: bytes are read one by one, no string.unpack). A zone file is
-- read once and kept (parsed zones only: a name that is not a zone is not remembered).
-- After a file's last transition the rule of its footer (a POSIX TZ string such as
-- "EST5EDT,M3.2.0,M11.1.0") gives the offset, as for every year past 2037 and for
-- files built "slim". The directory is TZDIR when set, else /usr/share/zoneinfo.
-- Why our own reader: Debian packages no Lua time zone library (no luatz), and a zone's
-- offset is all the rules need.
local rules = require "stella.rules"

local byte, sub, floor, tonumber, type, open = string.byte, string.sub, math.floor, tonumber, type, io.open

local M = {}

local DAY = 86400

local cache = {}   -- name -> parsed zone

local function dir()
  local d = os.getenv("TZDIR")
  if d == nil or d == "" then d = "/usr/share/zoneinfo" end
  return d
end

-- A zone name as it may appear in a file path: "Europe/Paris", "America/Argentina/Salta",
-- "Etc/GMT+5"; nothing that climbs out of the directory.
local function valid_name(name)
  return #name <= 64 and name:match("^[A-Za-z][A-Za-z0-9_+%-]*$") ~= nil
      or (#name <= 64 and name:match("^[A-Za-z][A-Za-z0-9_+%-]*/[A-Za-z0-9_+%-/]+$") ~= nil
          and not name:find("//", 1, true) and name:sub(-1) ~= "/")
end

local function u32(s, i)
  local a, b, c, d = byte(s, i, i + 3)
  return ((a * 256 + b) * 256 + c) * 256 + d
end

local function i32(s, i)
  local v = u32(s, i)
  if v >= 2147483648 then v = v - 4294967296 end
  return v
end

local function i64(s, i)
  local hi, lo = u32(s, i), u32(s, i + 4)
  if hi >= 2147483648 then hi = hi - 4294967296 end
  return hi * 4294967296 + lo
end

-- POSIX TZ strings (the footer) -------------------------------------------------------

-- "[+-]hh[:mm[:ss]]" at pos -> seconds, next pos
local function tz_time(s, pos)
  local sign, h, rest = s:match("^([+-]?)(%d+)()", pos)
  if not h then return nil end
  local t = tonumber(h) * 3600
  pos = rest
  local m, after = s:match("^:(%d%d)()", pos)
  if m then
    t, pos = t + tonumber(m) * 60, after
    local sec, after2 = s:match("^:(%d%d)()", pos)
    if sec then t, pos = t + tonumber(sec), after2 end
  end
  return sign == "-" and -t or t, pos
end

-- a zone abbreviation: "EST" or "<+0530>"
local function tz_name(s, pos)
  local quoted, after = s:match("^<([^>]*)>()", pos)
  if quoted then return quoted, after end
  local name, after2 = s:match("^(%a%a%a+)()", pos)
  return name, after2
end

-- ",Mm.w.d[/time]", ",Jn[/time]" or ",n[/time]" at pos -> rule, next pos
local function tz_rule(s, pos)
  local r, after = {}, nil
  local m, w, d, a1 = s:match("^,M(%d+)%.(%d)%.(%d)()", pos)
  if m then
    r.kind, r.month, r.week, r.wday, after = "M", tonumber(m), tonumber(w), tonumber(d), a1
  else
    local j, a2 = s:match("^,J(%d+)()", pos)
    if j then
      r.kind, r.day, after = "J", tonumber(j), a2
    else
      local n, a3 = s:match("^,(%d+)()", pos)
      if not n then return nil end
      r.kind, r.day, after = "n", tonumber(n), a3
    end
  end
  r.time = 7200
  if s:sub(after, after) == "/" then
    local t, a4 = tz_time(s, after + 1)
    if not t then return nil end
    r.time, after = t, a4
  end
  return r, after
end

-- "EST5EDT,M3.2.0,M11.1.0" -> { std = utoff, dst = utoff, start = rule, stop = rule } | nil
local function parse_tz(s)
  local _, pos = tz_name(s, 1)
  if not pos then return nil end
  local off
  off, pos = tz_time(s, pos)
  if not off then return nil end
  local z = { std = 0 - off }   -- (0 - off: never -0) POSIX counts west of Greenwich as positive
  if pos > #s then return z end
  local dname
  dname, pos = tz_name(s, pos)
  if not dname then return nil end
  z.dst = z.std + 3600
  if pos <= #s and s:sub(pos, pos) ~= "," then
    off, pos = tz_time(s, pos)
    if not off then return nil end
    z.dst = 0 - off
  end
  z.start, pos = tz_rule(s, pos)
  if not z.start then return nil end
  z.stop, pos = tz_rule(s, pos)
  if not z.stop or pos <= #s then return nil end
  return z
end

local function is_leap(y)
  return (y % 4 == 0 and y % 100 ~= 0) or y % 400 == 0
end

local MONTH_DAYS = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 }

-- The local time (seconds since the epoch, as if UTC) at which a rule fires in year y.
local function rule_local(r, y)
  local days
  if r.kind == "M" then
    local first = rules.days_from_civil(y, r.month, 1)
    local wday_first = (first + 4) % 7            -- 1970-01-01 was a Thursday (4)
    local day = 1 + (r.wday - wday_first + 7) % 7 + (r.week - 1) * 7
    local last = MONTH_DAYS[r.month] + ((r.month == 2 and is_leap(y)) and 1 or 0)
    while day > last do day = day - 7 end
    days = first + day - 1
  elseif r.kind == "J" then   -- 1..365, February 29 never counted
    days = rules.days_from_civil(y, 1, 1) + r.day - 1 + ((is_leap(y) and r.day >= 60) and 1 or 0)
  else                        -- 0..365, February 29 counted
    days = rules.days_from_civil(y, 1, 1) + r.day
  end
  return days * DAY + r.time
end

local function tz_offset(z, t)
  if not z.start then return z.std end
  local y = rules.civil_from_days(floor((t + z.std) / DAY))
  -- daylight time starts at the rule's time in standard time and ends at the rule's
  -- time in daylight time
  local start = rule_local(z.start, y) - z.std
  local stop = rule_local(z.stop, y) - z.dst
  if start < stop then
    return (t >= start and t < stop) and z.dst or z.std
  end
  return (t >= stop and t < start) and z.std or z.dst   -- southern hemisphere
end

-- TZif files ----------------------------------------------------------------------------

-- The counts of a TZif header at i: isutcnt, isstdcnt, leapcnt, timecnt, typecnt, charcnt.
local function header(s, i)
  if sub(s, i, i + 3) ~= "TZif" or #s < i + 43 then return nil end
  local c = {}
  for k = 1, 6 do c[k] = u32(s, i + 20 + (k - 1) * 4) end
  return byte(s, i + 4), c
end

local function block_size(c, tsize)
  return c[4] * tsize + c[4] + c[5] * 6 + c[6] + c[3] * (tsize + 4) + c[2] + c[1]
end

-- text -> { times = {...}, offsets = {...} (per transition), first = utoff, rule = tz } | nil, err
local function parse(s)
  local version, c = header(s, 1)
  if not version then return nil, "not a TZif file" end
  local i, tsize, read_time = 45, 4, i32
  if version ~= 0 then   -- version 2+: skip the 32-bit block, read the 64-bit one
    i = 45 + block_size(c, 4)
    version, c = header(s, i)
    if not version then return nil, "a damaged TZif file" end
    i, tsize, read_time = i + 44, 8, i64
  end
  local timecnt, typecnt = c[4], c[5]
  local footer_at = i + block_size(c, tsize)
  if typecnt == 0 or #s < footer_at - 1 then return nil, "a damaged TZif file" end
  local times, idx = {}, {}
  for k = 1, timecnt do times[k] = read_time(s, i + (k - 1) * tsize) end
  i = i + timecnt * tsize
  for k = 1, timecnt do idx[k] = byte(s, i + k - 1) end
  i = i + timecnt
  local utoffs = {}
  for k = 1, typecnt do utoffs[k] = i32(s, i + (k - 1) * 6) end
  local offsets = {}
  for k = 1, timecnt do
    local o = utoffs[idx[k] + 1]
    if o == nil then return nil, "a damaged TZif file" end
    offsets[k] = o
  end
  local zone = { times = times, offsets = offsets, first = utoffs[1] }
  if tsize == 8 then
    local footer = s:match("^\n([^\n]*)\n", footer_at)
    if footer and footer ~= "" then zone.rule = parse_tz(footer) end
  end
  return zone
end

local function load(name)
  local z = cache[name]
  if z then return z end
  if not valid_name(name) then return nil, "not a time zone name: " .. name end
  local f = open(dir() .. "/" .. name, "rb")
  if not f then return nil, "unknown time zone " .. name end
  local text = f:read("*a")
  f:close()
  if type(text) ~= "string" then return nil, "unknown time zone " .. name end
  local zone, err = parse(text)
  if not zone then return nil, name .. ": " .. err end
  cache[name] = zone
  return zone
end

-- offset(name, t) -> seconds east of UTC in zone `name` (an IANA name or a UTC offset)
-- at time t | nil, err
function M.offset(name, t)
  if type(name) ~= "string" then return nil, "a time zone name must be a string" end
  local fixed = rules.fixed_offset(name)
  if fixed then return fixed end
  local z, err = load(name)
  if not z then return nil, err end
  local times = z.times
  local n = #times
  if n == 0 and z.rule then return tz_offset(z.rule, t) end
  if n == 0 or t < times[1] then return z.first end
  if t >= times[n] and z.rule then return tz_offset(z.rule, t) end
  local lo, hi = 1, n   -- the last transition at or before t
  while lo < hi do
    local mid = floor((lo + hi + 1) / 2)
    if times[mid] <= t then lo = mid else hi = mid - 1 end
  end
  return z.offsets[lo]
end

-- M.parse_tz: for the specs (the footer rules without a file)
M.parse_tz = parse_tz
M.tz_offset = tz_offset

return M
