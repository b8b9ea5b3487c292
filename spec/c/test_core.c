/*
 * test_core.c - tests of lua-stella's C core through its public header only
 * (csrc/stella.h), with no Lua anywhere. Prints TAP: "ok N - ..." or
 * "not ok N - ..." (followed by "# ..." details) per check, then "1..N".
 * Exits 1 if any check failed.
 *
 *   make build/c/test_core && build/c/test_core
 *   make valgrind            (the same program under valgrind --leak-check=full)
 *
 * Everything allocated here is released before exit, so leak checkers stay quiet.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <locale.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "stella.h"

/* ---------- a minimal TAP harness ------------------------------------------ */

static int tests_run, tests_failed;

/* One TAP line; returns cond so callers can add details on failure. */
static int check(int cond, const char *desc) {
  tests_run++;
  if (!cond) tests_failed++;
  printf("%s %d - %s\n", cond ? "ok" : "not ok", tests_run, desc);
  return cond;
}

#define CHECK(cond, desc) check((cond) != 0, (desc))

/* "#   label: "text"", with non-printable bytes shown as \xNN (quotes and
 * backslashes as they are, so JSON stays readable). */
static void diag_bytes(const char *label, const char *s, size_t len) {
  size_t i;
  printf("#   %s: ", label);
  if (s == NULL) {
    printf("(null)\n");
    return;
  }
  putchar('"');
  for (i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c < 0x20 || c >= 0x7F) printf("\\x%02x", c);
    else putchar(c);
  }
  printf("\"\n");
}

static void diag(const char *label, const char *s) {
  diag_bytes(label, s, s ? strlen(s) : 0);
}

static void diag_long(const char *label, long v) {
  printf("#   %s: %ld\n", label, v);
}

static int check_long(long got, long want, const char *desc) {
  if (check(got == want, desc)) return 1;
  diag_long("got", got);
  diag_long("expected", want);
  return 0;
}

/* Both NULL, or both equal C strings. */
static int check_str(const char *got, const char *want, const char *desc) {
  int same = (got == NULL || want == NULL) ? got == want : strcmp(got, want) == 0;
  if (check(same, desc)) return 1;
  diag("got", got);
  diag("expected", want);
  return 0;
}

static int check_bytes(const char *got, size_t len, const char *want, const char *desc) {
  size_t wlen = strlen(want);
  if (check(got != NULL && len == wlen && memcmp(got, want, len) == 0, desc)) return 1;
  diag_bytes("got", got, len);
  diag_bytes("expected", want, wlen);
  return 0;
}

/* `text` must not contain `secret` (an API key, or a distinctive piece of one). */
static int check_no_secret(const char *text, const char *secret, const char *desc) {
  if (check(text == NULL || strstr(text, secret) == NULL, desc)) return 1;
  diag("text", text);
  return 0;
}

/* ---------- value-building helpers ------------------------------------------ */

static void member(stella_pair *p, const char *key, stella_value v) {
  p->key = stella_cstring(key);
  p->value = v;
}

static void item(stella_pair *p, long long index, stella_value v) {
  p->key = stella_int(index);
  p->value = v;
}

/* {"name": name, "email": email} (either may be NULL to leave it out). */
static stella_value make_customer(stella_arena *a, const char *name, const char *email) {
  stella_value v;
  size_t n = (name != NULL) + (email != NULL), i = 0;
  stella_pair *p = stella_table(a, &v, n);
  if (p == NULL) return stella_nil();
  if (name) member(&p[i++], "name", stella_cstring(name));
  if (email) member(&p[i++], "email", stella_cstring(email));
  return v;
}

/* {"email": email} or {} when email is NULL. */
static stella_value make_employee(stella_arena *a, const char *email) {
  stella_value v;
  stella_pair *p = stella_table(a, &v, email ? 1 : 0);
  if (p == NULL) return stella_nil();
  if (email) member(&p[0], "email", stella_cstring(email));
  return v;
}

/* The README's example request, plus `extra` caller-filled members at the end. */
static stella_pair *make_request(stella_arena *a, stella_value *req, size_t extra) {
  stella_pair *p = stella_table(a, req, 4 + extra);
  if (p == NULL) return NULL;
  member(&p[0], "customer", make_customer(a, "Jane", "janecustomer@example.com"));
  member(&p[1], "employee", make_employee(a, "paulagent@blancapeak.com"));
  member(&p[2], "channel", stella_cstring("phone"));
  member(&p[3], "ext_interaction_id", stella_cstring("123456"));
  return p + 4;
}

static const char EXAMPLE_JSON[] =
    "{\"customer\":{\"name\":\"Jane\",\"email\":\"janecustomer@example.com\"},"
    "\"employee\":{\"email\":\"paulagent@blancapeak.com\"},"
    "\"channel\":\"phone\",\"ext_interaction_id\":\"123456\"}";

/* Prints every error of a list as TAP details. */
static void diag_errors(const stella_violations *errs) {
  size_t i;
  diag_long("error count", (long)errs->count);
  for (i = 0; i < errs->count; i++) {
    diag("path", errs->items[i].path);
    diag("code", errs->items[i].code);
    diag("message", errs->items[i].message);
  }
}

typedef struct expected_error {
  const char *path, *code;
} expected_error;

/* Validation returned exactly `n` errors, these (path, code) pairs in this order. */
static int check_errors(int rc, const stella_violations *errs, const expected_error *want, size_t n,
                        const char *desc) {
  size_t i;
  int same = rc == (int)n && errs->count == n && !errs->oom;
  for (i = 0; same && i < n; i++)
    same = strcmp(errs->items[i].path, want[i].path) == 0 &&
           strcmp(errs->items[i].code, want[i].code) == 0 &&
           errs->items[i].message != NULL && errs->items[i].message[0] != '\0';
  if (check(same, desc)) return 1;
  diag_long("return value", rc);
  diag_errors(errs);
  for (i = 0; i < n; i++) {
    diag("expected path", want[i].path);
    diag("expected code", want[i].code);
  }
  return 0;
}

/* Validates `req` (expecting no errors) and encodes it; compares to `want`. */
static void check_encodes(stella_arena *a, stella_endpoint endpoint, const stella_value *req,
                          const char *want, const char *desc) {
  stella_violations errs;
  stella_buffer out;
  int rc = stella_validate(a, endpoint, req, NULL, &errs), enc;
  char what[200];
  snprintf(what, sizeof what, "%s: validates with 0 errors", desc);
  if (!check(rc == 0 && errs.count == 0, what)) diag_errors(&errs);
  stella_buffer_init(&out);
  enc = stella_encode_json(endpoint, req, &out);
  snprintf(what, sizeof what, "%s: encodes to the expected JSON", desc);
  if (!check_bytes(enc == 0 ? out.data : NULL, out.len, want, what)) diag_long("encode returned", enc);
  stella_buffer_free(&out);
}

/* ---------- arena ---------------------------------------------------------------- */

static void test_arena(void) {
  enum { N = 5000, SIZE = 37 };
  stella_arena a;
  unsigned char **ptrs = (unsigned char **)malloc(N * sizeof *ptrs);
  unsigned char *first_before = NULL;
  size_t i, bad = 0, misaligned = 0, moved = 0;
  unsigned char *big, *small_after;
  void *z1, *z2;

  if (!CHECK(ptrs != NULL, "arena: test scratch allocated")) return;
  stella_arena_init(&a);

  /* many allocations, spanning several blocks; each keeps its own bytes */
  for (i = 0; i < N; i++) {
    ptrs[i] = (unsigned char *)stella_arena_alloc(&a, SIZE);
    if (ptrs[i] == NULL) { bad++; continue; }
    if ((uintptr_t)ptrs[i] % sizeof(double) != 0 || (uintptr_t)ptrs[i] % sizeof(void *) != 0)
      misaligned++;
    memset(ptrs[i], (int)(i & 0xFF), SIZE);
  }
  CHECK(bad == 0, "arena: 5000 allocations of 37 bytes all succeed");
  CHECK(misaligned == 0, "arena: allocations are aligned for doubles and pointers");
  for (i = 0; i < N && bad == 0; i++) {
    size_t k;
    for (k = 0; k < SIZE; k++)
      if (ptrs[i][k] != (unsigned char)(i & 0xFF)) { bad++; break; }
  }
  CHECK(bad == 0, "arena: no allocation overlaps another (patterns intact)");

  /* reset, then the same sequence of allocations reuses the same memory */
  first_before = ptrs[0];
  {
    unsigned char **before = (unsigned char **)malloc(N * sizeof *before);
    if (before != NULL) {
      memcpy(before, ptrs, N * sizeof *before);
      stella_arena_reset(&a);
      for (i = 0; i < N; i++) {
        ptrs[i] = (unsigned char *)stella_arena_alloc(&a, SIZE);
        if (ptrs[i] == NULL) { bad++; continue; }
        if (ptrs[i] != before[i]) moved++;
        memset(ptrs[i], (int)((i + 1) & 0xFF), SIZE);
      }
      free(before);
    } else {
      bad++;
    }
  }
  CHECK(bad == 0, "arena: allocations after reset succeed");
  if (!CHECK(moved == 0 && ptrs[0] == first_before,
             "arena: after reset the same allocations reuse the kept memory"))
    diag_long("allocations at a different address", (long)moved);
  for (i = 0; i < N && bad == 0; i++)
    if (ptrs[i][0] != (unsigned char)((i + 1) & 0xFF) ||
        ptrs[i][SIZE - 1] != (unsigned char)((i + 1) & 0xFF))
      bad++;
  CHECK(bad == 0, "arena: memory reused after reset holds the new contents");

  /* a single allocation far larger than a block, between small ones */
  big = (unsigned char *)stella_arena_alloc(&a, (size_t)3 << 20);
  small_after = (unsigned char *)stella_arena_alloc(&a, 10);
  CHECK(big != NULL && small_after != NULL, "arena: a 3 MiB allocation succeeds");
  if (big != NULL && small_after != NULL) {
    memset(big, 0xAB, (size_t)3 << 20);
    memset(small_after, 0xCD, 10);
  }
  CHECK(big != NULL && small_after != NULL && big[0] == 0xAB &&
            big[((size_t)3 << 20) - 1] == 0xAB && small_after[0] == 0xCD,
        "arena: the large allocation is writable end to end and separate from the next one");

  /* zero-byte allocations are distinct, usable pointers */
  z1 = stella_arena_alloc(&a, 0);
  z2 = stella_arena_alloc(&a, 0);
  CHECK(z1 != NULL && z2 != NULL && z1 != z2, "arena: zero-byte allocations give distinct pointers");

  /* free is idempotent, and a freed arena can be used again */
  stella_arena_free(&a);
  CHECK(a.head == NULL && a.spare == NULL, "arena: free releases every block");
  stella_arena_free(&a);
  CHECK(a.head == NULL && a.spare == NULL, "arena: a second free is harmless");
  {
    char *p = (char *)stella_arena_alloc(&a, 100);
    if (p) memcpy(p, "again", 6);
    CHECK(p != NULL && strcmp(p, "again") == 0, "arena: usable again after free");
  }
  stella_arena_free(&a);

  /* a fresh arena freed without ever allocating, and reset of an empty arena */
  stella_arena_init(&a);
  stella_arena_reset(&a);
  stella_arena_free(&a);
  CHECK(a.head == NULL && a.spare == NULL, "arena: reset and free of an unused arena");
  free(ptrs);
}

/* ---------- buffer and builders ---------------------------------------------------- */

static void test_buffer_and_builders(void) {
  stella_buffer b;
  stella_value v, t;
  stella_pair *p;
  stella_arena a;
  size_t i;
  int good = 1;

  stella_buffer_init(&b);
  for (i = 0; i < 1000; i++) stella_buffer_add(&b, "0123456789", 10);
  for (i = 0; good && i < 10000; i++) good = b.data[i] == (char)('0' + i % 10);
  CHECK(!b.oom && b.len == 10000 && good && b.data[10000] == '\0',
        "buffer: 10000 appended bytes, in order and NUL-terminated");
  stella_buffer_free(&b);
  stella_buffer_free(&b);
  CHECK(b.data == NULL && b.len == 0, "buffer: free is idempotent");

  v = stella_int(-42);
  CHECK(v.type == STELLA_NUMBER && v.u.number.is_int && v.u.number.i == -42,
        "builders: stella_int");
  v = stella_double(42.0);
  CHECK(v.type == STELLA_NUMBER && v.u.number.is_int && v.u.number.i == 42,
        "builders: an integral double counts as an integer");
  v = stella_double(1.5);
  CHECK(v.type == STELLA_NUMBER && !v.u.number.is_int && v.u.number.num == 1.5,
        "builders: 1.5 is not an integer");
  v = stella_double(1e300);
  CHECK(v.type == STELLA_NUMBER && !v.u.number.is_int, "builders: 1e300 is beyond 2^53, not an integer");
  v = stella_bool(7);
  CHECK(v.type == STELLA_BOOL && v.u.boolean == 1, "builders: stella_bool normalises to 1");
  v = stella_nil();
  CHECK(v.type == STELLA_NIL, "builders: stella_nil");
  v = stella_string("ab\0cd", 5);
  CHECK(v.type == STELLA_STRING && v.u.string.len == 5, "builders: stella_string keeps its length");

  stella_arena_init(&a);
  p = stella_table(&a, &t, 0);
  CHECK(p != NULL && t.type == STELLA_TABLE && t.u.table.count == 0,
        "builders: an empty table succeeds");
  p = stella_table(&a, &t, 2);
  if (CHECK(p != NULL && t.type == STELLA_TABLE && t.u.table.count == 2 && t.u.table.pairs == p,
            "builders: a table of two pairs")) {
    member(&p[0], "a", stella_int(1));
    member(&p[1], "b", stella_cstring("x"));
    CHECK(stella_get(&t, "b") == &p[1].value, "stella_get: finds a key");
    CHECK(stella_get(&t, "c") == NULL, "stella_get: NULL for an absent key");
    CHECK(stella_get(&t, "") == NULL, "stella_get: NULL for the empty key");
  }
  v = stella_cstring("b");
  CHECK(stella_get(&v, "b") == NULL, "stella_get: NULL on a non-table");
  CHECK(stella_get(NULL, "b") == NULL, "stella_get: NULL on NULL");
  stella_arena_free(&a);
}

/* ---------- building and encoding a request ----------------------------------------- */

