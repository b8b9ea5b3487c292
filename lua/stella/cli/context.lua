-- stella.cli.context: what a command writes with, and where. A context holds the
-- command's streams, environment and clock (injectable, for tests) and every API key it
-- knows of; all output goes through it, and each key is replaced by "[redacted]".
--
--   local ctx = context.new(env, commands, usage)
--   ctx:secret(key)                  -- one more key never to print
--   ctx:say(fmt, ...)  ctx:warn(fmt, ...)           -- a line on stdout / stderr
--   return ctx:usage_error(command, fmt, ...)      -- bad usage: message, usage line, 2
--
-- env is cli.main's: { getenv, stdout, stderr, stdin, isatty, time }, each optional.
-- commands maps a command's name to its module (for its usage line); usage is the
-- general usage text.
local ipairs, pcall, select, setmetatable, tostring, type =
      ipairs, pcall, select, setmetatable, tostring, type

local errors = require "stella.error"

local M = {}

-- the environment variables that hold keys: redacted from the start
local KEY_VARIABLES = require("stella.keys").VARIABLES

local Ctx = {}
Ctx.__index = Ctx

function Ctx:secret(value)
  if type(value) == "string" and #value >= 4 then self.secrets[#self.secrets + 1] = value end
end

function Ctx:redact(text)
  text = tostring(text)
  for _, s in ipairs(self.secrets) do text = errors.redact(text, s) end
  return text
end

function Ctx:write(stream, text)
  stream:write(self:redact(text))
end

-- a line on stdout
function Ctx:say(fmt, ...)
  local text = select("#", ...) > 0 and fmt:format(...) or fmt
  self:write(self.stdout, text .. "\n")
end

-- a line on stderr (clearing the progress bar first)
function Ctx:warn(fmt, ...)
  local text = select("#", ...) > 0 and fmt:format(...) or fmt
  if self.bar_shown then self.stderr:write("\r\27[K"); self.bar_shown = false end
  self:write(self.stderr, text .. "\n")
end

-- bad usage: the message and the command's usage line(s), status 2
function Ctx:usage_error(command, fmt, ...)
  self:warn("stella%s: " .. fmt, command and (" " .. command) or "", ...)
  local help = command and self.commands[command] and self.commands[command].help
  local usage = help and help:match("^(usage:.-)\n\n") or self.usage:match("^(usage:[^\n]*)")
  self:warn(usage)
  self:warn("Run `stella %s--help` for more.", command and (command .. " ") or "")
  return 2
end

local function default_isatty()
  local ok, a, _, c = pcall(os.execute, "test -t 2")
  if not ok then return false end
  return a == true or a == 0 or (a == nil and c == 0)
end

function M.new(env, commands, usage)
  env = env or {}
  local getenv = env.getenv or os.getenv
  local ctx = setmetatable({
    -- an empty variable counts as unset
    getenv = function(name)
      local v = getenv(name)
      if v == "" then return nil end
      return v
    end,
    stdout = env.stdout or io.stdout,
    stderr = env.stderr or io.stderr,
    stdin = env.stdin or io.stdin,
    isatty = env.isatty or default_isatty,
    time = env.time or os.time,
    secrets = {},
    commands = commands,
    usage = usage,
  }, Ctx)
  for _, name in ipairs(KEY_VARIABLES) do ctx:secret(ctx.getenv(name)) end
  return ctx
end

return M
