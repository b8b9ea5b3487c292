-- LuaRocks rockspec for lua-stella. Lua 5.4 or LuaJIT 2.1; no variables needed on Debian
-- and Ubuntu:
--   luarocks --lua-version 5.4 --tree ./tree make rockspec/stella-scm-1.rockspec
--   luarocks --lua-version 5.1 config lua_interpreter luajit     # once, for LuaJIT trees
--   luarocks --lua-version 5.1 --tree ./tree make rockspec/stella-scm-1.rockspec
-- build.type "make": the project's Makefile (`make rock`, `make rock-install`) builds the C
-- core (its sources are listed there, once), finds libcurl's headers with pkg-config and,
-- for a Lua 5.4 tree, also builds the LuaJIT core that `stella sandbox`'s nginx loads.
-- See README, "Installing with LuaRocks".
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
Optional, loaded only by what uses them (a clear message names the package when one is
missing): luadbi-sqlite3 for the SQLite store (stella.store.sqlite, the stella command's
--db FILE), luasocket for the sandbox (stella sandbox).
]],
  homepage = "https://github.com/lua-stella/lua-stella",
  license = "MIT",
}
-- LuaRocks cannot say "LuaJIT or 5.4": the range below admits 5.1 to 5.4 and `make rock`
-- refuses PUC Lua 5.1, 5.2 and 5.3 with a message (neither built nor tested).
dependencies = {
  "lua >= 5.1, < 5.5",
  "lua-cjson >= 2.1",
}
external_dependencies = {
  -- the library only: curl.h is found by pkg-config (Debian's multiarch include directory
  -- is not among the places LuaRocks 3.8 searches for headers)
  CURL = { library = "curl" },
}
build = {
  type = "make",
  build_target = "rock",
  build_variables = {
    ROCK_LUA = "$(LUA)",
    LUA_INCDIR = "$(LUA_INCDIR)",
    CFLAGS = "$(CFLAGS)",
    LIBFLAG = "$(LIBFLAG)",
  },
  install_target = "rock-install",
  install_variables = {
    ROCK_LUA = "$(LUA)",
    ROCK_LIBDIR = "$(LIBDIR)",
    ROCK_LUADIR = "$(LUADIR)",
  },
  install = {
    bin = { stella = "bin/stella" },
  },
}
test = {
  type = "command",
  command = "make test",
}