static void test_encode_by_hand(void) {
  stella_arena a;
  stella_value req, customer, employee, tags;
  stella_pair *p, *extra;
  stella_arena_init(&a);

  /* built field by field with the builders, in schema order */
  p = stella_table(&a, &customer, 2);
  member(&p[0], "name", stella_cstring("Jane"));
  member(&p[1], "email", stella_cstring("janecustomer@example.com"));
  p = stella_table(&a, &employee, 1);
  member(&p[0], "email", stella_cstring("paulagent@blancapeak.com"));
  p = stella_table(&a, &req, 4);
  member(&p[0], "customer", customer);
  member(&p[1], "employee", employee);
  member(&p[2], "channel", stella_cstring("phone"));
  member(&p[3], "ext_interaction_id", stella_cstring("123456"));
  check_encodes(&a, STELLA_REQUEST, &req, EXAMPLE_JSON, "the README request built by hand");

  /* the same request with members in reverse order and an integer id: same bytes */
  p = stella_table(&a, &customer, 2);
  member(&p[0], "email", stella_cstring("janecustomer@example.com"));
  member(&p[1], "name", stella_cstring("Jane"));
  p = stella_table(&a, &req, 4);
  member(&p[0], "ext_interaction_id", stella_int(123456));
  member(&p[1], "channel", stella_cstring("phone"));
  member(&p[2], "employee", employee);
  member(&p[3], "customer", customer);
  check_encodes(&a, STELLA_REQUEST, &req, EXAMPLE_JSON,
                "members out of schema order, integer id");

  /* an id given as an integral double */
  make_request(&a, &req, 0);
  req.u.table.pairs[3].value = stella_double(123456.0);   /* ext_interaction_id */
  check_encodes(&a, STELLA_REQUEST, &req, EXAMPLE_JSON, "an integral double id");

  /* tags built out of order (3, 1, 2) come out as 1, 2, 3 */
  extra = make_request(&a, &req, 1);
  p = stella_table(&a, &tags, 3);
  item(&p[0], 3, stella_cstring("gamma"));
  item(&p[1], 1, stella_cstring("alpha"));
  item(&p[2], 2, stella_cstring("beta"));
  member(&extra[0], "tags", tags);
  check_encodes(&a, STELLA_REQUEST, &req,
                "{\"customer\":{\"name\":\"Jane\",\"email\":\"janecustomer@example.com\"},"
                "\"employee\":{\"email\":\"paulagent@blancapeak.com\"},"
                "\"channel\":\"phone\",\"ext_interaction_id\":\"123456\","
                "\"tags\":[\"alpha\",\"beta\",\"gamma\"]}",
                "tags with keys 3,1,2");

  /* an empty tags table is [] */
  extra = make_request(&a, &req, 1);
  stella_table(&a, &tags, 0);
  member(&extra[0], "tags", tags);
  check_encodes(&a, STELLA_REQUEST, &req,
                "{\"customer\":{\"name\":\"Jane\",\"email\":\"janecustomer@example.com\"},"
                "\"employee\":{\"email\":\"paulagent@blancapeak.com\"},"
                "\"channel\":\"phone\",\"ext_interaction_id\":\"123456\",\"tags\":[]}",
                "empty tags");

  /* custom_properties are sorted by bytes; numbers become strings; booleans stay */
  extra = make_request(&a, &req, 2);
  member(&extra[0], "do_not_send", stella_bool(1));
  p = stella_table(&a, &extra[1].value, 3);
  extra[1].key = stella_cstring("custom_properties");
  member(&p[0], "zeta", stella_double(0.25));
  member(&p[1], "Alpha", stella_int(42));
  member(&p[2], "mid", stella_cstring(""));
  check_encodes(&a, STELLA_REQUEST, &req,
                "{\"customer\":{\"name\":\"Jane\",\"email\":\"janecustomer@example.com\"},"
                "\"employee\":{\"email\":\"paulagent@blancapeak.com\"},"
                "\"channel\":\"phone\",\"ext_interaction_id\":\"123456\",\"do_not_send\":true,"
                "\"custom_properties\":{\"Alpha\":\"42\",\"mid\":\"\",\"zeta\":\"0.25\"}}",
                "custom_properties sorted, numbers as strings");

  /* a recovery */
  p = stella_table(&a, &employee, 1);
  member(&p[0], "custom_id", stella_cstring("agent-7"));
  p = stella_table(&a, &req, 2);
  member(&p[0], "initial_feedback_request_id", stella_int(42));
  member(&p[1], "employee", employee);
  check_encodes(&a, STELLA_RECOVERY, &req,
                "{\"employee\":{\"custom_id\":\"agent-7\"},\"initial_feedback_request_id\":\"42\"}",
                "a recovery");

  stella_arena_free(&a);
}

static void test_json_escaping(void) {
  static const char name[] = "a\x01" "b\n\t\r\b\f\"\\\x1f\x7f" "caf\xc3\xa9 \xe2\x82\xac";
  static const char valid_name[] = "a\n\t\r\"\\\x7f" "caf\xc3\xa9 \xe2\x82\xac";
  static const char tail[] = "\"email\":\"janecustomer@example.com\"},"
                             "\"employee\":{\"email\":\"paulagent@blancapeak.com\"},"
                             "\"channel\":\"phone\",\"ext_interaction_id\":\"123456\"}";
  char want[300];
  stella_arena a;
  stella_value req;
  stella_buffer out;
  int enc;
  stella_arena_init(&a);
  make_request(&a, &req, 0);
  /* customer.name is the first pair of the customer table */
  req.u.table.pairs[0].value.u.table.pairs[0].value = stella_string(valid_name, sizeof valid_name - 1);
  snprintf(want, sizeof want, "{\"customer\":{\"name\":\"a\\n\\t\\r\\\"\\\\\x7f"
           "caf\xc3\xa9 \xe2\x82\xac\",%s", tail);
  check_encodes(&a, STELLA_REQUEST, &req, want,
                "tab, CR, LF, quote and backslash escaped; DEL and UTF-8 pass through");
  /* the other control characters fail validation; the encoder still escapes them all,
   * for a C caller that encodes without validating */
  req.u.table.pairs[0].value.u.table.pairs[0].value = stella_string(name, sizeof name - 1);
  snprintf(want, sizeof want, "{\"customer\":{\"name\":\"a\\u0001b\\n\\t\\r\\b\\f\\\"\\\\\\u001f\x7f"
           "caf\xc3\xa9 \xe2\x82\xac\",%s", tail);
  stella_buffer_init(&out);
  enc = stella_encode_json(STELLA_REQUEST, &req, &out);
  if (!check_bytes(enc == 0 ? out.data : NULL, out.len, want,
                   "the encoder escapes every control character (\\u0001, \\b, \\f, \\u001f)"))
    diag_long("encode returned", enc);
  stella_buffer_free(&out);
  stella_arena_free(&a);
}

/* ---------- validation errors ---------------------------------------------------------- */

static const char *message_of(const stella_violations *errs, const char *path) {
  size_t i;
  for (i = 0; i < errs->count; i++)
    if (strcmp(errs->items[i].path, path) == 0) return errs->items[i].message;
  return NULL;
}

static void test_validation_errors(void) {
  stella_arena a;
  stella_violations errs;
  stella_value req, v;
  stella_pair *p, *extra;
  const char *msg;
  int rc;
  stella_arena_init(&a);

  /* an empty request: every required field, in schema order */
  stella_table(&a, &req, 0);
  rc = stella_validate(&a, STELLA_REQUEST, &req, NULL, &errs);
  {
    static const expected_error want[] = {
      { "customer", "required" }, { "employee", "required" },
      { "channel", "required" }, { "ext_interaction_id", "required" },
    };
    check_errors(rc, &errs, want, 4, "validate: an empty request lists the 4 required fields");
  }
  check_str(message_of(&errs, "customer"), "customer is required",
            "validate: message of a missing field");

  /* empty nested objects: their required fields and employee's one-of */
  p = stella_table(&a, &req, 4);
  member(&p[0], "customer", make_customer(&a, NULL, NULL));
  member(&p[1], "employee", make_employee(&a, NULL));
  member(&p[2], "channel", stella_cstring("phone"));
  member(&p[3], "ext_interaction_id", stella_int(7));
  rc = stella_validate(&a, STELLA_REQUEST, &req, NULL, &errs);
  {
    static const expected_error want[] = {
      { "customer.name", "required" }, { "customer.email", "required" },
      { "employee", "one_of_required" },
    };
    check_errors(rc, &errs, want, 3, "validate: nested required fields and employee one_of");
  }

  /* wrong types and values, each at its own path */
  p = stella_table(&a, &req, 5);
  member(&p[0], "customer", make_customer(&a, "", "not-an-email"));
  member(&p[1], "employee", stella_cstring("paul"));
  member(&p[2], "channel", stella_cstring("phone"));
  member(&p[3], "ext_interaction_id", stella_double(1.5));
  member(&p[4], "do_not_send", stella_int(1));
  rc = stella_validate(&a, STELLA_REQUEST, &req, NULL, &errs);
  {
    static const expected_error want[] = {
      { "customer.name", "empty" }, { "customer.email", "invalid_email" },
      { "employee", "invalid_type" }, { "ext_interaction_id", "invalid_type" },
      { "do_not_send", "invalid_type" },
    };
    check_errors(rc, &errs, want, 5, "validate: empty, invalid_email and invalid_type errors");
  }

  /* unknown fields: nested one first, then the root's sorted by name; typos get a hint */
  extra = make_request(&a, &req, 2);
  member(&extra[0], "zzzzzzzzzz", stella_int(1));
  member(&extra[1], "chanel", stella_cstring("chat"));
  p = req.u.table.pairs[0].value.u.table.pairs;   /* customer: rename "email" */
  p[1].key = stella_cstring("emial");
  rc = stella_validate(&a, STELLA_REQUEST, &req, NULL, &errs);
  {
    static const expected_error want[] = {
      { "customer.email", "required" }, { "customer.emial", "unknown_field" },
      { "chanel", "unknown_field" }, { "zzzzzzzzzz", "unknown_field" },
    };
    check_errors(rc, &errs, want, 4, "validate: unknown fields at both levels, in order");
  }
  msg = message_of(&errs, "chanel");
  if (!CHECK(msg && strstr(msg, "did you mean channel?"), "validate: \"chanel\" suggests channel"))
    diag("message", msg);
  msg = message_of(&errs, "customer.emial");
  if (!CHECK(msg && strstr(msg, "did you mean email?"), "validate: \"emial\" suggests email"))
    diag("message", msg);
  msg = message_of(&errs, "zzzzzzzzzz");
  if (!CHECK(msg && !strstr(msg, "did you mean"), "validate: no suggestion for a distant name"))
    diag("message", msg);

  /* the channel allow-list */
  {
    static const char *const allowed[] = { "phone", "chat" };
    stella_options opts;
    opts.channels = allowed;
    opts.channel_count = 2;
    make_request(&a, &req, 0);
    rc = stella_validate(&a, STELLA_REQUEST, &req, &opts, &errs);
    check_errors(rc, &errs, NULL, 0, "validate: channel \"phone\" is in the allowed list");
    req.u.table.pairs[2].value = stella_cstring("email");
    rc = stella_validate(&a, STELLA_REQUEST, &req, &opts, &errs);
    {
      static const expected_error want[] = { { "channel", "unknown_channel" } };
      check_errors(rc, &errs, want, 1, "validate: channel \"email\" is not in the allowed list");
    }
    msg = message_of(&errs, "channel");
    if (!CHECK(msg && strstr(msg, "\"email\""), "validate: unknown_channel names the channel"))
      diag("message", msg);
    rc = stella_validate(&a, STELLA_REQUEST, &req, NULL, &errs);
    check_errors(rc, &errs, NULL, 0, "validate: without options any channel passes");
    opts.channels = NULL;
    rc = stella_validate(&a, STELLA_REQUEST, &req, &opts, &errs);
    check_errors(rc, &errs, NULL, 0, "validate: options with channels = NULL allow any channel");
  }

  /* tags with a hole are not a sequence */
  extra = make_request(&a, &req, 1);
  p = stella_table(&a, &v, 2);
  item(&p[0], 1, stella_cstring("a"));
  item(&p[1], 3, stella_cstring("c"));
  member(&extra[0], "tags", v);
  rc = stella_validate(&a, STELLA_REQUEST, &req, NULL, &errs);
  {
    static const expected_error want[] = { { "tags", "not_a_sequence" } };
    check_errors(rc, &errs, want, 1, "validate: tags {1, 3} is not a sequence");
  }

  /* a bad tag is reported with its 1-based index */
  p[1].key = stella_int(2);
  p[1].value = stella_cstring("");
  rc = stella_validate(&a, STELLA_REQUEST, &req, NULL, &errs);
  {
    static const expected_error want[] = { { "tags[2]", "empty" } };
    check_errors(rc, &errs, want, 1, "validate: an empty tag is reported as tags[2]");
  }

  /* recovery: neither id -> one_of_required at ext_interaction_id */
  {
    stella_value employee;
    p = stella_table(&a, &employee, 1);
    member(&p[0], "custom_id", stella_cstring("agent-7"));
    p = stella_table(&a, &req, 1);
    member(&p[0], "employee", employee);
    rc = stella_validate(&a, STELLA_RECOVERY, &req, NULL, &errs);
    {
      static const expected_error want[] = { { "ext_interaction_id", "one_of_required" } };
      check_errors(rc, &errs, want, 1, "validate: a recovery without either id");
    }
    p = stella_table(&a, &req, 2);
    member(&p[0], "employee", make_employee(&a, NULL));
    member(&p[1], "ext_interaction_id", stella_cstring("abc"));
    rc = stella_validate(&a, STELLA_RECOVERY, &req, NULL, &errs);
    {
      static const expected_error want[] = { { "employee", "one_of_required" } };
      check_errors(rc, &errs, want, 1, "validate: a recovery with an id but an empty employee");
    }
    p = stella_table(&a, &req, 2);
    member(&p[0], "employee", employee);
    member(&p[1], "channel", stella_cstring("phone"));
    rc = stella_validate(&a, STELLA_RECOVERY, &req, NULL, &errs);
    {
      static const expected_error want[] = {
        { "ext_interaction_id", "one_of_required" }, { "channel", "unknown_field" },
      };
      check_errors(rc, &errs, want, 2, "validate: channel is not a recovery field");
    }
  }

  /* a root that is not a table: one invalid_type error */
  v = stella_cstring("customer");
  rc = stella_validate(&a, STELLA_REQUEST, &v, NULL, &errs);
  {
    static const expected_error want[] = { { "", "invalid_type" } };
    check_errors(rc, &errs, want, 1, "validate: a string root is one invalid_type error");
  }
  msg = errs.count ? errs.items[0].message : NULL;
  if (!CHECK(msg && strstr(msg, "request") && strstr(msg, "table"),
             "validate: the message says a request must be a table"))
    diag("message", msg);
  v = stella_int(5);
  rc = stella_validate(&a, STELLA_RECOVERY, &v, NULL, &errs);
  {
    static const expected_error want[] = { { "", "invalid_type" } };
    check_errors(rc, &errs, want, 1, "validate: a number as a recovery is one invalid_type error");
  }
  v = stella_nil();
  rc = stella_validate(&a, STELLA_REQUEST, &v, NULL, &errs);
  {
    static const expected_error want[] = { { "", "invalid_type" } };
    check_errors(rc, &errs, want, 1, "validate: nil as a request is one invalid_type error");
  }

  /* control characters: NUL (past the first 8 bytes: the word-at-a-time scan) and other
   * C0 controls are refused in names and text; tab, line feed and carriage return pass */
  {
    static const char name[] = "Jane Doe-Smith\0x";
    p = stella_table(&a, &req, 4);
    member(&p[0], "customer", make_customer(&a, "Jane", "jane@example.com"));
    p[0].value.u.table.pairs[0].value = stella_string(name, sizeof name - 1);
    member(&p[1], "employee", make_employee(&a, "paul@example.com"));
    member(&p[2], "channel", stella_cstring("phone"));
    member(&p[3], "ext_interaction_id", stella_string("12\x07", 3));
    rc = stella_validate(&a, STELLA_REQUEST, &req, NULL, &errs);
    {
      static const expected_error want[] = { { "customer.name", "control_character" },
                                             { "ext_interaction_id", "control_character" } };
      check_errors(rc, &errs, want, 2, "validate: NUL and BEL in text -> control_character at their fields");
    }
    check_str(message_of(&errs, "customer.name"), "customer.name contains a NUL character (U+0000) at byte 15",
              "validate: the message names the field, NUL and where it is");
    check_str(message_of(&errs, "ext_interaction_id"),
              "ext_interaction_id contains the control character U+0007 at byte 3 (of the C0 controls "
              "only tab, line feed and carriage return are allowed)",
              "validate: the message names another control character");
    p[0].value.u.table.pairs[0].value = stella_cstring("Jane\tDoe\r\nSmith, a name of 24 bytes");
    p[3].value = stella_cstring("12");
    rc = stella_validate(&a, STELLA_REQUEST, &req, NULL, &errs);
    check_errors(rc, &errs, NULL, 0, "validate: tab, CR and LF in a name pass");
  }

  stella_arena_free(&a);
}

/* ---------- text checks ---------------------------------------------------------------- */

typedef struct text_case {
  const char *s;
  size_t len;      /* 0: strlen(s) */
  int want;
} text_case;

#define TEXT_LEN(c) ((c).len ? (c).len : strlen((c).s))

