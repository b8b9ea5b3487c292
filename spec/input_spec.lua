-- Specs for stella.input: JSON Lines and CSV readers for export files.
local input = require "stella.input"

local tmpfiles = {}

local function write_tmp(contents, ext)
  local path = os.tmpname() .. (ext or "")
  local f = assert(io.open(path, "wb"))
  f:write(contents)
  f:close()
  tmpfiles[#tmpfiles + 1] = path
  return path
end

-- All records of a reader: { { line_no, event, err }, ... }
local function read_all(reader)
  local out = {}
  for line_no, event, err in reader:lines() do
    out[#out + 1] = { line_no, event, err }
  end
  return out
end

local function records(contents, ext, format)
  local reader = assert(input.open(write_tmp(contents, ext), format))
  return read_all(reader), reader
end

-- A file handle over `contents`, standing in for stdin.
local function stdin_of(contents)
  local f = assert(io.tmpfile())
  f:write(contents)
  f:seek("set")
  return f
end

describe("stella.input", function()
  teardown(function()
    for _, p in ipairs(tmpfiles) do os.remove(p) end
    for _, p in ipairs(tmpfiles) do os.remove((p:gsub("%.%w+$", ""))) end
  end)

  describe("open", function()
    it("detects the format from the extension", function()
      for ext, format in pairs{ [".jsonl"] = "jsonl", [".ndjson"] = "jsonl", [".json"] = "jsonl",
                                [".csv"] = "csv", [".CSV"] = "csv" } do
        local reader = assert(input.open(write_tmp("a\n", ext)))
        assert.equal(format, reader.format, ext)
        reader:close()
      end
    end)

    it("detects the format from the content when the extension says nothing", function()
      local _, r1 = records('\n  \n  {"id": 1}\n', ".txt")
      assert.equal("jsonl", r1.format)
      local _, r2 = records("id,channel\n1,phone\n", ".export")
      assert.equal("csv", r2.format)
      local _, r3 = records("\239\187\191{\"id\": 1}\n", "")
      assert.equal("jsonl", r3.format)
    end)

    it("lets the caller force a format", function()
      local recs, reader = records('{"id":1}\n', ".csv", "jsonl")
      assert.equal("jsonl", reader.format)
      assert.same({ id = 1 }, recs[1][2])
    end)

    it("names the file it cannot open", function()
      local reader, err = input.open("/nonexistent/dir/tickets.csv")
      assert.is_nil(reader)
      assert.truthy(err:find("/nonexistent/dir/tickets.csv", 1, true))
    end)

    it("names a directory it cannot read", function()
      local reader, err = input.open("spec")
      assert.is_nil(reader)
      assert.equal("spec: Is a directory", err)
    end)

    it("raises on misuse", function()
      assert.has_error(function() input.open(nil) end)
      assert.has_error(function() input.open("") end)
      assert.has_error(function() input.open("x.csv", "xml") end)
      assert.has_error(function() input.open("x.csv", nil, 5) end)
    end)

    it("reads stdin for -", function()
      local reader = assert(input.open("-", nil, { stdin = stdin_of('{"id":"a"}\n{"id":"b"}\n') }))
      assert.equal("stdin", reader.name)
      assert.equal("jsonl", reader.format)
      local recs = read_all(reader)
      assert.same({ { 1, { id = "a" } }, { 2, { id = "b" } } }, recs)
    end)

    it("detects CSV on stdin without losing the lines it looked at", function()
      local reader = assert(input.open("-", nil, { stdin = stdin_of("\nid,channel\n7,chat\n") }))
      assert.equal("csv", reader.format)
      assert.same({ { 3, { id = "7", channel = "chat" } } }, read_all(reader))
    end)

    it("reads the real standard input of a child process", function()
      local lua = os.getenv("STELLA_TEST_LUA") or "lua5.4"
      local script = write_tmp([[
        local input = require "stella.input"
        local reader = assert(input.open("-"))
        for n, ev, err in reader:lines() do
          io.write(n, " ", ev and ev.customer.email or err, "\n")
        end
        io.write(reader.format, "\n")
      ]], ".lua")
      local data = write_tmp("customer.email,channel\nzoe@example.com,phone\n\"x,\"y\n", ".txt")
      local p = assert(io.popen(lua .. " " .. script .. " < " .. data .. " 2>&1"))
      local out = p:read("*a")
      p:close()
      assert.equal("2 zoe@example.com\n3 stdin:3: unexpected character \"y\" after a closing quote (field 1)\ncsv\n", out)
    end)

    it("reports progress in bytes for files", function()
      local reader = assert(input.open(write_tmp('{"id":1}\n{"id":2}\n', ".jsonl")))
      local pos, size = reader:progress()
      assert.equal(0, pos)
      assert.equal(18, size)
      read_all(reader)
      assert.same({ 18, 18 }, { reader:progress() })
      local piped = assert(input.open("-", "jsonl", { stdin = stdin_of("") }))
      assert.is_nil(piped:progress())
    end)
  end)

  describe("JSON Lines", function()
    it("yields one event per line with its line number, skipping blank lines", function()
      local recs = records('{"id": 1, "status": "solved"}\n\n   \n{"id": "T-2"}\r\n', ".jsonl")
      assert.same({ { 1, { id = 1, status = "solved" } }, { 4, { id = "T-2" } } }, recs)
    end)

    it("gives integral numbers as integers and drops nulls", function()
      local recs = records('{"id": 48211, "assignee": null, "n": 1.5, "tags": ["a", null, "b"], '
        .. '"requester": {"name": null, "email": "a@example.com"}}\n', ".jsonl")
      local ev = recs[1][2]
      assert.same({ id = 48211, n = 1.5, tags = { "a", "b" }, requester = { email = "a@example.com" } }, ev)
      if math.type then assert.equal("integer", math.type(ev.id)) end
      assert.equal("48211", tostring(ev.id))
    end)

    it("reports a malformed line with the file and line number, and goes on", function()
      local path = write_tmp('{"id": 1}\n{"id": 2,\n[1, 2]\n"text"\n42\n{"id": 3}\n', ".jsonl")
      local recs = read_all(assert(input.open(path)))
      assert.equal(6, #recs)
      assert.same({ 1, { id = 1 } }, recs[1])
      assert.is_nil(recs[2][2])
      assert.equal(2, recs[2][1])
      assert.truthy(recs[2][3]:find("^" .. path:gsub("%p", "%%%0") .. ":2: invalid JSON"))
      assert.equal(path .. ":3: expected a JSON object, got an array", recs[3][3])
      assert.equal(path .. ":4: expected a JSON object, got a string", recs[4][3])
      assert.equal(path .. ":5: expected a JSON object, got a number", recs[5][3])
      assert.same({ 6, { id = 3 } }, recs[6])
    end)

    it("reads integers past 2^53 exactly, as decimal strings", function()
      local recs = records('{"id": 9007199254740993}\n{"id": 9007199254740992}\n'
        .. '{"id": 9223372036854775807, "n": -9007199254740993}\n', ".jsonl")
      assert.equal("9007199254740993", recs[1][2].id)
      assert.equal(9007199254740992, recs[2][2].id)
      assert.equal("9007199254740992", ("%d"):format(recs[2][2].id))
      assert.same({ id = "9223372036854775807", n = "-9007199254740993" }, recs[3][2])
    end)

    it("refuses a repeated key, naming it and its column", function()
      local path = write_tmp('{"channel": "phone", "id": 1, "channel": "chat"}\n'
        .. '{"customer": {"email": "a@example.com", "email": "b@example.com"}}\n{"id": 2}\n', ".jsonl")
      local recs = read_all(assert(input.open(path)))
      assert.same({
        { 1, nil, path .. ':1: duplicate key "channel" at column 31' },
        { 2, nil, path .. ':2: duplicate key "customer.email" at column 41' },
        { 3, { id = 2 } },
      }, recs)
    end)

    it("names the column of a syntax error", function()
      local path = write_tmp('{"id": 1,}\n{"id": tru}\n{"a": "b"} x\n', ".jsonl")
      local recs = read_all(assert(input.open(path)))
      assert.same({
        { 1, nil, path .. ":1: invalid JSON at column 10: unexpected character (expected a string key)" },
        { 2, nil, path .. ":2: invalid JSON at column 8: invalid literal (expected true, false or null)" },
        { 3, nil, path .. ":3: invalid JSON at column 12: trailing characters after the document" },
      }, recs)
    end)

    it("reads JSON-looking input as JSON Lines, never as a CSV header", function()
      for _, ext in ipairs{ ".txt", "" } do
        local path = write_tmp("[[[]]]\n", ext)
        local reader = assert(input.open(path))
        assert.equal("jsonl", reader.format)
        assert.same({ { 1, nil, path .. ":1: expected a JSON object, got an array" } }, read_all(reader))
        assert.is_nil(reader:warning())
      end
      local reader = assert(input.open("-", nil, { stdin = stdin_of('\n  [{"id": 1}]\n{"id": 2}\n') }))
      assert.equal("jsonl", reader.format)
      assert.same({ { 2, nil, "stdin:2: expected a JSON object, got an array" }, { 3, { id = 2 } } },
                  read_all(reader))
      assert.same({ 1, 1 }, { reader.events, reader.malformed })
    end)

    it("says when an input held no records", function()
      local _, reader = records("", ".jsonl")
      assert.equal("no records (the input is empty)", reader:warning())
      _, reader = records("\n  \n", ".jsonl")
      assert.equal("no records (blank lines only)", reader:warning())
      _, reader = records('{"id": 1}\n', ".jsonl")
      assert.is_nil(reader:warning())
    end)

    it("strips a BOM and keeps UTF-8", function()
      local recs = records('\239\187\191{"name": "Zoë Åkesson"}\n', ".jsonl")
      assert.same({ { 1, { name = "Zoë Åkesson" } } }, recs)
    end)

    it("reads a last line without a newline, and an empty file", function()
      assert.same({ { 1, { id = 1 } } }, (records('{"id":1}', ".jsonl")))
      assert.same({}, (records("", ".jsonl")))
      assert.same({}, (records("", ".txt")))
    end)
  end)

  describe("decode_json", function()
    it("decodes one object and names what else it got", function()
      assert.same({ a = { b = 1 } }, input.decode_json('{"a": {"b": 1, "c": null}}'))
      local v, err = input.decode_json("[]")
      assert.is_nil(v)
      assert.equal("expected a JSON object, got an array", err)
      assert.has_error(function() input.decode_json(5) end)
    end)

    it("places errors by line and column, and refuses repeated keys", function()
      local v, err, detail = input.decode_json("{")
      assert.is_nil(v)
      assert.equal("invalid JSON at line 1, column 2: unexpected end of input", err)
      assert.equal("syntax", detail.code)
      v, err, detail = input.decode_json('{\n  "channel": "phone",\n  "channel": "chat"\n}')
      assert.is_nil(v)
      assert.equal('duplicate key "channel" at line 3, column 3', err)
      assert.same({ "duplicate_key", "channel" }, { detail.code, detail.path })
      v = assert(input.decode_json('{"ext_interaction_id": 9007199254740993}'))
      assert.equal("9007199254740993", v.ext_interaction_id)
    end)
  end)

  describe("CSV", function()
    it("maps the header to keys, dotted names to nested tables", function()
      local recs = records("id,status,requester.name,requester.email,assignee.email\n"
        .. "48211,solved,Jane Doe,jane@example.com,paul@blancapeak.com\n", ".csv")
      assert.same({ { 2, {
        id = "48211", status = "solved",
        requester = { name = "Jane Doe", email = "jane@example.com" },
        assignee = { email = "paul@blancapeak.com" },
      } } }, recs)
    end)

    it("keeps numbers as strings and leaves empty cells out", function()
      local recs = records("id,brand,tags,note\n123,,,\n", ".csv")
      assert.same({ { 2, { id = "123" } } }, recs)
    end)

    it("splits a tags column on |", function()
      local recs = records("id,tags\n1,billing|refund\n2, vip | |late \n3,solo\n", ".csv")
      assert.same({ "billing", "refund" }, recs[1][2].tags)
      assert.same({ "vip", "late" }, recs[2][2].tags)
      assert.same({ "solo" }, recs[3][2].tags)
    end)

    it("reads quoted fields with \"\" escapes, commas and embedded newlines", function()
      local recs = records('id,subject,body\n'
        .. '1,"Refund, please","She said ""hi""\nand then\nleft"\n'
        .. '2,"",plain\n', ".csv")
      assert.same({ 2, { id = "1", subject = "Refund, please", body = 'She said "hi"\nand then\nleft' } }, recs[1])
      -- the second record starts on line 5, after the three lines of the first
      assert.same({ 5, { id = "2", body = "plain" } }, recs[2])
    end)

    it("reads CRLF line ends and a BOM", function()
      local recs = records('\239\187\191id,customer.name\r\n1,"Zoë"\r\n2,Åsa\r\n\r\n', ".csv")
      assert.same({ { 2, { id = "1", customer = { name = "Zoë" } } },
                    { 3, { id = "2", customer = { name = "Åsa" } } } }, recs)
    end)

    it("keeps a CRLF inside a quoted field as it is", function()
      local recs = records('id,note\r\n1,"a\r\nb"\r\n', ".csv")
      assert.equal("a\r\nb", recs[1][2].note)
    end)

    it("skips blank lines and accepts rows with fewer cells than the header", function()
      local recs = records("id,channel,brand\n\n1,phone\n\n2\n", ".csv")
      assert.same({ { 3, { id = "1", channel = "phone" } }, { 5, { id = "2" } } }, recs)
    end)

    it("reports a row with more cells than the header, naming the line, and goes on", function()
      local path = write_tmp("id,channel\n1,phone\n2,chat,extra\n3,email\n", ".csv")
      local recs = read_all(assert(input.open(path)))
      assert.equal(3, #recs)
      assert.same({ 3, nil, path .. ":3: 3 fields, but the header has 2 columns" },
                  { recs[2][1], recs[2][2], recs[2][3] })
      assert.same({ 4, { id = "3", channel = "email" } }, recs[3])
    end)

    it("reports text after a closing quote and an unterminated quote", function()
      local path = write_tmp('id,name\n1,"Jane"Doe\n2,ok\n3,"never closed\n4,x\n', ".csv")
      local recs = read_all(assert(input.open(path)))
      assert.equal(path .. ":2: unexpected character \"D\" after a closing quote (field 2)", recs[1][3])
      assert.same({ 3, { id = "2", name = "ok" } }, recs[2])
      -- the quote of line 4 never closes: line 4 alone is lost, line 5 is read again
      assert.equal(path .. ":4: unterminated quoted field (field 2); read again from line 5", recs[3][3])
      assert.same({ 5, { id = "4", name = "x" } }, recs[4])
      assert.equal(4, #recs)
    end)

    -- The issue's case: a 5,000-row export whose row 3 opens a quote that never closes.
    it("loses only the line of a stray quote in a 5,000-row file, and names it", function()
      local rows = { "id,customer.name,customer.email,channel" }
      for i = 1, 5000 do
        local name = i == 3 and '"Jane' or ("Customer " .. i)
        rows[#rows + 1] = ("%d,%s,c%d@example.com,phone"):format(i, name, i)
      end
      local path = write_tmp(table.concat(rows, "\n") .. "\n", ".csv")
      local reader = assert(input.open(path))
      local seen, events, errs = {}, 0, {}
      for line_no, event, err in reader:lines() do
        assert.is_nil(seen[line_no], "line " .. line_no .. " given twice")
        seen[line_no] = true
        if event then
          events = events + 1
          assert.equal(tostring(line_no - 1), event.id)
        else
          errs[#errs + 1] = err
        end
      end
      -- every row is an event or reported: rows 1..5000 are lines 2..5001
      assert.equal(5000, events + #errs)
      for line_no = 2, 5001 do assert.is_true(seen[line_no], "line " .. line_no) end
      assert.same({ path .. ":4: quoted field 2 still open after 100 lines (a stray quote?); "
                    .. "read again from line 5" }, errs)
      assert.same({ 4999, 1 }, { reader.events, reader.malformed })
    end)

    it("reports a stray quote closed lines later by another field's quote, and reads on", function()
      local path = write_tmp('id,name,channel\n1,"Jane,phone\n2,Omar,chat\n3,"Li" Wei,email\n4,Ana,phone\n', ".csv")
      local recs = read_all(assert(input.open(path)))
      assert.same({
        { 2, nil, path .. ':2: unexpected character "L" after a closing quote (field 2); read again from line 3' },
        { 3, { id = "2", name = "Omar", channel = "chat" } },
        { 4, nil, path .. ':4: unexpected character " " after a closing quote (field 2)' },
        { 5, { id = "4", name = "Ana", channel = "phone" } },
      }, recs)
    end)

    it("reads the lines of a failed record again under strict rules until one passes", function()
      -- record 2 spans lines 2-4 and fails at its end; lines 3 and 4 are its fragments
      local path = write_tmp('id,body,channel\n1,"a\nb,c\nd"x,chat\n2,ok,phone\n3,short\n', ".csv")
      local recs = read_all(assert(input.open(path)))
      local after = " (looking for the next whole record after line 2)"
      assert.same({
        { 2, nil, path .. ':2: unexpected character "x" after a closing quote (field 2); read again from line 3' },
        { 3, nil, path .. ":3: 2 fields, but the header has 3 columns" .. after },
        { 4, nil, path .. ":4: a quote inside unquoted field 1" .. after },
        { 5, { id = "2", body = "ok", channel = "phone" } },
        -- once a record has passed, a short row is fine again
        { 6, { id = "3", body = "short" } },
      }, recs)
    end)

    it("bounds the lines a quoted field may span (opts.max_record_lines)", function()
      local body = {}
      for i = 1, 50 do body[i] = "line " .. i end
      local text = 'id,body\n1,"' .. table.concat(body, "\n") .. '"\n2,x\n'
      local recs = read_all(assert(input.open(write_tmp(text, ".csv"))))
      assert.same({ 2, { id = "1", body = table.concat(body, "\n") } }, recs[1])
      assert.same({ 52, { id = "2", body = "x" } }, recs[2])
      local path = write_tmp(text, ".csv")
      recs = read_all(assert(input.open(path, nil, { max_record_lines = 10 })))
      assert.equal(path .. ":2: quoted field 2 still open after 10 lines (a stray quote?); read again from line 3",
                   recs[1][3])
      -- lines 3..51, the rest of the field's text, are read again and fail the strict
      -- check (one field where the header has two; the last holds the closing quote)
      for i = 2, 49 do assert.is_nil(recs[i][2]) end
      assert.equal(path .. ":51: a quote inside unquoted field 1 (looking for the next whole record after line 2)",
                   recs[50][3])
      assert.same({ 52, { id = "2", body = "x" } }, recs[51])
      assert.equal(51, #recs)
      assert.has_error(function() input.open(path, nil, { max_record_lines = 0 }) end)
    end)

    it("refuses a bad header", function()
      local cases = {
        ["id,id\n"] = ":1: duplicate column \"id\"",
        ["id,,channel\n"] = ":1: column 2 has no name",
        ["customer,customer.email\n"] = ":1: column \"customer\" conflicts with column \"customer.email\"",
        ["customer..email\n"] = ":1: bad column name \"customer..email\"",
      }
      for header, message in pairs(cases) do
        local path = write_tmp(header, ".csv")
        local reader, err = input.open(path)
        assert.is_nil(reader)
        assert.equal(path .. message, err)
      end
    end)

    it("gives no events for an empty file or a header alone, and says so", function()
      assert.same({}, (records("", ".csv")))
      local recs, reader = records("id,channel\r\n", ".csv")
      assert.same({}, recs)
      assert.equal("no records (a CSV header and no rows)", reader:warning())
      recs, reader = records("id,channel\n\n\n", ".csv")
      assert.same({}, recs)
      assert.equal("no records (a CSV header and no rows)", reader:warning())
    end)

    it("reads the example export", function()
      local reader = assert(input.open("examples/interactions.csv"))
      local recs = read_all(reader)
      assert.is_true(#recs >= 8)
      for _, r in ipairs(recs) do
        assert.is_nil(r[3])
        assert.is_string(r[2].id)
        assert.is_table(r[2].requester)
      end
    end)
  end)
end)
