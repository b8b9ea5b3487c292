/* lstella_encode.c - stella.encode's one pass: a Lua request table straight to canonical
 * JSON, making every check of stella_validate on the way, with no value tree in between.
 *
 * It only ever answers "valid, here are the bytes" or "not here": at the first problem,
 * and at anything unusual (a list kept in a table's hash part, more than 32 custom
 * properties), it gives up and lstella.c takes the value-tree path (to_value,
 * stella_validate, stella_encode_json), which decides and reports every error. So the
 * errors are written once, in stella_validate.c, and a valid request gives the same bytes
 * either way: spec/encode_direct_spec.lua runs the encode and validate specs, the
 * examples and generated variants through both and compares them.
 *
 * Field names are matched by pointer: the names are interned Lua strings (short strings
 * are interned by Lua 5.4 and every string by LuaJIT), anchored for the life of the
 * functions, and a key that is not one of them by address is not a field (or not a
 * short string), so the pass gives up and the tree path decides. */
#include <string.h>
#include "lstella_encode.h"
#include "stella_schema.h"

#define MAX_PROPS 32

/* A scalar member as read from Lua (strings stay anchored by the request table). */
typedef struct slot {
  int type;              /* LUA_TSTRING, LUA_TNUMBER, LUA_TBOOLEAN, LUA_TTABLE */
  const char *p;
  size_t len;
  long long i;
  double d;
  int is_int;            /* a number that counts as an integer (stella_double's rule) */
  int boolean;
} slot;

/* Bytes that a JSON string can carry as they are and that need no UTF-8 check: printable
 * ASCII but '"' and '\\'. */
static const unsigned char plain[256] = {
  0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0, 0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
  1,1,0,1,1,1,1,1,1,1,1,1,1,1,1,1, 1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,
  1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1, 1,1,1,1,1,1,1,1,1,1,1,1,0,1,1,1,
  1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1, 1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,0,
};

static void put(stella_buffer *b, const char *s, size_t len) {
  if (b->cap - b->len > len) {
    memcpy(b->data + b->len, s, len);
    b->len += len;
  } else {
    stella_buffer_add(b, s, len);
  }
}
#define PUT_CHAR(b, c) do { if ((b)->cap - (b)->len > 1) (b)->data[(b)->len++] = (c); \
                            else stella_buffer_add((b), &(char){ (c) }, 1); } while (0)

/* A string that must be valid UTF-8 (and non-empty unless allow_empty), written as JSON.
 * Printable ASCII goes straight through; anything else is checked and escaped as the
 * tree path does. Returns 0 when the string is not valid. */
static int text(stella_buffer *b, const char *s, size_t len, int allow_empty) {
  size_t i = 0;
  const unsigned char *u = (const unsigned char *)s;
  if (len == 0 && !allow_empty) return 0;
  while (i < len && plain[u[i]]) i++;
  if (i == len) {
    PUT_CHAR(b, '"');
    put(b, s, len);
    PUT_CHAR(b, '"');
    return 1;
  }
  if (!stella_utf8_valid(s + i, len - i)) return 0;
  /* a control character (not tab, LF, CR) does not validate: the tree path reports it */
  if (stella_find_control(s + i, len - i) != len - i) return 0;
  stella_json_string(b, s, len);
  return 1;
}

/* At most STELLA_MAX_TEXT_CHARS characters (bytes >= characters). */
static int short_enough(const char *s, size_t len) {
  return len <= STELLA_MAX_TEXT_CHARS || stella_utf8_length(s, len) <= STELLA_MAX_TEXT_CHARS;
}

static void read_number(lua_State *L, int idx, slot *v) {
  if (stella_isinteger(L, idx)) {
    v->i = stella_tointeger(L, idx);
    v->d = (double)v->i;
    v->is_int = 1;
  } else {
    double d = (double)lua_tonumber(L, idx);   /* stella_double's rule */
    v->d = d;
    v->is_int = d == d && d >= -9007199254740992.0 && d <= 9007199254740992.0 &&
                (double)(long long)d == d;
    v->i = v->is_int ? (long long)d : 0;
  }
}

/* tags: keys exactly 1..n met in order (the array part), n <= 20, each item a non-empty
 * UTF-8 string of at most 2000 characters. On failure the stack is left as it is (the
 * caller restores it). */
