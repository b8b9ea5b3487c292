/* stella_validate.c - checks a value tree against the Requests API schema,
 * collecting every problem (path, code, message) in a stable order. */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "stella_schema.h"

typedef struct ctx {
  stella_arena *arena;
  stella_violations *errors;
  const stella_options *opts;
  /* the JSON text the document was parsed from, or 0, 0: a string pointing into it was
   * not escaped there, and strict JSON holds no raw byte below 0x20 (the parser refuses
   * one), so it needs no search for control characters (see stella_validate_parsed) */
  uintptr_t text, text_end;
} ctx;

/* A path is only turned into text when an error is reported: valid input
 * costs no formatting at all. */
typedef struct path {
  const struct path *parent;
  const char *name;      /* field or property name (len bytes), or NULL */
  size_t len;
  size_t index;          /* 1-based sequence index when name == NULL */
  const char *text;      /* already rendered (odd keys), or NULL */
} path;

static path field_path(const path *parent, const char *name, size_t len) {
  path p;
  p.parent = parent; p.name = name; p.len = len; p.index = 0; p.text = NULL;
  return p;
}

static path index_path(const path *parent, size_t index) {
  path p;
  p.parent = parent; p.name = NULL; p.len = 0; p.index = index; p.text = NULL;
  return p;
}

/* ---------- error list ----------------------------------------------------- */

static char *fmt(ctx *c, const char *f, ...) {
  va_list ap;
  int n;
  char *s;
  va_start(ap, f);
  n = vsnprintf(NULL, 0, f, ap);
  va_end(ap);
  if (n < 0) return NULL;
  s = (char *)stella_arena_alloc(c->arena, (size_t)n + 1);
  if (s == NULL) return NULL;
  va_start(ap, f);
  vsnprintf(s, (size_t)n + 1, f, ap);
  va_end(ap);
  return s;
}

static const char *render(ctx *c, const path *p) {
  const char *parent;
  if (p == NULL) return "";
  if (p->text) return p->text;
  parent = render(c, p->parent);
  if (parent == NULL) return NULL;
  if (p->name == NULL && p->parent == NULL) return "";
  if (p->name == NULL) return fmt(c, "%s[%lu]", parent, (unsigned long)p->index);
  if (parent[0] == '\0') return fmt(c, "%.*s", (int)p->len, p->name);
  return fmt(c, "%s.%.*s", parent, (int)p->len, p->name);
}

static void add_error_text(ctx *c, const char *path_text, const char *code, const char *message) {
  stella_violations *e = c->errors;
  if (path_text == NULL || message == NULL) { e->oom = 1; return; }
  if (e->count == e->cap) {
    size_t ncap = e->cap ? e->cap * 2 : 8;
    stella_violation *items = (stella_violation *)stella_arena_alloc(c->arena, ncap * sizeof *items);
    if (items == NULL) { e->oom = 1; return; }
    if (e->count) memcpy(items, e->items, e->count * sizeof *items);
    e->items = items;
    e->cap = ncap;
  }
  e->items[e->count].path = path_text;
  e->items[e->count].code = code;
  e->items[e->count].message = message;
  e->count++;
}

/* report(c, p, code, "must not be empty") -> message "customer.name must not be empty" */
static void report(ctx *c, const path *p, const char *code, const char *f, ...) {
  const char *ps = render(c, p);
  char *rest, *msg = NULL;
  va_list ap;
  int n;
  if (ps == NULL) { c->errors->oom = 1; return; }
  va_start(ap, f);
  n = vsnprintf(NULL, 0, f, ap);
  va_end(ap);
  if (n >= 0 && (rest = (char *)stella_arena_alloc(c->arena, (size_t)n + 1)) != NULL) {
    va_start(ap, f);
    vsnprintf(rest, (size_t)n + 1, f, ap);
    va_end(ap);
    msg = fmt(c, "%s%s%s", ps, rest[0] == ':' ? "" : " ", rest);
  }
  add_error_text(c, ps, code, msg);
}

