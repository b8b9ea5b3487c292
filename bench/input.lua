-- bench/input.lua: lines per second of stella.input's JSON Lines reader
-- (input.open(path):lines(), the C core's strict parser building the tables) over a
-- 100,000-line file, against io.lines + lua-cjson's decode of the same file (the
-- parser the reader used before), measured in the same run. Prints the measurements
-- and one ratio line; fails only on a crash or when the two disagree on the count.
--
-- From the repository root:
--   LUA_PATH="./lua/?.lua;./lua/?/init.lua;;" LUA_CPATH="./build/5.4/?.so;;" lua5.4 bench/input.lua
-- Environment: BENCH_LINES (default 100000), BENCH_REPEATS (best of, default 3).
local input = require "stella.input"
local cjson = require "cjson.safe"

local clock, fmt = os.clock, string.format
local LINES = tonumber(os.getenv("BENCH_LINES")) or 100000
local REPEATS = tonumber(os.getenv("BENCH_REPEATS")) or 3
local interp = (jit and jit.version or _VERSION)

-- the example export's lines, each with a fresh id
local examples = {}
for line in io.lines("examples/interactions.jsonl") do
  if line:match('^{"id": %d+,') and cjson.decode(line) then examples[#examples + 1] = line end
end
local path = os.tmpname()
do
  local f = assert(io.open(path, "wb"))
  local buf = {}
  for i = 1, LINES do
    buf[#buf + 1] = (examples[(i - 1) % #examples + 1]:gsub('^{"id": %d+', '{"id": ' .. (100000 + i)))
    if #buf == 1000 then f:write(table.concat(buf, "\n"), "\n") buf = {} end
  end
  if #buf > 0 then f:write(table.concat(buf, "\n"), "\n") end
  f:close()
end
local size = assert(io.open(path, "rb")):seek("end")

local function best(fn)
  local t, n = math.huge, nil
  for _ = 1, REPEATS do
    collectgarbage() collectgarbage()
    local t0 = clock()
    n = fn()
    t = math.min(t, clock() - t0)
  end
  return t, n
end

local t_reader, n_reader = best(function()
  local n = 0
  for _, event in assert(input.open(path)):lines() do if event then n = n + 1 end end
  return n
end)
local t_cjson, n_cjson = best(function()
  local n = 0
  for line in io.lines(path) do if cjson.decode(line) then n = n + 1 end end
  return n
end)
os.remove(path)
if n_reader ~= LINES or n_cjson ~= LINES then
  io.stderr:write(fmt("bench/input: counts differ: reader %d, cjson %d, lines %d\n", n_reader, n_cjson, LINES))
  os.exit(1)
end
print(fmt("%s, %d lines (%.1f MB)", interp, LINES, size / 1e6))
print(fmt("  input.open():lines()       %9.0f lines/s", LINES / t_reader))
print(fmt("  io.lines + cjson.decode    %9.0f lines/s", LINES / t_cjson))
print(fmt("ratio: the reader reads at %.2fx the speed of io.lines + cjson.decode", t_cjson / t_reader))
