-- stella.redis_rules.glue: the Function stella_decide, run inside Redis (Lua 5.1) as part
-- of the library `stella` once `stella redis load` has put the rules there (see
-- lua/stella/redis_rules/init.lua, which builds that library). One event in, one
-- decision out, with the store's state changed in the same call:
--
--   FCALL stella_decide 1 BASE.."meta" EVENT_JSON [NOW]
--     -> { status, reason, detail, outbox_id }   (absent ones: nil)
--
-- It decides as the Lua trigger does, with the same code: stella.rules evaluates the
-- rules file (its globals made by stella.rules.globals), stella.trigger.outcome turns
-- the decision into an outcome and names the marks' keys, stella.trigger.rows makes the
-- ledger entry; marks, outbox item and ledger entry are written by the store library's
-- own ops (OPS.marks, OPS.enqueue, OPS.record of lua/stella/store/redis_lib.lua). What
-- Redis cannot do is validate the request against the API's schema (the C core): a
-- request to send is queued as kind "unvalidated" (its body: the rules' request as
-- JSON), and whoever sends it (stella.trigger.flush: `stella retry`, a worker) validates
-- and encodes it first; an invalid one releases its marks and is recorded invalid.
local type, tostring, tonumber, pairs, pcall, error, unpack =
      type, tostring, tonumber, pairs, pcall, error, unpack
local floor, ceil, huge = math.floor, math.ceil, math.huge
local format, byte, gsub, find, sub, lower, match = string.format, string.byte, string.gsub,
                                                    string.find, string.sub, string.lower, string.match
local concat = table.concat

-- Numbers and ledger entries as text, as stella.store.redis writes them.
local store_text = require "stella.store.text"
local number_text, encode_entry = store_text.number_text, store_text.encode_entry

local M = {}

local HISTORY = 90 * 86400   -- the ledger's window, as the Redis store's default

-- The names a rules file's chunk sees as locals: inside Redis a chunk's globals cannot be
-- swapped (no setfenv), so every name the Lua trigger's rule environment defines
-- differently from Redis's own globals is a local of the chunk, given the value the
-- environment has (nil for what it does not offer: redis, bit, io, require, ...).
M.SHADOWED = {
  "_G", "string", "table", "math", "os", "print", "rawlen", "io", "require", "debug", "package",
  "dofile", "loadfile", "load", "loadstring", "setfenv", "getfenv", "module", "newproxy", "utf8",
  "jit", "bit", "cjson", "cmsgpack", "struct", "redis", "collectgarbage", "gcinfo", "coroutine",
  "_VERSION",
}


-- JSON null (cjson.null) dropped, as the Lua trigger's reader does: an absent key, or an
-- array element left out.
local function drop_nulls(v, null)
  if type(v) ~= "table" then return v end
  local n, count = #v, 0
  for _ in pairs(v) do count = count + 1 end
  if n > 0 and n == count then   -- an array
    local out = {}
    for i = 1, n do
      if v[i] ~= null then out[#out + 1] = drop_nulls(v[i], null) end
    end
    return out
  end
  local out = {}
  for k, x in pairs(v) do
    if x ~= null then out[k] = drop_nulls(x, null) end
  end
  return out
end

local ESCAPES = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }
local function quote(s)
  return '"' .. gsub(s, '[%c"\\]', function(c)
    return ESCAPES[c] or format("\\u%04x", byte(c))
  end) .. '"'
end

