/* check_json.c - the properties behind the JSON fuzzers (see check_json.h). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "check_json.h"

/* ---------- parse ---------------------------------------------------------------- */

/* A well-formed tree: objects keyed by strings, arrays keyed 1..n in order, no NIL
 * (the parser never makes one), no deeper than the parser's limit. */
static int well_formed(const stella_value *v, int depth) {
  size_t i;
  if (v->type == STELLA_NIL || v->type == STELLA_OTHER) return 0;
  if (v->type == STELLA_STRING) return v->u.string.ptr != NULL || v->u.string.len == 0;
  if (v->type != STELLA_TABLE) return 1;
  if (depth > STELLA_JSON_MAX_DEPTH) return 0;
  if (v->u.table.count && v->u.table.pairs == NULL) return 0;
  for (i = 0; i < v->u.table.count; i++) {
    const stella_pair *p = &v->u.table.pairs[i];
    if (v->u.table.shape == STELLA_SHAPE_OBJECT) {
      if (p->key.type != STELLA_STRING) return 0;
    } else if (v->u.table.shape == STELLA_SHAPE_ARRAY) {
      if (p->key.type != STELLA_NUMBER || !p->key.u.number.is_int ||
          p->key.u.number.i != (long long)(i + 1))
        return 0;
    } else {
      return 0;
    }
    if (!well_formed(&p->value, depth + 1)) return 0;
  }
  return 1;
}

const char *check_parse(stella_arena *a, const char *text, size_t len, stella_value *out, int *rc) {
  stella_parse_error pe;
  size_t i, line = 1, column = 1;
  *rc = stella_parse_json(a, text, len, out, &pe);
  if (*rc < 0) return "parse: out of memory";
  if (*rc == 0) return well_formed(out, 1) ? NULL : "parse: a document that is not a well-formed value tree";
  if (pe.message == NULL || pe.message[0] == '\0') return "parse: a syntax error without a message";
  if (pe.offset > len) return "parse: a syntax error with an offset outside the text";
  for (i = 0; i < pe.offset; i++) {   /* lines by '\n', columns by UTF-8 lead bytes */
    if (text[i] == '\n') { line++; column = 1; }
    else if (((unsigned char)text[i] & 0xC0) != 0x80) column++;
  }
  if (pe.line != line || pe.column != column)
    return "parse: a syntax error whose line:column does not match its offset";
  return NULL;
}

/* ---------- plain JSON writer and exact comparison (for check_rewrite) ------------ */

static void add(stella_buffer *b, const char *s) { stella_buffer_add(b, s, strlen(s)); }

static void write_string(stella_buffer *b, const char *s, size_t len) {
  size_t i;
  char u[8];
  add(b, "\"");
  for (i = 0; i < len; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (ch == '"' || ch == '\\' || ch < 0x20) {
      snprintf(u, sizeof u, "\\u%04x", ch);
      add(b, u);
    } else {
      stella_buffer_add(b, s + i, 1);   /* other bytes as they are, UTF-8 or not */
    }
  }
  add(b, "\"");
}

static void write_value(stella_buffer *b, const stella_value *v) {
  char num[64];
  size_t i;
  switch (v->type) {
    case STELLA_BOOL: add(b, v->u.boolean ? "true" : "false"); break;
    case STELLA_NUMBER:
      if (v->u.number.is_int) snprintf(num, sizeof num, "%lld", v->u.number.i);
      else if (isinf(v->u.number.num)) snprintf(num, sizeof num, "%s1e999", v->u.number.num < 0 ? "-" : "");
      else {   /* exact for a double; with a '.' or 'e' so that it reads as one again */
        snprintf(num, sizeof num, "%.17g", v->u.number.num);
        if (strpbrk(num, ".e") == NULL) strcat(num, ".0");
      }
      add(b, num);
      break;
    case STELLA_STRING: write_string(b, v->u.string.ptr, v->u.string.len); break;
    case STELLA_TABLE:
      add(b, v->u.table.shape == STELLA_SHAPE_OBJECT ? "{" : "[");
      for (i = 0; i < v->u.table.count; i++) {
        if (i) add(b, ",");
        if (v->u.table.shape == STELLA_SHAPE_OBJECT) {
          write_value(b, &v->u.table.pairs[i].key);
          add(b, ":");
        }
        write_value(b, &v->u.table.pairs[i].value);
      }
      add(b, v->u.table.shape == STELLA_SHAPE_OBJECT ? "}" : "]");
      break;
    default: add(b, "null"); break;
  }
}