static const char *type_name(const stella_value *v) {
  switch (v->type) {
    case STELLA_NIL: return "nil";
    case STELLA_BOOL: return "a boolean";
    case STELLA_NUMBER: return v->u.number.is_int ? "an integer" : "a number";
    case STELLA_STRING: return "a string";
    case STELLA_TABLE:
      return v->u.table.shape == STELLA_SHAPE_OBJECT ? "an object"
           : v->u.table.shape == STELLA_SHAPE_ARRAY ? "an array" : "a table";
    case STELLA_NULL: return "null";
    default: return "an unsupported value";
  }
}

/* A short, printable echo of a value for messages about codes and channels
 * (never used for e-mails or names). */
static int printable_short(const stella_value *v) {
  size_t i;
  if (v->type != STELLA_STRING || v->u.string.len > 32) return 0;
  for (i = 0; i < v->u.string.len; i++) {
    unsigned char ch = (unsigned char)v->u.string.ptr[i];
    if (ch < 0x21 || ch > 0x7E || ch == '"' || ch == '\\') return 0;
  }
  return 1;
}

/* ---------- scalar checks --------------------------------------------------- */

/* The offset of the first C0 control character other than tab, line feed and carriage
 * return (NUL included) in str, or len when there is none. Eight bytes at a time while
 * no byte is below 0x20. */
size_t stella_find_control(const char *str, size_t len) {
  const unsigned char *s = (const unsigned char *)str;
  size_t i = 0;
  while (len - i >= 8) {
    const uint64_t ones = UINT64_C(0x0101010101010101), highs = UINT64_C(0x8080808080808080);
    uint64_t w;
    memcpy(&w, s + i, 8);
    if ((w - ones * 0x20) & ~w & highs) break;   /* some byte < 0x20 */
    i += 8;
  }
  for (; i < len; i++)
    if (s[i] < 0x20 && s[i] != '\t' && s[i] != '\n' && s[i] != '\r') return i;
  return len;
}

/* Reports a control character in a text field; returns 0 if there is one. NUL is named:
 * C strings, databases and the service's own stack may cut the text there. */
/* stella_find_control, or len at once for a string of the parsed text (see ctx) */
static size_t find_control(const ctx *c, const char *s, size_t len) {
  uintptr_t at = (uintptr_t)s;
  if (at >= c->text && at < c->text_end && len <= c->text_end - at) return len;
  return stella_find_control(s, len);
}

static int check_controls(ctx *c, const path *p, const stella_value *v) {
  size_t at = find_control(c, v->u.string.ptr, v->u.string.len);
  unsigned char ch;
  if (at == v->u.string.len) return 1;
  ch = (unsigned char)v->u.string.ptr[at];
  if (ch == 0)
    report(c, p, "control_character", "contains a NUL character (U+0000) at byte %lu",
           (unsigned long)at + 1);
  else
    report(c, p, "control_character",
           "contains the control character U+%04X at byte %lu (of the C0 controls only tab, "
           "line feed and carriage return are allowed)", (unsigned)ch, (unsigned long)at + 1);
  return 0;
}

/* Checks that v is a non-empty, valid UTF-8 string; reports and returns 0 if not.
 * (check_text also refuses control characters.) */
static int check_text_bytes(ctx *c, const path *p, const stella_value *v, int allow_empty) {
  if (v->type != STELLA_STRING) {
    report(c, p, "invalid_type", "must be a string, got %s", type_name(v));
    return 0;
  }
  if (!allow_empty && v->u.string.len == 0) {
    report(c, p, "empty", "must not be empty");
    return 0;
  }
  if (!stella_utf8_valid(v->u.string.ptr, v->u.string.len)) {
    report(c, p, "invalid_utf8", "is not valid UTF-8");
    return 0;
  }
  return 1;
}

static int check_text(ctx *c, const path *p, const stella_value *v, int allow_empty) {
  return check_text_bytes(c, p, v, allow_empty) && check_controls(c, p, v);
}

/* A custom property name: a non-empty UTF-8 string without control characters. */
static int prop_name_valid(const ctx *c, const stella_value *key) {
  return key->type == STELLA_STRING && key->u.string.len > 0 &&
         stella_utf8_valid(key->u.string.ptr, key->u.string.len) &&
         find_control(c, key->u.string.ptr, key->u.string.len) == key->u.string.len;
}

