/* stella_parse.c - strict JSON text (RFC 8259) -> stella_value, so a request body
 * can be validated without building Lua tables first.
 *
 * No recursion: one loop with an explicit stack of open containers (at most
 * STELLA_JSON_MAX_DEPTH) and one work list of the members parsed so far. A
 * container's members stay on the work list until it closes; then they are copied
 * into an array of exactly their number, allocated from the arena. */
#include <limits.h>
#include <locale.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "stella.h"

typedef struct frame {
  size_t base;      /* index in the work list of the container's first member */
  int object;       /* 1 for {...}, 0 for [...] */
} frame;

typedef struct parser {
  stella_arena *arena;
  const unsigned char *start, *p, *end;
  stella_pair *work;          /* members of the open containers, innermost last */
  size_t len, cap;
  const char *message;        /* the syntax error, or NULL */
  const unsigned char *at;    /* where it was found */
  int oom;
} parser;

/* Bytes that end the fast scan of a string: '"', '\\' and control characters. */
static const unsigned char string_stop[256] = {
  1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1, 1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,
  0,0,1,0,0,0,0,0,0,0,0,0,0,0,0,0, 0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
  0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0, 0,0,0,0,0,0,0,0,0,0,0,0,1,0,0,0,
};

#define IS_WS(c) ((c) == ' ' || (c) == '\n' || (c) == '\r' || (c) == '\t')
#define IS_DIGIT(c) ((c) >= '0' && (c) <= '9')

/* Values are written field by field here: this is the hot path, and the builders of
 * stella_value.c are calls into another file. */
static void set_int(stella_value *v, long long i) {
  v->type = STELLA_NUMBER;
  v->u.number.i = i;
  v->u.number.num = (double)i;
  v->u.number.is_int = 1;
}

static int fail(parser *ps, const unsigned char *at, const char *message) {
  ps->message = message;
  ps->at = at;
  return 0;
}

static int fail_oom(parser *ps) {
  ps->oom = 1;
  ps->message = "out of memory";
  ps->at = ps->p;
  return 0;
}

static void skip_ws(parser *ps) {
  const unsigned char *p = ps->p, *end = ps->end;
  while (p < end && IS_WS(*p)) p++;
  ps->p = p;
}

/* A new member at the end of the work list (key and value left to the caller). */
static stella_pair *push_pair(parser *ps) {
  if (ps->len == ps->cap) {
    size_t ncap = ps->cap ? ps->cap * 2 : 32;
    stella_pair *w;
    if (ncap > (size_t)-1 / sizeof *w) return NULL;
    w = (stella_pair *)stella_arena_alloc(ps->arena, ncap * sizeof *w);
    if (w == NULL) return NULL;
    if (ps->len) memcpy(w, ps->work, ps->len * sizeof *w);
    ps->work = w;   /* the old list stays in the arena until its reset */
    ps->cap = ncap;
  }
  return &ps->work[ps->len++];
}

static int hex4(const unsigned char *s, unsigned *out) {
  unsigned v = 0;
  int i;
  for (i = 0; i < 4; i++) {
    unsigned char c = s[i];
    v <<= 4;
    if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
    else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
    else return 0;
  }
  *out = v;
  return 1;
}

/* Writes code point cp (at most U+10FFFF) as UTF-8; surrogates get their 3-byte
 * form on purpose (invalid UTF-8, so the validator reports the field). */
