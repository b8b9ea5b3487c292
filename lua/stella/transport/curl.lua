-- stella.transport.curl: the libcurl transport (one easy handle, one keep-alive
-- connection per client). A transport is any object with
--   :post(path, body) -> one response: an answer
--                          { status = 200, body = "...", content_type = "..." or nil,
--                            retry_after = milliseconds or nil }
--                        or a failure (no answer)
--                          { failure = "timeout"|"network"|"protocol"|"tls"|"internal",
--                            message = "..." }
-- and :close(). The client classifies either through the C core's outcome table
-- (stella.core.outcomes). This one is the C core's own HTTP client.
local core = require "stella.core"

local M = {}

-- opts: base_url, api_key, user_agent, ca_file, timeout, connect_timeout (seconds)
function M.new(opts)
  return core.http_new(opts)
end

return M
