/* lstella.c - the Lua binding `stella.core`: a thin layer over stella.h.
 *
 * Lua tables are converted to stella_value trees in a scratch arena held by an
 * upvalue userdata (so a Lua error never leaks memory and no C global is
 * mutable). Strings are not copied: they stay anchored by the argument table. */
#define _POSIX_C_SOURCE 200112L   /* nanosleep */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "compat.h"
#include <curl/curl.h>
#include "stella.h"
#include "lstella_decode.h"

#define SCRATCH_MT "stella.scratch"
#define HTTP_MT "stella.http"
#define SENDER_MT "stella.sender"
#define MAX_DEPTH 3   /* the schema is 2 levels deep; below that only the type matters */

typedef struct scratch {
  stella_arena arena;
  stella_buffer json;
} scratch;

typedef struct sender_ud sender_ud;

typedef struct http_ud {
  stella_http *h;
  char *base_url;   /* for tostring; never the key */
  sender_ud *lent;  /* the sender this client is lent to, or NULL */
} http_ud;

/* A background send (stella_sender) and the clients lent to it: a registry reference
 * to a table holding their userdata, so they outlive it. */
struct sender_ud {
  stella_sender *s;
  int ref;
};

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

/* The arguments after the request: (x), (x, kind), (x, opts) or (x, kind, opts).
 * Sets the kind; returns the index of the options table (0: none). Leaves the
 * stack at 3 values, plus the channel list when there is one. */
static int check_args(lua_State *L, scratch *s, stella_kind *kind, stella_options *o) {
  int opts = 0;
  if (lua_istable(L, 2)) {
    *kind = STELLA_REQUEST;
    opts = 2;
  } else {
    *kind = check_kind(L, 2);
    if (lua_istable(L, 3)) opts = 3;
    else if (!lua_isnoneornil(L, 3)) luaL_argerror(L, 3, "options table expected");
  }
  lua_settop(L, 3);
  check_channels(L, s, opts, o);
  return opts;
}

/* Validates req; returns 1 if valid, otherwise pushes nil, errors and returns 0. */
static int check_request(lua_State *L, scratch *s, stella_kind kind, const stella_value *req,
                         const stella_options *o) {
  stella_errors errors;
  int n = stella_validate(&s->arena, kind, req, o, &errors);
  if (n < 0) return luaL_error(L, "not enough memory");
  if (n == 0) return 1;
  lua_pushnil(L);
  push_errors(L, &errors);
  return 0;
}

/* Shared front half of validate and encode: convert and check. Returns 1 if
 * valid; otherwise pushes nil, errors and returns 0. */