static int same_value(const stella_value *x, const stella_value *y) {
  size_t i;
  if (x->type != y->type) return 0;
  switch (x->type) {
    case STELLA_BOOL: return !x->u.boolean == !y->u.boolean;
    case STELLA_NUMBER:
      if (x->u.number.is_int != y->u.number.is_int) return 0;
      return x->u.number.is_int ? x->u.number.i == y->u.number.i
                                : x->u.number.num == y->u.number.num;
    case STELLA_STRING:
      return x->u.string.len == y->u.string.len &&
             (x->u.string.len == 0 || memcmp(x->u.string.ptr, y->u.string.ptr, x->u.string.len) == 0);
    case STELLA_TABLE:
      if (x->u.table.shape != y->u.table.shape || x->u.table.count != y->u.table.count) return 0;
      for (i = 0; i < x->u.table.count; i++)
        if (!same_value(&x->u.table.pairs[i].key, &y->u.table.pairs[i].key) ||
            !same_value(&x->u.table.pairs[i].value, &y->u.table.pairs[i].value))
          return 0;
      return 1;
    default: return 1;
  }
}

const char *check_rewrite(stella_arena *a, const stella_value *doc, stella_buffer *scratch) {
  stella_value again;
  stella_parse_error pe;
  scratch->len = 0;
  write_value(scratch, doc);
  if (scratch->oom) return "rewrite: out of memory";
  if (stella_parse_json(a, scratch->data, scratch->len, &again, &pe) != 0)
    return "rewrite: a parsed document, written back as JSON, does not parse";
  if (!same_value(doc, &again))
    return "rewrite: a parsed document, written back as JSON, parses to a different tree";
  return NULL;
}

/* ---------- validate -> encode -> parse ------------------------------------------- */

/* A number the encoder wrote as a string: integers exactly (compared with printf's
 * decimal), others to the 14 significant digits it keeps. */
static int same_number_text(const stella_value *n, const stella_value *s) {
  char want[64], got[64];
  double back;
  if (s->u.string.len >= sizeof got) return 0;
  if (n->u.number.is_int) {
    snprintf(want, sizeof want, "%lld", n->u.number.i);
    return strlen(want) == s->u.string.len && memcmp(want, s->u.string.ptr, s->u.string.len) == 0;
  }
  memcpy(got, s->u.string.ptr, s->u.string.len);
  got[s->u.string.len] = '\0';
  back = strtod(got, NULL);
  if (isinf(n->u.number.num)) return back == n->u.number.num;
  return fabs(back - n->u.number.num) <= 1e-13 * fabs(n->u.number.num);
}

static const stella_value *member(const stella_value *obj, const stella_value *key) {
  size_t i;
  for (i = 0; i < obj->u.table.count; i++)
    if (same_value(&obj->u.table.pairs[i].key, key)) return &obj->u.table.pairs[i].value;
  return NULL;
}

/* `orig` (a valid document) against `back` (its encoding, parsed): the same members
 * in any order, arrays in order, numbers as their strings. */
