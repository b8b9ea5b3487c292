-- Specs for stella.store.redis against a real redis-server (spec/support/redis.lua): the
-- store contract's suite, then what only Redis does: the Function library, key layout
-- and slots, conflicts between writers, expiry by TTL, nothing in clear.
local store = require "stella.store"
local redis = require "stella.redis"
local redis_server = require "support.redis"
local lib = require "stella.store.redis_lib"
local socket = require "socket"
local bit = rawget(_G, "bit")   -- LuaJIT's; Lua 5.4 has operators (loaded from a string)

-- CRC16-CCITT (XMODEM), the hash of Redis Cluster's key slots.
local crc16
if bit then
  crc16 = function(s)
    local crc = 0
    for i = 1, #s do
      crc = bit.bxor(crc, bit.lshift(s:byte(i), 8))
      for _ = 1, 8 do
        if bit.band(crc, 0x8000) ~= 0 then crc = bit.band(bit.bxor(bit.lshift(crc, 1), 0x1021), 0xffff)
        else crc = bit.band(bit.lshift(crc, 1), 0xffff) end
      end
    end
    return crc
  end
else
  crc16 = assert(load([[
    return function(s)
      local crc = 0
      for i = 1, #s do
        crc = crc ~ (s:byte(i) << 8)
        for _ = 1, 8 do
          if crc & 0x8000 ~= 0 then crc = ((crc << 1) ~ 0x1021) & 0xffff else crc = (crc << 1) & 0xffff end
        end
      end
      return crc
    end]]))()
end

-- The cluster slot of a key: of its {hash tag} when it has one.
local function slot(key)
  local open = key:find("{", 1, true)
  if open then
    local close = key:find("}", open + 1, true)
    if close and close > open + 1 then key = key:sub(open + 1, close - 1) end
  end
  return crc16(key) % 16384
end