static int tags(lua_State *L, int t, stella_buffer *b) {
  size_t n = 0;
  PUT_CHAR(b, '[');
  lua_pushnil(L);
  while (lua_next(L, t)) {
    size_t len;
    const char *p;
#if LUA_VERSION_NUM == 501
    if (lua_type(L, -2) != LUA_TNUMBER || lua_tonumber(L, -2) != (lua_Number)(n + 1)) return 0;
#else
    if (!lua_isinteger(L, -2) || lua_tointeger(L, -2) != (lua_Integer)(n + 1)) return 0;
#endif
    if (n == STELLA_MAX_TAGS || lua_type(L, -1) != LUA_TSTRING) return 0;
    p = lua_tolstring(L, -1, &len);
    if (n) PUT_CHAR(b, ',');
    if (!text(b, p, len, 0) || !short_enough(p, len)) return 0;
    lua_pop(L, 1);
    n++;
  }
  PUT_CHAR(b, ']');
  return 1;
}

typedef struct prop {
  const char *k;
  size_t klen;
  slot v;
} prop;

static int prop_less(const prop *x, const prop *y) {   /* stella_key_compare on strings */
  size_t n = x->klen < y->klen ? x->klen : y->klen;
  int r = memcmp(x->k, y->k, n);
  return r ? r < 0 : x->klen < y->klen;
}

/* custom_properties: non-empty UTF-8 string keys; values finite numbers or UTF-8 strings
 * (empty allowed) of at most 2000 characters; written sorted by key. On failure the
 * stack is left as it is. */
static int props(lua_State *L, int t, stella_buffer *b) {
  prop list[MAX_PROPS];
  size_t n = 0, i, j;
  lua_pushnil(L);
  while (lua_next(L, t)) {
    prop *e;
    if (n == MAX_PROPS || lua_type(L, -2) != LUA_TSTRING) return 0;
    e = &list[n];
    e->k = lua_tolstring(L, -2, &e->klen);
    if (e->klen == 0 || !stella_utf8_valid(e->k, e->klen) ||
        stella_find_control(e->k, e->klen) != e->klen) return 0;
    e->v.type = lua_type(L, -1);
    if (e->v.type == LUA_TNUMBER) {
      read_number(L, -1, &e->v);
      if (!(e->v.d == e->v.d && e->v.d - e->v.d == 0)) return 0;
    } else if (e->v.type == LUA_TSTRING) {
      e->v.p = lua_tolstring(L, -1, &e->v.len);
      if (!stella_utf8_valid(e->v.p, e->v.len) || !short_enough(e->v.p, e->v.len) ||
          stella_find_control(e->v.p, e->v.len) != e->v.len) return 0;
    } else {
      return 0;
    }
    lua_pop(L, 1);
    n++;
  }
  for (i = 1; i < n; i++) {   /* insertion sort: a few keys */
    prop x = list[i];
    for (j = i; j > 0 && prop_less(&x, &list[j - 1]); j--) list[j] = list[j - 1];
    list[j] = x;
  }
  PUT_CHAR(b, '{');
  for (i = 0; i < n; i++) {
    if (i) PUT_CHAR(b, ',');
    stella_json_string(b, list[i].k, list[i].klen);
    PUT_CHAR(b, ':');
    if (list[i].v.type == LUA_TNUMBER) stella_json_number(b, list[i].v.is_int, list[i].v.i, list[i].v.d);
    else stella_json_string(b, list[i].v.p, list[i].v.len);
  }
  PUT_CHAR(b, '}');
  return 1;
}

static int in_channels(const stella_options *o, const slot *v) {
  size_t i;
  if (o == NULL || o->channels == NULL) return 1;
  for (i = 0; i < o->channel_count; i++) {
    size_t n = strlen(o->channels[i]);
    if (n == v->len && memcmp(o->channels[i], v->p, n) == 0) return 1;
  }
  return 0;
}

/* One field's value (present, of the type its field wants: checked by the caller). */
static int scalar(const field *f, const slot *v, const stella_options *o, stella_buffer *b) {
  switch (f->type) {
    case F_STRING: return text(b, v->p, v->len, 0);
    case F_EMAIL:
      return v->len <= STELLA_MAX_EMAIL_BYTES && stella_email_valid(v->p, v->len) &&
             text(b, v->p, v->len, 0);
    case F_ID:
      if (v->type == LUA_TNUMBER) {
        if (!v->is_int) return 0;
        stella_json_number(b, 1, v->i, v->d);
        return 1;
      }
      return text(b, v->p, v->len, 0);
    case F_URL: return !stella_has_space_or_control(v->p, v->len) && text(b, v->p, v->len, 0);
    case F_BOOL:
      if (v->boolean) put(b, "true", 4);
      else put(b, "false", 5);
      return 1;
    case F_CHANNEL: return in_channels(o, v) && text(b, v->p, v->len, 0);
    case F_LANGUAGE: return stella_language_valid(v->p, v->len) && text(b, v->p, v->len, 0);
    case F_COUNTRY:
      return v->len == 2 && stella_is_country_code(v->p, 2) && text(b, v->p, v->len, 0);
    default: return 0;
  }
}

