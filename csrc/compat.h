/* compat.h - the few Lua C API differences between Lua 5.1/LuaJIT and 5.4
 * that the binding touches. */
#ifndef STELLA_COMPAT_H
#define STELLA_COMPAT_H

#include <lua.h>
#include <lauxlib.h>

#if LUA_VERSION_NUM == 501
/* LuaJIT reports 501: no luaL_setfuncs/luaL_newlib/lua_rawlen/integers. */
static inline void compat_setfuncs(lua_State *L, const luaL_Reg *l, int nup) {
  luaL_checkstack(L, nup + 1, "too many upvalues");
  for (; l->name != NULL; l++) {
    int i;
    for (i = 0; i < nup; i++) lua_pushvalue(L, -nup);
    lua_pushcclosure(L, l->func, nup);
    lua_setfield(L, -(nup + 2), l->name);
  }
  lua_pop(L, nup);
}
#define stella_setfuncs compat_setfuncs
#define stella_rawlen(L, i) lua_objlen(L, (i))
#define stella_isinteger(L, i) 0
#define stella_tointeger(L, i) ((long long)lua_tointeger(L, (i)))
#else
#define stella_setfuncs luaL_setfuncs
#define stella_rawlen(L, i) lua_rawlen(L, (i))
#define stella_isinteger(L, i) lua_isinteger(L, (i))
#define stella_tointeger(L, i) ((long long)lua_tointeger(L, (i)))
#endif

#endif
