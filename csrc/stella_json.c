/* stella_json.c - canonical JSON for a validated request: compact, keys in
 * schema order, custom_properties sorted, integers written as strings. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "stella_schema.h"

/* Appends without a function call when the buffer has room (the common case). */
static void put(stella_buffer *b, const char *s, size_t len) {
  if (b->cap - b->len > len) {
    memcpy(b->data + b->len, s, len);
    b->len += len;
  } else {
    stella_buffer_add(b, s, len);
  }
}
#define ADD_LIT(b, lit) put((b), (lit), sizeof(lit) - 1)

void stella_json_string(stella_buffer *b, const char *s, size_t len) {
  static const char hex[] = "0123456789abcdef";
  size_t i, run = 0;
  ADD_LIT(b, "\"");
  for (i = 0; i < len; i++) {
    unsigned char ch = (unsigned char)s[i];
    const char *esc = NULL;
    char u[6];
    if (ch >= 0x20 && ch != '"' && ch != '\\') continue;
    switch (ch) {
      case '"': esc = "\\\""; break;
      case '\\': esc = "\\\\"; break;
      case '\n': esc = "\\n"; break;
      case '\r': esc = "\\r"; break;
      case '\t': esc = "\\t"; break;
      case '\b': esc = "\\b"; break;
      case '\f': esc = "\\f"; break;
      default:
        u[0] = '\\'; u[1] = 'u'; u[2] = '0'; u[3] = '0';
        u[4] = hex[ch >> 4]; u[5] = hex[ch & 15];
        break;
    }
    put(b, s + run, i - run);
    if (esc) put(b, esc, 2);
    else put(b, u, 6);
    run = i + 1;
  }
  put(b, s + run, len - run);
  ADD_LIT(b, "\"");
}

/* A number as a JSON string: integers exactly, others with 14 significant
 * digits (Lua 5.1's "%.14g"), with '.' whatever the C locale says. */
void stella_json_number(stella_buffer *b, int is_int, long long ival, double num) {
  char tmp[64];
  int n;
  size_t i;
  if (is_int) {
    /* integers (ids) without printf */
    unsigned long long u = ival < 0 ? 0ULL - (unsigned long long)ival : (unsigned long long)ival;
    char rev[24];
    int r = 0;
    do { rev[r++] = (char)('0' + (int)(u % 10)); u /= 10; } while (u);
    n = 0;
    if (ival < 0) tmp[n++] = '-';
    while (r) tmp[n++] = rev[--r];
  } else {
    n = snprintf(tmp, sizeof tmp, "%.14g", num);
  }
  if (n < 0) n = 0;
  for (i = 0; i < (size_t)n; i++)
    if (tmp[i] == ',') tmp[i] = '.';
  ADD_LIT(b, "\"");
  put(b, tmp, (size_t)n);
  ADD_LIT(b, "\"");
}

static void add_scalar(stella_buffer *b, const stella_value *v) {
  if (v->type == STELLA_STRING) stella_json_string(b, v->u.string.ptr, v->u.string.len);
  else if (v->type == STELLA_NUMBER)
    stella_json_number(b, v->u.number.is_int, v->u.number.i, v->u.number.num);
  else if (v->type == STELLA_BOOL) {
    if (v->u.boolean) ADD_LIT(b, "true");
    else ADD_LIT(b, "false");
  } else ADD_LIT(b, "null");
}

static void add_tags(stella_buffer *b, const stella_value *t) {
  size_t i, k, n = t->u.table.count;
  ADD_LIT(b, "[");
  for (i = 1; i <= n; i++) {
    const stella_pair *p = &t->u.table.pairs[i - 1];
    if (!(p->key.type == STELLA_NUMBER && p->key.u.number.i == (long long)i)) {
      for (k = 0; k < n; k++)   /* out of order (built by hand): find item i */
        if (t->u.table.pairs[k].key.u.number.i == (long long)i) p = &t->u.table.pairs[k];
    }
    if (i > 1) ADD_LIT(b, ",");
    add_scalar(b, &p->value);
  }
  ADD_LIT(b, "]");
}

static int add_props(stella_buffer *b, const stella_value *t) {
  size_t i, n = t->u.table.count;
  const stella_pair *stack_list[32], **list = stack_list;
  if (n > 32) {
    list = (const stella_pair **)malloc(n * sizeof *list);
    if (list == NULL) return -1;
  }
  for (i = 0; i < n; i++) list[i] = &t->u.table.pairs[i];
  if (n > 16) {
    qsort((void *)list, n, sizeof *list, stella_key_compare);
  } else {   /* insertion sort: no allocation inside qsort for the usual few keys */
    size_t j;
    for (i = 1; i < n; i++) {
      const stella_pair *x = list[i];
      for (j = i; j > 0 && stella_key_compare(&list[j - 1], &x) > 0; j--) list[j] = list[j - 1];
      list[j] = x;
    }
  }
  ADD_LIT(b, "{");
  for (i = 0; i < n; i++) {
    if (i) ADD_LIT(b, ",");
    stella_json_string(b, list[i]->key.u.string.ptr, list[i]->key.u.string.len);
    ADD_LIT(b, ":");
    add_scalar(b, &list[i]->value);
  }
  ADD_LIT(b, "}");
  if (list != stack_list) free((void *)list);
  return 0;
}

static int add_object(stella_buffer *b, const schema *s, const stella_value *obj) {
  const stella_value *found[16] = { NULL };
  size_t i, k;
  int first = 1;
  /* one pass over the members (the request is valid: each field at most once) */
  for (k = 0; k < obj->u.table.count; k++) {
    const stella_pair *p = &obj->u.table.pairs[k];
    if (p->key.type != STELLA_STRING || p->value.type == STELLA_NIL) continue;
    for (i = 0; i < s->count; i++)
      if (s->fields[i].name_len == p->key.u.string.len && p->key.u.string.len > 0 &&
          s->fields[i].name[0] == p->key.u.string.ptr[0] &&
          memcmp(s->fields[i].name, p->key.u.string.ptr, p->key.u.string.len) == 0) {
        found[i] = &p->value;
        break;
      }
  }
  ADD_LIT(b, "{");
  for (i = 0; i < s->count; i++) {
    const field *f = &s->fields[i];
    const stella_value *v = found[i];
    if (v == NULL) continue;
    if (!first) ADD_LIT(b, ",");
    first = 0;
    put(b, f->key, f->key_len);
    switch (f->type) {
      case F_OBJECT:
        if (add_object(b, f->sub, v) != 0) return -1;
        break;
      case F_TAGS: add_tags(b, v); break;
      case F_PROPS:
        if (add_props(b, v) != 0) return -1;
        break;
      default: add_scalar(b, v); break;
    }
  }
  ADD_LIT(b, "}");
  return b->oom ? -1 : 0;
}

int stella_encode_json(stella_endpoint endpoint, const stella_value *req, stella_buffer *out) {
  int rc = add_object(out, stella_schema_for(endpoint), req);
  stella_buffer_add(out, "", 0);   /* keep out->data NUL-terminated for C callers */
  return out->oom ? -1 : rc;
}
