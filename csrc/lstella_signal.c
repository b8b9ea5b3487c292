/* lstella_signal.c - SIGINT, SIGTERM and SIGHUP turned into a flag that the `stella`
 * command looks at between its steps (stella.core.catch_signals, stella.core.caught_signal),
 * so that Ctrl-C or a kill stops it in an orderly way: no new batch, the sends in flight
 * settled, the rest handed back to the outbox, the files of the sandbox removed.
 *
 * Why C, and why a static flag: a signal handler is given no pointer of ours, so what it
 * writes must be static, and POSIX lets it write nothing but a volatile sig_atomic_t. This
 * is the binding's one mutable global, and only the handler writes it (catch_signals
 * clears it before installing the handler). lua-posix (posix.signal) would run a Lua
 * handler instead, but Debian 12 packages it for Lua 5.1-5.3 only, not for the Lua 5.4 the
 * command runs under, and a Lua handler runs only at the next hook point: after the
 * blocking call (a send, a wait for the sending threads) that it should cut short.
 *
 * The handlers are installed without SA_RESTART, so a blocking read or sleep of the main
 * thread returns early (EINTR). A second signal while the first is being handled gets the
 * default action back: a second Ctrl-C ends the process at once. */
#define _POSIX_C_SOURCE 200112L   /* sigaction */
#include <signal.h>
#include <string.h>
#include "lstella.h"

#define CATCHER_MT "stella.signals"

/* the first signal caught since catch_signals, 0 while none: see the comment above */
static volatile sig_atomic_t caught;

static const struct { int signo; const char *name; } SIGNALS[] = {
  { SIGINT, "SIGINT" }, { SIGTERM, "SIGTERM" }, { SIGHUP, "SIGHUP" },
};
#define NSIGNALS (sizeof SIGNALS / sizeof SIGNALS[0])

static void on_signal(int signo) {
  if (caught != 0) {   /* the second one: as if we had never caught it */
    signal(signo, SIG_DFL);
    raise(signo);
    return;
  }
  caught = signo;
}

int lstella_signal_pending(void) {
  return caught != 0;
}

/* The previous actions, restored by release. */
typedef struct catcher {
  struct sigaction old[NSIGNALS];
  int active;
} catcher;

static int l_catcher_release(lua_State *L) {
  catcher *c = (catcher *)luaL_checkudata(L, 1, CATCHER_MT);
  size_t i;
  if (!c->active) return 0;
  c->active = 0;
  for (i = 0; i < NSIGNALS; i++) sigaction(SIGNALS[i].signo, &c->old[i], NULL);
  return 0;
}

static int ours(int signo) {
  struct sigaction now;
  return sigaction(signo, NULL, &now) == 0 && now.sa_handler == on_signal;
}

/* catch_signals() -> catcher: SIGINT, SIGTERM and SIGHUP set the flag caught_signal reads
 * instead of ending the process, until catcher:release() (also close, __gc, __close) puts
 * the previous actions back. One catcher at a time. */
static int l_catch_signals(lua_State *L) {
  catcher *c;
  struct sigaction sa;
  size_t i;
  for (i = 0; i < NSIGNALS; i++)
    if (ours(SIGNALS[i].signo)) return luaL_error(L, "catch_signals: the signals are already caught");
  c = (catcher *)lua_newuserdata(L, sizeof *c);
  memset(c, 0, sizeof *c);
  luaL_getmetatable(L, CATCHER_MT);
  lua_setmetatable(L, -2);
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;   /* no SA_RESTART: a blocking call returns early */
  caught = 0;
  for (i = 0; i < NSIGNALS; i++) sigaction(SIGNALS[i].signo, &sa, &c->old[i]);
  c->active = 1;
  return 1;
}

/* caught_signal() -> name, number ("SIGINT", 2) of the first signal caught, or nothing */
static int l_caught_signal(lua_State *L) {
  int signo = caught;
  size_t i;
  if (signo == 0) return 0;
  for (i = 0; i < NSIGNALS; i++) {
    if (SIGNALS[i].signo == signo) {
      lua_pushstring(L, SIGNALS[i].name);
      lua_pushinteger(L, signo);
      return 2;
    }
  }
  return 0;
}

static const luaL_Reg catcher_methods[] = {
  { "release", l_catcher_release },
  { NULL, NULL }
};

static const luaL_Reg signal_funcs[] = {
  { "catch_signals", l_catch_signals },
  { "caught_signal", l_caught_signal },
  { NULL, NULL }
};

void lstella_open_signal(lua_State *L) {
  if (luaL_newmetatable(L, CATCHER_MT)) {
    lua_newtable(L);
    stella_setfuncs(L, catcher_methods, 0);
    lua_pushcfunction(L, l_catcher_release);
    lua_setfield(L, -2, "close");
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_catcher_release);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_catcher_release);
    lua_setfield(L, -2, "__close");
  }
  lua_pop(L, 1);
  stella_setfuncs(L, signal_funcs, 0);
}
