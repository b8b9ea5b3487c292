/* lstella_decode.h - stella.core.decode_json (lstella_decode.c). */
#ifndef LSTELLA_DECODE_H
#define LSTELLA_DECODE_H

#include <lua.h>
#include <lauxlib.h>

/* Adds decode_json to the table at the top of the stack. */
void stella_open_decode(lua_State *L);

#endif