-- MONITOR's line as a list: the command and its arguments (sdscatrepr's escapes undone).
local UNESCAPE = { n = "\n", r = "\r", t = "\t", a = "\a", b = "\b", ['"'] = '"', ["\\"] = "\\" }
local function monitor_args(line)
  local args = {}
  local body = line:match("^%+[%d.]+ %[[^%]]*%] (.*)$")
  if not body then return nil end
  local i = 1
  while i <= #body do
    if body:sub(i, i) == '"' then
      local parts = {}
      i = i + 1
      while body:sub(i, i) ~= '"' do
        local c = body:sub(i, i)
        if c == "\\" then
          local e = body:sub(i + 1, i + 1)
          if e == "x" then
            parts[#parts + 1] = string.char(tonumber(body:sub(i + 2, i + 3), 16))
            i = i + 4
          else
            parts[#parts + 1] = UNESCAPE[e] or e
            i = i + 2
          end
        else
          parts[#parts + 1] = c
          i = i + 1
        end
      end
      args[#args + 1] = table.concat(parts)
    end
    i = i + 1
  end
  return args
end

describe("stella.store.redis", function()
  local srv = redis_server.start{}
  local admin = assert(redis.connect(srv:url()))
  local n = 0

  describe("contract", function()
    local contract = require "support.store_contract"
    -- marks expire on Redis' clock: "now" a day ahead keeps the suite's marks alive
    local B = { describe = describe, it = it, before_each = before_each, after_each = after_each,
                assert = assert, now = os.time() + 86400 }
    contract(B, "redis", function()   -- a new prefix: a store sharing nothing
      n = n + 1
      return store.redis{ url = srv:url(), prefix = "c" .. n .. ":" }
    end)
  end)

  describe("on Redis", function()
    local now = os.time()

    it("loads its Function library once, versioned, and again when the server lost it", function()
      local s = assert(store.redis{ url = srv:url(), prefix = "lib:" })
      assert.equal(lib.version, admin:call("FCALL_RO", "stella_version", 0))
      assert.same({ true, "current" }, { s.backend.conn:load_library(lib.name, lib.code, lib.version) })
      assert.equal("OK", admin:call("FUNCTION", "FLUSH"))
      assert.is_true(s:put_mark("k", now + 60))   -- reloaded on the way
      assert.equal(now + 60, (s:get_mark("k", now)))
      assert.equal(lib.version, admin:call("FCALL_RO", "stella_version", 0))
      s:close()
    end)

    it("refuses a transaction whose reads another writer changed, writing nothing of it", function()
      local a = assert(store.redis{ url = srv:url(), prefix = "occ:" })
      local b = assert(store.redis{ url = srv:url(), prefix = "occ:" })
      -- a mark read, then taken by another writer before the commit
      local ok, err = a:atomic(function()
        assert.is_nil(a:get_mark("suppress|brand|h1", now))
        assert.is_true(b:put_mark("suppress|brand|h1", now + 10, "other"))
        a:enqueue{ kind = "request", body = "{}", created_at = now }
        return a:put_mark("suppress|brand|h1", now + 20, 1)
      end)
      assert.is_nil(ok)
      assert.is_true(err.retryable)
      assert.is_true(err.conflict)
      assert.matches("CONFLICT", tostring(err))
      local until_, owner = a:get_mark("suppress|brand|h1", now)
      assert.equal(now + 10, until_)
      assert.equal("other", owner)
      assert.same({ queued = 0, dead = 0 }, a:outbox_counts())
      -- an unsubscribe in between
      ok, err = a:atomic(function()
        assert.equal(0, a:unsubscribed_count())
        b:unsubscribe("hash-1", now)
        return a:put_mark("x", now + 5)
      end)
      assert.is_nil(ok)
      assert.is_true(err.conflict)
      assert.is_nil(a:get_mark("x", now))
      -- an item claimed by another process in between
      local id = a:enqueue{ kind = "request", body = "{}", created_at = now }
      ok, err = a:atomic(function()
        assert.equal(1, #a:claim(now, 60, 10))
        assert.equal(1, #b:claim(now, 30, 10))
        return true
      end)
      assert.is_nil(ok)
      assert.is_true(err.conflict)
      assert.equal(now + 30, a:outbox("queued")[1].next_at)
      -- unchanged reads commit
      assert.is_true(a:atomic(function()
        assert.is_nil(a:get_mark("y", now))
        a:finish(id)
        return a:put_mark("y", now + 5)
      end))
      assert.equal(now + 5, (a:get_mark("y", now)))
      a:close()
      b:close()
    end)

    it("expires marks by TTL at their until, and their reservations with them", function()
      local s = assert(store.redis{ url = srv:url(), prefix = "ttl:" })
      s:put_mark("k", now + 100.25, 7)
      s:put_mark("k2", now + 50, 7)
      assert.equal(math.ceil((now + 100.25) * 1000), admin:call("PEXPIRETIME", "ttl:{main}:m:k"))
      assert.equal((now + 50) * 1000, admin:call("PEXPIRETIME", "ttl:{main}:m:k2"))
      assert.equal(math.ceil((now + 100.25) * 1000), admin:call("PEXPIRETIME", "ttl:{main}:r:i7"))
      -- a confirmed mark keeps its TTL
      assert.equal(2, s:confirm_marks(7))
      assert.equal((now + 50) * 1000, admin:call("PEXPIRETIME", "ttl:{main}:m:k2"))
      assert.equal(0, admin:call("EXISTS", "ttl:{main}:r:i7"))
      s:close()
    end)

    it("touches keys of one slot in every call, all under its prefix and tag", function()
      -- every command the server runs, scripts' included, seen by MONITOR
      local mon = socket.tcp()
      mon:settimeout(5)
      assert(mon:connect("127.0.0.1", srv.port))
      mon:send("MONITOR\r\n")
      assert.equal("+OK", mon:receive("*l"))
      local s = assert(store.redis{ url = srv:url(), prefix = "slot:", tag = "tenant-7" })
      s:atomic(function()
        s:get_marks({ "a", "b" }, now)
        s:is_unsubscribed("h")
        local ids = s:enqueue_many{ { kind = "request", body = "{}", created_at = now } }
        s:put_mark_many{ { key = "a", ["until"] = now + 10, outbox_id = ids[1] } }
      end)
      s:unsubscribe("h", now)
      s:resubscribe("h")
      local items = s:claim(now + 400, 60, 10)
      s:atomic(function()
        s:confirm_marks_many{ items[1].id }
        s:finish_many{ items[1].id }
        s:record_many{ { time = now, status = "sent" } }
      end)
      local id = s:enqueue{ kind = "request", body = "{}", created_at = now }
      s:reschedule(id, now, 1, "x")
      s:kill(id, "y", now)
      s:release_marks(3)
      s:purge_marks(now + 20)
      s:outbox("queued")
      s:outbox("dead")
      s:outbox_counts()
      s:counts{ since = now - 10 }
      s:rate{ since = 0 }
      s:ledger()
      s:set_meta("last_alert", "1")
      s:get_meta("last_alert")
      s:close()
      admin:call("SET", "slot-end", "1")   -- the last line to read
      local want = slot("slot:{tenant-7}:")
      assert.equal(crc16("tenant-7") % 16384, want)
      local commands, keys = 0, 0
      while true do
        local line = assert(mon:receive("*l"))
        local args = monitor_args(line)
        if args and args[1] == "SET" and args[2] == "slot-end" then break end
        if args and line:find("slot:", 1, true) then
          commands = commands + 1
          local got = admin:call("COMMAND", "GETKEYS", (table.unpack or unpack)(args))
          if type(got) == "table" then
            for _, key in ipairs(got) do
              keys = keys + 1
              assert.equal("slot:{tenant-7}:", key:sub(1, 16), key)
              assert.equal(want, slot(key), key)
            end
          end
        end
      end
      mon:close()
      assert.is_true(commands > 40, "saw " .. commands .. " commands")
      assert.is_true(keys > commands, "saw " .. keys .. " keys")
    end)
  end)

  teardown(function()
    admin:close()
    srv:remove()
  end)
end)
