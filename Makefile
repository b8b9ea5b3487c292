# lua-stella - build, test, install.
#
#   make                 build the C core for Lua 5.4   -> build/5.4/stella/core.so
#   make LUA=luajit      build it for LuaJIT/OpenResty  -> build/luajit/stella/core.so
#                        (both also build the Redis connection stella.redis.core ->
#                        BUILD/stella/redis/core.so when hiredis' headers are installed)
#   make test            C tests + specs under Lua 5.4 and LuaJIT ("N passed, N failed")
#   make asan            specs with the core (and stella.redis.core) built under AddressSanitizer
#   make valgrind        the C tests, the plain-http path's and the Redis connection's specs under valgrind
#   make fuzz            libFuzzer harnesses under ASan + UBSan (FUZZ_SECONDS each; clang-14)
#   make bench           benchmarks (ratios against baselines measured in the same run; the
#                        client/server ones pinned: different CPUs, then the same CPU)
#   make bench-peers     the send endpoint with luasocket + cjson, python requests, a curl
#                        loop and wrk next to client:send (skipping what is not installed)
#   make soak            SOAK_SECONDS=120 [SOAK_SEED=N]: faults at random, then every event checked
#   make install         PREFIX=/usr/local, DESTDIR, LUA_LIBDIR, LUA_SHAREDIR, BINDIR
#   make rock rock-install   what `luarocks make`/`luarocks install` run (rockspec/, build.type "make")
#   make deps            install the Debian packages (as root) or print the apt-get line
#   make DEV=1           extra warnings as errors

LUA          ?= 5.4
ifeq ($(LUA),luajit)
LUA_INCDIR   ?= /usr/include/luajit-2.1
LUA_BIN      ?= luajit
LUA_ABI      ?= 5.1
else
LUA_INCDIR   ?= /usr/include/lua$(LUA)
LUA_BIN      ?= lua$(LUA)
LUA_ABI      ?= $(LUA)
endif

CURL_CFLAGS  ?= $(shell pkg-config --cflags libcurl 2>/dev/null)
CURL_LIBS    ?= $(shell pkg-config --libs libcurl 2>/dev/null || echo -lcurl)
THREAD_LIBS  ?= -pthread   # stella_sender.c: the background sending thread
# hiredis (libhiredis-dev) for the separate module stella.redis.core; without its headers
# that module is skipped and the HTTP core builds as before.
HIREDIS_CFLAGS ?= $(shell pkg-config --cflags hiredis 2>/dev/null)
HIREDIS_LIBS ?= $(shell pkg-config --libs hiredis 2>/dev/null || echo -lhiredis)
HAVE_HIREDIS ?= $(shell printf '\043include <hiredis/hiredis.h>\n' | $(CC) $(HIREDIS_CFLAGS) -E -x c - \
                  >/dev/null 2>&1 && echo 1)

CC           ?= cc
OPT          ?= -O2
WARN         := -std=c99 -Wall -Wextra -pedantic -Wshadow -Wmissing-prototypes -Wstrict-prototypes \
                -Wpointer-arith -Wcast-qual -Wformat=2
ifeq ($(DEV),1)
WARN         += -Werror
endif
CFLAGS       ?= $(OPT) -g
ALL_CFLAGS   := $(WARN) $(CFLAGS) -fPIC -I$(LUA_INCDIR) $(CURL_CFLAGS)
LDFLAGS      ?=
LIBFLAG      ?= -shared

PREFIX       ?= /usr/local
LUA_LIBDIR   ?= $(PREFIX)/lib/lua/$(LUA_ABI)
LUA_SHAREDIR ?= $(PREFIX)/share/lua/$(LUA_ABI)
BINDIR       ?= $(PREFIX)/bin
INCDIR       ?= $(PREFIX)/include
LUAJIT_LIBDIR ?= $(PREFIX)/lib/lua/5.1
LIBDIR       ?= $(PREFIX)/lib

BUILD        := build/$(LUA)
CORE_SRC     := csrc/stella_value.c csrc/stella_text.c csrc/stella_codes.c csrc/stella_schema.c \
                csrc/stella_parse.c \
                csrc/stella_validate.c csrc/stella_check.c csrc/stella_json.c csrc/stella_outcome.c csrc/stella_http.c \
                csrc/stella_answer.c \
                csrc/stella_sender.c csrc/stella_slice.c \
                csrc/stella_sha256.c
