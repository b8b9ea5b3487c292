/* lstella.c - the Lua binding `stella.core`: a thin layer over stella.h. This file
 * opens the module and holds the checking half (validate, encode, their JSON-text forms,
 * small pure helpers); lstella_http.c holds the sending half.
 *
 * Lua tables are converted to stella_value trees in a scratch arena held by an
 * upvalue userdata (so a Lua error never leaks memory and no C global is
 * mutable). Strings are not copied: they stay anchored by the argument table. */
#include <limits.h>
#include <string.h>
#include <curl/curl.h>
#include "lstella.h"
#include "lstella_decode.h"
#include "lstella_encode.h"

#define SCRATCH_MT "stella.scratch"
#define MAX_DEPTH 3   /* the schema is 2 levels deep; below that only the type matters */

typedef struct scratch {
  stella_arena arena;
  stella_buffer json;
  lstella_names names;   /* the field names, anchored by upvalue 2 (lstella_encode.c) */
} scratch;

static scratch *get_scratch(lua_State *L) {
  scratch *s = (scratch *)lua_touserdata(L, lua_upvalueindex(1));
  stella_arena_reset(&s->arena);
  s->json.len = 0;
  s->json.oom = 0;
  return s;
}

static int scratch_gc(lua_State *L) {
  scratch *s = (scratch *)luaL_checkudata(L, 1, SCRATCH_MT);
  stella_arena_free(&s->arena);
  stella_buffer_free(&s->json);
  return 0;
}

/* ---------- Lua -> stella_value ------------------------------------------------ */

static void to_value(lua_State *L, scratch *s, int idx, int depth, stella_value *out);

/* Scalars are written field by field (no builder calls: this is the hot path). */
static void scalar_value(lua_State *L, int idx, stella_value *out) {
  switch (lua_type(L, idx)) {
    case LUA_TSTRING:
      out->type = STELLA_STRING;
      out->u.string.ptr = lua_tolstring(L, idx, &out->u.string.len);
      break;
    case LUA_TNUMBER:
      if (stella_isinteger(L, idx)) *out = stella_int(stella_tointeger(L, idx));
      else *out = stella_double((double)lua_tonumber(L, idx));
      break;
    case LUA_TBOOLEAN:
      out->type = STELLA_BOOL;
      out->u.boolean = lua_toboolean(L, idx);
      break;
    case LUA_TNIL:
      out->type = STELLA_NIL;
      break;
    case LUA_TLIGHTUSERDATA:
      /* cjson.null and ngx.null: JSON null, as stella_parse_json gives it */
      out->type = lua_touserdata(L, idx) == NULL ? STELLA_NULL : STELLA_OTHER;
      break;
    default:
      out->type = STELLA_OTHER;
      break;
  }
}

static stella_pair *grow_pairs(lua_State *L, scratch *s, stella_pair *old, size_t count,
                               size_t *cap) {
  size_t ncap = *cap ? *cap * 2 : 8;
  stella_pair *p = (stella_pair *)stella_arena_alloc(&s->arena, ncap * sizeof *p);
  if (p == NULL) luaL_error(L, "not enough memory");
  if (count) memcpy(p, old, count * sizeof *p);
  *cap = ncap;
  return p;
}

/* One pass: the sequence part 1..n first, in order, then every other key. */
static void to_table(lua_State *L, scratch *s, int idx, int depth, stella_value *out) {
  size_t n = (size_t)stella_rawlen(L, idx), k = 0, cap = 0, i;
  stella_pair *pairs = NULL;
  out->type = STELLA_TABLE;
  out->u.table.pairs = NULL;
  out->u.table.count = 0;
  out->u.table.shape = STELLA_SHAPE_ANY;   /* a Lua table: {} is an object or a list */
  if (depth >= MAX_DEPTH) return;   /* deep values are only ever type errors */
  if (n > 0) {
    cap = n;
    pairs = (stella_pair *)stella_arena_alloc(&s->arena, cap * sizeof *pairs);
    if (pairs == NULL) luaL_error(L, "not enough memory");
  }
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, idx, (int)i);
    if (lua_isnil(L, -1)) { lua_pop(L, 1); n = i - 1; break; }
    pairs[k].key = stella_int((long long)i);
    to_value(L, s, lua_gettop(L), depth + 1, &pairs[k].value);
    lua_pop(L, 1);
    k++;
  }
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int top = lua_gettop(L);
    if (n > 0 && lua_type(L, top - 1) == LUA_TNUMBER) {
      lua_Number d = lua_tonumber(L, top - 1);
      if (d >= 1 && d <= (lua_Number)n && (lua_Number)(size_t)d == d) { lua_pop(L, 1); continue; }
    }
    if (k == cap) pairs = grow_pairs(L, s, pairs, k, &cap);
    scalar_value(L, top - 1, &pairs[k].key);
    to_value(L, s, top, depth + 1, &pairs[k].value);
    k++;
    lua_pop(L, 1);
  }
  out->u.table.pairs = pairs;
  out->u.table.count = k;
}

