-- Specs for the examples a newcomer runs first: the README's Lua program and its
-- `stella send` and `stella trigger` lines, and the OpenResty webhook of
-- examples/openresty/, each run verbatim against the sandbox `make demo` starts (the
-- default company, lua/stella/sandbox/files/config.lua) on a free port.
local sandbox = require "stella.sandbox"
local harness = require "support.openresty.harness"
local webhook_nginx = require "support.openresty.webhook"
local child = require "support.child"
local cjson = require "cjson"
local socket = require "socket"

local LUA = os.getenv("STELLA_TEST_LUA") or (rawget(_G, "jit") and "luajit" or "lua5.4")
local _, cwd = harness.run("pwd")
local ROOT = cwd:gsub("%s+$", "")
local UUID = "%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x"

local function readme()
  return child.read_file(ROOT .. "/README.md")
end

-- the module paths busted has, with the checkout's relative entries made absolute: the
-- examples run in a directory of their own
local function absolute(path)
  return (";" .. path):gsub(";%./", ";" .. ROOT .. "/"):sub(2)
end
local ENV = "env LUA_PATH=" .. child.quote(absolute(package.path)) .. " LUA_PATH_5_4=" .. child.quote(absolute(package.path))
  .. " LUA_CPATH=" .. child.quote(absolute(package.cpath)) .. " LUA_CPATH_5_4=" .. child.quote(absolute(package.cpath)) .. " "

-- runs a shell command in dir with the sandbox's URL and test key; status, output
local function sh(sb, dir, cmd)
  local p = io.popen("cd " .. child.quote(dir) .. " && " .. ENV .. "STELLA_BASE_URL=" .. sb.url
    .. " STELLA_TEST_KEY=" .. child.quote(sb.config.keys.test) .. " STELLA_MODE=test " .. cmd .. " 2>&1; echo @$?")
  local out = p:read("*a")
  p:close()
  return tonumber(out:match("@(%d+)%s*$")), out:gsub("@%d+%s*$", "")
end

describe("the examples, verbatim, against the default sandbox", function()
  local sb, dir

  lazy_setup(function()
    sb = assert(sandbox.start{ port = 0 })
    local code, out = harness.run("mktemp -d \"${TMPDIR:-/tmp}/stella-examples-XXXXXX\"")
    assert(code == 0, out)
    dir = out:gsub("%s+$", "")
    -- the README's commands name examples/... and bin/... from the checkout's top
    assert(harness.run("ln -s " .. child.quote(ROOT .. "/examples") .. " " .. child.quote(dir .. "/examples")) == 0)
  end)

  lazy_teardown(function()
    if sb then sb:stop() end
    if dir then harness.run("rm -rf " .. child.quote(dir)) end
  end)

  it("the README's Lua program gets a request id", function()
    local text = readme():match("## In a Lua program.-```lua\n(.-)```")
    assert.truthy(text, "no Lua block under 'In a Lua program'")
    assert(harness.write_file(dir .. "/readme.lua", text) == nil)
    local status, out = sh(sb, dir, LUA .. " readme.lua")
    assert.equal(0, status, out)
    assert.truthy(out:match("^request id%s+" .. UUID .. "\n$"), out)
  end)

  it("the README's stella send prints a request id", function()
    local line = readme():match("\n(stella send '[^\n]-')%s")
    assert.truthy(line, "no `stella send '...'` line in the README")
    local status, out = sh(sb, dir, LUA .. " " .. child.quote(ROOT .. "/bin/stella") .. line:sub(#"stella" + 1))
    assert.equal(0, status, out)
    assert.truthy(out:match("^" .. UUID .. "\n$"), out)
  end)

  it("the README's stella trigger over examples/ fails only the events meant to fail", function()
    local line = readme():match("\n(stella trigger %-%-rules examples/rules%.lua examples/interactions%.jsonl)")
    assert.truthy(line, "no `stella trigger --rules examples/rules.lua examples/interactions.jsonl` in the README")
    local status, out = sh(sb, dir, LUA .. " " .. child.quote(ROOT .. "/bin/stella") .. line:sub(#"stella" + 1))
    assert.equal(1, status, out)   -- the examples hold malformed lines and invalid requests on purpose
    assert.truthy(out:match("\nsent +%-? +2%d\n"), out)
    -- what fails is what the default company says of a new agent, and one bad address
    for what in out:gmatch("failed %(event %d+%): ([^\n]*)") do
      assert.truthy(what:find("Employee profile not complete", 1, true), what)
    end
    assert.is_nil(out:find("Brand signifier", 1, true), out)
    assert.is_nil(out:find("Employee not found", 1, true), out)
  end)

  it("the OpenResty webhook sends every event of examples/ the sandbox can take", function()
    local web = webhook_nginx.start{ key = sb.config.keys.test, base_url = sb.url, probe = "/events/status" }
    local ok, err = pcall(function()
      local events = {}
      for line in io.lines(ROOT .. "/examples/interactions.jsonl") do
        local e = require("cjson.safe").decode(line)   -- the file has malformed lines on purpose
        if type(e) == "table" then events[#events + 1] = e end
      end
      local function http(method, path, body) return webhook_nginx.http(web.ports.PORT, method, path, body) end
      local code, body = http("POST", "/events", cjson.encode(events))
      assert.equal(202, code, body)
      local status
      local deadline = socket.gettime() + 20
      repeat
        socket.sleep(0.1)
        local _, sbody = http("GET", "/events/status")
        status = cjson.decode(sbody)
        local n = 0
        for _, g in ipairs(status.ledger) do n = n + g.count end
      until n >= #events or socket.gettime() > deadline
      local by = {}
      for _, g in ipairs(status.ledger) do
        by[g.status] = (by[g.status] or 0) + g.count
      end
      assert.truthy((by.sent or 0) >= 20, cjson.encode(status.ledger))
      for _, e in ipairs(status.recent) do
        if e.status == "failed" then
          assert.truthy(tostring(e.error_message):find("Employee profile not complete", 1, true), cjson.encode(e))
        end
      end
      for _, g in ipairs(status.ledger) do
        assert.is_true(g.status ~= "failed" or g.count <= 4, cjson.encode(status.ledger))
      end
    end)
    web:stop()
    assert(ok, err)
  end)
end)
