-- stella.openresty.phase: whether the running code may use cosockets (and ngx.sleep):
-- inside nginx (OpenResty), in the phases whose handlers may. The client and the Redis
-- connection pick their cosocket side with it; everywhere else they block.
local rawget, type = rawget, type

local M = {}

local COSOCKET_PHASES = { rewrite = true, access = true, content = true, timer = true,
                          ssl_cert = true, ssl_session_fetch = true }

function M.cosockets()
  local ngx = rawget(_G, "ngx")
  return type(ngx) == "table" and type(ngx.get_phase) == "function"
    and COSOCKET_PHASES[ngx.get_phase()] == true
end

return M
