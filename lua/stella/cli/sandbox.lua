-- stella.cli.sandbox: `stella sandbox`, the local Requests API sandbox (stella.sandbox) in
-- the foreground until Ctrl-C, relaying its access log.
local pcall, tonumber, tostring = pcall, tonumber, tostring
local floor = math.floor

local M = {}

M.help = [[
usage: stella sandbox [--port N] [--config FILE] [--prefix DIR] [--quiet]

Runs a local emulation of the Requests API (nginx with its Lua module) in the foreground
until Ctrl-C. POST /v1/requests and POST /v1/recoveries are answered as the service would
answer the company described by the config file, after the same checks the client makes
(the C core); GET /status is an API status page (Invalid Requests, Test Requests,
Delivered, error rate per hour) and GET /status.json the same data. One line per request
goes to standard output.

  --port N       the 127.0.0.1 port (default 8787; 0 picks a free one)
  --config FILE  the company: its test and production keys, test e-mail, channels,
                 employees, brands, languages, suppression days, unsubscribed customers
                 (default: lua/stella/sandbox/files/config.lua, which documents every
                 setting; the path of the one in use is printed at the start)
  --prefix DIR   keep nginx's config, logs and the pid file DIR/sandbox.pid in DIR
                 (default: a temporary directory, removed on exit)
  --quiet        no line per request

Point the client or the other commands at it with the config's keys (never printed):
  STELLA_BASE_URL=http://127.0.0.1:8787 STELLA_TEST_KEY=<keys.test> stella trigger ...
Stop it with Ctrl-C, or from elsewhere with kill -TERM $(cat DIR/sandbox.pid).
Needs nginx, libnginx-mod-http-lua, luasocket and the C core built for LuaJIT
(in a checkout: make LUA=luajit; LuaRocks builds it with the rock).
]]

-- its options: "flag" or "value"
M.options = { port = "value", config = "value", prefix = "value", quiet = "flag" }

function M.run(ctx, opts, positional)
  if #positional > 0 then return ctx:usage_error("sandbox", "unexpected argument %s", positional[1]) end
  local port = 8787
  if opts.port then
    port = tonumber(opts.port)
    if not port or port ~= floor(port) or port < 0 or port > 65535 then
      return ctx:usage_error("sandbox", "--port takes a number from 0 to 65535, not %s", opts.port)
    end
  end
  local lok, sandbox = pcall(require, "stella.sandbox")
  if not lok then ctx:warn("stella sandbox: %s", tostring(sandbox)) return 1 end
  local sb, err = sandbox.start{ port = port, config = opts.config, prefix = opts.prefix,
                                 access_log = not opts.quiet }
  if not sb then ctx:warn("stella sandbox: %s", tostring(err)) return 1 end
  ctx:secret(sb.config.keys.test)
  ctx:secret(sb.config.keys.production)
  ctx:say("stella sandbox: %s on %s", sb.config.company, sb.url)
  ctx:say("  API     POST %s/v1/requests  POST %s/v1/recoveries", sb.url, sb.url)
  ctx:say("  status  %s/status  (data: %s/status.json)", sb.url, sb.url)
  ctx:say("  config  %s (its keys.test and keys.production open the API)", sb.config_file)
  ctx:say("  pid     %d in %s", sb.pid, sb.pid_file)
  ctx:say("Ctrl-C stops it.")
  ctx.stdout:flush()
  local wok, werr = pcall(sb.wait, sb, function(line)
    ctx:say("%s", line)
    ctx.stdout:flush()
  end)
  sb:stop()
  if not wok and not tostring(werr):find("interrupted", 1, true) then
    ctx:warn("stella sandbox: %s", tostring(werr))
    return 1
  end
  ctx:say("stella sandbox: stopped")
  return 0
end

return M
