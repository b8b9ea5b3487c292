/* lstella_http.c - the sending half of the Lua binding `stella.core`: the libcurl client
 * (stella.http userdata), background sends (stella.sender userdata), and the retry
 * policy's helpers. lstella.c opens the module and calls lstella_open_http. */
#define _POSIX_C_SOURCE 200112L   /* nanosleep */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "lstella.h"

#define HTTP_MT "stella.http"
#define SENDER_MT "stella.sender"

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
  int appendable;   /* made by sender_open */
  int lending;      /* an appendable sender: 1 while its clients are lent (not paused) */
};

/* ---------- retry policy ------------------------------------------------------------- */

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

/* sleep(seconds) -> true, or false when it ended early because a signal was caught
 * (catch_signals): the default pause between retries outside OpenResty. It sleeps in
 * slices of at most 100 ms, so that a signal delivered to another thread ends it too. */
static int l_sleep(lua_State *L) {
  lua_Number secs = luaL_checknumber(L, 1);
  if (secs > 86400) secs = 86400;
  while (secs > 0) {
    struct timespec ts, rem;
    lua_Number slice = secs > 0.1 ? 0.1 : secs;
    if (lstella_signal_pending()) { lua_pushboolean(L, 0); return 1; }
    ts.tv_sec = (time_t)slice;
    ts.tv_nsec = (long)((slice - (lua_Number)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &rem) != 0 && errno == EINTR && !lstella_signal_pending()) ts = rem;
    secs -= slice;
  }
  lua_pushboolean(L, !lstella_signal_pending());
  return 1;
}

/* monotonic() -> seconds on a clock that only goes forward (CLOCK_MONOTONIC), for
 * measuring waits (the rate limit's pacing); not the time of day. */
static int l_monotonic(lua_State *L) {
  struct timespec ts;
  if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) return luaL_error(L, "clock_gettime: %s", strerror(errno));
  lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec / 1e9);
  return 1;
}

/* ---------- outcomes (stella_outcome.c) ----------------------------------------------- */

/* classify_status(status) -> the name of the outcome of an HTTP answer with that status */
static int l_classify_status(lua_State *L) {
  lua_Integer status = luaL_checkinteger(L, 1);
  lua_pushstring(L, stella_outcome_info_of(stella_outcome_of_status((long)status))->name);
  return 1;
}

/* Sets field `outcomes` of the table on top of the stack: name -> { name, kind,
 * retryable, answered, message } for every outcome (kind and message absent for ok). */
static void push_outcomes(lua_State *L) {
  int o;
  lua_createtable(L, 0, STELLA_OUTCOME_COUNT);
  for (o = 0; o < STELLA_OUTCOME_COUNT; o++) {
    const stella_outcome_info *i = stella_outcome_info_of((stella_outcome)o);
    lua_createtable(L, 0, 5);
    lua_pushstring(L, i->name);
    lua_setfield(L, -2, "name");
    if (i->kind) {
      lua_pushstring(L, i->kind);
      lua_setfield(L, -2, "kind");
    }
    lua_pushboolean(L, i->retryable);
    lua_setfield(L, -2, "retryable");
    lua_pushboolean(L, i->answered);
    lua_setfield(L, -2, "answered");
    if (i->message) {
      lua_pushstring(L, i->message);
      lua_setfield(L, -2, "message");
    }
    lua_setfield(L, -2, i->name);
  }
  lua_setfield(L, -2, "outcomes");
}

/* ---------- HTTP client userdata ---------------------------------------------------- */

/* opts[key]: a string (its length in *len), NULL when absent; anything else raises. */
static const char *opt_string(lua_State *L, int idx, const char *key, size_t *len) {
  const char *v;
  size_t n = 0;
  lua_getfield(L, idx, key);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); if (len) *len = 0; return NULL; }
  if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "option %s must be a string", key);
  v = lua_tolstring(L, -1, &n);
  lua_pop(L, 1);   /* still anchored by the options table */
  if (len) *len = n;
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

/* Reads base_url (default STELLA_DEFAULT_BASE_URL), api_key, user_agent and ca_file of the
 * options table at idx into o (a value that is not a string raises) and checks them as
 * stella_http_new does, on their whole length (a
 * NUL inside is refused, not cut off). Returns 1 with the URL's parts in u, or 0 with a
 * message in err. Both transports go through here. */
