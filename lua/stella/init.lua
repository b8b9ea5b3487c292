-- stella: customer-feedback requests for the Stella Connect Requests API.
--   stella.validate(req [, kind [, opts]]) -> true | nil, errors
--   stella.encode(req [, kind [, opts]])   -> json | nil, errors
--   stella.new(opts)                        -> client (client:send, client:recover, client:close)
local core = require "stella.core"
local client = require "stella.client"
local errors = require "stella.error"

local setmetatable, require = setmetatable, require

local M = {
  version = core.version,
  _VERSION = "lua-stella " .. core.version,
  is_error = errors.is_error,
}

-- Both are the C functions themselves (no Lua wrapper on the hot path); they take
-- (req), (req, kind), (req, opts) or (req, kind, opts) with opts.channels a list or set.
M.validate = core.validate
M.encode = core.encode

M.new = client.new

-- stella.trigger{...} and stella.store.* load on first use: a program that only
-- sends never loads the rules engine or the SQLite binding.
function M.trigger(opts) return require("stella.trigger").new(opts) end
M.store = setmetatable({}, { __index = function(_, k) return require("stella.store")[k] end })

return M
