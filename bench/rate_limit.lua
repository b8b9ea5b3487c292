-- bench/rate_limit.lua: the fleet's rate limit (stella.rate_limit) held by three `stella
-- worker` processes on one Redis: rules with rate_limit = { per_second = 50 }, a queue
-- holding more events than 50/s can send in the run, the capture server
-- (spec/support/testserver.lua) noting each request's arrival time. Prints the requests
-- that arrived in a 10 s window (starting 1 s after the first) as a rate and as a share
-- of 50/s (goal: 0.95 to 1.05), how many each worker sent, and the most that arrived in
-- any 1 s and 100 ms (50 and 5 at an even pace).
-- Environment: BENCH_RATE (50), BENCH_RATE_SECONDS (10), BENCH_RATE_WORKERS (3),
-- BENCH_RATE_CONNECTIONS (each worker's --connections, 1).
local redis_server = require "support.redis"
local testserver = require "support.testserver"
local child = require "support.child"
local common = require "bench.common"
local nginx = require "stella.nginx"
local queue = require "stella.queue"
local cjson = require "cjson"

local fmt = string.format
local RATE = tonumber(os.getenv("BENCH_RATE") or "50")
local SECONDS = tonumber(os.getenv("BENCH_RATE_SECONDS") or "10")
local WORKERS = tonumber(os.getenv("BENCH_RATE_WORKERS") or "3")
local CONNECTIONS = tonumber(os.getenv("BENCH_RATE_CONNECTIONS") or "1")
local LUA = "lua5.4"

print(fmt("rate_limit: %d workers (--connections %d), limit %g/s, a %g s window; load average %s", WORKERS,
          CONNECTIONS, RATE, SECONDS, common.loadavg()))

local server = testserver.start()
local srv = redis_server.start{}
local dir = assert(nginx.temp_dir("stella-bench-rate"))
local url = srv:url{}
local rules = dir .. "/rules.lua"
assert(nginx.write_file(rules, fmt("return { once_per_interaction = true, rate_limit = { per_second = %g } }", RATE)))

-- more events than the run can send, so that the workers always have some in hand
local total = math.ceil(RATE * (SECONDS + 4) * 1.5)
local q = assert(queue.open(url))
for i = 1, total do
  assert(q:submit{ customer = { name = "Cust " .. i, email = ("c%d@example.com"):format(i) },
                   employee = { email = "a@b.com" }, channel = "phone", ext_interaction_id = tostring(i) })
end

local env = { STELLA_TEST_KEY = "tk_bench_rate_limit", STELLA_BASE_URL = server.url }
local pids = {}
for w = 1, WORKERS do
  local cmd = child.stella_command(LUA, { "worker", "--rules", rules, "--db", url, "--name", "w" .. w, "-q",
                                           "--connections", tostring(CONNECTIONS) }, env)
  local p = assert(io.popen("sh -c " .. nginx.shell_quote("echo $$; exec " .. cmd .. " >/dev/null 2>&1")))
  pids[w] = { pid = assert(tonumber(p:read("*l"))), proc = p }
end

-- the window: from 1 s after the first arrival, SECONDS long
local first
nginx.wait_until(30, function()
  local reqs = server:requests()
  first = reqs[1] and reqs[1].time
  return first ~= nil
end)
assert(first, "no request arrived")
nginx.sleep(SECONDS + 1.5 - (nginx.clock() - first))
local reqs = server:requests()
for _, w in ipairs(pids) do os.execute("kill -TERM " .. w.pid) end
for _, w in ipairs(pids) do w.proc:close() end

local from, to = first + 1, first + 1 + SECONDS
local times, by_conn, seen, twice = {}, {}, {}, 0
for _, r in ipairs(reqs) do
  if r.time >= from and r.time < to then
    times[#times + 1] = r.time
    by_conn[r.connection] = (by_conn[r.connection] or 0) + 1
  end
  local id = cjson.decode(r.body).ext_interaction_id
  if seen[id] then twice = twice + 1 end
  seen[id] = true
end
table.sort(times)
local function most_within(span)
  local best, a = 0, 1
  for b = 1, #times do
    while times[b] - times[a] >= span do a = a + 1 end
    if b - a + 1 > best then best = b - a + 1 end
  end
  return best
end
local achieved = #times / SECONDS
local senders = {}
for _, n in pairs(by_conn) do senders[#senders + 1] = fmt("%d", n) end
table.sort(senders)
print(fmt("requests in the window: %d in %g s = %.2f/s; per connection: %s", #times, SECONDS, achieved,
          table.concat(senders, ", ")))
print(fmt("most in any 1 s: %d, in any 100 ms: %d (an even pace: %g and %g)", most_within(1), most_within(0.1),
          RATE, RATE / 10))
print(fmt("requests sent twice: %d (of %d received)", twice, #reqs))
print(fmt("ratio achieved / limit: %.3f (goal 0.95 to 1.05); load average %s", achieved / RATE, common.loadavg()))

q:close()
server:stop()
srv:remove()
nginx.remove_dir(dir)