static int check_http_options(lua_State *L, int idx, stella_http_options *o, stella_base_url *u,
                              char *err, size_t errlen) {
  size_t ulen, klen, alen;
  o->base_url = opt_string(L, idx, "base_url", &ulen);
  o->api_key = opt_string(L, idx, "api_key", &klen);
  o->user_agent = opt_string(L, idx, "user_agent", &alen);
  o->ca_file = opt_string(L, idx, "ca_file", NULL);
  if (o->base_url == NULL) {
    o->base_url = STELLA_DEFAULT_BASE_URL;
    ulen = sizeof STELLA_DEFAULT_BASE_URL - 1;
  }
  return stella_check_key(o->api_key, klen, err, errlen) &&
         stella_check_base_url(o->base_url, ulen, u, err, errlen) &&
         stella_check_user_agent(o->user_agent, alen, err, errlen);
}

/* check_http_options(opts) -> { base_url, tls, host, port, port_given, path } | nil, message:
 * what http_new would refuse, and the URL's parts (host in lower case, path without a
 * trailing '/', base_url the URL without one). */
static int l_check_http_options(lua_State *L) {
  stella_http_options o;
  stella_base_url u;
  char err[256];
  size_t i;
  luaL_Buffer b;
  luaL_checktype(L, 1, LUA_TTABLE);
  if (!check_http_options(L, 1, &o, &u, err, sizeof err)) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  lua_createtable(L, 0, 6);
  lua_pushlstring(L, o.base_url, (size_t)(u.path + u.path_len - o.base_url));
  lua_setfield(L, -2, "base_url");
  lua_pushboolean(L, u.tls);
  lua_setfield(L, -2, "tls");
  luaL_buffinit(L, &b);
  for (i = 0; i < u.host_len; i++)
    luaL_addchar(&b, (char)(u.host[i] >= 'A' && u.host[i] <= 'Z' ? u.host[i] - 'A' + 'a' : u.host[i]));
  luaL_pushresult(&b);
  lua_setfield(L, -2, "host");
  lua_pushinteger(L, (lua_Integer)u.port);
  lua_setfield(L, -2, "port");
  lua_pushboolean(L, u.port_given);
  lua_setfield(L, -2, "port_given");
  lua_pushlstring(L, u.path, u.path_len);
  lua_setfield(L, -2, "path");
  return 1;
}