static void check_max_chars(ctx *c, const path *p, const stella_value *v) {
  size_t chars;
  if (v->u.string.len <= STELLA_MAX_TEXT_CHARS) return;   /* bytes >= chars */
  chars = stella_utf8_length(v->u.string.ptr, v->u.string.len);
  if (chars > STELLA_MAX_TEXT_CHARS)
    report(c, p, "too_long", "has %lu characters; at most %d are kept by the service",
           (unsigned long)chars, STELLA_MAX_TEXT_CHARS);
}

static void check_email(ctx *c, const path *p, const stella_value *v) {
  if (!check_text(c, p, v, 0)) return;
  if (v->u.string.len > STELLA_MAX_EMAIL_BYTES)
    report(c, p, "too_long", "is %lu bytes long; an e-mail address has at most %d",
           (unsigned long)v->u.string.len, STELLA_MAX_EMAIL_BYTES);
  else if (!stella_email_valid(v->u.string.ptr, v->u.string.len))
    report(c, p, "invalid_email", "is not a valid e-mail address (expected local@domain)");
}

static void check_id(ctx *c, const path *p, const stella_value *v) {
  if (v->type == STELLA_NUMBER) {
    if (!v->u.number.is_int)
      report(c, p, "invalid_type", "must be a string or an integer, got a non-integral number");
    return;
  }
  if (v->type != STELLA_STRING) {
    report(c, p, "invalid_type", "must be a string or an integer, got %s", type_name(v));
    return;
  }
  check_text(c, p, v, 0);
}

/* Whitespace or control: ASCII controls, space, DEL, C1 controls (U+0080-U+009F),
 * NBSP, U+1680, U+2000-U+200A, U+2028/9, U+202F, U+205F, U+3000, U+FEFF. */
int stella_has_space_or_control(const char *str, size_t len) {
  const unsigned char *s = (const unsigned char *)str;
  size_t i = 0;
  /* plain ASCII (0x21-0x7E) eight bytes at a time: a byte below 0x21, 0x7F or any
   * byte from 0x80 up sends the word to the byte checks */
  while (len - i >= 8) {
    const uint64_t ones = UINT64_C(0x0101010101010101), highs = UINT64_C(0x8080808080808080);
    uint64_t w;
    memcpy(&w, s + i, 8);
    if ((((w - ones * 0x21) | ((w ^ (ones * 0x7F)) - ones)) & ~w & highs) | (w & highs)) break;
    i += 8;
  }
  for (; i < len; i++) {
    unsigned char ch = s[i];
    if (ch <= 0x20 || ch == 0x7F) return 1;
    if (ch == 0xC2 && i + 1 < len && (s[i + 1] <= 0x9F || s[i + 1] == 0xA0)) return 1;
    if (ch == 0xE1 && i + 2 < len && s[i + 1] == 0x9A && s[i + 2] == 0x80) return 1;
    if (ch == 0xE2 && i + 2 < len) {
      unsigned char b1 = s[i + 1], b2 = s[i + 2];
      if (b1 == 0x80 && (b2 <= 0x8A || b2 == 0xA8 || b2 == 0xA9 || b2 == 0xAF)) return 1;
      if (b1 == 0x81 && b2 == 0x9F) return 1;
    }
    if (ch == 0xE3 && i + 2 < len && s[i + 1] == 0x80 && s[i + 2] == 0x80) return 1;
    if (ch == 0xEF && i + 2 < len && s[i + 1] == 0xBB && s[i + 2] == 0xBF) return 1;
  }
  return 0;
}

static void check_url(ctx *c, const path *p, const stella_value *v) {
  if (!check_text_bytes(c, p, v, 0)) return;   /* controls: invalid_url below */
  if (stella_has_space_or_control(v->u.string.ptr, v->u.string.len))
    report(c, p, "invalid_url", "must not contain whitespace or control characters");
}

static void check_channel(ctx *c, const path *p, const stella_value *v) {
  const stella_options *o = c->opts;
  size_t i;
  if (!check_text(c, p, v, 0)) return;
  if (o == NULL || o->channels == NULL) return;
  for (i = 0; i < o->channel_count; i++) {
    size_t n = strlen(o->channels[i]);
    if (n == v->u.string.len && memcmp(o->channels[i], v->u.string.ptr, n) == 0) return;
  }
  if (printable_short(v))
    report(c, p, "unknown_channel", "\"%.*s\" is not one of the allowed channels",
           (int)v->u.string.len, v->u.string.ptr);
  else
    report(c, p, "unknown_channel", "is not one of the allowed channels");
}

