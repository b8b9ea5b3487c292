/* stella_value.c - arena allocator, value builders and the growable buffer. */
#include <stdlib.h>
#include <string.h>
#include "stella.h"

struct stella_arena_block {
  stella_arena_block *next;
  size_t size, used;
  /* data follows, aligned to ARENA_ALIGN */
};

#define ARENA_ALIGN 16u
#define ARENA_MIN_BLOCK 8192u
#define BLOCK_HEADER ((sizeof(stella_arena_block) + ARENA_ALIGN - 1) & ~(size_t)(ARENA_ALIGN - 1))

void stella_arena_init(stella_arena *a) {
  a->head = NULL;
  a->spare = NULL;
}

void *stella_arena_alloc(stella_arena *a, size_t size) {
  stella_arena_block *b = a->head;
  if (size > (size_t)-1 - BLOCK_HEADER - 2 * ARENA_ALIGN) return NULL;   /* no wrap-around */
  size = (size + ARENA_ALIGN - 1) & ~(size_t)(ARENA_ALIGN - 1);
  if (size == 0) size = ARENA_ALIGN;
  if (b == NULL || b->size - b->used < size) {
    /* take a spare block when it is big enough, otherwise allocate one */
    stella_arena_block **pp = &a->spare;
    while (*pp && (*pp)->size < size) pp = &(*pp)->next;
    if (*pp) {
      b = *pp;
      *pp = b->next;
    } else {
      size_t bsize = size > ARENA_MIN_BLOCK ? size : ARENA_MIN_BLOCK;
      if (a->head && a->head->size * 2 > bsize && a->head->size < (1u << 20))
        bsize = a->head->size * 2;
      b = (stella_arena_block *)malloc(BLOCK_HEADER + bsize);
      if (b == NULL) return NULL;
      b->size = bsize;
    }
    b->used = 0;
    b->next = a->head;
    a->head = b;
  }
  {
    void *p = (char *)b + BLOCK_HEADER + b->used;
    b->used += size;
    return p;
  }
}

void stella_arena_reset(stella_arena *a) {
  while (a->head) {
    stella_arena_block *b = a->head;
    a->head = b->next;
    b->next = a->spare;
    a->spare = b;
  }
}

void stella_arena_free(stella_arena *a) {
  stella_arena_block *lists[2];
  int i;
  lists[0] = a->head;
  lists[1] = a->spare;
  for (i = 0; i < 2; i++) {
    stella_arena_block *b = lists[i];
    while (b) {
      stella_arena_block *next = b->next;
      free(b);
      b = next;
    }
  }
  a->head = a->spare = NULL;
}

stella_value stella_nil(void) {
  stella_value v;
  memset(&v, 0, sizeof v);
  v.type = STELLA_NIL;
  return v;
}

stella_value stella_bool(int b) {
  stella_value v = stella_nil();
  v.type = STELLA_BOOL;
  v.u.boolean = b != 0;
  return v;
}

stella_value stella_int(long long i) {
  stella_value v = stella_nil();
  v.type = STELLA_NUMBER;
  v.u.number.i = i;
  v.u.number.num = (double)i;
  v.u.number.is_int = 1;
  return v;
}

/* Integral doubles within +-2^53 count as integers, so LuaJIT (doubles only)
 * and Lua 5.4 (integers and floats) accept the same values. */
stella_value stella_double(double d) {
  stella_value v = stella_nil();
  v.type = STELLA_NUMBER;
  v.u.number.num = d;
  if (d == d && d >= -9007199254740992.0 && d <= 9007199254740992.0 &&
      (double)(long long)d == d) {
    v.u.number.is_int = 1;
    v.u.number.i = (long long)d;
  }
  return v;
}

stella_value stella_string(const char *s, size_t len) {
  stella_value v = stella_nil();
  v.type = STELLA_STRING;
  v.u.string.ptr = s;
  v.u.string.len = len;
  return v;
}

stella_value stella_cstring(const char *s) {
  return stella_string(s, strlen(s));
}

stella_pair *stella_table(stella_arena *a, stella_value *out, size_t count) {
  stella_pair *pairs = NULL;
  if (count > 0) {
    if (count > (size_t)-1 / sizeof(stella_pair)) return NULL;
    pairs = (stella_pair *)stella_arena_alloc(a, count * sizeof(stella_pair));
    if (pairs == NULL) return NULL;
  }
  *out = stella_nil();
  out->type = STELLA_TABLE;
  out->u.table.pairs = pairs;
  out->u.table.count = count;
  return pairs ? pairs : (stella_pair *)out; /* non-NULL signals success for count 0 */
}

const stella_value *stella_get(const stella_value *t, const char *key) {
  size_t i, klen;
  if (t == NULL || t->type != STELLA_TABLE) return NULL;
  klen = strlen(key);
  for (i = 0; i < t->u.table.count; i++) {
    const stella_value *k = &t->u.table.pairs[i].key;
    if (k->type == STELLA_STRING && k->u.string.len == klen &&
        memcmp(k->u.string.ptr, key, klen) == 0)
      return &t->u.table.pairs[i].value;
  }
  return NULL;
}

void stella_buffer_init(stella_buffer *b) {
  b->data = NULL;
  b->len = b->cap = 0;
  b->oom = 0;
}

void stella_buffer_free(stella_buffer *b) {
  free(b->data);
  stella_buffer_init(b);
}

void stella_buffer_add(stella_buffer *b, const char *s, size_t len) {
  if (b->oom) return;
  if (b->cap - b->len < len + 1) {
    size_t ncap = b->cap ? b->cap : 256;
    char *p;
    while (ncap - b->len < len + 1) {
      if (ncap > (size_t)-1 / 2) { b->oom = 1; return; }
      ncap *= 2;
    }
    p = (char *)realloc(b->data, ncap);
    if (p == NULL) { b->oom = 1; return; }
    b->data = p;
    b->cap = ncap;
  }
  memcpy(b->data + b->len, s, len);
  b->len += len;
  b->data[b->len] = '\0';
}
