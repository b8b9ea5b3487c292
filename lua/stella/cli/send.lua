-- stella.cli.send: `stella send`, one request given as JSON (argument or standard input)
-- sent with the key the environment names; prints its request id.
local ipairs, tostring, type = ipairs, tostring, type
local input = require "stella.input"
local args = require "stella.cli.args"
local setup = require "stella.cli.setup"

local M = {}

M.help = [[
usage: stella send [--test|--production] [--channels a,b] (JSON | -)

Sends one request to POST /v1/requests. The request is a JSON object given as the
argument, or read from standard input with "-". Prints the request id.

  --test          use the test key (the default, or STELLA_MODE)
  --production    use the production key
  --channels a,b  the channels the company has enabled; others are refused before sending

On failure prints "error: KIND: message" on standard error and exits with status 1.
]] .. setup.KEYS_HELP

-- its options: "flag" or "value"
M.options = { test = "flag", production = "flag", channels = "value" }

function M.run(ctx, opts, positional)
  if opts.test and opts.production then
    return ctx:usage_error("send", "give --test or --production, not both")
  end
  if #positional ~= 1 then
    return ctx:usage_error("send", #positional == 0 and "the request is missing (JSON or -)" or "give one request")
  end
  local text = positional[1] == "-" and (ctx.stdin:read("*a") or "") or positional[1]
  local req, jerr = input.decode_json(text)
  if not req then ctx:warn("error: invalid: %s", jerr) return 1 end
  local mode = opts.test and "test" or opts.production and "production" or nil
  local channels = opts.channels and args.split_list(opts.channels) or nil
  local client, cerr, cstatus = setup.new_client(ctx, nil, mode, channels)
  if not client then ctx:warn("stella send: %s", cerr) return cstatus or 2 end
  local res, err = client:send(req)
  client:close()
  if not res then
    ctx:warn("error: %s: %s", tostring(err.kind), tostring(err.message or err))
    if err.kind == "invalid" and type(err.errors) == "table" then
      for _, e in ipairs(err.errors) do
        ctx:warn("  %s: %s (%s)", tostring(e.path), tostring(e.message), tostring(e.code))
      end
    end
    return 1
  end
  if res.request_id then ctx:say("%s", res.request_id) else ctx:say("sent (no request id returned)") end
  return 0
end

return M
