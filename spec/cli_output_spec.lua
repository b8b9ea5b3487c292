-- Specs for the machine-readable output of the `stella` command (--json, --json-lines, -q,
-- -v): bin/stella as a child process, offline (dry runs, validate, a store made by
-- unsubscribe), its standard output parsed as JSON.
local cjson = require "cjson"
local child = require "support.child"

local LUA = os.getenv("STELLA_TEST_LUA") or (rawget(_G, "jit") and "luajit" or "lua5.4")

-- status, stdout, stderr
local function stella(args)
  local err = os.tmpname()
  local words = {}
  for i, a in ipairs(args) do words[i] = child.quote(a) end
  local p = io.popen(child.ENV .. "STELLA_TEST_KEY=spec-key-0000 " .. LUA .. " bin/stella " .. table.concat(words, " ") .. " 2>" .. err .. "; echo @$?")
  local out = p:read("*a")
  p:close()
  local stderr = child.read_file(err)
  os.remove(err)
  return tonumber(out:match("@(%d+)%s*$")), out:gsub("@%d+%s*$", ""), stderr
end

local function lines(text)
  local list = {}
  for line in text:gmatch("[^\n]+") do list[#list + 1] = cjson.decode(line) end
  return list
end

describe("stella --json and --json-lines", function()
  local RULES, EVENTS = "examples/rules.lua", "examples/interactions.jsonl"

  it("trigger --json: one object with the counts by outcome and reason, nothing else on stdout", function()
    local status, out = stella{ "trigger", "--rules", RULES, "--dry-run", "--db", ":memory:", "--json", EVENTS }
    assert.equal(1, status)
    local objects = lines(out)
    assert.equal(1, #objects)
    local s = objects[1]
    assert.equal("trigger", s.command)
    assert.is_true(s.dry_run)
    assert.equal(2, s.malformed)
    assert.equal(0, s.unreadable)
    assert.equal(1, s.exit_status)
    local total, sent = 0, 0
    for _, c in ipairs(s.counts) do
      total = total + c.count
      if c.status == "sent" then sent = c.count; assert.equal(cjson.null, c.reason) end
    end
    assert.equal(48, s.total)
    assert.equal(s.total, total)
    assert.is_true(sent > 0)
  end)

  it("trigger --json-lines: one object per event, with its input and line", function()
    local status, out, err = stella{ "trigger", "--rules", RULES, "--dry-run", "--db", ":memory:", "--json-lines", "-q", EVENTS }
    assert.equal(1, status)
    local objects = lines(out)
    assert.equal(48, #objects)
    assert.equal(EVENTS, objects[1].input)
    assert.equal(1, objects[1].line)
    assert.equal("48201", tostring(objects[1].event_id))
    local invalid
    for _, o in ipairs(objects) do if o.status == "invalid" then invalid = o end end
    assert.equal(23, invalid.line)
    assert.equal("invalid_request", invalid.reason)
    assert.equal("", err, "-q: nothing on standard error")
  end)

  it("trigger -v: a line on standard error for every event; without it only the failed ones", function()
    local _, _, verbose = stella{ "trigger", "--rules", RULES, "--dry-run", "--db", ":memory:", "-v", EVENTS }
    local _, _, normal = stella{ "trigger", "--rules", RULES, "--dry-run", "--db", ":memory:", EVENTS }
    local function count(text, pat) local n = 0 for _ in text:gmatch(pat) do n = n + 1 end return n end
    assert.equal(48, count(verbose, "interactions%.jsonl:%d+: %a+ %(event"))
    assert.equal(1, count(normal, "interactions%.jsonl:%d+: %a+ %(event"))
  end)

  it("refuses --json with --json-lines, and --json-lines where there are no events", function()
    local status, _, err = stella{ "trigger", "--rules", RULES, "--json", "--json-lines", EVENTS }
    assert.equal(2, status)
    assert.truthy(err:find("not both", 1, true))
    status, _, err = stella{ "status", "--json-lines" }
    assert.equal(2, status)
    assert.truthy(err:find("--json-lines is not for this command", 1, true))
  end)

  it("validate --json and --json-lines", function()
    local status, out = stella{ "validate", "--rules", RULES, "--json", EVENTS }
    assert.equal(1, status)
    assert.same({ command = "validate", events = 50, invalid = 3, malformed = 2, unreadable = 0, exit_status = 1 },
      cjson.decode(out))
    status, out = stella{ "validate", "--rules", RULES, "--json-lines", EVENTS }
    assert.equal(1, status)
    local objects = lines(out)
    assert.equal(3, #objects)
    assert.equal(17, objects[1].line)
    assert.truthy(objects[1].message:find("invalid JSON", 1, true))
    assert.equal(23, objects[2].line)
    assert.equal("invalid_email", objects[2].errors[1].code)
    assert.equal("customer.email", objects[2].errors[1].path)
    status, out = stella{ "validate", "--rules", RULES, "-q", EVENTS }
    assert.equal(1, status)
    assert.equal("50 events, 3 invalid\n", out)
  end)

  it("status --json and retry --json on a store", function()
    local db = os.tmpname()
    os.remove(db)
    assert.equal(0, (stella{ "unsubscribe", "--db", db, "jane@example.com" }))
    local status, out = stella{ "status", "--db", db, "--json", "--since", "2h" }
    local rstatus, rout = stella{ "retry", "--db", db, "--json" }   -- an empty outbox: nothing to send
    child.remove_db(db)
    assert.equal(0, rstatus, rout)
    assert.same({ command = "retry", sent = 0, recorded = 0, queued = 0, failed = 0, dead = 0,
                  unrecorded = 0, reconciled = 0, outbox = { queued = 0, dead = 0 }, circuit = "closed", exit_status = 0 }, cjson.decode(rout))
    assert.equal(0, status, out)
    local s = cjson.decode(out)
    assert.equal("status", s.command)
    assert.equal(db, s.db)
    assert.equal(7200, s.window)
    assert.same({}, s.counts)
    -- empty lists are JSON arrays, not objects (Debian's lua-cjson has no array_mt)
    assert.truthy(out:find('"counts":[]', 1, true), out)
    assert.truthy(out:find('"latest":[]', 1, true), out)
    -- the outbox, with what its queued items wait for (the timestamps null: nothing queued)
    assert.same({ queued = 0, dead = 0, due = 0, scheduled = 0, retrying = 0, in_flight = 0,
                  next_due = cjson.null, next_scheduled = cjson.null, oldest = cjson.null }, s.outbox)
    assert.equal(0.05, s.threshold)
    assert.is_false(s.alert)
    assert.is_nil(s.retention)   -- never purged (no trigger or retry ran)
  end)
end)