-- The rules' request as JSON (not the canonical body: the sender validates and encodes
-- it with the C core). nil, message for what JSON cannot hold.
local function encode(v, out, path)
  local t = type(v)
  if t == "string" then
    out[#out + 1] = quote(v)
  elseif t == "number" then
    if v ~= v or v == huge or v == -huge then return nil, path .. ": not a finite number" end
    out[#out + 1] = number_text(v)
  elseif t == "boolean" then
    out[#out + 1] = tostring(v)
  elseif t == "table" then
    local n, count = #v, 0
    for _ in pairs(v) do count = count + 1 end
    if n > 0 and n == count then
      out[#out + 1] = "["
      for i = 1, n do
        if i > 1 then out[#out + 1] = "," end
        local ok, err = encode(v[i], out, path .. "[" .. i .. "]")
        if not ok then return nil, err end
      end
      out[#out + 1] = "]"
    else
      out[#out + 1] = "{"
      local first = true
      for k, x in pairs(v) do
        if type(k) ~= "string" then return nil, path .. ": a table with keys that are not names" end
        if not first then out[#out + 1] = "," end
        first = false
        out[#out + 1] = quote(k)
        out[#out + 1] = ":"
        local ok, err = encode(x, out, path .. "." .. k)
        if not ok then return nil, err end
      end
      out[#out + 1] = "}"
    end
  else
    return nil, path .. ": a " .. t .. " cannot be sent"
  end
  return true
end

local function request_json(request)
  local out = {}
  local ok, err = encode(request, out, "request")
  if not ok then return nil, err end
  return concat(out)
end

-- "a@b" from " A@B\n" (stella.store's normalize_email: the hash must be the store's).
local function normalize_email(email)
  return lower(match(email, "^%s*(.*%S)") or "")
end

-- A text field of an item or entry as the store keeps it (stella.store.rows "text").
local function text(v)
  if type(v) == "string" then return v end
  if type(v) == "number" and v - v == 0 then return number_text(v) end
  return nil
end

-- deps: call (redis.call), error_reply, cjson, bit, OPS (the store library's ops),
-- require (over the library's modules), rules_name and rules_source (the rules file),
-- entry (stella.store.rows.entry: the ledger's fields in order).
function M.new(deps)
  local call, OPS, require = deps.call, deps.OPS, deps.require
  local rules_mod = require "stella.rules"
  local outcome_mod = require "stella.trigger.outcome"
  local trows = require "stella.trigger.rows"
  local ENTRY = require("stella.store.rows").entry
  local sha256 = require("stella.redis_rules.sha256").new(deps.bit)
  local cjson, error_reply = deps.cjson, deps.error_reply

  -- The rules file, run as the Lua trigger runs it: its globals from stella.rules.globals.
  local env = rules_mod.globals()
  local source = deps.rules_source
  if sub(source, 1, 1) == "#" then source = "--" .. source end   -- a shebang line
  local names = M.SHADOWED
  local chunk, cerr = deps.loadstring("local " .. concat(names, ", ") .. " = ...; " .. source,
                                      "@" .. deps.rules_name)
  if not chunk then error(cerr, 0) end
  local values = {}
  for i = 1, #names do values[i] = env[names[i]] end
  local ok, spec = pcall(chunk, unpack(values, 1, #names))
  if not ok then error(tostring(spec), 0) end
  if type(spec) ~= "table" then
    error(deps.rules_name .. ": a rules file must return a table, got " .. type(spec), 0)
  end
  local compiled = rules_mod.compile(spec, deps.rules_name)

  return function(keys, argv)
    local meta = keys[1]
    if type(meta) ~= "string" or sub(meta, -4) ~= "meta" then
      return error_reply("ERR stella_decide: KEYS[1] must be the store's meta key (stella:{main}:meta)")
    end
    local B = sub(meta, 1, -5)
    local json = argv[1]
    if type(json) ~= "string" or not find(json, "^%s*{") then
      return error_reply("ERR stella_decide: ARGV[1] must be the event, a JSON object")
    end
    local dok, event = pcall(cjson.decode, json)
    if not dok or type(event) ~= "table" then
      return error_reply("ERR stella_decide: ARGV[1] is not valid JSON: " .. tostring(event))
    end
    event = drop_nulls(event, cjson.null)
    local now
    if argv[2] ~= nil and argv[2] ~= "" then
      now = tonumber(argv[2])
      if not now or now - now ~= 0 then
        return error_reply("ERR stella_decide: ARGV[2] must be the time in seconds since the epoch")
      end
    else
      now = tonumber(call("TIME")[1])
    end
    local salt = call("HGET", meta, "salt")
    if not salt then
      return error_reply("ERR stella_decide: the store has no salt yet (open it with stella once)")
    end
    local memo = {}
    local function hash(email)
      local h = memo[email]
      if not h then
        h = sha256(salt .. normalize_email(email))
        memo[email] = h
      end
      return h
    end
    local any_unsubscribed = call("HLEN", B .. "u") > 0
    local renv = {
      now = now,
      lookup = function(mark)
        local v = call("GET", B .. "m:" .. outcome_mod.mark_key(mark, hash))
        if not v then return nil end
        local u = tonumber(sub(v, 1, find(v, "|", 1, true) - 1))
        if u > now then return u end
        return nil
      end,
      unsubscribed = function(email)
        return any_unsubscribed and call("HEXISTS", B .. "u", hash(email)) == 1
      end,
    }
    local d = rules_mod.evaluate(compiled, event, renv, false)
    local o = outcome_mod.of(d, event)
    if not o.status then
      local body, jerr = request_json(d.request)
      if not body then
        o.status, o.reason, o.detail = "invalid", "invalid_request", jerr
      else
        local id = call("INCRBY", B .. "id", 1)
        local owner = "i" .. format("%d", id)
        local c = d.request.customer
        local chash = type(c) == "table" and type(c.email) == "string" and hash(c.email) or nil
        -- a request the rules schedule (delay, quiet_hours) is due then, marked as
        -- scheduled as the Lua trigger marks it (stella.trigger.rows.SCHEDULED)
        local fields = { "kind", "unvalidated", "body", body, "created_at", number_text(now),
                         "next_at", number_text(d.send_at or now), "attempts", "0", "state", "queued" }
        if d.send_at then fields[#fields + 1] = "last_error" fields[#fields + 1] = trows.SCHEDULED end
        local function add(name, v)
          v = text(v)
          if v then fields[#fields + 1] = name fields[#fields + 1] = v end
        end
        add("brand", o.brand)
        add("event_id", o.event_id)
        add("interaction_id", o.interaction_id)
        add("customer_hash", chash)
        local args = { format("%015d", id), number_text(d.send_at or now), tostring(#fields / 2) }   -- id, due
        for i = 1, #fields do args[#args + 1] = fields[i] end
        OPS.enqueue(B, args, 1, 1)
        local marks, n = {}, #d.marks
        for i = 1, n do
          local mark = d.marks[i]
          local u = mark["until"]
          marks[#marks + 1] = outcome_mod.mark_key(mark, hash)
          marks[#marks + 1] = number_text(u)
          marks[#marks + 1] = format("%.0f", ceil(u * 1000))
          marks[#marks + 1] = owner
        end
        if n > 0 then OPS.marks(B, marks, 1, n) end
        o.outbox_id = id
        o.status, o.reason = "queued", "deferred"
        o.detail = "decided in Redis: outbox item " .. format("%d", id)
          .. ", validated and sent by the sender (stella retry)"
        if d.send_at then
          o.reason = trows.SCHEDULED
          o.detail = "will send at " .. rules_mod.iso_utc(d.send_at) .. " (" .. d.schedule .. "); "
            .. o.detail .. " when due"
        end
      end
    end
    local e = trows.ledger_entry({ hash = hash }, o, now)
    for j = 1, ENTRY.width do   -- as the store keeps them (rows kinds text, any_text)
      local f = ENTRY[j]
      local v = e[f.name]
      if v ~= nil and f.kind == "text" then e[f.name] = text(v) end
    end
    local t = number_text(now)
    OPS.record(B, { tostring(HISTORY), t, number_text(floor(now / 3600) * 3600),
                    o.reason == nil and o.status or (o.status .. "|" .. o.reason), encode_entry(e) }, 1, 1)
    return { o.status, o.reason or false, o.detail ~= nil and tostring(o.detail) or false, o.outbox_id or false }
  end
end

return M