/* `s` as a C string literal (non-printable bytes as \xNN), for descriptions. */
static const char *render(char *buf, size_t size, const char *s, size_t len) {
  size_t i, n = 0;
  buf[n++] = '"';
  for (i = 0; i < len && n + 6 < size; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c < 0x20 || c >= 0x7F || c == '"' || c == '\\' || c == '#') n += (size_t)sprintf(buf + n, "\\x%02x", c);
    else buf[n++] = (char)c;
  }
  if (i < len) buf[n++] = '~';   /* cut short */
  buf[n++] = '"';
  buf[n] = '\0';
  return buf;
}

static void check_text_cases(int (*fn)(const char *, size_t), const char *name,
                             const text_case *cases, size_t n) {
  size_t i;
  for (i = 0; i < n; i++) {
    char desc[200], shown[100];
    size_t len = TEXT_LEN(cases[i]);
    int got = fn(cases[i].s, len);
    snprintf(desc, sizeof desc, "%s(%s, %lu) is %s", name,
             render(shown, sizeof shown, cases[i].s, len), (unsigned long)len,
             cases[i].want ? "true" : "false");
    if (!check((got != 0) == (cases[i].want != 0), desc)) diag_long("returned", got);
  }
}

static void test_utf8(void) {
  static const text_case cases[] = {
    { "", 0, 1 },
    { "plain ascii", 0, 1 },
    { "a\0b", 3, 1 },                         /* NUL is a valid character */
    { "caf\xc3\xa9", 0, 1 },                  /* U+00E9 */
    { "\xe2\x82\xac", 0, 1 },                 /* U+20AC */
    { "\xf0\x9f\x98\x80", 0, 1 },             /* U+1F600 */
    { "\xed\x9f\xbf", 0, 1 },                 /* U+D7FF, just below the surrogates */
    { "\xef\xbf\xbf", 0, 1 },                 /* U+FFFF */
    { "\xf4\x8f\xbf\xbf", 0, 1 },             /* U+10FFFF, the last code point */
    { "\x80", 0, 0 },                         /* lone continuation byte */
    { "\xc0\x80", 0, 0 },                     /* overlong NUL */
    { "\xc1\xbf", 0, 0 },                     /* overlong */
    { "\xe0\x80\xaf", 0, 0 },                 /* overlong '/' */
    { "\xf0\x80\x80\xaf", 0, 0 },             /* overlong '/' */
    { "\xed\xa0\x80", 0, 0 },                 /* U+D800, a surrogate */
    { "\xed\xbf\xbf", 0, 0 },                 /* U+DFFF, a surrogate */
    { "\xf4\x90\x80\x80", 0, 0 },             /* U+110000 */
    { "\xf5\x80\x80\x80", 0, 0 },
    { "\xff", 0, 0 },
    { "\xe2\x82", 0, 0 },                     /* truncated */
    { "\xc3", 0, 0 },                         /* truncated */
    { "\xf0\x9f\x98", 0, 0 },                 /* truncated */
    { "\xc3\x28", 0, 0 },                     /* bad continuation */
  };
  check_text_cases(stella_utf8_valid, "stella_utf8_valid", cases, sizeof cases / sizeof cases[0]);

  /* a valid sequence cut short by its length argument */
  CHECK(!stella_utf8_valid("\xe2\x82\xac", 2), "utf8_valid: honours len (cut inside a character)");

  check_long((long)stella_utf8_length("", 0), 0, "utf8_length: empty string");
  check_long((long)stella_utf8_length("abc", 3), 3, "utf8_length: ASCII");
  check_long((long)stella_utf8_length("a\0b", 3), 3, "utf8_length: NUL counts");
  check_long((long)stella_utf8_length("a\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 10), 4,
             "utf8_length: 1-, 2-, 3- and 4-byte characters");
}

static void test_email(void) {
  static char long_label[80], too_long_label[80];
  text_case cases[] = {
    { "a@b", 0, 1 },
    { "janecustomer@example.com", 0, 1 },
    { "first.last+tag@sub.example.co.uk", 0, 1 },
    { "!#$%&'*+/=?^_`{|}~-@example.com", 0, 1 },
    { ".dots.@example.com", 0, 1 },           /* WHATWG allows dots anywhere locally */
    { "a@b-c.d", 0, 1 },
    { "a@123", 0, 1 },
    { NULL, 0, 1 },                           /* a 63-character label */
    { NULL, 0, 0 },                           /* a 64-character label */
    { "", 0, 0 },
    { "a", 0, 0 },
    { "@example.com", 0, 0 },
    { "a@", 0, 0 },
    { "a@b@c", 0, 0 },
    { "a b@c", 0, 0 },
    { "a@b c", 0, 0 },
    { "a@-b.com", 0, 0 },
    { "a@b-.com", 0, 0 },
    { "a@b..com", 0, 0 },
    { "a@.b", 0, 0 },
    { "a@b.", 0, 0 },
    { "a@b_c.com", 0, 0 },
    { "\"quoted\"@example.com", 0, 0 },
    { "caf\xc3\xa9@example.com", 0, 0 },
    { "a@caf\xc3\xa9.com", 0, 0 },
    { "a\0@b", 4, 0 },
    { "a@b\0", 4, 0 },
  };
  memcpy(long_label, "a@", 2);
  memset(long_label + 2, 'x', 63);
  memcpy(long_label + 65, ".com", 5);
  memcpy(too_long_label, "a@", 2);
  memset(too_long_label + 2, 'x', 64);
  memcpy(too_long_label + 66, ".com", 5);
  cases[7].s = long_label;
  cases[8].s = too_long_label;
  check_text_cases(stella_email_valid, "stella_email_valid", cases, sizeof cases / sizeof cases[0]);
  CHECK(stella_email_valid("a@b.com-trailing", 7), "email_valid: honours len");
}

static void test_codes(void) {
  static const text_case languages[] = {
    { "en", 0, 1 }, { "EN", 0, 1 }, { "zu", 0, 1 }, { "aa", 0, 1 },
    { "en-US", 0, 1 }, { "en-us", 0, 1 }, { "pt-BR", 0, 1 }, { "es-419", 0, 1 }, { "en-001", 0, 1 },
    { "", 0, 0 }, { "e", 0, 0 }, { "xx", 0, 0 }, { "eng", 0, 0 }, { "en-", 0, 0 },
    { "en_US", 0, 0 }, { "en-XK", 0, 0 }, { "en-UK", 0, 0 }, { "en-999", 0, 0 },
    { "en-USA", 0, 0 }, { "en-US-x", 0, 0 }, { "en-U1", 0, 0 }, { "e1", 0, 0 },
  };
  static const text_case countries[] = {
    { "US", 0, 1 }, { "us", 0, 1 }, { "gB", 0, 1 }, { "AD", 0, 1 }, { "ZW", 0, 1 },
    { "", 0, 0 }, { "U", 0, 0 }, { "USA", 0, 0 }, { "XK", 0, 0 }, { "UK", 0, 0 },
    { "EU", 0, 0 }, { "ZZ", 0, 0 }, { "1A", 0, 0 }, { "U\0", 2, 0 },
  };
  check_text_cases(stella_language_valid, "stella_language_valid", languages,
                   sizeof languages / sizeof languages[0]);
  check_text_cases(stella_is_country_code, "stella_is_country_code", countries,
                   sizeof countries / sizeof countries[0]);
  CHECK(stella_is_language_code("fr", 2) && !stella_is_language_code("fr-FR", 5),
        "is_language_code: two letters only");
  CHECK(stella_is_m49_area_code("419", 3) && !stella_is_m49_area_code("840", 3) &&
            !stella_is_m49_area_code("41", 2),
        "is_m49_area_code: areas only, not countries");
  CHECK(!stella_is_country_code(NULL, 0) && !stella_is_language_code(NULL, 0),
        "code lookups: NULL is not a code");
}

/* ---------- outcomes and retry policy ---------------------------------------------- */

/* The outcome `o` has this name, kind and retryability. */
static void check_outcome(stella_outcome o, const char *want_name, const char *want_kind,
                          int want_retry, const char *desc) {
  const stella_outcome_info *i = stella_outcome_info_of(o);
  int same = i != NULL && strcmp(i->name, want_name) == 0 &&
             ((i->kind == NULL || want_kind == NULL) ? i->kind == want_kind
                                                     : strcmp(i->kind, want_kind) == 0) &&
             i->retryable == want_retry;
  if (!check(same, desc)) {
    diag("name", i ? i->name : NULL);
    diag("kind", i ? i->kind : NULL);
    diag_long("retryable", i ? i->retryable : -1);
    diag("expected name", want_name);
    diag("expected kind", want_kind);
    diag_long("expected retryable", want_retry);
  }
}

static void test_outcomes(void) {
  int o, answered = 0;
  check_outcome(stella_outcome_of_status(200), "ok", NULL, 0, "outcome: 200 is not an error");
  check_outcome(stella_outcome_of_status(201), "ok", NULL, 0, "outcome: 201 is not an error");
  check_outcome(stella_outcome_of_status(400), "rejected", "rejected", 0, "outcome: 400 rejected, final");
  check_outcome(stella_outcome_of_status(401), "auth", "auth", 0, "outcome: 401 auth, final");
  check_outcome(stella_outcome_of_status(403), "auth", "auth", 0, "outcome: 403 auth, final");
  check_outcome(stella_outcome_of_status(404), "not_found", "not_found", 0, "outcome: 404 not_found, final");
  check_outcome(stella_outcome_of_status(408), "request_timeout", "timeout", 1,
                "outcome: 408 is a timeout, retryable");
  check_outcome(stella_outcome_of_status(422), "rejected", "rejected", 0, "outcome: 422 rejected, final");
  check_outcome(stella_outcome_of_status(429), "rate_limited", "rate_limited", 1,
                "outcome: 429 rate_limited, retryable");
  check_outcome(stella_outcome_of_status(500), "server", "server", 1, "outcome: 500 server, retryable");
  check_outcome(stella_outcome_of_status(503), "server", "server", 1, "outcome: 503 server, retryable");
  check_outcome(stella_outcome_of_status(302), "unexpected", "protocol", 0, "outcome: 302 is a protocol error, final");
  check_outcome(stella_outcome_of_status(101), "unexpected", "protocol", 0, "outcome: 101 too");
  check_outcome(stella_outcome_of_curl(0 /* CURLE_OK */, 503), "server", "server", 1,
                "outcome: a finished transfer is classified by its status");
  check_outcome(stella_outcome_of_curl(28 /* CURLE_OPERATION_TIMEDOUT */, 0), "timeout", "timeout", 1,
                "outcome: a transfer that timed out, retryable");
  check_outcome(stella_outcome_of_curl(7 /* CURLE_COULDNT_CONNECT */, 0), "network", "network", 1,
                "outcome: a refused connection is network, retryable");
  check_outcome(stella_outcome_of_curl(52 /* CURLE_GOT_NOTHING */, 0), "network", "network", 1,
                "outcome: an empty reply is network, retryable");
  check_outcome(stella_outcome_of_curl(8 /* CURLE_WEIRD_SERVER_REPLY */, 0), "protocol", "protocol", 0,
                "outcome: an answer that is not HTTP is protocol, final");
  check_outcome(stella_outcome_of_curl(60 /* CURLE_PEER_FAILED_VERIFICATION */, 0), "tls", "network", 0,
                "outcome: a certificate that does not verify is network, final");
  check_outcome(stella_outcome_of_curl(27 /* CURLE_OUT_OF_MEMORY */, 0), "internal", "network", 0,
                "outcome: out of memory is network, final");
  CHECK(stella_outcome_info_of(STELLA_OUTCOME_COUNT) == NULL &&
        stella_outcome_info_of((stella_outcome)-1) == NULL, "outcome: no row out of range");
  for (o = 0; o < STELLA_OUTCOME_COUNT; o++) {
    const stella_outcome_info *i = stella_outcome_info_of((stella_outcome)o);
    if (i->answered) answered++;
    if (!CHECK(i->name != NULL && (o == STELLA_OUTCOME_OK) == (i->kind == NULL) &&
               (o == STELLA_OUTCOME_OK) == (i->message == NULL), "outcome: every row is complete"))
      diag("row", i->name);
  }
  check_long(answered, STELLA_OUTCOME_TIMEOUT, "outcome: the answered outcomes come first");
}

static void test_retry_delay(void) {
  long d;
  /* growth: base * 2^(attempt-1) times 0.5 */
  check_long(stella_retry_delay_ms(1, 100, 10000, -1, 0.5), 50, "retry_delay: attempt 1");
  check_long(stella_retry_delay_ms(2, 100, 10000, -1, 0.5), 100, "retry_delay: attempt 2 doubles");
  check_long(stella_retry_delay_ms(3, 100, 10000, -1, 0.5), 200, "retry_delay: attempt 3 doubles");
  check_long(stella_retry_delay_ms(5, 100, 10000, -1, 0.5), 800, "retry_delay: attempt 5");
  /* cap */
  check_long(stella_retry_delay_ms(8, 100, 10000, -1, 0.5), 5000, "retry_delay: capped at max");
  check_long(stella_retry_delay_ms(1000, 100, 10000, -1, 0.5), 5000,
             "retry_delay: a huge attempt number stays capped");
  /* full jitter bounds */
  check_long(stella_retry_delay_ms(3, 100, 10000, -1, 0.0), 0, "retry_delay: jitter 0 gives 0");
  d = stella_retry_delay_ms(3, 100, 10000, -1, 0.9999999);
  if (!CHECK(d >= 399 && d < 400, "retry_delay: jitter just below 1 gives just below the cap"))
    diag_long("delay", d);
  d = stella_retry_delay_ms(3, 100, 10000, -1, 1.0);
  if (!CHECK(d >= 0 && d < 400, "retry_delay: jitter 1.0 stays below the cap"))
    diag_long("delay", d);
  d = stella_retry_delay_ms(20, 100, 10000, -1, 0.9999999);
  if (!CHECK(d >= 9999 && d < 10000, "retry_delay: jitter near 1 at the cap stays below max"))
    diag_long("delay", d);
  check_long(stella_retry_delay_ms(3, 100, 10000, -1, -0.5), 0,
             "retry_delay: negative jitter counts as 0");
  /* Retry-After wins, capped at max */
  check_long(stella_retry_delay_ms(1, 100, 10000, 2500, 0.0), 2500,
             "retry_delay: Retry-After wins over backoff");
  check_long(stella_retry_delay_ms(1, 100, 10000, 0, 0.9), 0, "retry_delay: Retry-After 0 wins");
  check_long(stella_retry_delay_ms(1, 100, 10000, 120000, 0.5), 10000,
             "retry_delay: Retry-After is capped at max");
}

static void test_parse_retry_after(void) {
  /* 784111777 = Sun, 06 Nov 1994 08:49:37 GMT (the RFC 9110 example date) */
  static const char date[] = "Sun, 06 Nov 1994 08:49:37 GMT";
  const long long when = 784111777LL;
  long v;
  check_long(stella_parse_retry_after("120", 0), 120000, "parse_retry_after: \"120\"");
  check_long(stella_parse_retry_after(" 5 ", 0), 5000, "parse_retry_after: \" 5 \"");
  check_long(stella_parse_retry_after("0", 0), 0, "parse_retry_after: \"0\"");
  check_long(stella_parse_retry_after("abc", 0), -1, "parse_retry_after: \"abc\" is -1");
  check_long(stella_parse_retry_after("", 0), -1, "parse_retry_after: \"\" is -1");
  check_long(stella_parse_retry_after("5s", 0), -1, "parse_retry_after: \"5s\" is -1");
  check_long(stella_parse_retry_after("1 2", 0), -1, "parse_retry_after: \"1 2\" is -1");
  check_long(stella_parse_retry_after(date, when - 30), 30000,
             "parse_retry_after: an IMF-fixdate 30 s in the future");
  check_long(stella_parse_retry_after(date, when), 0,
             "parse_retry_after: an IMF-fixdate equal to now");
  check_long(stella_parse_retry_after(date, when + 3600), 0,
             "parse_retry_after: an IMF-fixdate in the past is 0");
  check_long(stella_parse_retry_after(",Thu, 01 Jan 1979999990 00:00:00 GMT", 1700000000LL), 86400000L,
             "parse_retry_after: a date in year 1979999990 is capped at a day (found by fuzz_retry_after)");
  v = stella_parse_retry_after("99999999999999999999999", 0);
  if (!CHECK(v > 0, "parse_retry_after: an absurd number is clamped, not wrapped"))
    diag_long("value", v);
}

/* ---------- HTTP client ------------------------------------------------------------- */

#define KEY "sk_test_SECRETKEY42"

/* Creates a client for base_url with api_key, checks success or refusal, and
 * that the error text never carries the key (or `secret`, a distinctive part). */
static void try_new(const char *base_url, const char *api_key, const char *secret, int want_ok,
                    const char *desc) {
  stella_http_options o;
  stella_http *h;
  char err[256];
  char what[200];
  memset(&o, 0, sizeof o);
  o.base_url = base_url;
  o.api_key = api_key;
  err[0] = '\0';
  h = stella_http_new(&o, err, sizeof err);
  if (!check(want_ok ? h != NULL : h == NULL, desc)) diag("error", err);
  if (!want_ok) {
    snprintf(what, sizeof what, "%s: says why", desc);
    if (!check(err[0] != '\0', what)) diag("error", err);
  }
  snprintf(what, sizeof what, "%s: error text does not contain the key", desc);
  check_no_secret(err, secret, what);
  stella_http_free(h);
}

static void test_http_new(void) {
  try_new("https://example.com", "", KEY, 0, "http_new: refuses an empty key");
  try_new("https://example.com", NULL, KEY, 0, "http_new: refuses a NULL key");
  try_new("https://example.com", "sk_test_SECRET KEY", "SECRET", 0,
          "http_new: refuses a key with a space");
  try_new("https://example.com", "sk_test_SECRET\nKEY", "SECRET", 0,
          "http_new: refuses a key with a newline");
  try_new("https://example.com", "sk_test_SECRET\tKEY", "SECRET", 0,
          "http_new: refuses a key with a tab");
  try_new("http://example.com", KEY, KEY, 0, "http_new: refuses http:// to a non-loopback host");
  try_new("http://127.0.0.1.example.com:9", KEY, KEY, 0,
          "http_new: refuses http:// to a host that only starts like loopback");
  try_new("http://127.0.0.300:9", KEY, KEY, 0,
          "http_new: refuses http://127.0.0.300 (not an address: a name DNS would resolve)");
  try_new("http://127.00..2:9", KEY, KEY, 0, "http_new: refuses http://127.00..2 (found by fuzz_url_key)");
  try_new("http://127.255.255.254:9", KEY, KEY, 1, "http_new: accepts http://127.255.255.254:9");
  try_new("http://localhost.example.com", KEY, KEY, 0,
          "http_new: refuses http:// to localhost.example.com");
  try_new("ftp://example.com", KEY, KEY, 0, "http_new: refuses ftp://");
  try_new("file:///etc/passwd", KEY, KEY, 0, "http_new: refuses file://");
  try_new("not a url", KEY, KEY, 0, "http_new: refuses something that is not a URL");
  try_new("http://127.0.0.1:9", KEY, KEY, 1, "http_new: accepts http://127.0.0.1:9");
  try_new("http://localhost:9", KEY, KEY, 1, "http_new: accepts http://localhost:9");
  try_new("http://[::1]:9", KEY, KEY, 1, "http_new: accepts http://[::1]:9");
  try_new("https://example.com", KEY, KEY, 1, "http_new: accepts https://example.com");
  try_new("https://example.com/", KEY, KEY, 1, "http_new: accepts a trailing slash");
  try_new(NULL, KEY, KEY, 1, "http_new: a NULL base_url means the default https:// service");
  try_new("https://user:pw@example.com", KEY, KEY, 0, "http_new: refuses user credentials in base_url");
  try_new("https://@example.com", KEY, KEY, 0, "http_new: refuses an empty userinfo in base_url");
  try_new("https://example.com/#top", KEY, KEY, 0, "http_new: refuses a fragment in base_url");
  stella_http_free(NULL);
  CHECK(1, "http_free: NULL is fine");
}

/* The option checks on counted strings, and the parts of a base URL. */
static void test_option_checks(void) {
  static const char nul_key[] = "abc\0def";
  static const char nul_url[] = "http://127.0.0.1:9\0.example.com";
  char err[256];
  stella_base_url u;
  err[0] = '\0';
  CHECK(!stella_check_key(nul_key, sizeof nul_key - 1, err, sizeof err),
        "check_key: a NUL inside the key is refused, not cut off");
  check_str(err, "api_key must be a non-empty string without whitespace or control characters",
            "check_key: with the usual words");
  CHECK(stella_check_key(KEY, strlen(KEY), err, sizeof err), "check_key: a good key passes");
  CHECK(!stella_check_base_url(nul_url, sizeof nul_url - 1, &u, err, sizeof err),
        "check_base_url: a NUL inside the URL is refused");
  CHECK(!stella_check_base_url("https://u@example.com", 21, &u, err, sizeof err),
        "check_base_url: credentials are refused");
  check_str(err, "base_url must not hold user credentials", "check_base_url: saying so");
  CHECK(!stella_check_base_url("https://example.com#x", 21, &u, err, sizeof err),
        "check_base_url: a fragment is refused");
  check_str(err, "base_url must not have a fragment", "check_base_url: saying so");
  if (CHECK(stella_check_base_url("https://Example.com:8443/v2//", 29, &u, err, sizeof err),
            "check_base_url: https with a port and a path")) {
    CHECK(u.tls && u.port == 8443 && u.port_given, "check_base_url: tls, the port, given");
    check_bytes(u.host, u.host_len, "Example.com", "check_base_url: the host as written");
    check_bytes(u.path, u.path_len, "/v2", "check_base_url: the path without trailing slashes");
  }
  if (CHECK(stella_check_base_url("http://[::1]", 12, &u, err, sizeof err), "check_base_url: http to [::1]")) {
    CHECK(!u.tls && u.port == 80 && !u.port_given && u.path_len == 0,
          "check_base_url: port 80 by default, no path");
    check_bytes(u.host, u.host_len, "[::1]", "check_base_url: the IPv6 host keeps its brackets");
  }
  CHECK(!stella_check_user_agent("a\r\nb", 4, err, sizeof err), "check_user_agent: CR LF refused");
  CHECK(stella_check_user_agent(NULL, 0, err, sizeof err), "check_user_agent: none is fine");
}

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

/* A loopback socket that listens but never accepts: connects complete in the
 * kernel's backlog, then nothing is ever answered. Returns the fd (port in *port). */
static int silent_listener(int *port) {
  struct sockaddr_in addr;
  socklen_t alen = sizeof addr;
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  memset(&addr, 0, sizeof addr);
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, 8) != 0 ||
      getsockname(fd, (struct sockaddr *)&addr, &alen) != 0) {
    close(fd);
    return -1;
  }
  *port = ntohs(addr.sin_port);
  return fd;
}

