-- stella.cli.unsubscribe: `stella unsubscribe`, e-mail addresses that get no more
-- requests (the store keeps a salted hash of each).
local error, ipairs, pcall, tostring = error, ipairs, pcall, tostring
local setup = require "stella.cli.setup"

local M = {}

M.help = [[
usage: stella unsubscribe [--db FILE|URL] EMAIL...

Stops all further requests to each EMAIL. The store keeps a salted hash of the address,
not the address itself.

  --db FILE|URL  the store (default $STELLA_DB, else stella.db; redis://... a Redis store)
]]

-- its options: "flag" or "value"
M.options = { db = "value" }

function M.run(ctx, opts, emails)
  if #emails == 0 then return ctx:usage_error("unsubscribe", "give at least one e-mail address") end
  for _, e in ipairs(emails) do
    if not e:match("^[^@%s]+@[^@%s]+$") then
      return ctx:usage_error("unsubscribe", "not an e-mail address: %s", e)
    end
  end
  local store, serr = setup.open_store(setup.db(ctx, opts))
  if not store then ctx:warn("stella unsubscribe: %s", serr) return 1 end
  local now = ctx.time()
  local ok, err = pcall(function()
    for _, e in ipairs(emails) do
      local done, uerr = store:unsubscribe(store:hash_email(e), now)
      if done == nil and uerr ~= nil then error(uerr, 0) end
    end
  end)
  store:close()
  if not ok then ctx:warn("stella unsubscribe: %s", tostring(err)) return 1 end
  ctx:say("unsubscribed %d address%s", #emails, #emails == 1 and "" or "es")
  return 0
end

return M
