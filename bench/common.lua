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

-- CPU time (ns) the processes `pids` (a list, or one pid) have used so far, from
-- /proc/PID/schedstat (exact, where the tick counts of /proc/PID/stat are 10 ms steps); a
-- process that is gone counts 0.
function M.cpu_ns(pids)
  if type(pids) ~= "table" then pids = { pids } end
  local total = 0
  for _, pid in ipairs(pids) do
    local f = io.open("/proc/" .. tostring(pid) .. "/schedstat", "rb")
    if f then
      total = total + (tonumber((f:read("*l") or ""):match("^(%d+)")) or 0)
      f:close()
    end
  end
  return total
end

-- The whole machine's CPU counters (/proc/stat, in ticks): busy (all but idle and iowait)
-- and total; the difference of two readings says how many CPUs were busy in between:
-- common.busy_cpus(a, b) (nil where /proc/stat is missing).
function M.machine_cpu()
  local f = io.open("/proc/stat", "rb")
  if not f then return nil end
  local line = f:read("*l") or ""
  f:close()
  local v = {}
  for n in line:gmatch("%d+") do v[#v + 1] = tonumber(n) end
  local total = 0
  for i = 1, math.min(#v, 8) do total = total + v[i] end   -- user nice system idle iowait irq softirq steal
  return { busy = total - (v[4] or 0) - (v[5] or 0), total = total }
end

function M.busy_cpus(a, b, cpus)
  if not a or not b or b.total <= a.total then return nil end
  return (b.busy - a.busy) / (b.total - a.total) * (cpus or M.cpus())
end

-- A wrk script posting requests to /v1/requests with `key`, each with its own customer and
-- interaction (numbered from `first`), written to a temporary file: its path (the caller
-- removes it).
function M.wrk_post_script(key, first)
  local path = os.tmpname()
  local f = assert(io.open(path, "wb"))
  f:write('wrk.method = "POST"\n', 'wrk.headers["Content-Type"] = "application/json"\n',
    'wrk.headers["X-API-Key"] = ', fmt("%q", key), "\n",
    "local n = ", tostring(first or 20000000), "\n",
    "request = function() n = n + 1; return wrk.format(nil, '/v1/requests', nil, ",
    "'{\"customer\":{\"name\":\"Customer ' .. n .. '\",\"email\":\"c' .. n .. '@example.com\"},",
    "\"employee\":{\"email\":\"paulagent@blancapeak.com\"},\"channel\":\"phone\",\"ext_interaction_id\":\"' .. n .. '\"}') end\n")
  f:close()
  return path
end

-- Requests per second of `wrk -t1 -cC -dSECONDS -s script url`; raises when wrk fails.
function M.wrk_rate(c, seconds, script, url)
  local out = M.run(fmt("timeout %d wrk -t1 -c%d -d%ds -s %s %s", seconds + 15, c, math.max(1, seconds),
    script, url))
  local rate = tonumber(out:match("Requests/sec:%s*([%d.]+)"))
  if not rate then error("wrk failed:\n" .. out, 0) end
  return rate
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
