-- Specs for stella.store.redis against a real redis-server (spec/support/redis.lua): the
-- store contract's suite, then what only Redis does: the Function library, key layout
-- and slots, conflicts between writers, expiry by TTL, nothing in clear.
local store = require "stella.store"
local redis = require "stella.redis"
local redis_server = require "support.redis"

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

  teardown(function()
    admin:close()
    srv:remove()
  end)
end)
