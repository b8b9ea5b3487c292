-- stella.cli.test: `stella test --rules FILE CASES...`, a rules file checked against cases
-- files (stella.cli.cases): each event's outcome and reason compared with the expected
-- ones, one line per failing case, a summary. Nothing is sent: every trigger here is a
-- dry run, and the client it is given raises if a send is ever attempted.
local error, ipairs, next, pairs, pcall, setmetatable, tostring, type =
      error, ipairs, next, pairs, pcall, setmetatable, tostring, type
local concat, sort = table.concat, table.sort

local cases_mod = require "stella.cli.cases"
local setup = require "stella.cli.setup"
local rules_mod = require "stella.rules"

local M = {}

M.help = [[
usage: stella test --rules FILE [--json] [-q | -v] CASES...

Runs the events of each cases file (Lua or JSON) through the rules in a dry run, with a
memory store, a fixed clock and steps of time between events, and compares each outcome
with the one the case expects. Sends nothing, needs no key. Prints one line per failing
case, FILE: case N (name): expected ..., got ...; verdicts: ... (every rule's verdict),
then "N cases, N passed, N failed". Exit status 1 when a case fails, 2 when a cases file
or the rules file cannot be used. The cases format: see README, "Testing your rules".

  --rules FILE   the rules file to test (required)
  --json         print the result as one JSON object instead of the lines
  -q, --quiet    only the summary line
  -v, --verbose  a line for every case, passing ones too
]]

-- its options: "flag" or "value"
M.options = { rules = "value", json = "flag", quiet = "flag", verbose = "flag" }

-- The client every trigger here gets: a send through it is a bug, never a request.
local NO_SEND = {
  mode = "test",
  post = function() error("stella test: a request was about to be sent (a dry run sends nothing)", 0) end,
  close = function() end,
}

local function json_value(v)
  local cjson = require "cjson.safe"   -- loaded only when a case fails
  if type(v) == "table" and (v[1] ~= nil or next(v) == nil) then
    return cjson.encode(v) or tostring(v)
  elseif type(v) == "table" then
    return require("stella.cli.output").encode(v)
  end
  return cjson.encode(v) or tostring(v)
end

-- The fields of `want` that `got` does not match: records field by field (fields not in
-- `want` are not looked at), lists and scalars exactly. Appends "path: expected X, got Y".
local function mismatches(want, got, path, out)
  if type(want) == "table" and want[1] == nil and next(want) ~= nil then
    local keys = {}
    for k in pairs(want) do keys[#keys + 1] = tostring(k) end
    sort(keys)   -- the lines in one order, run after run
    for _, k in ipairs(keys) do
      local g = type(got) == "table" and got[k] or nil
      mismatches(want[k], g, path .. "." .. k, out)
    end
    return out
  end
  local same
  if type(want) == "table" then
    same = type(got) == "table" and #want == #got
    if same then
      for i = 1, #want do
        if #mismatches(want[i], got[i], path, {}) > 0 then same = false break end
      end
      for k in pairs(got) do if type(k) ~= "number" then same = false end end
    end
  else
    same = want == got
  end
  if not same then
    out[#out + 1] = ("%s = %s, got %s"):format(path, json_value(want), got == nil and "nothing" or json_value(got))
  end
  return out
end

-- "map=pass when=skip(not_eligible: ...)": every rule's verdict, in order
local function verdicts_text(verdicts)
  if type(verdicts) ~= "table" or verdicts[1] == nil then return "none" end
  local parts = {}
  for i, v in ipairs(verdicts) do
    local text = tostring(v.rule) .. "=" .. tostring(v.verdict)
    if v.verdict ~= "pass" and (v.reason or v.detail) then
      text = text .. "(" .. tostring(v.reason or "") .. (v.detail and (": " .. tostring(v.detail)) or "") .. ")"
    end
    parts[i] = text
  end
  return concat(parts, " ")
end

local function outcome_text(status, reason, send_at)
  return tostring(status) .. (reason and (" (" .. tostring(reason) .. ")") or "")
      .. (send_at and (" at " .. rules_mod.iso_utc(send_at)) or "")
end

-- Runs one group's cases. report(case, result) is called for each; result = { ok,
-- status, reason, problems = { "request.x = ..., got ..." }, verdicts, error }.
-- Returns true | nil, message (the starting state could not be set up).
local function run_group(rules, group, report)
  local stella = require "stella"
  local now = group.now
  local store = stella.store.memory()
  local ok, trigger = pcall(stella.trigger, { rules = rules, client = NO_SEND, store = store, dry_run = true,
                                             clock = function() return now end })
  if not ok then return nil, tostring(trigger) end
  local function finish(...)
    trigger:close()
    store:close()
    return ...
  end
  for _, e in ipairs(group.state.unsubscribes) do
    store:unsubscribe(store:hash_email(e), now)
  end
  -- the contacts before now: their marks are the rules' own
  for _, s in ipairs(group.state.sent) do
    now = s.at
    local pok, o = pcall(trigger.process, trigger, s.event)
    if not pok then return finish(nil, s.where .. ": " .. tostring(o)) end
    if o.status ~= "sent" and not (o.status == "queued" and o.reason == "scheduled") then
      return finish(nil, ("%s: the event was %s, not sent, so it leaves no marks%s"):format(
        s.where, outcome_text(o.status, o.reason), o.detail and ("; " .. tostring(o.detail)) or ""))
    end
  end
  now = group.now
  for _, case in ipairs(group.cases) do
    if case.at then now = case.at elseif case.advance then now = now + case.advance end
    local result = { problems = {} }
    -- explained first: the run then puts the marks the explanation must not see
    local eok, explained = pcall(trigger.explain, trigger, case.event)
    local pok, o = pcall(trigger.process, trigger, case.event)
    if not (eok and pok) then
      result.error = tostring(pok and explained or o)
    else
      result.status, result.reason, result.verdicts = o.status, o.reason, explained.verdicts
      result.send_at = o.send_at
      result.time = now
      if o.status ~= case.expect or (case.reason ~= nil and o.reason ~= case.reason) then
        result.wrong_outcome = true
      end
      if case.request then mismatches(case.request, o.request, "request", result.problems) end
      if case.send_at and o.send_at ~= case.send_at then
        result.problems[#result.problems + 1] = ("send_at = %s, got %s"):format(rules_mod.iso_utc(case.send_at),
          o.send_at and rules_mod.iso_utc(o.send_at) or "nothing (sent now)")
      end
    end
    result.ok = not result.error and not result.wrong_outcome and result.problems[1] == nil
    report(case, result)
  end
  return finish(true)
end

-- The line of a failing case.
local function failure_line(path, case, r)
  local expected = outcome_text(case.expect, case.reason)
  local text
  if r.error then
    text = ("expected %s, got an error: %s"):format(expected, r.error)
  else
    local parts = {}
    if r.wrong_outcome then
      parts[1] = ("expected %s, got %s"):format(expected, outcome_text(r.status, r.reason))
    end
    for _, p in ipairs(r.problems) do parts[#parts + 1] = "expected " .. p end
    text = concat(parts, "; ") .. "; verdicts: " .. verdicts_text(r.verdicts)
  end
  return ("%s: %s: %s"):format(path, case.label, text)
end

function M.run(ctx, opts, paths)
  if not opts.rules then return ctx:usage_error("test", "--rules FILE is required") end
  if #paths == 0 then return ctx:usage_error("test", "give at least one cases file") end
  if opts.quiet and opts.verbose then return ctx:usage_error("test", "give --quiet or --verbose, not both") end
  local json = opts.json
  -- the rules, compiled once (setup redacts their keys and refuses a bad file with 2)
  local run, rstatus = setup.start(ctx, "test", { rules = opts.rules, db = ":memory:", dry_run = true })
  if not run then return rstatus end
  local rules = run.rules
  setup.stop(run)

  local total, passed, failed, bad = 0, 0, 0, 0
  local cjson = require "cjson"
  local failures = require("stella.cli.output").array()
  for _, path in ipairs(paths) do
    local file, problems = cases_mod.load(path)
    if not file then
      bad = bad + 1
      for _, p in ipairs(problems) do ctx:warn("stella test: %s", p) end
    else
      for _, group in ipairs(file.groups) do
        local done, err = run_group(rules, group, function(case, r)
          total = total + 1
          if r.ok then
            passed = passed + 1
            if opts.verbose and not json then
              ctx:say("%s: %s: ok, %s", path, case.label, outcome_text(r.status, r.reason, r.send_at))
            end
            return
          end
          failed = failed + 1
          if json then
            local null = cjson.null
            failures[#failures + 1] = {
              file = path, case = case.index, name = case.name or null,
              expected = case.expect, expected_reason = case.reason or null,
              status = r.status or null, reason = r.reason or null,
              message = failure_line(path, case, r),
            }
          elseif not opts.quiet then
            ctx:say("%s", failure_line(path, case, r))
          end
        end)
        if not done then
          bad = bad + 1
          ctx:warn("stella test: %s: %s", path, err)
          break
        end
      end
    end
  end
  local status = bad > 0 and 2 or failed > 0 and 1 or 0
  if json then
    ctx:say("%s", require("stella.cli.output").encode{
      command = "test", rules = opts.rules, cases = total, passed = passed, failed = failed,
      bad_files = bad, failures = failures, exit_status = status })
    return status
  end
  ctx:say("%d case%s, %d passed, %d failed", total, total == 1 and "" or "s", passed, failed)
  if bad > 0 then
    ctx:warn("stella test: %d cases file%s could not be run", bad, bad == 1 and "" or "s")
  end
  return status
end

return M
