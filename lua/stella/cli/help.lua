-- stella.cli.help: `stella help [COMMAND]`, the list of commands or one command's help
-- (the context knows both: the general usage and every command's module).

local M = {}

M.help = "usage: stella help [COMMAND]\n\nShows the list of commands, or one command's help.\n"

-- its options: "flag" or "value"
M.options = {}

function M.run(ctx, _, positional)
  local name = positional[1]
  if name == nil then ctx:say("%s", ctx.usage) return 0 end
  local command = ctx.commands[name]
  if not command then return ctx:usage_error(nil, "unknown command %s", name) end
  ctx:say("%s", (command.help:gsub("\n$", "")))
  return 0
end

return M