static void check_code(ctx *c, const path *p, const stella_value *v, int language) {
  int ok;
  if (!check_text(c, p, v, 0)) return;
  ok = language ? stella_language_valid(v->u.string.ptr, v->u.string.len)
                : (v->u.string.len == 2 && stella_is_country_code(v->u.string.ptr, 2));
  if (ok) return;
  {
    const char *what = language
        ? "is not an ISO 639-1 language code with an optional ISO 3166-1 or UN M.49 region "
          "(e.g. en, en-US, es-419)"
        : "is not an assigned ISO 3166-1 alpha-2 country code (e.g. us, gb, de)";
    if (printable_short(v))
      report(c, p, language ? "invalid_language" : "invalid_country", "\"%.*s\" %s", (int)v->u.string.len, v->u.string.ptr, what);
    else
      report(c, p, language ? "invalid_language" : "invalid_country", "%s", what);
  }
}

/* ---------- tables ------------------------------------------------------------ */

/* Item i (1-based) of a sequence: the binding and JSON produce pairs in order,
 * so the direct slot is checked first. */
static const stella_value *seq_item(const stella_value *t, size_t i) {
  size_t k;
  const stella_pair *p = t->u.table.pairs;
  if (i - 1 < t->u.table.count && p[i - 1].key.type == STELLA_NUMBER &&
      p[i - 1].key.u.number.is_int && p[i - 1].key.u.number.i == (long long)i)
    return &p[i - 1].value;
  for (k = 0; k < t->u.table.count; k++)
    if (p[k].key.type == STELLA_NUMBER && p[k].key.u.number.is_int &&
        p[k].key.u.number.i == (long long)i)
      return &p[k].value;
  return NULL;
}

/* 1 if the keys are exactly 1..n (each once), 0 if not, -1 when out of memory. */
static int is_sequence(ctx *c, const stella_value *t) {
  size_t k, n = t->u.table.count;
  int in_order = 1;
  unsigned char *seen;
  for (k = 0; k < n; k++) {
    const stella_value *key = &t->u.table.pairs[k].key;
    if (key->type != STELLA_NUMBER || !key->u.number.is_int || key->u.number.i < 1 ||
        (unsigned long long)key->u.number.i > n)
      return 0;
    if ((unsigned long long)key->u.number.i != k + 1) in_order = 0;
  }
  if (in_order) return 1;
  /* built by hand (C callers): make sure no key repeats */
  seen = (unsigned char *)stella_arena_alloc(c->arena, n);
  if (seen == NULL) return -1;
  memset(seen, 0, n);
  for (k = 0; k < n; k++) {
    size_t i = (size_t)t->u.table.pairs[k].key.u.number.i - 1;
    if (seen[i]) return 0;
    seen[i] = 1;
  }
  return 1;
}


static void check_tags(ctx *c, const path *p, const stella_value *v) {
  size_t i, n;
  int seq;
  if (v->type != STELLA_TABLE || v->u.table.shape == STELLA_SHAPE_OBJECT) {
    report(c, p, "invalid_type", "must be a list of strings, got %s", type_name(v));
    return;
  }
  seq = is_sequence(c, v);
  if (seq < 0) { c->errors->oom = 1; return; }
  if (!seq) {
    report(c, p, "not_a_sequence", "must be a list (keys 1..n without holes) of strings");
    return;
  }
  n = v->u.table.count;
  if (n > STELLA_MAX_TAGS)
    report(c, p, "too_many", "has %lu items; at most %d are allowed", (unsigned long)n,
                  STELLA_MAX_TAGS);
  for (i = 1; i <= n; i++) {
    const stella_value *item = seq_item(v, i);
    if (item == NULL) continue;   /* cannot happen once is_sequence passed */
    path ip = index_path(p, i);
    if (check_text(c, &ip, item, 0)) check_max_chars(c, &ip, item);
  }
}

/* Order of keys in error lists and in custom_properties: strings by bytes,
 * then numbers, then anything else. */
static int key_rank(const stella_value *k) {
  return k->type == STELLA_STRING ? 0 : k->type == STELLA_NUMBER ? 1 : 2;
}