static unsigned char *put_utf8(unsigned char *o, unsigned cp) {
  if (cp < 0x80) {
    *o++ = (unsigned char)cp;
  } else if (cp < 0x800) {
    *o++ = (unsigned char)(0xC0 | (cp >> 6));
    *o++ = (unsigned char)(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    *o++ = (unsigned char)(0xE0 | (cp >> 12));
    *o++ = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    *o++ = (unsigned char)(0x80 | (cp & 0x3F));
  } else {
    *o++ = (unsigned char)(0xF0 | (cp >> 18));
    *o++ = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    *o++ = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    *o++ = (unsigned char)(0x80 | (cp & 0x3F));
  }
  return o;
}

/* Decodes the escapes of the string body [s, e) into the arena. The decoded text
 * is never longer than the escaped one. */
static int unescape(parser *ps, const unsigned char *s, const unsigned char *e, stella_value *out) {
  unsigned char *buf = (unsigned char *)stella_arena_alloc(ps->arena, (size_t)(e - s));
  unsigned char *o = buf;
  if (buf == NULL) return fail_oom(ps);
  while (s < e) {
    unsigned cp;
    if (*s != '\\') {
      *o++ = *s++;
      continue;
    }
    /* the scan guarantees a byte after every backslash inside the string */
    switch (s[1]) {
      case '"': *o++ = '"'; break;
      case '\\': *o++ = '\\'; break;
      case '/': *o++ = '/'; break;
      case 'b': *o++ = '\b'; break;
      case 'f': *o++ = '\f'; break;
      case 'n': *o++ = '\n'; break;
      case 'r': *o++ = '\r'; break;
      case 't': *o++ = '\t'; break;
      case 'u':
        if (e - s < 6 || !hex4(s + 2, &cp)) return fail(ps, s, "invalid \\u escape");
        if (cp >= 0xD800 && cp <= 0xDBFF && e - s >= 12 && s[6] == '\\' && s[7] == 'u') {
          unsigned lo;
          if (!hex4(s + 8, &lo)) return fail(ps, s + 6, "invalid \\u escape");
          if (lo >= 0xDC00 && lo <= 0xDFFF) {   /* a surrogate pair: one code point */
            o = put_utf8(o, 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00));
            s += 12;
            continue;
          }
        }
        o = put_utf8(o, cp);
        s += 6;
        continue;
      default:
        return fail(ps, s, "invalid escape");
    }
    s += 2;
  }
  out->type = STELLA_STRING;
  out->u.string.ptr = (const char *)buf;
  out->u.string.len = (size_t)(o - buf);
  return 1;
}

#define ONES UINT64_C(0x0101010101010101)
#define HIGHS UINT64_C(0x8080808080808080)

/* Non-zero when one of the 8 bytes of w is '"', '\\' or below 0x20 (bit tricks: a
 * byte b < n sets its high bit in (w - n*ONES) & ~w & HIGHS). */
static uint64_t stops_in(uint64_t w) {
  uint64_t q = w ^ (ONES * '"'), b = w ^ (ONES * '\\');
  return ((w - ONES * 0x20) | (q - ONES) | (b - ONES)) & ~w & HIGHS;
}

/* The string whose opening quote is at ps->p. */
static int parse_string(parser *ps, stella_value *out) {
  const unsigned char *open = ps->p, *s = open + 1, *q = s, *end = ps->end;
  int escaped = 0;
  for (;;) {
    /* eight bytes at a time while none of them ends the plain run */
    while (end - q >= 8) {
      uint64_t w;
      memcpy(&w, q, 8);
      if (stops_in(w)) break;
      q += 8;
    }
    while (q < end && !string_stop[*q]) q++;
    if (q == end) return fail(ps, open, "unterminated string");
    if (*q == '"') break;
    if (*q == '\\') {
      if (end - q < 2) return fail(ps, open, "unterminated string");
      escaped = 1;
      q += 2;
      continue;
    }
    return fail(ps, q, "control character in string (escape it)");
  }
  ps->p = q + 1;
  if (escaped) return unescape(ps, s, q, out);
  out->type = STELLA_STRING;
  out->u.string.ptr = (const char *)s;
  out->u.string.len = (size_t)(q - s);
  return 1;
}

/* strtod reads the C locale's decimal point: give it that instead of '.'. */
static int to_double(parser *ps, const unsigned char *s, size_t n, double *out) {
  char stack[96], *buf = stack;
  const struct lconv *lc = localeconv();
  const char *dp = lc && lc->decimal_point && lc->decimal_point[0] ? lc->decimal_point : ".";
  size_t dpl = strlen(dp), i, k = 0;
  if (n > ((size_t)-1 - 1) / (dpl + 1)) return fail_oom(ps);
  if (n * dpl + 1 > sizeof stack) {
    buf = (char *)stella_arena_alloc(ps->arena, n * dpl + 1);
    if (buf == NULL) return fail_oom(ps);
  }
  for (i = 0; i < n; i++) {
    if (s[i] == '.') {
      memcpy(buf + k, dp, dpl);
      k += dpl;
    } else {
      buf[k++] = (char)s[i];
    }
  }
  buf[k] = '\0';
  *out = strtod(buf, NULL);
  return 1;
}