static void to_value(lua_State *L, scratch *s, int idx, int depth, stella_value *out) {
  if (lua_type(L, idx) == LUA_TTABLE) {
    luaL_checkstack(L, 4, "request too deep");
    to_table(L, s, idx, depth, out);
  } else {
    scalar_value(L, idx, out);
  }
}

/* ---------- validate / encode --------------------------------------------------- */

static stella_endpoint check_endpoint(lua_State *L, int idx) {
  static const char *const endpoints[] = { "request", "recovery", NULL };
  if (lua_isnoneornil(L, idx)) return STELLA_REQUEST;
  return luaL_checkoption(L, idx, "request", endpoints) == 1 ? STELLA_RECOVERY : STELLA_REQUEST;
}

/* The allowed channels of an options table at idx: { channels = {"phone","chat"} } or
 * { channels = { phone = true } }. The channel table is left on the stack so that the
 * name strings stay anchored while they are used. */
static void check_channels(lua_State *L, scratch *s, int idx, stella_options *o) {
  size_t n = 0, cap;
  const char **list;
  int t;
  o->channels = NULL;
  o->channel_count = 0;
  if (idx == 0) return;
  lua_getfield(L, idx, "channels");
  t = lua_gettop(L);
  if (lua_isnil(L, t)) return;
  if (!lua_istable(L, t)) luaL_error(L, "options.channels must be a table");
  cap = (size_t)stella_rawlen(L, t) + 8;
  list = (const char **)stella_arena_alloc(&s->arena, cap * sizeof *list);
  if (list == NULL) luaL_error(L, "not enough memory");
  lua_pushnil(L);
  while (lua_next(L, t)) {
    const char *name = NULL;
    if (lua_type(L, -2) == LUA_TNUMBER && lua_type(L, -1) == LUA_TSTRING)
      name = lua_tostring(L, -1);                     /* list form */
    else if (lua_type(L, -2) == LUA_TSTRING && lua_toboolean(L, -1))
      name = lua_tostring(L, -2);                     /* set form */
    else if (!(lua_type(L, -2) == LUA_TSTRING && !lua_toboolean(L, -1)))
      luaL_error(L, "options.channels must be a list of channel names or a set {name = true}");
    lua_pop(L, 1);
    if (name == NULL) continue;
    if (n == cap) {
      const char **bigger = (const char **)stella_arena_alloc(&s->arena, 2 * cap * sizeof *list);
      if (bigger == NULL) luaL_error(L, "not enough memory");
      memcpy((void *)bigger, (const void *)list, n * sizeof *list);
      list = bigger;
      cap *= 2;
    }
    list[n++] = name;
  }
  o->channels = list;
  o->channel_count = n;
}

/* The violations as the Lua error list: { {path, code, message}, ... } */
static void push_violations(lua_State *L, const stella_violations *e) {
  size_t i;
  lua_createtable(L, (int)e->count, 0);
  for (i = 0; i < e->count; i++) {
    lua_createtable(L, 0, 3);
    lua_pushstring(L, e->items[i].path);
    lua_setfield(L, -2, "path");
    lua_pushstring(L, e->items[i].code);
    lua_setfield(L, -2, "code");
    lua_pushstring(L, e->items[i].message);
    lua_setfield(L, -2, "message");
    lua_rawseti(L, -2, (int)i + 1);
  }
}

/* The arguments after the request: (x), (x, kind), (x, opts) or (x, kind, opts).
 * Sets the endpoint (the Lua argument is called kind); returns the index of the options
 * table (0: none). Leaves the stack at 3 values, plus the channel list when there is one. */