int stella_key_compare(const void *a, const void *b) {
  const stella_value *x = &(*(const stella_pair *const *)a)->key;
  const stella_value *y = &(*(const stella_pair *const *)b)->key;
  int rx = key_rank(x), ry = key_rank(y);
  if (rx != ry) return rx - ry;
  if (rx == 0) {
    size_t n = x->u.string.len < y->u.string.len ? x->u.string.len : y->u.string.len;
    int r = memcmp(x->u.string.ptr, y->u.string.ptr, n);
    if (r) return r;
    return x->u.string.len < y->u.string.len ? -1 : x->u.string.len > y->u.string.len;
  }
  if (rx == 1) return x->u.number.num < y->u.number.num ? -1 : x->u.number.num > y->u.number.num;
  return 0;
}

/* Pairs of `t` selected by `pick` (NULL = all), sorted; allocated from the arena. */
static const stella_pair **sorted_pairs(ctx *c, const stella_value *t, const unsigned char *pick,
                                        size_t *count) {
  size_t k, n = 0;
  const stella_pair **list;
  for (k = 0; k < t->u.table.count; k++) n += pick ? pick[k] : 1;
  *count = n;
  if (n == 0) return NULL;
  list = (const stella_pair **)stella_arena_alloc(c->arena, n * sizeof *list);
  if (list == NULL) { c->errors->oom = 1; *count = 0; return NULL; }
  n = 0;
  for (k = 0; k < t->u.table.count; k++)
    if (!pick || pick[k]) list[n++] = &t->u.table.pairs[k];
  qsort((void *)list, n, sizeof *list, stella_key_compare);
  return list;
}

/* The path of a key: parent.key, or parent[n] / parent[""] for keys that
 * cannot be written as a name (rendered now: they are always errors). */
static path key_path(ctx *c, const path *parent, const stella_value *key) {
  path kp = field_path(parent, NULL, 0);
  const char *prefix;
  if (prop_name_valid(c, key)) return field_path(parent, key->u.string.ptr, key->u.string.len);
  prefix = render(c, parent);
  if (prefix == NULL) prefix = "";
  if (key->type == STELLA_NUMBER && key->u.number.is_int)
    kp.text = fmt(c, "%s[%lld]", prefix, key->u.number.i);
  else if (key->type == STELLA_STRING && key->u.string.len == 0)
    kp.text = fmt(c, "%s[\"\"]", prefix);
  else
    kp.text = fmt(c, "%s[?]", prefix);
  if (kp.text == NULL) kp.text = "?";
  return kp;
}

/* One custom property. With report == 0 it only says whether the pair is
 * valid, so a valid table is never sorted or formatted. */
static int check_prop(ctx *c, const path *p, const stella_pair *pair, int report_errors) {
  const stella_value *key = &pair->key, *val = &pair->value;
  path kp;
  if (!prop_name_valid(c, key)) {
    if (!report_errors) return 0;
    kp = key_path(c, p, key);
    report(c, &kp, "invalid_key",
           ": custom property names must be non-empty UTF-8 strings without control characters");
    return 0;
  }
  if (val->type == STELLA_NUMBER) {
    double d = val->u.number.num;
    if (d == d && d - d == 0) return 1;
    if (report_errors) {
      kp = key_path(c, p, key);
      report(c, &kp, "invalid_type", "must be a finite number");
    }
    return 0;
  }
  if (val->type == STELLA_STRING) {
    if (stella_utf8_valid(val->u.string.ptr, val->u.string.len) &&
        find_control(c, val->u.string.ptr, val->u.string.len) == val->u.string.len &&
        (val->u.string.len <= STELLA_MAX_TEXT_CHARS ||
         stella_utf8_length(val->u.string.ptr, val->u.string.len) <= STELLA_MAX_TEXT_CHARS))
      return 1;
    if (report_errors) {
      kp = key_path(c, p, key);
      if (check_text(c, &kp, val, 1)) check_max_chars(c, &kp, val);
    }
    return 0;
  }
  if (report_errors) {
    kp = key_path(c, p, key);
    if (val->type == STELLA_TABLE)
      report(c, &kp, "invalid_type", "must be a string; custom properties cannot be nested");
    else
      report(c, &kp, "invalid_type", "must be a string, got %s", type_name(val));
  }
  return 0;
}