static int same_canonical(const stella_value *orig, const stella_value *back) {
  size_t i;
  if (orig->type == STELLA_NUMBER)
    return back->type == STELLA_STRING && same_number_text(orig, back);
  if (orig->type != STELLA_TABLE || orig->u.table.shape == STELLA_SHAPE_ARRAY) {
    if (orig->type != back->type) return 0;
    if (orig->type != STELLA_TABLE) return same_value(orig, back);
  }
  if (back->type != STELLA_TABLE || back->u.table.shape != orig->u.table.shape ||
      back->u.table.count != orig->u.table.count)
    return 0;
  for (i = 0; i < orig->u.table.count; i++) {
    const stella_pair *p = &orig->u.table.pairs[i];
    const stella_value *v = orig->u.table.shape == STELLA_SHAPE_ARRAY
                            ? &back->u.table.pairs[i].value : member(back, &p->key);
    if (v == NULL || !same_canonical(&p->value, v)) return 0;
  }
  return 1;
}

static const char *check_errors(const stella_violations *errs, int n) {
  size_t i;
  if (errs->oom) return "validate: out of memory";
  if (n < 0 || (size_t)n != errs->count) return "validate: the result is not the number of errors listed";
  for (i = 0; i < errs->count; i++) {
    const stella_violation *e = &errs->items[i];
    if (e->path == NULL || e->code == NULL || e->code[0] == '\0' || e->message == NULL ||
        e->message[0] == '\0')
      return "validate: an error without a path, a code or a message";
  }
  return NULL;
}

const char *check_roundtrip(stella_arena *a, stella_endpoint endpoint, const stella_value *doc,
                            stella_buffer *scratch, int *valid) {
  stella_violations errs;
  stella_value back;
  stella_parse_error pe;
  stella_buffer again;
  const char *why;
  size_t first_len;
  int n;
  memset(&errs, 0, sizeof errs);
  n = stella_validate(a, endpoint, doc, NULL, &errs);
  *valid = n == 0;
  if ((why = check_errors(&errs, n)) != NULL || n != 0) return why;
  scratch->len = 0;
  if (stella_encode_json(endpoint, doc, scratch) != 0) return "encode: a valid document does not encode";
  first_len = scratch->len;
  if (stella_parse_json(a, scratch->data, first_len, &back, &pe) != 0)
    return "encode: the encoding of a valid document does not parse";
  if (!same_canonical(doc, &back))
    return "encode: the encoding of a valid document parses to a different document";
  memset(&errs, 0, sizeof errs);
  n = stella_validate(a, endpoint, &back, NULL, &errs);
  if ((why = check_errors(&errs, n)) != NULL) return why;
  if (n != 0) return "encode: the encoding of a valid document does not validate";
  stella_buffer_init(&again);
  why = stella_encode_json(endpoint, &back, &again) != 0 ? "encode: out of memory"
      : again.len != first_len || memcmp(again.data, scratch->data, first_len) != 0
        ? "encode: encoding the encoding again gives other bytes (not canonical)" : NULL;
  stella_buffer_free(&again);
  return why;
}

const char *check_checker(stella_checker *c, stella_endpoint endpoint, const char *text, size_t len,
                          int valid) {
  static const char *const paths[] = { "customer.email", "employee", "ext_interaction_id", "do_not_send",
                                       "custom_properties.seats", "tags", "initial_feedback_request_id",
                                       "customer.name.x", "" };
  stella_field f[sizeof paths / sizeof paths[0]];
  size_t i;
  int rc = stella_check_json(c, (int)endpoint, text, len, paths, sizeof paths / sizeof paths[0], f);
  if (rc < 0) return "check_json: out of memory";
  if (rc != (valid ? 1 : 0)) return "check_json: another answer than parse + validate";
  for (i = 0; rc == 1 && i < sizeof paths / sizeof paths[0]; i++) {
    if (f[i].type != STELLA_NIL && f[i].type != STELLA_BOOL && f[i].type != STELLA_NUMBER &&
        f[i].type != STELLA_STRING && f[i].type != STELLA_TABLE)
      return "check_json: a value of an unknown type";
    if (f[i].type == STELLA_STRING && f[i].ptr == NULL) return "check_json: a string without its bytes";
    if (f[i].type == STELLA_STRING && f[i].len > len) return "check_json: a string longer than the text";
  }
  return NULL;
}
