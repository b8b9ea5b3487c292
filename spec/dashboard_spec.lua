-- Specs for `stella dashboard`: bin/stella as a child process serving a seeded SQLite
-- store on a free loopback port; its HTTP answers over raw sockets, the page rendered by
-- headless Chromium and its numbers compared with `stella status --json`.
local cjson = require "cjson"
local socket = require "socket"
local store_mod = require "stella.store"
local child = require "support.child"
local chromium = require "support.sandbox_chromium"

local LUA = os.getenv("STELLA_TEST_LUA") or (rawget(_G, "jit") and "luajit" or "lua5.4")
local TOKEN = "dash_token_0123456789SECRET"

local function sh(cmd)
  local p = io.popen(cmd)
  local out = p:read("*a")
  p:close()
  return out
end

local dir = sh("mktemp -d"):gsub("%s+$", "")

-- status, stdout, stderr of a command that ends
local function stella(args, env)
  local words = {}
  for i, a in ipairs(args) do words[i] = child.quote(a) end
  local err = dir .. "/stderr"
  local out = sh(child.ENV .. "env -u STELLA_DASHBOARD_TOKEN " .. (env or "") .. " " .. LUA .. " bin/stella "
                 .. table.concat(words, " ") .. " 2>" .. child.quote(err) .. "; echo @$?")
  return tonumber(out:match("@(%d+)%s*$")), (out:gsub("@%d+%s*$", "")), child.read_file(err)
end

-- A dashboard running in the background: { pid, url, port, out, err }
local function start(args, env)
  local words = {}
  for i, a in ipairs(args) do words[i] = child.quote(a) end
  local n = #sh("ls " .. child.quote(dir)) -- a fresh name per start
  local out, err = dir .. "/dash" .. n .. ".out", dir .. "/dash" .. n .. ".err"
  local pid = sh(child.ENV .. "env -u STELLA_DASHBOARD_TOKEN " .. (env or "") .. " " .. LUA .. " bin/stella dashboard "
                 .. table.concat(words, " ") .. " >" .. out .. " 2>" .. err .. " & echo $!"):match("%d+")
  local d = { pid = pid, out = out, err = err }
  for _ = 1, 100 do
    local text = child.read_file(out)
    d.url = text:match("(http://%S+/)")
    if d.url then break end
    if sh("kill -0 " .. pid .. " 2>/dev/null && echo alive") == "" then break end
    socket.sleep(0.1)
  end
  assert(d.url, "the dashboard did not start: " .. child.read_file(out) .. child.read_file(err))
  d.port = tonumber(d.url:match(":(%d+)/$"))
  return d
end

local function stop(d)
  os.execute("kill -TERM " .. d.pid .. " 2>/dev/null")
  for _ = 1, 50 do
    if sh("kill -0 " .. d.pid .. " 2>/dev/null && echo alive") == "" then return true end
    socket.sleep(0.1)
  end
  os.execute("kill -KILL " .. d.pid .. " 2>/dev/null")
  return false
end