static int same_string_key(const stella_value *x, const stella_value *y) {
  return x->type == STELLA_STRING && y->type == STELLA_STRING &&
         x->u.string.len == y->u.string.len &&
         memcmp(x->u.string.ptr, y->u.string.ptr, x->u.string.len) == 0;
}

/* 1 if some string key of the table repeats. Only a parsed object or a C
 * caller can repeat one; a few keys are compared pairwise, more are sorted. */
static int has_repeated_key(ctx *c, const stella_value *t) {
  size_t i, j, n = t->u.table.count;
  const stella_pair *pr = t->u.table.pairs;
  const stella_pair **list;
  if (n <= 16) {
    for (i = 1; i < n; i++)
      for (j = 0; j < i; j++)
        if (same_string_key(&pr[j].key, &pr[i].key)) return 1;
    return 0;
  }
  list = sorted_pairs(c, t, NULL, &n);
  for (i = 1; i < n; i++)
    if (same_string_key(&list[i - 1]->key, &list[i]->key)) return 1;
  return 0;
}

static void check_props(ctx *c, const path *p, const stella_value *v) {
  size_t i, n;
  const stella_pair **list;
  if (v->type != STELLA_TABLE) {
    report(c, p, "invalid_type", "must be a table of string values, got %s", type_name(v));
    return;
  }
  if (v->u.table.shape == STELLA_SHAPE_ARRAY) {
    report(c, p, "invalid_type", "must be an object of string values, got an array");
    return;
  }
  for (i = 0; i < v->u.table.count; i++)
    if (!check_prop(c, p, &v->u.table.pairs[i], 0)) break;
  if (i == v->u.table.count && !has_repeated_key(c, v)) return;
  /* something is wrong: report every problem, in key order; a repeated key is one
   * duplicate_field error (its values are not checked: neither would be sent) */
  list = sorted_pairs(c, v, NULL, &n);
  for (i = 0; i < n; i++) {
    size_t j = i;
    while (j + 1 < n && same_string_key(&list[i]->key, &list[j + 1]->key)) j++;
    if (j > i) {
      path kp = key_path(c, p, &list[i]->key);
      report(c, &kp, "duplicate_field", "is given more than once");
      i = j;
      continue;
    }
    check_prop(c, p, list[i], 1);
  }
}

/* Edit distance (bounded) to suggest a known field for a typo. */
static size_t distance(const char *a, size_t la, const char *b, size_t lb) {
  size_t row[64], i, j;
  if (la >= 63 || lb >= 63) return 99;
  for (j = 0; j <= lb; j++) row[j] = j;
  for (i = 1; i <= la; i++) {
    size_t diag = row[0];
    row[0] = i;
    for (j = 1; j <= lb; j++) {
      size_t up = row[j], best = diag + (a[i - 1] != b[j - 1]);
      if (up + 1 < best) best = up + 1;
      if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
      diag = up;
      row[j] = best;
    }
  }
  return row[lb];
}

static void check_value(ctx *c, const field *f, const path *p, const stella_value *v);

