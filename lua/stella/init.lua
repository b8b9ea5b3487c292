-- stella: customer-feedback requests for the Stella Connect Requests API.
--   stella.validate(req [, kind [, opts]]) -> true | nil, errors
--   stella.encode(req [, kind [, opts]])   -> json | nil, errors
--   stella.new(opts)                        -> client (client:send, client:recover, client:close)
local core = require "stella.core"
local client = require "stella.client"
local errors = require "stella.error"

local type, setmetatable, require = type, setmetatable, require

local M = {
  version = core.version,
  _VERSION = "lua-stella " .. core.version,
  is_error = errors.is_error,
}

-- (req, "recovery", opts) or (req, opts)
local function args(kind, opts)
  if type(kind) == "table" then kind, opts = nil, kind end
  return kind, opts and client.channel_list(opts.channels) or nil
end

function M.validate(req, kind, opts)
  if type(req) ~= "table" then error("stella.validate: request table expected", 2) end
  local k, channels = args(kind, opts)
  return core.validate(req, k, channels)
end

local core_encode = core.encode
function M.encode(req, kind, opts)
  if type(req) ~= "table" then error("stella.encode: request table expected", 2) end
  if kind == nil and opts == nil then return core_encode(req) end   -- the common call
  local k, channels = args(kind, opts)
  return core_encode(req, k, channels)
end

M.new = client.new

-- stella.trigger{...} and stella.store.* load on first use: a program that only
-- sends never loads the rules engine or the SQLite binding.
function M.trigger(opts) return require("stella.trigger").new(opts) end
M.store = setmetatable({}, { __index = function(_, k) return require("stella.store")[k] end })

return M