static void test_http_post(void) {
  static const char body[] = "{\"x\":1}";
  stella_http_options o;
  stella_http_result res;
  stella_http *h;
  char err[256], url[64];
  int fd, port = 0;
  double t0, elapsed;

  /* a closed loopback port: a network failure, without the key in the message */
  memset(&o, 0, sizeof o);
  o.base_url = "http://127.0.0.1:1";
  o.api_key = KEY;
  o.timeout_ms = 5000;
  o.connect_timeout_ms = 2000;
  h = stella_http_new(&o, err, sizeof err);
  if (CHECK(h != NULL, "http_post: client for http://127.0.0.1:1")) {
    stella_outcome f = stella_http_post(h, "/v1/requests", body, sizeof body - 1, &res);
    check_long((long)f, STELLA_OUTCOME_NETWORK, "http_post: a closed port is STELLA_OUTCOME_NETWORK");
    check_long((long)res.outcome, STELLA_OUTCOME_NETWORK, "http_post: res.outcome matches the return");
    check_long(res.status, 0, "http_post: no status without an answer");
    if (!CHECK(res.error != NULL && res.error[0] != '\0', "http_post: the failure has a message"))
      diag("error", res.error);
    check_no_secret(res.error, KEY, "http_post: the message does not contain the key");
    check_no_secret(res.error, "SECRET", "http_post: nor any part of it");
    check_str(stella_outcome_info_of(res.outcome)->kind, "network", "http_post: classified as network");
    CHECK(stella_outcome_info_of(res.outcome)->retryable == 1, "http_post: and retryable");
    check_long(res.retry_after_ms, -1, "http_post: no Retry-After without a response");
    /* the client stays usable after a failure */
    f = stella_http_post(h, "/v1/requests", body, sizeof body - 1, &res);
    check_long((long)f, STELLA_OUTCOME_NETWORK, "http_post: a second attempt fails the same way");
  } else {
    diag("error", err);
  }
  stella_http_free(h);

  /* a listener that never answers: a timeout after about timeout_ms */
  fd = silent_listener(&port);
  if (!CHECK(fd >= 0, "http_post: a silent loopback listener")) return;
  snprintf(url, sizeof url, "http://127.0.0.1:%d", port);
  memset(&o, 0, sizeof o);
  o.base_url = url;
  o.api_key = KEY;
  o.timeout_ms = 200;
  o.connect_timeout_ms = 200;
  h = stella_http_new(&o, err, sizeof err);
  if (CHECK(h != NULL, "http_post: client for the silent listener")) {
    stella_outcome f;
    t0 = now_ms();
    f = stella_http_post(h, "/v1/requests", body, sizeof body - 1, &res);
    elapsed = now_ms() - t0;
    if (!check_long((long)f, STELLA_OUTCOME_TIMEOUT,
                    "http_post: no answer within timeout_ms is STELLA_OUTCOME_TIMEOUT"))
      diag("error", res.error);
    if (!CHECK(elapsed >= 150 && elapsed < 3000, "http_post: the timeout fires after ~200 ms"))
      diag_long("elapsed ms", (long)elapsed);
    check_no_secret(res.error, KEY, "http_post: the timeout message does not contain the key");
    check_str(stella_outcome_info_of(res.outcome)->kind, "timeout", "http_post: classified as timeout");
    CHECK(stella_outcome_info_of(res.outcome)->retryable == 1, "http_post: and retryable");
    CHECK(stella_http_connects(h) >= 1, "http_post: a connection was opened to the listener");
  } else {
    diag("error", err);
  }
  stella_http_free(h);
  close(fd);
}

/* ---------- non-blocking post and the background sender ------------------------------- */

static stella_http *loopback_client(const char *url, long timeout_ms) {
  stella_http_options o;
  char err[256];
  stella_http *h;
  memset(&o, 0, sizeof o);
  o.base_url = url;
  o.api_key = KEY;
  o.timeout_ms = timeout_ms;
  o.connect_timeout_ms = timeout_ms;
  h = stella_http_new(&o, err, sizeof err);
  if (h == NULL) diag("error", err);
  return h;
}

static void test_http_start_step(void) {
  static const char body[] = "{\"x\":1}";
  stella_http_result res;
  stella_http *h;
  char url[64];
  int fd, port = 0, ended, spins = 0;

  h = loopback_client("http://127.0.0.1:1", 2000);
  if (!CHECK(h != NULL, "http_start: a client")) return;
  CHECK(stella_http_running(h) == 0, "http_start: nothing runs at first");
  check_long(stella_http_step(h, 0, &res), 1, "http_step: with nothing started it ends at once");
  check_long((long)res.outcome, STELLA_OUTCOME_INTERNAL, "http_step: ... as an internal failure");
  check_long((long)stella_http_start(h, "/v1/requests", body, sizeof body - 1, &res), STELLA_OUTCOME_OK,
             "http_start: starts a post to a closed port");
  CHECK(stella_http_running(h) == 1, "http_start: it runs");
  check_long((long)stella_http_start(h, "/v1/requests", body, sizeof body - 1, &res),
             STELLA_OUTCOME_INTERNAL, "http_start: a second start while one runs is refused");
  check_long((long)stella_http_post(h, "/v1/requests", body, sizeof body - 1, &res),
             STELLA_OUTCOME_INTERNAL, "http_post: refused too while a started post runs");
  do { ended = stella_http_step(h, 50, &res); } while (!ended && ++spins < 200);
  CHECK(ended, "http_step: the post ends");
  check_long((long)res.outcome, STELLA_OUTCOME_NETWORK, "http_step: a closed port is STELLA_OUTCOME_NETWORK");
  check_no_secret(res.error, KEY, "http_step: the message does not contain the key");
  CHECK(stella_http_running(h) == 0, "http_step: nothing runs after the end");
  check_long((long)stella_http_post(h, "/v1/requests", body, sizeof body - 1, &res), STELLA_OUTCOME_NETWORK,
             "http_post: the client posts again after a started post ended");
  stella_http_free(h);

  /* freeing a client while its post runs abandons the post (no leak, no wait) */
  fd = silent_listener(&port);
  if (!CHECK(fd >= 0, "http_start: a silent loopback listener")) return;
  snprintf(url, sizeof url, "http://127.0.0.1:%d", port);
  h = loopback_client(url, 5000);
  if (CHECK(h != NULL, "http_start: a client for the silent listener")) {
    double t0 = now_ms();
    check_long((long)stella_http_start(h, "/v1/requests", body, sizeof body - 1, &res), STELLA_OUTCOME_OK,
               "http_start: starts a post nobody answers");
    check_long(stella_http_step(h, 0, &res), 0, "http_step(0): still running, returns at once");
    check_long(stella_http_step(h, 20, &res), 0, "http_step(20): still running after waiting a little");
    CHECK(now_ms() - t0 < 2000, "http_step: neither call waited for the 5 s timeout");
  }
  stella_http_free(h);
  CHECK(1, "http_free: frees a client with a running post");
  close(fd);
}