static void check_object(ctx *c, const schema *s, const path *p, const stella_value *v) {
  const stella_value *found[16];
  unsigned char dup[16];
  unsigned char stack_pick[32], *pick = stack_pick;
  size_t i, k, unknown = 0;
  if (v->type != STELLA_TABLE) {
    if (p->parent == NULL && p->name == NULL)
      add_error_text(c, "", "invalid_type", fmt(c, "the %s must be a table, got %s", s->what,
                                                type_name(v)));
    else
      report(c, p, "invalid_type", "must be a table, got %s", type_name(v));
    return;
  }
  if (v->u.table.shape == STELLA_SHAPE_ARRAY) {   /* from JSON: [] where {} belongs */
    if (p->parent == NULL && p->name == NULL)
      add_error_text(c, "", "invalid_type", fmt(c, "the %s must be an object, got an array", s->what));
    else
      report(c, p, "invalid_type", "must be an object, got an array");
    return;
  }
  /* only the schema's fields (a constant-size initialiser costs a "rep stos") */
  memset((void *)found, 0, s->count * sizeof found[0]);
  memset(dup, 0, s->count);
  if (v->u.table.count > sizeof stack_pick) {
    pick = (unsigned char *)stella_arena_alloc(c->arena, v->u.table.count);
    if (pick == NULL) { c->errors->oom = 1; return; }
  }
  for (k = 0; k < v->u.table.count; k++) {
    const stella_pair *pair = &v->u.table.pairs[k];
    int matched = 0;
    if (pair->key.type == STELLA_STRING) {
      for (i = 0; i < s->count; i++) {
        const field *f = &s->fields[i];
        if (f->name_len == pair->key.u.string.len && f->name[0] == pair->key.u.string.ptr[0] &&
            memcmp(f->name, pair->key.u.string.ptr, f->name_len) == 0) {
          /* only a parsed document (or a C caller) can repeat a key; the
           * encoder must never have to choose between two values */
          if (found[i]) dup[i] = 1;
          if (pair->value.type != STELLA_NIL) found[i] = &pair->value;
          matched = 1;
          break;
        }
      }
    }
    pick[k] = (unsigned char)!matched;
    unknown += !matched;
  }
  for (i = 0; i < s->count; i++) {
    const field *f = &s->fields[i];
    if (dup[i]) {
      path fp = field_path(p, f->name, f->name_len);
      report(c, &fp, "duplicate_field", "is given more than once");
    } else if (found[i]) {
      path fp = field_path(p, f->name, f->name_len);
      check_value(c, f, &fp, found[i]);
    } else if (f->required) {
      path fp = field_path(p, f->name, f->name_len);
      report(c, &fp, "required", "is required");
    }
    /* "at least one of" is reported where the later of the two fields stands */
    if ((int)i == s->one_of[1] && !found[s->one_of[0]] && !found[s->one_of[1]])
      add_error_text(c, s->one_of_path, "one_of_required", s->one_of_message);
  }
  if (unknown) {
    size_t n;
    const stella_pair **list = sorted_pairs(c, v, pick, &n);
    for (k = 0; k < n; k++) {
      const stella_value *key = &list[k]->key;
      path kp = key_path(c, p, key);
      const char *hint = NULL;
      if (key->type == STELLA_STRING) {
        size_t best = 3;
        for (i = 0; i < s->count; i++) {
          size_t d = distance(key->u.string.ptr, key->u.string.len, s->fields[i].name,
                              s->fields[i].name_len);
          if (d < best) { best = d; hint = s->fields[i].name; }
        }
      }
      if (hint)
        report(c, &kp, "unknown_field", "is not a field of the %s (did you mean %s?)", s->what, hint);
      else
        report(c, &kp, "unknown_field", "is not a field of the %s", s->what);
    }
  }
}

static void check_value(ctx *c, const field *f, const path *p, const stella_value *v) {
  switch (f->type) {
    case F_STRING: check_text(c, p, v, 0); break;
    case F_EMAIL: check_email(c, p, v); break;
    case F_ID: check_id(c, p, v); break;
    case F_URL: check_url(c, p, v); break;
    case F_BOOL:
      if (v->type != STELLA_BOOL)
        report(c, p, "invalid_type", "must be true or false, got %s", type_name(v));
      break;
    case F_CHANNEL: check_channel(c, p, v); break;
    case F_TAGS: check_tags(c, p, v); break;
    case F_LANGUAGE: check_code(c, p, v, 1); break;
    case F_COUNTRY: check_code(c, p, v, 0); break;
    case F_PROPS: check_props(c, p, v); break;
    case F_OBJECT: check_object(c, f->sub, p, v); break;
  }
}

int stella_validate(stella_arena *a, stella_endpoint endpoint, const stella_value *req,
                    const stella_options *opts, stella_violations *errors) {
  return stella_validate_parsed(a, endpoint, req, opts, errors, NULL, 0);
}

int stella_validate_parsed(stella_arena *a, stella_endpoint endpoint, const stella_value *req,
                           const stella_options *opts, stella_violations *errors, const char *text,
                           size_t len) {
  ctx c;
  c.arena = a;
  c.errors = errors;
  c.opts = opts;
  c.text = text ? (uintptr_t)text : 0;
  c.text_end = text ? (uintptr_t)text + len : 0;
  errors->items = NULL;
  errors->count = errors->cap = 0;
  errors->oom = 0;
  {
    path root = field_path(NULL, NULL, 0);
    check_object(&c, stella_schema_for(endpoint), &root, req);
  }
  return errors->oom ? -1 : (int)errors->count;
}
