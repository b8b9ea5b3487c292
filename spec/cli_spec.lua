-- Specs for the `stella` command, end to end: bin/stella runs as a child process (under
-- $STELLA_TEST_LUA, with this process's LUA_PATH/LUA_CPATH) against the loopback test server.
local testserver = require "support.testserver"
local cjson = require "cjson"

local LUA = os.getenv("STELLA_TEST_LUA") or "lua5.4"
local TEST_KEY = "tk_cli_0123456789abcdefSECRET"
local PROD_KEY = "pk_cli_9876543210fedcbaSECRET"
local RULES_KEY = "rk_rules_file_5555SECRET"

local has_trigger = pcall(require, "stella.trigger")
local has_sqlite = pcall(require, "stella.store.sqlite")
local has_memory = pcall(require, "stella.store.memory")

-- `it`, or `pending` when a module the spec needs has not landed yet.
local function it_with(ok, name, fn)
  if ok then return it(name, fn) end
  return pending(name .. " (needs stella.trigger and the stores)")
end

-- the shell and file helpers the nginx launchers share
local nginx = require "stella.nginx"
local shell_quote, read_file, exists, sh = nginx.shell_quote, nginx.read_file, nginx.file_exists, nginx.run

local function write_file(path, contents)
  assert(nginx.write_file(path, contents))
  return path
end

-- Every output a run produced, checked for keys at the end.
local all_outputs = {}

local function assert_no_key(text)
  for _, key in ipairs{ TEST_KEY, PROD_KEY, RULES_KEY } do
    assert.is_nil(text:find(key, 1, true), "a key leaked into the output:\n" .. text)
  end
end

-- The event lines of examples/interactions.jsonl that should be sent (ext_interaction_id).
local EXAMPLE_SENT = {
  "48201", "48202", "48204", "48209", "48210", "48211", "48212", "48214", "48215", "48216",
  "48218", "48221", "48223", "48225", "48226", "48227", "48229", "48231", "48233", "48235",
  "48238", "48239", "48242", "48243", "48244", "48245", "48246", "48247",
}
local EXAMPLE_RECORDED = { "48207", "48228" }   -- vip-no-survey: sent with do_not_send
-- outcome -> count for a first run of examples/interactions.jsonl over an empty store
local EXAMPLE_COUNTS = {
  sent = 28, recorded = 2, invalid = 1,
  -- not solved (4), manual channel (3), excluded tags (3), test accounts (2),
  -- unsubscribed (1), duplicate ticket 48215 (1)
  skipped = 14,
  suppressed = 3,   -- repeat customers inside the window: 48230, 48236, 48241
}

-- Parses the summary table of `stella trigger`.
local function summary(stdout)
  local s = { by_status = {}, rows = {}, total = nil, malformed = nil }
  local in_table = false
  for line in stdout:gmatch("([^\n]*)\n") do
    if line == "" then
      in_table = false
    elseif line:match("^outcome%s+reason%s+count$") then
      in_table = true
    elseif line:match("^malformed lines: ") then
      s.malformed = tonumber(line:match("(%d+)$"))
      in_table = false
    elseif in_table then
      local total = line:match("^total%s+(%d+)$")
      if total then
        s.total = tonumber(total)
      else
        local status, reason, count = line:match("^(%S+)%s+(%S+)%s+(%d+)$")
        assert(status, "unexpected summary line: " .. line)
        s.by_status[status] = (s.by_status[status] or 0) + tonumber(count)
        s.rows[status .. "/" .. reason] = tonumber(count)
      end
    end
  end
  return s
end

describe("stella command", function()
  local server, dir, db

  -- Runs bin/stella. opts: env = { NAME = value | false }, stdin = string, keys = false
  -- (no key variables at all). Returns status, stdout, stderr.
  local function stella(args, opts)
    opts = opts or {}
    local env = {
      STELLA_TEST_KEY = TEST_KEY,
      STELLA_BASE_URL = server.url,
    }
    if opts.keys == false then env.STELLA_TEST_KEY = nil end
    for k, v in pairs(opts.env or {}) do env[k] = v or nil end
    local parts = { "env",
                    "-u", "STELLA_API_KEY", "-u", "STELLA_TEST_KEY", "-u", "STELLA_PRODUCTION_KEY",
                    "-u", "STELLA_MODE", "-u", "STELLA_BASE_URL", "-u", "STELLA_DEBUG" }
    for _, name in ipairs{ "LUA_PATH", "LUA_CPATH", "LUA_PATH_5_4", "LUA_CPATH_5_4" } do
      local v = os.getenv(name)
      if v then parts[#parts + 1] = name .. "=" .. shell_quote(v) end
    end
    for k, v in pairs(env) do parts[#parts + 1] = k .. "=" .. shell_quote(v) end
    parts[#parts + 1] = LUA
    parts[#parts + 1] = "bin/stella"
    for _, a in ipairs(args) do parts[#parts + 1] = shell_quote(a) end
    local stdin = dir .. "/stdin"
    write_file(stdin, opts.stdin or "")
    parts[#parts + 1] = "<" .. shell_quote(stdin)
    parts[#parts + 1] = ">" .. shell_quote(dir .. "/stdout")
    parts[#parts + 1] = "2>" .. shell_quote(dir .. "/stderr")
    local status = sh(table.concat(parts, " "))
    local out, err = read_file(dir .. "/stdout") or "", read_file(dir .. "/stderr") or ""
    all_outputs[#all_outputs + 1] = out
    all_outputs[#all_outputs + 1] = err
    assert_no_key(out)
    assert_no_key(err)
    return status, out, err
  end

  local function ids_received()
    local ids = {}
    for _, r in ipairs(server:requests()) do
      ids[#ids + 1] = cjson.decode(r.body).ext_interaction_id
    end
    table.sort(ids)
    return ids
  end

  local function sorted(list)
    local copy = {}
    for i, v in ipairs(list) do copy[i] = v end
    table.sort(copy)
    return copy
  end

  local n = 0
  local function fresh_db()
    n = n + 1
    return ("%s/run%d.db"):format(dir, n)
  end

  lazy_setup(function()
    server = testserver.start()
    dir = assert(nginx.temp_dir("stella-cli"))
  end)

  lazy_teardown(function()
    if server then server:stop() end
    if dir then nginx.remove_dir(dir) end
  end)

  before_each(function()
    server:reset()
    db = fresh_db()
  end)

  describe("housekeeping", function()
    it("drops expired marks at the start of a trigger run, keeps live ones", function()
      local store_mod = require "stella.store"
      local st = assert(store_mod.sqlite(db))
      st:put_mark("suppress|brand:x|old", os.time() - 10, nil)
      st:put_mark("suppress|brand:x|live", os.time() + 86400, nil)
      st:close()
      local rules = dir .. "/empty_rules.lua"
      write_file(rules, "return {}")
      local status = stella({ "trigger", "--rules", rules, "--db", db, "-" }, { stdin = "" })
      assert.equal(0, status)
      st = assert(store_mod.sqlite(db))
      assert.is_nil((st:get_mark("suppress|brand:x|old", os.time() - 100)))
      assert.is_number((st:get_mark("suppress|brand:x|live", os.time())))
      st:close()
    end)
  end)

  describe("help and usage", function()
    it("prints the command list for --help, -h and help", function()
      for _, args in ipairs{ { "--help" }, { "-h" }, { "help" } } do
        local status, out, err = stella(args)
        assert.equal(0, status)
        assert.equal("", err)
        assert.truthy(out:find("^usage: stella COMMAND"))
        for _, cmd in ipairs{ "trigger", "send", "validate", "status", "retry", "unsubscribe" } do
          assert.truthy(out:find("\n  " .. cmd .. " ", 1, true), cmd)
        end
      end
    end)

    it("prints each command's help, with --help, -h or help COMMAND, even among other arguments", function()
      for _, cmd in ipairs{ "trigger", "send", "validate", "status", "retry", "unsubscribe", "help" } do
        for _, args in ipairs{ { cmd, "--help" }, { cmd, "-h" }, { "help", cmd },
                               { cmd, "--bogus", "--help" } } do
          local status, out, err = stella(args)
          assert.equal(0, status, table.concat(args, " "))
          assert.equal("", err)
          assert.truthy(out:find("^usage: stella " .. cmd), out)
        end
      end
    end)

    it("names the key variables in help, never their values", function()
      local _, out = stella({ "send", "--help" }, { env = { STELLA_PRODUCTION_KEY = PROD_KEY } })
      assert.truthy(out:find("STELLA_TEST_KEY", 1, true))
      assert.truthy(out:find("STELLA_PRODUCTION_KEY", 1, true))
    end)

    it("prints the version", function()
      local status, out = stella{ "--version" }
      assert.equal(0, status)
      assert.truthy(out:find("^lua%-stella %d"))
    end)

    local usage_errors = {
      { args = {}, says = "usage: stella COMMAND" },
      { args = { "frobnicate" }, says = "unknown command frobnicate" },
      { args = { "--frobnicate" }, says = "unknown option --frobnicate" },
      { args = { "help", "frobnicate" }, says = "unknown command frobnicate" },
      { args = { "trigger", "examples/interactions.jsonl" }, says = "--rules FILE is required" },
      { args = { "trigger", "--rules" }, says = "--rules needs a value" },
      { args = { "trigger", "--rules", "examples/rules.lua", "--bogus" }, says = "unknown option --bogus" },
      { args = { "trigger", "--rules", "examples/rules.lua", "-x" }, says = "unknown option -x" },
      { args = { "trigger", "--dry-run=yes", "--rules", "r.lua" }, says = "--dry-run takes no value" },
      { args = { "trigger", "--rules", "r.lua", "--format", "xml" }, says = "--format must be jsonl or csv" },
      { args = { "trigger", "--rules", "examples/rules.lua", "--connections", "0" },
        says = "--connections must be a whole number from 1 to 64" },
      { args = { "trigger", "--rules", "examples/rules.lua", "--connections", "two" },
        says = "--connections must be a whole number from 1 to 64" },
      { args = { "retry", "--connections", "65" }, says = "--connections must be a whole number from 1 to 64" },
      { args = { "validate", "--rules", "examples/rules.lua", "--channels", "phone" }, says = "not both" },
      { args = { "send" }, says = "the request is missing" },
      { args = { "send", "{}", "{}" }, says = "give one request" },
      { args = { "send", "--test", "--production", "{}" }, says = "not both" },
      { args = { "status", "--since", "yesterday" }, says = "--since takes a duration" },
      { args = { "status", "extra" }, says = "unexpected argument extra" },
      { args = { "retry", "extra" }, says = "unexpected argument extra" },
      { args = { "unsubscribe" }, says = "give at least one e-mail address" },
      { args = { "unsubscribe", "not-an-address" }, says = "not an e-mail address: not-an-address" },
    }
    for _, case in ipairs(usage_errors) do
      it("exits 2 with a message and the usage: stella " .. table.concat(case.args, " "), function()
        local status, out, err = stella(case.args)
        assert.equal(2, status)
        assert.equal("", out)
        assert.truthy(err:find(case.says, 1, true), err)
        assert.truthy(err:find("usage: stella", 1, true), err)
      end)
    end

    it("exits 2 naming the variables when a sending command has no key", function()
      for _, args in ipairs{
        { "send", '{"channel":"phone"}' },
        { "trigger", "--rules", "examples/rules.lua", "--db", db, "examples/interactions.jsonl" },
        { "retry", "--db", db },
      } do
        local status, out, err = stella(args, { keys = false })
        assert.equal(2, status, table.concat(args, " "))
        assert.equal("", out)
        assert.truthy(err:find("no API key for test mode", 1, true), err)
        assert.truthy(err:find("STELLA_TEST_KEY", 1, true), err)
        assert.truthy(err:find("STELLA_API_KEY", 1, true), err)
      end
      local status, _, err = stella({ "send", "--production", "{}" }, { keys = false })
      assert.equal(2, status)
      assert.truthy(err:find("STELLA_PRODUCTION_KEY", 1, true), err)
      assert.equal(0, #server:requests())
      assert.is_false(exists(db))
    end)

    it("exits 2 on a bad STELLA_MODE", function()
      local status, _, err = stella({ "send", "{}" }, { env = { STELLA_MODE = "staging" } })
      assert.equal(2, status)
      assert.truthy(err:find("test or production", 1, true))
    end)

    it("exits 2 on a rules file that does not load, without showing a key in it", function()
      local rules = write_file(dir .. "/broken.lua", 'return { api_key = "' .. RULES_KEY .. '" ')
      local status, out, err = stella{ "trigger", "--rules", rules, "--db", db }
      assert.equal(2, status)
      assert.equal("", out)
      assert.truthy(err:find("broken.lua:1:", 1, true), err)
      -- Lua's own message would quote the unfinished string, key and all
      local unfinished = write_file(dir .. "/unfinished.lua", 'return { api_key = "' .. RULES_KEY .. '\n}')
      status, out, err = stella{ "trigger", "--rules", unfinished, "--db", db }
      assert.equal(2, status)
      assert.truthy(err:find("unfinished.lua:1: unfinished string", 1, true), err)
      local status2, _, err2 = stella{ "trigger", "--rules", dir .. "/missing.lua", "--db", db }
      assert.equal(2, status2)
      assert.truthy(err2:find("missing.lua", 1, true), err2)
      local notable = write_file(dir .. "/notable.lua", "return 42")
      local status3, _, err3 = stella{ "trigger", "--rules", notable, "--db", db }
      assert.equal(2, status3)
      assert.truthy(err3:find("must return a table", 1, true), err3)
    end)
  end)

  describe("send", function()
    local REQ = '{"customer":{"name":"Jane","email":"janecustomer@example.com"},'
      .. '"ext_interaction_id":123456,"employee":{"email":"paulagent@blancapeak.com"},"channel":"phone"}'

    it("sends the JSON argument and prints the request id", function()
      local status, out, err = stella{ "send", REQ }
      assert.equal(0, status, err)
      assert.equal("req-1\n", out)
      assert.equal("", err)
      local reqs = server:requests()
      assert.equal(1, #reqs)
      assert.equal("/v1/requests", reqs[1].path)
      assert.equal(TEST_KEY, reqs[1].headers["x-api-key"])
      assert.equal('{"customer":{"name":"Jane","email":"janecustomer@example.com"},'
        .. '"employee":{"email":"paulagent@blancapeak.com"},"channel":"phone","ext_interaction_id":"123456"}',
        reqs[1].body)
    end)

    it("reads the request from stdin with -", function()
      local status, out = stella({ "send", "-" }, { stdin = REQ .. "\n" })
      assert.equal(0, status)
      assert.equal("req-1\n", out)
      assert.equal(1, #server:requests())
    end)

    it("uses the production key with --production, and STELLA_API_KEY over both", function()
      assert.equal(0, (stella({ "send", "--production", REQ }, { env = { STELLA_PRODUCTION_KEY = PROD_KEY } })))
      assert.equal(PROD_KEY, server:requests()[1].headers["x-api-key"])
      server:reset()
      assert.equal(0, (stella({ "send", REQ }, { env = { STELLA_MODE = "production",
                                                         STELLA_PRODUCTION_KEY = PROD_KEY } })))
      assert.equal(PROD_KEY, server:requests()[1].headers["x-api-key"])
      server:reset()
      assert.equal(0, (stella({ "send", "--test", REQ }, { env = { STELLA_API_KEY = PROD_KEY } })))
      assert.equal(PROD_KEY, server:requests()[1].headers["x-api-key"])
    end)

    it("says so when the service returns no id", function()
      server:script{ { status = 200, body = { customer = { name = "Jane" } } } }
      local status, out = stella{ "send", REQ }
      assert.equal(0, status)
      assert.equal("sent (no request id returned)\n", out)
    end)

    it("prints error: KIND: message for an invalid request and sends nothing", function()
      local status, out, err = stella{ "send", '{"customer":{"name":"Jane","email":"jane@"},'
        .. '"employee":{"email":"paulagent@blancapeak.com"},"channel":"phone"}' }
      assert.equal(1, status)
      assert.equal("", out)
      assert.truthy(err:find("^error: invalid: "), err)
      assert.truthy(err:find("customer.email", 1, true), err)
      assert.truthy(err:find("(invalid_email)", 1, true), err)
      assert.equal(0, #server:requests())
    end)

    it("refuses a channel outside --channels", function()
      local status, _, err = stella{ "send", "--channels", "chat,email", REQ }
      assert.equal(1, status)
      assert.truthy(err:find("(unknown_channel)", 1, true), err)
      assert.equal(0, #server:requests())
      assert.equal(0, (stella{ "send", "--channels=phone,chat", REQ }))
      assert.equal(1, #server:requests())
    end)

    it("prints error: invalid for text that is not a JSON object", function()
      for _, text in ipairs{ "not json", "[1,2]", '"x"' } do
        local status, _, err = stella{ "send", text }
        assert.equal(1, status)
        assert.truthy(err:find("^error: invalid: "), err)
      end
      assert.equal(0, #server:requests())
    end)

    it("reports a rejected request with the service's message, and an auth failure without the key", function()
      server:script{ { status = 400, body = "Invalid customer" } }
      local status, _, err = stella{ "send", REQ }
      assert.equal(1, status)
      assert.truthy(err:find("^error: rejected: "), err)
      assert.truthy(err:find("Invalid customer", 1, true), err)
      -- a server that echoes the key back: the output still must not show it
      server:script{ { status = 403, body = "bad key " .. TEST_KEY } }
      status, _, err = stella{ "send", REQ }
      assert.equal(1, status)
      assert.truthy(err:find("^error: auth: "), err)
    end)

    it("reports a network failure", function()
      local status, _, err = stella({ "send", REQ }, { env = { STELLA_BASE_URL = "http://127.0.0.1:1" } })
      assert.equal(1, status)
      assert.truthy(err:find("^error: network: "), err)
    end)
  end)

  describe("validate", function()
    it("checks request-shaped lines offline, one line per problem", function()
      local path = write_file(dir .. "/requests.jsonl", table.concat({
        '{"customer":{"name":"A","email":"a@example.com"},"employee":{"email":"e@blancapeak.com"},"channel":"phone","ext_interaction_id":"1"}',
        '{"customer":{"name":"B","email":"b@"},"employee":{},"channel":"phone","ext_interaction_id":2,"colour":"red"}',
        '{"customer": ',
        '',
        '{"customer":{"name":"C","email":"c@example.com"},"employee":{"custom_id":"7"},"channel":"fax","ext_interaction_id":"3"}',
      }, "\n") .. "\n")
      local status, out, err = stella({ "validate", path }, { keys = false })
      assert.equal(1, status)
      assert.equal("", err)
      local lines = {}
      for line in out:gmatch("[^\n]+") do lines[#lines + 1] = line end
      assert.equal(path .. ":2: customer.email: ", lines[1]:sub(1, #path + 20))
      assert.truthy(lines[1]:find("%(invalid_email%)$"), lines[1])
      assert.truthy(lines[2]:find("^" .. path:gsub("%p", "%%%0") .. ":2: employee: .*%(one_of_required%)$"), lines[2])
      assert.truthy(lines[3]:find("^" .. path:gsub("%p", "%%%0") .. ":2: colour: .*%(unknown_field%)$"), lines[3])
      assert.truthy(lines[4]:find("^" .. path:gsub("%p", "%%%0") .. ":3: invalid JSON"), lines[4])
      assert.equal("4 events, 2 invalid", lines[5])
      assert.equal(5, #lines)

      status, out = stella({ "validate", "--channels", "phone,chat", path }, { keys = false })
      assert.equal(1, status)
      assert.truthy(out:find(":5: channel: .*%(unknown_channel%)"), out)
      assert.truthy(out:find("4 events, 3 invalid\n$"), out)
      assert.equal(0, #server:requests())
    end)

    it("reads stdin and exits 0 when all is well", function()
      local status, out = stella({ "validate" }, { keys = false, stdin =
        '{"customer":{"name":"A","email":"a@example.com"},"employee":{"email":"e@blancapeak.com"},"channel":"phone",'
        .. '"ext_interaction_id":"1"}\n' })
      assert.equal(0, status)
      assert.equal("1 event, 0 invalid\n", out)
    end)

    it("checks a CSV file", function()
      local path = write_file(dir .. "/requests.csv",
        "ext_interaction_id,customer.name,customer.email,employee.email,channel,tags\n"
        .. "1,A,a@example.com,e@blancapeak.com,phone,x|y\n"
        .. "2,B,b@example.com,,chat,\n"
        .. "3,C,c@example.com,e@blancapeak.com,phone,,\n")
      local status, out = stella({ "validate", path }, { keys = false })
      assert.equal(1, status)
      assert.truthy(out:find(path .. ":3: employee: ", 1, true), out)
      assert.truthy(out:find(path .. ":4: 7 fields, but the header has 6 columns", 1, true), out)
      assert.truthy(out:find("3 events, 2 invalid\n$"), out)
    end)

    it("names an input it cannot read", function()
      local status, _, err = stella({ "validate", dir .. "/nope.jsonl" }, { keys = false })
      assert.equal(1, status)
      assert.truthy(err:find("nope.jsonl", 1, true), err)
    end)

    it_with(has_trigger and has_memory, "maps events through the rules first with --rules", function()
      local status, out = stella({ "validate", "--rules", "examples/rules.lua", "examples/interactions.jsonl" },
                                 { keys = false })
      assert.equal(1, status)
      assert.truthy(out:find("examples/interactions.jsonl:23: customer.email: .*%(invalid_email%)"), out)
      assert.truthy(out:find("examples/interactions.jsonl:17: invalid JSON", 1, true), out)
      assert.truthy(out:find("examples/interactions.jsonl:35: invalid JSON", 1, true), out)
      assert.truthy(out:find("\n50 events, 3 invalid\n$"), out)
      assert.equal(0, #server:requests())
    end)
  end)

  describe("trigger", function()
    it_with(has_trigger and has_sqlite, "runs the example export: outcomes, what the server got, exit 1", function()
      local status, out, err = stella{ "trigger", "--rules", "examples/rules.lua", "--db", db,
                                       "examples/interactions.jsonl" }
      assert.equal(1, status, err)
      local s = summary(out)
      assert.same(EXAMPLE_COUNTS, s.by_status)
      assert.equal(48, s.total)
      assert.equal(2, s.malformed)
      -- malformed lines on stderr, with file and line, and no progress bar (not a terminal)
      assert.truthy(err:find("examples/interactions.jsonl:17: invalid JSON", 1, true), err)
      assert.truthy(err:find("examples/interactions.jsonl:35: invalid JSON", 1, true), err)
      assert.truthy(err:find("examples/interactions.jsonl:23: invalid", 1, true), err)
      assert.is_nil(err:find("\r", 1, true))
      -- the server got exactly the sent and recorded ones
      local expected = {}
      for _, id in ipairs(EXAMPLE_SENT) do expected[#expected + 1] = id end
      for _, id in ipairs(EXAMPLE_RECORDED) do expected[#expected + 1] = id end
      assert.same(sorted(expected), ids_received())
      for _, r in ipairs(server:requests()) do
        assert.equal(TEST_KEY, r.headers["x-api-key"])
        local body = cjson.decode(r.body)
        local recorded = body.ext_interaction_id == "48207" or body.ext_interaction_id == "48228"
        assert.equal(recorded or nil, body.do_not_send)
      end
      assert.is_true(exists(db))

      -- a second run over the same file sends nothing new
      server:reset()
      status, out = stella{ "trigger", "--rules", "examples/rules.lua", "--db", db,
                            "examples/interactions.jsonl" }
      assert.equal(1, status)
      s = summary(out)
      assert.is_nil(s.by_status.sent)
      assert.is_nil(s.by_status.recorded)
      assert.equal(48, s.total)
      assert.equal(1, s.by_status.invalid)
      assert.same({}, server:requests())
    end)

    it_with(has_trigger and has_sqlite, "--connections 4: the same outcomes and requests, over four connections", function()
      -- the connections share a batch (a free one takes the next request): the first four
      -- answers wait, so that each connection has one before any is free again
      server:script{ { delay = 0.3 }, { delay = 0.3 }, { delay = 0.3 }, { delay = 0.3 } }
      local status, out, err = stella{ "trigger", "--rules", "examples/rules.lua", "--db", db,
                                       "--connections", "4", "examples/interactions.jsonl" }
      assert.equal(1, status, err)
      local s = summary(out)
      assert.same(EXAMPLE_COUNTS, s.by_status)
      local expected = {}
      for _, id in ipairs(EXAMPLE_SENT) do expected[#expected + 1] = id end
      for _, id in ipairs(EXAMPLE_RECORDED) do expected[#expected + 1] = id end
      assert.same(sorted(expected), ids_received())
      local conns, n = {}, 0
      for _, r in ipairs(server:requests()) do
        if not conns[r.connection] then conns[r.connection], n = true, n + 1 end
      end
      assert.equal(4, n)
    end)

    it_with(has_trigger and has_sqlite, "reads CSV from a file and JSON Lines from stdin in one run", function()
      local line = '{"id": 48400, "status": "solved", "channel": "phone", "requester": '
        .. '{"name": "Ines Duarte", "email": "ines.duarte@example.com"}, "assignee": '
        .. '{"email": "paulagent@blancapeak.com"}, "tags": [], "locale": "pt-PT"}\n'
      local status, out, err = stella({ "trigger", "--rules", "examples/rules.lua", "--db", db,
                                        "examples/interactions.csv", "-" }, { stdin = line })
      assert.equal(0, status, err)
      local s = summary(out)
      assert.equal(9, s.total)
      assert.equal(0, s.malformed)
      -- 48301 48302 48304 48306 sent; 48307 recorded; 48303 open, 48305 manual, 48308 test: skipped
      assert.same({ sent = 5, recorded = 1, skipped = 3 }, s.by_status)
      assert.same({ "48301", "48302", "48304", "48306", "48307", "48400" }, ids_received())
    end)

    it_with(has_trigger and has_memory, "sends nothing and writes nothing with --dry-run", function()
      local status, out = stella{ "trigger", "--rules", "examples/rules.lua", "--db", db, "--dry-run",
                                  "examples/interactions.jsonl" }
      assert.equal(1, status)
      assert.truthy(out:find("^dry run: nothing was sent and nothing was written\n"))
      local s = summary(out)
      assert.equal(48, s.total)
      assert.equal(1, s.by_status.invalid)
      assert.equal(2, s.by_status.recorded)
      assert.equal(2, s.malformed)
      assert.same({}, server:requests())
      assert.is_false(exists(db))
    end)

    it_with(has_trigger and has_memory, "dry-runs without a key", function()
      local status, out = stella({ "trigger", "--rules", "examples/rules.lua", "--db", ":memory:",
                                   "--dry-run", "examples/interactions.csv" }, { keys = false })
      assert.equal(0, status)
      assert.equal(8, summary(out).total)
      assert.same({}, server:requests())
    end)

    it_with(has_trigger and has_memory, "keeps nothing with --db :memory:", function()
      for _ = 1, 2 do
        local status, out = stella{ "trigger", "--rules", "examples/rules.lua", "--db", ":memory:",
                                    "examples/interactions.csv" }
        assert.equal(0, status)
        assert.equal(4, summary(out).by_status.sent)
      end
      assert.equal(10, #server:requests())
    end)

    it_with(has_trigger and has_sqlite, "exits 0 when nothing failed, and 1 on a failed send", function()
      local path = write_file(dir .. "/two.jsonl",
        '{"id": 1, "status": "solved", "channel": "phone", "requester": {"name": "A", "email": "a1@example.com"}, '
        .. '"assignee": {"email": "paulagent@blancapeak.com"}}\n'
        .. '{"id": 2, "status": "solved", "channel": "chat", "requester": {"name": "B", "email": "b2@example.com"}, '
        .. '"assignee": {"email": "paulagent@blancapeak.com"}}\n')
      server:script{ { status = 400, body = "Employee not found" } }
      local status, out, err = stella{ "trigger", "--rules", "examples/rules.lua", "--db", db, path }
      assert.equal(1, status)
      local s = summary(out)
      assert.equal(1, s.by_status.failed)
      assert.equal(1, s.by_status.sent)
      assert.truthy(err:find(path .. ":1: failed", 1, true), err)
      assert.truthy(err:find("Employee not found", 1, true), err)
    end)

    it_with(has_trigger and has_sqlite, "names an input it cannot open and goes on with the others", function()
      local status, out, err = stella{ "trigger", "--rules", "examples/rules.lua", "--db", db,
                                       dir .. "/missing.jsonl", "examples/interactions.csv" }
      assert.equal(1, status)
      assert.truthy(err:find("missing.jsonl", 1, true), err)
      assert.equal(8, summary(out).total)
      assert.truthy(out:find("unreadable inputs: 1", 1, true))
    end)
  end)

  describe("status", function()
    it("names a store that is not there", function()
      local status, out, err = stella{ "status", "--db", db }
      assert.equal(1, status)
      assert.equal("", out)
      assert.truthy(err:find("no store at " .. db, 1, true), err)
    end)

    it_with(has_trigger and has_sqlite, "shows counts, the error rate, the outbox and the latest errors", function()
      stella{ "trigger", "--rules", "examples/rules.lua", "--db", db, "examples/interactions.jsonl" }
      local status, out, err = stella{ "status", "--db", db, "--since", "90m" }
      assert.equal(0, status, err)
      local s = summary(out)
      -- the two malformed lines are in the ledger too (invalid, malformed_input)
      local counts = {}
      for k, v in pairs(EXAMPLE_COUNTS) do counts[k] = v end
      counts.invalid = counts.invalid + 2
      assert.same(counts, s.by_status)
      assert.equal(2, s.rows["invalid/malformed_input"])
      assert.truthy(out:find("error rate per hour", 1, true))
      -- 33 requests counted (sent, recorded, invalid, malformed), 3 invalid: one hour's
      -- row, or two when the run crossed an hour
      local total, errors = 0, 0
      for t, e in out:gmatch("\n%d%d%d%d%-%d%d%-%d%d %d%d:00%s+(%d+)%s+(%d+)%s+%d+%.%d%%") do
        total, errors = total + tonumber(t), errors + tonumber(e)
      end
      assert.same({ 33, 3 }, { total, errors })
      assert.truthy(out:find("outbox: 0 queued, 0 dead", 1, true))
      assert.truthy(out:find("latest invalid and failed events", 1, true))
      assert.truthy(out:find("invalid%s+48222%s+.*customer%.email"), out)

      local _, week = stella{ "status", "--db", db, "--since", "7d" }
      assert.equal(50, summary(week).total)
    end)
  end)

  describe("unsubscribe", function()
    it_with(has_trigger and has_sqlite, "stores the address; a later trigger skips it", function()
      local status, out = stella{ "unsubscribe", "--db", db, "Leaving.Customer@Example.com" }
      assert.equal(0, status)
      assert.equal("unsubscribed 1 address\n", out)
      -- the store keeps a salted hash, not the address
      assert.is_nil(read_file(db):lower():find("leaving.customer", 1, true))

      local path = write_file(dir .. "/unsub.jsonl",
        '{"id": 48500, "status": "solved", "channel": "phone", "requester": {"name": "Leaving", '
        .. '"email": "leaving.customer@example.com"}, "assignee": {"email": "paulagent@blancapeak.com"}}\n'
        .. '{"id": 48501, "status": "solved", "channel": "phone", "requester": {"name": "Staying", '
        .. '"email": "staying.customer@example.com"}, "assignee": {"email": "paulagent@blancapeak.com"}}\n')
      status, out = stella{ "trigger", "--rules", "examples/rules.lua", "--db", db, path }
      assert.equal(0, status)
      local s = summary(out)
      assert.equal(1, s.by_status.sent)
      assert.equal(2, s.total)
      assert.same({ "48501" }, ids_received())
    end)

    it_with(has_sqlite, "takes several addresses", function()
      local status, out = stella{ "unsubscribe", "--db", db, "a@example.com", "b@example.com" }
      assert.equal(0, status)
      assert.equal("unsubscribed 2 addresses\n", out)
    end)
  end)

  describe("retry", function()
    -- a request-shaped rules file whose outbox retries at once
    local function retry_rules()
      return write_file(dir .. "/retry_rules.lua",
        "return { channels = { phone = 'integrated' }, outbox = { base_delay = 0, max_delay = 0 } }")
    end
    local RETRY_EVENT = '{"customer": {"name": "R", "email": "retry.me@example.com"}, '
      .. '"employee": {"email": "paulagent@blancapeak.com"}, "channel": "phone", "ext_interaction_id": "48600"}\n'

    it_with(has_trigger and has_sqlite, "sends what a failed run left in the outbox", function()
      local rules = retry_rules()
      -- every attempt of the client fails with a retryable error
      local fail = { status = 503, headers = { ["Retry-After"] = "0" } }
      server:script{ fail, fail, fail }
      local status, out, err = stella({ "trigger", "--rules", rules, "--db", db }, { stdin = RETRY_EVENT })
      assert.equal(0, status, err)
      assert.same({ queued = 1 }, summary(out).by_status)
      local _, st = stella{ "status", "--db", db }
      assert.truthy(st:find("outbox: 1 queued, 0 dead", 1, true), st)

      server:reset()
      status, out = stella{ "retry", "--rules", rules, "--db", db }
      assert.equal(0, status)
      assert.equal("sent 1, recorded 0, still queued 0, failed 0 (of which 0 given up: dead)\n"
        .. "outbox: 0 queued, 0 dead\n", out)
      assert.same({ "48600" }, ids_received())
    end)

    it_with(has_trigger and has_sqlite, "--connections 3 sends a backlog over three connections", function()
      local rules = retry_rules()
      local lines = {}
      for i = 1, 6 do
        lines[i] = RETRY_EVENT:gsub("retry%.me", "retry" .. i):gsub("48600", tostring(48610 + i))
      end
      -- the run's six requests fail (one attempt each: the client makes three)
      local fail = { status = 503, headers = { ["Retry-After"] = "0" } }
      local script = {}
      for i = 1, 18 do script[i] = fail end
      server:script(script)
      local status, out, err = stella({ "trigger", "--rules", rules, "--db", db }, { stdin = table.concat(lines) })
      assert.equal(0, status, err)
      assert.same({ queued = 6 }, summary(out).by_status)
      server:reset()
      -- the first three answers wait: each connection has one before any is free again
      server:script{ { delay = 0.3 }, { delay = 0.3 }, { delay = 0.3 } }
      status, out = stella{ "retry", "--rules", rules, "--db", db, "--connections", "3" }
      assert.equal(0, status, out)
      assert.truthy(out:find("^sent 6, recorded 0, still queued 0"), out)
      assert.same({ "48611", "48612", "48613", "48614", "48615", "48616" }, ids_received())
      local conns, n = {}, 0
      for _, r in ipairs(server:requests()) do
        if not conns[r.connection] then conns[r.connection], n = true, n + 1 end
      end
      assert.equal(3, n)
    end)

    it_with(has_trigger and has_sqlite, "reports a request the service then rejects, exit 1", function()
      local rules = retry_rules()
      local fail = { status = 503, headers = { ["Retry-After"] = "0" } }
      server:script{ fail, fail, fail }
      stella({ "trigger", "--rules", rules, "--db", db }, { stdin = RETRY_EVENT })
      server:reset()
      server:script{ { status = 400, body = "Employee not found" } }
      local status, out = stella{ "retry", "--rules", rules, "--db", db }
      assert.equal(1, status)
      assert.truthy(out:find("^sent 0, recorded 0, still queued 0, failed 1 "), out)
      local _, st = stella{ "status", "--db", db }
      assert.truthy(st:find("failed%s+48600%s+rejected: .*Employee not found"), st)
    end)

    it_with(has_trigger and has_sqlite, "has nothing to do on an empty outbox", function()
      stella{ "unsubscribe", "--db", db, "x@example.com" }   -- creates the store
      local status, out = stella{ "retry", "--db", db }
      assert.equal(0, status)
      assert.equal("sent 0, recorded 0, still queued 0, failed 0 (of which 0 given up: dead)\n"
        .. "outbox: 0 queued, 0 dead\n", out)
    end)
  end)

  describe("input accounting", function()
    local REQ_BIG = '{"customer":{"name":"Jane","email":"janecustomer@example.com"},'
      .. '"employee":{"email":"paulagent@blancapeak.com"},"channel":"phone","ext_interaction_id":%s}'

    it("send: an id past 2^53 reaches the service exactly", function()
      assert.equal(0, (stella{ "send", REQ_BIG:format("9007199254740993") }))
      assert.equal(0, (stella{ "send", REQ_BIG:format("9007199254740992") }))
      assert.same({ "9007199254740992", "9007199254740993" }, ids_received())
    end)

    it("send: refuses a repeated key, naming it, and sends nothing", function()
      local status, out, err = stella{ "send", '{"channel":"phone","channel":"chat"}' }
      assert.equal(1, status)
      assert.equal("", out)
      assert.equal('error: invalid: duplicate key "channel" at line 1, column 20\n', err)
      status, _, err = stella({ "send", "-" }, { stdin = '{\n  "channel": phone\n}' })
      assert.equal(1, status)
      assert.equal("error: invalid: invalid JSON at line 2, column 14: unexpected character (expected a value)\n", err)
      assert.equal(0, #server:requests())
    end)

    it_with(has_trigger and has_memory, "trigger: a stray quote in a 5,000-row CSV costs its own row only", function()
      local rows = { "id,status,channel,requester.name,requester.email,assignee.email" }
      for i = 1, 5000 do
        rows[#rows + 1] = ("%d,solved,phone,%s,c%d@example.com,paulagent@blancapeak.com")
          :format(60000 + i, i == 3 and '"Jane' or "Customer", i)
      end
      local path = write_file(dir .. "/big.csv", table.concat(rows, "\n") .. "\n")
      local status, out, err = stella{ "trigger", "--rules", "examples/rules.lua", "--db", db,
                                       "--dry-run", path }
      assert.equal(1, status)
      local s = summary(out)
      assert.equal(4999, s.total)
      assert.equal(1, s.malformed)
      assert.equal(path .. ":4: quoted field 4 still open after 100 lines (a stray quote?); "
                   .. "read again from line 5\n", err)
    end)

    it_with(has_trigger and has_sqlite, "trigger: ids 2^53 and 2^53+1 are two interactions, sent exactly", function()
      local line = '{"id": %s, "status": "solved", "channel": "phone", "requester": '
        .. '{"name": "Ines Duarte", "email": "ines%d@example.com"}, "assignee": '
        .. '{"email": "paulagent@blancapeak.com"}}\n'
      local path = write_file(dir .. "/big.jsonl", line:format("9007199254740993", 1)
        .. line:format("9007199254740992", 2))
      local status, out, err = stella{ "trigger", "--rules", "examples/rules.lua", "--db", db, path }
      assert.equal(0, status, err)
      assert.same({ sent = 2 }, summary(out).by_status)
      assert.same({ "9007199254740992", "9007199254740993" }, ids_received())
    end)

    it_with(has_trigger and has_memory, "trigger: JSON-looking input is never a CSV header", function()
      local path = write_file(dir .. "/arrays.txt", "[[[]]]\n")
      local status, out, err = stella{ "trigger", "--rules", "examples/rules.lua", "--db", db,
                                       "--dry-run", path }
      assert.equal(1, status)
      assert.equal(1, summary(out).malformed)
      assert.equal(path .. ":1: expected a JSON object, got an array\n", err)
    end)

    it_with(has_trigger and has_memory, "trigger: a map that never returns fails its event, the run goes on", function()
      local rules = write_file(dir .. "/looping_rules.lua", [[
return { map = function(e)
  while e.loop do end
  return { customer = { name = "Ines Duarte", email = e.email }, channel = "phone",
           employee = { email = "paulagent@blancapeak.com" }, ext_interaction_id = e.id }
end }
]])
      local path = write_file(dir .. "/loop.jsonl",
        '{"id": 71, "email": "a71@example.com"}\n' ..
        '{"id": 72, "email": "a72@example.com", "loop": true}\n' ..
        '{"id": 73, "email": "a73@example.com"}\n')
      local status, out, err = stella{ "trigger", "--rules", rules, "--db", db, "--dry-run", path }
      assert.equal(1, status)
      local s = summary(out)
      assert.same({ sent = 2, invalid = 1 }, s.by_status)
      assert.equal(1, s.rows["invalid/rule_error"])
      assert.truthy(err:find(path .. ":2: invalid (event 72): ", 1, true), err)
      assert.truthy(err:find("map (" .. rules .. ":1) exceeded its budget of 10000000 instructions", 1, true), err)
      assert.same({}, server:requests())
    end)

    it_with(has_trigger and has_memory, "trigger: an input with no records is a warning, not an error", function()
      local path = write_file(dir .. "/header.csv", "id,status,channel\n")
      local status, out, err = stella{ "trigger", "--rules", "examples/rules.lua", "--db", db,
                                       "--dry-run", path }
      assert.equal(0, status, err)
      local s = summary(out)
      assert.same({ 0, 0 }, { s.total, s.malformed })
      assert.equal("stella: " .. path .. ": no records (a CSV header and no rows)\n", err)
    end)
  end)

  describe("in process (cli.main with an injected environment)", function()
    local cli = require "stella.cli"

    local function sink()
      local parts = {}
      return {
        write = function(self, ...)
          for i = 1, select("#", ...) do parts[#parts + 1] = tostring((select(i, ...))) end
          return self
        end,
        flush = function(self) return self end,
        text = function() return table.concat(parts) end,
      }
    end

    local function main(args, tty, vars, time)
      local out, err = sink(), sink()
      vars = vars or {}
      local status = cli.main(args, {
        getenv = function(name) return vars[name] end,
        stdout = out, stderr = err, isatty = function() return tty end,
        time = time and function() return time end,
      })
      return status, out.text(), err.text()
    end

    it("raises on misuse", function()
      assert.has_error(function() cli.main("trigger") end)
      assert.has_error(function() cli.main({}, 5) end)
    end)

    it("returns the exit status and writes to the given streams", function()
      local status, out, err = main({ "help", "status" }, false)
      assert.equal(0, status)
      assert.truthy(out:find("^usage: stella status"))
      assert.equal("", err)
      status, out, err = main({ "status", "--since", "1y" }, false)
      assert.equal(2, status)
      assert.equal("", out)
      assert.truthy(err:find("--since takes a duration", 1, true))
    end)

    it("reads keys through the given getenv", function()
      local status, _, err = main({ "send", "{}" }, false, {})
      assert.equal(2, status)
      assert.truthy(err:find("STELLA_TEST_KEY", 1, true))
    end)

    it("parses durations", function()
      assert.equal(5400, cli.parse_duration("90m"))
      assert.equal(86400, cli.parse_duration("24h"))
      assert.equal(604800, cli.parse_duration("7d"))
      assert.equal(1209600, cli.parse_duration("2w"))
      assert.equal(30, cli.parse_duration("30s"))
      assert.is_nil(cli.parse_duration("24"))
      assert.is_nil(cli.parse_duration("0h"))
      assert.is_nil(cli.parse_duration("h"))
      assert.is_nil(cli.parse_duration("-1d"))
    end)

    it_with(has_trigger and has_sqlite, "purges ledger entries older than --keep (default 90 days) once per run", function()
      local T0, DAY = 1700000000, 86400
      local path = fresh_db()
      local vars = { STELLA_TEST_KEY = TEST_KEY, STELLA_BASE_URL = server.url }
      local lines = {}
      for i = 1, 5 do lines[i] = ('{"ticket": %d, "email": "keep%d@example.com"}'):format(900 + i, i) end
      local events = write_file(dir .. "/keep.jsonl", table.concat(lines, "\n") .. "\n")
      local function run(time, ...)
        local args = { "trigger", "--rules", "spec/support/trigger_rules.lua", "--db", path, ... }
        args[#args + 1] = events
        return main(args, false, vars, time)
      end
      local function times()
        local s = assert(require("stella.store").sqlite(path))
        local count = {}
        for _, e in ipairs(s:ledger{ limit = 10000 }) do count[e.time] = (count[e.time] or 0) + 1 end
        s:close()
        return count
      end
      run(T0, "-q")
      local n = times()[T0]
      assert.equal(5, n)
      run(T0 + 89 * DAY, "-q")   -- within the default 90 days: nothing purged
      assert.same({ [T0] = n, [T0 + 89 * DAY] = n }, times())
      local status, _, err = run(T0 + 91 * DAY, "-v", "--keep", "30d")
      assert.equal(0, status, err)
      assert.truthy(err:find("stella trigger: purged " .. n .. " ledger entries and 0 dead outbox items " ..
        "older than 30 days, ", 1, true), err)
      assert.same({ [T0 + 89 * DAY] = n, [T0 + 91 * DAY] = n }, times())
      status, _, err = run(T0 + 400 * DAY, "-v", "--keep", "forever")
      assert.truthy(err:find("purged 0 ledger entries and 0 dead outbox items (retention: forever)", 1, true), err)
      assert.same({ [T0 + 89 * DAY] = n, [T0 + 91 * DAY] = n, [T0 + 400 * DAY] = n }, times())
      local out
      status, out, err = main({ "status", "--db", path }, false, vars, T0 + 400 * DAY)
      assert.equal(0, status, err)
      assert.truthy(out:find("\nretention: forever; last purge " .. os.date("%Y-%m-%d %H:%M:%S", T0 + 400 * DAY) ..
        ": 0 ledger entries, 0 dead items\n", 1, true), out)
      status, _, err = run(T0, "--keep", "90")
      assert.equal(2, status)
      assert.truthy(err:find("--keep must be an age such as 90d, 12w or 36h, or forever", 1, true), err)
    end)

    it_with(has_trigger and has_memory, "draws a progress bar on stderr only when it is a terminal", function()
      local args = { "trigger", "--rules", "examples/rules.lua", "--db", ":memory:", "--dry-run",
                     "examples/interactions.csv" }
      local status, out, err = main(args, true)
      assert.equal(0, status, err)
      assert.truthy(err:find("\rexamples/interactions.csv [", 1, true), err)
      assert.truthy(err:find("] 100%  8 events", 1, true), err)
      assert.equal("\r\27[K", err:sub(-4), "the bar is cleared at the end")
      assert.is_nil(out:find("\r", 1, true))
      assert.equal(8, summary(out).total)

      status, out, err = main(args, false)
      assert.equal(0, status)
      assert.equal("", err)
      assert.equal(8, summary(out).total)
    end)
  end)

  it("never printed a key", function()
    assert.is_true(#all_outputs > 0)
    for _, text in ipairs(all_outputs) do assert_no_key(text) end
  end)
end)
