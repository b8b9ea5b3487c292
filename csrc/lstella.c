/* lstella.c - the Lua binding `stella.core`: a thin layer over stella.h.
 *
 * Lua tables are converted to stella_value trees in a scratch arena held by an
 * upvalue userdata (so a Lua error never leaks memory and no C global is
 * mutable). Strings are not copied: they stay anchored by the argument table. */
#define _POSIX_C_SOURCE 200112L   /* nanosleep */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "compat.h"
#include <curl/curl.h>
#include "stella.h"

#define SCRATCH_MT "stella.scratch"
#define HTTP_MT "stella.http"
#define MAX_DEPTH 3   /* the schema is 2 levels deep; below that only the type matters */

typedef struct scratch {
  stella_arena arena;
  stella_buffer json;
} scratch;

typedef struct http_ud {
  stella_http *h;
  char *base_url;   /* for tostring; never the key */
} http_ud;

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

static stella_kind check_kind(lua_State *L, int idx) {
  static const char *const kinds[] = { "request", "recovery", NULL };
  if (lua_isnoneornil(L, idx)) return STELLA_REQUEST;
  return luaL_checkoption(L, idx, "request", kinds) == 1 ? STELLA_RECOVERY : STELLA_REQUEST;
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

static void push_errors(lua_State *L, const stella_errors *e) {
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

/* Shared front half of validate and encode: convert and check. Returns 1 if
 * valid; otherwise pushes nil, errors and returns 0. */
static int run_validation(lua_State *L, scratch *s, stella_kind *kind, stella_value *req) {
  stella_options o;
  stella_errors errors;
  int n;
  int opts = 0;
  luaL_checktype(L, 1, LUA_TTABLE);
  /* (req), (req, kind), (req, opts) or (req, kind, opts) */
  if (lua_istable(L, 2)) {
    *kind = STELLA_REQUEST;
    opts = 2;
  } else {
    *kind = check_kind(L, 2);
    if (lua_istable(L, 3)) opts = 3;
    else if (!lua_isnoneornil(L, 3)) luaL_argerror(L, 3, "options table expected");
  }
  lua_settop(L, 3);
  check_channels(L, s, opts, &o);
  to_value(L, s, 1, 0, req);
  n = stella_validate(&s->arena, *kind, req, &o, &errors);
  if (n < 0) return luaL_error(L, "not enough memory");
  if (n == 0) return 1;
  lua_pushnil(L);
  push_errors(L, &errors);
  return 0;
}

static int l_validate(lua_State *L) {
  scratch *s = get_scratch(L);
  stella_kind kind;
  stella_value req;
  if (!run_validation(L, s, &kind, &req)) return 2;
  lua_pushboolean(L, 1);
  return 1;
}

static int l_encode(lua_State *L) {
  scratch *s = get_scratch(L);
  stella_kind kind;
  stella_value req;
  if (!run_validation(L, s, &kind, &req)) return 2;
  if (stella_encode_json(kind, &req, &s->json) != 0) return luaL_error(L, "not enough memory");
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

static int l_retry_delay(lua_State *L) {
  long d = stella_retry_delay_ms((int)luaL_checkinteger(L, 1), (long)luaL_checknumber(L, 2),
                                 (long)luaL_checknumber(L, 3), (long)luaL_optnumber(L, 4, -1),
                                 (double)luaL_checknumber(L, 5));
  lua_pushinteger(L, (lua_Integer)d);
  return 1;
}

static int l_parse_retry_after(lua_State *L) {
  long ms = stella_parse_retry_after(luaL_checkstring(L, 1), (long long)luaL_checknumber(L, 2));
  if (ms < 0) lua_pushnil(L);
  else lua_pushinteger(L, (lua_Integer)ms);
  return 1;
}

/* sleep(seconds): the default pause between retries outside OpenResty. */
static int l_sleep(lua_State *L) {
  lua_Number secs = luaL_checknumber(L, 1);
  struct timespec ts, rem;
  if (!(secs > 0)) return 0;
  if (secs > 86400) secs = 86400;
  ts.tv_sec = (time_t)secs;
  ts.tv_nsec = (long)((secs - (lua_Number)ts.tv_sec) * 1e9);
  while (nanosleep(&ts, &rem) != 0 && errno == EINTR) ts = rem;
  return 0;
}

static const char *const failure_names[] = { "ok", "timeout", "network", "protocol", "tls",
                                             "internal", NULL };

/* classify(status) or classify(nil, failure_name) -> kind|nil, retryable */
static int l_classify(lua_State *L) {
  int retryable = 0;
  stella_http_failure f = STELLA_HTTP_OK;
  long status = 0;
  const char *kind;
  if (lua_isnoneornil(L, 1))
    f = (stella_http_failure)luaL_checkoption(L, 2, NULL, failure_names);
  else
    status = (long)luaL_checkinteger(L, 1);
  kind = stella_error_kind(f, status, &retryable);
  if (kind) lua_pushstring(L, kind);
  else lua_pushnil(L);
  lua_pushboolean(L, retryable);
  return 2;
}

/* ---------- HTTP client userdata ---------------------------------------------------- */

static const char *opt_string(lua_State *L, int idx, const char *key) {
  const char *v;
  lua_getfield(L, idx, key);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return NULL; }
  if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "option %s must be a string", key);
  v = lua_tostring(L, -1);
  lua_pop(L, 1);   /* still anchored by the options table */
  return v;
}

static long opt_ms(lua_State *L, int idx, const char *key) {
  lua_Number v;
  lua_getfield(L, idx, key);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return 0; }
  if (lua_type(L, -1) != LUA_TNUMBER) luaL_error(L, "option %s must be a number of seconds", key);
  v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  if (!(v > 0)) luaL_error(L, "option %s must be positive", key);
  return (long)(v * 1000 + 0.5) > 0 ? (long)(v * 1000 + 0.5) : 1;
}

