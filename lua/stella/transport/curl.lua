-- stella.transport.curl: the libcurl transport (one easy handle, one keep-alive
-- connection per client). A transport is any object with
--   :post(path, body) -> status, body, content_type, retry_after_ms
--                      | nil, failure ("timeout"|"network"|"protocol"|"tls"|"internal"), message
-- and :close(). This one is the C core's own HTTP client.
local core = require "stella.core"

local M = {}

-- opts: base_url, api_key, user_agent, ca_file, timeout, connect_timeout (seconds)
function M.new(opts)
  return core.http_new(opts)
end

return M