CORE_HDR     := csrc/stella.h csrc/stella_answer.h csrc/stella_schema.h csrc/compat.h csrc/lstella.h csrc/lstella_decode.h \
                csrc/lstella_encode.h
BINDING_SRC  := csrc/lstella.c csrc/lstella_http.c csrc/lstella_decode.c csrc/lstella_signal.c \
                csrc/lstella_encode.c
MODULE       := $(BUILD)/stella/core.so
REDIS_MODULE := $(BUILD)/stella/redis/core.so
CLIB         := build/c/libstella.a

.PHONY: all module luajit rock rock-install clib test test-c test-lua asan fuzz fuzz-build fuzz-check-cc fuzz-corpus fuzz-mutate valgrind bench bench-peers soak install uninstall deps clean

all: module

module: $(MODULE) $(if $(HAVE_HIREDIS),$(REDIS_MODULE))

$(MODULE): $(CORE_SRC) $(BINDING_SRC) $(CORE_HDR)
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(LIBFLAG) -o $@ $(CORE_SRC) $(BINDING_SRC) $(LDFLAGS) $(CURL_LIBS) $(THREAD_LIBS)

$(REDIS_MODULE): csrc/lstella_redis.c csrc/compat.h
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(CFLAGS) -fPIC -I$(LUA_INCDIR) $(HIREDIS_CFLAGS) $(LIBFLAG) -o $@ csrc/lstella_redis.c \
	  $(LDFLAGS) $(HIREDIS_LIBS)

luajit:
	$(MAKE) LUA=luajit module

# The core as a plain C library (no Lua), and its own test program.
clib: $(CLIB)

build/c/%.o: csrc/%.c $(CORE_HDR)
	@mkdir -p build/c
	$(CC) $(WARN) $(CFLAGS) -fPIC $(CURL_CFLAGS) -c -o $@ $<

$(CLIB): $(patsubst csrc/%.c,build/c/%.o,$(CORE_SRC))
	$(AR) rcs $@ $^

build/c/test_core: spec/c/test_core.c $(CLIB)
	$(CC) $(WARN) $(CFLAGS) -Icsrc $(CURL_CFLAGS) -o $@ $< $(CLIB) $(CURL_LIBS) $(THREAD_LIBS)

test: build/c/test_core build/bench/delay_api fuzz-build
	$(MAKE) LUA=5.4 module
	$(MAKE) LUA=luajit module
	@tools/run-tests tap:build/c/test_core tap:tools/rock-check busted:lua5.4:build/5.4 \
	  -- "tap:tools/run-fuzz --tap $(FUZZ_SMOKE_SECONDS) $(FUZZ_HARNESSES)" busted:luajit:build/luajit \
	     "tap:lua5.4 tools/soak.lua --tap --seconds $(SOAK_TEST_SECONDS)"

# A randomized fault schedule against the loopback test server, then a strict check of
# the server's log against the ledger and the outbox (tools/soak.lua). SOAK_SEED replays
# a run's schedule; make test runs a short one.
SOAK_SECONDS ?= 120
SOAK_TEST_SECONDS ?= 20
soak:
	$(MAKE) LUA=5.4 module
	lua5.4 tools/soak.lua --seconds $(SOAK_SECONDS) $(if $(SOAK_SEED),--seed $(SOAK_SEED))

# AddressSanitizer + UBSan: the module and a small Lua 5.4 host (spec/c/lua_host.c)
# built with the sanitizers, so the runtime lives in the interpreter and child
# processes (nginx, shells) are not preloaded with it. Specs that start Lua
# children (the CLI, the stores) use the same host through STELLA_TEST_LUA.
ASAN_FLAGS   := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer
asan: build/bench/delay_api
	$(MAKE) LUA=5.4 BUILD=build/asan MODULE=build/asan/stella/core.so CFLAGS="$(ASAN_FLAGS)" \
	        LDFLAGS="-fsanitize=address,undefined" module
	$(CC) $(WARN) $(ASAN_FLAGS) -Icsrc $(CURL_CFLAGS) -o build/asan/test_core spec/c/test_core.c \
	        $(CORE_SRC) $(CURL_LIBS) $(THREAD_LIBS)
	$(CC) $(ASAN_FLAGS) -I$(LUA_INCDIR) -o build/asan/lua spec/c/lua_host.c -llua5.4 -lm -ldl
	$(CC) $(WARN) $(ASAN_FLAGS) -Icsrc -Ispec/fuzz -o build/asan/fuzz_json spec/c/fuzz_json.c \
	        spec/fuzz/check_json.c $(CORE_SRC) $(CURL_LIBS) $(THREAD_LIBS) -lm
	@ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	 tools/run-tests tap:build/asan/test_core tap:build/asan/fuzz_json
	@ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	 tools/run-tests busted:$(CURDIR)/build/asan/lua:build/asan

