/* fuzz_json.c - a mutation fuzzer for the JSON front end of the C core: random edits
 * (byte flips, inserted JSON punctuation, deletions, truncation) of a few seed documents
 * go through stella_parse_json, then stella_validate and stella_encode_json for the
 * ones that parse. Built with AddressSanitizer and UBSan by `make fuzz-mutate` (and a short
 * run by `make asan`), where any memory error or undefined behaviour aborts the run; it
 * checks the properties of spec/fuzz/check_json.c (the coverage-guided harnesses beside it,
 * `make fuzz`, check the same). Kept because it needs only gcc. Prints TAP.
 *
 *   build/asan/fuzz_json [ITERATIONS [SEED]]   (default 200000, 1) */
#define _POSIX_C_SOURCE 200112L   /* rand_r */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "check_json.h"   /* spec/fuzz/: the properties checked, shared with the libFuzzer harnesses */

static const char *const seeds[] = {
  "{\"customer\":{\"name\":\"Zo\\u00eb \\u00c5kesson\",\"email\":\"zoe@example.com\",\"custom_id\":\"c-1\"},"
  "\"employee\":{\"email\":\"agent@example.com\",\"custom_id\":\"a-7\"},\"channel\":\"phone\","
  "\"ext_interaction_id\":123456,\"external_url\":\"https://example.com/t/1\",\"tags\":[\"a\",\"b\"],"
  "\"custom_properties\":{\"order\":\"ORD-1\",\"seats\":12,\"ratio\":1.5e3,\"vip\":true},"
  "\"brand\":\"acme\",\"language\":\"en-US\",\"country\":\"us\",\"do_not_send\":false}",
  "{\"initial_feedback_request_id\":\"00000000-0000-4000-8000-000000000000\","
  "\"employee\":{\"email\":\"agent@example.com\"},\"ext_interaction_id\":\"x\\\"y\\\\z\\n\"}",
  "[1,-2,3.25e-7,[true,false,null],{\"a\":\"\\ud83d\\ude00\",\"b\":{\"c\":[[[{}]]]}},\"\\u0000\"]",
};
#define NSEEDS (sizeof seeds / sizeof seeds[0])
static const char punct[] = "{}[]\",:\\0123456789eE+-.tfnu ";

int main(int argc, char **argv) {
  long iters = argc > 1 ? atol(argv[1]) : 200000, it, parsed = 0, valid = 0;
  unsigned seed = argc > 2 ? (unsigned)atol(argv[2]) : 1u, seed0 = seed;
  static char buf[8192];
  stella_arena a;
  stella_buffer out;
  int failed = 0;
  stella_checker *checker = stella_checker_new();
  if (checker == NULL) {
    printf("not ok 1 - fuzz: no checker (out of memory)\n1..1\n");
    return 1;
  }
  stella_arena_init(&a);
  stella_buffer_init(&out);
  for (it = 0; it < iters && !failed; it++) {
    const char *s = seeds[it % NSEEDS];
    size_t len = strlen(s);
    int muts = 1 + rand_r(&seed) % 6, m, rc, ok;
    stella_value v;
    const char *why;
    stella_endpoint endpoint = (stella_endpoint)(rand_r(&seed) % 2);
    memcpy(buf, s, len);
    for (m = 0; m < muts; m++) {
      size_t pos = len ? (size_t)rand_r(&seed) % len : 0;
      switch (rand_r(&seed) % 4) {
        case 0: if (len) buf[pos] = (char)(rand_r(&seed) % 256); break;
        case 1:
          if (len + 1 < sizeof buf) {
            memmove(buf + pos + 1, buf + pos, len - pos);
            buf[pos] = punct[rand_r(&seed) % (sizeof punct - 1)];
            len++;
          }
          break;
        case 2: if (len > 1) { memmove(buf + pos, buf + pos + 1, len - pos - 1); len--; } break;
        default: len = pos; break;
      }
    }
    stella_arena_reset(&a);
    ok = 0;
    why = check_parse(&a, buf, len, &v, &rc);
    if (why == NULL && rc == 0) {
      parsed++;
      why = check_rewrite(&a, &v, &out);
      if (why == NULL) why = check_roundtrip(&a, endpoint, &v, &out, &ok);
      if (why == NULL && ok) valid++;
    }
    if (why == NULL) why = check_checker(checker, endpoint, buf, len, rc == 0 && ok);
    if (why) {
      printf("not ok 1 - %s (iteration %ld, seed %u)\n", why, it, seed0);
      failed = 1;
    }
  }
  if (!failed)
    printf("ok 1 - fuzz: %ld mutated documents (%ld parsed, %ld valid) through parse, validate, "
           "encode, and stella_check_json\n", iters, parsed, valid);
  printf("1..1\n");
  stella_arena_free(&a);
  stella_buffer_free(&out);
  stella_checker_free(checker);
  return failed;
}
