-- stella.openresty.spool: what a stopping nginx holds in shared memory (queued events,
-- the outbox), written to a file that the next workers read back. And the registry of
-- workers that tells a stop from a reload.
--
--   local spool = require "stella.openresty.spool"
--   local s = spool.new{ path = "/var/lib/stella/spool.jsonl", dict = ngx.shared.stella_queue }
--   s:join()          -- init_worker: this worker is alive (and later than the ones before)
--   s:leave()         -- exit_worker: -> { reload = bool, last = bool }
--   s:append(records) -- exit_worker: records (tables) appended as JSON lines -> n | nil, err
--   s:take()          -- -> records | nil (no spool), err; the file is renamed first, so
--                        each record is handed out once; s:done() removes it afterwards
--
-- leave() says `reload` when a worker that joined after this one is still alive (nginx
-- starts the new workers before it tells the old ones to quit), and `last` when no other
-- registered worker is alive. Aliveness is read from /proc (Linux). Workers killed with
-- SIGKILL are dropped from the registry by the next join or leave.
--
-- Writers and takers hold a short lock (an add in the dict), so the lines of two workers
-- stopping at once never interleave. The file is written with plain io (no fsync): it
-- survives nginx stopping, not the machine crashing.
local cjson = require "cjson.safe"

local ngx = rawget(_G, "ngx")
local error, ipairs, tonumber, tostring, type, setmetatable, pcall =
      error, ipairs, tonumber, tostring, type, setmetatable, pcall
local io_open, os_rename, os_remove, concat = io.open, os.rename, os.remove, table.concat

local M = {}

local Spool = {}
Spool.__index = Spool

local LOCK = "spool:lock"
local REGISTRY = "spool:workers"   -- "pid:seq,pid:seq,..."
local SEQ = "spool:seq"
local LOCK_TRIES = 200000          -- spins (exit_worker cannot sleep); the lock is held briefly
local REGISTRY_BYTES = 1024        -- the registry padded to one length: rewritten in place

function M.new(opts)
  if type(opts) ~= "table" or type(opts.path) ~= "string" or opts.path == "" then
    error("stella.openresty.spool: opts.path (a file name) is required", 2)
  end
  if opts.dict == nil then error("stella.openresty.spool: opts.dict (ngx.shared.NAME) is required", 2) end
  return setmetatable({ path = opts.path, dict = opts.dict, seq = nil }, Spool)
end

local function alive(pid)
  local f = io_open("/proc/" .. pid .. "/stat", "rb")
  if not f then return false end
  local stat = f:read("*l") or ""
  f:close()
  return stat:match("^%d+ %b() (%a)") ~= "Z"
end

-- Runs fn under the lock. -> fn's result, or nil, err when the lock stays taken.
local function locked(self, fn)
  local dict = self.dict
  local got = false
  for _ = 1, LOCK_TRIES do
    -- safe_add: in a full dict, add would evict the least recently used keys (the queue)
    if dict:safe_add(LOCK, ngx.worker.pid(), 5) then got = true break end
  end
  if not got then return nil, "the spool lock stayed taken" end
  local ok, a, b = pcall(fn)
  dict:delete(LOCK)
  if not ok then return nil, tostring(a) end
  return a, b
end

local function read_registry(dict)
  local list = {}
  for pid, seq in (dict:get(REGISTRY) or ""):gmatch("(%d+):(%d+)") do
    list[#list + 1] = { pid = tonumber(pid), seq = tonumber(seq) }
  end
  return list
end

local function write_registry(dict, list)
  local parts = {}
  for i, w in ipairs(list) do parts[i] = w.pid .. ":" .. w.seq end
  local text = concat(parts, ",")
  -- one length: a value the size of the old one is replaced in place, so the registry
  -- still changes when the dict is full (a burst filled the queue)
  if #text < REGISTRY_BYTES then text = text .. (" "):rep(REGISTRY_BYTES - #text) end
  return dict:safe_set(REGISTRY, text)
end

-- The registered workers still alive, other than pid.
local function others_alive(dict, pid)
  local list = {}
  for _, w in ipairs(read_registry(dict)) do
    if w.pid ~= pid and alive(w.pid) then list[#list + 1] = w end
  end
  return list
end

function Spool:join()
  local dict, pid = self.dict, ngx.worker.pid()
  return locked(self, function()
    local seq = dict:incr(SEQ, 1, 0)
    self.seq = seq
    local list = others_alive(dict, pid)
    list[#list + 1] = { pid = pid, seq = seq }
    return write_registry(dict, list)
  end)
end

function Spool:leave()
  local dict, pid = self.dict, ngx.worker.pid()
  local r, err = locked(self, function()
    local list = others_alive(dict, pid)
    local ok, werr = write_registry(dict, list)
    if not ok then
      -- still listed: the next worker to leave would wait for this one and never be last
      ngx.log(ngx.ERR, "stella: cannot update the spool's worker registry: ", tostring(werr))
    end
    local reload = false
    for _, w in ipairs(list) do
      if w.seq > (self.seq or 0) then reload = true end
    end
    return { reload = reload, last = #list == 0, others = #list }
  end)
  -- without the lock, spool everything: a stop is the case that loses data
  return r or { reload = false, last = true, others = 0, error = err }
end

function Spool:append(records)
  if #records == 0 then return 0 end
  local lines = {}
  for i, rec in ipairs(records) do
    local line, eerr = cjson.encode(rec)
    if not line then return nil, "cannot encode a spool record: " .. tostring(eerr) end
    lines[i] = line
  end
  return locked(self, function()
    local f, oerr = io_open(self.path, "ab")
    if not f then return nil, "cannot open " .. self.path .. ": " .. tostring(oerr) end
    local ok, werr = f:write(concat(lines, "\n"), "\n")
    local cok, cerr = f:close()
    if not ok or not cok then return nil, "cannot write " .. self.path .. ": " .. tostring(werr or cerr) end
    return #records
  end)
end

-- take() -> records (possibly none), or nil, err. Reads the spool left by earlier workers
-- (and a take that did not finish). Lines that do not decode are returned as
-- { bad = line }.
function Spool:take()
  local taking = self.path .. ".taking"
  return locked(self, function()
    local f = io_open(taking, "rb")
    if f then
      f:close()
    else
      local ok = os_rename(self.path, taking)
      if not ok then return {} end   -- no spool
    end
    f = io_open(taking, "rb")
    if not f then return nil, "cannot read " .. taking end
    local records = {}
    for line in f:lines() do
      if line ~= "" then
        local rec = cjson.decode(line)
        records[#records + 1] = type(rec) == "table" and rec or { bad = line }
      end
    end
    f:close()
    return records
  end)
end

-- done(): the records take() returned are back in shared memory.
function Spool:done()
  os_remove(self.path .. ".taking")
end

return M
