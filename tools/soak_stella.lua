-- The `stella` command as tools/soak.lua runs it: bin/stella's main, with the client's
-- timeout and retries shortened (a timeout costs SOAK_TIMEOUT seconds, 2 by default,
-- rather than 30) so that a soak of minutes meets many of them. Nothing else differs.
local client = require "stella.client"
local new = client.new
local timeout = tonumber(os.getenv("SOAK_TIMEOUT")) or 2
client.new = function(opts)
  if type(opts) == "table" then
    opts.timeout = opts.timeout or timeout
    opts.connect_timeout = opts.connect_timeout or timeout
    opts.retry = opts.retry or { attempts = 3, base_delay = 0.1, max_delay = 2 }
  end
  return new(opts)
end
os.exit(require("stella.cli").main(arg))
