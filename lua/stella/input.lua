-- stella.input: readers for export files (JSON Lines and CSV), one event per record.
--
--   local reader, err = input.open("tickets.csv")    -- or "-" for stdin
--   for line_no, event, err in reader:lines() do
--     if event then ... else io.stderr:write(err, "\n") end   -- err = "FILE:LINE: message"
--   end
--
-- input.open(path [, format [, opts]]) -> reader | nil, err
--   path    a file name, or "-" for standard input (opts.stdin, default io.stdin)
--   format  "jsonl" or "csv"; without it, taken from the extension (.jsonl, .ndjson, .json
--           -> jsonl; .csv -> csv), else from the content (first non-blank character "{"
--           -> jsonl, anything else -> csv)
-- reader.name is the path (or "stdin"), reader.format the format in use.
-- reader:lines() -> iterator of line_no, event, err. A malformed record gives event nil
--   and err naming the file and line; iteration goes on with the next record.
-- reader:progress() -> bytes read, total bytes (nil when the input is not seekable).
-- reader:close() closes the file (never stdin); reaching the end closes it too.
--
-- JSON Lines: one JSON object per line; blank lines are skipped; JSON null is dropped (an
-- absent key, or an array element left out) and integral numbers become Lua integers.
-- CSV (RFC 4180): a header row, "quoted" fields with "" escapes and embedded newlines,
-- CRLF or LF, an optional UTF-8 BOM. A dotted header (customer.email) fills a nested
-- table; a "tags" column is split on "|" into a list; empty cells are left out; every
-- value stays a string. A record's line number is the line where it starts.
local error, ipairs, pairs, setmetatable, tostring, type = error, ipairs, pairs, setmetatable, tostring, type
local concat = table.concat
local tointeger = math.tointeger

local cjson = require "cjson.safe"

local M = {}

local BOM = "\239\187\191"

local FORMATS = { jsonl = "jsonl", ndjson = "jsonl", json = "jsonl", csv = "csv" }
local EXTENSIONS = { jsonl = "jsonl", ndjson = "jsonl", json = "jsonl", csv = "csv" }

---------------------------------------------------------------------------
-- JSON
---------------------------------------------------------------------------

local null = cjson.null

-- Drops nulls (keys and array elements) and turns integral floats into integers
-- (lua-cjson decodes every number as a float under Lua 5.4), in place.
local function clean(t)
  local n = #t
  if n > 0 then
    -- an array: lua-cjson gives keys 1..n with nulls as cjson.null, never holes
    local j = 0
    for i = 1, n do
      local v = t[i]
      if v ~= null then
        j = j + 1
        if type(v) == "table" then clean(v)
        elseif tointeger and type(v) == "number" then v = tointeger(v) or v end
        t[j] = v
      end
    end
    for i = j + 1, n do t[i] = nil end
  else
    for k, v in pairs(t) do
      if v == null then
        t[k] = nil
      elseif type(v) == "table" then
        clean(v)
      elseif tointeger and type(v) == "number" then
        local i = tointeger(v)
        if i then t[k] = i end
      end
    end
  end
  return t
end

local function json_kind(text)
  local c = text:match("^%s*(.)")
  if c == "[" then return "an array" end
  if c == '"' then return "a string" end
  if c == "t" or c == "f" then return "a boolean" end
  if c == "n" then return "null" end
  return "a number"
end

-- Decodes one JSON object. Returns a table (nulls dropped, integers as integers)
-- or nil and a message.
function M.decode_json(text)
  if type(text) ~= "string" then error("input.decode_json: string expected", 2) end
  local v, err = cjson.decode(text)
  if v == nil then
    return nil, "invalid JSON: " .. tostring(err):gsub("^Expected", "expected")
  end
  if type(v) ~= "table" or not text:match("^%s*{") then
    return nil, "expected a JSON object, got " .. json_kind(text)
  end
  return clean(v)
end

---------------------------------------------------------------------------
-- Line source: physical lines with their numbers, and a look-ahead buffer for
-- detecting the format of a stream that cannot be rewound (stdin).
---------------------------------------------------------------------------

