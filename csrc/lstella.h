/* lstella.h - what the two files of the Lua binding share (not a public header). */
#ifndef LSTELLA_H
#define LSTELLA_H

#include "compat.h"
#include "stella.h"

/* Registers the sending half (lstella_http.c) in the module table on top of the stack:
 * the stella.http and stella.sender classes and their constructors, the retry helpers. */
void lstella_open_http(lua_State *L);

#endif
