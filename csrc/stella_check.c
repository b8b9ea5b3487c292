/* stella_check.c - JSON text parsed and validated in one call, with the values at some
 * dotted paths: what stella.validate_json(text, kind, {fields = ...}) does, as a plain C
 * function that LuaJIT's FFI can call (a lua_CFunction ends the JIT's trace; an FFI call
 * is compiled into it). The sandbox calls it for every POST /v1/requests (see
 * lua/stella/check_json.lua). */
#include <stdlib.h>
#include <string.h>
#include "stella.h"
#include "stella_schema.h"

struct stella_checker {
  stella_arena arena;   /* the parsed tree and the decoded strings of the last call */
};

stella_checker *stella_checker_new(void) {
  stella_checker *c = (stella_checker *)malloc(sizeof *c);
  if (c != NULL) stella_arena_init(&c->arena);
  return c;
}

void stella_checker_free(stella_checker *c) {
  if (c == NULL) return;
  stella_arena_free(&c->arena);
  free(c);
}

/* The value at a dotted path ("customer.email") of a parsed document, or NULL. (The
 * segments found byte by byte, a member's name compared from its first byte: paths and
 * names are a few bytes long, shorter than a call of strchr or memcmp.) */
static const stella_value *value_at(const stella_value *v, const char *path) {
  const char *seg = path;
  for (;;) {
    size_t n = 0, k;
    const stella_value *next = NULL;
    while (seg[n] != '\0' && seg[n] != '.') n++;
    if (v->type != STELLA_TABLE) return NULL;
    for (k = 0; k < v->u.table.count; k++) {
      const stella_value *key = &v->u.table.pairs[k].key;
      if (key->type == STELLA_STRING && key->u.string.len == n &&
          (n == 0 || (key->u.string.ptr[0] == seg[0] && memcmp(key->u.string.ptr, seg, n) == 0))) {
        next = &v->u.table.pairs[k].value;
        break;
      }
    }
    if (next == NULL || seg[n] == '\0') return next;
    v = next;
    seg += n + 1;
  }
}

static void fill_field(const stella_value *v, stella_field *f) {
  f->type = STELLA_NIL;
  f->is_int = f->boolean = f->upper = 0;
  f->ptr = NULL;
  f->len = 0;
  f->i = 0;
  f->num = 0;
  if (v == NULL) return;
  switch (v->type) {
    case STELLA_STRING: {
      size_t k;
      f->type = STELLA_STRING;
      f->ptr = v->u.string.ptr;
      f->len = v->u.string.len;
      for (k = 0; k < f->len; k++)
        if (f->ptr[k] >= 'A' && f->ptr[k] <= 'Z') { f->upper = 1; break; }
      break;
    }
    case STELLA_NUMBER:
      f->type = STELLA_NUMBER;
      f->is_int = v->u.number.is_int;
      f->i = v->u.number.i;
      f->num = v->u.number.num;
      break;
    case STELLA_BOOL:
      f->type = STELLA_BOOL;
      f->boolean = v->u.boolean;
      break;
    case STELLA_TABLE:
      f->type = STELLA_TABLE;
      break;
    default:   /* null, or what JSON cannot hold: absent for the caller */
      break;
  }
}

int stella_check_json(stella_checker *c, int endpoint, const char *text, size_t len,
                      const char *const *paths, size_t n, stella_field *out) {
  stella_value req;
  stella_parse_error perr;
  stella_violations errors;
  stella_options o;
  size_t i;
  int rc;
  if (c == NULL || text == NULL || (n > 0 && (paths == NULL || out == NULL))) return -1;
  stella_arena_reset(&c->arena);
  rc = stella_parse_json(&c->arena, text, len, &req, &perr);
  if (rc < 0) return -1;
  if (rc > 0) return 0;
  o.channels = NULL;
  o.channel_count = 0;
  rc = stella_validate_parsed(&c->arena, endpoint == STELLA_RECOVERY ? STELLA_RECOVERY : STELLA_REQUEST,
                              &req, &o, &errors, text, len);
  if (rc < 0) return -1;
  if (rc > 0) return 0;
  for (i = 0; i < n; i++) {
    if (paths[i] == NULL) return -1;
    fill_field(value_at(&req, paths[i]), &out[i]);
  }
  return 1;
}