static int run_validation(lua_State *L, scratch *s, stella_kind *kind, stella_value *req) {
  stella_options o;
  luaL_checktype(L, 1, LUA_TTABLE);
  check_args(L, s, kind, &o);
  to_value(L, s, 1, 0, req);
  return check_request(L, s, *kind, req, &o);
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
static int run_json_validation(lua_State *L, scratch *s, stella_kind *kind, stella_value *req,
                               int *fields) {
  stella_options o;
  stella_parse_error perr;
  size_t len;
  const char *text;
  int opts, rc;
  luaL_checktype(L, 1, LUA_TSTRING);
  text = lua_tolstring(L, 1, &len);
  opts = check_args(L, s, kind, &o);
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
  if (!check_request(L, s, *kind, req, &o)) return 0;
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
  stella_kind kind;
  stella_value req;
  int t, i, n;
  if (!run_json_validation(L, s, &kind, &req, &t)) return 2;
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
  stella_kind kind;
  stella_value req;
  if (!run_json_validation(L, s, &kind, &req, NULL)) return 2;
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
  ud->lent = NULL;
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
  if (ud->lent) stella_sender_wait(ud->lent->s);   /* the thread may be using it */
  stella_http_free(ud->h);
  ud->h = NULL;
  free(ud->base_url);
  ud->base_url = NULL;
  return 0;
}

/* Pushes an ended transfer's results: status, body, content_type, retry_after_ms
 * | nil, failure ("timeout"|"network"|...), message. */
static int push_result(lua_State *L, const stella_http_result *r) {
  if (r->failure != STELLA_HTTP_OK) {
    lua_pushnil(L);
    lua_pushstring(L, failure_names[r->failure]);
    lua_pushstring(L, r->error ? r->error : "transfer failed");
    return 3;
  }
  lua_pushinteger(L, (lua_Integer)r->status);
  lua_pushlstring(L, r->body, r->body_len);
  if (r->content_type) lua_pushstring(L, r->content_type);
  else lua_pushnil(L);
  if (r->retry_after_ms >= 0) lua_pushnumber(L, (lua_Number)r->retry_after_ms);
  else lua_pushnil(L);
  return 4;
}

static http_ud *open_http(lua_State *L) {
  http_ud *ud = check_http(L);
  if (ud->h == NULL) luaL_error(L, "attempt to use a closed stella client");
  if (ud->lent) stella_sender_wait(ud->lent->s);   /* lent: wait until the thread is done */
  return ud;
}

/* http:post(path, body) -> status, body, content_type, retry_after_ms
 *                        | nil, failure ("timeout"|"network"|...), message */
static int l_http_post(lua_State *L) {
  http_ud *ud = open_http(L);
  const char *path = luaL_checkstring(L, 2);
  size_t len;
  const char *body = luaL_checklstring(L, 3, &len);
  stella_http_result r;
  if (stella_http_running(ud->h)) return luaL_error(L, "stella client busy: a started post has not ended");
  stella_http_post(ud->h, path, body, len, &r);
  return push_result(L, &r);
}

/* http:start(path, body) -> true | nil, failure, message: the post without waiting
 * (the body is copied); then http:step() until it ends. */
static int l_http_start(lua_State *L) {
  http_ud *ud = open_http(L);
  const char *path = luaL_checkstring(L, 2);
  size_t len;
  const char *body = luaL_checklstring(L, 3, &len);
  stella_http_result r;
  if (stella_http_running(ud->h)) return luaL_error(L, "stella client busy: a started post has not ended");
  if (stella_http_start(ud->h, path, body, len, &r) != STELLA_HTTP_OK) return push_result(L, &r);
  lua_pushboolean(L, 1);
  return 1;
}

/* http:step([wait_seconds]) -> false while the started post runs, else what post returns.
 * wait_seconds (default 0) bounds how long it waits for the network. */
static int l_http_step(lua_State *L) {
  http_ud *ud = open_http(L);
  lua_Number wait = luaL_optnumber(L, 2, 0);
  stella_http_result r;
  int wait_ms = wait > 0 ? (wait > 60 ? 60000 : (int)(wait * 1000 + 0.5)) : 0;
  if (!stella_http_running(ud->h)) return luaL_error(L, "stella client: no started post to step");
  if (!stella_http_step(ud->h, wait_ms, &r)) {
    lua_pushboolean(L, 0);
    return 1;
  }
  return push_result(L, &r);
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
  { "start", l_http_start },
  { "step", l_http_step },
  { "connects", l_http_connects },
  { "close", l_http_close },
  { NULL, NULL }
};

static const luaL_Reg scratch_funcs[] = {
  { "validate", l_validate },
  { "encode", l_encode },
  { "validate_json", l_validate_json },
  { "encode_json", l_encode_json },
  { NULL, NULL }
};

/* ---------- background sends (stella_sender) ------------------------------------------ */

static sender_ud *check_sender(lua_State *L) {
  return (sender_ud *)luaL_checkudata(L, 1, SENDER_MT);
}

/* One close for close/__gc: stops and joins the thread, frees it, gives the clients back. */
static int l_sender_close(lua_State *L) {
  sender_ud *su = check_sender(L);
  stella_sender_free(su->s);
  su->s = NULL;
  if (su->ref != LUA_NOREF) {
    size_t i, n;
    lua_rawgeti(L, LUA_REGISTRYINDEX, su->ref);
    n = (size_t)stella_rawlen(L, -1);
    for (i = 1; i <= n; i++) {
      http_ud *h;
      lua_rawgeti(L, -1, (int)i);
      h = (http_ud *)lua_touserdata(L, -1);
      if (h && h->lent == su) h->lent = NULL;
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
    luaL_unref(L, LUA_REGISTRYINDEX, su->ref);
    su->ref = LUA_NOREF;
  }
  return 0;
}

/* send_many({ http, path, body, http, path, body, ... }, budget_seconds) -> sender
 * | nil, message: posts the bodies one after another on a background thread (see
 * stella.h, stella_sender_start). The clients are lent to it until sender:close(); using
 * one meanwhile waits for the thread first. */
static int l_send_many(lua_State *L) {
  size_t n, i, count;
  lua_Number budget = luaL_checknumber(L, 2);
  stella_send_item *items;
  sender_ud *su;
  char err[128];
  luaL_checktype(L, 1, LUA_TTABLE);
  n = (size_t)stella_rawlen(L, 1);
  if (n % 3 != 0) return luaL_argerror(L, 1, "a list of (client, path, body) triples expected");
  count = n / 3;
  /* the userdata first, so that nothing allocated below can leak on a Lua error */
  su = (sender_ud *)lua_newuserdata(L, sizeof *su);
  su->s = NULL;
  su->ref = LUA_NOREF;
  luaL_getmetatable(L, SENDER_MT);
  lua_setmetatable(L, -2);
  lua_createtable(L, (int)count, 0);          /* the lent clients, anchored */
  items = (stella_send_item *)lua_newuserdata(L, (count ? count : 1) * sizeof *items);   /* scratch */
  for (i = 0; i < count; i++) {
    http_ud *h;
    lua_rawgeti(L, 1, (int)(3 * i + 1));
    h = (http_ud *)luaL_testudata(L, -1, HTTP_MT);
    if (h == NULL || h->h == NULL) return luaL_error(L, "send_many: item %d: an open stella.http expected", (int)i + 1);
    if (h->lent) stella_sender_wait(h->lent->s);
    lua_rawseti(L, -3, (int)i + 1);
    lua_rawgeti(L, 1, (int)(3 * i + 2));
    lua_rawgeti(L, 1, (int)(3 * i + 3));
    if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
      return luaL_error(L, "send_many: item %d: path and body must be strings", (int)i + 1);
    items[i].h = h->h;
    items[i].path = lua_tostring(L, -2);   /* anchored by the argument table until copied */
    items[i].body = lua_tolstring(L, -1, &items[i].body_len);
    lua_pop(L, 2);
  }
  su->s = stella_sender_start(items, count, budget > 0 ? (long)(budget * 1000) : 0, err, sizeof err);
  lua_pop(L, 1);                              /* the scratch */
  if (su->s == NULL) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  for (i = 0; i < count; i++) {               /* lend them */
    lua_rawgeti(L, -1, (int)i + 1);
    ((http_ud *)lua_touserdata(L, -1))->lent = su;
    lua_pop(L, 1);
  }
  su->ref = luaL_ref(L, LUA_REGISTRYINDEX);   /* pops the table */
  return 1;
}

static sender_ud *open_sender(lua_State *L) {
  sender_ud *su = check_sender(L);
  if (su->s == NULL) luaL_error(L, "attempt to use a closed stella sender");
  return su;
}

/* sender:done() -> true once the thread has finished (never waits) */
static int l_sender_done(lua_State *L) {
  lua_pushboolean(L, stella_sender_done(open_sender(L)->s));
  return 1;
}

/* sender:wait() -> number of items attempted (a prefix of the list) */
static int l_sender_wait(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)stella_sender_wait(open_sender(L)->s));
  return 1;
}

