-- capture.lua - a busted helper (tools/fuzz-corpus) that records the inputs the specs
-- give the C core, as seeds for the fuzzers: JSON text (validate_json, encode_json,
-- decode_json), client options (http_new: "BASE_URL\0API_KEY") and Retry-After values.
-- Each input becomes a file named by its SHA-256 in $STELLA_FUZZ_SEEDS/{json,url_key,retry_after}/.
local core = require "stella.core"

local dir = assert(os.getenv("STELLA_FUZZ_SEEDS"), "capture.lua: set STELLA_FUZZ_SEEDS")

local function record(set, data)
  if type(data) ~= "string" or #data > 4096 then return end
  local f = io.open(dir .. "/" .. set .. "/" .. core.sha256(data), "wb")
  if f then f:write(data); f:close() end
end

local function wrap(name, set, input)
  local f = core[name]
  core[name] = function(...)
    record(set, input(...))
    return f(...)
  end
end

local function first(x) return x end
wrap("validate_json", "json", first)
wrap("encode_json", "json", first)
wrap("decode_json", "json", first)
wrap("parse_retry_after", "retry_after", first)
wrap("http_new", "url_key", function(o)
  if type(o) ~= "table" or type(o.api_key) ~= "string" then return nil end
  return type(o.base_url) == "string" and o.base_url .. "\0" .. o.api_key or o.api_key
end)
