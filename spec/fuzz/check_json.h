/* check_json.h - the properties the JSON fuzzers check, shared by the libFuzzer
 * harnesses (spec/fuzz/fuzz_*.c) and the mutation loop (spec/c/fuzz_json.c).
 * Each check returns NULL when the property holds, else a sentence saying which
 * one failed. Harness code only: nothing here is part of the library. */
#ifndef CHECK_JSON_H
#define CHECK_JSON_H

#include "stella.h"

/* Parses `text`: a syntax error must have a message and a position inside the text
 * whose line and column agree with the offset; a document must be a well-formed value
 * tree (objects with string keys, arrays keyed 1..n, depth <= STELLA_JSON_MAX_DEPTH).
 * Sets *rc to stella_parse_json's result and fills *out. */
const char *check_parse(stella_arena *a, const char *text, size_t len, stella_value *out, int *rc);

/* Writes a parsed document back as plain JSON (every member, numbers exactly) and
 * parses that: the result must be the same tree. `scratch` is reused. */
const char *check_rewrite(stella_arena *a, const stella_value *doc, stella_buffer *scratch);

/* Validates `doc` as `endpoint` (sets *valid). Every error must have a path, a code and a
 * message. A valid document must encode; its encoding must
 * parse to the same document up to canonical form (members in schema order, numbers
 * as their decimal strings), validate again and encode to the same bytes.
 * `scratch` is reused. */
const char *check_roundtrip(stella_arena *a, stella_endpoint endpoint, const stella_value *doc,
                            stella_buffer *scratch, int *valid);

/* stella_check_json on the same text must answer as parse + validate did (`valid`: the
 * text parsed and validated as `endpoint`): 1 exactly then, else 0; a value it reports is
 * of a known type, a string a non-NULL pointer (into the text when it has no escape). */
const char *check_checker(stella_checker *c, stella_endpoint endpoint, const char *text, size_t len,
                          int valid);

#endif
