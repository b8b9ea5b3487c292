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
--           or "[" -> jsonl, anything else -> csv)
--   opts.max_record_lines  the most physical lines one CSV record may span (default 100)
-- reader.name is the path (or "stdin"), reader.format the format in use.
-- reader:lines() -> iterator of line_no, event, err. A malformed record gives event nil
--   and err naming the file and line; iteration goes on with the next record. Every
--   non-blank line is either part of an event or reported: nothing is skipped silently.
-- reader.events, reader.malformed: how many events and errors lines() has given so far.
-- reader:warning() -> after lines(): a message when the input held no records at all
--   (empty, blank lines only, a CSV header alone), else nil.
-- reader:progress() -> bytes read, total bytes (nil when the input is not seekable).
-- reader:close() closes the file (never stdin); reaching the end closes it too.
--
-- JSON Lines: one JSON object per line, read by the C core's strict parser
-- (stella.decode_json): a repeated key is an error naming it, errors give the column;
-- integers within +-2^53 are numbers (Lua integers under 5.4), larger ones their exact
-- decimal string (so an id reaches the service as written); JSON null is dropped (an
-- absent key, or an array element left out); blank lines are skipped; a line holding
-- anything but an object (an array, a string...) is an error.
-- CSV (RFC 4180): a header row, "quoted" fields with "" escapes and embedded newlines,
-- CRLF or LF, an optional UTF-8 BOM. A dotted header (customer.email) fills a nested
-- table; a "tags" column is split on "|" into a list; empty cells are left out; every
-- value stays a string. A record's line number is the line where it starts. Rows may
-- have fewer cells than the header, not more.
-- CSV recovery: when a record fails (text after a closing quote, too many fields, a
-- quote never closed, or a quoted field still open after max_record_lines lines), its
-- first line is reported and the lines it had taken after that one are read again as
-- records. Until a record passes, those that follow are held to a stricter rule (exactly
-- the header's number of fields, no quote inside an unquoted field); each one failing it
-- is reported by its first line, and reading goes on from the next line. So one stray
-- quote costs its own line, not the rest of the file.
local error, ipairs, setmetatable, tostring, type = error, ipairs, setmetatable, tostring, type
local byte, find, sub = string.byte, string.find, string.sub
local concat = table.concat

local decode = require("stella.core").decode_json

local M = {}

local BOM = "\239\187\191"

local FORMATS = { jsonl = "jsonl", ndjson = "jsonl", json = "jsonl", csv = "csv" }
local EXTENSIONS = { jsonl = "jsonl", ndjson = "jsonl", json = "jsonl", csv = "csv" }

---------------------------------------------------------------------------
-- JSON
---------------------------------------------------------------------------

local function json_kind(text)
  local c = text:match("^%s*(.)")
  if c == "[" then return "an array" end
  if c == '"' then return "a string" end
  if c == "t" or c == "f" then return "a boolean" end
  if c == "n" then return "null" end
  return "a number"
end

-- One object from `text`: a table, or nil, a message without the place, the place
-- ("line L, column C", or nil) and the core's error table.
local function decode_object(text)
  local v, err = decode(text)
  if err then
    local where = err.line and ("line %d, column %d"):format(err.line, err.column) or nil
    if err.code == "duplicate_key" then return nil, err.message, where, err end
    return nil, "invalid JSON: " .. err.message, where, err
  end
  if type(v) ~= "table" or not find(text, "^%s*{") then
    return nil, "expected a JSON object, got " .. json_kind(text)
  end
  return v
end

-- Decodes one JSON object (strict: see the module's header). Returns a table, or nil,
-- a message ("invalid JSON at line 1, column 2: unexpected end of input",
-- 'duplicate key "channel" at line 1, column 30', "expected a JSON object, got an
-- array") and the core's error table { code, message, line, column, offset, path }
-- when there is one.
function M.decode_json(text)
  if type(text) ~= "string" then error("input.decode_json: string expected", 2) end
  local v, message, where, err = decode_object(text)
  if v then return v end
  if where then
    if err.code == "duplicate_key" then message = message .. " at " .. where
    else message = ("invalid JSON at %s: %s"):format(where, err.message) end
  end
  return nil, message, err
end

---------------------------------------------------------------------------
-- Line source: physical lines with their numbers, and lines held ahead: read ahead
-- to detect the format of a stream that cannot be rewound (stdin), or put back by a
-- CSV record that failed, to be read again.
---------------------------------------------------------------------------

local function next_line(self)
  local ahead, i = self.ahead, self.ahead_at
  local line = ahead[i]
  if line ~= nil then
    ahead[i] = nil
    self.ahead_at = i + 1
  else
    local f = self.file
    if not f then return nil end
    line = f:read("*l")
    if line == nil then
      self:close()
      return nil
    end
  end
  local n = self.line_no + 1
  self.line_no = n
  if n == 1 and sub(line, 1, 3) == BOM then line = sub(line, 4) end
  return line
end

-- `lines` (read after line `line_no`) are read again, as lines line_no + 1, ...
local function put_back(self, lines, line_no)
  local ahead = {}
  for i = 1, #lines do ahead[i] = lines[i] end
  local old = self.ahead
  for i = self.ahead_at, #old do ahead[#ahead + 1] = old[i] end
  self.ahead, self.ahead_at, self.line_no = ahead, 1, line_no
end

-- The first non-blank line, read ahead and kept for next_line.
local function peek_nonblank(self)
  local ahead = self.ahead
  for i = self.ahead_at, #ahead do
    if find(ahead[i], "%S") then return ahead[i] end
  end
  while self.file do
    local line = self.file:read("*l")
    if line == nil then return nil end
    ahead[#ahead + 1] = line   -- next_line strips a BOM from line 1
    if #ahead == 1 and self.line_no == 0 and sub(line, 1, 3) == BOM then line = sub(line, 4) end
    if find(line, "%S") then return line end
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

function Reader:warning()
  if self.events > 0 or self.malformed > 0 then return nil end
  if self.format == "csv" and self.columns[1] then return "no records (a CSV header and no rows)" end
  if self.line_no > 0 then return "no records (blank lines only)" end
  return "no records (the input is empty)"
end

local function line_error(self, line_no, message)
  return ("%s:%d: %s"):format(self.name, line_no, message)
end

-- What an iterator gives for a record it cannot read: counted, and named by its line.
local function malformed(self, line_no, message)
  self.malformed = self.malformed + 1
  return line_no, nil, line_error(self, line_no, message)
end

-- JSON Lines ---------------------------------------------------------------

local function jsonl_iter(self)
  return function()
    while true do
      local line = next_line(self)
      if line == nil then return nil end
      if find(line, "%S") then
        local line_no = self.line_no
        local event, message, _, err = decode_object(line)
        if event then
          self.events = self.events + 1
          return line_no, event
        end
        if err and err.column then   -- one line: its column says where
          if err.code == "duplicate_key" then
            message = ("%s at column %d"):format(message, err.column)
          else
            message = ("invalid JSON at column %d: %s"):format(err.column, err.message)
          end
        end
        return malformed(self, line_no, message)
      end
    end
  end
end

-- CSV ----------------------------------------------------------------------

local QUOTE, COMMA, CR = byte('"'), byte(","), byte("\r")

-- Reads one record starting with `line` (already read). Returns the list of cells, or
-- nil and a message; and, when it went on past `line` (a quoted field with newlines),
-- the lines it read after it. `strict`: a quote inside an unquoted field fails.
local function csv_record(self, line, strict)
  local cells, n, pos = {}, 0, 1
  local spanned   -- the lines read after the first, or nil
  while true do
    if byte(line, pos) == QUOTE then
      local buf = {}
      pos = pos + 1
      while true do
        local q = find(line, '"', pos, true)
        if not q then
          buf[#buf + 1] = sub(line, pos)
          buf[#buf + 1] = "\n"
          if spanned and #spanned + 1 >= self.max_record_lines then
            return nil, ("quoted field %d still open after %d lines (a stray quote?)")
              :format(n + 1, #spanned + 1), spanned
          end
          line = next_line(self)
          if line == nil then
            return nil, ("unterminated quoted field (field %d)"):format(n + 1), spanned
          end
          spanned = spanned or {}
          spanned[#spanned + 1] = line
          pos = 1
        elseif byte(line, q + 1) == QUOTE then
          buf[#buf + 1] = sub(line, pos, q)
          pos = q + 2
        else
          buf[#buf + 1] = sub(line, pos, q - 1)
          pos = q + 1
          break
        end
      end
      n = n + 1
      cells[n] = concat(buf)
      local c = byte(line, pos)
      if c == COMMA then
        pos = pos + 1
      elseif c == nil or (c == CR and pos == #line) then
        return cells, nil, spanned
      else
        return nil, ("unexpected character %q after a closing quote (field %d)")
          :format(sub(line, pos, pos), n), spanned
      end
    else
      local comma = find(line, ",", pos, true)
      local cell = sub(line, pos, comma and comma - 1 or -1)
      if not comma and byte(cell, -1) == CR then cell = sub(cell, 1, -2) end
      if strict and find(cell, '"', 1, true) then
        return nil, ("a quote inside unquoted field %d"):format(n + 1), spanned
      end
      n = n + 1
      cells[n] = cell
      if not comma then return cells, nil, spanned end
      pos = comma + 1
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

-- Records, with the recovery rule of the module's header: self.resync is the line of
-- the failed record being recovered from (strict checks), or nil.
local function csv_iter(self)
  local columns = self.columns
  local ncol = #columns
  return function()
    while true do
      local line = next_line(self)
      if line == nil then return nil end
      if not is_blank_record(line) then
        local line_no, strict = self.line_no, self.resync
        local cells, err, spanned = csv_record(self, line, strict)
        if cells then
          if #cells > ncol or (strict and #cells < ncol) then
            err = ("%d fields, but the header has %d columns"):format(#cells, ncol)
          else
            self.resync = nil
            self.events = self.events + 1
            return line_no, csv_event(columns, cells)
          end
        end
        if spanned then
          -- only the first line is known to be bad: the others are read again
          put_back(self, spanned, line_no)
          self.resync = self.resync or line_no
          err = ("%s; read again from line %d"):format(err, line_no + 1)
        end
        if strict then
          err = ("%s (looking for the next whole record after line %d)"):format(err, strict)
        end
        return malformed(self, line_no, err)
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

  local max_lines = opts.max_record_lines or 100
  if type(max_lines) ~= "number" or max_lines < 1 or max_lines % 1 ~= 0 then
    error("input.open: max_record_lines must be a whole number from 1", 2)
  end

  local self = setmetatable({ ahead = {}, ahead_at = 1, line_no = 0, events = 0, malformed = 0,
                              columns = {}, max_record_lines = max_lines }, Reader)
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
    -- "{" or "[": JSON, never a CSV header (a line that is not an object is an error)
    format = (first == nil or find(first, "^%s*[{[]")) and "jsonl" or "csv"
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
