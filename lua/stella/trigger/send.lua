-- stella.trigger.send: the second stage of a batch. Sends the requests decide.lua wrote
-- to the outbox (or the items flush claimed), in order, with each brand's client; the
-- store is not touched here. Two ways: in line (send_batch: one request after the other,
-- with the client's retries) and on the trigger's lanes (start: background threads of
-- the C core, first attempts over the brand's connections, batch after batch from one
-- queue, while the caller goes on with its store work). Both send nothing once half of
-- the outbox lease has passed: what is left is DEFERRED.
-- A trigger made with `stop` (a function; `stella trigger` passes one that says whether
-- SIGINT or SIGTERM came) checks it before each send and while the lanes run: once it
-- says true, nothing more is sent, the lanes end their posts in flight, and every
-- request not sent goes back to the outbox as INTERRUPTED.
local client_mod = require "stella.client"
local errors = require "stella.error"

local select, pairs = select, pairs

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

-- The trigger's lanes: one appendable sender of the C core (client.open_lanes) for the
-- trigger's life, shared by its pipeline and flush(); closed by trigger:close(). Each
-- brand's connections are lanes sharing the brand's queue. Batches are added as chunks
-- while the lanes are still busy with the one before, so no connection waits at a batch
-- boundary; a batch's results are collected once its items are through. false when none
-- can be made (a sender of the C core cannot start).
local function lanes_of(self)
  local s = self.lanes_sender
  if s == nil then
    s = client_mod.open_lanes() or false
    self.lanes_sender = s
  end
  return s or nil
end

-- true when some client's circuit breaker is open (its sends go in line: post answers
-- circuit_open at once)
local function circuit_open(clients)
  for k = 1, #clients do
    local c = clients[k]   -- a client of the caller's own making may have no breaker
    if c.circuit and c:circuit() == "open" then return true end
  end
  return false
end

-- The lanes are the caller's while it sends in line (a retry, an item not taken): paused,
-- no post in flight. Then they go on, unless the run is stopping or a breaker is open
-- (resume waits too while a batch with a failed first attempt is not collected).
local function borrow(self)
  local s = self.lanes_sender
  if s then s:pause() end
end

local function give_back(self)
  local s = self.lanes_sender
  if not s or stopping(self) then return end
  for _, c in pairs(self.lane_owner or {}) do
    if c.circuit and c:circuit() == "open" then return end
  end
  s:resume()
end

-- Sends a batch in line, in this thread, with the client's retries (process_many)
-- (the lanes, if a pipeline or flush() of this trigger made them, are paused meanwhile:
-- they share the clients)
function M.in_line(self, list, now)
  local busy = self.lanes_sender and #list > 0
  if busy then borrow(self) end
  local results, errs
  if self.gate then   -- the fleet's rate limit (the note at start_lanes)
    results, errs = self.gate:send(self, list, function(t, sub, later) return send_batch(t, sub, now, 1, later) end)
  else
    results, errs = send_batch(self, list, now)
  end
  if busy then give_back(self) end
  return results, errs
end

-- Where a chunk of sends is handed to the lanes: the one point a gate (a rate limit) goes
-- before the lanes get it. Returns the chunk's id, or nil (the chunk goes in line).
local function hand_to_lanes(self, sender, flat, budget, groups)
  return (sender:add(flat, budget, groups))
end

-- Starts sending a batch's requests (list as for send_batch): adds them to the trigger's
-- lanes when every client uses the libcurl transport, behind the batches still on the
-- wire; the caller goes on with its store work (deciding or claiming the next batch,
-- settling the previous one) while they are out. finish() waits for this batch's items
-- and returns results, errs like send_batch. The lanes make first attempts on the happy
-- path only: at the first failure they pause, and finish() completes what the batch's
-- lanes did not (the client's retries, the items not taken, in line as send_batch does).
-- An item whose half-lease deadline passed before a lane got to it is DEFERRED.
-- A brand's connections share its items: each takes the next as soon as its post in
-- flight returns, so none idles while another has a slow answer.
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
  local flat, index, clients, turn, groups, seen = {}, {}, {}, {}, {}, {}
  local set = self.clients
  -- the trigger's for all its batches: transport -> its client (who completes what a lane
  -- posted), a brand's set of connections -> its group (the lanes sharing its queue)
  local owner, group_of = self.lane_owner, self.lane_groups
  if not owner then
    owner, group_of = {}, { n = 0 }
    self.lane_owner, self.lane_groups = owner, group_of
  end
  local core_ok = true
  for i = 1, n do
    local o = list[i]
    if o then
      local k = #index + 1
      local lanes = set:lanes(o.brand)
      -- the first items go round the brand's connections, so that each has a lane
      local t = (turn[lanes] or 0) % #lanes + 1
      turn[lanes] = t
      local c = lanes[t]
      local g = group_of[lanes]
      if not g then
        group_of.n = group_of.n + 1
        g = group_of.n
        group_of[lanes] = g
      end
      if not seen[lanes] then
        seen[lanes] = true
        for j = 1, #lanes do
          local tr = client_mod.core_transport(lanes[j])
          if tr then owner[tr] = lanes[j] else core_ok = false end
        end
      end
      index[k], clients[k], groups[k] = i, c, g
      flat[3 * k - 2], flat[3 * k - 1], flat[3 * k] = client_mod.core_transport(c), path_of(o), o.body
    end
  end
  local sender, chunk
  if #index > 0 and core_ok and not circuit_open(clients) and not stopping(self) then
    sender = lanes_of(self)
    if sender then
      if sender:paused() then give_back(self) end   -- left paused by an open breaker
      chunk = hand_to_lanes(self, sender, flat, deadline - self.clock(), groups)
    end
  end

  return function()   -- finish
    local results, errs = {}, {}
    local rest, tried = list, false   -- what goes in line: the items the lanes did not take
    local inline = not chunk
    if chunk then
      rest = {}
      for i = 1, #list do rest[i] = list[i] end
      -- wait, in short steps when the run can be stopped, to stop the lanes when asked
      while not sender:ready(chunk, self.stop and 0.1 or 10) do
        if stopping(self) then sender:stop() end
      end
      local got, posters = sender:collect(chunk)
      for k = 1, #index do
        local r = got[k]
        if r == false or (r ~= "skipped" and not (r.status and r.status >= 200 and r.status < 300)) then
          inline = true   -- a retry or an item not taken: sent in this thread
        end
      end
      if inline then borrow(self) end
      for k = 1, #index do
        local i, r = index[k], got[k]
        if r == "skipped" then   -- its deadline had passed: not sent
          errs[i], rest[i] = DEFERRED, false
        elseif r then
          tried = true
          -- completed by the connection that posted it (its own circuit breaker)
          results[i], errs[i] = owner[posters[k]]:complete(path_of(list[i]), list[i].body, r)
          rest[i] = false
        end
      end
    elseif #index > 0 and self.lanes_sender then
      borrow(self)
    else
      inline = false
    end
    results, errs = send_batch(self, rest, now, 1, tried, results, errs)
    if inline then give_back(self) end
    return results, errs
  end
end

-- Closes the trigger's lanes (their posts in flight end first).
function M.close(self)
  local s = self.lanes_sender
  self.lanes_sender = nil
  if s then s:close() end
end

return M