# Coverage-guided fuzzing (libFuzzer, clang) under ASan + UBSan: the harnesses in spec/fuzz/
# (fuzz_parse, fuzz_roundtrip, fuzz_url_key, fuzz_retry_after, fuzz_answer), each for FUZZ_SECONDS in turn,
# from the seed corpus in spec/fuzz/corpus/ plus what earlier runs found (build/fuzz/corpus/);
# prints executions and coverage per harness. A crash leaves its input in build/fuzz/ and
# fails the run. make test runs each for FUZZ_SMOKE_SECONDS.
#   make fuzz FUZZ_SECONDS=600 FUZZ_HARNESSES="fuzz_parse"
FUZZ_CC      ?= clang-14
FUZZ_SECONDS ?= 300
FUZZ_SMOKE_SECONDS ?= 5
FUZZ_HARNESSES ?= fuzz_parse fuzz_roundtrip fuzz_url_key fuzz_retry_after fuzz_answer
FUZZ_CFLAGS  := -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
FUZZ_BIN     := $(addprefix build/fuzz/,$(FUZZ_HARNESSES))
FUZZ_LIB     := build/fuzz/libstella.a

fuzz-build: fuzz-check-cc $(FUZZ_BIN)

fuzz: fuzz-build
	@tools/run-fuzz $(FUZZ_SECONDS) $(FUZZ_HARNESSES)

fuzz-check-cc:
	@command -v $(FUZZ_CC) >/dev/null 2>&1 || { echo "make fuzz: $(FUZZ_CC) not found: apt-get install clang-14 libfuzzer-14-dev (or make FUZZ_CC=clang-NN)" >&2; exit 1; }
	@ls "$$($(FUZZ_CC) -print-runtime-dir)"/libclang_rt.fuzzer*.a >/dev/null 2>&1 || { echo "make fuzz: libFuzzer for $(FUZZ_CC) not found: apt-get install libfuzzer-14-dev" >&2; exit 1; }

# (-Wno-format-nonliteral: clang, unlike gcc, warns about the vsnprintf wrappers)
build/fuzz/obj/%.o: csrc/%.c $(CORE_HDR)
	@mkdir -p build/fuzz/obj
	$(FUZZ_CC) $(WARN) -Wno-format-nonliteral $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link $(CURL_CFLAGS) -c -o $@ $<

$(FUZZ_LIB): $(patsubst csrc/%.c,build/fuzz/obj/%.o,$(CORE_SRC))
	$(AR) rcs $@ $^

build/fuzz/%: spec/fuzz/%.c spec/fuzz/check_json.c spec/fuzz/check_json.h $(FUZZ_LIB)
	$(FUZZ_CC) $(WARN) $(FUZZ_CFLAGS) -fsanitize=fuzzer -Icsrc -Ispec/fuzz $(CURL_CFLAGS) -o $@ \
	        $< spec/fuzz/check_json.c $(FUZZ_LIB) $(CURL_LIBS) $(THREAD_LIBS) -lm

# The seed corpus (spec/fuzz/corpus/), regenerated from the specs' cases.
fuzz-corpus:
	lua5.4 tools/fuzz-corpus

# The older mutation fuzzer (gcc is enough): FUZZ_ITERATIONS mutated documents (make asan
# runs 200,000) through the same checks as the JSON harnesses.
FUZZ_ITERATIONS ?= 5000000
fuzz-mutate:
	@mkdir -p build/asan
	$(CC) $(WARN) $(ASAN_FLAGS) -Icsrc -Ispec/fuzz -o build/asan/fuzz_json spec/c/fuzz_json.c \
	        spec/fuzz/check_json.c $(CORE_SRC) $(CURL_LIBS) $(THREAD_LIBS) -lm
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 build/asan/fuzz_json $(FUZZ_ITERATIONS) $${FUZZ_SEED:-1}

