/* lstella_redis.c - `stella.redis.core`: one blocking Redis connection over hiredis'
 * synchronous API (0.14 and later), for plain Lua. stella.redis (lua/stella/redis/)
 * builds URLs, AUTH, SELECT, reconnects and Functions on top; inside OpenResty it uses
 * cosockets instead, so this module is never needed there. A separate module so that
 * the HTTP core (stella.core) does not depend on hiredis.
 *
 *   core.connect(host, port, connect_timeout_ms, timeout_ms [, new_error]) -> conn | nil, err
 *   core.connect_unix(path, connect_timeout_ms, timeout_ms [, new_error]) -> conn | nil, err
 *   conn:command(arg, ...)      -> reply | nil, err       (args: strings or numbers)
 *   conn:pipeline({argv, ...})  -> { reply, ... } | nil, err    (one round trip)
 *   conn:connected()            -> true while the connection is usable
 *   conn:close()                (also __gc, __close; idempotent)
 *
 * Replies: status and bulk strings -> string, integer -> integer, nil -> false (as in
 * Redis' own Lua scripting), array -> list (nested), error -> an error value. Errors are
 * made by new_error(kind, code, message) when given (stella.redis passes its
 * constructor), else plain tables {kind, code, message, retryable}. kind "redis": an
 * error reply, code its first word ("ERR", "WRONGTYPE", "NOSCRIPT"); at the top level of
 * command() it is returned as nil, err, inside an array or a pipeline it stands in the
 * reply's place. kind "network": the connection failed (codes "connect", "timeout",
 * "closed", "io", "protocol") and was closed; code "stale" means nothing was sent
 * (the server had closed the idle connection, or an earlier call was interrupted by a
 * Lua error halfway through its replies), so sending again on a new connection is safe.
 *
 * Ownership: the hiredis context, the reply being converted and the argv scratch arrays
 * all belong to the userdata, so a Lua error raised while converting (out of memory)
 * leaks nothing: close/__gc frees them, and the next call sees the leftover reply and
 * refuses the connection as "stale" (its replies are no longer in step). */
#define _POSIX_C_SOURCE 200112L
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>
#include "compat.h"
#include <hiredis/hiredis.h>

#define CONN_MT "stella.redis.conn"
#define MAX_CODE 32   /* the longest error code kept (Redis' are short upper-case words) */

#if LUA_VERSION_NUM == 501
#define set_uservalue(L, idx) lua_setfenv(L, (idx))
#define get_uservalue(L, idx) lua_getfenv(L, (idx))
#else
#define set_uservalue(L, idx) lua_setiuservalue(L, (idx), 1)
#define get_uservalue(L, idx) lua_getiuservalue(L, (idx), 1)
#endif

typedef struct conn_ud {
  redisContext *ctx;    /* NULL once closed or failed */
  redisReply *reply;    /* a reply being converted to Lua; NULL between calls */
  int in_flight;        /* replies still to read: non-zero only inside a call */
  const char **argv;    /* scratch for one command's arguments */
  size_t *argvlen;
  size_t cap;
} conn_ud;

/* ------------------------------------------------------------------------ */
/* Errors                                                                    */
/* ------------------------------------------------------------------------ */

/* Pushes an error value: new_error(kind, code, message) from the connection's user value
 * (at index ud), or a plain table. */
static void push_error(lua_State *L, int ud, const char *kind, const char *code, size_t code_len,
                       const char *msg, size_t msg_len) {
  luaL_checkstack(L, 5, "redis error");
  if (ud != 0) {
    get_uservalue(L, ud);
    if (lua_istable(L, -1)) {
      lua_rawgeti(L, -1, 1);
      lua_remove(L, -2);
    }
    if (lua_isfunction(L, -1)) {
      lua_pushstring(L, kind);
      lua_pushlstring(L, code, code_len);
      lua_pushlstring(L, msg, msg_len);
      lua_call(L, 3, 1);
      return;
    }
    lua_pop(L, 1);
  }
  lua_createtable(L, 0, 4);
  lua_pushstring(L, kind);
  lua_setfield(L, -2, "kind");
  lua_pushlstring(L, code, code_len);
  lua_setfield(L, -2, "code");
  lua_pushlstring(L, msg, msg_len);
  lua_setfield(L, -2, "message");
  lua_pushboolean(L, strcmp(kind, "network") == 0);
  lua_setfield(L, -2, "retryable");
}

