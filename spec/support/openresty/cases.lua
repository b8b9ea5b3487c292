-- The client's behaviour cases, run twice on the same scripted answers: by busted through
-- the libcurl transport, and inside nginx (selftest.lua) through the cosocket transport.
-- Each case returns a plain table (JSON-safe) that the spec compares between the two.
--
--   script(params)  the test server's answers for the case (busted side only)
--   run(ctx)        ctx = { stella, base_url, transport (factory or nil), params, clock }
--
-- Runs on Lua 5.4 and LuaJIT, outside and inside nginx.
local C = {}

C.TEST_KEY = "tk_live_0123456789abcdefSECRET"
C.PROD_KEY = "pk_prod_9876543210fedcbaSECRET"

local function request(overrides)
  local r = {
    customer = { name = "Zoë Åkesson", email = "zoe@example.com" },
    employee = { email = "paulagent@blancapeak.com" },
    channel = "phone",
    ext_interaction_id = 123456,
  }
  for k, v in pairs(overrides or {}) do r[k] = v end
  return r
end
C.request = request

local function client(ctx, opts)
  local sleeps = {}
  local o = {
    keys = { test = C.TEST_KEY, production = C.PROD_KEY },
    base_url = ctx.base_url,
    timeout = 2,
    retry = { attempts = 3, base_delay = 0.01, max_delay = 5 },
    sleep = function(s) sleeps[#sleeps + 1] = s end,
    random = function() return 0.5 end,
    transport = ctx.transport,
  }
  for k, v in pairs(opts or {}) do o[k] = v end
  if ctx.ca_file and o.base_url:find("^https:") then o.ca_file = ctx.ca_file end
  return ctx.stella.new(o), sleeps
end

-- The comparable part of a send's result.
local function outcome(res, err)
  if res then
    return { ok = true, status = res.status, request_id = res.request_id, body = res.body,
             attempts = res.attempts }
  end
  local o = { ok = false, kind = err.kind, status = err.status, retryable = err.retryable,
              attempts = err.attempts, message = err.message, body = err.body }
  -- transport failures carry the transport's own words; HTTP answers the client's
  if err.status == nil then o.message = nil end
  return o
end
C.outcome = outcome

local function key_leaked(text)
  text = tostring(text)
  return text:find(C.TEST_KEY, 1, true) ~= nil or text:find(C.PROD_KEY, 1, true) ~= nil
end

local function one(ctx, opts, req)
  local c, sleeps = client(ctx, opts)
  local res, err = c:send(req or request())
  local o = outcome(res, err)
  o.sleeps = sleeps
  o.connects = c:connections()
  o.leaked = err ~= nil and (key_leaked(err.message) or key_leaked(tostring(err))) or false
  c:close()
  return o
end

local function status_case(status)
  return {
    script = function() return { { status = status, body = "Employee not found" } } end,
    run = function(ctx) return one(ctx, { retry = { attempts = 1 } }) end,
  }
end

C.cases = {
  ping = { run = function() return { pong = true } end },

  wire = { run = function(ctx) return one(ctx) end },

  production_agent = {
    run = function(ctx) return one(ctx, { mode = "production", user_agent = "helpdesk-bridge/2" }) end,
  },

  recover = {
    run = function(ctx)
      local c = client(ctx)
      local o = outcome(c:recover{ employee = { custom_id = "agent-7" }, initial_feedback_request_id = "fr-1" })
      c:close()
      return o
    end,
  },

  invalid = {
    run = function(ctx)
      local c = client(ctx)
      local _, err = c:send(request{ channel = "", ext_interactionid = 5 })
      c:close()
      return { kind = err.kind, attempts = err.attempts, paths = { err.errors[1].path, err.errors[2].path } }
    end,
  },

  response_ids = {
    script = function()
      return { { status = 200, body = { id = 42 } },
               { status = 200, body = { customer = { name = "Jane" } } },
               { status = 200, body = "OK", headers = { ["Content-Type"] = "text/plain" } } }
    end,
    run = function(ctx)
      local c = client(ctx)
      local list = {}
      for i = 1, 3 do list[i] = outcome(c:send(request())) end
      c:close()
      return list
    end,
  },

  keepalive = {
    run = function(ctx)
      local c = client(ctx)
      local list = {}
      for i = 1, 5 do list[i] = outcome(c:send(request{ ext_interaction_id = i })) end
      local n = c:connections()
      c:close()
      return { results = list, connects = n }
    end,
  },

  reconnect = {
    script = function() return { { status = 200, close = true }, { status = 200 } } end,
    run = function(ctx)
      local c = client(ctx)
      local a, b = outcome(c:send(request())), outcome(c:send(request()))
      local n = c:connections()
      c:close()
      return { first = a, second = b, connects = n }
    end,
  },

  status_400 = status_case(400), status_401 = status_case(401), status_403 = status_case(403),
  status_404 = status_case(404), status_408 = status_case(408), status_429 = status_case(429),
  status_500 = status_case(500), status_503 = status_case(503),

  text_400 = {
    script = function()
      return { { status = 400, body = "Channel is in manual mode", headers = { ["Content-Type"] = "text/plain" } } }
    end,
    run = function(ctx) return one(ctx) end,
  },

  auth_production = {
    script = function() return { { status = 403 } } end,
    run = function(ctx) return one(ctx, { mode = "production" }) end,
  },

  redacted = {
    script = function() return { { status = 400, body = "bad key " .. C.TEST_KEY .. " for channel" } } end,
    run = function(ctx) return one(ctx) end,
  },

  timeout = {
    script = function() return { { delay = 2 } } end,
    run = function(ctx)
      local t0 = ctx.clock()
      local o = one(ctx, { timeout = 0.3, retry = { attempts = 1 } })
      o.quick = ctx.clock() - t0 < 1.5
      return o
    end,
  },

  drop = {
    script = function() return { { drop = true } } end,
    run = function(ctx) return one(ctx, { retry = { attempts = 1 } }) end,
  },

  refused = {
    run = function(ctx) return one(ctx, { base_url = "http://127.0.0.1:1", retry = { attempts = 2 } }) end,
  },

  retries = {
    script = function()
      return { { status = 503 }, { status = 502 }, { status = 200, body = { request_id = "r9" } } }
    end,
    run = function(ctx) return one(ctx, { retry = { attempts = 3, base_delay = 0.1, max_delay = 5 } }) end,
  },

  give_up = {
    script = function() return { { status = 500 }, { status = 500 }, { status = 500 }, { status = 200 } } end,
    run = function(ctx) return one(ctx) end,
  },

  retry_failures = {
    script = function() return { { delay = 1 }, { drop = true }, { status = 200 } } end,
    run = function(ctx) return one(ctx, { timeout = 0.3 }) end,
  },

  retry_after = {
    script = function()
      return { { status = 429, headers = { ["Retry-After"] = "2" } },
               { status = 429, headers = { ["Retry-After"] = "120" } }, { status = 200 } }
    end,
    run = function(ctx) return one(ctx, { retry = { attempts = 3, base_delay = 0.01, max_delay = 10 } }) end,
  },

  retry_after_date = {
    script = function(p)
      return { { status = 503, headers = { ["Retry-After"] = p.date } }, { status = 200 } }
    end,
    run = function(ctx)
      local o = one(ctx, { retry = { attempts = 2, max_delay = 30 } })
      local s = o.sleeps[1]
      o.sleeps = { s ~= nil and s >= 2 and s <= 4 }   -- the exact value depends on the second
      return o
    end,
  },

  -- A canned answer from a raw socket server (params.base_url points at it): one attempt.
  canned = {
    run = function(ctx) return one(ctx, { retry = { attempts = 1 } }) end,
  },

  -- Two sends; the server drops the kept-alive connection as the second one arrives.
  stale = {
    run = function(ctx)
      local c = client(ctx, { retry = { attempts = 1 } })
      local a, b = outcome(c:send(request())), outcome(c:send(request()))
      local n = c:connections()
      c:close()
      return { first = a, second = b, connects = n }
    end,
  },

  -- TLS: two sends over one verified connection (ctx.ca_file for libcurl).
  tls = {
    run = function(ctx)
      local c = client(ctx)
      local a, b = outcome(c:send(request())), outcome(c:send(request()))
      local n = c:connections()
      c:close()
      a.request_id, b.request_id, a.body, b.body = nil, nil, nil, nil
      return { first = a, second = b, connects = n }
    end,
  },
}

-- Options for stella.new, good and bad: each transport must accept the same ones and
-- refuse (or raise on) the others with the same words. name -> options.
C.OPTIONS = {
  space_in_key = { api_key = "abc def" .. C.TEST_KEY },
  crlf_in_key = { api_key = "a\r\nX-Evil: 1" },
  nul_in_key = { api_key = "abc\0" .. C.TEST_KEY },          -- refused, never cut off at the NUL
  non_ascii_key = { api_key = "clé" },
  empty_key = { api_key = "" },
  long_key = { api_key = string.rep("k", 401) },
  key_400_ok = { api_key = string.rep("k", 400) },
  http_remote = { api_key = C.TEST_KEY, base_url = "http://api.example.com" },
  http_10 = { api_key = "k", base_url = "http://10.0.0.1" },
  http_like_loopback = { api_key = "k", base_url = "http://127.0.0.1.example.com" },
  query = { api_key = "k", base_url = "https://acme.api.stellaconnect.net/?x=1" },
  fragment = { api_key = "k", base_url = "https://acme.api.stellaconnect.net/#top" },
  userinfo = { api_key = "k", base_url = "https://user:pw@acme.api.stellaconnect.net" },
  empty_userinfo = { api_key = "k", base_url = "https://@acme.api.stellaconnect.net" },
  nul_in_url = { api_key = "k", base_url = "http://127.0.0.1:9\0.example.com" },
  space_in_host = { api_key = "k", base_url = "https://acme .api.stellaconnect.net" },
  no_scheme = { api_key = "k", base_url = "acme.api.stellaconnect.net" },
  port_0 = { api_key = "k", base_url = "http://127.0.0.1:0" },
  port_too_big = { api_key = "k", base_url = "http://127.0.0.1:65536" },
  ftp = { api_key = "k", base_url = "ftp://127.0.0.1" },
  crlf_user_agent = { api_key = "k", user_agent = "bridge/1\r\nX-Evil: 1" },
  number_base_url = { api_key = "k", base_url = 443 },
  number_ca_file = { api_key = "k", ca_file = 1 },
  https_ok = { api_key = "k", base_url = "https://acme.api.stellaconnect.net" },
  path_ok = { api_key = "k", base_url = "https://acme.api.stellaconnect.net/base/" },
  upper_case_ok = { api_key = "k", base_url = "HTTPS://Acme.API.StellaConnect.net:8443" },
  localhost_ok = { api_key = "k", base_url = "http://localhost:9" },
  v6_ok = { api_key = "k", base_url = "http://[::1]:9" },
  loopback_ok = { api_key = "k", base_url = "http://127.0.0.2:9" },
  user_agent_ok = { api_key = "k", user_agent = "helpdesk bridge/2 (+https://example.com)" },
}

-- What stella.new refuses, and how (no key in any message): name -> { refused, message,
-- leaked, says_https }.
C.cases.refusals = {
  run = function(ctx)
    local out = {}
    for name, opts in pairs(C.OPTIONS) do
      local o = { transport = ctx.transport }
      for k, v in pairs(opts) do o[k] = v end
      local ok, c = pcall(ctx.stella.new, o)
      local msg = ok and "" or tostring(c)
      out[name] = { refused = not ok, message = msg, leaked = key_leaked(msg),
                    says_https = msg:find("https", 1, true) ~= nil }
      if ok then c:close() end
    end
    return out
  end,
}

-- The store interface, step by step: what each call returns. Run against the memory
-- store by busted and against the shdict store inside nginx; the two must agree.
-- T0 is "now" (the real time: shdict marks expire on the real clock).
function C.store_script(s, T0)
  local obs = {}
  local function rec(name, ...)
    local n = select("#", ...)
    local vals = { ... }
    for i = 1, n do if vals[i] == nil then vals[i] = "<nil>" end end
    obs[#obs + 1] = { name, vals }
  end

  local h = s:hash_email(" Jane@Example.COM\n")
  rec("hash", h == s:hash_email("jane@example.com"), #h, h ~= s:hash_email("jim@example.com"))

  rec("no mark", s:get_mark("suppress|x|" .. h, T0))
  rec("put", s:put_mark("suppress|x|" .. h, T0 + 100))
  rec("active", s:get_mark("suppress|x|" .. h, T0))
  rec("over", s:get_mark("suppress|x|" .. h, T0 + 100))
  rec("overwrite", s:put_mark("suppress|x|" .. h, T0 + 200), s:get_mark("suppress|x|" .. h, T0))

  local function item(fields)
    local it = { kind = "request", body = '{"a":1}', created_at = T0, next_at = T0 }
    for k, v in pairs(fields or {}) do it[k] = v end
    return it
  end
  local id1 = s:atomic(function()
    local id = s:enqueue(item{ brand = "b", event_id = 7, customer_hash = "h-7" })
    s:put_mark("once|b|7", T0 + 50, id)
    s:put_mark("suppress|b|" .. h, T0 + 60, id)
    return id
  end)
  rec("reserved", id1, s:get_mark("once|b|7", T0))
  rec("confirm", s:confirm_marks(id1), s:get_mark("once|b|7", T0))
  rec("confirmed too", s:get_mark("suppress|b|" .. h, T0))
  rec("confirm again", s:confirm_marks(id1))

  local id2 = s:enqueue(item{ next_at = T0 - 5, interaction_id = "i-8" })
  s:put_mark("once|b|8", T0 + 50, id2)
  rec("release", s:release_marks(id2), s:get_mark("once|b|8", T0))

  s:put_mark("k3", T0 + 10, "res-1")
  rec("string reservation", s:get_mark("k3", T0))
  rec("confirm string", s:confirm_marks("res-1"), s:get_mark("k3", T0))

  local ok, err = pcall(s.atomic, s, function()
    s:put_mark("rb", T0 + 10)
    s:set_meta("m", "x")
    s:enqueue(item())
    error("boom", 0)
  end)
  rec("rollback", ok, tostring(err), s:get_mark("rb", T0), s:get_meta("m"))
  rec("nested", s:atomic(function() return s:atomic(function() return 1, nil, 3 end) end))

  rec("unsubscribe", s:unsubscribe(h, T0), s:unsubscribe(h, T0 + 1), s:is_unsubscribed(h),
      s:unsubscribed_count())
  rec("resubscribe", s:resubscribe(h), s:resubscribe(h), s:is_unsubscribed(h), s:unsubscribed_count())

  local function ids(list) local out = {} for i, it in ipairs(list) do out[i] = it.id end return out end
  rec("queued", ids(s:outbox("queued")), s:outbox_counts())
  local first = s:claim(T0, 300, 1)
  rec("claim one", first)
  rec("claim rest", ids(s:claim(T0, 300)))
  rec("claim none", ids(s:claim(T0 + 1, 300)))
  rec("claim after lease", ids(s:claim(T0 + 301, 300, 10)))
  rec("reschedule", s:reschedule(id1, T0 + 5, 2, "HTTP 503"), s:outbox("queued"))
  rec("kill", s:kill(id2, "gave up", T0 + 2), s:outbox("dead"), s:outbox_counts())
  rec("revive", s:reschedule(id2, T0 + 9), s:outbox_counts(), s:kill(id2, "again", T0 + 3))
  rec("finish", s:finish(id1), s:finish(id1), s:reschedule(999, T0), s:kill(999, "x", T0))
  rec("counts after", s:outbox_counts(), ids(s:outbox("dead", 5)))

  s:record{ time = T0, status = "sent", event_id = "e1", request_id = "r1", attempts = 1, customer_hash = "h-1" }
  s:record{ time = T0 + 1, status = "failed", reason = "server", error_kind = "server", detail = 503 }
  s:record{ time = T0 + 1, status = "suppressed", reason = "suppressed", event_id = 3 }
  s:record{ time = T0 + 4000, status = "invalid", reason = "invalid_request" }
  rec("ledger", s:ledger())
  rec("ledger failed", s:ledger{ status = "failed" })
  rec("ledger limit", s:ledger{ limit = 1 }, s:ledger{ since = T0 + 1, limit = 10 })
  rec("counts", s:counts(), s:counts{ since = T0 + 2 })
  rec("rate", s:rate{ bucket = 3600, since = T0 - T0 % 3600 })

  rec("meta", s:set_meta("last_alert", 12.5), s:get_meta("last_alert"), s:set_meta("n", 7), s:get_meta("n"),
      s:set_meta("n", nil), s:get_meta("n"))

  rec("misuse", (pcall(s.put_mark, s, "", T0)), (pcall(s.get_mark, s, "k", "now")),
      (pcall(s.enqueue, s, { kind = "x" })), (pcall(s.record, s, { time = T0, status = "nope" })))
  rec("close", s:close(), (pcall(s.get_meta, s, "x")))
  return obs
end

return C