static void test_sender(void) {
  static const char body[] = "{\"x\":1}";
  stella_send_item items[3];
  stella_sender *s;
  const stella_send_result *r;
  stella_http *h;
  char err[128], url[64];
  int fd, port = 0, i;
  double t0;

  s = stella_sender_start(NULL, 0, 1000, err, sizeof err);
  if (CHECK(s != NULL, "sender: an empty list starts")) {
    CHECK(stella_sender_done(s) == 1, "sender: an empty list is done at once");
    check_long((long)stella_sender_wait(s), 0, "sender: nothing attempted");
    CHECK(stella_sender_result(s, 0) == NULL, "sender: no result for item 1");
  }
  stella_sender_free(s);
  stella_sender_free(NULL);

  /* a closed port: the first post fails, the thread stops there */
  h = loopback_client("http://127.0.0.1:1", 2000);
  if (!CHECK(h != NULL, "sender: a client")) return;
  for (i = 0; i < 3; i++) {
    items[i].h = h;
    items[i].path = "/v1/requests";
    items[i].body = body;
    items[i].body_len = sizeof body - 1;
  }
  s = stella_sender_start(items, 3, 10000, err, sizeof err);
  if (CHECK(s != NULL, "sender: starts three posts")) {
    check_long((long)stella_sender_wait(s), 1, "sender: stops after the first failure");
    CHECK(stella_sender_done(s) == 1, "sender: done after wait");
    r = stella_sender_result(s, 0);
    if (CHECK(r != NULL && r->attempted, "sender: item 1 was attempted")) {
      check_long((long)r->outcome, STELLA_OUTCOME_NETWORK, "sender: item 1 failed as network");
      CHECK(r->error != NULL && r->error[0] != '\0', "sender: with a message");
      check_no_secret(r->error, KEY, "sender: the message does not contain the key");
    }
    CHECK(stella_sender_result(s, 1) == NULL, "sender: item 2 was not attempted");
    CHECK(stella_sender_result(s, 3) == NULL, "sender: no item 4");
    check_long((long)stella_sender_wait(s), 1, "sender: wait again gives the same count");
  }
  stella_sender_free(s);

  /* two clients: two lanes; the first lane's failure stops the other after its post */
  {
    stella_http *h2 = loopback_client("http://127.0.0.1:1", 2000);
    size_t attempted;
    if (CHECK(h2 != NULL, "sender: a second client")) {
      items[1].h = h2;
      s = stella_sender_start(items, 3, 10000, err, sizeof err);
      if (CHECK(s != NULL, "sender: starts three posts over two clients")) {
        attempted = stella_sender_wait(s);
        if (!CHECK(attempted >= 1 && attempted <= 3, "sender: two lanes attempted 1 to 3 items"))
          diag_long("attempted", (long)attempted);
        /* which lane fails first is a race: the other lane may stop before its first post */
        {
          size_t k, seen = 0;
          for (k = 0; k < 3; k++) if (stella_sender_result(s, k) != NULL) seen++;
          CHECK(stella_sender_result(s, 0) != NULL || stella_sender_result(s, 1) != NULL,
                "sender: a lane's first item was attempted");
          if (!CHECK(seen == attempted, "sender: one result for each attempted item"))
            diag_long("results", (long)seen);
        }
        CHECK(stella_sender_result(s, 1) == NULL || stella_sender_result(s, 1)->outcome ==
              STELLA_OUTCOME_NETWORK, "sender: the second lane's item failed as network or was not tried");
        CHECK(stella_sender_done(s) == 1, "sender: done after wait, with two lanes");
      }
      stella_sender_free(s);

      /* one group over both clients: a shared queue; a failure still stops every lane */
      {
        static const size_t one[3] = { 1, 1, 1 }, two[3] = { 1, 2, 2 };
        size_t k, seen = 0, wrong_by = 0;
        s = stella_sender_start_shared(items, one, 3, 10000, err, sizeof err);
        if (CHECK(s != NULL, "sender: starts three posts shared by two clients")) {
          attempted = stella_sender_wait(s);
          if (!CHECK(attempted >= 1 && attempted <= 2, "sender: a shared queue stops at the failures (one per lane at most)"))
            diag_long("attempted", (long)attempted);
          /* how many were attempted is a race between the lanes: one check over all of them */
          for (k = 0; k < 3; k++) {
            r = stella_sender_result(s, k);
            if (r == NULL) continue;
            seen++;
            if (r->by != 0 && r->by != 1) wrong_by++;
          }
          CHECK(seen > 0 && wrong_by == 0, "sender: by is the first item of the client that posted it");
          check_long((long)seen, (long)attempted, "sender: one result for each item a shared queue attempted");
          CHECK(stella_sender_result(s, 2) == NULL, "sender: the third item was not attempted");
        }
        stella_sender_free(s);
        err[0] = '\0';
        s = stella_sender_start_shared(items, two, 3, 10000, err, sizeof err);
        CHECK(s == NULL && strcmp(err, "a client in two groups") == 0, "sender: a client in two groups is refused");
        stella_sender_free(s);
      }
      items[1].h = h;
    }
    stella_http_free(h2);
  }
  stella_http_free(h);

  /* freeing a sender whose post hangs: it waits for that post only (its timeout) */
  fd = silent_listener(&port);
  if (!CHECK(fd >= 0, "sender: a silent loopback listener")) return;
  snprintf(url, sizeof url, "http://127.0.0.1:%d", port);
  h = loopback_client(url, 300);
  if (CHECK(h != NULL, "sender: a client for the silent listener")) {
    for (i = 0; i < 3; i++) items[i].h = h;
    s = stella_sender_start(items, 3, 10000, err, sizeof err);
    if (CHECK(s != NULL, "sender: starts posts nobody answers")) {
      CHECK(stella_sender_done(s) == 0, "sender: not done while the post hangs");
      t0 = now_ms();
      stella_sender_free(s);
      if (!CHECK(now_ms() - t0 < 2500, "sender: free returns after the post in flight times out"))
        diag_long("elapsed ms", (long)(now_ms() - t0));
    }
  }
  stella_http_free(h);
  close(fd);
}

/* The appendable sender: chunks added while its lanes run; at a failure it pauses until the
 * failed item's chunk is collected; collect takes back the items not taken. */
static void test_sender_appendable(void) {
  static const char body[] = "{\"x\":1}";
  stella_send_item items[3];
  stella_sender *s;
  const stella_send_result *r;
  stella_http *h;
  char err[128];
  int i, state;
  long a, b;

  s = stella_sender_open(err, sizeof err);
  if (!CHECK(s != NULL, "appendable: opens")) return;
  a = stella_sender_add(s, NULL, NULL, 0, 1000, err, sizeof err);
  CHECK(a > 0, "appendable: an empty chunk is added");
  CHECK(stella_sender_ready(s, a, 0) == 1, "appendable: an empty chunk is ready at once");
  check_long(stella_sender_collect(s, a), 0, "appendable: an empty chunk has no items");
  check_long(stella_sender_collect(s, a), -1, "appendable: a chunk is collected once");
  CHECK(stella_sender_ready(s, 12345, 0) == 1, "appendable: no such chunk: nothing to wait for");

  /* a closed port: the first post fails and the lanes pause */
  h = loopback_client("http://127.0.0.1:1", 2000);
  if (!CHECK(h != NULL, "appendable: a client")) { stella_sender_free(s); return; }
  for (i = 0; i < 3; i++) {
    items[i].h = h;
    items[i].path = "/v1/requests";
    items[i].body = body;
    items[i].body_len = sizeof body - 1;
  }
  a = stella_sender_add(s, items, NULL, 3, 10000, err, sizeof err);
  b = stella_sender_add(s, items, NULL, 2, 10000, err, sizeof err);
  CHECK(a > 0 && b > a, "appendable: two chunks added, ids in order");
  CHECK(stella_sender_ready(s, a, 10000) == 1, "appendable: the first chunk is ready (paused after its failure)");
  CHECK(stella_sender_paused(s) == 1, "appendable: paused after a failure");
  CHECK(stella_sender_resume(s) == 0, "appendable: no resume while the failed item's chunk is not collected");
  CHECK(stella_sender_ready(s, b, 0) == 1, "appendable: the second chunk is ready too (paused, nothing in flight)");
  check_long(stella_sender_collect(s, a), 3, "appendable: the first chunk collected");
  r = stella_sender_collected(s, 0, &state);
  if (CHECK(r != NULL && state == STELLA_SEND_DONE, "appendable: item 1 was posted")) {
    check_long((long)r->outcome, STELLA_OUTCOME_NETWORK, "appendable: item 1 failed as network");
    check_long((long)r->by, 0, "appendable: by the first lane");
    check_no_secret(r->error, KEY, "appendable: the message does not contain the key");
  }
  CHECK(stella_sender_collected(s, 1, &state) == NULL && state == STELLA_SEND_NOT_TAKEN,
        "appendable: item 2 was taken back, not posted");
  CHECK(stella_sender_collected(s, 3, &state) == NULL, "appendable: no item 4");
  CHECK(stella_sender_resume(s) == 1, "appendable: resumes once the failure is collected");
  CHECK(stella_sender_ready(s, b, 10000) == 1, "appendable: the second chunk is ready after its failure");
  check_long(stella_sender_collect(s, b), 2, "appendable: the second chunk collected");
  CHECK(stella_sender_collected(s, 0, &state) != NULL && state == STELLA_SEND_DONE,
        "appendable: the second chunk's first item was posted after the resume");
  CHECK(stella_sender_collected(s, 1, &state) == NULL && state == STELLA_SEND_NOT_TAKEN,
        "appendable: the second chunk's second item was not");
  check_long(stella_sender_pause(s), 1, "appendable: pause");
  CHECK(stella_sender_resume(s) == 1, "appendable: resume after a pause");
  stella_sender_stop(s);
  CHECK(stella_sender_add(s, items, NULL, 1, 1000, err, sizeof err) == -1 &&
        strcmp(err, "the sender has stopped") == 0, "appendable: nothing is added after stop");
  CHECK(stella_sender_resume(s) == 0, "appendable: no resume after stop");
  check_long((long)stella_sender_wait(s), 2, "appendable: wait ends the lanes; two posts attempted");
  stella_sender_free(s);

  /* freed with chunks not collected and a lane waiting for work: nothing leaks */
  s = stella_sender_open(err, sizeof err);
  if (CHECK(s != NULL, "appendable: opens again")) {
    a = stella_sender_add(s, items, NULL, 3, 10000, err, sizeof err);
    CHECK(a > 0, "appendable: a chunk added");
    CHECK(stella_sender_ready(s, a, 10000) == 1, "appendable: ready");
  }
  stella_sender_free(s);
  stella_http_free(h);
}

/* ---------- the sender's loop against a loopback server that answers ----------------- */

/* A keep-alive HTTP/1.1 server on a thread of its own, one poll() over its connections:
 * answers each POST 201 with "{}"; a POST to /close is answered with Connection: close
 * and its connection closed (the client connects again). Counts the requests answered. */
#define SERVER_CONNS 128
typedef struct test_server {
  int listen_fd, stop_r, stop_w, port;
  pthread_t thread;
  pthread_mutex_t lock;
  long answered, accepted;
} test_server;

typedef struct server_conn {
  int fd;
  size_t len;
  char buf[8192];
} server_conn;

/* One complete request at the front of c->buf: its length (head and body), or 0. */
static size_t request_length(const server_conn *c) {
  size_t i, body = 0;
  for (i = 0; i + 3 < c->len; i++) {
    if (memcmp(c->buf + i, "\r\n\r\n", 4) != 0) continue;
    {
      size_t k;
      for (k = 0; k + 16 < i; k++)   /* "content-length: " in any case */
        if ((c->buf[k] == '\n') && (c->buf[k + 1] == 'C' || c->buf[k + 1] == 'c') &&
            strncmp(c->buf + k + 2, "ontent-Length:", 14) == 0) {
          body = (size_t)strtoul(c->buf + k + 16, NULL, 10);
          break;
        }
    }
    return c->len >= i + 4 + body ? i + 4 + body : 0;
  }
  return 0;
}

static void *serve(void *arg) {
  test_server *ts = (test_server *)arg;
  server_conn *conns = (server_conn *)calloc(SERVER_CONNS, sizeof *conns);
  struct pollfd fds[SERVER_CONNS + 2];
  int k;
  if (conns == NULL) return NULL;
  for (k = 0; k < SERVER_CONNS; k++) conns[k].fd = -1;
  for (;;) {
    int n;
    fds[0].fd = ts->stop_r;
    fds[0].events = POLLIN;
    fds[1].fd = ts->listen_fd;
    fds[1].events = POLLIN;
    for (k = 0; k < SERVER_CONNS; k++) {
      fds[k + 2].fd = conns[k].fd;
      fds[k + 2].events = POLLIN;
    }
    for (k = 0; k < SERVER_CONNS + 2; k++) fds[k].revents = 0;
    n = poll(fds, SERVER_CONNS + 2, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 || fds[0].revents) break;
    if (fds[1].revents) {
      int fd = accept(ts->listen_fd, NULL, NULL);
      for (k = 0; fd >= 0 && k < SERVER_CONNS && conns[k].fd >= 0; k++) {}
      if (fd >= 0 && k == SERVER_CONNS) close(fd);
      else if (fd >= 0) {
        conns[k].fd = fd;
        conns[k].len = 0;
        pthread_mutex_lock(&ts->lock);
        ts->accepted++;
        pthread_mutex_unlock(&ts->lock);
      }
    }
    for (k = 0; k < SERVER_CONNS; k++) {
      server_conn *c = &conns[k];
      ssize_t got;
      size_t len;
      if (c->fd < 0 || fds[k + 2].revents == 0) continue;
      got = read(c->fd, c->buf + c->len, sizeof c->buf - c->len);
      if (got <= 0) { close(c->fd); c->fd = -1; continue; }
      c->len += (size_t)got;
      while (c->fd >= 0 && (len = request_length(c)) > 0) {
        static const char keep[] = "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                                   "Content-Length: 2\r\n\r\n{}";
        static const char bye[] = "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                                  "Connection: close\r\nContent-Length: 2\r\n\r\n{}";
        int closing = strncmp(c->buf, "POST /close ", 12) == 0;
        const char *answer = closing ? bye : keep;
        size_t alen = closing ? sizeof bye - 1 : sizeof keep - 1;
        if (write(c->fd, answer, alen) != (ssize_t)alen) closing = 1;
        pthread_mutex_lock(&ts->lock);
        ts->answered++;
        pthread_mutex_unlock(&ts->lock);
        memmove(c->buf, c->buf + len, c->len - len);
        c->len -= len;
        if (closing) { close(c->fd); c->fd = -1; }
      }
      if (c->fd >= 0 && c->len == sizeof c->buf) { close(c->fd); c->fd = -1; }
    }
  }
  for (k = 0; k < SERVER_CONNS; k++) if (conns[k].fd >= 0) close(conns[k].fd);
  free(conns);
  return NULL;
}

static int server_start(test_server *ts) {
  int p[2];
  memset(ts, 0, sizeof *ts);
  ts->listen_fd = silent_listener(&ts->port);
  if (ts->listen_fd < 0) return 0;
  if (pipe(p) != 0) { close(ts->listen_fd); return 0; }
  ts->stop_r = p[0];
  ts->stop_w = p[1];
  pthread_mutex_init(&ts->lock, NULL);
  if (pthread_create(&ts->thread, NULL, serve, ts) != 0) {
    close(p[0]);
    close(p[1]);
    close(ts->listen_fd);
    pthread_mutex_destroy(&ts->lock);
    return 0;
  }
  return 1;
}

static long server_count(test_server *ts, int accepted) {
  long n;
  pthread_mutex_lock(&ts->lock);
  n = accepted ? ts->accepted : ts->answered;
  pthread_mutex_unlock(&ts->lock);
  return n;
}

static void server_stop(test_server *ts) {
  if (write(ts->stop_w, "x", 1) != 1) diag("error", "cannot stop the test server");
  pthread_join(ts->thread, NULL);
  close(ts->stop_r);
  close(ts->stop_w);
  close(ts->listen_fd);
  pthread_mutex_destroy(&ts->lock);
}

/* A number from /proc/thread-self/sched ("name   :   value"); -1 when the line is absent. */
static long sched_field(const char *name) {
  char line[256];
  long v = -1;
  size_t n = strlen(name);
  FILE *f = fopen("/proc/thread-self/sched", "r");
  if (!f) return -1;
  while (fgets(line, sizeof line, f))
    if (strncmp(line, name, n) == 0 && (line[n] == ' ' || line[n] == ':')) {
      char *colon = strchr(line, ':');
      if (colon) v = strtol(colon + 1, NULL, 10);
      break;
    }
  fclose(f);
  return v;
}

static void *slice_thread(void *arg) {
  long *got = (long *)arg;
  got[0] = sched_field("policy");
  got[1] = sched_field("prio");
  got[2] = sched_field("se.slice");
  stella_short_slice(100000);
  got[3] = sched_field("policy");
  got[4] = sched_field("prio");
  got[5] = sched_field("se.slice");
  return NULL;
}

/* The loop thread's short slice: where the kernel shows its slice (Linux 6.6+) and takes a
 * custom one (6.12+), it is 0.1 ms after the call; the policy and the nice value (prio)
 * are the thread's own still. */
static void test_short_slice(void) {
  pthread_t t;
  long got[6];
  if (sched_field("policy") < 0) {
    printf("ok %d - # SKIP short slice: no /proc/thread-self/sched here\n", ++tests_run);
    return;
  }
  if (!CHECK(pthread_create(&t, NULL, slice_thread, got) == 0, "short slice: thread started")) return;
  pthread_join(t, NULL);
  CHECK(got[3] == got[0] && got[4] == got[1], "short slice: policy and priority unchanged");
  if (got[2] >= 0)
    CHECK(got[5] == 100000 || got[5] == got[2], "short slice: 0.1 ms, or the kernel's own where it takes none");
  printf("# short slice: %ld ns -> %ld ns\n", got[2], got[5]);
}