/* An error reply: its code is the first word ("ERR", "WRONGTYPE", ...). */
static void push_reply_error(lua_State *L, int ud, const char *text, size_t len) {
  size_t n = 0;
  while (n < len && n < MAX_CODE && text[n] != ' ' && text[n] != '\r' && text[n] != '\n') n++;
  if (n == 0 || n == MAX_CODE) push_error(L, ud, "redis", "ERR", 3, text, len);
  else push_error(L, ud, "redis", text, n, text, len);
}

static void push_network_error(lua_State *L, int ud, const char *code, const char *msg) {
  push_error(L, ud, "network", code, strlen(code), msg, strlen(msg));
}

/* The code of a failed context: err and the errno saved right after the failing call. */
static const char *network_code(const redisContext *c, int saved_errno) {
  switch (c->err) {
  case REDIS_ERR_EOF: return "closed";
  case REDIS_ERR_PROTOCOL: return "protocol";
  case REDIS_ERR_IO:
    if (saved_errno == EAGAIN || saved_errno == EWOULDBLOCK || saved_errno == ETIMEDOUT ||
        saved_errno == EINPROGRESS)
      return "timeout";
    return "io";
  default: return "io";
  }
}

/* ------------------------------------------------------------------------ */
/* The connection                                                            */
/* ------------------------------------------------------------------------ */

static conn_ud *check_conn(lua_State *L) {
  return (conn_ud *)luaL_checkudata(L, 1, CONN_MT);
}

static void drop(conn_ud *c) {
  if (c->reply) {
    freeReplyObject(c->reply);
    c->reply = NULL;
  }
  if (c->ctx) {
    redisFree(c->ctx);
    c->ctx = NULL;
  }
  c->in_flight = 0;
}

/* One close for close/__gc/__close. */
static int l_close(lua_State *L) {
  conn_ud *c = (conn_ud *)luaL_checkudata(L, 1, CONN_MT);
  drop(c);
  free((void *)c->argv);
  free(c->argvlen);
  c->argv = NULL;
  c->argvlen = NULL;
  c->cap = 0;
  return 0;
}

static int l_connected(lua_State *L) {
  conn_ud *c = check_conn(L);
  lua_pushboolean(L, c->ctx != NULL && c->ctx->err == 0);
  return 1;
}

static int l_tostring(lua_State *L) {
  conn_ud *c = check_conn(L);
  if (c->ctx == NULL) lua_pushliteral(L, "stella.redis.core connection (closed)");
  else if (c->ctx->connection_type == REDIS_CONN_UNIX)
    lua_pushfstring(L, "stella.redis.core connection (unix:%s)", c->ctx->unix_sock.path);
  else lua_pushfstring(L, "stella.redis.core connection (%s:%d)", c->ctx->tcp.host, c->ctx->tcp.port);
  return 1;
}

static struct timeval millis(lua_State *L, int idx) {
  struct timeval tv;
  lua_Number ms = luaL_checknumber(L, idx);
  if (!(ms > 0 && ms <= 86400000.0)) luaL_argerror(L, idx, "a timeout in milliseconds (0 < ms <= 86400000)");
  tv.tv_sec = (time_t)(ms / 1000);
  tv.tv_usec = (suseconds_t)((ms - (lua_Number)tv.tv_sec * 1000) * 1000);
  return tv;
}

