/* stella_validate.c - checks a value tree against the Requests API schema,
 * collecting every problem (path, code, message) in a stable order. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "stella_schema.h"

typedef struct ctx {
  stella_arena *arena;
  stella_errors *errors;
  const stella_options *opts;
} ctx;

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

static void add_error(ctx *c, const char *path, const char *code, const char *message) {
  stella_errors *e = c->errors;
  if (path == NULL || message == NULL) { e->oom = 1; return; }
  if (e->count == e->cap) {
    size_t ncap = e->cap ? e->cap * 2 : 8;
    stella_error *items = (stella_error *)stella_arena_alloc(c->arena, ncap * sizeof *items);
    if (items == NULL) { e->oom = 1; return; }
    if (e->count) memcpy(items, e->items, e->count * sizeof *items);
    e->items = items;
    e->cap = ncap;
  }
  e->items[e->count].path = path;
  e->items[e->count].code = code;
  e->items[e->count].message = message;
  e->count++;
}

static const char *join(ctx *c, const char *prefix, const char *name, size_t len) {
  if (prefix == NULL || prefix[0] == '\0') return fmt(c, "%.*s", (int)len, name);
  return fmt(c, "%s.%.*s", prefix, (int)len, name);
}

static const char *type_name(const stella_value *v) {
  switch (v->type) {
    case STELLA_NIL: return "nil";
    case STELLA_BOOL: return "a boolean";
    case STELLA_NUMBER: return v->u.number.is_int ? "an integer" : "a number";
    case STELLA_STRING: return "a string";
    case STELLA_TABLE: return "a table";
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

/* Checks that v is a non-empty, valid UTF-8 string; reports and returns 0 if not. */
static int check_text(ctx *c, const char *path, const stella_value *v, int allow_empty) {
  if (v->type != STELLA_STRING) {
    add_error(c, path, "invalid_type", fmt(c, "%s must be a string, got %s", path, type_name(v)));
    return 0;
  }
  if (!allow_empty && v->u.string.len == 0) {
    add_error(c, path, "empty", fmt(c, "%s must not be empty", path));
    return 0;
  }
  if (!stella_utf8_valid(v->u.string.ptr, v->u.string.len)) {
    add_error(c, path, "invalid_utf8", fmt(c, "%s is not valid UTF-8", path));
    return 0;
  }
  return 1;
}

static void check_max_chars(ctx *c, const char *path, const stella_value *v) {
  size_t chars;
  if (v->u.string.len <= STELLA_MAX_TEXT_CHARS) return;   /* bytes >= chars */
  chars = stella_utf8_length(v->u.string.ptr, v->u.string.len);
  if (chars > STELLA_MAX_TEXT_CHARS)
    add_error(c, path, "too_long",
              fmt(c, "%s has %lu characters; at most %d are kept by the service", path,
                  (unsigned long)chars, STELLA_MAX_TEXT_CHARS));
}

static void check_email(ctx *c, const char *path, const stella_value *v) {
  if (!check_text(c, path, v, 0)) return;
  if (v->u.string.len > STELLA_MAX_EMAIL_BYTES)
    add_error(c, path, "too_long",
              fmt(c, "%s is %lu bytes long; an e-mail address has at most %d", path,
                  (unsigned long)v->u.string.len, STELLA_MAX_EMAIL_BYTES));
  else if (!stella_email_valid(v->u.string.ptr, v->u.string.len))
    add_error(c, path, "invalid_email",
              fmt(c, "%s is not a valid e-mail address (expected local@domain)", path));
}

static void check_id(ctx *c, const char *path, const stella_value *v) {
  if (v->type == STELLA_NUMBER) {
    if (!v->u.number.is_int)
      add_error(c, path, "invalid_type",
                fmt(c, "%s must be a string or an integer, got a non-integral number", path));
    return;
  }
  if (v->type != STELLA_STRING) {
    add_error(c, path, "invalid_type",
              fmt(c, "%s must be a string or an integer, got %s", path, type_name(v)));
    return;
  }
  check_text(c, path, v, 0);
}

/* Whitespace or control: ASCII controls, space, DEL, C1 controls (U+0080-U+009F),
 * NBSP, U+1680, U+2000-U+200A, U+2028/9, U+202F, U+205F, U+3000, U+FEFF. */