static int check_args(lua_State *L, scratch *s, stella_endpoint *endpoint, stella_options *o) {
  int opts = 0;
  if (lua_istable(L, 2)) {
    *endpoint = STELLA_REQUEST;
    opts = 2;
  } else {
    *endpoint = check_endpoint(L, 2);
    if (lua_istable(L, 3)) opts = 3;
    else if (!lua_isnoneornil(L, 3)) luaL_argerror(L, 3, "options table expected");
  }
  lua_settop(L, 3);
  check_channels(L, s, opts, o);
  return opts;
}

/* Validates req (parsed from text[0..len) when text is not NULL: see stella_validate_parsed);
 * returns 1 if valid, otherwise pushes nil, errors and returns 0. */
static int check_parsed(lua_State *L, scratch *s, stella_endpoint endpoint, const stella_value *req,
                        const stella_options *o, const char *text, size_t len) {
  stella_violations v;
  int n = stella_validate_parsed(&s->arena, endpoint, req, o, &v, text, len);
  if (n < 0) return luaL_error(L, "not enough memory");
  if (n == 0) return 1;
  lua_pushnil(L);
  push_violations(L, &v);
  return 0;
}

static int check_request(lua_State *L, scratch *s, stella_endpoint endpoint, const stella_value *req,
                         const stella_options *o) {
  return check_parsed(L, s, endpoint, req, o, NULL, 0);
}

/* The one pass (lstella_encode.c) into s->json: 1 when it took the request (valid), 0 when
 * it left it to the value-tree path. */
static int encode_direct(lua_State *L, scratch *s, stella_endpoint endpoint, const stella_options *o) {
  int rc = lstella_encode_direct(L, 1, endpoint, o, &s->names, &s->json);
  if (rc < 0) luaL_error(L, "not enough memory");
  return rc;
}

/* validate and encode: the one pass first; whatever it leaves goes the value-tree way,
 * which decides and reports every error (and encodes what the pass left though valid). */
static int l_validate(lua_State *L) {
  scratch *s = get_scratch(L);
  stella_endpoint endpoint;
  stella_options o;
  stella_value req;
  luaL_checktype(L, 1, LUA_TTABLE);
  check_args(L, s, &endpoint, &o);
  if (!encode_direct(L, s, endpoint, &o)) {
    to_value(L, s, 1, 0, &req);
    if (!check_request(L, s, endpoint, &req, &o)) return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int encode_tree(lua_State *L, scratch *s, stella_endpoint endpoint, const stella_options *o) {
  stella_value req;
  to_value(L, s, 1, 0, &req);
  if (!check_request(L, s, endpoint, &req, o)) return 2;
  if (stella_encode_json(endpoint, &req, &s->json) != 0) return luaL_error(L, "not enough memory");
  lua_pushlstring(L, s->json.data, s->json.len);
  return 1;
}

static int l_encode(lua_State *L) {
  scratch *s = get_scratch(L);
  stella_endpoint endpoint;
  stella_options o;
  luaL_checktype(L, 1, LUA_TTABLE);
  check_args(L, s, &endpoint, &o);
  if (!encode_direct(L, s, endpoint, &o)) return encode_tree(L, s, endpoint, &o);
  lua_pushlstring(L, s->json.data, s->json.len);
  return 1;
}

/* For the specs and benchmarks that compare the two ways (same arguments as encode):
 * encode_tree, the value-tree way alone (to_value, stella_validate, stella_encode_json);
 * encode_direct, the one pass alone: the JSON, or false where it gives up. */
static int l_encode_tree(lua_State *L) {
  scratch *s = get_scratch(L);
  stella_endpoint endpoint;
  stella_options o;
  luaL_checktype(L, 1, LUA_TTABLE);
  check_args(L, s, &endpoint, &o);
  return encode_tree(L, s, endpoint, &o);
}

static int l_encode_direct(lua_State *L) {
  scratch *s = get_scratch(L);
  stella_endpoint endpoint;
  stella_options o;
  luaL_checktype(L, 1, LUA_TTABLE);
  check_args(L, s, &endpoint, &o);
  if (!encode_direct(L, s, endpoint, &o)) lua_pushboolean(L, 0);
  else lua_pushlstring(L, s->json.data, s->json.len);
  return 1;
}

/* ---------- JSON text: validate_json / encode_json ---------------------------------- */

/* opts.fields of validate_json: a list of dotted paths. Leaves the list on the stack and
 * returns its index, or returns 0 when there is none; raises on anything else. */
static int check_fields(lua_State *L, int opts) {
  int t, i, n;
  if (opts == 0) return 0;
  lua_getfield(L, opts, "fields");
  t = lua_gettop(L);
  if (lua_isnil(L, t)) {
    lua_pop(L, 1);
    return 0;
  }
  if (!lua_istable(L, t)) luaL_error(L, "options.fields must be a list of dotted paths");
  n = (int)stella_rawlen(L, t);
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, t, i);
    if (lua_type(L, -1) != LUA_TSTRING)
      luaL_error(L, "options.fields[%d] must be a string (a dotted path)", i);
    lua_pop(L, 1);
  }
  return t;
}

