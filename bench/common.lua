-- bench/common.lua: what the benchmarks share: the load average, medians, and pinning
-- processes to CPUs (taskset from util-linux) so that a run says where client and server ran.
local M = {}

local fmt = string.format

-- "0.52 0.61 0.70" (1, 5 and 15 minutes), or "?" where /proc/loadavg is missing.
function M.loadavg()
  local f = io.open("/proc/loadavg", "rb")
  if not f then return "?" end
  local line = f:read("*l") or ""
  f:close()
  return line:match("^(%S+ %S+ %S+)") or "?"
end

-- The median of a list of numbers (the mean of the middle two for an even count).
function M.median(list)
  local t = {}
  for i, v in ipairs(list) do t[i] = v end
  table.sort(t)
  local n = #t
  if n == 0 then return nil end
  if n % 2 == 1 then return t[(n + 1) / 2] end
  return (t[n / 2] + t[n / 2 + 1]) / 2
end

function M.run(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("*a")
  p:close()
  return out
end

-- The id of this process (the interpreter running the benchmark).
function M.pid()
  local f = io.open("/proc/self/stat", "rb")
  if not f then return nil end
  local pid = f:read("*l"):match("^(%d+)")
  f:close()
  return pid
end

-- Pins this process (and so what it starts from now on) to `cpu`; true when it worked.
-- nil or "" leaves it where it is.
function M.pin(cpu)
  if cpu == nil or cpu == "" then return false end
  local pid = M.pid()
  if not pid then return false end
  local out = M.run(fmt("taskset -pc %s %s", tostring(cpu), pid))
  return out:match("new affinity list") ~= nil
end

-- CPUs this machine has (nproc), at least 1.
function M.cpus()
  return tonumber(M.run("nproc"):match("%d+")) or 1
end

-- A placement from the environment: BENCH_CLIENT_CPU and BENCH_SERVER_CPU (set by
-- tools/run-bench); returns client, server and a description.
function M.placement()
  local c, s = os.getenv("BENCH_CLIENT_CPU"), os.getenv("BENCH_SERVER_CPU")
  if c == "" then c = nil end
  if s == "" then s = nil end
  local what
  if c and s then
    what = c == s and fmt("client and server on CPU %s", c) or fmt("client on CPU %s, server on CPU %s", c, s)
  else
    what = "unpinned"
  end
  return c, s, what
end

return M