static int l_http_new(lua_State *L) {
  stella_http_options o;
  stella_base_url u;
  char err[256];
  http_ud *ud;
  luaL_checktype(L, 1, LUA_TTABLE);
  memset(&o, 0, sizeof o);
  if (!check_http_options(L, 1, &o, &u, err, sizeof err)) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
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
    size_t n = strlen(o.base_url);
    ud->base_url = (char *)malloc(n + 1);
    if (ud->base_url) memcpy(ud->base_url, o.base_url, n + 1);
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

/* Pushes an ended transfer as one value: an answer { status, body, content_type,
 * retry_after } (retry_after in ms; the last two absent when the answer had none) or a
 * failure { failure = "timeout"|"network"|"protocol"|"tls"|"internal", message }. */
static int push_result(lua_State *L, const stella_http_result *r) {
  const stella_outcome_info *info = stella_outcome_info_of(r->outcome);
  lua_createtable(L, 0, 4);
  if (!info->answered) {
    lua_pushstring(L, info->name);
    lua_setfield(L, -2, "failure");
    lua_pushstring(L, r->error ? r->error : "transfer failed");
    lua_setfield(L, -2, "message");
    return 1;
  }
  lua_pushinteger(L, (lua_Integer)r->status);
  lua_setfield(L, -2, "status");
  lua_pushlstring(L, r->body, r->body_len);
  lua_setfield(L, -2, "body");
  if (r->content_type) {
    lua_pushstring(L, r->content_type);
    lua_setfield(L, -2, "content_type");
  }
  if (r->retry_after_ms >= 0) {
    lua_pushnumber(L, (lua_Number)r->retry_after_ms);
    lua_setfield(L, -2, "retry_after");
  }
  return 1;
}

static http_ud *open_http(lua_State *L) {
  http_ud *ud = check_http(L);
  if (ud->h == NULL) luaL_error(L, "attempt to use a closed stella client");
  if (ud->lent) stella_sender_wait(ud->lent->s);   /* lent: wait until the thread is done */
  return ud;
}

/* The client of a post or start, with no started post running: its path and body. */
static http_ud *idle_http(lua_State *L, const char **path, const char **body, size_t *len) {
  http_ud *ud = open_http(L);
  *path = luaL_checkstring(L, 2);
  *body = luaL_checklstring(L, 3, len);
  if (stella_http_running(ud->h)) luaL_error(L, "stella client busy: a started post has not ended");
  return ud;
}

/* http:post(path, body) -> an answer or a failure (see push_result) */
static int l_http_post(lua_State *L) {
  const char *path, *body;
  size_t len;
  http_ud *ud = idle_http(L, &path, &body, &len);
  stella_http_result r;
  stella_http_post(ud->h, path, body, len, &r);
  return push_result(L, &r);
}

/* http:start(path, body) -> true | a failure (see push_result): the post without waiting
 * (the body is copied); then http:step() until it ends. */
static int l_http_start(lua_State *L) {
  const char *path, *body;
  size_t len;
  http_ud *ud = idle_http(L, &path, &body, &len);
  stella_http_result r;
  if (stella_http_start(ud->h, path, body, len, &r) != STELLA_OUTCOME_OK) return push_result(L, &r);
  lua_pushboolean(L, 1);
  return 1;
}

/* The optional wait_seconds at arg (default 0: never waits), in milliseconds, at most 60 s. */
static long wait_ms_arg(lua_State *L, int arg) {
  lua_Number wait = luaL_optnumber(L, arg, 0);
  return wait > 0 ? (wait > 60 ? 60000L : (long)(wait * 1000 + 0.5)) : 0;
}

/* http:step([wait_seconds]) -> false while the started post runs, else what post returns.
 * wait_seconds (default 0) bounds how long it waits for the network. */
static int l_http_step(lua_State *L) {
  http_ud *ud = open_http(L);
  int wait_ms = (int)wait_ms_arg(L, 2);
  stella_http_result r;
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

/* ---------- background sends (stella_sender) ------------------------------------------ */

static sender_ud *check_sender(lua_State *L) {
  return (sender_ud *)luaL_checkudata(L, 1, SENDER_MT);
}

/* Lends (1) or gives back (0) a sender's clients (those of its registry table). */
static void lend_clients(lua_State *L, sender_ud *su, int lend) {
  size_t i, n;
  su->lending = lend;
  lua_rawgeti(L, LUA_REGISTRYINDEX, su->ref);
  n = (size_t)stella_rawlen(L, -1);
  for (i = 1; i <= n; i++) {
    http_ud *h;
    lua_rawgeti(L, -1, (int)i);
    h = (http_ud *)lua_touserdata(L, -1);
    if (h && lend && h->lent == NULL) h->lent = su;
    else if (h && !lend && h->lent == su) h->lent = NULL;
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

/* One close for close/__gc: stops and joins the thread, frees it, gives the clients back. */
static int l_sender_close(lua_State *L) {
  sender_ud *su = check_sender(L);
  stella_sender_free(su->s);
  su->s = NULL;
  if (su->ref != LUA_NOREF) {
    lend_clients(L, su, 0);
    luaL_unref(L, LUA_REGISTRYINDEX, su->ref);
    su->ref = LUA_NOREF;
  }
  return 0;
}

/* send_many's and sender:add's arguments: the list at `list` of (client, path, body)
 * triples and the groups at `gidx` (none when absent). -> the number of items. */
static size_t triples(lua_State *L, int list, int gidx) {
  size_t n;
  luaL_checktype(L, list, LUA_TTABLE);
  if (!lua_isnoneornil(L, gidx)) luaL_checktype(L, gidx, LUA_TTABLE);
  n = (size_t)stella_rawlen(L, list);
  if (n % 3 != 0) luaL_argerror(L, list, "a list of (client, path, body) triples expected");
  if (!lua_isnoneornil(L, gidx) && (size_t)stella_rawlen(L, gidx) != n / 3)
    luaL_argerror(L, gidx, "one group per item expected");
  return n / 3;
}

/* The `count` items of those arguments (checked as triples() did), read into a scratch
 * userdata pushed on the stack: items, and after them their groups (*groups, or NULL when
 * gidx holds none). Every item is checked before anything is lent; a client lent to a
 * sender other than `self` is waited for. Each client is stored at anchor[i] (an
 * absolute index) when anchor is not 0. Raises "WHO: item K: ..." on a bad item. */
static stella_send_item *read_items(lua_State *L, int list, int gidx, size_t count, const char *who,
                                    const sender_ud *self, int anchor, size_t **groups) {
  size_t i;
  int grouped = !lua_isnoneornil(L, gidx);
  stella_send_item *items = (stella_send_item *)lua_newuserdata(L, (count ? count : 1)
                                                                   * (sizeof *items + sizeof **groups));
  *groups = grouped ? (size_t *)(void *)(items + (count ? count : 1)) : NULL;
  for (i = 0; i < count; i++) {
    http_ud *h;
    if (grouped) {
      lua_Integer g;
      int isnum;
      lua_rawgeti(L, gidx, (int)i + 1);
      g = lua_tointegerx(L, -1, &isnum);
      if (!isnum || g < 0) luaL_error(L, "%s: group %d: a whole number >= 0 expected", who, (int)i + 1);
      (*groups)[i] = (size_t)g;
      lua_pop(L, 1);
    }
    lua_rawgeti(L, list, (int)(3 * i + 1));
    h = (http_ud *)luaL_testudata(L, -1, HTTP_MT);
    if (h == NULL || h->h == NULL) luaL_error(L, "%s: item %d: an open stella.http expected", who, (int)i + 1);
    if (h->lent && h->lent != self) stella_sender_wait(h->lent->s);
    if (anchor) lua_rawseti(L, anchor, (int)i + 1);
    else lua_pop(L, 1);
    lua_rawgeti(L, list, (int)(3 * i + 2));
    lua_rawgeti(L, list, (int)(3 * i + 3));
    if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
      luaL_error(L, "%s: item %d: path and body must be strings", who, (int)i + 1);
    items[i].h = h->h;
    items[i].path = lua_tostring(L, -2);   /* anchored by the argument table until copied */
    items[i].body = lua_tolstring(L, -1, &items[i].body_len);
    lua_pop(L, 2);
  }
  return items;
}

/* send_many({ http, path, body, http, path, body, ... }, budget_seconds [, groups]) ->
 * sender | nil, message: posts the bodies on background threads, one per distinct client,
 * each client's in list order, or with groups (a list of whole numbers >= 0, one per
 * item), the clients of a group g > 0 sharing its items (see stella.h,
 * stella_sender_start_shared; sender:poster(k) says which client posted item k). The
 * clients are lent to the threads until sender:close(); using one meanwhile waits for
 * them first. */
static int l_send_many(lua_State *L) {
  lua_Number budget = luaL_checknumber(L, 2);
  size_t i, count = triples(L, 1, 3);
  stella_send_item *items;
  size_t *groups;
  sender_ud *su;
  char err[128];
  lua_settop(L, 3);
  /* the userdata first, so that nothing allocated below can leak on a Lua error */
  su = (sender_ud *)lua_newuserdata(L, sizeof *su);
  su->s = NULL;
  su->ref = LUA_NOREF;
  su->appendable = su->lending = 0;
  luaL_getmetatable(L, SENDER_MT);
  lua_setmetatable(L, -2);
  lua_createtable(L, (int)count, 0);          /* the lent clients, anchored: index 5 */
  items = read_items(L, 1, 3, count, "send_many", NULL, 5, &groups);   /* the scratch */
  su->s = stella_sender_start_shared(items, groups, count, budget > 0 ? (long)(budget * 1000) : 0,
                                     err, sizeof err);
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

/* sender:done([wait_seconds]) -> true once the threads have finished; waits up to
 * wait_seconds (default 0: never waits) for that */
static int l_sender_done(lua_State *L) {
  sender_ud *su = open_sender(L);
  long wait_ms = wait_ms_arg(L, 2);
  lua_pushboolean(L, wait_ms > 0 ? stella_sender_done_within(su->s, wait_ms) : stella_sender_done(su->s));
  return 1;
}

/* sender:stop(): the threads end their posts in flight and start no other */
static int l_sender_stop(lua_State *L) {
  stella_sender_stop(open_sender(L)->s);
  return 0;
}

/* sender:wait() -> the number of items attempted (with one client, a prefix of the list) */
static int l_sender_wait(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)stella_sender_wait(open_sender(L)->s));
  return 1;
}

/* Pushes what http:post returns for a sender's result r (push_result). */
static int push_send_result(lua_State *L, const stella_send_result *r) {
  stella_http_result hr;
  memset(&hr, 0, sizeof hr);
  hr.outcome = r->outcome;
  hr.status = r->status;
  hr.body = r->body;
  hr.body_len = r->body_len;
  hr.content_type = r->content_type;
  hr.retry_after_ms = r->retry_after_ms;
  hr.error = r->error;
  return push_result(L, &hr);
}

/* sender:result(i) and sender:poster(i): item i's result once the threads have finished,
 * or NULL when it was not attempted. */
static const stella_send_result *waited_result(lua_State *L) {
  sender_ud *su = open_sender(L);
  lua_Integer i = luaL_checkinteger(L, 2);
  stella_sender_wait(su->s);
  return i >= 1 ? stella_sender_result(su->s, (size_t)(i - 1)) : NULL;
}

/* sender:result(i) -> what http:post returns, for item i (after wait); nothing when the
 * item was not attempted */
static int l_sender_result(lua_State *L) {
  const stella_send_result *r = waited_result(L);
  return r ? push_send_result(L, r) : 0;
}

/* sender:poster(i) -> the index of the first item of the client that posted item i
 * (after wait), or nothing when item i was not attempted */
static int l_sender_poster(lua_State *L) {
  const stella_send_result *r = waited_result(L);
  if (r == NULL) return 0;
  lua_pushinteger(L, (lua_Integer)r->by + 1);
  return 1;
}

/* ---------- appendable sends (stella_sender_open) ---------------------------------- */

/* sender_open() -> sender | nil, message: an appendable sender with no lanes yet (see
 * stella.h, stella_sender_open): sender:add gives it chunks, sender:collect takes their
 * results. Its clients are lent to it (using one meanwhile stops its lanes first) except
 * while it is paused (sender:pause). */
static int l_sender_open(lua_State *L) {
  char err[128];
  sender_ud *su = (sender_ud *)lua_newuserdata(L, sizeof *su);
  su->s = NULL;
  su->ref = LUA_NOREF;
  su->appendable = su->lending = 1;
  luaL_getmetatable(L, SENDER_MT);
  lua_setmetatable(L, -2);
  su->s = stella_sender_open(err, sizeof err);
  if (su->s == NULL) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  lua_newtable(L);   /* its lanes' clients, in lane order, and client -> lane number */
  su->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 1;
}

static sender_ud *appendable(lua_State *L) {
  sender_ud *su = check_sender(L);
  if (su->s == NULL) luaL_error(L, "attempt to use a closed stella sender");
  if (!su->appendable) luaL_error(L, "stella sender: not an appendable sender (sender_open)");
  return su;
}

/* sender:add({ http, path, body, ... }, budget_seconds [, groups]) -> chunk id | nil,
 * message: adds a chunk (arguments as for send_many); the lanes take its items after the
 * chunks added before. */
static int l_sender_add(lua_State *L) {
  sender_ud *su = appendable(L);
  lua_Number budget = luaL_checknumber(L, 3);
  size_t i, count = triples(L, 2, 4);
  stella_send_item *items;
  size_t *groups;
  long id;
  char err[128];
  lua_settop(L, 4);
  lua_rawgeti(L, LUA_REGISTRYINDEX, su->ref);   /* the lanes' clients: index 5 */
  items = read_items(L, 2, 4, count, "sender:add", su, 0, &groups);   /* checks all before lending */
  id = stella_sender_add(su->s, items, groups, count, budget > 0 ? (long)(budget * 1000) : 0, err, sizeof err);
  if (id < 0) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  for (i = 0; i < count; i++) {   /* new clients: anchored in lane order, and lent */
    http_ud *h;
    lua_rawgeti(L, 2, (int)(3 * i + 1));
    h = (http_ud *)lua_touserdata(L, -1);
    lua_pushvalue(L, -1);
    lua_rawget(L, 5);
    if (lua_isnil(L, -1)) {
      lua_Integer k = (lua_Integer)stella_rawlen(L, 5) + 1;
      lua_pop(L, 1);
      if (su->lending) h->lent = su;
      lua_pushvalue(L, -1);
      lua_rawseti(L, 5, (int)k);
      lua_pushinteger(L, k);
      lua_rawset(L, 5);
    } else {
      lua_pop(L, 2);
    }
  }
  lua_pushinteger(L, (lua_Integer)id);
  return 1;
}

/* sender:ready(id [, wait_seconds]) -> true once chunk id can be collected without
 * waiting for a post (see stella_sender_ready); waits up to wait_seconds for that */
static int l_sender_ready(lua_State *L) {
  sender_ud *su = appendable(L);
  long id = (long)luaL_checkinteger(L, 2);
  long wait_ms = wait_ms_arg(L, 3);
  lua_pushboolean(L, stella_sender_ready(su->s, id, wait_ms));
  return 1;
}

/* sender:collect(id) -> results, posters: per item of chunk id, results[k] = what http:post
 * returns, "skipped" (its budget had passed) or false (not taken); posters[k] = the
 * stella.http that posted it. Items not taken yet are taken back (never posted now). */
static int l_sender_collect(lua_State *L) {
  sender_ud *su = appendable(L);
  long id = (long)luaL_checkinteger(L, 2);
  long n = stella_sender_collect(su->s, id);
  long k;
  if (n < 0) return luaL_error(L, "sender:collect: no chunk %d", (int)id);
  lua_createtable(L, (int)n, 0);
  lua_createtable(L, (int)n, 0);
  lua_rawgeti(L, LUA_REGISTRYINDEX, su->ref);
  for (k = 0; k < n; k++) {
    int state;
    const stella_send_result *r = stella_sender_collected(su->s, (size_t)k, &state);
    if (r) {
      push_send_result(L, r);
      lua_rawseti(L, -4, (int)k + 1);
      lua_rawgeti(L, -1, (int)r->by + 1);
      lua_rawseti(L, -3, (int)k + 1);
    } else {
      if (state == STELLA_SEND_SKIPPED) lua_pushliteral(L, "skipped");
      else lua_pushboolean(L, 0);
      lua_rawseti(L, -4, (int)k + 1);
    }
  }
  lua_pop(L, 1);
  return 2;
}

/* sender:pause(): no lane takes another item; returns once no post is in flight. The
 * clients are the caller's until sender:resume(). */
static int l_sender_pause(lua_State *L) {
  sender_ud *su = appendable(L);
  stella_sender_pause(su->s);
  if (su->lending) lend_clients(L, su, 0);
  return 0;
}

/* sender:resume() -> true when the lanes run again (not after stop, nor while a chunk with
 * a failed item is not collected) */
static int l_sender_resume(lua_State *L) {
  sender_ud *su = appendable(L);
  int running = stella_sender_resume(su->s);
  if (running && !su->lending) lend_clients(L, su, 1);
  lua_pushboolean(L, running);
  return 1;
}

/* sender:paused() -> true while paused or stopped */
static int l_sender_paused(lua_State *L) {
  lua_pushboolean(L, stella_sender_paused(appendable(L)->s));
  return 1;
}

static const luaL_Reg sender_methods[] = {
  { "poster", l_sender_poster },
  { "done", l_sender_done },
  { "stop", l_sender_stop },
  { "wait", l_sender_wait },
  { "result", l_sender_result },
  { "add", l_sender_add },
  { "ready", l_sender_ready },
  { "collect", l_sender_collect },
  { "pause", l_sender_pause },
  { "resume", l_sender_resume },
  { "paused", l_sender_paused },
  { "close", l_sender_close },
  { NULL, NULL }
};

static const luaL_Reg http_funcs[] = {
  { "retry_delay", l_retry_delay },
  { "parse_retry_after", l_parse_retry_after },
  { "classify_status", l_classify_status },
  { "sleep", l_sleep },
  { "monotonic", l_monotonic },
  { "http_new", l_http_new },
  { "check_http_options", l_check_http_options },
  { "send_many", l_send_many },
  { "sender_open", l_sender_open },
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

void lstella_open_http(lua_State *L) {
  new_class(L, HTTP_MT, http_methods, l_http_close, l_http_tostring);
  new_class(L, SENDER_MT, sender_methods, l_sender_close, NULL);
  stella_setfuncs(L, http_funcs, 0);
  push_outcomes(L);
  lua_pushinteger(L, (lua_Integer)STELLA_MAX_ANSWER_BYTES);
  lua_setfield(L, -2, "max_answer_bytes");
  lua_pushliteral(L, STELLA_DEFAULT_BASE_URL);
  lua_setfield(L, -2, "default_base_url");
}
