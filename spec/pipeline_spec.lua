-- Specs for sending in the background: the C core's sender (core.send_many, a thread
-- posting a list one request after another), the non-blocking post (http:start/step),
-- client:complete, and the trigger's pipeline, which overlaps a batch's sends with the
-- store work of its neighbours. Everything goes to the loopback test server (nginx).
local stella = require "stella"
local core = require "stella.core"
local client_mod = require "stella.client"
local store_mod = require "stella.store"
local testserver = require "support.testserver"
local socket = require "socket"

local SPEC_DIR = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./")
local RULES = SPEC_DIR .. "support/trigger_rules.lua"
local CRASH = SPEC_DIR .. "support/pipeline_crash.lua"
local LUA = os.getenv("STELLA_TEST_LUA") or (rawget(_G, "jit") and "luajit" or "lua5.4")
local API_KEY = "tk_pipeline_spec_0123SECRET"
local T0 = 1700000000

local function body_of(n)
  return '{"customer":{"name":"C' .. n .. '","email":"c' .. n .. '@example.com"},' ..
    '"employee":{"email":"agent@example.com"},"channel":"phone","ext_interaction_id":"p' .. n .. '"}'
end

local child = require "support.child"
local quote, CHILD_ENV, read_file, remove_db = child.quote, child.ENV, child.read_file, child.remove_db

