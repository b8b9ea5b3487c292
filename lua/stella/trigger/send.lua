-- stella.trigger.send: the second stage of a batch. Sends the requests decide.lua wrote
-- to the outbox (or the items flush claimed), in order, with each brand's client; the
-- store is not touched here. Two ways: in line (send_batch: one request after the other,
-- with the client's retries) and on a background thread of the C core (start_sends:
-- first attempts over the brand's connections while the caller goes on with its store
-- work). Both stop once half of the outbox lease has passed: what is left is DEFERRED.
-- A trigger made with `stop` (a function; `stella trigger` passes one that says whether
-- SIGINT or SIGTERM came) checks it before each send and while the background threads
-- run: once it says true, nothing more is sent, the threads end their posts in flight,
-- and every request not sent goes back to the outbox as INTERRUPTED.
local client_mod = require "stella.client"
local errors = require "stella.error"

local select = select

local M = {}

-- The error of a request not sent because its batch ran past half of its outbox lease:
-- sending on could overlap a flush() in another process that may claim it once the lease
-- ends (a duplicate). settle.lua puts it back in the outbox, due at once.
M.DEFERRED = { kind = "deferred", retryable = true }
local DEFERRED = M.DEFERRED

-- The error of a request not sent because the run was asked to stop: handed back to the
-- outbox as it was (settle.lua: due at once, attempts unchanged).
M.INTERRUPTED = errors.new{ kind = "interrupted", retryable = true, handed_back = true, attempts = 0,
  message = "not sent: the run was interrupted; it waits in the outbox for `stella retry`" }
local INTERRUPTED = M.INTERRUPTED

-- Reasons that end a run early: flush() claims no more after a batch with one of them.
local HALTING = { interrupted = true, circuit_open = true }

-- true when one of the outcomes says the run should go no further
function M.halted(outcomes)
  for i = 1, #outcomes do
    if HALTING[outcomes[i].reason] then return true end
  end
  return false
end

local function stopping(self)
  return self.stop ~= nil and self.stop() and true or false
end

-- The API path of an outbox item or of an outcome to send (outcomes are requests).
local function path_of(item)
  return item.kind == "recovery" and "/v1/recoveries" or "/v1/requests"
end

-- Sends one outbox item or outcome, with the client's retries.
local function send_item(self, item)
  return self.clients:for_brand(item.brand):post(path_of(item), item.body)
end

-- The outcomes' sends, in event order (false where an outcome sends nothing).
function M.sends_of(outcomes)
  local list = {}
  for i = 1, #outcomes do list[i] = outcomes[i].outbox_id ~= nil and outcomes[i] or false end
  return list
end

-- Sends the items of a batch in order (list[i]: an outcome or outbox item, or false),
-- stopping (DEFERRED) once half the lease has passed; at least the first item is always
-- tried. results[i], errs[i] per item.
-- (from, tried, results, errs): go on from item `from` of a batch partly sent already.
local function send_batch(self, list, now, from, tried, results, errs)
  results, errs = results or {}, errs or {}
  local deadline = now + self.outbox_opts.lease / 2
  for i = from or 1, #list do
    local item = list[i]
    if item then
      if stopping(self) then
        errs[i] = INTERRUPTED
      elseif tried and self.clock() >= deadline then
        errs[i] = DEFERRED
      else
        results[i], errs[i] = send_item(self, item)
        tried = true
      end
    end
  end
  return results, errs
end

function M.in_line(self, list, now)
  if self.gate then   -- the fleet's rate limit (the note below)
    return self.gate:send(self, list, function(t, sub, later) return send_batch(t, sub, now, 1, later) end)
  end
  return send_batch(self, list, now)
end

-- Starts sending a batch's requests (list as for send_batch) in order, on a background
-- thread of the C core when every client uses the libcurl transport: the caller goes on
-- with its store work (the next batch's decisions, the previous batch's settling) while
-- they are on the wire. finish() waits and returns results, errs like send_batch. The
-- thread makes first attempts on the happy path only and stops at the first failure or
-- once half the lease has passed; what it did not send, finish() sends as send_batch
-- does (with the client's retries, or DEFERRED).
-- A brand's connections share its items: each takes the next as soon as its post in
-- flight returns (send_many's groups), so none idles while another has a slow answer.
local start_lanes
function M.start(self, list, now)
  if self.gate then   -- the fleet's rate limit (the note below)
    return function()
      return self.gate:send(self, list, function(t, sub) return start_lanes(t, sub, now)() end,
                            (self.connections or 1) > 1)
    end
  end
  return start_lanes(self, list, now)
end

-- The fleet's rate limit: a trigger with a gate (stella.rate_limit, given by the command
-- when the store is on Redis and the rules set rate_limit) sends through it. The gate
-- takes the key's tokens for the requests in hand, sleeps until their slots and sends
-- them a few at a time (its chunk: the same in line or background sends as without a
-- gate, so a chunk over the brand's connections goes out at once); what gets no slot
-- soon, or meets a 429 with Retry-After (the key paused for every sender), goes back to
-- the outbox due then. With a gate, start() sends in finish(): nothing overlaps.
start_lanes = function(self, list, now)
  local n = #list
  local deadline = now + self.outbox_opts.lease / 2
  local flat, index, clients, turn, groups, group_of, ngroups = {}, {}, {}, {}, {}, {}, 0
  local set = self.clients
  for i = 1, n do
    local o = list[i]
    if o then
      local k = #index + 1
      local lanes = set:lanes(o.brand)
      -- the first items go round the brand's connections, so that each has a thread
      local t = (turn[lanes] or 0) % #lanes + 1
      turn[lanes] = t
      local c = lanes[t]
      local g = group_of[lanes]
      if not g then   -- one group per brand's set of connections
        ngroups = ngroups + 1
        g = ngroups
        group_of[lanes] = g
      end
      index[k], clients[k], groups[k] = i, c, g
      flat[3 * k - 2], flat[3 * k - 1], flat[3 * k] = c, path_of(o), o.body
    end
  end
  -- a client whose circuit breaker is open sends nothing: its items go in line, where
  -- post answers circuit_open at once
  local open = false
  for k = 1, #clients do
    local c = clients[k]   -- a client of the caller's own making may have no breaker
    if c.circuit and c:circuit() == "open" then open = true break end
  end
  local bg = #index > 0 and not open and not stopping(self) and client_mod.send_many(flat, deadline - self.clock(), groups) or nil

  return function()   -- finish
    local results, errs = {}, {}
    local rest, tried = list, false   -- what goes in line: the items the threads did not try
    if bg then
      rest = {}
      for i = 1, #list do rest[i] = list[i] end
      if self.stop then   -- wait in short steps, to stop the threads when asked
        while not bg:done(0.1) do
          if stopping(self) then bg:stop() break end
        end
      end
      if bg:wait() > 0 then
        tried = true
        for k = 1, #index do
          local i = index[k]
          if select("#", bg:result(k)) > 0 then
            -- completed by the connection that posted it (its own circuit breaker)
            results[i], errs[i] = clients[bg:poster(k)]:complete(path_of(list[i]), list[i].body, bg:result(k))
            rest[i] = false
          end
        end
      end
      bg:close()
    end
    return send_batch(self, rest, now, 1, tried, results, errs)
  end
end

return M
