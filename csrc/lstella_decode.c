/* lstella_decode.c - stella.core.decode_json: JSON text -> Lua values through the core's
 * strict parser (stella_parse_json), for readers of export files and request bodies.
 *
 *   decode_json(text [, opts]) -> value | nil, err
 *
 * - Objects become tables keyed by their member names, arrays sequences 1..n.
 * - A repeated key in an object is an error (code "duplicate_key"), not last-wins.
 * - Integers (no fraction, no exponent) within +-2^53 are Lua numbers (integers under
 *   Lua 5.4); larger ones within the 64-bit range are their exact decimal string, so
 *   that the id the service receives is the one written, under Lua 5.4 and LuaJIT
 *   alike (the encoder sends integer ids as decimal strings anyway). Other numbers,
 *   and integer literals beyond the 64-bit range, are floats.
 * - null is dropped (a member left out, an array item left out, the rest shifted down)
 *   unless opts.null gives a value to stand for it (cjson.null, ngx.null, ...).
 * - err = { code = "syntax" | "depth" | "duplicate_key", message = "...", line = L,
 *   column = C, offset = O (0-based bytes), path = "customer.email" (duplicate_key) }.
 *   line and column are 1-based, the column counting characters (UTF-8 lead bytes); a
 *   duplicate key written with escapes has no position (line/column/offset nil).
 *
 * Memory: the parse tree lives in an arena owned by a userdata upvalue (freed by its
 * __gc), so the Lua errors that building tables may raise (out of memory) leak nothing.
 * The tree is at most STELLA_JSON_MAX_DEPTH deep, so the builder may recurse; it checks
 * the Lua stack at each level. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <lua.h>
#include <lauxlib.h>
#include "stella.h"
#include "lstella_decode.h"

#define DECODE_MT "stella.decode_scratch"
#define BIG_DOCUMENT (1u << 20)   /* after a parse this big, give the arena's memory back */
#define MAX_SAFE 9007199254740992LL   /* 2^53: beyond, a double no longer holds every integer */

typedef struct decoder {
  lua_State *L;
  const char *text;
  size_t len;
  int null_idx;                                  /* opts.null's stack index, or 0: drop */
  const stella_value *path[STELLA_JSON_MAX_DEPTH + 1];  /* keys (or item keys) above */
  int depth;
  const stella_value *dup;                       /* the repeated key, once found */
} decoder;

static int decode_scratch_gc(lua_State *L) {
  stella_arena *a = (stella_arena *)luaL_checkudata(L, 1, DECODE_MT);
  stella_arena_free(a);
  return 0;
}

static int push_value(decoder *d, const stella_value *v);

static void push_number(lua_State *L, const stella_value *v) {
  if (!v->u.number.is_int) {
    lua_pushnumber(L, (lua_Number)v->u.number.num);
  } else if (v->u.number.i >= -MAX_SAFE && v->u.number.i <= MAX_SAFE) {
#if LUA_VERSION_NUM >= 503
    lua_pushinteger(L, (lua_Integer)v->u.number.i);
#else
    lua_pushnumber(L, (lua_Number)v->u.number.i);   /* exact: within 2^53 */
#endif
  } else {
    char buf[32];
    int n = snprintf(buf, sizeof buf, "%lld", v->u.number.i);
    lua_pushlstring(L, buf, (size_t)(n > 0 ? n : 0));
  }
}

/* An object: { key = value, ... } with repeated keys refused. Nulls (when dropped) are
 * first stored as a placeholder so that a key repeated after a null is seen too. */
static int push_object(decoder *d, const stella_value *v) {
  lua_State *L = d->L;
  size_t i, n = v->u.table.count;
  int t, nulls = 0;
  lua_createtable(L, 0, n > (size_t)0x7fffffff ? 0x7fffffff : (int)n);
  t = lua_gettop(L);
  for (i = 0; i < n; i++) {
    const stella_pair *p = &v->u.table.pairs[i];
    lua_pushlstring(L, p->key.u.string.ptr, p->key.u.string.len);
    lua_pushvalue(L, -1);
    lua_rawget(L, t);
    if (!lua_isnil(L, -1)) {
      d->path[d->depth] = &p->key;
      d->depth++;
      d->dup = &p->key;
      return 0;
    }
    lua_pop(L, 1);
    if (p->value.type == STELLA_NULL && d->null_idx == 0) {
      lua_pushlightuserdata(L, NULL);
      nulls = 1;
    } else {
      d->path[d->depth++] = &p->key;
      if (!push_value(d, &p->value)) return 0;
      d->depth--;
    }
    lua_rawset(L, t);
  }
  if (nulls) {
    for (i = 0; i < n; i++) {
      const stella_pair *p = &v->u.table.pairs[i];
      if (p->value.type != STELLA_NULL) continue;
      lua_pushlstring(L, p->key.u.string.ptr, p->key.u.string.len);
      lua_pushnil(L);
      lua_rawset(L, t);
    }
  }
  return 1;
}

static int push_array(decoder *d, const stella_value *v) {
  lua_State *L = d->L;
  size_t i, n = v->u.table.count;
  int t, k = 0;
  lua_createtable(L, n > (size_t)0x7fffffff ? 0x7fffffff : (int)n, 0);
  t = lua_gettop(L);
  for (i = 0; i < n; i++) {
    const stella_pair *p = &v->u.table.pairs[i];
    if (p->value.type == STELLA_NULL && d->null_idx == 0) continue;
    d->path[d->depth++] = &p->key;
    if (!push_value(d, &p->value)) return 0;
    d->depth--;
    lua_rawseti(L, t, ++k);
  }
  return 1;
}

