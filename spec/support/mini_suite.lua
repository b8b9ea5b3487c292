-- A small describe/it runner for a suite written for busted (describe, it, before_each,
-- after_each and luassert's assert), where busted cannot run: inside nginx. Used to run
-- the store contract's suite (spec/support/store_contract.lua) on stella.store.shdict.
--
--   local suite = require "support.mini_suite"
--   local results = suite.run(function(b) contract(b, "shdict", open) end)
--   -- results: { { name = "marks keeps a mark ...", ok = true|false, err = "..." }, ... }
--   suite.names(define) -> the names of the tests, without running them
local M = {}

-- The tests define(b) declares, each with its chain of levels (before_each / after_each).
local function collect(define, assert_mod)
  local tests, path = {}, {}
  local stack = { { before = {}, after = {} } }
  local b = { assert = assert_mod }
  function b.describe(name, fn)
    path[#path + 1] = name
    stack[#stack + 1] = { before = {}, after = {} }
    fn()
    stack[#stack] = nil
    path[#path] = nil
  end
  function b.it(name, fn)
    local chain = {}
    for i = 1, #stack do chain[i] = stack[i] end
    local prefix = table.concat(path, " ")
    tests[#tests + 1] = { name = (prefix ~= "" and prefix .. " " or "") .. name, fn = fn, chain = chain }
  end
  function b.before_each(fn) local l = stack[#stack]; l.before[#l.before + 1] = fn end
  function b.after_each(fn) local l = stack[#stack]; l.after[#l.after + 1] = fn end
  define(b)
  return tests
end

local function message(err)
  if type(err) == "table" and err.message then return tostring(err.message) end
  return tostring(err)
end

-- Runs every test: its before_each functions (outer first), the test, its after_each
-- functions (inner first, even after a failure). A failure anywhere fails the test.
function M.run(define, assert_mod)
  local results = {}
  for _, t in ipairs(collect(define, assert_mod or require "luassert")) do
    local ok, err = true, nil
    for _, level in ipairs(t.chain) do
      for _, fn in ipairs(level.before) do
        if ok then ok, err = pcall(fn) end
      end
    end
    if ok then ok, err = pcall(t.fn) end
    for i = #t.chain, 1, -1 do
      for _, fn in ipairs(t.chain[i].after) do
        local aok, aerr = pcall(fn)
        if ok and not aok then ok, err = false, aerr end
      end
    end
    results[#results + 1] = { name = t.name, ok = ok, err = not ok and message(err) or nil }
  end
  return results
end

function M.names(define)
  local names = {}
  for i, t in ipairs(collect(define, {})) do names[i] = t.name end
  return names
end

return M