/* The new userdata (at the top) takes over ctx; or nil, err and ctx is freed. */
static int finish_connect(lua_State *L, redisContext *ctx, int timeout_idx, int error_fn_idx) {
  conn_ud *c;
  struct timeval timeout = millis(L, timeout_idx);
  if (ctx == NULL) {
    lua_pushnil(L);
    push_error(L, 0, "network", "connect", 7, "out of memory", 13);
    return 2;
  }
  c = (conn_ud *)lua_newuserdata(L, sizeof *c);
  memset(c, 0, sizeof *c);
  c->ctx = ctx;   /* owned from here on */
  luaL_getmetatable(L, CONN_MT);
  lua_setmetatable(L, -2);
  lua_createtable(L, 1, 0);
  if (!lua_isnoneornil(L, error_fn_idx)) {
    luaL_checktype(L, error_fn_idx, LUA_TFUNCTION);
    lua_pushvalue(L, error_fn_idx);
    lua_rawseti(L, -2, 1);
  }
  set_uservalue(L, -2);
  if (ctx->err) {
    int ud = lua_gettop(L);
    lua_pushnil(L);
    push_network_error(L, ud, ctx->err == REDIS_ERR_IO && strstr(ctx->errstr, "timed out") ? "timeout"
                                                                                               : "connect",
                       ctx->errstr);
    drop(c);
    return 2;
  }
  if (redisSetTimeout(ctx, timeout) != REDIS_OK) {
    int ud = lua_gettop(L);
    lua_pushnil(L);
    push_network_error(L, ud, "connect", ctx->errstr[0] ? ctx->errstr : "cannot set the timeout");
    drop(c);
    return 2;
  }
  return 1;
}

static int l_connect(lua_State *L) {
  const char *host = luaL_checkstring(L, 1);
  lua_Integer port = luaL_checkinteger(L, 2);
  struct timeval ct = millis(L, 3);
  (void)millis(L, 4);   /* checked before connecting */
  if (port < 1 || port > 65535) luaL_argerror(L, 2, "a port number (1-65535)");
  if (!lua_isnoneornil(L, 5)) luaL_checktype(L, 5, LUA_TFUNCTION);
  lua_settop(L, 5);   /* the userdata goes above the arguments */
  return finish_connect(L, redisConnectWithTimeout(host, (int)port, ct), 4, 5);
}

static int l_connect_unix(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  struct timeval ct = millis(L, 2);
  (void)millis(L, 3);
  if (!lua_isnoneornil(L, 4)) luaL_checktype(L, 4, LUA_TFUNCTION);
  lua_settop(L, 4);
  return finish_connect(L, redisConnectUnixWithTimeout(path, ct), 3, 4);
}

/* Whether the server closed this idle connection (a FIN or an error is waiting). Only
 * called between calls, when no reply is due, so readable means closed. */
