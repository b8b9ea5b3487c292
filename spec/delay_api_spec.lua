-- bench/delay_api.c through spec/support/delay_api.lua: the API bench/lanes.lua measures
-- against answers 201 no earlier than its delay, keeps connections, answers pipelined
-- requests in order, and counts what it answered (hold times, most held at once, the
-- interactions answered twice). No upper bounds on time: those are the benchmark's.
local core = require "stella.core"
local socket = require "socket"
local nginx = require "stella.nginx"
local delay_api = require "support.delay_api"

local DELAY = 0.05

local function body(id)
  return ('{"customer":{"name":"C","email":"c@example.com"},"channel":"phone","ext_interaction_id":"%s"}'):format(id)
end

-- A raw connection: sends `data` at once, reads until the server closes.
local function raw(port, data)
  local c = assert(socket.connect("127.0.0.1", port))
  c:settimeout(10)
  assert(c:send(data))
  local out, err, partial = c:receive("*a")
  c:close()
  return out or partial, err
end

describe("bench/delay_api", function()
  local api
  before_each(function() api = delay_api.start{ delay = DELAY } end)
  after_each(function() api:stop() end)

  it("answers 201 with a request id after the delay, on one kept connection, and counts it", function()
    local h = assert(core.http_new{ api_key = "tk_delay", base_url = api.url, timeout = 10 })
    for i = 1, 3 do
      local t0 = socket.gettime()
      local r = h:post("/v1/requests", body("i" .. i))
      local took = socket.gettime() - t0
      assert.equal(201, r.status)
      assert.equal("application/json", r.content_type)
      assert.matches('^{"request_id":"d%-%d+"}$', r.body)
      assert.is_true(took >= DELAY, "answered after " .. took .. " s")
    end
    assert.equal(1, h:connects())
    h:close()
    local v, total, max, failed = api:received()
    assert.equal(3, total)
    assert.equal(1, max)
    assert.equal(0, failed)
    assert.equal(3, v.ids)
    assert.equal(0, v.dups)
    local first, last, held = api:span()
    assert.is_true(held >= 3 * DELAY, "held " .. held .. " s")
    assert.is_true(last - first >= 3 * DELAY)
  end)

  it("holds requests on several connections at once and counts an interaction answered twice", function()
    local hs = {}
    for i = 1, 4 do
      hs[i] = assert(core.http_new{ api_key = "tk_delay", base_url = api.url, timeout = 10 })
      -- i 1 and 2 carry the same interaction, i 3 and 4 another each
      assert.is_true(hs[i]:start("/v1/requests", body(i <= 2 and "same" or "other" .. i)))
    end
    local done = {}
    nginx.wait_until(10, function()
      for i, h in ipairs(hs) do
        if not done[i] then
          local r = h:step()
          if r then done[i] = r end
        end
      end
      return done[1] and done[2] and done[3] and done[4] and true
    end)
    for i = 1, 4 do
      assert.equal(201, done[i] and done[i].status)
      hs[i]:close()
    end
    local v, total, max = api:received()
    assert.equal(4, total)
    assert.equal(4, max)
    assert.equal(3, v.ids)
    assert.equal(1, v.dups)
    assert.equal(0, v.busy)
  end)

  it("answers another status when told, without counting it, and resets its counters", function()
    local h = assert(core.http_new{ api_key = "tk_delay", base_url = api.url, timeout = 10 })
    assert.equal(201, h:post("/v1/requests", body("a")).status)
    api:set_status(503)
    assert.equal(503, h:post("/v1/requests", body("b")).status)
    api:set_status(201)
    api:set_delay(0)
    assert.equal(201, h:post("/v1/requests", body("a")).status)
    local v, total, _, failed = api:received()
    assert.equal(2, total)
    assert.equal(1, failed)
    assert.equal(1, v.dups)
    assert.equal(0, v.delay)
    api:reset()
    v, total, _, failed = api:received()
    assert.equal(0, total)
    assert.equal(0, failed)
    assert.equal(0, v.ids)
    assert.equal(0, v.dups)
    h:close()
  end)

  it("answers pipelined requests in order, a control in its turn", function()
    local one = body("p1")
    local out = raw(api.port,
      "POST /v1/requests HTTP/1.1\r\nHost: x\r\nContent-Length: " .. #one .. "\r\n\r\n" .. one
      .. "GET /_received HTTP/1.1\r\nHost: x\r\n\r\n"
      .. "POST /v1/requests HTTP/1.1\r\nHost: x\r\nContent-Length: " .. #one .. "\r\n\r\n" .. one
      .. "GET /_received HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
      .. "POST /v1/requests HTTP/1.1\r\nHost: x\r\nContent-Length: " .. #one .. "\r\n\r\n" .. one)
    local statuses, totals = {}, {}
    for code in out:gmatch("HTTP/1%.1 (%d%d%d)") do statuses[#statuses + 1] = tonumber(code) end
    for n in out:gmatch('"total":(%d+)') do totals[#totals + 1] = tonumber(n) end
    -- nothing after the request that asked to close
    assert.same({ 201, 200, 201, 200 }, statuses)
    assert.same({ 1, 2 }, totals)
    local v, total = api:received()
    assert.equal(2, total)
    assert.equal(1, v.dups)
  end)

  it("stops on SIGTERM", function()
    local pid = api.pid
    api:stop()
    assert.is_false(nginx.alive(pid))
    api:stop()   -- again: nothing
  end)
end)
