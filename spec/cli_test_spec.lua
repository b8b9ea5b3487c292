-- Specs for `stella test --rules FILE CASES...`: bin/stella as a child process, its cases
-- files written to a temporary directory; a loopback capture server for "nothing is sent".
local cjson = require "cjson"
local child = require "support.child"
local testserver = require "support.testserver"
local nginx = require "stella.nginx"

local LUA = os.getenv("STELLA_TEST_LUA") or (rawget(_G, "jit") and "luajit" or "lua5.4")
local RULES = "examples/rules.lua"
local RULES_KEY = "rk_ruletest_0123456789SECRET"
local BRAND_KEY = "bk_ruletest_9876543210SECRET"
local ENV_KEY = "ek_ruletest_5555555555SECRET"

-- status, stdout, stderr. env: extra variables (every STELLA_ one is unset first)
local function stella(args, env)
  local err = os.tmpname()
  local words = {}
  for i, a in ipairs(args) do words[i] = child.quote(a) end
  local vars = { "env -u STELLA_API_KEY -u STELLA_TEST_KEY -u STELLA_PRODUCTION_KEY -u STELLA_MODE -u STELLA_BASE_URL" }
  for k, v in pairs(env or {}) do vars[#vars + 1] = k .. "=" .. child.quote(v) end
  local p = io.popen(child.ENV .. table.concat(vars, " ") .. " " .. LUA .. " bin/stella " .. table.concat(words, " ")
                     .. " 2>" .. err .. "; echo @$?")
  local out = p:read("*a")
  p:close()
  local stderr = child.read_file(err)
  os.remove(err)
  return tonumber(out:match("@(%d+)%s*$")), (out:gsub("@%d+%s*$", "")), stderr
end

local function lines_of(text)
  local list = {}
  for line in text:gmatch("[^\n]+") do list[#list + 1] = line end
  return list
end

-- A customer's tickets, all solved on the phone for blancapeak (examples/rules.lua).
local BASE = [[
  base = { status = "solved", channel = "phone", brand = "blancapeak", locale = "en-US",
           requester = { name = "Jane Doe", email = "jane@example.com" },
           assignee = { email = "paulagent@blancapeak.com" } },
]]

describe("stella test", function()
  local dir
  local n = 0

  -- a cases file in the temporary directory: its path
  local function cases_file(text, ext)
    n = n + 1
    local path = ("%s/cases%d.%s"):format(dir, n, ext or "lua")
    assert(nginx.write_file(path, text))
    return path
  end

  lazy_setup(function()
    dir = assert(nginx.temp_dir("stella-test"))
  end)

  lazy_teardown(function()
    if dir then nginx.remove_dir(dir) end
  end)

  it("passes examples/rules_test.lua, and its cases reach every rule of examples/rules.lua", function()
    local status, out, err = stella{ "test", "--rules", RULES, "-v", "examples/rules_test.lua" }
    assert.equal(0, status, out .. err)
    assert.equal("", err)
    local lines = lines_of(out)
    local total = tonumber(lines[#lines]:match("^(%d+) cases, %1 passed, 0 failed$"))
    assert.is_number(total, out)
    assert.equal(total + 1, #lines)
    -- the outcome of each case (-v): every skip reason and outcome the rules can give
    local seen = {}
    for i = 1, total do
      local outcome = assert(lines[i]:match("^examples/rules_test%.lua: case " .. i .. " %(.-%): ok, (.*)$"), lines[i])
      seen[outcome] = true
    end
    for _, outcome in ipairs{ "sent", "recorded (do_not_send_tag)", "suppressed (suppressed)",
                              "skipped (not_eligible)", "skipped (unknown_brand)", "skipped (channel_manual)",
                              "skipped (channel_disabled)", "skipped (excluded_tag)", "skipped (unsubscribed)",
                              "skipped (duplicate)", "skipped (test_account)", "invalid (invalid_request)" } do
      assert.is_true(seen[outcome], outcome)
    end
  end)

  it("reads the same cases from JSON", function()
    local path = cases_file([[{
      "now": "2026-01-05T12:00:00+02:00",
      "state": { "unsubscribes": ["gone@example.org"] },
      "cases": [
        { "name": "first", "event": { "id": 1, "status": "solved", "channel": "phone",
            "requester": { "name": "Jane", "email": "jane@example.com" },
            "assignee": { "email": "paulagent@blancapeak.com" } },
          "expect": "sent", "request": { "brand": "blancapeak", "language": "en", "tags": ["batch-export"] } },
        { "name": "unsubscribed", "event": { "id": 2, "status": "solved", "channel": "phone",
            "requester": { "name": "Gone", "email": "gone@example.org" },
            "assignee": { "email": "paulagent@blancapeak.com" } },
          "expect": "skipped", "reason": "unsubscribed" }
      ]
    }]], "json")
    local status, out, err = stella{ "test", "--rules", RULES, path }
    assert.equal(0, status, out .. err)
    assert.equal("2 cases, 2 passed, 0 failed\n", out)
  end)

  it("prints one line per failing case, with what was expected, what happened and the verdicts; exit 1", function()
    local path = cases_file("return { now = 1767607200, " .. BASE .. [[
      cases = {
        { name = "first", event = { id = 1 }, expect = "sent" },
        { name = "second", event = { id = 2 }, expect = "sent" },
        { event = { id = 3, status = "open" }, expect = "skipped", reason = "test_account" },
        { name = "tags", event = { id = 4, requester = { email = "bob@example.com" } }, expect = "sent",
          request = { tags = { "batch-export" }, language = "fr" } },
      } }]])
    local status, out, err = stella{ "test", "--rules", RULES, path }
    assert.equal(1, status)
    assert.equal("", err)
    local lines = lines_of(out)
    assert.equal(4, #lines, out)
    local prefix = path .. ": case 2 (second): expected sent, got suppressed (suppressed); verdicts: map=pass when=pass "
    assert.equal(prefix, lines[1]:sub(1, #prefix))
    assert.truthy(lines[1]:find(" suppression=suppressed(suppressed: a request reached this customer recently; "
                                .. "next possible at 2026-01-12T10:00:00Z)", 1, true), lines[1])
    prefix = path .. ": case 3: expected skipped (test_account), got skipped (not_eligible); verdicts: map=pass "
             .. "when=skip(not_eligible: when(event) returned false)"
    assert.equal(prefix, lines[2]:sub(1, #prefix))
    -- tags match (the map copies none, rules[2] adds one), the language does not
    assert.truthy(lines[3]:find(path .. ': case 4 (tags): expected request.language = "fr", got "en-US"; verdicts: ',
                                1, true), lines[3])
    assert.equal("4 cases, 1 passed, 3 failed", lines[4])
  end)

  it("moves the clock: a case suppressed before a step of time is sent after it", function()
    local function run(step)
      local path = cases_file("return { now = \"2026-01-05T10:00:00Z\", " .. BASE .. [[
        cases = {
          { name = "first ticket", event = { id = 1 }, expect = "sent" },
          { name = "a day later", advance = "1d", event = { id = 2 }, expect = "suppressed", reason = "suppressed" },
          { name = "a week after the first", advance = ]] .. step .. [[, event = { id = 3 }, expect = "sent" },
        } }]])
      return stella{ "test", "--rules", RULES, path }
    end
    local status, out = run('"6d"')
    assert.equal(0, status, out)
    assert.equal("3 cases, 3 passed, 0 failed\n", out)
    status, out = run("6 * 86400 - 1")   -- a second short of the window's end
    assert.equal(1, status, out)
    assert.truthy(out:find("case 3 (a week after the first): expected sent, got suppressed (suppressed)", 1, true), out)
  end)

  it("starts from the state the file gives: earlier requests and unsubscribes", function()
    local path = cases_file("return { now = \"2026-01-05T10:00:00Z\", " .. BASE .. [[
      state = { sent = { { ago = "2d", event = { id = 1 } } }, unsubscribes = { "bob@example.com" } },
      cases = {
        { name = "two days after", event = { id = 2 }, expect = "suppressed" },
        { name = "the earlier ticket again", event = { id = 1 }, expect = "skipped", reason = "duplicate" },
        { name = "five days later", advance = "5d", event = { id = 3 }, expect = "sent" },
        { name = "unsubscribed", event = { id = 4, requester = { email = "Bob@Example.com" } },
          expect = "skipped", reason = "unsubscribed" },
      } }]])
    local status, out = stella{ "test", "--rules", RULES, path }
    assert.equal(0, status, out)
    assert.equal("4 cases, 4 passed, 0 failed\n", out)
    -- an earlier request the rules would not have sent: the state is wrong, exit 2
    path = cases_file("return { now = 0, " .. BASE .. [[
      state = { sent = { { at = "1970-01-01T00:00:00Z", event = { id = 1 } }, { ago = 60, event = { id = 2, status = "open" } } } },
      cases = { { event = { id = 3 }, expect = "sent" } } }]])
    local err
    status, out, err = stella{ "test", "--rules", RULES, path }
    assert.equal(2, status)
    assert.truthy(err:find(path .. ": state.sent[2]: the event was skipped (not_eligible), not sent", 1, true), err)
  end)

  it("refuses a bad cases file with exit 2, naming the file and the case", function()
    local path = cases_file([[
      return { now = "2026-02-30T00:00:00Z", extra = 1,
               cases = { { name = "typo", event = { id = 1 }, expect = "snet", advnce = "2h" },
                         { event = 3, expect = "sent", advance = "2x" } } }]])
    local status, out, err = stella{ "test", "--rules", RULES, path }
    assert.equal(2, status)
    for _, want in ipairs{
      path .. ': unknown key "extra"',
      path .. ': now must be a time, "2026-01-05T10:00:00Z" (or with +hh:mm) or seconds since the epoch, got "2026-02-30T00:00:00Z"',
      path .. ': case 1 (typo): unknown key "advnce"',
      path .. ': case 1 (typo): expect must be one of sent, recorded, queued, skipped, suppressed, invalid, got "snet"',
      path .. ": case 2: event must be a table (an object), got number",
      path .. ': case 2: advance must be a duration ("2h", "7d", "90m") or seconds, got "2x"',
    } do
      assert.truthy(err:find("stella test: " .. want, 1, true), want .. "\n" .. err)
    end
    assert.equal("0 cases, 0 passed, 0 failed\n", out)

    -- groups: the group named too; a good file beside a bad one still runs
    local grouped = cases_file([[
      return { now = 0, groups = { { name = "g1", cases = {} }, { name = "g2", cases = { { name = "c", expect = "sent" } } } } }]])
    local good = cases_file("return { now = 0, " .. BASE .. " cases = { { event = { id = 1 }, expect = \"sent\" } } }")
    status, out, err = stella{ "test", "--rules", RULES, grouped, good }
    assert.equal(2, status)
    assert.truthy(err:find(grouped .. ": case 1 (g2: c): event must be a table (an object), got nil", 1, true), err)
    assert.equal("1 case, 1 passed, 0 failed\n", out)

    -- not Lua, not JSON, not there
    for _, f in ipairs{ { cases_file("return { now = 0, cases = {", "lua"), ": unexpected symbol" },
                        { cases_file('{ "now": 0, "cases": [', "json"), ":1: invalid JSON: " },
                        { dir .. "/missing.lua", ": cannot open the cases file" } } do
      status, out, err = stella{ "test", "--rules", RULES, f[1] }
      assert.equal(2, status)
      assert.truthy(err:find("stella test: " .. f[1], 1, true), err)
    end
  end)

  it("refuses a bad rules file and bad usage with exit 2", function()
    local good = cases_file("return { now = 0, " .. BASE .. " cases = { { event = { id = 1 }, expect = \"sent\" } } }")
    local rules = cases_file("return { sample = 2 }")
    local status, _, err = stella{ "test", "--rules", rules, good }
    assert.equal(2, status)
    assert.truthy(err:find("sample must be between 0 and 1", 1, true), err)
    status, _, err = stella{ "test", good }
    assert.equal(2, status)
    assert.truthy(err:find("--rules FILE is required", 1, true), err)
    status, _, err = stella{ "test", "--rules", RULES }
    assert.equal(2, status)
    assert.truthy(err:find("give at least one cases file", 1, true), err)
  end)

  it("--json: one object with the counts and the failures", function()
    local path = cases_file("return { now = 0, " .. BASE .. [[
      cases = { { event = { id = 1 }, expect = "sent" }, { name = "x", event = { id = 2 }, expect = "sent" } } }]])
    local status, out = stella{ "test", "--rules", RULES, "--json", path }
    assert.equal(1, status)
    local o = cjson.decode(out)
    assert.same({ "test", 2, 1, 1, 0, 1 }, { o.command, o.cases, o.passed, o.failed, o.bad_files, o.exit_status })
    assert.equal(1, #o.failures)
    local f = o.failures[1]
    assert.same({ path, 2, "x", "sent", "suppressed", "suppressed" },
                { f.file, f.case, f.name, f.expected, f.status, f.reason })
    assert.truthy(f.message:find("expected sent, got suppressed", 1, true))
  end)

  describe("sends nothing", function()
    local server
    lazy_setup(function() server = testserver.start() end)
    lazy_teardown(function() if server then server:stop() end end)

    it("even when the rules and the environment name a host and keys", function()
      -- examples/rules.lua with a key and host of its own, and a brand with its own key
      local rules = dir .. "/rules_with_keys.lua"
      local text = assert(child.read_file(RULES))
      text = text:gsub("mode = \"test\",", ("mode = \"test\", api_key = %q, base_url = %q,"):format(RULES_KEY, server.url), 1)
      text = text:gsub('%["blancapeak%-es"%] = { suppression_days = 14, language = "es" }',
                       ('["blancapeak-es"] = { suppression_days = 14, language = "es", api_key = %q }'):format(BRAND_KEY), 1)
      assert(text:find(BRAND_KEY, 1, true) and text:find(RULES_KEY, 1, true))
      assert(nginx.write_file(rules, text))
      local env = { STELLA_TEST_KEY = ENV_KEY, STELLA_BASE_URL = server.url }
      server:reset()
      local status, out, err = stella({ "test", "--rules", rules, "-v", "examples/rules_test.lua" }, env)
      assert.equal(0, status, out .. err)
      assert.equal(0, #server:requests())
      for _, key in ipairs{ RULES_KEY, BRAND_KEY, ENV_KEY } do
        assert.is_nil(out:find(key, 1, true))
        assert.is_nil(err:find(key, 1, true))
      end
      -- the same rules and events do reach the server through `stella trigger`
      local events = dir .. "/events.jsonl"
      assert(nginx.write_file(events, table.concat({
        '{"id": 1, "status": "solved", "channel": "phone", "brand": "blancapeak", "requester": {"name": "J", "email": "j@example.com"}, "assignee": {"email": "paulagent@blancapeak.com"}}',
        '{"id": 2, "status": "solved", "channel": "chat", "brand": "blancapeak-es", "requester": {"name": "L", "email": "l@example.com"}, "assignee": {"email": "paulagent@blancapeak.com"}}',
      }, "\n") .. "\n"))
      status, out, err = stella({ "trigger", "--rules", rules, "--db", ":memory:", events }, env)
      assert.equal(0, status, out .. err)
      assert.equal(2, #server:requests())
    end)
  end)
end)