/* The same front half for JSON text at index 1: parse, then check. A syntax error
 * is one invalid_json error at the root. Strings of the tree point into the text,
 * which the argument keeps alive. Returns 1 when valid, otherwise pushes nil, errors and
 * returns 0. With `fields`, checks opts.fields first (check_fields) and sets *fields. */
static int run_json_validation(lua_State *L, scratch *s, stella_endpoint *endpoint, stella_value *req,
                               int *fields) {
  stella_options o;
  stella_parse_error perr;
  size_t len;
  const char *text;
  int opts, rc;
  luaL_checktype(L, 1, LUA_TSTRING);
  text = lua_tolstring(L, 1, &len);
  opts = check_args(L, s, endpoint, &o);
  if (fields) *fields = check_fields(L, opts);   /* misuse raises whatever the text */
  rc = stella_parse_json(&s->arena, text, len, req, &perr);
  if (rc < 0) return luaL_error(L, "not enough memory");
  if (rc > 0) {
    lua_pushnil(L);
    lua_createtable(L, 1, 0);
    lua_createtable(L, 0, 3);
    lua_pushliteral(L, "");
    lua_setfield(L, -2, "path");
    lua_pushliteral(L, "invalid_json");
    lua_setfield(L, -2, "code");
    lua_pushfstring(L, "invalid JSON: %s at line %d, column %d", perr.message,
                    perr.line > INT_MAX ? INT_MAX : (int)perr.line,
                    perr.column > INT_MAX ? INT_MAX : (int)perr.column);
    lua_setfield(L, -2, "message");
    lua_rawseti(L, -2, 1);
    return 0;
  }
  if (!check_parsed(L, s, *endpoint, req, &o, text, len)) return 0;
  return 1;
}

/* The value at a dotted path ("customer.email") of a parsed document, or NULL. */
static const stella_value *lookup(const stella_value *v, const char *path, size_t len) {
  const char *seg = path, *end = path + len;
  for (;;) {
    const char *dot = (const char *)memchr(seg, '.', (size_t)(end - seg));
    size_t n = dot ? (size_t)(dot - seg) : (size_t)(end - seg), k;
    const stella_value *next = NULL;
    if (v->type != STELLA_TABLE) return NULL;
    for (k = 0; k < v->u.table.count; k++) {
      const stella_value *key = &v->u.table.pairs[k].key;
      if (key->type == STELLA_STRING && key->u.string.len == n &&
          memcmp(key->u.string.ptr, seg, n) == 0) {
        next = &v->u.table.pairs[k].value;
        break;
      }
    }
    if (next == NULL || dot == NULL) return next;
    v = next;
    seg = dot + 1;
  }
}

/* A looked-up value as Lua: strings, numbers and booleans as they are, true for a
 * table, nil for null or absent. */
static void push_field(lua_State *L, const stella_value *v) {
  if (v == NULL) { lua_pushnil(L); return; }
  switch (v->type) {
    case STELLA_STRING: lua_pushlstring(L, v->u.string.ptr, v->u.string.len); break;
    case STELLA_NUMBER:
      if (v->u.number.is_int) lua_pushinteger(L, (lua_Integer)v->u.number.i);
      else lua_pushnumber(L, (lua_Number)v->u.number.num);
      break;
    case STELLA_BOOL: lua_pushboolean(L, v->u.boolean); break;
    case STELLA_TABLE: lua_pushboolean(L, 1); break;
    default: lua_pushnil(L); break;
  }
}

