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
        "csrc/stella_http.c", "csrc/stella_sender.c", "csrc/stella_sha256.c",
        "csrc/stella_parse.c", "csrc/lstella.c",
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
    ["stella.trigger"] = "lua/stella/trigger.lua",
    ["stella.store"] = "lua/stella/store/init.lua",
    ["stella.store.rows"] = "lua/stella/store/rows.lua",
    ["stella.store.lists"] = "lua/stella/store/lists.lua",
    ["stella.store.memory"] = "lua/stella/store/memory.lua",
    ["stella.store.sqlite"] = "lua/stella/store/sqlite.lua",
    ["stella.store.shdict"] = "lua/stella/store/shdict.lua",
    ["stella.transport.cosocket"] = "lua/stella/transport/cosocket.lua",
    ["stella.nginx"] = "lua/stella/nginx.lua",
    ["stella.sandbox"] = "lua/stella/sandbox/init.lua",
    ["stella.sandbox.config"] = "lua/stella/sandbox/config.lua",
    ["stella.sandbox.server"] = "lua/stella/sandbox/server.lua",
    ["stella.sandbox.status"] = "lua/stella/sandbox/status.lua",
    ["stella.input"] = "lua/stella/input.lua",
    ["stella.cli"] = "lua/stella/cli.lua",
  },
  install = {
    bin = { stella = "bin/stella" },
  },
  -- the sandbox's nginx template, default company and status page: stella.sandbox finds
  -- them in the rock's directory (TREE/lib/luarocks/rocks-VERSION/stella/VERSION/sandbox).
  -- Its nginx also needs the C core built for LuaJIT: `make LUA=luajit` in a checkout, then
  -- STELLA_SANDBOX_CORE=DIR (the directory holding stella/core.so).
  copy_directories = { "sandbox" },
}
test = {
  type = "command",
  command = "make test",
}
