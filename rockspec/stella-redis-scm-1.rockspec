-- LuaRocks rockspec for stella.redis.core: the Redis connection for plain Lua, a C module
-- over hiredis. Separate from the stella rock because LuaRocks makes an external
-- dependency mandatory for the whole rock: users of the HTTP client alone, and OpenResty
-- (where stella.redis uses cosockets), need no hiredis. stella.redis itself (Lua) is in
-- the stella rock.
--   luarocks make rockspec/stella-redis-scm-1.rockspec HIREDIS_INCDIR=/usr/include HIREDIS_LIBDIR=...
rockspec_format = "3.0"
package = "stella-redis"
version = "scm-1"
source = {
  url = "git+https://github.com/lua-stella/lua-stella.git",
  branch = "main",
}
description = {
  summary = "The Redis connection of lua-stella for plain Lua (hiredis)",
  detailed = [[
stella.redis.core: one blocking Redis connection over hiredis, used by stella.redis
outside OpenResty (URLs, AUTH, SELECT, pipelines, Redis 7 Functions, reconnects).
]],
  homepage = "https://github.com/lua-stella/lua-stella",
  license = "MIT",
}
dependencies = {
  "lua >= 5.1, < 5.5",
  "stella",
}
external_dependencies = {
  HIREDIS = { header = "hiredis/hiredis.h", library = "hiredis" },
}
build = {
  type = "builtin",
  modules = {
    ["stella.redis.core"] = {
      sources = { "csrc/lstella_redis.c" },
      incdirs = { "csrc", "$(HIREDIS_INCDIR)" },
      libdirs = { "$(HIREDIS_LIBDIR)" },
      libraries = { "hiredis" },
    },
  },
}
