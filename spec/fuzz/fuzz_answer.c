/* fuzz_answer.c - libFuzzer harness: stella_answer_feed/stella_answer_eof (the plain-http
 * path's reader of an HTTP/1.x answer) on arbitrary bytes from a connection that then
 * ends. The bytes are fed as stella_http.c feeds them (what was not taken is passed
 * again with what comes next) in three ways: all at once, one byte at a time (the first
 * 512 bytes; then 7 at a time) and in runs of 1-64 bytes chosen from the input itself.
 * Checked:
 *   - the three come to the same thing: state, status, body, Content-Type, Retry-After,
 *     whether the connection may be kept, libcurl's code (how the bytes arrive does not
 *     matter: split reads);
 *   - a call never takes more than it was given, and takes everything up to the end of
 *     the answer once it is DONE;
 *   - DONE: a final status (200-999, not 1xx); a body within STELLA_MAX_ANSWER_BYTES,
 *     exactly Content-Length bytes when that framed it; ERROR: a code and a message. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "stella.h"
#include <curl/curl.h>
#include "stella_answer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct run {
  stella_answer a;
  stella_buffer body;
  stella_answer_state st;
} run;

static void fail(const char *why) {
  fprintf(stderr, "fuzz_answer: %s\n", why);
  abort();
}

/* Feeds data in pieces: piece(i) -> the size of the next one. */
static void feed(run *r, const uint8_t *data, size_t size, size_t (*piece)(const uint8_t *, size_t, size_t)) {
  stella_buffer pending;
  size_t off = 0;
  stella_buffer_init(&pending);
  stella_buffer_init(&r->body);
  stella_answer_init(&r->a, &r->body);
  r->st = STELLA_ANSWER_MORE;
  while (off < size && r->st == STELLA_ANSWER_MORE) {
    size_t n = piece(data, size, off), used = 0;
    if (n > size - off) n = size - off;
    stella_buffer_add(&pending, (const char *)data + off, n);
    if (pending.oom) fail("out of memory");
    off += n;
    r->st = stella_answer_feed(&r->a, pending.data, pending.len, &used);
    if (used > pending.len) fail("took more than it was given");
    memmove(pending.data, pending.data + used, pending.len - used);
    pending.len -= used;
  }
  if (r->st == STELLA_ANSWER_MORE) r->st = stella_answer_eof(&r->a);
  stella_buffer_free(&pending);
}

static size_t whole(const uint8_t *d, size_t size, size_t off) {
  (void)d; (void)off;
  return size;
}

static size_t bytewise(const uint8_t *d, size_t size, size_t off) {
  (void)d; (void)size;
  return off < 512 ? 1 : 7;
}

static size_t runs(const uint8_t *d, size_t size, size_t off) {
  (void)size;
  return 1 + (size_t)(d[(off * 31 + 7) % size] % 64);
}

static void same(const run *x, const run *y) {
  if (x->st != y->st) fail("the state depends on how the bytes arrive");
  if (x->st == STELLA_ANSWER_ERROR) {
    if (x->a.code != y->a.code) fail("the failure depends on how the bytes arrive");
    return;
  }
  if (x->a.status != y->a.status || x->a.close != y->a.close) fail("status or keep-alive differ");
  if (x->body.len != y->body.len || (x->body.len && memcmp(x->body.data, y->body.data, x->body.len) != 0))
    fail("the body depends on how the bytes arrive");
  if (strcmp(x->a.content_type, y->a.content_type) != 0 || strcmp(x->a.retry_after, y->a.retry_after) != 0)
    fail("the header values depend on how the bytes arrive");
}

static void check(const run *r) {
  if (r->body.len > (size_t)STELLA_MAX_ANSWER_BYTES) fail("a body over the cap");
  if (r->st == STELLA_ANSWER_ERROR) {
    if (r->a.code == 0 || r->a.error == NULL) fail("an error without a code or message");
    return;
  }
  if (r->st != STELLA_ANSWER_DONE) fail("neither done nor failed at the end of the connection");
  if (r->a.status < 200 || r->a.status > 999) fail("done without a final status");
  if (r->a.length >= 0 && !r->a.chunked && r->a.status != 204 && r->a.status != 304 &&
      (long long)r->body.len != r->a.length)
    fail("a body that is not Content-Length bytes long");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  run a, b, c;
  if (size == 0) {
    feed(&a, data, size, whole);
    if (a.st != STELLA_ANSWER_ERROR || a.a.code != CURLE_GOT_NOTHING) fail("nothing at all is not an empty reply");
    stella_buffer_free(&a.body);
    return 0;
  }
  feed(&a, data, size, whole);
  feed(&b, data, size, bytewise);
  feed(&c, data, size, runs);
  check(&a);
  same(&a, &b);
  same(&a, &c);
  stella_buffer_free(&a.body);
  stella_buffer_free(&b.body);
  stella_buffer_free(&c.body);
  return 0;
}