# The C tests, then (with hiredis) the Redis connection's specs, under valgrind.
VALGRIND     := valgrind --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite
valgrind: build/c/test_core module
	$(VALGRIND) build/c/test_core
	LUA_PATH="./lua/?.lua;./lua/?/init.lua;./spec/?.lua;;" LUA_CPATH="./$(BUILD)/?.so;;" \
	  STELLA_TEST_LUA=$(LUA_BIN) $(VALGRIND) $(LUA_BIN) /usr/bin/busted -o TAP spec/http_answer_spec.lua
	$(if $(HAVE_HIREDIS),LUA_PATH="./lua/?.lua;./lua/?/init.lua;./spec/?.lua;;" \
	  LUA_CPATH="./$(BUILD)/?.so;;" STELLA_TEST_LUA=$(LUA_BIN) \
	  $(VALGRIND) $(LUA_BIN) /usr/bin/busted -o TAP spec/redis_spec.lua)

# bench/delay_api.c: the API answering in exactly the delay that bench/lanes.lua and
# spec/delay_api_spec.lua use (a fixture, Linux only; not part of the library).
build/bench/delay_api: bench/delay_api.c
	@mkdir -p build/bench
	$(CC) $(WARN) $(CFLAGS) -o $@ bench/delay_api.c

bench: build/bench/delay_api
	$(MAKE) LUA=5.4 module
	$(MAKE) LUA=luajit module
	@tools/run-bench

# The same endpoint with luasocket + cjson, python requests, a curl loop and wrk, next to
# client:send: prints the README's table of alternatives.
bench-peers:
	$(MAKE) LUA=5.4 module
	@tools/run-bench --peers

# Everything under lua/ goes to LUA_SHAREDIR: the modules and the sandbox's files beside
# them (lua/stella/sandbox/files/, where stella.sandbox looks). When it has been built
# (make luajit), also the LuaJIT core that the sandbox's nginx loads (LUAJIT_LIBDIR, where
# stella.sandbox looks for it).
install: module
	install -d $(DESTDIR)$(LUA_LIBDIR)/stella $(DESTDIR)$(LUA_SHAREDIR)/stella $(DESTDIR)$(BINDIR)
	install -m 755 $(MODULE) $(DESTDIR)$(LUA_LIBDIR)/stella/core.so
	if [ -f $(REDIS_MODULE) ]; then \
	  install -D -m 755 $(REDIS_MODULE) $(DESTDIR)$(LUA_LIBDIR)/stella/redis/core.so; fi
	cd lua && find stella -type f -exec install -D -m 644 {} $(DESTDIR)$(LUA_SHAREDIR)/{} \;
	if [ -f build/luajit/stella/core.so ] && [ "$(LUA)" != luajit ]; then \
	  install -D -m 755 build/luajit/stella/core.so $(DESTDIR)$(LUAJIT_LIBDIR)/stella/core.so; fi
	sed '1s|.*|#!/usr/bin/env $(LUA_BIN)|' bin/stella > $(DESTDIR)$(BINDIR)/stella
	chmod 755 $(DESTDIR)$(BINDIR)/stella

uninstall:
	rm -rf $(DESTDIR)$(LUA_LIBDIR)/stella $(DESTDIR)$(LUA_SHAREDIR)/stella $(DESTDIR)$(BINDIR)/stella

deps:
	@tools/install-deps