/* One loop thread drives every lane: more lanes than one epoll_wait reports, three chunks,
 * each post answered on its lane's one connection; connections closed by the server after
 * each answer (a new socket, maybe with the old one's number); a post that times out on
 * one lane while another lane's posts are answered. */
static void test_sender_loop(void) {
  enum { LANES = 70, PER = 6 };
  static const char body[] = "{\"x\":1}";
  static stella_send_item items[LANES * PER];
  static size_t groups[LANES * PER];
  stella_http *hs[LANES];
  test_server ts;
  stella_sender *s;
  const stella_send_result *r;
  char url[64], err[128];
  long ids[3];
  int i, k, state, made = 0;
  short events;
  long timeout_ms;
  size_t done = 0, ok = 0, bad_by = 0, reused = 0, start;

  if (!CHECK(server_start(&ts), "sender loop: a loopback server that answers")) return;
  snprintf(url, sizeof url, "http://127.0.0.1:%d", ts.port);
  for (i = 0; i < LANES; i++) {
    hs[i] = loopback_client(url, 10000);
    if (hs[i] != NULL) made++;
  }
  if (!CHECK(made == LANES, "sender loop: 70 clients")) goto out;
  events = 1;
  timeout_ms = 1;
  check_long(stella_http_wait_fd(hs[0], &events, &timeout_ms), -1, "http_wait_fd: no socket while nothing runs");
  CHECK(events == 0 && timeout_ms == 0, "http_wait_fd: nothing to wait for");
  for (i = 0; i < LANES * PER; i++) {
    items[i].h = hs[i % LANES];
    items[i].path = "/v1/requests";
    items[i].body = body;
    items[i].body_len = sizeof body - 1;
    groups[i] = 1;
  }

  /* three chunks over one group of 70 lanes: every item answered, each lane on one connection */
  s = stella_sender_open(err, sizeof err);
  if (CHECK(s != NULL, "sender loop: opens")) {
    for (k = 0, start = 0; k < 3; k++) {
      size_t n = k == 0 ? LANES : (LANES * PER - LANES) / 2;
      ids[k] = stella_sender_add(s, items + start, groups + start, n, 60000, err, sizeof err);
      start += n;
    }
    CHECK(ids[0] > 0 && ids[1] > ids[0] && ids[2] > ids[1], "sender loop: three chunks added");
    for (k = 0; k < 3; k++) {
      long n;
      size_t j;
      CHECK(stella_sender_ready(s, ids[k], 60000) == 1, "sender loop: a chunk is through");
      n = stella_sender_collect(s, ids[k]);
      for (j = 0; n > 0 && j < (size_t)n; j++) {
        r = stella_sender_collected(s, j, &state);
        if (r == NULL || state != STELLA_SEND_DONE) continue;
        done++;
        if (r->outcome == STELLA_OUTCOME_OK && r->status == 201 && r->body_len == 2) ok++;
        if (r->by >= LANES) bad_by++;
      }
    }
    if (!CHECK(done == LANES * PER && ok == done, "sender loop: all 420 posts answered 201"))
      { diag_long("done", (long)done); diag_long("ok", (long)ok); }
    CHECK(bad_by == 0, "sender loop: by is a lane's number");
    check_long((long)stella_sender_wait(s), LANES * PER, "sender loop: 420 posts attempted");
  }
  stella_sender_free(s);
  for (i = 0; i < LANES; i++) if (stella_http_connects(hs[i]) == 1) reused++;
  check_long((long)reused, LANES, "sender loop: each client kept its one connection");
  check_long(server_count(&ts, 1), LANES, "sender loop: the server accepted 70 connections");
  check_long(server_count(&ts, 0), LANES * PER, "sender loop: the server answered 420 requests");

  /* the server closes every connection after its answer: each post on a new socket */
  for (i = 0; i < 40; i++) {
    items[i].h = hs[i % 4];
    items[i].path = "/close";
    groups[i] = 1;
  }
  s = stella_sender_start_shared(items, groups, 40, 60000, err, sizeof err);
  if (CHECK(s != NULL, "sender loop: starts 40 posts to /close over 4 lanes")) {
    check_long((long)stella_sender_wait(s), 40, "sender loop: 40 posts attempted");
    for (i = 0, ok = 0; i < 40; i++) {
      r = stella_sender_result(s, (size_t)i);
      if (r != NULL && r->outcome == STELLA_OUTCOME_OK && r->status == 201) ok++;
    }
    check_long((long)ok, 40, "sender loop: each answered 201 on its new connection");
  }
  stella_sender_free(s);
  check_long(stella_http_connects(hs[0]) + stella_http_connects(hs[1]) + stella_http_connects(hs[2]) +
             stella_http_connects(hs[3]), 4 + 36, "sender loop: a new connection for each post after a lane's first");

  /* a lane whose server never answers times out on its own; the other lane's posts go on */
  {
    int port = 0, fd = silent_listener(&port);
    char silent[64];
    stella_http *quiet;
    if (!CHECK(fd >= 0, "sender loop: a silent listener")) goto out;
    snprintf(silent, sizeof silent, "http://127.0.0.1:%d", port);
    quiet = loopback_client(silent, 700);
    if (CHECK(quiet != NULL, "sender loop: a client for the silent listener")) {
      double t0 = now_ms();
      items[0].h = quiet;
      for (i = 1; i < 6; i++) {
        items[i].h = hs[0];
        items[i].path = "/v1/requests";
      }
      s = stella_sender_start(items, 6, 60000, err, sizeof err);
      if (CHECK(s != NULL, "sender loop: starts a hanging post beside five others")) {
        size_t attempted = stella_sender_wait(s);
        double took = now_ms() - t0;
        r = stella_sender_result(s, 0);
        CHECK(r != NULL && r->outcome == STELLA_OUTCOME_TIMEOUT, "sender loop: the hanging post timed out");
        if (!CHECK(took >= 650, "sender loop: ... after its own timeout"))
          diag_long("elapsed ms", (long)took);
        r = stella_sender_result(s, 1);
        CHECK(r != NULL && r->outcome == STELLA_OUTCOME_OK, "sender loop: the other lane's first post was answered meanwhile");
        for (i = 2, ok = 0; i < 6; i++) {
          r = stella_sender_result(s, (size_t)i);
          if (r == NULL || r->outcome == STELLA_OUTCOME_OK) ok++;
        }
        check_long((long)ok, 4, "sender loop: the others answered or not attempted after the failure");
        CHECK(attempted >= 2, "sender loop: both lanes posted");
      }
      stella_sender_free(s);
    }
    stella_http_free(quiet);
    close(fd);
  }

out:
  for (i = 0; i < LANES; i++) stella_http_free(hs[i]);
  server_stop(&ts);
}

/* ---------- JSON text (stella_parse_json) ------------------------------------------ */

/* Parses NUL-terminated `text`; expects success. */
static int parse_ok(stella_arena *a, const char *text, stella_value *out, const char *desc) {
  stella_parse_error err;
  int rc = stella_parse_json(a, text, strlen(text), out, &err);
  if (check(rc == 0, desc)) return 1;
  diag_long("return value", rc);
  diag("message", err.message);
  diag_long("offset", (long)err.offset);
  return 0;
}

/* Parses `len` bytes of `text`; expects a syntax error with this message (a prefix
 * of it), at this offset, line and column. */
static void parse_fails(const char *text, size_t len, const char *message, size_t offset,
                        size_t line, size_t column, const char *desc) {
  stella_arena a;
  stella_value v;
  stella_parse_error err;
  int rc;
  stella_arena_init(&a);
  memset(&err, 0, sizeof err);
  rc = stella_parse_json(&a, text, len, &v, &err);
  if (!check(rc == 1 && err.message != NULL && strncmp(err.message, message, strlen(message)) == 0 &&
             err.offset == offset && err.line == line && err.column == column && v.type == STELLA_NIL,
             desc)) {
    diag_bytes("text", text, len);
    diag_long("return value", rc);
    diag("message", err.message);
    diag("expected message", message);
    diag_long("offset", (long)err.offset);
    diag_long("expected offset", (long)offset);
    diag_long("line", (long)err.line);
    diag_long("expected line", (long)line);
    diag_long("column", (long)err.column);
    diag_long("expected column", (long)column);
  }
  stella_arena_free(&a);
}

#define PARSE_FAILS(text, msg, off, line, col, desc) \
  parse_fails((text), sizeof(text) - 1, (msg), (off), (line), (col), (desc))

static void test_parse_valid(void) {
  stella_arena a;
  stella_value v;
  const stella_value *x;
  static const char arr[] = " \t\r\n[1, \"a\", true, false, null, {}, [], -2.5]\n ";
  stella_arena_init(&a);

  if (parse_ok(&a, EXAMPLE_JSON, &v, "parse: the README's example request")) {
    CHECK(v.type == STELLA_TABLE && v.u.table.shape == STELLA_SHAPE_OBJECT && v.u.table.count == 4,
          "parse: an object is a table of shape OBJECT with its 4 members");
    CHECK(v.u.table.pairs[0].key.type == STELLA_STRING &&
          v.u.table.pairs[0].key.u.string.len == 8 &&
          memcmp(v.u.table.pairs[0].key.u.string.ptr, "customer", 8) == 0 &&
          v.u.table.pairs[3].key.u.string.len == 18,
          "parse: members keep the document's order");
    x = stella_get(stella_get(&v, "customer"), "email");
    CHECK(x && x->type == STELLA_STRING && x->u.string.ptr > EXAMPLE_JSON &&
          x->u.string.ptr < EXAMPLE_JSON + sizeof EXAMPLE_JSON &&
          x->u.string.len == strlen("janecustomer@example.com"),
          "parse: a string without escapes points into the text");
  }
  if (parse_ok(&a, arr, &v, "parse: an array with every kind of value, whitespace around")) {
    const stella_pair *p = v.u.table.pairs;
    int keys_ok = 1;
    size_t i;
    for (i = 0; v.type == STELLA_TABLE && i < v.u.table.count; i++)
      keys_ok &= p[i].key.type == STELLA_NUMBER && p[i].key.u.number.is_int &&
                 p[i].key.u.number.i == (long long)i + 1;
    CHECK(v.type == STELLA_TABLE && v.u.table.shape == STELLA_SHAPE_ARRAY && v.u.table.count == 8 &&
          keys_ok, "parse: an array is a table of shape ARRAY keyed 1..n");
    if (v.type == STELLA_TABLE && v.u.table.count == 8) {
      CHECK(p[0].value.type == STELLA_NUMBER && p[0].value.u.number.is_int && p[0].value.u.number.i == 1 &&
            p[1].value.type == STELLA_STRING && p[2].value.type == STELLA_BOOL && p[2].value.u.boolean &&
            p[3].value.type == STELLA_BOOL && !p[3].value.u.boolean && p[4].value.type == STELLA_NULL &&
            p[5].value.type == STELLA_TABLE && p[5].value.u.table.shape == STELLA_SHAPE_OBJECT &&
            p[5].value.u.table.count == 0 &&
            p[6].value.type == STELLA_TABLE && p[6].value.u.table.shape == STELLA_SHAPE_ARRAY &&
            p[6].value.u.table.count == 0 &&
            p[7].value.type == STELLA_NUMBER && !p[7].value.u.number.is_int && p[7].value.u.number.num == -2.5,
            "parse: number, string, true, false, null, {}, [] and a fraction, each as itself");
    }
  }
  if (parse_ok(&a, "\"just a string\"", &v, "parse: a scalar document"))
    CHECK(v.type == STELLA_STRING && v.u.string.len == 13, "parse: a string document is a string");
  {
    /* not NUL-terminated: nothing may be read past len (ASan and valgrind watch) */
    char *buf = (char *)malloc(7);
    if (buf) {
      stella_parse_error err;
      memcpy(buf, "[1,\"x\"]", 7);
      CHECK(stella_parse_json(&a, buf, 7, &v, &err) == 0 && v.u.table.count == 2,
            "parse: text without a terminating NUL");
      CHECK(stella_parse_json(&a, buf, 6, &v, &err) == 1 && err.offset == 6,
            "parse: a length that cuts the text short is the end of input");
      free(buf);
    }
  }
  {
    /* a big array: the work list grows, every item in place */
    enum { N = 5000 };
    char *big = (char *)malloc(N * 6 + 3);
    if (big) {
      size_t n = 0, i;
      int ok;
      big[n++] = '[';
      for (i = 0; i < N; i++) n += (size_t)sprintf(big + n, "%s%lu", i ? "," : "", (unsigned long)i);
      big[n++] = ']';
      big[n] = '\0';
      ok = parse_ok(&a, big, &v, "parse: an array of 5000 numbers");
      CHECK(ok && v.u.table.count == N && v.u.table.pairs[N - 1].value.u.number.i == N - 1 &&
            v.u.table.pairs[N - 1].key.u.number.i == N, "parse: its last item is item 5000");
      free(big);
    }
  }
  stella_arena_free(&a);
}

