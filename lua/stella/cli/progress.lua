-- stella.cli.progress: the progress bar of `stella trigger` on standard error, drawn only
-- when that is a terminal: the input's name, how far through it (when its size is
-- known) and the events read. ctx:warn clears it before a line.
local floor = math.floor

local M = {}

-- ctx -> progress | nil (not a terminal); progress.update(reader) after each record,
-- progress.done() at the end.
function M.new(ctx)
  if not ctx.isatty() then return nil end
  local p = { events = 0, last_events = -1, last_time = 0, last_pct = -1 }
  -- one more event read: redraws when the percentage or the second changed, or every 50
  function p.update(reader)
    p.events = p.events + 1
    local now = os.time()
    local pos, size = reader:progress()
    local pct = (pos and size and size > 0) and floor(pos * 100 / size) or nil
    if p.events - p.last_events < 50 and now == p.last_time and pct == p.last_pct then return end
    p.last_events, p.last_time, p.last_pct = p.events, now, pct
    local text
    if pct then
      local width = 30
      local filled = floor(width * pct / 100)
      text = ("%s [%s%s] %3d%%  %d events"):format(reader.name, ("#"):rep(filled),
        ("."):rep(width - filled), pct, p.events)
    else
      text = ("%s  %d events"):format(reader.name, p.events)
    end
    ctx.stderr:write("\r" .. ctx:redact(text) .. "\27[K")
    ctx.bar_shown = true
  end
  function p.done()
    if ctx.bar_shown then ctx.stderr:write("\r\27[K"); ctx.bar_shown = false end
  end
  return p
end

return M