describe("background sends", function()
  local server, https

  lazy_setup(function() server = testserver.start() end)
  lazy_teardown(function() if server then server:stop() end end)
  before_each(function()
    server:reset()
    https = {}
  end)
  after_each(function()
    for _, h in ipairs(https) do h:close() end
  end)

  local function http()
    local h = assert(core.http_new{ base_url = server.url, api_key = API_KEY, timeout = 5 })
    https[#https + 1] = h
    return h
  end

  local function triples(h, n, first)
    local list = {}
    for i = 1, n do
      list[#list + 1] = h
      list[#list + 1] = "/v1/requests"
      list[#list + 1] = body_of((first or 0) + i)
    end
    return list
  end

  describe("core.send_many", function()
    it("posts every body in order on the client's one connection, and reports each answer", function()
      local h = http()
      local s = assert(core.send_many(triples(h, 5), 30))
      assert.equal(5, s:wait())
      assert.is_true(s:done())
      for i = 1, 5 do
        local r = s:result(i)
        assert.equal(200, r.status)
        assert.equal('{"request_id":"req-' .. i .. '"}', r.body)
        assert.matches("json", r.content_type)
        assert.is_nil(r.retry_after)
        assert.is_nil(r.failure)
      end
      assert.equal(0, select("#", s:result(6)))
      s:close()
      local seen = server:requests()
      assert.equal(5, #seen)
      for i = 1, 5 do
        assert.equal(body_of(i), seen[i].body)
        assert.equal(API_KEY, seen[i].headers["x-api-key"])
        assert.equal(seen[1].connection, seen[i].connection)
      end
      assert.equal(1, h:connects())
    end)

    it("stops at the first answer that is not 2xx, and leaves the rest unattempted", function()
      server:script{ {}, { status = 503, headers = { ["Retry-After"] = "7" } } }
      local s = assert(core.send_many(triples(http(), 4), 30))
      assert.equal(2, s:wait())
      assert.equal(200, s:result(1).status)
      local r = s:result(2)
      assert.equal(503, r.status)
      assert.equal(7000, r.retry_after)
      assert.equal(0, select("#", s:result(3)))
      s:close()
      assert.equal(2, #server:requests())
    end)

    it("stops at a transport failure and says which", function()
      server:script{ { drop = true } }
      local s = assert(core.send_many(triples(http(), 3), 30))
      assert.equal(1, s:wait())
      local r = s:result(1)
      assert.is_nil(r.status)
      assert.equal("network", r.failure)
      assert.is_string(r.message)
      assert.is_nil(r.message:find(API_KEY, 1, true))
      s:close()
    end)

    it("starts nothing after the first once the budget has passed", function()
      server:script{ { delay = 0.2 } }
      local s = assert(core.send_many(triples(http(), 3), 0.1))
      assert.equal(1, s:wait())
      assert.equal(200, s:result(1).status)
      s:close()
      assert.equal(1, #server:requests())
      -- a budget of 0 still makes the first attempt
      server:reset()
      s = assert(core.send_many(triples(http(), 3), 0))
      assert.equal(1, s:wait())
      s:close()
    end)

    it("runs in the background: done() is false while the answer is delayed", function()
      server:script{ { delay = 0.3 } }
      local s = assert(core.send_many(triples(http(), 1), 30))
      local t0 = socket.gettime()
      assert.is_false(s:done())
      assert.is_true(socket.gettime() - t0 < 0.2)   -- neither call waited
      assert.equal(1, s:wait())
      assert.is_true(s:done())
      s:close()
    end)

    it("lends the clients: a post meanwhile waits for the thread, then goes out after it", function()
      local h = http()
      server:script{ { delay = 0.2 } }
      local s = assert(core.send_many(triples(h, 2), 30))
      assert.equal(200, h:post("/v1/requests", body_of(99)).status)
      local seen = server:requests()
      assert.equal(3, #seen)
      assert.equal(body_of(1), seen[1].body)
      assert.equal(body_of(2), seen[2].body)
      assert.equal(body_of(99), seen[3].body)
      s:close()
    end)

    it("several clients in one list: each item on its own client", function()
      local a, b = http(), http()
      local list = { a, "/v1/requests", body_of(1), b, "/v1/requests", body_of(2), a, "/v1/requests", body_of(3) }
      local s = assert(core.send_many(list, 30))
      assert.equal(3, s:wait())
      s:close()
      local by_body = {}   -- the two clients send at the same time: arrival order varies
      for _, r in ipairs(server:requests()) do by_body[r.body] = r end
      assert.equal(by_body[body_of(1)].connection, by_body[body_of(3)].connection)
      assert.are_not.equal(by_body[body_of(1)].connection, by_body[body_of(2)].connection)
      assert.is_true(by_body[body_of(1)].time <= by_body[body_of(3)].time)   -- in order on one client
    end)

    it("close stops the thread after the post in flight; close is idempotent, the clients are free", function()
      local h = http()
      server:script{ { delay = 0.2 } }
      local s = assert(core.send_many(triples(h, 5), 30))
      socket.sleep(0.05)
      s:close()
      s:close()
      assert.equal(1, #server:requests())
      assert.has_error(function() s:wait() end, "attempt to use a closed stella sender")
      assert.equal(200, h:post("/v1/requests", body_of(7)).status)
      -- closing a lent client waits for the thread first
      server:script{ { delay = 0.1 } }
      local s2 = assert(core.send_many(triples(h, 1), 30))
      h:close()
      assert.equal(1, s2:wait())
      assert.equal(200, s2:result(1).status)
      s2:close()
    end)

    it("groups: a group's clients share its items, each taking the next as soon as it is free", function()
      local a, b = http(), http()
      -- the first post to arrive waits 1 s: the other client, free meanwhile, takes every
      -- other item, whatever client the list names
      server:script{ { delay = 1 } }
      local list = {}
      for i = 1, 6 do
        list[#list + 1] = i % 2 == 1 and a or b
        list[#list + 1] = "/v1/requests"
        list[#list + 1] = body_of(i)
      end
      local s = assert(core.send_many(list, 30, { 1, 1, 1, 1, 1, 1 }))
      assert.equal(6, s:wait())
      local by_poster = {}
      for k = 1, 6 do
        assert.equal(200, s:result(k).status)
        local p = s:poster(k)
        assert.truthy(p == 1 or p == 2)   -- a (its first item is item 1) or b (item 2)
        by_poster[p] = (by_poster[p] or 0) + 1
      end
      assert.same({ 1, 5 }, { math.min(by_poster[1], by_poster[2]), math.max(by_poster[1], by_poster[2]) })
      assert.equal(0, select("#", s:poster(7)))
      s:close()
      local seen = server:requests()
      assert.equal(6, #seen)
      local slow, n, last = seen[1].connection, 0, 0
      for _, r in ipairs(seen) do   -- each once; the fast connection's in list order
        local k = tonumber(r.body:match('"ext_interaction_id":"p(%d+)"'))
        if r.connection ~= slow then
          n = n + 1
          assert.is_true(k > last)
          last = k
        end
      end
      assert.equal(5, n)
    end)

    it("groups: a failure in one lane stops the whole group; group 0 keeps a client's items its own", function()
      local a, b = http(), http()
      server:script{ { status = 503 } }   -- whichever request comes first
      local list, groups = {}, {}
      for i = 1, 40 do
        list[#list + 1] = i % 2 == 1 and a or b
        list[#list + 1] = "/v1/requests"
        list[#list + 1] = body_of(i)
        groups[i] = 1
      end
      local s = assert(core.send_many(list, 30, groups))
      local n = s:wait()
      local failed, results = 0, 0
      for k = 1, 40 do
        local r = s:result(k)
        if r then
          results = results + 1
          if r.status == 503 then failed = failed + 1 end
        end
      end
      assert.equal(1, failed)
      assert.equal(n, results)
      assert.is_true(n >= 1 and n < 40)   -- the other lane stopped after its post in flight
      s:close()
      assert.equal(n, #server:requests())
      -- group 0: each client its own items, as without groups
      server:reset()
      list = { a, "/v1/requests", body_of(1), b, "/v1/requests", body_of(2), a, "/v1/requests", body_of(3),
               b, "/v1/requests", body_of(4) }
      s = assert(core.send_many(list, 30, { 0, 0, 0, 0 }))
      assert.equal(4, s:wait())
      for k = 1, 4 do assert.equal(k % 2 == 1 and 1 or 2, s:poster(k)) end
      s:close()
    end)

    it("groups: raises on a client in two groups, a group list of another length, a group that is no whole number", function()
      local a = http()
      local list = { a, "/v1/requests", "{}", a, "/v1/requests", "{}" }
      assert.has_error(function() assert(core.send_many(list, 1, { 1, 2 })) end)
      local s, err = core.send_many(list, 1, { 1, 2 })
      assert.is_nil(s)
      assert.equal("a client in two groups", err)
      assert.has_error(function() core.send_many(list, 1, { 1 }) end)
      assert.has_error(function() core.send_many(list, 1, { 1, -1 }) end)
      assert.has_error(function() core.send_many(list, 1, { 1, "x" }) end)
      assert.equal(0, #server:requests())
    end)

    it("an empty list is a finished sender", function()
      local s = assert(core.send_many({}, 1))
      assert.is_true(s:done())
      assert.equal(0, s:wait())
      s:close()
    end)

    it("raises on a list that is not (client, path, body) triples", function()
      local h = http()
      assert.has_error(function() core.send_many({ h, "/v1/requests" }, 1) end)
      assert.has_error(function() core.send_many({ {}, "/v1/requests", "{}" }, 1) end)
      assert.has_error(function() core.send_many({ h, "/v1/requests", 42 }, 1) end)
      assert.has_error(function() core.send_many("x", 1) end)
      local closed = http()
      closed:close()
      assert.has_error(function() core.send_many({ closed, "/v1/requests", "{}" }, 1) end)
    end)
  end)

  -- send_many and sender:add read their items alike; each names itself in what it raises
  it("send_many and sender:add raise on a list of no triples, a closed client, a path or body not a string", function()
    local a = http()
    local closed = assert(core.http_new{ base_url = server.url, api_key = API_KEY, timeout = 5 })
    closed:close()
    local appendable = assert(core.sender_open())
    local calls = {
      send_many = function(list, groups) return core.send_many(list, 1, groups) end,
      ["sender:add"] = function(list, groups) return appendable:add(list, 1, groups) end,
    }
    for who, call in pairs(calls) do
      local function raises(words, list, groups)
        local ok, err = pcall(call, list, groups)
        assert.is_false(ok, who)
        assert.truthy(tostring(err):find(words, 1, true), who .. ": " .. tostring(err))
      end
      raises("a list of (client, path, body) triples expected", { a, "/v1/requests" })
      raises("one group per item expected", { a, "/v1/requests", "{}" }, { 1, 2 })
      raises(who .. ": group 1: a whole number >= 0 expected", { a, "/v1/requests", "{}" }, { -1 })
      raises(who .. ": item 2: an open stella.http expected", { a, "/v1/requests", "{}", closed, "/v1/requests", "{}" })
      raises(who .. ": item 1: an open stella.http expected", { "x", "/v1/requests", "{}" })
      raises(who .. ": item 1: path and body must be strings", { a, "/v1/requests", 5 })
    end
    appendable:close()
    assert.equal(0, #server:requests())
  end)

  describe("core.sender_open (an appendable sender)", function()
    local function wire_ids(reqs)
      local ids = {}
      for i, r in ipairs(reqs) do ids[i] = r.body:match('"ext_interaction_id":"([^"]+)"') end
      return ids
    end

    it("takes chunks while its lanes are busy: a lane goes on to the next chunk while another's post is out", function()
      local h1, h2 = http(), http()
      server:script{ { delay = 2 } }   -- whichever request comes first
      local s = assert(core.sender_open())
      local list = triples(h1, 2)
      list[4] = h2
      local a = assert(s:add(list, 30, { 1, 1 }))
      local b = assert(s:add(triples(h1, 3, 2), 30, { 1, 1, 1 }))
      assert.is_true(b > a)
      assert.is_true(s:ready(b, 30))
      local got, posters = s:collect(b)
      for k = 1, 3 do
        assert.equal(200, got[k].status)
        assert.truthy(posters[k] == h1 or posters[k] == h2)
      end
      -- chunk b went out on the free lane before chunk a's slow answer came back
      local reqs = server:requests()
      assert.equal(5, #reqs)
      for i = 2, 5 do assert.is_true(reqs[i].time - reqs[1].time < 1.5, "request " .. i .. " waited for the slow one") end
      got = s:collect(a)   -- waits for the slow post
      assert.equal(200, got[1].status)
      assert.equal(200, got[2].status)
      assert.same({ "p1", "p2", "p3", "p4", "p5" }, (function()
        local ids = wire_ids(reqs)
        table.sort(ids)
        return ids
      end)())
      assert.is_false(s:paused())
      s:close()
      s:close()
      assert.has_error(function() s:add({}, 1) end, "attempt to use a closed stella sender")
    end)

    it("pauses at a failure until its chunk is collected; the items not taken come back unsent", function()
      local h = http()
      server:script{ { status = 503 } }
      local s = assert(core.sender_open())
      local a = assert(s:add(triples(h, 3), 30))
      local b = assert(s:add(triples(h, 2, 3), 30))
      assert.is_true(s:ready(a, 30))
      assert.is_true(s:paused())
      assert.is_false(s:resume())   -- chunk a, with its failed item, is not collected yet
      local got, posters = s:collect(a)
      assert.equal(503, got[1].status)
      assert.equal(h, posters[1])
      assert.is_false(got[2])
      assert.is_false(got[3])
      assert.equal(1, #server:requests())
      assert.is_true(s:resume())
      assert.is_true(s:ready(b, 30))
      got = s:collect(b)
      assert.equal(200, got[1].status)
      assert.equal(200, got[2].status)
      assert.same({ "p1", "p4", "p5" }, wire_ids(server:requests()))
      assert.has_error(function() s:collect(b) end, "sender:collect: no chunk " .. b)
      s:close()
    end)

    it("skips an item whose budget has passed when a lane gets to it (never the chunk's first)", function()
      local h = http()
      server:script{ { delay = 0.5 } }
      local s = assert(core.sender_open())
      local a = assert(s:add(triples(h, 3), 0.2))
      assert.is_true(s:ready(a, 30))
      local got = s:collect(a)
      assert.equal(200, got[1].status)
      assert.equal("skipped", got[2])
      assert.equal("skipped", got[3])
      assert.equal(1, #server:requests())
      assert.is_false(s:paused())
      s:close()
    end)

    it("pause gives the clients back to the caller; resume lends them again", function()
      local h = http()
      local s = assert(core.sender_open())
      local a = assert(s:add(triples(h, 2), 30))
      s:pause()
      assert.equal(200, h:post("/v1/requests", body_of(9)).status)   -- in line, while paused
      assert.is_true(s:resume())
      local b = assert(s:add(triples(h, 1, 2), 30))   -- the lanes still run
      assert.is_true(s:ready(b, 30))
      local got = s:collect(a)
      assert.equal(200, got[1].status)
      assert.equal(200, s:collect(b)[1].status)
      -- a client used while lent (not paused) stops the lanes first: never two posts at once
      assert.equal(200, h:post("/v1/requests", body_of(10)).status)
      local none, err = s:add(triples(h, 1, 20), 30)
      assert.is_nil(none)
      assert.equal("the sender has stopped", err)
      assert.equal(5, #server:requests())
      s:close()
    end)

    it("stop: the items not taken stay unsent", function()
      local h = http()
      server:script{ { delay = 0.5 } }
      local s = assert(core.sender_open())
      local a = assert(s:add(triples(h, 4), 30))
      s:stop()
      assert.is_true(s:ready(a, 30))
      local got = s:collect(a)
      local sent = 0
      for k = 1, 4 do if got[k] then sent = sent + 1 end end
      assert.truthy(sent <= 1)
      assert.equal(sent, #server:requests())
      assert.is_true(s:paused())
      assert.is_false(s:resume())
      s:close()
    end)

    it("raises on misuse", function()
      local h = http()
      local s = assert(core.sender_open())
      assert.has_error(function() s:add({ h, "/v1/requests" }, 1) end)
      assert.has_error(function() s:add({ {}, "/v1/requests", "{}" }, 1) end)
      assert.has_error(function() s:add({ h, "/v1/requests", 42 }, 1) end)
      assert.has_error(function() s:add(triples(h, 1), 1, { -1 }) end)
      assert.has_error(function() s:add(triples(h, 2), 1, { 1 }) end)
      assert.has_error(function() s:collect(99) end, "sender:collect: no chunk 99")
      local none, err = s:add(triples(h, 1), 1, { 2 })
      assert.truthy(none)
      none, err = s:add(triples(h, 1), 1, { 3 })   -- h has group 2 already
      assert.is_nil(none)
      assert.equal("a client in two groups", err)
      local one = assert(core.send_many({}, 1))
      assert.has_error(function() one:add({}, 1) end, "stella sender: not an appendable sender (sender_open)")
      one:close()
      s:close()
    end)
  end)

  describe("http:start / http:step", function()
    it("posts without waiting, then steps until the answer is there", function()
      local h = http()
      server:script{ { delay = 0.1 } }
      assert.is_true(h:start("/v1/requests", body_of(1)))
      assert.is_false(h:step())
      assert.has_error(function() h:start("/v1/requests", body_of(2)) end,
        "stella client busy: a started post has not ended")
      local r
      repeat r = h:step(0.05) until r ~= false
      assert.equal(200, r.status)
      assert.equal('{"request_id":"req-1"}', r.body)
      assert.has_error(function() h:step() end, "stella client: no started post to step")
      -- the blocking post reuses the same connection
      assert.equal(200, h:post("/v1/requests", body_of(2)).status)
      assert.equal(1, h:connects())
    end)

    it("reports a failure the way post does", function()
      local h = http()
      server:script{ { drop = true } }
      assert.is_true(h:start("/v1/requests", body_of(1)))
      local r
      repeat r = h:step(0.05) until r ~= false
      assert.is_nil(r.status)
      assert.equal("network", r.failure)
    end)
  end)

  describe("client:complete and stella.client.send_many", function()
    it("retries after a failed first attempt made elsewhere, as post would", function()
      local c = stella.new{ api_key = API_KEY, base_url = server.url, retry = { attempts = 3, base_delay = 0.001 },
                            sleep = function() end }
      local res = c:complete("/v1/requests", body_of(1), { status = 503, body = "" })
      assert.equal(200, res.status)
      assert.equal(2, res.attempts)
      assert.equal("req-1", res.request_id)
      local _, err = c:complete("/v1/requests", body_of(2), { status = 400, body = '{"error":"Invalid customer"}',
                                                              content_type = "application/json" })
      assert.equal("rejected", err.kind)
      assert.equal(1, err.attempts)
      c:close()
    end)

    it("gives nil for a client whose transport is not the C core's", function()
      local custom = stella.new{ api_key = API_KEY, base_url = server.url,
                                 transport = function() return { post = function() return { status = 200, body = "{}" } end,
                                                                 close = function() end } end }
      assert.is_nil(client_mod.send_many({ custom, "/v1/requests", "{}" }, 1))
      custom:close()
      -- nor for an object of the caller's making that only has post()
      assert.is_nil(client_mod.send_many({ { post = function() end }, "/v1/requests", "{}" }, 1))
    end)
  end)
end)

describe("trigger:pipeline", function()
  local server

  lazy_setup(function() server = testserver.start() end)
  lazy_teardown(function() if server then server:stop() end end)
  before_each(function() server:reset() end)

  local function events(first, n, over)
    local list = {}
    for i = first, first + n - 1 do
      local e = { ticket = i, channel = i % 2 == 0 and "phone" or "chat",
                  email = "customer" .. (i % 7) .. "@example.com", agent = "agent@example.com",
                  name = "Customer " .. i }
      for k, v in pairs(over or {}) do e[k] = v end
      list[#list + 1] = e
    end
    return list
  end

  for _, backend in ipairs{ "memory", "sqlite" } do
    describe(backend .. " store", function()
      local paths, stores, triggers = {}, {}, {}

      local function new_store()
        local s
        if backend == "sqlite" then
          local path = os.tmpname()
          paths[#paths + 1] = path
          s = assert(store_mod.sqlite(path))
        else
          s = assert(store_mod.memory())
        end
        stores[#stores + 1] = s
        return s
      end

      local function trigger(opts)
        opts = opts or {}
        opts.rules = opts.rules or RULES
        opts.store = opts.store or new_store()
        opts.clock = opts.clock or function() return T0 end
        opts.random = function() return 0.5 end
        if opts.client == nil then
          opts.client = { api_key = API_KEY, base_url = server.url, timeout = 5,
                          retry = { attempts = 2, base_delay = 0.001 }, sleep = function() end }
        end
        local t = stella.trigger(opts)
        triggers[#triggers + 1] = t
        return t
      end

      after_each(function()
        for _, t in ipairs(triggers) do t:close() end
        for _, s in ipairs(stores) do s:close() end
        for _, p in ipairs(paths) do remove_db(p) end
        paths, stores, triggers = {}, {}, {}
      end)

      local function summary(outcomes)
        local list = {}
        for i, o in ipairs(outcomes) do
          list[i] = table.concat({ o.status, tostring(o.reason), tostring(o.event_id) }, "/")
        end
        return list
      end

      it("decides, sends and records exactly what process_many does, batch after batch", function()
        local batches = { events(1, 12), events(13, 12), events(25, 9) }
        -- the reference: process_many on a store of its own
        local ref = trigger()
        local expected, expected_bodies = {}, {}
        for i, b in ipairs(batches) do expected[i] = summary(ref:process_many(b)) end
        for _, r in ipairs(server:requests()) do expected_bodies[#expected_bodies + 1] = r.body end
        server:reset()

        local t = trigger()
        local got, tags = {}, {}
        local p = t:pipeline(function(outcomes, evs, tag)
          got[#got + 1] = summary(outcomes)
          tags[#tags + 1] = tag
          assert.equal(#evs, #outcomes)
        end)
        for i, b in ipairs(batches) do
          p:process(b, "batch " .. i)
          assert.equal(i - 1, #got)   -- a batch is complete once the next one is in
        end
        p:finish()
        assert.same(expected, got)
        assert.same({ "batch 1", "batch 2", "batch 3" }, tags)
        local bodies = {}
        for _, r in ipairs(server:requests()) do bodies[#bodies + 1] = r.body end
        assert.same(expected_bodies, bodies)
        -- and a mix of outcomes was exercised: sent, suppressed (customers repeat)
        local kinds = {}
        for _, list in ipairs(got) do
          for _, s in ipairs(list) do kinds[s:match("^[^/]+")] = true end
        end
        assert.is_true(kinds.sent and kinds.suppressed)
        local st = t:stats()
        assert.equal(#expected_bodies, st.counts.sent)
        if backend == "sqlite" then
          assert.same({ queued = 0, dead = 0 }, t.store:outbox_counts())
        end
      end)

      it("a failing answer mid-batch: the rest is sent in line, with the client's retries", function()
        local t = trigger()
        server:script{ {}, { status = 503 }, {}, { status = 503 }, { status = 503 } }
        local all = {}
        local p = t:pipeline(function(outcomes)
          for _, o in ipairs(outcomes) do all[#all + 1] = o end
        end)
        p:process(events(1, 5), nil)   -- 5 customers: customer1..5
        p:finish()
        -- 1: sent by the thread; 2: 503 (the thread stops), then 200 on the client's
        -- retry; 3: 503 twice -> queued; 4, 5: sent in line
        local st = {}
        for i, o in ipairs(all) do st[i] = o.status end
        assert.same({ "sent", "sent", "queued", "sent", "sent" }, st)
        assert.equal(2, all[2].attempts)
        assert.equal("server", all[3].reason)
        assert.equal(7, #server:requests())
      end)

      it("a request past half the lease stays queued (deferred), and flush() sends it once", function()
        local clock = socket.gettime
        local t = trigger{ clock = clock, outbox = { lease = 0.4 } }
        server:script{ { delay = 0.3 } }
        local all = {}
        local p = t:pipeline(function(outcomes)
          for _, o in ipairs(outcomes) do all[#all + 1] = o end
        end)
        p:process(events(1, 4), nil)
        p:finish()
        local st = {}
        for i, o in ipairs(all) do st[i] = o.status .. "/" .. tostring(o.reason) end
        -- customers 1..4: the first send always goes; the lease (0.4 s) is half gone after it
        assert.equal("sent/nil", st[1])
        for i = 2, 4 do assert.equal("queued/deferred", st[i]) end
        local summary = t:flush()
        assert.equal(3, summary.sent)
        local per = {}
        for _, r in ipairs(server:requests()) do
          local id = r.body:match('"ext_interaction_id":"([^"]+)"')
          per[id] = (per[id] or 0) + 1
        end
        for id, n in pairs(per) do assert.equal(1, n, "sent twice: " .. id) end
      end)

      it("brands with their own keys: one background batch over several clients, each with its key", function()
        local rules = dofile(RULES)
        rules.brands = { acme = { api_key = "key-acme" }, beta = { api_key = "key-beta", signifier = "BETA-1" },
                         plain = {} }
        rules.default_brand = "plain"
        local t = trigger{ rules = rules }
        local brand_of = { "acme", "beta", "plain", false, "acme", "beta" }
        local evs = {}
        for i, b in ipairs(brand_of) do
          evs[i] = { ticket = 700 + i, email = ("brand%d@example.com"):format(i), brand = b or nil }
        end
        local all = {}
        local p = t:pipeline(function(outcomes) for _, o in ipairs(outcomes) do all[#all + 1] = o end end)
        p:process(evs, nil)
        p:finish()
        for i = 1, #evs do assert.equal("sent", all[i].status) end
        local keys, brands = {}, {}   -- each brand's client sends on its own thread
        for _, r in ipairs(server:requests()) do
          local k = tonumber(r.body:match('"ext_interaction_id":"(%d+)"')) - 700
          keys[k] = r.headers["x-api-key"]
          brands[k] = r.body:match('"brand":"([^"]*)"')
        end
        assert.same({ "key-acme", "key-beta", API_KEY, API_KEY, "key-acme", "key-beta" }, keys)
        assert.same({ "acme", "BETA-1", "plain", "plain", "acme", "BETA-1" }, brands)
      end)

      it("connections = 4: a batch's sends go out four at a time, each connection in order", function()
        local t = trigger{ connections = 4 }
        -- the first four answers wait 1 s: all four requests arrive before any answer
        server:script{ { delay = 1 }, { delay = 1 }, { delay = 1 }, { delay = 1 } }
        local all = {}
        local p = t:pipeline(function(outcomes) for _, o in ipairs(outcomes) do all[#all + 1] = o end end)
        local evs = {}
        for i = 1, 8 do evs[i] = { ticket = 900 + i, email = ("lane%d@example.com"):format(i) } end
        p:process(evs, nil)
        p:finish()
        for i = 1, 8 do assert.equal("sent", all[i].status) end
        local reqs = server:requests()
        assert.equal(8, #reqs)
        local per_conn, first, last_on = {}, reqs[1].time, {}
        for i, r in ipairs(reqs) do
          per_conn[r.connection] = (per_conn[r.connection] or 0) + 1
          if i <= 4 then assert.is_true(r.time - first < 0.9, "request " .. i .. " waited for an answer") end
          -- each connection posts its events in event order
          local n = tonumber(r.body:match('"ext_interaction_id":"(%d+)"'))
          assert.is_true((last_on[r.connection] or 0) < n)
          last_on[r.connection] = n
        end
        local conns, once = 0, {}
        for _, r in ipairs(reqs) do once[r.body] = (once[r.body] or 0) + 1 end
        for _, n in pairs(once) do assert.equal(1, n) end
        for _ in pairs(per_conn) do conns = conns + 1 end
        assert.equal(4, conns)
      end)

      it("connections = 4 and one slow answer: the other connections take the rest (a shared queue)", function()
        local t = trigger{ connections = 4 }
        server:script{ { delay = 1.5 } }   -- the first request only
        local all = {}
        local p = t:pipeline(function(outcomes) for _, o in ipairs(outcomes) do all[#all + 1] = o end end)
        local evs = {}
        for i = 1, 12 do evs[i] = { ticket = 1900 + i, email = ("slow%d@example.com"):format(i) } end
        p:process(evs, nil)
        p:finish()
        for i = 1, 12 do assert.equal("sent", all[i].status) end
        local reqs = server:requests()
        assert.equal(12, #reqs)
        local per_conn = {}
        for _, r in ipairs(reqs) do per_conn[r.connection] = (per_conn[r.connection] or 0) + 1 end
        -- round robin would have given the slow connection every fourth event (3); it posted one
        assert.equal(1, per_conn[reqs[1].connection])
      end)

      it("connections = 3 and a failure in one lane: the lanes stop, the rest goes in line, each event once", function()
        local t = trigger{ connections = 3 }
        server:script{ { status = 503 } }   -- whichever request comes first
        local all = {}
        local p = t:pipeline(function(outcomes) for _, o in ipairs(outcomes) do all[#all + 1] = o end end)
        local evs = {}
        for i = 1, 9 do evs[i] = { ticket = 950 + i, email = ("stop%d@example.com"):format(i) } end
        p:process(evs, nil)
        p:finish()
        local per = {}
        for _, r in ipairs(server:requests()) do
          local id = r.body:match('"ext_interaction_id":"([^"]+)"')
          per[id] = (per[id] or 0) + 1
        end
        local retried = 0
        for i = 1, 9 do
          assert.equal("sent", all[i].status)   -- the 503 was retried by the client (attempts = 2)
          local n = per[tostring(950 + i)]
          assert.truthy(n == 1 or n == 2)
          if n == 2 then retried = retried + 1 end
        end
        assert.equal(1, retried)
        assert.has_error(function() trigger{ connections = 0 } end,
          "stella.trigger: connections must be a whole number from 1 to 64")
      end)

      it("connections = 2: the next batch's sends start while the last of the one before is out", function()
        local t = trigger{ connections = 2 }
        server:script{ { delay = 2 } }   -- whichever request of batch 1 comes first
        local all = {}
        local p = t:pipeline(function(outcomes) for _, o in ipairs(outcomes) do all[#all + 1] = o end end)
        local evs = {}
        for i = 1, 8 do evs[i] = { ticket = 2900 + i, email = ("flow%d@example.com"):format(i) } end
        p:process({ evs[1], evs[2], evs[3], evs[4] }, nil)
        p:process({ evs[5], evs[6], evs[7], evs[8] }, nil)
        p:finish()
        for i = 1, 8 do assert.equal("sent", all[i].status) end
        local reqs = server:requests()
        assert.equal(8, #reqs)
        for i = 2, 8 do
          assert.is_true(reqs[i].time - reqs[1].time < 1.5, "request " .. i .. " waited for the slow answer")
        end
        local once = {}
        for _, r in ipairs(reqs) do
          local id = r.body:match('"ext_interaction_id":"([^"]+)"')
          assert.is_nil(once[id], "sent twice: " .. id)
          once[id] = true
        end
      end)

      it("retry (flush) with connections = 2 claims and sends the next batch while the one before is out", function()
        local store = new_store()
        local stopped = trigger{ store = store, stop = function() return true end }
        local evs = {}
        for i = 1, 70 do evs[i] = { ticket = 3900 + i, email = ("retry%d@example.com"):format(i) } end
        local p = stopped:pipeline(function() end)
        p:process(evs, nil)   -- interrupted at once: all 70 wait in the outbox
        p:finish()
        assert.equal(0, #server:requests())
        local t = trigger{ store = store, connections = 2, outbox = { batch = 10 } }   -- batches of 64
        server:script{ { delay = 2 } }
        local summary = assert(t:flush())
        assert.equal(70, summary.sent)
        local reqs = server:requests()
        assert.equal(70, #reqs)
        -- the second batch (6 items) went out on the free connection before the slow answer
        for i = 2, 70 do
          assert.is_true(reqs[i].time - reqs[1].time < 1.8, "request " .. i .. " waited for the slow answer")
        end
        if backend == "sqlite" then assert.same({ queued = 0, dead = 0 }, store:outbox_counts()) end
      end)

      it("connections = 2, failures in batches on the wire together: each batch's retries in line, each event sent once", function()
        -- attempts enough that a retry meeting one of the 503s is retried again
        local t = trigger{ connections = 2, client = { api_key = API_KEY, base_url = server.url, timeout = 5,
                           retry = { attempts = 4, base_delay = 0.001 }, sleep = function() end } }
        server:script{ {}, {}, {}, { status = 503 }, {}, { status = 503 }, {}, {}, { status = 503 } }
        local all = {}
        local p = t:pipeline(function(outcomes) for _, o in ipairs(outcomes) do all[#all + 1] = o end end)
        for b = 0, 2 do
          local evs = {}
          for i = 1, 4 do evs[i] = { ticket = 5900 + 4 * b + i, email = ("fail%d@example.com"):format(4 * b + i) } end
          p:process(evs, nil)
        end
        p:finish()
        assert.equal(12, #all)
        local per, retried = {}, 0
        for _, r in ipairs(server:requests()) do
          local id = r.body:match('"ext_interaction_id":"([^"]+)"')
          per[id] = (per[id] or 0) + 1
        end
        for i = 1, 12 do
          assert.equal("sent", all[i].status)   -- each 503 retried by the client
          local n = per[tostring(5900 + i)]
          assert.truthy(n >= 1 and n <= 4)
          retried = retried + n - 1
        end
        assert.equal(3, retried)   -- one more request per 503, none twice otherwise
        assert.equal(15, #server:requests())
        assert.is_false(t.lanes_sender:paused())   -- the lanes went on after each
      end)

      it("process_many after a pipeline on the same trigger: its in-line sends pause the lanes, which go on after", function()
        local t = trigger{ connections = 2 }
        local all = {}
        local p = t:pipeline(function(outcomes) for _, o in ipairs(outcomes) do all[#all + 1] = o end end)
        local function evs(first)
          local list = {}
          for i = first, first + 3 do list[#list + 1] = { ticket = 4900 + i, email = ("mix%d@example.com"):format(i) } end
          return list
        end
        p:process(evs(1), nil)
        for _, o in ipairs(t:process_many(evs(5))) do all[#all + 1] = o end
        p:process(evs(9), nil)
        p:finish()
        assert.equal(12, #all)
        for i = 1, 12 do assert.equal("sent", all[i].status) end
        assert.equal(12, #server:requests())
        assert.is_false(t.lanes_sender:paused())   -- not stopped by the in-line posts
      end)

      it("a client with its own transport sends in line: the same outcomes", function()
        local sent = {}
        local c = stella.new{ api_key = API_KEY, base_url = server.url,
          transport = function() return {
            post = function(_, _, body)
              sent[#sent + 1] = body
              return { status = 200, body = '{"request_id":"x' .. #sent .. '"}', content_type = "application/json" }
            end,
            close = function() end } end }
        local t = trigger{ client = c }
        local all = {}
        local p = t:pipeline(function(outcomes) for _, o in ipairs(outcomes) do all[#all + 1] = o end end)
        p:process(events(1, 3), nil)
        p:process(events(4, 3), nil)
        p:finish()
        assert.equal(6, #all)
        assert.equal(6, #sent)
        assert.equal("x6", all[6].request_id)
        c:close()
      end)

      it("a dry run decides without sending", function()
        local t = trigger{ dry_run = true }
        local all = {}
        local p = t:pipeline(function(outcomes) for _, o in ipairs(outcomes) do all[#all + 1] = o end end)
        p:process(events(1, 10), nil)
        p:finish()
        assert.equal(10, #all)
        assert.equal(0, #server:requests())
      end)

      it("raises on misuse", function()
        local t = trigger()
        assert.has_error(function() t:pipeline() end, "trigger:pipeline: function expected")
        local p = t:pipeline(function() end)
        assert.has_error(function() p:process("x") end, "pipeline:process: list of events expected")
        assert.has_error(function() p:process({ 1 }) end, "pipeline:process: event 1 is not a table")
        p:finish()
        p:finish()
      end)
    end)
  end
end)

describe("trigger:pipeline after a kill -9", function()
  local server

  lazy_setup(function() server = testserver.start() end)
  lazy_teardown(function() if server then server:stop() end end)

  -- A child feeds 12 events in batches of 4. The 6th request (the second of batch 2, sent
  -- by the background thread) is held by the server; by then batch 3 is decided (in the
  -- outbox) and batch 1 complete. The child is killed while it waits; a fresh trigger
  -- then flushes the outbox once the lease has run out.
  it("loses no event, and sends again only what was on the wire unsettled", function()
    local p = os.tmpname()
    local log = p .. ".log"
    local FIRST, COUNT, BATCH = 8001, 12, 4
    assert(store_mod.sqlite(p)):close()   -- schema in place before the child starts
    server:reset()
    server:script{ {}, {}, {}, {}, {}, { delay = 10 } }
    local proc = assert(io.popen("echo $$; exec " .. CHILD_ENV .. table.concat({ LUA, quote(CRASH), quote(p),
      quote(server.url), tostring(T0), tostring(FIRST), tostring(COUNT), tostring(BATCH), quote(log),
      quote(RULES) }, " ") .. " 2>&1", "r"))
    local pid = assert(tonumber(proc:read("*l")))
    local deadline = socket.gettime() + 20
    local seen
    repeat
      socket.sleep(0.02)
      seen = #server:requests()
    until seen >= 6 or socket.gettime() > deadline
    -- and batch 1 is complete (logged), then batch 3 decided: its 4 items and batch 2's 4
    -- are in the outbox (read through a connection of our own: WAL lets it read while the
    -- child writes)
    local watch = assert(store_mod.sqlite(p))
    repeat
      local counts = read_file(log):find("done " .. (FIRST + 3) .. " ", 1, true) and watch:outbox_counts()
      if counts and counts.queued == 8 then break end
      socket.sleep(0.02)
    until socket.gettime() > deadline
    watch:close()
    os.execute("kill -9 " .. pid)
    local child_out = proc:read("*a")
    proc:close()
    assert.equal(6, seen, child_out .. read_file(log))
    local before = server:requests()
    server:reset()

    local done = {}
    for line in read_file(log):gmatch("[^\n]+") do
      assert.is_nil(line:match("^error"), line)
      assert.is_nil(line:match("^finished"), "the child finished before the kill")
      local ticket, status = line:match("^done (%d+) (%S+)")
      if ticket then done[ticket] = status end
    end
    for t = FIRST, FIRST + 3 do assert.equal("sent", done[tostring(t)]) end   -- batch 1 complete
    for t = FIRST + 4, FIRST + COUNT - 1 do assert.is_nil(done[tostring(t)]) end

    local s = assert(store_mod.sqlite(p))
    local t = stella.trigger{ rules = RULES, store = s, clock = function() return T0 + 3600 end,
                              client = { api_key = API_KEY, base_url = server.url, retry = { attempts = 1 } } }
    local summary = assert(t:flush())
    assert.equal(COUNT - 4, summary.sent)          -- batches 2 and 3 were in the outbox
    assert.same({ queued = 0, dead = 0 }, s:outbox_counts())
    local function wire(list)
      local n = {}
      for _, r in ipairs(list) do
        local id = r.body:match('"ext_interaction_id":"([^"]*)"')
        n[id] = (n[id] or 0) + 1
      end
      return n
    end
    local b, a = wire(before), wire(server:requests())
    local sent_ledger = {}
    for _, e in ipairs(s:ledger{ limit = 1000 }) do
      if e.status == "sent" then sent_ledger[e.event_id] = (sent_ledger[e.event_id] or 0) + 1 end
    end
    for ticket = FIRST, FIRST + COUNT - 1 do
      local id = tostring(ticket)
      assert.equal(1, sent_ledger[id], "ticket " .. id .. " ledgered as sent " .. tostring(sent_ledger[id]) .. " times")
      if ticket < FIRST + 4 then
        assert.same({ 1, nil }, { b[id], a[id] })           -- sent and settled: never again
      elseif ticket < FIRST + 6 then
        assert.same({ 1, 1 }, { b[id], a[id] })              -- on the wire, unsettled: once more
      else
        assert.same({ nil, 1 }, { b[id], a[id] })            -- queued, never sent: once
      end
    end
    t:close()
    s:close()
    remove_db(p)
    os.remove(log)
  end)
end)