/* The number starting at ps->p ('-' or a digit). */
static int parse_number(parser *ps, stella_value *out) {
  const unsigned char *start = ps->p, *q = start, *end = ps->end;
  unsigned long long acc = 0;
  int neg = 0, fraction = 0, too_big = 0;
  if (*q == '-') {
    neg = 1;
    q++;
  }
  if (q == end || !IS_DIGIT(*q)) return fail(ps, q == end ? q : start, q == end
                                             ? "unexpected end of input" : "invalid number");
  if (*q == '0') {
    q++;
    if (q < end && IS_DIGIT(*q)) return fail(ps, start, "invalid number (leading zero)");
  } else {
    while (q < end && IS_DIGIT(*q)) {
      unsigned d = (unsigned)(*q - '0');
      if (acc > (ULLONG_MAX - d) / 10) too_big = 1;
      else acc = acc * 10 + d;
      q++;
    }
  }
  if (q < end && *q == '.') {
    fraction = 1;
    q++;
    if (q == end || !IS_DIGIT(*q)) return fail(ps, start, "invalid number");
    while (q < end && IS_DIGIT(*q)) q++;
  }
  if (q < end && (*q == 'e' || *q == 'E')) {
    fraction = 1;
    q++;
    if (q < end && (*q == '+' || *q == '-')) q++;
    if (q == end || !IS_DIGIT(*q)) return fail(ps, start, "invalid number");
    while (q < end && IS_DIGIT(*q)) q++;
  }
  ps->p = q;
  if (!fraction && !too_big) {
    if (!neg && acc <= (unsigned long long)LLONG_MAX) {
      set_int(out, (long long)acc);
      return 1;
    }
    if (neg && acc <= (unsigned long long)LLONG_MAX + 1) {
      /* -(acc - 1) - 1 never overflows, also for LLONG_MIN */
      set_int(out, acc == 0 ? 0 : -(long long)(acc - 1) - 1);
      return 1;
    }
  }
  {
    double d;
    if (!to_double(ps, start, (size_t)(q - start), &d)) return 0;
    *out = stella_double(d);
  }
  return 1;
}

static int parse_literal(parser *ps, const char *word, size_t n) {
  size_t avail = (size_t)(ps->end - ps->p), i;
  for (i = 0; i < n; i++) {
    if (i == avail) return fail(ps, ps->end, "unexpected end of input");
    if (ps->p[i] != (unsigned char)word[i]) return fail(ps, ps->p, "invalid literal (expected true, false or null)");
  }
  ps->p += n;
  return 1;
}

/* A scalar value at ps->p (the caller has ruled out '{' and '['). */
static int parse_scalar(parser *ps, stella_value *out) {
  switch (*ps->p) {
    case '"': return parse_string(ps, out);
    case 't':
      out->type = STELLA_BOOL;
      out->u.boolean = 1;
      return parse_literal(ps, "true", 4);
    case 'f':
      out->type = STELLA_BOOL;
      out->u.boolean = 0;
      return parse_literal(ps, "false", 5);
    case 'n':
      out->type = STELLA_NULL;
      return parse_literal(ps, "null", 4);
    default:
      if (*ps->p == '-' || IS_DIGIT(*ps->p)) return parse_number(ps, out);
      return fail(ps, ps->p, "unexpected character (expected a value)");
  }
}

/* An object member's key and ':' (ps->p after '{' or ',' and whitespace); pushes
 * the member, whose value comes next. */
static int begin_member(parser *ps) {
  stella_pair *pair;
  if (ps->p == ps->end) return fail(ps, ps->p, "unexpected end of input");
  if (*ps->p != '"') return fail(ps, ps->p, "unexpected character (expected a string key)");
  pair = push_pair(ps);
  if (pair == NULL) return fail_oom(ps);
  pair->value.type = STELLA_NIL;   /* set when the value is complete */
  if (!parse_string(ps, &pair->key)) return 0;
  skip_ws(ps);
  if (ps->p == ps->end) return fail(ps, ps->p, "unexpected end of input");
  if (*ps->p != ':') return fail(ps, ps->p, "unexpected character (expected ':' after the key)");
  ps->p++;
  return 1;
}

/* An array item: its key is its 1-based position. */
static int begin_item(parser *ps, size_t base) {
  stella_pair *pair = push_pair(ps);
  if (pair == NULL) return fail_oom(ps);
  set_int(&pair->key, (long long)(ps->len - base));
  pair->value.type = STELLA_NIL;
  return 1;
}