static void test_parse_errors(void) {
  char deep_ok[2 * STELLA_JSON_MAX_DEPTH], deep_bad[STELLA_JSON_MAX_DEPTH + 1];
  int i;
  PARSE_FAILS("", "unexpected end of input", 0, 1, 1, "parse error: empty text");
  PARSE_FAILS("   ", "unexpected end of input", 3, 1, 4, "parse error: only whitespace");
  PARSE_FAILS("{\"customer\":", "unexpected end of input", 12, 1, 13, "parse error: cut after a key");
  PARSE_FAILS("[1,]", "unexpected character (expected a value)", 3, 1, 4, "parse error: trailing comma in an array");
  PARSE_FAILS("{\"a\":1,}", "unexpected character (expected a string key)", 7, 1, 8,
              "parse error: trailing comma in an object");
  PARSE_FAILS("{a:1}", "unexpected character (expected a string key)", 1, 1, 2, "parse error: unquoted key");
  PARSE_FAILS("{'a':1}", "unexpected character (expected a string key)", 1, 1, 2, "parse error: single quotes");
  PARSE_FAILS("{\"a\" 1}", "unexpected character (expected ':'", 5, 1, 6, "parse error: missing colon");
  PARSE_FAILS("[1 2]", "unexpected character (expected ',' or ']')", 3, 1, 4, "parse error: missing comma in an array");
  PARSE_FAILS("{\"a\":1 \"b\":2}", "unexpected character (expected ',' or '}')", 7, 1, 8,
              "parse error: missing comma in an object");
  PARSE_FAILS("[1}", "unexpected character (expected ',' or ']')", 2, 1, 3, "parse error: mismatched bracket");
  PARSE_FAILS("{\n  \"a\": tru\n}", "invalid literal", 9, 2, 8, "parse error: a misspelt literal, line 2");
  PARSE_FAILS("[nul", "unexpected end of input", 4, 1, 5, "parse error: a literal cut short");
  PARSE_FAILS("[NaN]", "unexpected character (expected a value)", 1, 1, 2, "parse error: NaN");
  PARSE_FAILS("[Infinity]", "unexpected character (expected a value)", 1, 1, 2, "parse error: Infinity");
  PARSE_FAILS("// c\n{}", "unexpected character (expected a value)", 0, 1, 1, "parse error: a // comment");
  PARSE_FAILS("{} /* c */", "trailing characters after the document", 3, 1, 4, "parse error: a trailing comment");
  PARSE_FAILS("{} x", "trailing characters after the document", 3, 1, 4, "parse error: trailing characters");
  PARSE_FAILS("{}{}", "trailing characters after the document", 2, 1, 3, "parse error: two documents");
  PARSE_FAILS("{}\0", "trailing characters after the document", 2, 1, 3, "parse error: a NUL after the document");
  PARSE_FAILS("\"abc", "unterminated string", 0, 1, 1, "parse error: unterminated string (at its quote)");
  PARSE_FAILS("[\"ab\\\"]", "unterminated string", 1, 1, 2, "parse error: an escaped quote does not end a string");
  PARSE_FAILS("[\"a\\", "unterminated string", 1, 1, 2, "parse error: a backslash at the end");
  PARSE_FAILS("[\"a\tb\"]", "control character in string", 3, 1, 4, "parse error: a raw tab in a string");
  PARSE_FAILS("{\"a\":\"x\ny\"}", "control character in string", 7, 1, 8, "parse error: a raw newline in a string");
  PARSE_FAILS("[\"\x1f\"]", "control character in string", 2, 1, 3, "parse error: U+001F raw in a string");
  PARSE_FAILS("[\"\\x\"]", "invalid escape", 2, 1, 3, "parse error: \\x is no escape");
  PARSE_FAILS("[\"\\'\"]", "invalid escape", 2, 1, 3, "parse error: \\' is no escape");
  PARSE_FAILS("[\"\\u12G4\"]", "invalid \\u escape", 2, 1, 3, "parse error: a \\u escape with a non-hex digit");
  PARSE_FAILS("[\"\\u12\"]", "invalid \\u escape", 2, 1, 3, "parse error: a short \\u escape");
  PARSE_FAILS("[\"\\ud800\\u12\"]", "invalid \\u escape", 8, 1, 9, "parse error: a bad escape after a high surrogate");
  PARSE_FAILS("[01]", "invalid number (leading zero)", 1, 1, 2, "parse error: leading zero");
  PARSE_FAILS("[-01]", "invalid number (leading zero)", 1, 1, 2, "parse error: leading zero after -");
  PARSE_FAILS("[-]", "invalid number", 1, 1, 2, "parse error: a lone minus");
  PARSE_FAILS("[1.]", "invalid number", 1, 1, 2, "parse error: no digit after the point");
  PARSE_FAILS("[.5]", "unexpected character (expected a value)", 1, 1, 2, "parse error: no digit before the point");
  PARSE_FAILS("[1e]", "invalid number", 1, 1, 2, "parse error: no digit in the exponent");
  PARSE_FAILS("[1e+]", "invalid number", 1, 1, 2, "parse error: a signed exponent without digits");
  PARSE_FAILS("[+1]", "unexpected character (expected a value)", 1, 1, 2, "parse error: a plus sign");
  PARSE_FAILS("[0x10]", "unexpected character (expected ',' or ']')", 2, 1, 3, "parse error: hexadecimal");
  PARSE_FAILS("-", "unexpected end of input", 1, 1, 2, "parse error: a minus at the end");
  PARSE_FAILS("\xef\xbb\xbf{}", "unexpected character (expected a value)", 0, 1, 1, "parse error: a byte order mark");
  PARSE_FAILS("[\"\xc3\xa9\", x]", "unexpected character (expected a value)", 7, 1, 7,
              "parse error: the column counts characters, not bytes");
  PARSE_FAILS("{\r\n\"a\":\n\n  @}", "unexpected character (expected a value)", 11, 4, 3,
              "parse error: line and column after CRLF and blank lines");

  /* depth: STELLA_JSON_MAX_DEPTH nested arrays pass, one more does not */
  for (i = 0; i < STELLA_JSON_MAX_DEPTH; i++) {
    deep_ok[i] = '[';
    deep_ok[2 * STELLA_JSON_MAX_DEPTH - 1 - i] = ']';
  }
  {
    stella_arena a;
    stella_value v;
    stella_parse_error err;
    stella_arena_init(&a);
    CHECK(stella_parse_json(&a, deep_ok, 2 * STELLA_JSON_MAX_DEPTH, &v, &err) == 0,
          "parse: 64 nested arrays are fine");
    stella_arena_free(&a);
  }
  for (i = 0; i <= STELLA_JSON_MAX_DEPTH; i++) deep_bad[i] = '[';
  parse_fails(deep_bad, STELLA_JSON_MAX_DEPTH + 1, "nesting too deep", STELLA_JSON_MAX_DEPTH, 1,
              STELLA_JSON_MAX_DEPTH + 1, "parse error: 65 nested arrays are too deep");
  {
    /* the same depth through objects: {"a":{"a":...}} */
    char *buf = (char *)malloc(6 * (STELLA_JSON_MAX_DEPTH + 1) + 1);
    if (buf) {
      size_t n = 0;
      for (i = 0; i <= STELLA_JSON_MAX_DEPTH; i++) {
        memcpy(buf + n, "{\"a\":", 5);
        n += 5;
      }
      parse_fails(buf, n, "nesting too deep", 5 * STELLA_JSON_MAX_DEPTH, 1, 5 * STELLA_JSON_MAX_DEPTH + 1,
                  "parse error: 65 nested objects are too deep");
      free(buf);
    }
  }
}

/* The one string of a one-string array. */
static const stella_value *only_string(stella_arena *a, const char *text, stella_value *doc,
                                       const char *desc) {
  if (!parse_ok(a, text, doc, desc)) return NULL;
  if (doc->type != STELLA_TABLE || doc->u.table.count != 1 ||
      doc->u.table.pairs[0].value.type != STELLA_STRING)
    return NULL;
  return &doc->u.table.pairs[0].value;
}

static void test_parse_strings(void) {
  /* want_len 0: strlen(want) */
  static const struct { const char *json, *want; size_t want_len; const char *desc; } cases[] = {
    { "[\"a\\\"b\\\\c\\/d\\b\\f\\n\\r\\t\"]", "a\"b\\c/d\b\f\n\r\t", 0, "escapes: the two-character ones" },
    { "[\"caf\\u00e9 \\u00E9\"]", "caf\xc3\xa9 \xc3\xa9", 0, "escapes: \\u00e9 in either case -> 2 bytes" },
    { "[\"\\u20ac\"]", "\xe2\x82\xac", 0, "escapes: \\u20ac -> 3 bytes" },
    { "[\"\\ud83d\\ude00!\"]", "\xf0\x9f\x98\x80!", 0, "escapes: a surrogate pair -> one 4-byte character" },
    { "[\"a\\u0000b\"]", "a\0b", 3, "escapes: \\u0000 is a NUL byte inside the string" },
    { "[\"\\u0041\\u007a\"]", "Az", 0, "escapes: ASCII through \\u" },
    { "[\"\\ud800\"]", "\xed\xa0\x80", 0, "escapes: a lone high surrogate keeps its (invalid) 3-byte form" },
    { "[\"\\udc00x\"]", "\xed\xb0\x80x", 0, "escapes: a lone low surrogate keeps its (invalid) 3-byte form" },
    { "[\"\\ud800\\u0041\"]", "\xed\xa0\x80" "A", 4, "escapes: a high surrogate followed by a non-surrogate" },
    { "[\"\\ude00\\ud83d\"]", "\xed\xb8\x80\xed\xa0\xbd", 0, "escapes: a reversed pair is two lone surrogates" },
    { "[\"raw \xff\xfe bytes\"]", "raw \xff\xfe bytes", 0, "bytes that are not UTF-8 pass through" },
  };
  stella_arena a;
  size_t i;
  stella_arena_init(&a);
  for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    stella_value doc;
    const stella_value *s = only_string(&a, cases[i].json, &doc, "escapes: parses");
    size_t n = cases[i].want_len ? cases[i].want_len : strlen(cases[i].want);
    if (!check(s != NULL && s->u.string.len == n && memcmp(s->u.string.ptr, cases[i].want, n) == 0,
               cases[i].desc)) {
      diag_bytes("got", s ? s->u.string.ptr : NULL, s ? s->u.string.len : 0);
      diag_bytes("expected", cases[i].want, n);
    }
  }
  {
    stella_value doc;
    const stella_value *s = only_string(&a, "[\"\\u00e9\"]", &doc, "escapes: decoded into the arena");
    CHECK(s && stella_utf8_valid(s->u.string.ptr, s->u.string.len), "escapes: \\u00e9 decodes to valid UTF-8");
    s = only_string(&a, "[\"\\ud800\"]", &doc, "escapes: a lone surrogate parses");
    CHECK(s && !stella_utf8_valid(s->u.string.ptr, s->u.string.len),
          "escapes: a lone surrogate is not valid UTF-8 (the validator reports it)");
  }
  stella_arena_free(&a);
}

/* The number of a one-number array. */
static int only_number(const char *text, stella_value *out) {
  stella_arena a;
  stella_value doc;
  stella_parse_error err;
  int ok;
  stella_arena_init(&a);
  ok = stella_parse_json(&a, text, strlen(text), &doc, &err) == 0 && doc.type == STELLA_TABLE &&
       doc.u.table.count == 1 && doc.u.table.pairs[0].value.type == STELLA_NUMBER;
  if (ok) *out = doc.u.table.pairs[0].value;
  stella_arena_free(&a);
  return ok;
}

static void number_is(const char *text, int is_int, long long i, double num, const char *desc) {
  stella_value v;
  int ok = only_number(text, &v);
  if (!check(ok && v.u.number.is_int == is_int && (!is_int || v.u.number.i == i) &&
             (v.u.number.num == num || (num != num && v.u.number.num != v.u.number.num)), desc)) {
    diag("text", text);
    if (ok) {
      diag_long("is_int", v.u.number.is_int);
      printf("#   i: %lld, num: %.17g\n", v.u.number.i, v.u.number.num);
    }
  }
}

static void test_parse_numbers(void) {
  number_is("[0]", 1, 0, 0.0, "number: 0");
  number_is("[-0]", 1, 0, 0.0, "number: -0 is the integer 0");
  number_is("[123456]", 1, 123456, 123456.0, "number: an integer");
  number_is("[-42]", 1, -42, -42.0, "number: a negative integer");
  number_is("[9223372036854775807]", 1, 9223372036854775807LL, 9223372036854775807.0,
            "number: LLONG_MAX is an exact integer");
  number_is("[-9223372036854775808]", 1, -9223372036854775807LL - 1, -9223372036854775808.0,
            "number: LLONG_MIN is an exact integer");
  number_is("[9007199254740993]", 1, 9007199254740993LL, 9007199254740992.0,
            "number: 2^53+1 keeps its exact integer value");
  number_is("[9223372036854775808]", 0, 0, 9223372036854775808.0,
            "number: past LLONG_MAX it is a double, not an integer");
  number_is("[123456789012345678901234567890]", 0, 0, 123456789012345678901234567890.0,
            "number: a 30-digit integer is a double");
  number_is("[1.5]", 0, 0, 1.5, "number: a fraction");
  number_is("[-0.25]", 0, 0, -0.25, "number: a negative fraction");
  number_is("[2.0]", 1, 2, 2.0, "number: 2.0 is integral (as a Lua float would be)");
  number_is("[1e3]", 1, 1000, 1000.0, "number: 1e3");
  number_is("[1E-2]", 0, 0, 0.01, "number: 1E-2");
  number_is("[-1.25e+2]", 1, -125, -125.0, "number: -1.25e+2");
  number_is("[0.1e1]", 1, 1, 1.0, "number: 0.1e1");
  number_is("[1e400]", 0, 0, HUGE_VAL, "number: 1e400 overflows to infinity (not an integer)");
  number_is("[1e-400]", 1, 0, 0.0, "number: 1e-400 underflows to 0");
  {
    /* a long fraction does not fit the stack buffer: still read in full */
    char text[300];
    size_t n = 0;
    text[n++] = '[';
    text[n++] = '0';
    text[n++] = '.';
    while (n < 250) text[n++] = '5';
    text[n++] = ']';
    text[n] = '\0';
    number_is(text, 0, 0, 5.0 / 9.0, "number: 247 digits after the point");
  }
}

/* strtod reads the locale's decimal point; the parser must not care. A locale with
 * a decimal comma is made with localedef when none is installed (LOCPATH). */
static void test_parse_locale(void) {
  static const char *const names[] = { "de_DE.UTF-8", "de_DE.utf8", "fr_FR.UTF-8", "de_DE", NULL };
  char dir[] = "/tmp/stella-locale-XXXXXX", cmd[512];
  const char *name = NULL;
  int made = 0, i;
  for (i = 0; names[i] && !name; i++)
    if (setlocale(LC_NUMERIC, names[i])) name = names[i];
  if (!name && mkdtemp(dir)) {
    made = 1;
    snprintf(cmd, sizeof cmd, "localedef -i de_DE -f UTF-8 %s/de_DE.UTF-8 >/dev/null 2>&1", dir);
    if (system(cmd) == 0) {
      setenv("LOCPATH", dir, 1);
      if (setlocale(LC_NUMERIC, "de_DE.UTF-8")) name = "de_DE.UTF-8";
    }
  }
  if (name && strcmp(localeconv()->decimal_point, ",") == 0) {
    stella_value v;
    CHECK(strtod("1.5", NULL) == 1.0, "locale: with a decimal comma, strtod stops at '.'");
    CHECK(only_number("[1.5]", &v) && v.u.number.num == 1.5, "locale: the parser still reads 1.5");
    CHECK(only_number("[-2.75e1]", &v) && v.u.number.num == -27.5, "locale: and -2.75e1");
  } else {
    printf("ok %d - # SKIP no locale with a decimal comma (localedef unavailable)\n", ++tests_run);
  }
  setlocale(LC_NUMERIC, "C");
  if (made) {
    unsetenv("LOCPATH");
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0) printf("# could not remove %s\n", dir);
  }
}

/* Parses `json` and validates it for `endpoint`; compares the (path, code) list. */
static void json_errors(stella_endpoint endpoint, const char *json, const expected_error *want, size_t n,
                        const char *desc) {
  stella_arena a;
  stella_value v;
  stella_parse_error perr;
  stella_violations errs;
  int rc;
  stella_arena_init(&a);
  rc = stella_parse_json(&a, json, strlen(json), &v, &perr);
  if (rc != 0) {
    check(0, desc);
    diag("parse error", perr.message);
  } else {
    rc = stella_validate(&a, endpoint, &v, NULL, &errs);
    check_errors(rc, &errs, want, n, desc);
  }
  stella_arena_free(&a);
}

#define REQ_HEAD "{\"customer\":{\"name\":\"Jane\",\"email\":\"jane@example.com\"}," \
                 "\"employee\":{\"email\":\"paul@example.com\"},\"channel\":\"phone\"," \
                 "\"ext_interaction_id\":\"1\""