static int l_http_new(lua_State *L) {
  stella_http_options o;
  char err[256];
  http_ud *ud;
  luaL_checktype(L, 1, LUA_TTABLE);
  memset(&o, 0, sizeof o);
  o.base_url = opt_string(L, 1, "base_url");
  o.api_key = opt_string(L, 1, "api_key");
  o.user_agent = opt_string(L, 1, "user_agent");
  o.ca_file = opt_string(L, 1, "ca_file");
  o.timeout_ms = opt_ms(L, 1, "timeout");
  o.connect_timeout_ms = opt_ms(L, 1, "connect_timeout");
  /* the userdata exists before the C object, so a Lua error cannot leak it */
  ud = (http_ud *)lua_newuserdata(L, sizeof *ud);
  ud->h = NULL;
  ud->base_url = NULL;
  luaL_getmetatable(L, HTTP_MT);
  lua_setmetatable(L, -2);
  ud->h = stella_http_new(&o, err, sizeof err);
  if (ud->h == NULL) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  {
    const char *b = o.base_url ? o.base_url : "https://api.stellaconnect.net";
    size_t n = strlen(b);
    ud->base_url = (char *)malloc(n + 1);
    if (ud->base_url) memcpy(ud->base_url, b, n + 1);
  }
  return 1;
}

static http_ud *check_http(lua_State *L) {
  return (http_ud *)luaL_checkudata(L, 1, HTTP_MT);
}

/* One close for close/__gc/__close: frees once, then the pointers are NULL. */
static int l_http_close(lua_State *L) {
  http_ud *ud = check_http(L);
  stella_http_free(ud->h);
  ud->h = NULL;
  free(ud->base_url);
  ud->base_url = NULL;
  return 0;
}

/* http:post(path, body) -> status, body, content_type, retry_after_ms
 *                        | nil, failure ("timeout"|"network"|...), message */
static int l_http_post(lua_State *L) {
  http_ud *ud = check_http(L);
  const char *path = luaL_checkstring(L, 2);
  size_t len;
  const char *body = luaL_checklstring(L, 3, &len);
  stella_http_result r;
  if (ud->h == NULL) return luaL_error(L, "attempt to use a closed stella client");
  if (stella_http_post(ud->h, path, body, len, &r) != STELLA_HTTP_OK) {
    lua_pushnil(L);
    lua_pushstring(L, failure_names[r.failure]);
    lua_pushstring(L, r.error ? r.error : "transfer failed");
    return 3;
  }
  lua_pushinteger(L, (lua_Integer)r.status);
  lua_pushlstring(L, r.body, r.body_len);
  if (r.content_type) lua_pushstring(L, r.content_type);
  else lua_pushnil(L);
  if (r.retry_after_ms >= 0) lua_pushnumber(L, (lua_Number)r.retry_after_ms);
  else lua_pushnil(L);
  return 4;
}

static int l_http_connects(lua_State *L) {
  http_ud *ud = check_http(L);
  lua_pushinteger(L, ud->h ? (lua_Integer)stella_http_connects(ud->h) : 0);
  return 1;
}

static int l_http_tostring(lua_State *L) {
  http_ud *ud = check_http(L);
  if (ud->h == NULL) lua_pushliteral(L, "stella.http (closed)");
  else lua_pushfstring(L, "stella.http (%s)", ud->base_url ? ud->base_url : "?");
  return 1;
}

static const luaL_Reg http_methods[] = {
  { "post", l_http_post },
  { "connects", l_http_connects },
  { "close", l_http_close },
  { NULL, NULL }
};

static const luaL_Reg scratch_funcs[] = {
  { "validate", l_validate },
  { "encode", l_encode },
  { NULL, NULL }
};

static const luaL_Reg plain_funcs[] = {
  { "email_valid", l_email_valid },
  { "utf8_valid", l_utf8_valid },
  { "retry_delay", l_retry_delay },
  { "parse_retry_after", l_parse_retry_after },
  { "classify", l_classify },
  { "sleep", l_sleep },
  { "sha256", l_sha256 },
  { "http_new", l_http_new },
  { NULL, NULL }
};

int luaopen_stella_core(lua_State *L);
int luaopen_stella_core(lua_State *L) {
  scratch *s;
  /* libcurl's global state is reference-counted: this Lua state keeps one
   * reference for good, so clients created later never re-initialise TLS. */
  curl_global_init(CURL_GLOBAL_DEFAULT);
  if (luaL_newmetatable(L, HTTP_MT)) {
    lua_newtable(L);
    stella_setfuncs(L, http_methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_http_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_http_close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, l_http_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushliteral(L, "stella.http");
    lua_setfield(L, -2, "__name");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, SCRATCH_MT)) {
    lua_pushcfunction(L, scratch_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);

  lua_newtable(L);
  stella_setfuncs(L, plain_funcs, 0);
  s = (scratch *)lua_newuserdata(L, sizeof *s);
  stella_arena_init(&s->arena);
  stella_buffer_init(&s->json);
  luaL_getmetatable(L, SCRATCH_MT);
  lua_setmetatable(L, -2);
  stella_setfuncs(L, scratch_funcs, 1);
  lua_pushliteral(L, STELLA_VERSION);
  lua_setfield(L, -2, "version");
  return 1;
}
