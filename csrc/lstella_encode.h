/* lstella_encode.h - the one-pass encoder of stella.encode (lstella_encode.c). */
#ifndef LSTELLA_ENCODE_H
#define LSTELLA_ENCODE_H

#include "compat.h"
#include "stella.h"
#include "stella_schema.h"

/* The schemas' field names as interned Lua strings, by schema id and field index. */
typedef struct lstella_names {
  const char *ptr[STELLA_SCHEMA_COUNT][STELLA_MAX_FIELDS];
} lstella_names;

/* Pushes a table holding the names (keep it alive as long as `nm` is used) and fills nm. */
void lstella_push_names(lua_State *L, lstella_names *nm);

/* Appends the canonical JSON of the request table at stack index idx to `out` and returns
 * 1 when it is valid and met no case left to the value-tree path; returns 0 (out as it
 * was) otherwise, -1 when out of memory. The stack is left as it was. */
int lstella_encode_direct(lua_State *L, int idx, stella_endpoint endpoint, const stella_options *o,
                          const lstella_names *nm, stella_buffer *out);

#endif