local function next_line(self)
  local line
  local buffered = self.buffered
  if buffered[1] then
    line = table.remove(buffered, 1)
  else
    if not self.file then return nil end
    line = self.file:read("*l")
    if line == nil then
      self:close()
      return nil
    end
  end
  self.line_no = self.line_no + 1
  if self.line_no == 1 and line:sub(1, 3) == BOM then line = line:sub(4) end
  return line
end

-- The first non-blank line, read ahead and kept for next_line.
local function peek_nonblank(self)
  for _, line in ipairs(self.buffered) do
    if line:find("%S") then return line end
  end
  while self.file do
    local line = self.file:read("*l")
    if line == nil then return nil end
    if #self.buffered == 0 and self.line_no == 0 and line:sub(1, 3) == BOM then
      -- keep the BOM (next_line strips it) but look past it
      self.buffered[1] = line
      line = line:sub(4)
    else
      self.buffered[#self.buffered + 1] = line
    end
    if line:find("%S") then return line end
  end
  return nil
end

---------------------------------------------------------------------------
-- Reader
---------------------------------------------------------------------------

local Reader = {}
Reader.__index = Reader

function Reader:close()
  local f = self.file
  self.file = nil
  if f and self.owns_file then f:close() end
end

function Reader:progress()
  if not self.size then return nil end
  local pos = self.file and self.file:seek("cur") or self.size
  return pos, self.size
end

local function line_error(self, line_no, message)
  return ("%s:%d: %s"):format(self.name, line_no, message)
end

-- JSON Lines ---------------------------------------------------------------

local function jsonl_iter(self)
  return function()
    while true do
      local line = next_line(self)
      if line == nil then return nil end
      if line:find("%S") then
        local line_no = self.line_no
        local event, err = M.decode_json(line)
        if event then return line_no, event end
        return line_no, nil, line_error(self, line_no, err)
      end
    end
  end
end

-- CSV ----------------------------------------------------------------------

-- Reads one record starting with `line` (already read). Returns the list of cells, or
-- nil and a message. Continues onto following lines inside quoted fields.
local function csv_record(self, line)
  local cells = {}
  local pos = 1
  while true do
    if line:sub(pos, pos) == '"' then
      local buf = {}
      pos = pos + 1
      while true do
        local q = line:find('"', pos, true)
        if not q then
          buf[#buf + 1] = line:sub(pos)
          buf[#buf + 1] = "\n"
          line = next_line(self)
          if line == nil then return nil, "unterminated quoted field" end
          pos = 1
        elseif line:sub(q + 1, q + 1) == '"' then
          buf[#buf + 1] = line:sub(pos, q)
          pos = q + 2
        else
          buf[#buf + 1] = line:sub(pos, q - 1)
          pos = q + 1
          break
        end
      end
      cells[#cells + 1] = concat(buf)
      local c = line:sub(pos, pos)
      if c == "," then
        pos = pos + 1
      elseif c == "" or (c == "\r" and pos == #line) then
        return cells
      else
        return nil, ("unexpected character %q after a closing quote (field %d)"):format(c, #cells)
      end
    else
      local comma = line:find(",", pos, true)
      if comma then
        cells[#cells + 1] = line:sub(pos, comma - 1)
        pos = comma + 1
      else
        local last = line:sub(pos)
        if last:sub(-1) == "\r" then last = last:sub(1, -2) end
        cells[#cells + 1] = last
        return cells
      end
    end
  end
end

local function is_blank_record(line)
  return line == "" or line == "\r"
end

-- Reads the header row and turns it into a list of { path = {...}, tags = bool }.
-- Returns true, or nil and a message.
local function csv_header(self)
  local line
  repeat
    line = next_line(self)
    if line == nil then self.columns = {} return true end
  until not is_blank_record(line)
  local line_no = self.line_no
  local cells, err = csv_record(self, line)
  if not cells then return nil, line_error(self, line_no, err) end
  local columns, seen = {}, {}
  for i, name in ipairs(cells) do
    name = name:match("^%s*(.-)%s*$")
    if name == "" then
      return nil, line_error(self, line_no, ("column %d has no name"):format(i))
    end
    if seen[name] then
      return nil, line_error(self, line_no, ("duplicate column %q"):format(name))
    end
    seen[name] = true
    local path = {}
    for part in (name .. "."):gmatch("([^.]*)%.") do
      if part == "" then
        return nil, line_error(self, line_no, ("bad column name %q"):format(name))
      end
      path[#path + 1] = part
    end
    columns[i] = { name = name, path = path, tags = (name == "tags") }
  end
  -- "customer" and "customer.email" cannot both be columns
  for _, col in ipairs(columns) do
    local prefix = col.path[1]
    for j = 2, #col.path do
      if seen[prefix] then
        return nil, line_error(self, line_no,
          ("column %q conflicts with column %q"):format(prefix, col.name))
      end
      prefix = prefix .. "." .. col.path[j]
    end
  end
  self.columns = columns
  return true
end

local function split_tags(value)
  local list = {}
  for tag in (value .. "|"):gmatch("([^|]*)|") do
    tag = tag:match("^%s*(.-)%s*$")
    if tag ~= "" then list[#list + 1] = tag end
  end
  return list
end

local function csv_event(columns, cells)
  local event = {}
  for i, value in ipairs(cells) do
    if value ~= "" then
      local col = columns[i]
      if col.tags then value = split_tags(value) end
      local t, path = event, col.path
      for j = 1, #path - 1 do
        local sub = t[path[j]]
        if sub == nil then sub = {}; t[path[j]] = sub end
        t = sub
      end
      t[path[#path]] = value
    end
  end
  return event
end

local function csv_iter(self)
  local columns = self.columns
  return function()
    while true do
      local line = next_line(self)
      if line == nil then return nil end
      if not is_blank_record(line) then
        local line_no = self.line_no
        local cells, err = csv_record(self, line)
        if not cells then return line_no, nil, line_error(self, line_no, err) end
        if #cells > #columns then
          return line_no, nil, line_error(self, line_no,
            ("%d fields, but the header has %d columns"):format(#cells, #columns))
        end
        return line_no, csv_event(columns, cells)
      end
    end
  end
end

function Reader:lines()
  if self.format == "csv" then return csv_iter(self) end
  return jsonl_iter(self)
end

---------------------------------------------------------------------------
-- Opening
---------------------------------------------------------------------------

function M.open(path, format, opts)
  if type(path) ~= "string" or path == "" then error("input.open: path expected", 2) end
  if format ~= nil then
    if type(format) ~= "string" or not FORMATS[format] then
      error("input.open: format must be \"jsonl\" or \"csv\"", 2)
    end
    format = FORMATS[format]
  end
  if opts ~= nil and type(opts) ~= "table" then error("input.open: options table expected", 2) end
  opts = opts or {}

  local self = setmetatable({ buffered = {}, line_no = 0 }, Reader)
  if path == "-" then
    self.name = "stdin"
    self.file = opts.stdin or io.stdin
    self.owns_file = false
  else
    local f, err = io.open(path, "rb")
    if not f then return nil, err end
    local ok, rerr = f:read(0)   -- "" (or nil at the end of an empty file); fails on a directory
    if ok == nil and rerr then
      f:close()
      return nil, path .. ": " .. tostring(rerr)
    end
    self.name = path
    self.file = f
    self.owns_file = true
    local size = f:seek("end")
    if size and f:seek("set") then self.size = size end
    format = format or EXTENSIONS[(path:match("%.([%w]+)$") or ""):lower()]
  end
  if not format then
    local first = peek_nonblank(self)
    format = (first == nil or first:match("^%s*{")) and "jsonl" or "csv"
  end
  self.format = format
  if format == "csv" then
    local ok, err = csv_header(self)
    if not ok then
      self:close()
      return nil, err
    end
  end
  return self
end

return M
