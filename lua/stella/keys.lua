-- stella.keys: which API key, mode and host a send uses, and the clients made with them.
-- The one place that knows where keys come from:
--   the environment    STELLA_API_KEY (any mode), STELLA_TEST_KEY, STELLA_PRODUCTION_KEY,
--                      STELLA_MODE, STELLA_BASE_URL (read by the `stella` command only)
--   the rules file     api_key, keys = { test = ..., production = ... }, mode, base_url
--   a brand            brands.NAME.api_key / .keys / .mode: its own client
-- resolve() and from_environment() are the command's way (environment first, then the
-- rules file); clients() is the trigger's (the client or options it was given, then the
-- rules file), with one client per brand that has keys of its own and extra connections
-- (clones) for its background sends.
local rules_mod = require "stella.rules"

local type, pairs, ipairs, tostring, setmetatable, pcall =
      type, pairs, ipairs, tostring, setmetatable, pcall
local os_getenv, require = os.getenv, require

local M = {}

-- The environment variables that hold keys (the command redacts their values).
M.VARIABLES = { "STELLA_API_KEY", "STELLA_TEST_KEY", "STELLA_PRODUCTION_KEY" }

-- stella.client.new, loaded on first use: the command reads VARIABLES on every run, and
-- only some of its commands make a client (and so load the C core).
local function client_new()
  return require("stella.client").new
end

-- The client options a rules file may set.
local CLIENT_KEYS = { "api_key", "keys", "mode", "base_url" }

-- The rules table of compiled rules (what stella.rules.load returns), or the table itself.
local function source_of(rules)
  if rules == nil then return {} end
  if rules_mod.is_compiled(rules) then return rules.source end
  return rules
end

-- os.getenv, with an empty variable counted as unset.
local function getenv_default(name)
  local v = os_getenv(name)
  if v == "" then return nil end
  return v
end

-- The key of `mode` (nil: STELLA_MODE, else the rules file's mode, else test) from the
-- environment, else the rules file; and the host. rules: compiled rules, a rules table
-- or nil. Returns key, mode, base_url | nil, message.
function M.resolve(rules, mode, getenv)
  rules = source_of(rules)
  getenv = getenv or getenv_default
  mode = mode or getenv("STELLA_MODE") or rules.mode or "test"
  if mode ~= "test" and mode ~= "production" then
    return nil, "STELLA_MODE (or the rules file's mode) must be test or production, not " .. tostring(mode)
  end
  local var = mode == "test" and "STELLA_TEST_KEY" or "STELLA_PRODUCTION_KEY"
  local keys = type(rules.keys) == "table" and rules.keys or {}
  local key = getenv("STELLA_API_KEY") or getenv(var) or rules.api_key or keys[mode]
  if type(key) ~= "string" or key == "" then
    return nil, ("no API key for %s mode: set %s (or STELLA_API_KEY), or api_key / keys.%s in the rules file")
      :format(mode, var, mode)
  end
  local base_url = getenv("STELLA_BASE_URL") or rules.base_url
  return key, mode, base_url
end

-- A client with the key resolve() finds. opts: mode, channels, getenv. Returns the
-- client, or nil and a message (which may quote the key: redact it before showing it).
function M.from_environment(rules, opts)
  opts = opts or {}
  local key, mode, base_url = M.resolve(rules, opts.mode, opts.getenv)
  if not key then return nil, mode end
  local ok, client = pcall(client_new(), { api_key = key, mode = mode, base_url = base_url,
                                           channels = opts.channels })
  if not ok then return nil, client end
  return client
end

-- The keys a rules file carries (its own and its brands'), for redaction. rules:
-- compiled rules, a rules table or nil.
function M.of_rules(rules)
  local list = {}
  local function add(t)
    if type(t) ~= "table" then return end
    if type(t.api_key) == "string" then list[#list + 1] = t.api_key end
    if type(t.keys) == "table" then
      for _, v in pairs(t.keys) do
        if type(v) == "string" then list[#list + 1] = v end
      end
    end
  end
  local source = source_of(rules)
  add(source)
  if type(source.brands) == "table" then
    for _, brand in pairs(source.brands) do add(brand) end
  end
  return list
end

local function is_client(v)
  return type(v) == "table" and type(v.post) == "function"
end
M.is_client = is_client

local function copy(t)
  local c = {}
  for k, v in pairs(t or {}) do c[k] = v end
  return c
end

-- The clients of one trigger.
local Clients = {}
Clients.__index = Clients

-- clients(compiled, client, connections) -> the clients a trigger sends with.
--   client       a client object (it sends for every brand without keys of its own), or
--                client options (the rules file's api_key / keys / mode / base_url fill
--                in what they leave out), or nil (the rules file's alone)
--   connections  the connections a brand's background sends spread over (1 to 64)
function M.clients(compiled, client, connections)
  local self = setmetatable({
    brands = compiled.brands,
    by_brand = {},       -- brand name ("" for none) -> client
    lanes_of = {},       -- client -> the clients its background sends spread over
    connections = connections or 1,
    owned = {},          -- clients made here (and closed by close())
  }, Clients)
  if is_client(client) then
    self.default = client
  else
    local co = copy(client)
    local spec = compiled.source
    for _, k in ipairs(CLIENT_KEYS) do   -- the rules file may carry keys and host
      if co[k] == nil and not (k == "api_key" and co.keys) and not (k == "keys" and co.api_key) then
        co[k] = spec[k]
      end
    end
    self.options = co
  end
  return self
end

-- The client for a brand: the brand's own keys if it has them, else the default.
function Clients:for_brand(brand_name)
  local key = brand_name or ""
  local c = self.by_brand[key]
  if c then return c end
  local brands = self.brands
  local b = brands and brand_name and brands[brand_name]
  if b and (b.api_key or b.keys) then
    -- given a client object: the brand's client goes to that client's host, in its mode
    -- (the command's STELLA_MODE), unless the brand names its own
    local co = self.options
    if not co then
      local mode = self.default.mode
      co = { base_url = self.default.base_url,
             mode = (mode == "test" or mode == "production") and mode or nil }
    end
    co = copy(co)
    co.api_key, co.keys = b.api_key, b.keys
    if b.mode then co.mode = b.mode end
    c = client_new()(co)
    self.owned[#self.owned + 1] = c
  elseif self.default then
    c = self.default
  elseif key ~= "" then
    c = self:for_brand(nil)   -- brands without keys of their own share the default client
  else
    c = client_new()(self.options)
    self.owned[#self.owned + 1] = c
  end
  self.by_brand[key] = c
  return c
end

-- The clients a brand's background sends spread over: its client and connections - 1
-- clones of it (each its own connection). A client that cannot be cloned sends alone.
function Clients:lanes(brand_name)
  local c = self:for_brand(brand_name)
  local lanes = self.lanes_of[c]
  if lanes then return lanes end
  lanes = { c }
  if type(c.clone) == "function" then
    for j = 2, self.connections do
      lanes[j] = c:clone()
      self.owned[#self.owned + 1] = lanes[j]
    end
  end
  self.lanes_of[c] = lanes
  return lanes
end

-- Closes the clients made here (not a client object given to clients()).
function Clients:close()
  for _, c in ipairs(self.owned) do c:close() end
  self.owned, self.by_brand, self.lanes_of = {}, {}, {}
end

return M
