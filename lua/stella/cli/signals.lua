-- stella.cli.signals: the signals a command catches while it runs (SIGINT, SIGTERM,
-- SIGHUP, through stella.core.catch_signals), and the command's exit statuses.
--
--   local sig = signals.catch()
--   ... sig.caught() -> true once a signal came (a plain function: the trigger's `stop`)
--   local status = sig:status()   -- 128 + the signal's number, or nil
--   sig:release()                 -- the previous actions back
--
-- A second signal ends the process at once (the C handler gives the default back).
local pcall, setmetatable = pcall, setmetatable
local core = require "stella.core"

local M = {}

-- Every exit status of the `stella` command (README: "Exit statuses").
M.EXIT = {
  OK = 0,            -- everything done
  FAILED = 1,        -- an event failed, was invalid or malformed; or the store failed
  USAGE = 2,         -- bad usage: an unknown option, a missing --rules, a bad key
  UNREACHABLE = 3,   -- the circuit breaker opened: the API could not be reached, the rest is queued
  -- 128 + N: stopped by signal N (129 SIGHUP, 130 SIGINT, 143 SIGTERM), after settling
}

local Catcher = {}
Catcher.__index = Catcher

function Catcher:status()
  local _, number = core.caught_signal()
  return number and 128 + number or nil
end

function Catcher:release()
  if self.handle then self.handle:release() self.handle = nil end
end

-- Catches the signals until release(). When they are caught already (a command run
-- inside another's process), it catches nothing and reports none.
function M.catch()
  local ok, handle = pcall(core.catch_signals)
  local c = setmetatable({ handle = ok and handle or nil }, Catcher)
  c.caught = function() return c.handle ~= nil and core.caught_signal() ~= nil end
  c.name = function() return (core.caught_signal()) end
  return c
end

return M
