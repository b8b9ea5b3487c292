-- Specs for stella.keys: where a send's key, mode and host come from (the environment,
-- the rules file, a brand), and the clients a trigger sends with. No request is sent:
-- the clients point at a closed loopback port.
local keys = require "stella.keys"
local rules_mod = require "stella.rules"

local CLOSED = "http://127.0.0.1:9"

-- A getenv over a table (an empty value counts as unset, as the command's does).
local function env_of(t)
  return function(name)
    local v = t[name]
    if v == "" then return nil end
    return v
  end
end

describe("stella.keys.resolve", function()
  it("takes the mode's key from the environment before the rules file", function()
    local rules = { keys = { test = "rules-test-key", production = "rules-prod-key" } }
    local key, mode = keys.resolve(rules, nil, env_of{ STELLA_TEST_KEY = "env-test-key" })
    assert.equal("env-test-key", key)
    assert.equal("test", mode)
    key, mode = keys.resolve(rules, "production", env_of{ STELLA_TEST_KEY = "env-test-key" })
    assert.equal("rules-prod-key", key)
    assert.equal("production", mode)
  end)

  it("prefers STELLA_API_KEY to the mode's variable, and api_key to keys", function()
    local key = keys.resolve({}, "test", env_of{ STELLA_API_KEY = "any-mode", STELLA_TEST_KEY = "test-only" })
    assert.equal("any-mode", key)
    key = keys.resolve({ api_key = "one-key", keys = { test = "k" } }, "test", env_of{})
    assert.equal("one-key", key)
  end)

  it("reads the mode from STELLA_MODE, then the rules file, then test", function()
    local rules = { mode = "production", keys = { test = "t-key", production = "p-key" } }
    assert.equal("production", select(2, keys.resolve(rules, nil, env_of{})))
    assert.equal("test", select(2, keys.resolve(rules, nil, env_of{ STELLA_MODE = "test" })))
    assert.equal("test", select(2, keys.resolve({ api_key = "k-123" }, nil, env_of{})))
  end)

  it("reads the host from STELLA_BASE_URL, then the rules file", function()
    local rules = { api_key = "k-123", base_url = "http://127.0.0.1:1" }
    assert.equal("http://127.0.0.1:1", select(3, keys.resolve(rules, nil, env_of{})))
    assert.equal(CLOSED, select(3, keys.resolve(rules, nil, env_of{ STELLA_BASE_URL = CLOSED })))
    assert.is_nil(select(3, keys.resolve({ api_key = "k-123" }, nil, env_of{})))
  end)

  it("says which variable or field is missing, and rejects an unknown mode", function()
    local key, err = keys.resolve(nil, "production", env_of{ STELLA_TEST_KEY = "t-key" })
    assert.is_nil(key)
    assert.equal("no API key for production mode: set STELLA_PRODUCTION_KEY (or STELLA_API_KEY), "
                 .. "or api_key / keys.production in the rules file", err)
    key, err = keys.resolve({ api_key = "k-123" }, nil, env_of{ STELLA_MODE = "staging" })
    assert.is_nil(key)
    assert.equal("STELLA_MODE (or the rules file's mode) must be test or production, not staging", err)
  end)

  it("takes compiled rules as well as a rules table", function()
    local compiled = rules_mod.load{ keys = { test = "compiled-test-key" } }
    assert.equal("compiled-test-key", keys.resolve(compiled, nil, env_of{}))
  end)
end)

describe("stella.keys.from_environment", function()
  it("makes a client with the resolved key, mode and host", function()
    local c = assert(keys.from_environment({ base_url = CLOSED },
      { mode = "production", getenv = env_of{ STELLA_PRODUCTION_KEY = "prod-key-1234" } }))
    assert.equal("production", c.mode)
    assert.equal(CLOSED, c.base_url)
    assert.equal("...1234", c.key_hint)
    c:close()
  end)

  it("returns nil and a message when no key is found or the client refuses its options", function()
    local c, err = keys.from_environment(nil, { getenv = env_of{} })
    assert.is_nil(c)
    assert.matches("no API key for test mode", err, 1, true)
    c, err = keys.from_environment({ api_key = "k-123", base_url = "ftp://nowhere" }, { getenv = env_of{} })
    assert.is_nil(c)
    assert.matches("^stella.new: ", err)
  end)
end)

describe("stella.keys.of_rules", function()
  it("lists the rules file's keys and its brands'", function()
    local compiled = rules_mod.load{
      api_key = "top-key", keys = { test = "top-test" },
      brands = { a = { keys = { production = "brand-a-prod" } }, b = {} },
    }
    local list = keys.of_rules(compiled)
    table.sort(list)
    assert.same({ "brand-a-prod", "top-key", "top-test" }, list)
    assert.same({}, keys.of_rules(nil))
  end)
end)

describe("stella.keys.clients", function()
  local RULES = { brands = { a = {}, k = { keys = { test = "brand-k-test", production = "brand-k-prod" },
                                          mode = "production" } },
                  default_brand = "a" }

  it("fills client options in from the rules file, and gives a keyed brand its own client", function()
    local compiled = rules_mod.load{ api_key = "rules-key", base_url = CLOSED, brands = RULES.brands }
    local set = keys.clients(compiled, { retry = { attempts = 1 } })
    local d = set:for_brand(nil)
    assert.equal(CLOSED, d.base_url)
    assert.equal(d, set:for_brand("a"))
    local k = set:for_brand("k")
    assert.are_not.equal(d, k)
    assert.equal("production", k.mode)
    assert.equal(CLOSED, k.base_url)
    set:close()
  end)

  it("gives a brand's background sends `connections` lanes: its client and clones of it", function()
    local set = keys.clients(rules_mod.load(RULES), { api_key = "default-key", base_url = CLOSED }, 3)
    local lanes = set:lanes("a")
    assert.equal(3, #lanes)
    assert.equal(set:for_brand("a"), lanes[1])
    assert.are_not.equal(lanes[1], lanes[2])
    assert.equal(lanes, set:lanes(nil))   -- the same client, the same lanes
    set:close()
    assert.is_nil(lanes[2].transport)   -- closed with the set
  end)

  it("sends for every brand without keys with a client object it was given, and does not close it", function()
    local given = { post = function() end, base_url = CLOSED }
    local set = keys.clients(rules_mod.load(RULES), given, 2)
    assert.equal(given, set:for_brand("a"))
    assert.same({ given }, set:lanes("a"))   -- no clone method: it sends alone
    assert.equal(CLOSED, set:for_brand("k").base_url)   -- a keyed brand goes to its host
    set:close()
  end)

  it("gives a keyed brand without a mode of its own the mode of the client it was given", function()
    local given = require("stella.client").new{ keys = { test = "given-test", production = "given-prod" },
                                                mode = "production", base_url = CLOSED }
    local rules = rules_mod.load{ brands = { k = { keys = { test = "k-test-1111", production = "k-prod-2222" } },
                                             t = { keys = { test = "t-test-3333", production = "t-prod-4444" },
                                                   mode = "test" } } }
    local set = keys.clients(rules, given)
    assert.equal("production", set:for_brand("k").mode)
    assert.equal("...2222", set:for_brand("k").key_hint)
    assert.equal("...3333", set:for_brand("t").key_hint)   -- the brand's own mode wins
    set:close()
    given:close()
  end)
end)
