-- stella.cli.table: aligned text tables, and the outcome counts as table rows
-- (`stella trigger`'s summary, `stella status`).
local ipairs, tostring = ipairs, tostring
local concat, sort = table.concat, table.sort
local max = math.max

local M = {}

-- Prints rows (lists of strings) with aligned columns; `right` marks right-aligned ones.
function M.print(ctx, header, rows, right)
  right = right or {}
  local widths = {}
  local function measure(row)
    for i, cell in ipairs(row) do widths[i] = max(widths[i] or 0, #tostring(cell)) end
  end
  measure(header)
  for _, row in ipairs(rows) do measure(row) end
  local function line(row)
    local cells = {}
    for i, cell in ipairs(row) do
      cell = tostring(cell)
      local pad = (" "):rep(widths[i] - #cell)
      cells[i] = right[i] and (pad .. cell) or (i < #row and cell .. pad or cell)
    end
    return (concat(cells, "  "):gsub("%s+$", ""))
  end
  ctx:say(line(header))
  for _, row in ipairs(rows) do ctx:say(line(row)) end
end

local STATUS_ORDER = { sent = 1, recorded = 2, queued = 3, skipped = 4, suppressed = 5,
                       invalid = 6, failed = 7 }

local function status_rank(status)
  return STATUS_ORDER[status] or 100
end

-- counts: list of { status, reason, count } -> rows sorted by status, then count.
function M.outcome_rows(counts)
  local list = {}
  for _, c in ipairs(counts) do list[#list + 1] = c end
  sort(list, function(a, b)
    local ra, rb = status_rank(a.status), status_rank(b.status)
    if ra ~= rb then return ra < rb end
    if a.status ~= b.status then return tostring(a.status) < tostring(b.status) end
    if a.count ~= b.count then return a.count > b.count end
    return tostring(a.reason or "") < tostring(b.reason or "")
  end)
  local rows, total = {}, 0
  for _, c in ipairs(list) do
    local reason = c.reason
    if reason == nil or reason == "" then reason = "-" end
    rows[#rows + 1] = { tostring(c.status), tostring(reason), tostring(c.count) }
    total = total + c.count
  end
  return rows, total
end

return M
