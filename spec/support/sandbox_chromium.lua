-- Headless Chromium for the sandbox specs: the DOM of a page after its scripts ran.
--
--   local chromium = require "support.sandbox_chromium"
--   if chromium.available() then local html = chromium.dump_dom(url) end
--
-- Each call uses a new, empty profile directory (removed afterwards) and runs under
-- timeout(1), so no browser outlives it; leftovers() lists any process still using one
-- of the profiles this module created (the specs check it is empty).
local M = {}

M.BINARY = os.getenv("STELLA_CHROMIUM") or "/usr/bin/chromium"

local FLAGS = "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run "
  .. "--disable-background-networking --disable-component-update --disable-sync "
  .. "--disable-extensions --disable-default-apps --mute-audio"

local profiles = {}

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function run(cmd)
  local p = assert(io.popen(cmd .. "; echo \"@exit=$?\""))
  local out = p:read("*a")
  p:close()
  return tonumber(out:match("@exit=(%d+)%s*$")), (out:gsub("@exit=%d+%s*$", ""))
end

function M.available()
  local f = io.open(M.BINARY, "rb")
  if f then f:close() return true end
  return false
end

local function with_profile(fn)
  local code, dir = run("mktemp -d \"${TMPDIR:-/tmp}/stella-chromium-XXXXXX\"")
  assert(code == 0, "mktemp failed")
  dir = dir:gsub("%s+$", "")
  profiles[#profiles + 1] = dir
  local ok, a, b = pcall(fn, dir)
  run("rm -rf " .. shell_quote(dir))
  if not ok then error(a, 0) end
  return a, b
end

-- The rendered DOM of url (scripts run for up to `budget` ms of virtual time).
function M.dump_dom(url, budget)
  return with_profile(function(dir)
    local cmd = ("timeout -k 5 90 %s %s --user-data-dir=%s --virtual-time-budget=%d --dump-dom %s 2>/dev/null")
      :format(shell_quote(M.BINARY), FLAGS, shell_quote(dir), budget or 3000, shell_quote(url))
    local code, out = run(cmd)
    if code ~= 0 or not out:find("<html", 1, true) then
      error("chromium --dump-dom failed (exit " .. tostring(code) .. "):\n" .. out:sub(1, 2000), 0)
    end
    return out
  end)
end

-- A screenshot of url into png (for looking at the page by hand).
function M.screenshot(url, png, size)
  return with_profile(function(dir)
    local cmd = ("timeout -k 5 90 %s %s --user-data-dir=%s --virtual-time-budget=3000 --window-size=%s --screenshot=%s %s >/dev/null 2>&1")
      :format(shell_quote(M.BINARY), FLAGS, shell_quote(dir), size or "1200,900", shell_quote(png), shell_quote(url))
    return run(cmd) == 0
  end)
end

-- Processes still running with one of our profile directories on their command line.
function M.leftovers()
  local found = {}
  for _, dir in ipairs(profiles) do
    local _, out = run("pgrep -f -- " .. shell_quote("[u]ser-data-dir=" .. dir) .. " || true")
    for pid in out:gmatch("%d+") do found[#found + 1] = pid end
  end
  return found
end

return M