static int has_space_or_control(const char *str, size_t len) {
  const unsigned char *s = (const unsigned char *)str;
  size_t i;
  for (i = 0; i < len; i++) {
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

static void check_url(ctx *c, const char *path, const stella_value *v) {
  if (!check_text(c, path, v, 0)) return;
  if (has_space_or_control(v->u.string.ptr, v->u.string.len))
    add_error(c, path, "invalid_url",
              fmt(c, "%s must not contain whitespace or control characters", path));
}

static void check_channel(ctx *c, const char *path, const stella_value *v) {
  const stella_options *o = c->opts;
  size_t i;
  if (!check_text(c, path, v, 0)) return;
  if (o == NULL || o->channels == NULL) return;
  for (i = 0; i < o->channel_count; i++) {
    size_t n = strlen(o->channels[i]);
    if (n == v->u.string.len && memcmp(o->channels[i], v->u.string.ptr, n) == 0) return;
  }
  if (printable_short(v))
    add_error(c, path, "unknown_channel",
              fmt(c, "%s \"%.*s\" is not one of the allowed channels", path,
                  (int)v->u.string.len, v->u.string.ptr));
  else
    add_error(c, path, "unknown_channel", fmt(c, "%s is not one of the allowed channels", path));
}

static void check_code(ctx *c, const char *path, const stella_value *v, int language) {
  int ok;
  if (!check_text(c, path, v, 0)) return;
  ok = language ? stella_language_valid(v->u.string.ptr, v->u.string.len)
                : (v->u.string.len == 2 && stella_is_country_code(v->u.string.ptr, 2));
  if (ok) return;
  {
    const char *what = language
        ? "is not an ISO 639-1 language code with an optional ISO 3166-1 or UN M.49 region "
          "(e.g. en, en-US, es-419)"
        : "is not an assigned ISO 3166-1 alpha-2 country code (e.g. us, gb, de)";
    if (printable_short(v))
      add_error(c, path, language ? "invalid_language" : "invalid_country",
                fmt(c, "%s \"%.*s\" %s", path, (int)v->u.string.len, v->u.string.ptr, what));
    else
      add_error(c, path, language ? "invalid_language" : "invalid_country",
                fmt(c, "%s %s", path, what));
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


static void check_tags(ctx *c, const char *path, const stella_value *v) {
  size_t i, n;
  int seq;
  if (v->type != STELLA_TABLE) {
    add_error(c, path, "invalid_type",
              fmt(c, "%s must be a list of strings, got %s", path, type_name(v)));
    return;
  }
  seq = is_sequence(c, v);
  if (seq < 0) { c->errors->oom = 1; return; }
  if (!seq) {
    add_error(c, path, "not_a_sequence",
              fmt(c, "%s must be a list (keys 1..n without holes) of strings", path));
    return;
  }
  n = v->u.table.count;
  if (n > STELLA_MAX_TAGS)
    add_error(c, path, "too_many",
              fmt(c, "%s has %lu items; at most %d are allowed", path, (unsigned long)n,
                  STELLA_MAX_TAGS));
  for (i = 1; i <= n; i++) {
    const stella_value *item = seq_item(v, i);
    if (item == NULL) continue;   /* cannot happen once is_sequence passed */
    const char *ipath = fmt(c, "%s[%lu]", path, (unsigned long)i);
    if (ipath == NULL) { c->errors->oom = 1; return; }
    if (check_text(c, ipath, item, 0)) check_max_chars(c, ipath, item);
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

/* A printable name for a key in a path: the string itself, or [n]. */
static const char *key_path(ctx *c, const char *prefix, const stella_value *key) {
  if (key->type == STELLA_STRING && key->u.string.len > 0 &&
      stella_utf8_valid(key->u.string.ptr, key->u.string.len))
    return join(c, prefix, key->u.string.ptr, key->u.string.len);
  if (key->type == STELLA_NUMBER && key->u.number.is_int)
    return fmt(c, "%s[%lld]", prefix ? prefix : "", key->u.number.i);
  if (key->type == STELLA_STRING && key->u.string.len == 0)
    return fmt(c, "%s[\"\"]", prefix ? prefix : "");
  return fmt(c, "%s[?]", prefix ? prefix : "");
}

static void check_props(ctx *c, const char *path, const stella_value *v) {
  size_t i, n;
  const stella_pair **list;
  if (v->type != STELLA_TABLE) {
    add_error(c, path, "invalid_type",
              fmt(c, "%s must be a table of string values, got %s", path, type_name(v)));
    return;
  }
  list = sorted_pairs(c, v, NULL, &n);
  for (i = 0; i < n; i++) {
    const stella_value *key = &list[i]->key, *val = &list[i]->value;
    const char *kpath = key_path(c, path, key);
    if (kpath == NULL) { c->errors->oom = 1; return; }
    if (key->type != STELLA_STRING || key->u.string.len == 0 ||
        !stella_utf8_valid(key->u.string.ptr, key->u.string.len)) {
      add_error(c, kpath, "invalid_key",
                fmt(c, "%s: custom property names must be non-empty UTF-8 strings", kpath));
      continue;
    }
    if (val->type == STELLA_NUMBER) {
      double d = val->u.number.num;
      if (d != d || d - d != 0)
        add_error(c, kpath, "invalid_type", fmt(c, "%s must be a finite number", kpath));
      continue;
    }
    if (val->type == STELLA_TABLE) {
      add_error(c, kpath, "invalid_type",
                fmt(c, "%s must be a string; custom properties cannot be nested", kpath));
      continue;
    }
    if (check_text(c, kpath, val, 1)) check_max_chars(c, kpath, val);
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

static void check_value(ctx *c, const field *f, const char *path, const stella_value *v);

static void check_object(ctx *c, const schema *s, const char *path, const stella_value *v) {
  const stella_value *found[16] = { NULL };
  unsigned char dup[16] = { 0 };
  unsigned char stack_pick[32], *pick = stack_pick;
  size_t i, k, unknown = 0;
  if (v->type != STELLA_TABLE) {
    add_error(c, path, "invalid_type",
              fmt(c, "%s must be a table, got %s", path[0] ? path : s->what, type_name(v)));
    return;
  }
  if (v->u.table.count > sizeof stack_pick) {
    pick = (unsigned char *)stella_arena_alloc(c->arena, v->u.table.count);
    if (pick == NULL) { c->errors->oom = 1; return; }
  }
  for (k = 0; k < v->u.table.count; k++) {
    const stella_pair *p = &v->u.table.pairs[k];
    int matched = 0;
    if (p->key.type == STELLA_STRING) {
      for (i = 0; i < s->count; i++) {
        const field *f = &s->fields[i];
        if (f->name_len == p->key.u.string.len &&
            memcmp(f->name, p->key.u.string.ptr, f->name_len) == 0) {
          if (found[i] || dup[i]) {
            /* only a parsed document can repeat a key; the encoder must never
             * have to choose between two values */
            if (!dup[i]) {
              const char *fpath = join(c, path, f->name, f->name_len);
              add_error(c, fpath, "duplicate_field", fmt(c, "%s is given more than once", fpath));
            }
            dup[i] = 1;
          }
          if (p->value.type != STELLA_NIL) found[i] = &p->value;
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
      continue;
    } else if (found[i]) {
      const char *fpath = join(c, path, f->name, f->name_len);
      if (fpath == NULL) { c->errors->oom = 1; return; }
      check_value(c, f, fpath, found[i]);
    } else if (f->required) {
      const char *fpath = join(c, path, f->name, f->name_len);
      add_error(c, fpath, "required", fmt(c, "%s is required", fpath));
    }
    /* "at least one of" is reported where the later of the two fields stands */
    if ((int)i == s->one_of[1] && !found[s->one_of[0]] && !found[s->one_of[1]])
      add_error(c, s->one_of_path, "one_of_required", s->one_of_message);
  }
  if (unknown) {
    size_t n;
    const stella_pair **list = sorted_pairs(c, v, pick, &n);
    for (k = 0; k < n; k++) {
      const stella_value *key = &list[k]->key;
      const char *kpath = key_path(c, path, key);
      const char *hint = NULL;
      if (kpath == NULL) { c->errors->oom = 1; return; }
      if (key->type == STELLA_STRING) {
        size_t best = 3;
        for (i = 0; i < s->count; i++) {
          size_t d = distance(key->u.string.ptr, key->u.string.len, s->fields[i].name,
                              s->fields[i].name_len);
          if (d < best) { best = d; hint = s->fields[i].name; }
        }
      }
      if (hint)
        add_error(c, kpath, "unknown_field",
                  fmt(c, "%s is not a field of the %s (did you mean %s?)", kpath, s->what, hint));
      else
        add_error(c, kpath, "unknown_field",
                  fmt(c, "%s is not a field of the %s", kpath, s->what));
    }
  }
}

static void check_value(ctx *c, const field *f, const char *path, const stella_value *v) {
  switch (f->type) {
    case F_STRING: check_text(c, path, v, 0); break;
    case F_EMAIL: check_email(c, path, v); break;
    case F_ID: check_id(c, path, v); break;
    case F_URL: check_url(c, path, v); break;
    case F_BOOL:
      if (v->type != STELLA_BOOL)
        add_error(c, path, "invalid_type",
                  fmt(c, "%s must be true or false, got %s", path, type_name(v)));
      break;
    case F_CHANNEL: check_channel(c, path, v); break;
    case F_TAGS: check_tags(c, path, v); break;
    case F_LANGUAGE: check_code(c, path, v, 1); break;
    case F_COUNTRY: check_code(c, path, v, 0); break;
    case F_PROPS: check_props(c, path, v); break;
    case F_OBJECT: check_object(c, f->sub, path, v); break;
  }
}

int stella_validate(stella_arena *a, stella_kind kind, const stella_value *req,
                    const stella_options *opts, stella_errors *errors) {
  ctx c;
  c.arena = a;
  c.errors = errors;
  c.opts = opts;
  errors->items = NULL;
  errors->count = errors->cap = 0;
  errors->oom = 0;
  check_object(&c, stella_schema_for(kind), "", req);
  return errors->oom ? -1 : (int)errors->count;
}
