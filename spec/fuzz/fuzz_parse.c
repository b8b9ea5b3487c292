/* fuzz_parse.c - libFuzzer harness: arbitrary bytes through stella_parse_json.
 * Syntax errors must carry a message and a line:column that matches their offset;
 * documents must be well-formed trees that, written back as plain JSON, parse to
 * the same tree (check_json.c). Any failure aborts, so libFuzzer keeps the input. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include "check_json.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  stella_arena a;
  stella_buffer scratch;
  stella_value doc;
  const char *why;
  int rc;
  stella_arena_init(&a);
  stella_buffer_init(&scratch);
  why = check_parse(&a, (const char *)data, size, &doc, &rc);
  if (why == NULL && rc == 0) why = check_rewrite(&a, &doc, &scratch);
  if (why) {
    fprintf(stderr, "fuzz_parse: %s\n", why);
    abort();
  }
  stella_buffer_free(&scratch);
  stella_arena_free(&a);
  return 0;
}