/* Pushes v (one value on the stack); 0 when a duplicate key was found (d->dup). */
static int push_value(decoder *d, const stella_value *v) {
  lua_State *L = d->L;
  switch (v->type) {
    case STELLA_TABLE:
      luaL_checkstack(L, 6, "JSON document too deep");
      return v->u.table.shape == STELLA_SHAPE_ARRAY ? push_array(d, v) : push_object(d, v);
    case STELLA_STRING:
      lua_pushlstring(L, v->u.string.ptr, v->u.string.len);
      return 1;
    case STELLA_NUMBER:
      push_number(L, v);
      return 1;
    case STELLA_BOOL:
      lua_pushboolean(L, v->u.boolean);
      return 1;
    case STELLA_NULL:
      if (d->null_idx) lua_pushvalue(L, d->null_idx);
      else lua_pushnil(L);   /* only a document that is null itself gets here */
      return 1;
    default:
      lua_pushnil(L);
      return 1;
  }
}

/* Sets err.line, err.column and err.offset (table at -1) for byte `offset` of the text. */
static void set_position(lua_State *L, const char *text, size_t offset) {
  size_t line = 1, column = 1, i;
  for (i = 0; i < offset; i++) {
    unsigned char c = (unsigned char)text[i];
    if (c == '\n') {
      line++;
      column = 1;
    } else if ((c & 0xC0) != 0x80) {
      column++;
    }
  }
  lua_pushinteger(L, (lua_Integer)line);
  lua_setfield(L, -2, "line");
  lua_pushinteger(L, (lua_Integer)column);
  lua_setfield(L, -2, "column");
  lua_pushinteger(L, (lua_Integer)offset);
  lua_setfield(L, -2, "offset");
}

/* The dotted path of the keys in d->path: customer.email, tags[2].x */
static void push_path(decoder *d) {
  lua_State *L = d->L;
  luaL_Buffer b;
  int i;
  luaL_buffinit(L, &b);
  for (i = 0; i < d->depth; i++) {
    const stella_value *k = d->path[i];
    if (k->type == STELLA_STRING) {
      if (i > 0) luaL_addchar(&b, '.');
      luaL_addlstring(&b, k->u.string.ptr, k->u.string.len);
    } else {
      char num[32];
      int n = snprintf(num, sizeof num, "[%lld]", k->u.number.i);
      luaL_addlstring(&b, num, (size_t)(n > 0 ? n : 0));
    }
  }
  luaL_pushresult(&b);
}

static int decode_json(lua_State *L) {
  stella_arena *a = (stella_arena *)lua_touserdata(L, lua_upvalueindex(1));
  decoder d;
  stella_value root;
  stella_parse_error perr;
  int rc, base;
  d.text = luaL_checklstring(L, 1, &d.len);
  d.null_idx = 0;
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_getfield(L, 2, "null");
    if (!lua_isnil(L, -1)) d.null_idx = lua_gettop(L);
    else lua_pop(L, 1);
  }
  d.L = L;
  d.depth = 0;
  d.dup = NULL;
  base = lua_gettop(L);
  stella_arena_reset(a);
  rc = stella_parse_json(a, d.text, d.len, &root, &perr);
  if (rc < 0) {
    stella_arena_free(a);
    return luaL_error(L, "not enough memory");
  }
  if (rc > 0) {
    int deep = strcmp(perr.message, "nesting too deep") == 0;
    lua_pushnil(L);
    lua_createtable(L, 0, 6);
    lua_pushstring(L, deep ? "depth" : "syntax");
    lua_setfield(L, -2, "code");
    if (deep) lua_pushfstring(L, "nesting too deep (more than %d levels)", STELLA_JSON_MAX_DEPTH);
    else lua_pushstring(L, perr.message);
    lua_setfield(L, -2, "message");
    set_position(L, d.text, perr.offset);
    if (d.len >= BIG_DOCUMENT) stella_arena_free(a);
    return 2;
  }
  if (!push_value(&d, &root)) {
    uintptr_t at = (uintptr_t)d.dup->u.string.ptr, start = (uintptr_t)d.text;
    lua_settop(L, base);
    lua_pushnil(L);
    lua_createtable(L, 0, 6);
    lua_pushliteral(L, "duplicate_key");
    lua_setfield(L, -2, "code");
    push_path(&d);
    lua_pushfstring(L, "duplicate key \"%s\"", lua_tostring(L, -1));
    lua_setfield(L, -3, "message");
    lua_setfield(L, -2, "path");
    /* an unescaped key points into the text: its opening quote is one byte before */
    if (at > start && at <= start + d.len) set_position(L, d.text, (size_t)(at - start) - 1);
    if (d.len >= BIG_DOCUMENT) stella_arena_free(a);
    return 2;
  }
  if (d.len >= BIG_DOCUMENT) stella_arena_free(a);
  return 1;
}

void stella_open_decode(lua_State *L) {
  stella_arena *a;
  if (luaL_newmetatable(L, DECODE_MT)) {
    lua_pushcfunction(L, decode_scratch_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  a = (stella_arena *)lua_newuserdata(L, sizeof *a);
  stella_arena_init(a);
  luaL_getmetatable(L, DECODE_MT);
  lua_setmetatable(L, -2);
  lua_pushcclosure(L, decode_json, 1);
  lua_setfield(L, -2, "decode_json");
}