/* The Lua type a field's value must have. */
static int wanted_type(const field *f) {
  switch (f->type) {
    case F_OBJECT: case F_TAGS: case F_PROPS: return LUA_TTABLE;
    case F_BOOL: return LUA_TBOOLEAN;
    case F_ID: return LUA_TNUMBER;   /* or a string: see below */
    default: return LUA_TSTRING;
  }
}

/* The object at stack index t against schema s. Tables of the members wait in stack slots
 * above `t` until their turn in schema order. */
static int object(lua_State *L, const lstella_names *nm, const schema *s, int t,
                  const stella_options *o, stella_buffer *b) {
  slot found[STELLA_MAX_FIELDS];
  const char *const *names = nm->ptr[s->id];
  unsigned present = 0;
  int base = lua_gettop(L), first = 1;
  size_t i, count = s->count;
  luaL_checkstack(L, (int)count + 4, "request too deep");
  lua_settop(L, base + (int)count);            /* the members' tables: base + 1 + i */
  lua_pushnil(L);
  while (lua_next(L, t)) {
    const char *k;
    int type;
    if (lua_type(L, -2) != LUA_TSTRING) return 0;
    k = lua_tostring(L, -2);
    for (i = 0; i < count && names[i] != k; i++) {}
    if (i == count) return 0;                   /* not a field (or not interned): tree path */
    type = lua_type(L, -1);
    if (type != wanted_type(&s->fields[i]) &&
        !(s->fields[i].type == F_ID && type == LUA_TSTRING)) return 0;
    found[i].type = type;
    if (type == LUA_TSTRING) found[i].p = lua_tolstring(L, -1, &found[i].len);
    else if (type == LUA_TNUMBER) read_number(L, -1, &found[i]);
    else if (type == LUA_TBOOLEAN) found[i].boolean = lua_toboolean(L, -1);
    else if (type == LUA_TTABLE) {
      lua_pushvalue(L, -1);
      lua_replace(L, base + 1 + (int)i);
    }
    present |= 1u << i;
    lua_pop(L, 1);
  }
  if (s->one_of[0] >= 0 && !(present & ((1u << s->one_of[0]) | (1u << s->one_of[1])))) return 0;
  PUT_CHAR(b, '{');
  for (i = 0; i < count; i++) {
    const field *f = &s->fields[i];
    int ok;
    if (!(present & (1u << i))) {
      if (f->required) return 0;
      continue;
    }
    if (!first) PUT_CHAR(b, ',');
    first = 0;
    put(b, f->key, f->key_len);
    switch (f->type) {
      case F_OBJECT: ok = object(L, nm, f->sub, base + 1 + (int)i, o, b); break;
      case F_TAGS: ok = tags(L, base + 1 + (int)i, b); break;
      case F_PROPS: ok = props(L, base + 1 + (int)i, b); break;
      default: ok = scalar(f, &found[i], o, b); break;
    }
    if (!ok) return 0;
  }
  PUT_CHAR(b, '}');
  lua_settop(L, base);
  return 1;
}

void lstella_push_names(lua_State *L, lstella_names *nm) {
  int id, n = 0;
  lua_newtable(L);
  for (id = 0; id < STELLA_SCHEMA_COUNT; id++) {
    const schema *s = stella_schema_by_id(id);
    size_t i;
    for (i = 0; i < s->count && i < STELLA_MAX_FIELDS; i++) {
      lua_pushlstring(L, s->fields[i].name, s->fields[i].name_len);
      nm->ptr[id][i] = lua_tostring(L, -1);
      lua_rawseti(L, -2, ++n);                  /* anchored: the address stays valid */
    }
  }
}

int lstella_encode_direct(lua_State *L, int idx, stella_endpoint endpoint, const stella_options *o,
                          const lstella_names *nm, stella_buffer *out) {
  int top = lua_gettop(L), ok;
  size_t start = out->len;
  ok = object(L, nm, stella_schema_for(endpoint), idx, o, out);
  lua_settop(L, top);
  if (!ok || out->oom) {
    int oom = ok && out->oom;
    out->len = start;
    out->oom = 0;
    return oom ? -1 : 0;
  }
  return 1;
}
