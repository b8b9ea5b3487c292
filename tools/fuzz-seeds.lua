-- fuzz-seeds.lua OUTDIR - the fuzzers' seeds written in the C and data files
-- (tools/fuzz-corpus adds those the Lua specs pass to the core): the JSON string
-- literals of spec/c/test_core.c and spec/c/fuzz_json.c, a few lines of
-- examples/interactions.jsonl, the client options of test_core.c's try_new calls and
-- its Retry-After values, and Retry-After values in each form RFC 9110 names.
-- Files are named by content; OUTDIR/{json,url_key,retry_after}/ must exist.
local out = assert(arg[1], "usage: fuzz-seeds.lua OUTDIR")

local n = 0
local function write(set, data)
  n = n + 1
  local f = assert(io.open(("%s/%s/seed-%04d"):format(out, set, n), "wb"))
  f:write(data)
  f:close()
end

local function slurp(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

-- C string literals, adjacent ones joined: a list of { text, source offset }
local ESC = { n = "\n", t = "\t", r = "\r", b = "\b", f = "\f", ["\\"] = "\\", ['"'] = '"', ["'"] = "'", ["0"] = "\0" }
local function c_strings(src)
  local list, i, cur = {}, 1, nil
  while i <= #src do
    local c = src:sub(i, i)
    if src:sub(i, i + 1) == "/*" then
      i = (src:find("*/", i + 2, true) or #src) + 2
    elseif src:sub(i, i + 1) == "//" then
      i = (src:find("\n", i, true) or #src) + 1
    elseif c == "'" then
      i = (src:find("'", src:sub(i + 1, i + 1) == "\\" and i + 3 or i + 2, true) or #src) + 1
    elseif c == '"' then
      local buf, j = {}, i + 1
      while j <= #src and src:sub(j, j) ~= '"' do
        local d = src:sub(j, j)
        if d == "\\" then
          local e = src:sub(j + 1, j + 1)
          if e == "x" then
            local hex = src:match("^%x%x?", j + 2)
            buf[#buf + 1] = string.char(tonumber(hex, 16)); j = j + 2 + #hex
          elseif e:match("[0-7]") then
            local oct = src:match("^[0-7][0-7]?[0-7]?", j + 1)
            buf[#buf + 1] = string.char(tonumber(oct, 8) % 256); j = j + 1 + #oct
          else
            buf[#buf + 1] = ESC[e] or e; j = j + 2
          end
        else
          buf[#buf + 1] = d; j = j + 1
        end
      end
      local s = table.concat(buf)
      if cur then cur[1] = cur[1] .. s else cur = { s, i }; list[#list + 1] = cur end
      i = j + 1
    else
      if not c:match("%s") then cur = nil end
      i = i + 1
    end
  end
  return list
end

local C_FILES = { "spec/c/test_core.c", "spec/c/fuzz_json.c" }
for _, path in ipairs(C_FILES) do
  local src = slurp(path)
  for _, s in ipairs(c_strings(src)) do
    local text = s[1]
    if text:match("^%s*[%[{]") and #text <= 4096 then write("json", text) end
  end
  -- Retry-After values: stella_parse_retry_after("...", ...)
  for call in src:gmatch("stella_parse_retry_after%b()") do
    local lit = c_strings(call)[1]
    if lit then write("retry_after", lit[1]) end
  end
  -- client options: try_new(BASE_URL or NULL, KEY or "...", ...)
  local key = src:match('#define KEY (%b"")')
  key = key and c_strings(key)[1][1]
  for args in src:gmatch("try_new(%b())") do
    local parts, depth, quoted, start = {}, 0, false, 2   -- split at top-level commas
    for i = 2, #args - 1 do
      local ch = args:sub(i, i)
      if quoted then
        if ch == "\\" then quoted = "skip" elseif quoted == "skip" then quoted = true
        elseif ch == '"' then quoted = false end
      elseif ch == '"' then quoted = true
      elseif ch == "(" then depth = depth + 1
      elseif ch == ")" then depth = depth - 1
      elseif ch == "," and depth == 0 then parts[#parts + 1] = args:sub(start, i - 1); start = i + 1 end
    end
    local function arg_string(a)
      a = a and a:match("^%s*(.-)%s*$")
      if a == "KEY" then return key end
      local lit = a and a ~= "NULL" and c_strings(a)[1]
      return lit and lit[1] or nil
    end
    local base, k = arg_string(parts[1]), arg_string(parts[2])
    if k then write("url_key", base and base .. "\0" .. k or k) end
  end
end

local lines = 0
for line in io.lines("examples/interactions.jsonl") do
  lines = lines + 1
  if lines <= 5 then write("json", line) end
end

for _, v in ipairs{
  "120", "0", "86400", "86401", "  7  ", "1.5", "-1", "+5", "0x10", "1e3",
  "Sun, 06 Nov 1994 08:49:37 GMT",   -- IMF-fixdate
  "Sunday, 06-Nov-94 08:49:37 GMT",  -- obsolete RFC 850 format
  "Sun Nov  6 08:49:37 1994",        -- ANSI C asctime() format
  "Thu, 01 Jan 1970 00:00:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT", "Wed, 29 Feb 2024 12:00:60 GMT",
  "Tue, 14 Nov 2023 22:13:20 GMT", "Tue, 14 Nov 2023 22:13:20 +0100",
} do write("retry_after", v) end
