-- stella.cli.events: reading the events of the input files (`stella trigger`, `stella
-- validate`), and the lines that say what was wrong with one.
local ipairs, tostring, type = ipairs, tostring, type

local input = require "stella.input"

local M = {}

-- Reads the events of each input; calls on_event(reader, line_no, event), and
-- report(message) for each malformed record. Returns the number of malformed records
-- and of unreadable inputs.
function M.each(ctx, inputs, format, on_event, report, progress)
  local malformed, unreadable = 0, 0
  for _, path in ipairs(inputs) do
    local reader, err = input.open(path, format, { stdin = ctx.stdin })
    if not reader then
      ctx:warn("stella: %s", err)
      unreadable = unreadable + 1
    else
      for line_no, event, lerr in reader:lines() do
        if event then
          on_event(reader, line_no, event)
        else
          malformed = malformed + 1
          report(lerr)
        end
        if progress then progress.update(reader) end
      end
      reader:close()
      local note = reader:warning()   -- no records at all: say so (not an error)
      if note then ctx:warn("stella: %s: %s", reader.name, note) end
    end
  end
  if progress then progress.done() end
  return malformed, unreadable
end

-- A request's validation errors, one line each: FILE:LINE: PATH: message (CODE).
function M.problem_lines(ctx, name, line_no, errors)
  for _, e in ipairs(errors) do
    ctx:say("%s:%d: %s: %s (%s)", name, line_no, tostring(e.path), tostring(e.message), tostring(e.code))
  end
end

-- What went wrong with an event, from its outcome: "KIND: message", without the kind
-- when it only repeats the status.
function M.outcome_message(outcome)
  local err = outcome.error
  if err ~= nil then
    local kind = type(err) == "table" and err.kind
    if kind == outcome.status then kind = nil end
    return (kind and (kind .. ": ") or "") .. tostring(type(err) == "table" and err.message or err)
  end
  return tostring(outcome.detail or outcome.reason or outcome.status)
end

return M