/* validate_json(text [, kind] [, opts]) -> true [, values of opts.fields] | nil, errors */
static int l_validate_json(lua_State *L) {
  scratch *s = get_scratch(L);
  stella_endpoint endpoint;
  stella_value req;
  int t, i, n;
  if (!run_json_validation(L, s, &endpoint, &req, &t)) return 2;
  if (t == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  n = (int)stella_rawlen(L, t);
  luaL_checkstack(L, n + 2, "too many fields");
  lua_pushboolean(L, 1);
  for (i = 1; i <= n; i++) {
    size_t len;
    const char *path;
    lua_rawgeti(L, t, i);
    path = lua_tolstring(L, -1, &len);   /* checked by check_fields */
    lua_pop(L, 1);                       /* still anchored by the fields table */
    push_field(L, lookup(&req, path, len));
  }
  return n + 1;
}

/* encode_json(text [, kind] [, opts]) -> canonical JSON | nil, errors */
static int l_encode_json(lua_State *L) {
  scratch *s = get_scratch(L);
  stella_endpoint endpoint;
  stella_value req;
  if (!run_json_validation(L, s, &endpoint, &req, NULL)) return 2;
  if (stella_encode_json(endpoint, &req, &s->json) != 0) return luaL_error(L, "not enough memory");
  lua_pushlstring(L, s->json.data, s->json.len);
  return 1;
}

/* ---------- small pure helpers ----------------------------------------------------- */

static int l_email_valid(lua_State *L) {
  size_t len;
  const char *p = luaL_checklstring(L, 1, &len);
  lua_pushboolean(L, len <= 254 && stella_email_valid(p, len));
  return 1;
}

static int l_utf8_valid(lua_State *L) {
  size_t len;
  const char *p = luaL_checklstring(L, 1, &len);
  lua_pushboolean(L, stella_utf8_valid(p, len));
  return 1;
}

/* sha256(data) -> lowercase hex digest */
static int l_sha256(lua_State *L) {
  static const char hex[] = "0123456789abcdef";
  size_t len, i;
  const char *p = luaL_checklstring(L, 1, &len);
  unsigned char d[32];
  char out[64];
  stella_sha256(p, len, d);
  for (i = 0; i < 32; i++) { out[2 * i] = hex[d[i] >> 4]; out[2 * i + 1] = hex[d[i] & 15]; }
  lua_pushlstring(L, out, sizeof out);
  return 1;
}

static const luaL_Reg scratch_funcs[] = {
  { "validate", l_validate },
  { "encode", l_encode },
  { "encode_tree", l_encode_tree },
  { "encode_direct", l_encode_direct },
  { "validate_json", l_validate_json },
  { "encode_json", l_encode_json },
  { NULL, NULL }
};

static const luaL_Reg plain_funcs[] = {
  { "email_valid", l_email_valid },
  { "utf8_valid", l_utf8_valid },
  { "sha256", l_sha256 },
  { NULL, NULL }
};

int luaopen_stella_core(lua_State *L);
int luaopen_stella_core(lua_State *L) {
  scratch *s;
  /* libcurl's global state is reference-counted: this Lua state keeps one
   * reference for good, so clients created later never re-initialise TLS. */
  curl_global_init(CURL_GLOBAL_DEFAULT);
  if (luaL_newmetatable(L, SCRATCH_MT)) {
    lua_pushcfunction(L, scratch_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);

  lua_newtable(L);
  stella_setfuncs(L, plain_funcs, 0);
  lstella_open_http(L);
  lstella_open_signal(L);
  s = (scratch *)lua_newuserdata(L, sizeof *s);
  stella_arena_init(&s->arena);
  stella_buffer_init(&s->json);
  luaL_getmetatable(L, SCRATCH_MT);
  lua_setmetatable(L, -2);
  lstella_push_names(L, &s->names);
  stella_setfuncs(L, scratch_funcs, 2);
  stella_open_decode(L);
  lua_pushliteral(L, STELLA_VERSION);
  lua_setfield(L, -2, "version");
  return 1;
}