static int peer_closed(int fd) {
  struct pollfd p;
  char b;
  ssize_t n;
  p.fd = fd;
  p.events = POLLIN;
  p.revents = 0;
  if (poll(&p, 1, 0) <= 0) return 0;
  if (p.revents & (POLLERR | POLLHUP | POLLNVAL)) return 1;
  n = recv(fd, &b, 1, MSG_PEEK);
  return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

/* Before sending: a connection that cannot be used. Pushes nil, err and returns 2; or 0. */
static int refuse_stale(lua_State *L, conn_ud *c) {
  const char *why = NULL;
  if (c->ctx == NULL) why = "the connection is closed";
  else if (c->reply != NULL || c->in_flight != 0)
    why = "the connection's replies were left unread by an error in an earlier call";
  else if (c->ctx->err != 0) why = "the connection failed earlier";
  else if (peer_closed(c->ctx->fd)) why = "the server closed the idle connection";
  if (why == NULL) return 0;
  drop(c);
  lua_pushnil(L);
  push_network_error(L, 1, "stale", why);
  return 2;
}

/* A failed send or receive: closes the connection and pushes nil, err. */
static int fail(lua_State *L, conn_ud *c, int saved_errno) {
  const char *code = network_code(c->ctx, saved_errno);
  lua_pushnil(L);
  push_network_error(L, 1, code, c->ctx->errstr[0] ? c->ctx->errstr : "connection failed");
  drop(c);
  return 2;
}

/* Room for n arguments in the scratch arrays (owned by the userdata: a failed
 * realloc raises, and nothing leaks). */
static void reserve(lua_State *L, conn_ud *c, size_t n) {
  const char **argv;
  size_t *lens, cap;
  if (n <= c->cap) return;
  cap = c->cap ? c->cap : 16;
  while (cap < n) cap *= 2;
  argv = (const char **)realloc((void *)c->argv, cap * sizeof *argv);
  if (argv == NULL) luaL_error(L, "out of memory");
  c->argv = argv;
  lens = (size_t *)realloc(c->argvlen, cap * sizeof *lens);
  if (lens == NULL) luaL_error(L, "out of memory");
  c->argvlen = lens;
  c->cap = cap;
}

/* The string at stack index idx (a number is converted in place). */
static const char *arg_string(lua_State *L, int idx, size_t *len, int argn, lua_Integer item) {
  int t = lua_type(L, idx);
  if (t != LUA_TSTRING && t != LUA_TNUMBER) {
    if (item > 0)
      luaL_error(L, "bad argument #%d to 'pipeline' (command %d: arguments must be strings or numbers, got %s)",
                 argn, (int)item, lua_typename(L, t));
    else
      luaL_error(L, "bad argument #%d to 'command' (a string or a number expected, got %s)", argn,
                 lua_typename(L, t));
  }
  return lua_tolstring(L, idx, len);
}

/* Pushes the Lua value of reply r. Depth is bounded by hiredis' reader (7 levels). */
static void push_reply(lua_State *L, const redisReply *r) {
  size_t i;
  luaL_checkstack(L, 4, "redis reply too deep");
  switch (r->type) {
  case REDIS_REPLY_STRING:
  case REDIS_REPLY_STATUS:
    lua_pushlstring(L, r->str, r->len);
    break;
  case REDIS_REPLY_INTEGER:
    lua_pushinteger(L, (lua_Integer)r->integer);
    break;
  case REDIS_REPLY_ARRAY:
    if (r->elements > (size_t)INT_MAX) luaL_error(L, "redis reply too large");
    lua_createtable(L, (int)r->elements, 0);
    for (i = 0; i < r->elements; i++) {
      push_reply(L, r->element[i]);
      lua_rawseti(L, -2, (int)i + 1);
    }
    break;
  case REDIS_REPLY_ERROR:
    push_reply_error(L, 1, r->str, r->len);
    break;
  case REDIS_REPLY_NIL:
  default:
    lua_pushboolean(L, 0);
    break;
  }
}

/* Reads the next reply into c->reply (owned there while it is converted), pushes its
 * value and returns its type; or returns -1 after a network failure. */
static int read_reply(lua_State *L, conn_ud *c, int *saved_errno) {
  void *reply = NULL;
  int type;
  errno = 0;
  if (redisGetReply(c->ctx, &reply) != REDIS_OK || reply == NULL) {
    *saved_errno = errno;
    if (reply) freeReplyObject(reply);
    return -1;
  }
  c->reply = (redisReply *)reply;
  c->in_flight--;
  type = c->reply->type;
  push_reply(L, c->reply);
  freeReplyObject(c->reply);
  c->reply = NULL;
  return type;
}

static int l_command(lua_State *L) {
  conn_ud *c = check_conn(L);
  int n = lua_gettop(L) - 1, i, saved = 0, r;
  if (n < 1) luaL_error(L, "bad argument #1 to 'command' (a command name expected)");
  reserve(L, c, (size_t)n);
  for (i = 0; i < n; i++) c->argv[i] = arg_string(L, i + 2, &c->argvlen[i], i + 1, 0);
  if ((r = refuse_stale(L, c)) != 0) return r;
  errno = 0;
  if (redisAppendCommandArgv(c->ctx, n, c->argv, c->argvlen) != REDIS_OK) return fail(L, c, errno);
  c->in_flight = 1;
  r = read_reply(L, c, &saved);
  if (r < 0) return fail(L, c, saved);
  if (r == REDIS_REPLY_ERROR) {   /* an error reply at the top: nil, err */
    lua_pushnil(L);
    lua_insert(L, -2);
    return 2;
  }
  return 1;
}

/* conn:pipeline({ {"SET", "a", "1"}, {"GET", "a"} }) -> { "OK", "1" }: every command is
 * checked before anything is sent, then all are sent at once and their replies read. */
static int l_pipeline(lua_State *L) {
  conn_ud *c = check_conn(L);
  lua_Integer n, i;
  int saved = 0, r;
  luaL_checktype(L, 2, LUA_TTABLE);
  n = (lua_Integer)stella_rawlen(L, 2);
  if (n > INT_MAX - 1) luaL_argerror(L, 2, "too many commands");
  for (i = 1; i <= n; i++) {   /* first pass: misuse raises before anything is sent */
    size_t len, k;
    lua_rawgeti(L, 2, (int)i);
    if (!lua_istable(L, -1))
      luaL_error(L, "bad argument #1 to 'pipeline' (command %d: a list of arguments expected)", (int)i);
    len = stella_rawlen(L, -1);
    if (len == 0) luaL_error(L, "bad argument #1 to 'pipeline' (command %d: a command name expected)", (int)i);
    if (len > (size_t)INT_MAX - 8) luaL_error(L, "bad argument #1 to 'pipeline' (command %d is too long)", (int)i);
    for (k = 1; k <= len; k++) {
      int t;
      lua_rawgeti(L, -1, (int)k);
      t = lua_type(L, -1);
      if (t != LUA_TSTRING && t != LUA_TNUMBER) (void)arg_string(L, -1, NULL, 1, i);
      lua_pop(L, 1);
    }
    if (len > c->cap) reserve(L, c, len);
    lua_pop(L, 1);
  }
  if ((r = refuse_stale(L, c)) != 0) return r;
  for (i = 1; i <= n; i++) {   /* second pass: into hiredis' output buffer */
    int k, len, ok;
    lua_rawgeti(L, 2, (int)i);
    len = (int)stella_rawlen(L, -1);
    luaL_checkstack(L, len + 2, "too many arguments");
    for (k = 1; k <= len; k++) {
      lua_rawgeti(L, -k, k);   /* the command table stays k slots down */
      c->argv[k - 1] = lua_tolstring(L, -1, &c->argvlen[k - 1]);
    }
    errno = 0;
    ok = redisAppendCommandArgv(c->ctx, len, c->argv, c->argvlen) == REDIS_OK;
    lua_pop(L, len + 1);
    if (!ok) return fail(L, c, errno);
  }
  c->in_flight = (int)n;
  lua_createtable(L, (int)n, 0);
  for (i = 1; i <= n; i++) {
    if (read_reply(L, c, &saved) < 0) return fail(L, c, saved);
    lua_rawseti(L, -2, (int)i);
  }
  return 1;
}

static const luaL_Reg conn_methods[] = {
  { "command", l_command },
  { "pipeline", l_pipeline },
  { "connected", l_connected },
  { "close", l_close },
  { NULL, NULL }
};

static const luaL_Reg funcs[] = {
  { "connect", l_connect },
  { "connect_unix", l_connect_unix },
  { NULL, NULL }
};

int luaopen_stella_redis_core(lua_State *L);
int luaopen_stella_redis_core(lua_State *L) {
  if (luaL_newmetatable(L, CONN_MT)) {
    lua_newtable(L);
    stella_setfuncs(L, conn_methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, l_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushliteral(L, CONN_MT);
    lua_setfield(L, -2, "__name");
  }
  lua_pop(L, 1);
  lua_newtable(L);
  stella_setfuncs(L, funcs, 0);
  lua_pushfstring(L, "hiredis %d.%d.%d", HIREDIS_MAJOR, HIREDIS_MINOR, HIREDIS_PATCH);
  lua_setfield(L, -2, "hiredis_version");
  return 1;
}