-- One raw HTTP request: status, headers (lower-case names), body.
local function http(port, method, target, headers)
  local c = assert(socket.connect("127.0.0.1", port))
  c:settimeout(10)
  local lines = { method .. " " .. target .. " HTTP/1.1", "Host: " .. ((headers or {}).Host or ("127.0.0.1:" .. port)) }
  for k, v in pairs(headers or {}) do if k ~= "Host" then lines[#lines + 1] = k .. ": " .. v end end
  c:send(table.concat(lines, "\r\n") .. "\r\n\r\n")
  local text = c:receive("*a")
  c:close()
  local head, body = text:match("^(.-)\r\n\r\n(.*)$")
  local code = tonumber(head:match("^HTTP/1%.1 (%d+)"))
  local h = {}
  for k, v in head:gmatch("\r\n([^:]+):%s*([^\r]*)") do h[k:lower()] = v end
  return code, h, body
end

-- A store with a day of history: sent, skipped, invalid (one message with markup), failed,
-- scheduled and retrying items in the outbox, a dead one.
local function seed(path)
  local s = assert(store_mod.sqlite(path))
  local now = os.time()
  local entries = {}
  local function add(n, e)
    for _ = 1, n do
      local copy = {}
      for k, v in pairs(e) do copy[k] = v end
      copy.event_id = copy.event_id or tostring(50000 + #entries)
      entries[#entries + 1] = copy
    end
  end
  add(30, { time = now - 60, status = "sent" })
  add(12, { time = now - 3 * 3600, status = "sent" })
  add(3, { time = now - 3 * 3600, status = "recorded", reason = "do_not_send_tag" })
  add(5, { time = now - 120, status = "skipped", reason = "not_eligible" })
  add(2, { time = now - 120, status = "suppressed", reason = "suppressed" })
  add(2, { time = now - 30, status = "queued", reason = "scheduled", detail = "will send at ..." })
  add(1, { time = now - 50, status = "invalid", reason = "invalid_request", event_id = "E-<script>1</script>",
           detail = "customer.email: <b>not</b> a valid e-mail address (invalid_email)" })
  add(3, { time = now - 40, status = "failed", reason = "rejected", error_kind = "rejected",
           error_message = "400 Employee not found" })
  assert(s:record_many(entries))
  local ids = assert(s:enqueue_many{
    { kind = "request", body = "{}", event_id = "60001", created_at = now - 30, next_at = now + 3600 },
    { kind = "request", body = "{}", event_id = "60002", created_at = now - 30, next_at = now + 7200 },
    { kind = "request", body = "{}", event_id = "60003", created_at = now - 900, next_at = now + 600, attempts = 1 },
    { kind = "request", body = "{}", event_id = "60004", created_at = now - 5000, next_at = now - 5 },
    { kind = "request", body = "{}", brand = "blancapeak", event_id = "60005", created_at = now - 90000, next_at = now },
  })
  assert(s:reschedule(ids[1], now + 3600, 0, "scheduled"))
  assert(s:reschedule(ids[2], now + 7200, 0, "scheduled"))
  assert(s:reschedule(ids[3], now + 600, 1, "server: 503"))
  assert(s:kill(ids[5], "server: 503 <i>Service Unavailable</i>", now - 100, 10))
  s:close()
end

local it_chromium = chromium.available() and it or function(name)
  return pending(name .. " (needs " .. chromium.BINARY .. ")")
end

describe("stella dashboard", function()
  local db = dir .. "/dash.db"
  local d

  lazy_setup(function()
    seed(db)
    d = start{ "--db", db, "--port", "0" }
  end)
  lazy_teardown(function()
    if d then stop(d) end
    os.execute("rm -rf " .. child.quote(dir))
    assert.same({}, chromium.leftovers())
  end)

  it("serves the page, self-contained, read-only, loopback host names only", function()
    local code, h, body = http(d.port, "GET", "/")
    assert.equal(200, code)
    assert.matches("text/html", h["content-type"])
    assert.matches("default-src 'none'", h["content-security-policy"], 1, true)
    assert.equal("no-store", h["cache-control"])
    assert.is_nil(body:find("<link", 1, true))
    assert.is_nil(body:find("src=", 1, true))
    for url in body:gmatch("https?://[^\"' ]*") do   -- nothing from the network: the SVG namespace only
      assert.equal("http://www.w3.org/2000/svg", url)
    end
    code = http(d.port, "POST", "/status.json")
    assert.equal(405, code)
    code = http(d.port, "GET", "/status.json", { Host = "attacker.example:" .. d.port })
    assert.equal(403, code)
    code = http(d.port, "GET", "/admin")
    assert.equal(404, code)
    assert.equal("application/json", select(2, http(d.port, "GET", "/nope"))["content-type"])
    code = http(d.port, "HEAD", "/")
    assert.equal(200, code)
  end)

  it("answers /status.json with what `stella status --json` says, and more", function()
    local status, out, err = stella{ "status", "--db", db, "--json" }
    assert.equal(0, status, err)
    local want = cjson.decode(out)
    local code, _, body = http(d.port, "GET", "/status.json")
    assert.equal(200, code, body)
    local got = cjson.decode(body)
    for _, k in ipairs{ "counts", "total", "alert", "outbox", "latest", "threshold", "window" } do
      assert.same(want[k], got[k], k)
    end
    assert.same(want.rate, got.rate)   -- (the seed is minutes old: the same hours, unless one just began)
    assert.equal(58, got.total)
    assert.same({ queued = 4, dead = 1, due = 1, scheduled = 2, retrying = 1, in_flight = 0,
                  next_due = got.outbox.next_due, next_scheduled = got.outbox.next_scheduled,
                  oldest = got.outbox.oldest }, got.outbox)
    assert.equal("sqlite", got.backend)
    assert.equal(cjson.null, got.workers)
    assert.equal(cjson.null, got.queue)
    assert.equal(3600, got.bucket)
    assert.equal(1, #got.dead)
    assert.equal("60005", got.dead[1].event_id)
    assert.equal(10, got.dead[1].attempts)
    local n = 0
    for _, g in ipairs(got.timeline) do n = n + g.count end
    assert.equal(got.total, n)
    -- per day over 7 days
    _, _, body = http(d.port, "GET", "/status.json?since=7d")
    got = cjson.decode(body)
    assert.equal(86400, got.bucket)
    assert.equal(7 * 86400, got.window)
  end)

  it_chromium("renders in Chromium with the numbers of `stella status --json`", function()
    -- the page shows the hour its own "now" falls in: read both within one hour (again
    -- when an hour began in between)
    local want, dom
    for _ = 1, 2 do
      local h0 = math.floor(os.time() / 3600)
      local _, out = stella{ "status", "--db", db, "--json" }
      want = cjson.decode(out)
      dom = chromium.dump_dom(d.url)
      if math.floor(os.time() / 3600) == h0 then break end
    end
    assert.matches('data%-rendered="1"', dom)
    local function shown(key)
      return dom:match('data%-k="' .. key:gsub("%.", "%%.") .. '"[^>]*>([^<]*)<')
    end
    local function int(v) return ("%d"):format(v) end
    local by_status = {}
    for _, c in ipairs(want.counts) do by_status[c.status] = (by_status[c.status] or 0) + c.count end
    for _, st in ipairs{ "sent", "recorded", "queued", "skipped", "suppressed", "invalid", "failed" } do
      assert.equal(int(by_status[st] or 0), shown("count." .. st), st)
    end
    assert.equal(int(want.total), shown("total"))
    for _, k in ipairs{ "queued", "due", "scheduled", "retrying", "in_flight", "dead" } do
      assert.equal(int(want.outbox[k]), shown("outbox." .. k), k)
    end
    assert.equal(int(#want.latest), shown("latest.count"))
    assert.equal("5.0%", shown("threshold"))
    -- this hour's rate, as the page finds it: the bucket of the hour `now` falls in ("–"
    -- when the entries, written when the spec began, are in the hour before)
    local this_hour = math.floor(want.now / 3600) * 3600
    local cur
    for _, r in ipairs(want.rate) do if r.start == this_hour then cur = r end end
    assert.equal(cur and ("%.1f%%"):format(cur.rate * 100) or "–", shown("rate.last"))
    assert.equal(want.alert, dom:find('id="banner"[^>]*hidden') == nil)
    -- the tables: every latest event's id, the dead letter's error, markup shown as text
    for _, e in ipairs(want.latest) do
      local id = e.event_id:gsub("[<>&]", { ["<"] = "&lt;", [">"] = "&gt;", ["&"] = "&amp;" })
      assert.truthy(dom:find(id, 1, true), e.event_id)
    end
    assert.truthy(dom:find("server: 503 &lt;i&gt;Service Unavailable&lt;/i&gt;", 1, true))
    assert.truthy(dom:find("&lt;b&gt;not&lt;/b&gt;", 1, true))
    assert.is_nil(dom:find("<script>1</script>", 1, true))
    assert.matches('id="no%-workers"[^>]*>No workers %(sqlite store%)', dom)
    -- the chart: one bar per status and bucket, the threshold line
    assert.matches('class="threshold"', dom)
    assert.matches("alert threshold 5%.0%%", dom)
  end)

  describe("with a token", function()
    it("refuses another address than loopback without one (exit 2), and a short one", function()
      local status, _, err = stella{ "dashboard", "--db", db, "--bind", "0.0.0.0", "--port", "0" }
      assert.equal(2, status)
      assert.matches("needs a token: %-%-token or STELLA_DASHBOARD_TOKEN", err)
      status, _, err = stella{ "dashboard", "--db", db, "--token", "short", "--port", "0" }
      assert.equal(2, status)
      assert.matches("at least 16 characters", err)
    end)

    it("asks every request for it, as ?token= or a Bearer header, and never prints it", function()
      local t = start({ "--db", db, "--port", "0", "--bind", "0.0.0.0" }, "STELLA_DASHBOARD_TOKEN=" .. TOKEN)
      local ok, e = pcall(function()
        local code, h = http(t.port, "GET", "/")
        assert.equal(401, code)
        assert.equal("Bearer", h["www-authenticate"])
        assert.equal(401, (http(t.port, "GET", "/status.json?token=" .. TOKEN .. "x")))
        assert.equal(200, (http(t.port, "GET", "/?token=" .. TOKEN)))
        assert.equal(200, (http(t.port, "GET", "/status.json", { Authorization = "Bearer " .. TOKEN })))
        -- not bound to loopback: any Host is fine once the token is there
        assert.equal(200, (http(t.port, "GET", "/status.json?token=" .. TOKEN, { Host = "dash.example:1" })))
        if chromium.available() then
          local dom = chromium.dump_dom(t.url .. "?token=" .. TOKEN)
          assert.matches('data%-rendered="1"', dom)
        end
      end)
      assert.is_true(stop(t))
      if not ok then error(e, 0) end
      local printed = child.read_file(t.out) .. child.read_file(t.err)
      assert.is_nil(printed:find(TOKEN, 1, true))
      assert.matches("with a token", printed)
    end)
  end)
end)

describe("stella dashboard on a Redis store", function()
  local redis_server = require "support.redis"
  local queue = require "stella.queue"
  local srv, url, q, d
  local now = os.time()
  local BEAT = { state = "running", started = now - 100, pid = 4242, host = "host-a", processed = 7 }

  lazy_setup(function()
    os.execute("mkdir -p " .. child.quote(dir))   -- (the describe above removed it)
    srv = redis_server.start{}
    url = srv:url{ db = 1 }
    local s = assert(store_mod.redis(url))
    local entries = {}
    for i = 1, 5 do entries[i] = { time = now - 60, status = "sent", event_id = tostring(70000 + i) } end
    entries[6] = { time = now - 50, status = "failed", reason = "rejected", error_kind = "rejected",
                   error_message = "400 Employee not found", event_id = "70006" }
    assert(s:record_many(entries))
    s:close()
    -- the queue: 6 entries; w1 holds 2 (pending), w2 took one and gave it up; 3 unread
    q = assert(queue.open(url))
    assert(q:ensure_group())
    for i = 1, 6 do assert(q:submit{ id = i }) end
    assert.equal(2, #assert(q:read("w1", 2)))
    local given_up = assert(q:read("w2", 1))[1]
    given_up.deliveries = 6
    assert(q:bury(given_up, "delivered 6 times; last error: server: 503 <i>Service Unavailable</i>", "w2"))
    assert(q:dead_letter{ event = "{not json", reason = "malformed: in.jsonl:3: <b>invalid JSON</b>", id = "" })
    -- w1 beats (live), w2 stopped cleanly, w3 went silent a minute ago (vanished)
    assert(q:beat("w1", BEAT))
    assert(q:beat("w2", { state = "stopped", started = now - 300, pid = 4243, host = "host-b", processed = 1 }, now - 30))
    assert(q:beat("w3", { state = "running", started = now - 900, pid = 4244, host = "host-c", processed = 0 }, now - 60))
    d = start{ "--db", url, "--port", "0" }
  end)
  lazy_teardown(function()
    if d then stop(d) end
    if q then q:close() end
    if srv then srv:remove() end
    os.execute("rm -rf " .. child.quote(dir))
    assert.same({}, chromium.leftovers())
  end)

  -- `stella status --json`'s queue, its workers by name
  local function status_queue()
    local status, out, err = stella{ "status", "--db", url, "--json" }
    assert.equal(0, status, err)
    local want = cjson.decode(out).queue
    local by_name = {}
    for _, w in ipairs(want.workers) do by_name[w.name] = w end
    return want, by_name
  end

  it("answers /status.json with the queue and workers of `stella status --json`", function()
    assert(q:beat("w1", BEAT))
    local want, by_name = status_queue()
    local code, _, body = http(d.port, "GET", "/status.json")
    assert.equal(200, code, body)
    local got = cjson.decode(body)
    assert.equal("redis", got.backend)
    for _, k in ipairs{ "group", "length", "pending", "lag", "dead", "oldest", "consumers" } do
      if k == "consumers" then
        for i, c in ipairs(want.consumers) do
          assert.equal(c.name, got.queue.consumers[i].name)
          assert.equal(c.pending, got.queue.consumers[i].pending)
        end
      else
        assert.same(want[k], got.queue[k], k)
      end
    end
    assert.same({ lag = 3, pending = 2, dead = 2 }, { lag = got.queue.lag, pending = got.queue.pending, dead = got.queue.dead })
    assert.equal(got.queue.lag, got.queue.depth)
    assert.equal(3, #got.workers)
    for _, w in ipairs(got.workers) do
      local sw = by_name[w.name]
      for _, k in ipairs{ "state", "heartbeat", "pid", "host", "processed", "started" } do assert.same(sw[k], w[k], w.name .. " " .. k) end
    end
    assert.same({ "w1", "w2", "w3" }, { got.workers[1].name, got.workers[2].name, got.workers[3].name })
    assert.same({ "live", "stopped", "vanished" }, { got.workers[1].state, got.workers[2].state, got.workers[3].state })
    assert.equal(2, got.workers[1].pending)
    -- the dead-letter stream, newest first, with its reasons
    assert.equal(2, #got.queue.dead_letters)
    assert.matches("^malformed: in%.jsonl:3", got.queue.dead_letters[1].reason)
    assert.matches("^delivered 6 times", got.queue.dead_letters[2].reason)
    assert.equal("w2", got.queue.dead_letters[2].worker)
    assert.equal(6, got.queue.dead_letters[2].deliveries)
    -- a Redis store without a queue in use: null, as `stella status --json` says
    local unused = require("stella.cli.queue_status").sources(srv:url{ db = 2 })
    assert.is_nil(unused.queue(now))
    assert.is_nil(unused.workers(now))
  end)

  it_chromium("renders the queue, the workers' heartbeats and states and the dead letters in Chromium, "
    .. "with the numbers of `stella status --json`", function()
    local want, by_name, dom
    for _ = 1, 3 do   -- w1 is live while its beat is under 15 s old: read both within that
      assert(q:beat("w1", BEAT))
      local beat = os.time()
      want, by_name = status_queue()
      dom = chromium.dump_dom(d.url)
      if os.time() - beat < 12 then break end
    end
    assert.matches('data%-rendered="1"', dom)
    local function shown(key) return dom:match('data%-k="' .. key:gsub("%.", "%%.") .. '"[^>]*>([^<]*)<') end
    for _, k in ipairs{ "lag", "pending", "dead", "length" } do
      assert.equal(("%d"):format(want[k]), shown("queue." .. k), k)
    end
    assert.is_nil(dom:match('<div id="queue" hidden'))
    assert.is_nil(dom:match('id="queue%-dead%-panel"[^>]*hidden'))
    assert.is_nil(dom:find('id="no-workers"', 1, true))
    -- a row per worker: its state, heartbeat, host and pid, processed, pending
    local rows = 0
    for row in dom:gmatch('<tr class="row%-worker".-</tr>') do
      rows = rows + 1
      local name, state = row:match('data%-worker="([^"]*)" data%-state="([^"]*)"')
      local w = assert(by_name[name], name)
      assert.equal(w.state, state, name)
      assert.matches(">" .. w.state .. "<", row, 1, true)
      assert.equal(("%d"):format(w.heartbeat), row:match('data%-heartbeat="(%d+)"'), name)
      assert.truthy(row:find(("%s (%d)"):format(w.host, w.pid), 1, true), row)
      assert.truthy(row:find(('<td class="num">%d</td>'):format(w.processed), 1, true), row)
    end
    assert.equal(#want.workers, rows)
    assert.matches('data%-worker="w1" data%-state="live"', dom)
    assert.matches('data%-worker="w3" data%-state="vanished"', dom)
    -- the dead-letter stream: a row each, its reason as text
    local letters = 0
    for _ in dom:gmatch('<tr class="row%-qdead"') do letters = letters + 1 end
    assert.equal(want.dead, letters)
    assert.truthy(dom:find("server: 503 &lt;i&gt;Service Unavailable&lt;/i&gt;", 1, true))
    assert.truthy(dom:find("&lt;b&gt;invalid JSON&lt;/b&gt;", 1, true))
    assert.is_nil(dom:find("<b>invalid JSON</b>", 1, true))
  end)
end)
