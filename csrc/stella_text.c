/* stella_text.c - UTF-8, e-mail and language-tag checks. */
#include <stdint.h>
#include <string.h>
#include "stella.h"

/* Byte classes for the e-mail grammar: 1 = letter or digit, 2 = other atext
 * or '.', 0 = anything else. A table keeps the per-byte test to one load. */
static const unsigned char email_class[256] = {
  0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0, 0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,
  /*  !"#$%&'()*+,-./ */ 0,2,0,2,2,2,2,2,0,0,2,2,0,2,2,2,
  /* 0-9:;<=>? */ 1,1,1,1,1,1,1,1,1,1,0,0,0,2,0,2,
  /* @A-O */ 0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,
  /* P-Z[\]^_ */ 1,1,1,1,1,1,1,1,1,1,1,0,0,0,2,2,
  /* `a-o */ 2,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,
  /* p-z{|}~DEL */ 1,1,1,1,1,1,1,1,1,1,1,2,2,2,2,0,
};

/* Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing past U+10FFFF. */
int stella_utf8_valid(const char *str, size_t len) {
  const unsigned char *s = (const unsigned char *)str, *end = s + len;
  while (s < end) {
    unsigned char c = *s;
    if (c < 0x80) {
      /* ASCII runs: eight bytes at a time */
      while (end - s >= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        if (w & UINT64_C(0x8080808080808080)) break;
        s += 8;
      }
      while (s < end && *s < 0x80) s++;
      continue;
    }
    if (c >= 0xC2 && c <= 0xDF) {
      if (end - s < 2 || (s[1] & 0xC0) != 0x80) return 0;
      s += 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      if (end - s < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) return 0;
      if (c == 0xE0 && s[1] < 0xA0) return 0;   /* overlong */
      if (c == 0xED && s[1] > 0x9F) return 0;   /* surrogates */
      s += 3;
    } else if (c >= 0xF0 && c <= 0xF4) {
      if (end - s < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 ||
          (s[3] & 0xC0) != 0x80) return 0;
      if (c == 0xF0 && s[1] < 0x90) return 0;   /* overlong */
      if (c == 0xF4 && s[1] > 0x8F) return 0;   /* > U+10FFFF */
      s += 4;
    } else {
      return 0;
    }
  }
  return 1;
}

size_t stella_utf8_length(const char *str, size_t len) {
  const unsigned char *s = (const unsigned char *)str;
  size_t i, n = 0;
  for (i = 0; i < len; i++)
    if ((s[i] & 0xC0) != 0x80) n++;
  return n;
}

#define is_alnum(c) (email_class[(unsigned char)(c)] == 1)
#define is_local_char(c) (email_class[(unsigned char)(c)] != 0)

/* The WHATWG HTML "valid e-mail address":
 *   1*( atext / "." ) "@" label *( "." label ), label = alnum [ *61(alnum / "-") alnum ]
 * plus the SMTP path limit of 254 bytes, which callers check separately. */
int stella_email_valid(const char *str, size_t len) {
  const unsigned char *s = (const unsigned char *)str;
  size_t i = 0, label;
  while (i < len && s[i] != '@') {
    if (!is_local_char(s[i])) return 0;
    i++;
  }
  if (i == 0 || i >= len) return 0;   /* empty local part or no '@' */
  i++;                                 /* skip '@' */
  if (i >= len) return 0;
  for (;;) {
    size_t start = i;
    while (i < len && (is_alnum(s[i]) || s[i] == '-')) i++;
    label = i - start;
    if (label == 0 || label > 63) return 0;
    if (s[start] == '-' || s[i - 1] == '-') return 0;
    if (i == len) return 1;
    if (s[i] != '.') return 0;
    i++;
  }
}

/* language: ISO 639-1 code, optionally "-" and an ISO 3166-1 alpha-2 code or a
 * UN M.49 area code (the form the service documents: "en", "en-US", "es-419"). */
int stella_language_valid(const char *s, size_t len) {
  if (len < 2 || !stella_is_language_code(s, 2)) return 0;
  if (len == 2) return 1;
  if (s[2] != '-') return 0;
  if (len == 5) return stella_is_country_code(s + 3, 2);
  if (len == 6) return stella_is_m49_area_code(s + 3, 3);
  return 0;
}