/* Where a complete value goes: the last member of the innermost open container, or
 * the document itself. Values are parsed straight into it (a copy through a local
 * costs a store-forwarding stall per value). */
#define SLOT(ps, depth, out) ((depth) ? &(ps)->work[(ps)->len - 1].value : (out))

static void set_table(stella_value *v, const frame *f, stella_pair *pairs, size_t n) {
  v->type = STELLA_TABLE;
  v->u.table.shape = f->object ? STELLA_SHAPE_OBJECT : STELLA_SHAPE_ARRAY;
  v->u.table.pairs = pairs;
  v->u.table.count = n;
}

static int parse(parser *ps, stella_value *out) {
  frame frames[STELLA_JSON_MAX_DEPTH];
  int depth = 0;
  for (;;) {
    /* a value starts here */
    skip_ws(ps);
    if (ps->p == ps->end) return fail(ps, ps->p, "unexpected end of input");
    if (*ps->p == '{' || *ps->p == '[') {
      frame *f;
      if (depth == STELLA_JSON_MAX_DEPTH) return fail(ps, ps->p, "nesting too deep");
      f = &frames[depth++];
      f->object = *ps->p == '{';
      f->base = ps->len;
      ps->p++;
      skip_ws(ps);
      if (ps->p < ps->end && *ps->p == (f->object ? '}' : ']')) {
        ps->p++;
        depth--;
        set_table(SLOT(ps, depth, out), f, NULL, 0);
      } else {
        if (!(f->object ? begin_member(ps) : begin_item(ps, f->base))) return 0;
        continue;   /* its first value */
      }
    } else if (!parse_scalar(ps, SLOT(ps, depth, out))) {
      return 0;
    }
    /* a value is complete: it is the document, or the value of the innermost
     * container's last member; after it comes ',' (the next value) or the
     * container's end, which completes the container one level up */
    for (;;) {
      frame *f;
      size_t n;
      stella_pair *pairs = NULL;
      if (depth == 0) {
        skip_ws(ps);
        if (ps->p != ps->end) return fail(ps, ps->p, "trailing characters after the document");
        return 1;
      }
      f = &frames[depth - 1];
      skip_ws(ps);
      if (ps->p == ps->end) return fail(ps, ps->p, "unexpected end of input");
      if (*ps->p == ',') {
        ps->p++;
        if (f->object) {
          skip_ws(ps);
          if (!begin_member(ps)) return 0;
        } else if (!begin_item(ps, f->base)) {
          return 0;
        }
        break;
      }
      if (*ps->p != (f->object ? '}' : ']'))
        return fail(ps, ps->p, f->object ? "unexpected character (expected ',' or '}')"
                                         : "unexpected character (expected ',' or ']')");
      ps->p++;
      /* close it: its members leave the work list for an array of their own */
      n = ps->len - f->base;
      pairs = (stella_pair *)stella_arena_alloc(ps->arena, n * sizeof *pairs);
      if (pairs == NULL) return fail_oom(ps);
      memcpy(pairs, ps->work + f->base, n * sizeof *pairs);
      ps->len = f->base;
      depth--;
      set_table(SLOT(ps, depth, out), f, pairs, n);
    }
  }
}

int stella_parse_json(stella_arena *a, const char *text, size_t len, stella_value *out,
                      stella_parse_error *err) {
  parser ps;
  stella_parse_error e;
  const unsigned char *s;
  if (text == NULL) text = "";   /* (with len 0): no arithmetic on a null pointer */
  ps.arena = a;
  ps.start = ps.p = (const unsigned char *)text;
  ps.end = ps.start + len;
  ps.work = NULL;
  ps.len = ps.cap = 0;
  ps.message = NULL;
  ps.at = NULL;
  ps.oom = 0;
  *out = stella_nil();
  if (parse(&ps, out)) {
    if (err) {
      err->offset = err->line = err->column = 0;
      err->message = NULL;
    }
    return 0;
  }
  *out = stella_nil();
  /* where: count lines and characters up to the error (only on failure) */
  e.offset = (size_t)(ps.at - ps.start);
  e.line = 1;
  e.column = 1;
  for (s = ps.start; s < ps.at; s++) {
    if (*s == '\n') {
      e.line++;
      e.column = 1;
    } else if ((*s & 0xC0) != 0x80) {
      e.column++;
    }
  }
  e.message = ps.message;
  if (err) *err = e;
  return ps.oom ? -1 : 1;
}
