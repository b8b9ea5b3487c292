-- LuaRocks rockspec for lua-stella (builtin build type; libcurl as an external dependency).
--   luarocks make rockspec/stella-scm-1.rockspec
--   luarocks --lua-version 5.4 --tree ./tree make rockspec/stella-scm-1.rockspec
rockspec_format = "3.0"
package = "stella"
version = "scm-1"
source = {
  url = "git+https://github.com/lua-stella/lua-stella.git",
  branch = "main",
}
description = {
  summary = "Stella Connect (Medallia Agent Connect) Requests API client with a C core",
  detailed = [[
Validates feedback requests exactly as the service's schema defines them, encodes
them as canonical JSON and sends them over libcurl, with retries and typed errors.
Trigger rules in editable Lua, state stores and a `stella` command build on it.
]],
  homepage = "https://github.com/lua-stella/lua-stella",
  license = "MIT",
}
dependencies = {
  "lua >= 5.1, < 5.5",
  "lua-cjson >= 2.1",
  "luadbi-sqlite3 >= 0.7.2",
}
external_dependencies = {
  CURL = { header = "curl/curl.h", library = "curl" },
}
build = {
  type = "builtin",
  modules = {
    ["stella.core"] = {
      sources = {
        "csrc/stella_value.c", "csrc/stella_text.c", "csrc/stella_codes.c",
        "csrc/stella_schema.c", "csrc/stella_validate.c", "csrc/stella_json.c",
        "csrc/stella_outcome.c", "csrc/stella_http.c", "csrc/stella_sender.c", "csrc/stella_sha256.c",
        "csrc/stella_parse.c", "csrc/lstella.c", "csrc/lstella_http.c", "csrc/lstella_decode.c",
      },
      incdirs = { "csrc", "$(CURL_INCDIR)" },
      libdirs = { "$(CURL_LIBDIR)" },
      libraries = { "curl", "pthread" },
    },
    ["stella"] = "lua/stella/init.lua",
    ["stella.client"] = "lua/stella/client.lua",
    ["stella.error"] = "lua/stella/error.lua",
    ["stella.transport.curl"] = "lua/stella/transport/curl.lua",
    ["stella.rules"] = "lua/stella/rules.lua",
    ["stella.keys"] = "lua/stella/keys.lua",
    ["stella.trigger"] = "lua/stella/trigger/init.lua",
    ["stella.trigger.decide"] = "lua/stella/trigger/decide.lua",
    ["stella.trigger.send"] = "lua/stella/trigger/send.lua",
    ["stella.trigger.settle"] = "lua/stella/trigger/settle.lua",
    ["stella.trigger.rows"] = "lua/stella/trigger/rows.lua",
    ["stella.trigger.pipeline"] = "lua/stella/trigger/pipeline.lua",
    ["stella.trigger.flush"] = "lua/stella/trigger/flush.lua",
    ["stella.trigger.alert"] = "lua/stella/trigger/alert.lua",
    ["stella.store"] = "lua/stella/store/init.lua",
    ["stella.store.memory"] = "lua/stella/store/memory.lua",
    ["stella.store.sqlite"] = "lua/stella/store/sqlite.lua",
    ["stella.store.shdict"] = "lua/stella/store/shdict.lua",
    ["stella.transport.cosocket"] = "lua/stella/transport/cosocket.lua",
    ["stella.openresty.queue"] = "lua/stella/openresty/queue.lua",
    ["stella.openresty.consumers"] = "lua/stella/openresty/consumers.lua",
    ["stella.openresty.spool"] = "lua/stella/openresty/spool.lua",
    ["stella.openresty.service"] = "lua/stella/openresty/service.lua",
    ["stella.nginx"] = "lua/stella/nginx.lua",
    ["stella.sandbox"] = "lua/stella/sandbox/init.lua",
    ["stella.sandbox.config"] = "lua/stella/sandbox/config.lua",
    ["stella.sandbox.server"] = "lua/stella/sandbox/server.lua",
    ["stella.sandbox.status"] = "lua/stella/sandbox/status.lua",
    ["stella.input"] = "lua/stella/input.lua",
    ["stella.cli"] = "lua/stella/cli/init.lua",
    ["stella.cli.args"] = "lua/stella/cli/args.lua",
    ["stella.cli.context"] = "lua/stella/cli/context.lua",
    ["stella.cli.events"] = "lua/stella/cli/events.lua",
    ["stella.cli.progress"] = "lua/stella/cli/progress.lua",
    ["stella.cli.setup"] = "lua/stella/cli/setup.lua",
    ["stella.cli.table"] = "lua/stella/cli/table.lua",
    ["stella.cli.trigger"] = "lua/stella/cli/trigger.lua",
    ["stella.cli.send"] = "lua/stella/cli/send.lua",
    ["stella.cli.validate"] = "lua/stella/cli/validate.lua",
    ["stella.cli.status"] = "lua/stella/cli/status.lua",
    ["stella.cli.retry"] = "lua/stella/cli/retry.lua",
    ["stella.cli.unsubscribe"] = "lua/stella/cli/unsubscribe.lua",
    ["stella.cli.sandbox"] = "lua/stella/cli/sandbox.lua",
    ["stella.cli.help"] = "lua/stella/cli/help.lua",
  },
  install = {
    bin = { stella = "bin/stella" },
    -- the sandbox's nginx template, default company and status page, installed beside
    -- its modules (stella/sandbox/files/ in the tree's Lua directory), where
    -- stella.sandbox finds them. A key's last part names nothing: the file keeps its
    -- name. Its nginx also needs the C core built for LuaJIT: `make LUA=luajit` in a
    -- checkout, then STELLA_SANDBOX_CORE=DIR (the directory holding stella/core.so).
    lua = {
      ["stella.sandbox.files.nginx_conf"] = "lua/stella/sandbox/files/nginx.conf",
      ["stella.sandbox.files.config"] = "lua/stella/sandbox/files/config.lua",
      ["stella.sandbox.files.status_html"] = "lua/stella/sandbox/files/status.html",
      ["stella.sandbox.files.status_css"] = "lua/stella/sandbox/files/status.css",
      ["stella.sandbox.files.status_js"] = "lua/stella/sandbox/files/status.js",
    },
  },
}
test = {
  type = "command",
  command = "make test",
}
