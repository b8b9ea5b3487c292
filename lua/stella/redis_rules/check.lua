-- stella.redis_rules.check: what in a rules file Redis's Lua lacks, found before the file
-- goes into Redis (`stella redis load`). Redis runs Lua 5.1 with no io, os, require,
-- debug, print, utf8, string.pack, ...: a rule calling one of them there would fail each
-- event it meets, so the load is refused instead, naming what and where:
--
--   check.problems(name, source) -> { "rules.lua:12: uses io.open, which Redis's Lua does
--                                     not have", ... }   (empty: nothing found)
--
-- A token scan, not a compiler: it finds the names of those libraries used as globals
-- (not after `.` or `:`, not declared local anywhere in the file), the operators and
-- statements of Lua 5.2+ (//, &, |, ~, <<, >>, goto, ::labels::), and assignments to
-- globals (Redis's globals are read-only). The body of on_alert
-- is left out: it runs where the alert is raised (stella status, a trigger), never in
-- Redis. Syntax errors are left to the 5.1 compiler inside Redis, which names the line.
local ipairs = ipairs
local sub, find, match, format = string.sub, string.find, string.match, string.format

local M = {}

-- Globals the Lua trigger's rules may use (stella.rules.globals, with the command's io)
-- that Redis's Lua does not have. true: any use; a table: the fields Redis lacks.
local LACKING = {
  io = true, os = true, require = true, print = true, rawlen = true, utf8 = true,
  debug = true, package = true, dofile = true, loadfile = true,
  string = { pack = true, unpack = true, packsize = true },
  table = { move = true, pack = true, unpack = true },
  math = { type = true, tointeger = true, ult = true, maxinteger = true, mininteger = true },
}

local KEYWORDS = {}
for w in ("and break do else elseif end false for function goto if in local nil not or repeat return then true until while")
           :gmatch("%a+") do KEYWORDS[w] = true end

-- The tokens of source: { kind = "name"|"op"|"string"|"number", text, line }.
local function tokens(source)
  local list, pos, line, n = {}, 1, 1, #source
  local function add(kind, text) list[#list + 1] = { kind = kind, text = text, line = line } end
  local function count_lines(s) local _, c = s:gsub("\n", "") line = line + c end
  -- a long bracket [==[ ... ]==] at pos: its end, or nil
  local function long_end(p)
    local eq = match(source, "^%[(=*)%[", p)
    if not eq then return nil end
    local _, e = find(source, "]" .. eq .. "]", p, true)
    return e or n
  end
  if sub(source, 1, 1) == "#" then pos = (find(source, "\n", 1, true) or n) end   -- a shebang line
  while pos <= n do
    local c = sub(source, pos, pos)
    if c == "\n" then
      line = line + 1
      pos = pos + 1
    elseif find(c, "^%s") then
      pos = pos + 1
    elseif sub(source, pos, pos + 1) == "--" then
      local e = long_end(pos + 2)
      if e then
        count_lines(sub(source, pos, e))
        pos = e + 1
      else
        pos = (find(source, "\n", pos, true) or n + 1)
      end
    elseif c == "[" and long_end(pos) then
      local e = long_end(pos)
      add("string", "")
      count_lines(sub(source, pos, e))
      pos = e + 1
    elseif c == '"' or c == "'" then
      local p = pos + 1
      while p <= n do
        local d = sub(source, p, p)
        if d == "\\" then
          if sub(source, p + 1, p + 1) == "\n" then line = line + 1 end
          p = p + 2
        elseif d == c or d == "\n" then
          break
        else
          p = p + 1
        end
      end
      add("string", "")
      pos = p + 1
    elseif find(c, "^[%a_]") then
      local w = match(source, "^[%w_]+", pos)
      add("name", w)
      pos = pos + #w
    elseif find(c, "^%d") or (c == "." and find(sub(source, pos + 1, pos + 1), "^%d")) then
      local num = match(source, "^0[xX][%x%.]*[pP][%+%-]?%d*", pos) or match(source, "^0[xX][%x%.]*", pos)
                  or match(source, "^[%d%.]*[eE][%+%-]?%d*", pos) or match(source, "^[%d%.]+", pos)
      add("number", num)
      pos = pos + #num
    else
      local op = match(source, "^%.%.%.", pos) or match(source, "^[=~<>]=", pos) or match(source, "^%.%.", pos)
                 or match(source, "^//", pos) or match(source, "^<<", pos) or match(source, "^>>", pos)
                 or match(source, "^::", pos) or c
      add("op", op)
      pos = pos + #op
    end
  end
  return list
end

-- Names declared local somewhere in the file (local x, local function f, parameters,
-- for variables): such a name is not the global, wherever it is used (an approximation).
local function declared(toks)
  local set = {}
  for i, t in ipairs(toks) do
    if t.kind == "name" and (t.text == "local" or t.text == "for") then
      local j = i + 1
      if toks[j] and toks[j].text == "function" then j = j + 1 end
      while toks[j] and toks[j].kind == "name" and not KEYWORDS[toks[j].text] do
        set[toks[j].text] = true
        if not (toks[j + 1] and toks[j + 1].text == ",") then break end
        j = j + 2
      end
    elseif t.kind == "name" and t.text == "function" then
      local j = i + 1
      while toks[j] and toks[j].text ~= "(" do j = j + 1 end
      j = j + 1
      while toks[j] and toks[j].text ~= ")" do
        if toks[j].kind == "name" then set[toks[j].text] = true end
        j = j + 1
      end
    end
  end
  return set
end

local OPS_52 = { ["//"] = true, ["&"] = true, ["|"] = true, ["~"] = true, ["<<"] = true, [">>"] = true }

function M.problems(name, source)
  local toks = tokens(source)
  local locals = declared(toks)
  local out = {}
  local function report(t, what)
    out[#out + 1] = format("%s:%d: uses %s, which Redis's Lua does not have", name, t.line, what)
  end
  -- open blocks: "{" (a table constructor: `name =` there is a field) or "block"
  -- (function, do, if: `name =` there assigns)
  local i, open = 1, {}
  while i <= #toks do
    local t = toks[i]
    if t.kind == "op" and t.text == "{" then open[#open + 1] = "{"
    elseif t.kind == "op" and t.text == "}" then open[#open] = nil
    elseif t.kind == "name" and (t.text == "function" or t.text == "do" or t.text == "if") then open[#open + 1] = "block"
    elseif t.kind == "name" and t.text == "end" then open[#open] = nil end
    local in_table = open[#open] == "{"
    local prev, nxt = toks[i - 1], toks[i + 1]
    local after_dot = prev and (prev.text == "." or prev.text == ":")
    if t.kind == "name" and t.text == "on_alert" and nxt and nxt.text == "=" and toks[i + 2]
       and toks[i + 2].text == "function" then
      -- skip to the function's end
      local depth, j = 0, i + 2
      repeat
        local w = toks[j]
        if w.kind == "name" and (w.text == "function" or w.text == "do" or w.text == "if") then depth = depth + 1
        elseif w.kind == "name" and w.text == "end" then depth = depth - 1 end
        j = j + 1
      until depth == 0 or j > #toks
      i = j
    else
      if t.kind == "op" and OPS_52[t.text] then
        report(t, "the operator " .. t.text .. " (Lua 5.3)")
      elseif t.kind == "op" and t.text == "::" then
        report(t, "a ::label:: (Lua 5.2)")
        if toks[i + 2] and toks[i + 2].text == "::" then i = i + 2 end   -- its closing ::
      elseif t.kind == "name" and not KEYWORDS[t.text] and not after_dot and not in_table and nxt
             and nxt.text == "=" and not locals[t.text] and not (prev and prev.text == "local") then
        out[#out + 1] = format("%s:%d: assigns the global %s, which Redis does not allow (make it local)",
                               name, t.line, t.text)
      elseif t.kind == "name" and t.text == "goto" and not after_dot and nxt and nxt.kind == "name" then
        report(t, "goto (Lua 5.2)")
      elseif t.kind == "name" and LACKING[t.text] and not after_dot and not locals[t.text] then
        local lack = LACKING[t.text]
        local field = nxt and (nxt.text == "." or nxt.text == ":") and toks[i + 2] and toks[i + 2].kind == "name"
                      and toks[i + 2].text
        if lack == true then
          report(t, field and (t.text .. "." .. field) or t.text)
        elseif field and lack[field] then
          report(t, t.text .. "." .. field)
        end
      end
      i = i + 1
    end
  end
  return out
end

return M