# ---- LuaRocks -------------------------------------------------------------------------
# rockspec/stella-scm-1.rockspec has build.type = "make": LuaRocks runs `make rock` and then
# `make rock-install` with its own variables (ROCK_LUA, the tree's interpreter; LUA_INCDIR;
# CFLAGS; LIBFLAG; ROCK_LIBDIR and ROCK_LUADIR, the rock's directories). The C sources are
# listed once, here (CORE_SRC): the rockspec names none. What is built follows the
# interpreter, not LUA_INCDIR (LuaRocks 3.8 on Debian answers /usr/include/lua5.1 even for
# LuaJIT):
#   Lua 5.4  the core against LUA_INCDIR, and, when LuaJIT's headers are there (Debian
#            libluajit2-5.1-dev or libluajit-5.1-dev), the LuaJIT core the sandbox's nginx
#            loads: installed as stella/sandbox/luajit/stella/core.so in the rock's lib dir
#   LuaJIT   the core against LuaJIT's headers (pkg-config luajit; LUA_INCDIR when it is
#            LuaJIT's): the stella command and the sandbox's nginx share it
#   others   refused with a message: PUC Lua 5.1, 5.2 and 5.3 are neither built nor tested
# curl.h comes from pkg-config libcurl (Debian keeps it under the multiarch directory).
ROCK_LUA     ?= lua5.4
ROCK_KIND    := $(shell $(ROCK_LUA) -e 'io.write(jit and "luajit" or (_VERSION:match("5%.%d") or "?"))' 2>/dev/null)
LUAJIT_INCDIR ?= $(or $(patsubst -I%,%,$(firstword $(shell pkg-config --cflags-only-I luajit 2>/dev/null))),$(wildcard /usr/include/luajit-2.1))
ROCK_LIBDIR  ?= build/rock/install/lib
ROCK_LUADIR  ?= build/rock/install/lua
ROCK_SUB     := $(MAKE) --no-print-directory -f $(firstword $(MAKEFILE_LIST))

rock:
	@case "$(ROCK_KIND)" in \
	  5.4) $(ROCK_SUB) module LUA=5.4 LUA_INCDIR="$(LUA_INCDIR)" BUILD=build/rock/5.4 MODULE=build/rock/5.4/stella/core.so || exit 1; \
	       if [ -n "$(LUAJIT_INCDIR)" ] && [ -f "$(LUAJIT_INCDIR)/luajit.h" ]; then \
	         $(ROCK_SUB) module LUA=luajit LUA_INCDIR="$(LUAJIT_INCDIR)" BUILD=build/rock/luajit MODULE=build/rock/luajit/stella/core.so || exit 1; \
	       else echo "stella: LuaJIT's headers not found: the rock has no LuaJIT core for \`stella sandbox\`'s nginx (install libluajit2-5.1-dev and build again)" >&2; fi ;; \
	  luajit) inc="$(LUA_INCDIR)"; [ -f "$$inc/luajit.h" ] || inc="$(LUAJIT_INCDIR)"; \
	       if [ -z "$$inc" ] || [ ! -f "$$inc/luajit.h" ]; then \
	         echo "stella: LuaJIT's headers not found (Debian: libluajit2-5.1-dev; or set LUA_INCDIR)" >&2; exit 1; fi; \
	       $(ROCK_SUB) module LUA=luajit LUA_INCDIR="$$inc" BUILD=build/rock/luajit MODULE=build/rock/luajit/stella/core.so ;; \
	  *) echo "stella: supports Lua 5.4 and LuaJIT 2.1, and $(ROCK_LUA) is Lua $(ROCK_KIND)." >&2; \
	     echo "  Use luarocks --lua-version 5.4, or for LuaJIT tell LuaRocks its interpreter:" >&2; \
	     echo "  luarocks --lua-version 5.1 config lua_interpreter luajit" >&2; exit 1 ;; \
	esac

rock-install:
	@case "$(ROCK_KIND)" in 5.4|luajit) ;; *) echo "stella: run make rock first" >&2; exit 1 ;; esac
	install -d $(ROCK_LIBDIR)/stella $(ROCK_LUADIR)/stella
	install -m 755 build/rock/$(ROCK_KIND)/stella/core.so $(ROCK_LIBDIR)/stella/core.so
	if [ "$(ROCK_KIND)" = 5.4 ] && [ -f build/rock/luajit/stella/core.so ]; then \
	  install -D -m 755 build/rock/luajit/stella/core.so $(ROCK_LIBDIR)/stella/sandbox/luajit/stella/core.so; fi
	cd lua && find stella -type f -exec install -D -m 644 {} $(ROCK_LUADIR)/{} \;

clean:
	rm -rf build

# The demo (tools/demo): the examples sent through the local Requests API sandbox.
#   make demo        build (and, as root, install missing packages), start the sandbox in
#                    the background (build/demo/, pid file build/demo/sandbox.pid), run
#                    `stella trigger` over examples/ against it with its test key, print the
#                    summary and the status page address (http://127.0.0.1:8787/status)
#   make demo-stop   stop the sandbox
#   tools/demo --foreground   the same with the sandbox in the foreground: Ctrl-C stops it
.PHONY: demo demo-stop
demo:
	@tools/demo

demo-stop:
	@tools/demo stop