/* sender:result(i) -> what http:post returns, for item i (after wait); nothing when the
 * item was not attempted */
static int l_sender_result(lua_State *L) {
  sender_ud *su = open_sender(L);
  lua_Integer i = luaL_checkinteger(L, 2);
  const stella_send_result *r;
  stella_http_result hr;
  stella_sender_wait(su->s);
  r = i >= 1 ? stella_sender_result(su->s, (size_t)(i - 1)) : NULL;
  if (r == NULL) return 0;
  memset(&hr, 0, sizeof hr);
  hr.failure = r->failure;
  hr.status = r->status;
  hr.body = r->body;
  hr.body_len = r->body_len;
  hr.content_type = r->content_type;
  hr.retry_after_ms = r->retry_after_ms;
  hr.error = r->error;
  return push_result(L, &hr);
}

static const luaL_Reg sender_methods[] = {
  { "done", l_sender_done },
  { "wait", l_sender_wait },
  { "result", l_sender_result },
  { "close", l_sender_close },
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
  { "send_many", l_send_many },
  { NULL, NULL }
};

/* The metatable `name` of a userdata class: methods, one idempotent close for close,
 * __gc and __close, and an optional __tostring. */
static void new_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction close,
                      lua_CFunction tostring) {
  if (luaL_newmetatable(L, name)) {
    lua_newtable(L);
    stella_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, close);
    lua_setfield(L, -2, "__close");
    if (tostring) {
      lua_pushcfunction(L, tostring);
      lua_setfield(L, -2, "__tostring");
    }
    lua_pushstring(L, name);
    lua_setfield(L, -2, "__name");
  }
  lua_pop(L, 1);
}

int luaopen_stella_core(lua_State *L);
int luaopen_stella_core(lua_State *L) {
  scratch *s;
  /* libcurl's global state is reference-counted: this Lua state keeps one
   * reference for good, so clients created later never re-initialise TLS. */
  curl_global_init(CURL_GLOBAL_DEFAULT);
  new_class(L, HTTP_MT, http_methods, l_http_close, l_http_tostring);
  new_class(L, SENDER_MT, sender_methods, l_sender_close, NULL);
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
  stella_open_decode(L);
  lua_pushliteral(L, STELLA_VERSION);
  lua_setfield(L, -2, "version");
  return 1;
}
