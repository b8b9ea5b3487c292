/* lua_host.c - a minimal `lua SCRIPT ARGS...` / `lua -e CODE` for `make asan`.
 *
 * Built with -fsanitize=address,undefined so the sanitizer runtime is linked
 * into the interpreter itself: no LD_PRELOAD, which child processes (nginx,
 * shells, pkill) would inherit and choke on. Like the standalone interpreter, Ctrl-C
 * (SIGINT) during a script raises "interrupted!" at the next Lua instruction (the specs
 * check how code under a debug hook lets that through). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

static int report(lua_State *L, int status) {
  if (status != LUA_OK) {
    const char *msg = lua_tostring(L, -1);
    fprintf(stderr, "lua_host: %s\n", msg ? msg : "(error object is not a string)");
    lua_pop(L, 1);
  }
  return status;
}

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  luaL_traceback(L, L, msg ? msg : "(error object is not a string)", 1);
  return 1;
}

/* The state a SIGINT interrupts: a signal handler can reach nothing else (lua.c does the
 * same; this is a test host, not library code). */
static lua_State *running_state = NULL;

static void stop_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  luaL_error(L, "interrupted!");
}

static void on_interrupt(int sig) {
  signal(sig, SIG_DFL);   /* a second Ctrl-C ends the process */
  lua_sethook(running_state, stop_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

static int run(lua_State *L, int nargs) {
  int status, base = lua_gettop(L) - nargs;
  lua_pushcfunction(L, traceback);
  lua_insert(L, base);
  running_state = L;
  signal(SIGINT, on_interrupt);
  status = lua_pcall(L, nargs, 0, base);
  signal(SIGINT, SIG_DFL);
  lua_remove(L, base);
  return status;
}

int main(int argc, char **argv) {
  lua_State *L = luaL_newstate();
  int i, status, script = 1;
  if (L == NULL) return 1;
  luaL_openlibs(L);
  if (argc > 2 && strcmp(argv[1], "-e") == 0) {
    status = report(L, luaL_loadstring(L, argv[2]) || run(L, 0));
    lua_close(L);
    return status == LUA_OK ? 0 : 1;
  }
  if (argc < 2) { fprintf(stderr, "usage: %s SCRIPT [ARGS...] | -e CODE\n", argv[0]); return 2; }
  /* arg table as the standalone interpreter builds it */
  lua_createtable(L, argc - script - 1, script + 1);
  for (i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - script);
  }
  lua_setglobal(L, "arg");
  status = luaL_loadfile(L, argv[script]);
  if (status == LUA_OK) {
    for (i = script + 1; i < argc; i++) lua_pushstring(L, argv[i]);
    status = run(L, argc - script - 1);
  }
  report(L, status);
  lua_close(L);
  return status == LUA_OK ? 0 : 1;
}
