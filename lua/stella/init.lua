-- stella: customer-feedback requests for the Stella Connect Requests API.
--   stella.validate(req [, kind [, opts]]) -> true | nil, errors
--   stella.encode(req [, kind [, opts]])   -> json | nil, errors
--   stella.validate_json(text [, kind [, opts]]) -> true [, field values] | nil, errors
--   stella.encode_json(text [, kind [, opts]])   -> json | nil, errors
--   stella.decode_json(text [, opts])       -> value | nil, err (strict JSON -> Lua values)
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
-- The same checks on JSON text, parsed by the C core (no Lua tables built): repeated
-- keys are duplicate_field, {} where a list belongs (or [] where an object does) is
-- invalid_type, a syntax error is one invalid_json error. opts.fields = { "customer.email",
-- ... } makes validate_json also return the values at those dotted paths.
M.validate_json = core.validate_json
M.encode_json = core.encode_json
-- Strict JSON (RFC 8259) to Lua values through the same parser: a repeated key is an
-- error (err.code "duplicate_key", err.path), integers past +-2^53 are their exact
-- decimal strings, null is dropped unless opts.null stands for it; err = { code =
-- "syntax" | "depth" | "duplicate_key", message, line, column, offset }.
M.decode_json = core.decode_json

M.new = client.new

-- stella.trigger{...} and stella.store.* load on first use: a program that only
-- sends never loads the rules engine or the SQLite binding.
function M.trigger(opts) return require("stella.trigger").new(opts) end
M.store = setmetatable({}, { __index = function(_, k) return require("stella.store")[k] end })

return M