static void test_parse_then_validate(void) {
  stella_arena a;
  stella_value v, t;
  stella_parse_error perr;
  stella_violations errs;
  stella_pair *extra;
  int rc;
  stella_arena_init(&a);

  /* parse -> validate -> encode gives back the canonical text */
  rc = stella_parse_json(&a, EXAMPLE_JSON, strlen(EXAMPLE_JSON), &v, &perr);
  if (check(rc == 0, "parse+validate: the example parses"))
    check_encodes(&a, STELLA_REQUEST, &v, EXAMPLE_JSON, "parse+validate: the example");
  json_errors(STELLA_REQUEST, REQ_HEAD ",\"tags\":[],\"custom_properties\":{}}", NULL, 0,
              "parse+validate: [] tags and {} custom_properties are fine");
  {
    static const expected_error want[] = { { "brand", "duplicate_field" } };
    json_errors(STELLA_REQUEST, REQ_HEAD ",\"brand\":\"a\",\"brand\":\"a\"}", want, 1,
                "parse+validate: a repeated field (even with the same value) -> duplicate_field");
  }
  {
    static const expected_error want[] = { { "customer.email", "duplicate_field" },
                                           { "channel", "duplicate_field" } };
    json_errors(STELLA_REQUEST,
                "{\"channel\":\"chat\",\"customer\":{\"name\":\"J\",\"email\":\"a@example.com\",\"email\":\"b@example.com\"},"
                "\"employee\":{\"email\":\"paul@example.com\"},\"channel\":\"phone\",\"ext_interaction_id\":\"1\"}",
                want, 2, "parse+validate: repeated fields at two levels, reported in schema order");
  }
  {
    static const expected_error want[] = { { "custom_properties.plan", "duplicate_field" } };
    json_errors(STELLA_REQUEST, REQ_HEAD ",\"custom_properties\":{\"plan\":\"a\",\"seats\":\"2\",\"plan\":\"b\"}}",
                want, 1, "parse+validate: a repeated custom property -> duplicate_field");
  }
  {
    static const expected_error want[] = { { "tags", "invalid_type" } };
    json_errors(STELLA_REQUEST, REQ_HEAD ",\"tags\":{}}", want, 1, "parse+validate: tags {} -> invalid_type");
    json_errors(STELLA_REQUEST, REQ_HEAD ",\"tags\":{\"1\":\"a\"}}", want, 1,
                "parse+validate: tags {\"1\":...} -> invalid_type");
  }
  {
    static const expected_error want[] = { { "custom_properties", "invalid_type" } };
    json_errors(STELLA_REQUEST, REQ_HEAD ",\"custom_properties\":[]}", want, 1,
                "parse+validate: custom_properties [] -> invalid_type");
    json_errors(STELLA_REQUEST, REQ_HEAD ",\"custom_properties\":[\"a\"]}", want, 1,
                "parse+validate: custom_properties [\"a\"] -> invalid_type");
  }
  {
    static const expected_error want[] = { { "customer", "invalid_type" } };
    json_errors(STELLA_REQUEST, "{\"customer\":[],\"employee\":{\"email\":\"p@example.com\"},"
                "\"channel\":\"phone\",\"ext_interaction_id\":1}", want, 1,
                "parse+validate: customer [] -> invalid_type");
  }
  {
    static const expected_error want[] = { { "employee", "invalid_type" } };
    json_errors(STELLA_RECOVERY, "{\"employee\":[],\"ext_interaction_id\":1}", want, 1,
                "parse+validate: a recovery's employee [] -> invalid_type");
  }
  {
    static const expected_error want[] = { { "", "invalid_type" } };
    json_errors(STELLA_REQUEST, "[]", want, 1, "parse+validate: a root [] -> invalid_type at the root");
  }
  {
    static const expected_error want[] = { { "tags[2]", "invalid_type" }, { "brand", "invalid_type" } };
    json_errors(STELLA_REQUEST, REQ_HEAD ",\"tags\":[\"a\",null],\"brand\":null}", want, 2,
                "parse+validate: null is a value of the wrong type, not an absent field");
  }
  {
    static const expected_error want[] = { { "customer.name", "invalid_utf8" } };
    json_errors(STELLA_REQUEST, "{\"customer\":{\"name\":\"Jos\xff\",\"email\":\"j@example.com\"},"
                "\"employee\":{\"email\":\"p@example.com\"},\"channel\":\"phone\",\"ext_interaction_id\":1}",
                want, 1, "parse+validate: a raw byte that is not UTF-8 -> invalid_utf8 at its field");
    json_errors(STELLA_REQUEST, "{\"customer\":{\"name\":\"Jos\\ud800\",\"email\":\"j@example.com\"},"
                "\"employee\":{\"email\":\"p@example.com\"},\"channel\":\"phone\",\"ext_interaction_id\":1}",
                want, 1, "parse+validate: a lone surrogate escape -> invalid_utf8 at its field");
  }
  {
    static const expected_error want[] = { { "customer.name", "control_character" } };
    json_errors(STELLA_REQUEST, "{\"customer\":{\"name\":\"Jo\\u0000s\",\"email\":\"j@example.com\"},"
                "\"employee\":{\"email\":\"p@example.com\"},\"channel\":\"phone\",\"ext_interaction_id\":1}",
                want, 1, "parse+validate: \\u0000 in a name -> control_character at its field");
  }
  {
    static const expected_error want[] = { { "tags[2]", "control_character" },
                                           { "custom_properties.a", "control_character" },
                                           { "custom_properties[?]", "invalid_key" } };
    json_errors(STELLA_REQUEST, REQ_HEAD ",\"tags\":[\"ok\",\"a\\u001fb\"],"
                "\"custom_properties\":{\"a\":\"x\\u0000\",\"b\\u0000c\":\"y\"}}", want, 3,
                "parse+validate: controls in a tag, a property value, a property name");
  }
  {
    static const expected_error want[] = { { "external_url", "invalid_url" } };
    json_errors(STELLA_REQUEST, REQ_HEAD ",\"external_url\":\"example.com/\\u0000\"}", want, 1,
                "parse+validate: NUL in external_url -> invalid_url");
  }
  {
    static const expected_error want[] = { { "ext_interaction_id", "invalid_type" } };
    json_errors(STELLA_REQUEST, "{\"customer\":{\"name\":\"J\",\"email\":\"j@example.com\"},"
                "\"employee\":{\"email\":\"p@example.com\"},\"channel\":\"phone\",\"ext_interaction_id\":1.5}",
                want, 1, "parse+validate: a fractional interaction id -> invalid_type");
    json_errors(STELLA_REQUEST, "{\"customer\":{\"name\":\"J\",\"email\":\"j@example.com\"},"
                "\"employee\":{\"email\":\"p@example.com\"},\"channel\":\"phone\",\"ext_interaction_id\":1e300}",
                want, 1, "parse+validate: 1e300 as an interaction id -> invalid_type");
  }

  /* messages name the JSON shapes */
  {
    static const char doc[] = REQ_HEAD ",\"tags\":{},\"brand\":[]}";
    rc = stella_parse_json(&a, doc, sizeof doc - 1, &v, &perr);
    rc = rc == 0 ? stella_validate(&a, STELLA_REQUEST, &v, NULL, &errs) : -1;
    CHECK(rc == 2 && strstr(errs.items[0].message, "got an object") != NULL,
          "parse+validate: a message says \"got an object\"");
    CHECK(rc == 2 && strstr(errs.items[1].message, "got an array") != NULL,
          "parse+validate: a message says \"got an array\"");
  }

  /* a table built in C (shape ANY) stays what it was: {} fits both */
  extra = make_request(&a, &v, 2);
  stella_table(&a, &t, 0);
  member(&extra[0], "tags", t);
  member(&extra[1], "custom_properties", t);
  rc = stella_validate(&a, STELLA_REQUEST, &v, NULL, &errs);
  CHECK(rc == 0 && t.u.table.shape == STELLA_SHAPE_ANY,
        "validate: an empty table of unknown shape is fine as tags and as custom_properties");
  stella_arena_free(&a);
}

/* ---------- main ------------------------------------------------------------------------ */

/* Inputs only a C caller (or a parsed document) can build: huge sizes,
 * repeated sequence keys, repeated field names. */
static void test_hostile_inputs(void) {
  stella_arena a;
  stella_value req, tags;
  stella_pair *extra, *p;
  stella_violations errs;
  int rc;
  stella_arena_init(&a);
  CHECK(stella_arena_alloc(&a, (size_t)-1) == NULL, "arena: SIZE_MAX is refused, not wrapped");
  CHECK(stella_arena_alloc(&a, (size_t)-1 - 40) == NULL, "arena: SIZE_MAX-40 is refused");

  extra = make_request(&a, &req, 1);
  p = stella_table(&a, &tags, 2);
  item(&p[0], 1, stella_cstring("a"));
  item(&p[1], 1, stella_cstring("b"));
  member(&extra[0], "tags", tags);
  rc = stella_validate(&a, STELLA_REQUEST, &req, NULL, &errs);
  CHECK(rc == 1 && strcmp(errs.items[0].code, "not_a_sequence") == 0,
        "tags with keys 1,1 -> not_a_sequence (no crash)");

  extra = make_request(&a, &req, 2);
  member(&extra[0], "brand", stella_cstring("acme"));
  member(&extra[1], "brand", stella_int(5));
  rc = stella_validate(&a, STELLA_REQUEST, &req, NULL, &errs);
  CHECK(rc == 1 && strcmp(errs.items[0].code, "duplicate_field") == 0 &&
        strcmp(errs.items[0].path, "brand") == 0, "a field given twice -> duplicate_field");
  stella_arena_free(&a);
}

/* What stella.core.decode_json (lstella_decode.c) relies on: repeated keys kept in
 * document order; an unescaped key points into the text just after its opening quote
 * (its position for the error), an escaped one does not; an integer literal past 2^53
 * stays an exact integer while an exponent form past 2^53 is no integer. */
static void test_parse_for_decode(void) {
  static const char text[] = "{\"channel\": \"a\", \"x\": 1e16, \"channel\": 9007199254740993, \"\\u0061\": 0}";
  stella_arena a;
  stella_value v;
  stella_arena_init(&a);
  if (parse_ok(&a, text, &v, "decode: a document with a repeated key parses")) {
    const stella_pair *p = v.u.table.pairs;
    CHECK(v.u.table.count == 4 && v.u.table.shape == STELLA_SHAPE_OBJECT,
          "decode: all four members are kept, as an object");
    CHECK(p[0].key.u.string.ptr == text + 2 && p[2].key.u.string.ptr == text + 29,
          "decode: unescaped keys point into the text after their quote");
    CHECK(p[2].key.u.string.len == 7 && memcmp(p[2].key.u.string.ptr, "channel", 7) == 0,
          "decode: the repeated key comes third, in document order");
    CHECK(p[3].key.u.string.len == 1 && p[3].key.u.string.ptr[0] == 'a' &&
          !(p[3].key.u.string.ptr >= text && p[3].key.u.string.ptr < text + sizeof text),
          "decode: an escaped key is decoded outside the text");
    CHECK(p[1].value.type == STELLA_NUMBER && !p[1].value.u.number.is_int,
          "decode: 1e16 (past 2^53, with an exponent) is not an integer");
    CHECK(p[2].value.type == STELLA_NUMBER && p[2].value.u.number.is_int &&
          p[2].value.u.number.i == 9007199254740993LL,
          "decode: 2^53+1 written as an integer is exact");
  }
  stella_arena_free(&a);
}

/* stella_check_json: the validator's answer for JSON text and the values at dotted paths */
static void test_check_json(void) {
  static const char *const paths[] = { "customer.email", "employee.email", "channel", "ext_interaction_id",
                                       "do_not_send", "customer", "brand", "customer.name", "", "customer.x.y",
                                       "tags" };
  static const char text[] =
      "{\"customer\":{\"name\":\"Jo\\u00e9 \\\"Q\\\"\",\"email\":\"Jo@Example.COM\"},"
      "\"employee\":{\"email\":\"paul@example.com\"},\"channel\":\"phone\",\"ext_interaction_id\":123456,"
      "\"do_not_send\":false,\"tags\":[\"a\"]}";
  stella_field f[11];
  stella_checker *c = stella_checker_new();
  int rc;
  if (!check(c != NULL, "check_json: a checker")) return;
  rc = stella_check_json(c, STELLA_REQUEST, text, strlen(text), paths, 11, f);
  if (check(rc == 1, "check_json: a valid request -> 1")) {
    check(f[0].type == STELLA_STRING && f[0].len == 14 && memcmp(f[0].ptr, "Jo@Example.COM", 14) == 0 &&
          f[0].upper == 1,
          "check_json: a string, its capital letters noticed");
    check(f[1].type == STELLA_STRING && f[1].len == 16 && memcmp(f[1].ptr, "paul@example.com", 16) == 0 &&
          f[1].upper == 0, "check_json: a nested string without capitals");
    check(f[1].ptr > text && f[1].ptr < text + sizeof text, "check_json: an unescaped string points into the text");
    check(f[2].type == STELLA_STRING && f[2].len == 5, "check_json: a top-level string");
    check(f[3].type == STELLA_NUMBER && f[3].is_int && f[3].i == 123456 && f[3].num == 123456.0,
          "check_json: an integer");
    check(f[4].type == STELLA_BOOL && f[4].boolean == 0, "check_json: false");
    check(f[5].type == STELLA_TABLE, "check_json: an object");
    check(f[6].type == STELLA_NIL, "check_json: an absent member");
    check(f[7].type == STELLA_STRING && f[7].len == 8 && memcmp(f[7].ptr, "Jo\xc3\xa9 \"Q\"", 8) == 0 &&
          f[7].upper == 1, "check_json: an escaped string, decoded");
    check(f[8].type == STELLA_NIL && f[9].type == STELLA_NIL, "check_json: no member, or a path through a string");
    check(f[10].type == STELLA_TABLE, "check_json: an array");
  }
  {
    /* a control character given as an escape is still one (the decoded string is not in
     * the text): in a field, a property's name and a property's value */
    static const char *const bad[] = {
      REQ_HEAD ",\"brand\":\"a\\u0001b\"}",
      REQ_HEAD ",\"custom_properties\":{\"k\\u0000\":\"v\"}}",
      REQ_HEAD ",\"custom_properties\":{\"k\":\"v\\u001f\"}}",
    };
    size_t k;
    for (k = 0; k < sizeof bad / sizeof bad[0]; k++) {
      stella_arena a;
      stella_value v;
      stella_parse_error perr;
      stella_violations errs;
      stella_arena_init(&a);
      check(stella_check_json(c, STELLA_REQUEST, bad[k], strlen(bad[k]), paths, 1, f) == 0,
            "check_json: an escaped control character -> 0");
      check(stella_parse_json(&a, bad[k], strlen(bad[k]), &v, &perr) == 0 &&
            stella_validate(&a, STELLA_REQUEST, &v, NULL, &errs) == 1 && errs.count == 1 &&
            (strcmp(errs.items[0].code, "control_character") == 0 || strcmp(errs.items[0].code, "invalid_key") == 0),
            "check_json: ... which stella_validate reports");
      stella_arena_free(&a);
    }
  }
  rc = stella_check_json(c, STELLA_REQUEST, "{\"channel\":\"phone\"}", 19, paths, 1, f);
  check(rc == 0, "check_json: a request missing its required fields -> 0");
  rc = stella_check_json(c, STELLA_REQUEST, "{\"channel\":", 11, paths, 1, f);
  check(rc == 0, "check_json: not JSON -> 0");
  rc = stella_check_json(c, STELLA_RECOVERY, EXAMPLE_JSON, strlen(EXAMPLE_JSON), paths, 0, NULL);
  check(rc == 0, "check_json: a request is no recovery -> 0");
  rc = stella_check_json(c, STELLA_REQUEST, EXAMPLE_JSON, strlen(EXAMPLE_JSON), NULL, 0, NULL);
  check(rc == 1, "check_json: no paths -> 1 for a valid request");
  check(stella_check_json(NULL, STELLA_REQUEST, EXAMPLE_JSON, 2, paths, 1, f) == -1 &&
        stella_check_json(c, STELLA_REQUEST, NULL, 0, paths, 1, f) == -1 &&
        stella_check_json(c, STELLA_REQUEST, EXAMPLE_JSON, strlen(EXAMPLE_JSON), NULL, 1, f) == -1,
        "check_json: NULL arguments -> -1");
  stella_checker_free(c);
  stella_checker_free(NULL);
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  printf("# lua-stella C core %s\n", STELLA_VERSION);
  test_arena();
  test_buffer_and_builders();
  test_encode_by_hand();
  test_json_escaping();
  test_validation_errors();
  test_utf8();
  test_email();
  test_codes();
  test_outcomes();
  test_option_checks();
  test_retry_delay();
  test_parse_retry_after();
  test_http_new();
  test_http_post();
  test_http_start_step();
  test_sender();
  test_sender_appendable();
  test_sender_loop();
  test_short_slice();
  test_hostile_inputs();
  test_parse_valid();
  test_parse_errors();
  test_parse_strings();
  test_parse_numbers();
  test_parse_locale();
  test_parse_then_validate();
  test_parse_for_decode();
  test_check_json();
  printf("1..%d\n", tests_run);
  if (tests_failed) printf("# %d of %d checks failed\n", tests_failed, tests_run);
  return tests_failed ? 1 : 0;
}
