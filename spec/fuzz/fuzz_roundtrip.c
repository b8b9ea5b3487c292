/* fuzz_roundtrip.c - libFuzzer harness: parse -> validate -> encode -> parse for
 * every endpoint. Whatever validates must encode, and its encoding must parse to
 * the same document (up to canonical form), validate again and encode to the same
 * bytes; every validation error must be complete, and stella_check_json must agree
 * (check_json.c). Any failure
 * aborts, so libFuzzer keeps the input. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include "check_json.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static const stella_endpoint endpoints[] = { STELLA_REQUEST, STELLA_RECOVERY };
  stella_arena a;
  stella_buffer scratch;
  stella_value doc;
  const char *why;
  size_t k;
  int rc, valid;
  stella_checker *checker = stella_checker_new();   /* NULL (out of memory): not checked */
  stella_arena_init(&a);
  stella_buffer_init(&scratch);
  why = check_parse(&a, (const char *)data, size, &doc, &rc);
  for (k = 0; why == NULL && k < sizeof endpoints / sizeof endpoints[0]; k++) {
    valid = 0;
    if (rc == 0) why = check_roundtrip(&a, endpoints[k], &doc, &scratch, &valid);
    if (why == NULL && checker != NULL)
      why = check_checker(checker, endpoints[k], (const char *)data, size, rc == 0 && valid);
  }
  if (why) {
    fprintf(stderr, "fuzz_roundtrip: %s\n", why);
    abort();
  }
  stella_buffer_free(&scratch);
  stella_arena_free(&a);
  stella_checker_free(checker);
  return 0;
}
