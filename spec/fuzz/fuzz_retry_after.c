/* fuzz_retry_after.c - libFuzzer harness: stella_parse_retry_after on arbitrary text
 * (up to the first NUL byte), at a few values of "now". Checked against plain
 * references:
 *   - the result is -1 or a delay in 0..86400000 ms, and whether it is -1 does not
 *     depend on now;
 *   - delta-seconds (digits, spaces around them) give min(seconds, 86400) * 1000,
 *     anything else starting with a digit is -1;
 *   - an IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT", years 1970..9999) is read:
 *     30 s before that instant it gives 30000, at the instant 0;
 *   - an HTTP-date gives 1000 ms more when now is one second earlier (until the cap). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "stella.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define DAY_MS 86400000L

static void fail(const char *why, const char *text, long long now, long got) {
  fprintf(stderr, "fuzz_retry_after: %s (\"%s\" at now %lld gave %ld)\n", why, text, now, got);
  abort();
}

/* delta-seconds: -2 if `s` is not of that form (does not start with a digit after
 * spaces), else the expected result */
static long ref_delta(const char *s) {
  long long secs = 0;
  while (*s == ' ') s++;
  if (*s < '0' || *s > '9') return -2;
  for (; *s >= '0' && *s <= '9'; s++)
    if ((secs = secs * 10 + (*s - '0')) > 86400) secs = 86400;
  while (*s == ' ') s++;
  return *s ? -1 : (long)secs * 1000;
}

/* days since 1970-01-01 of a proleptic Gregorian date (m 1..12, d may run past the
 * month's end: it then counts on into the next) */
static long long days_from_civil(long long y, int m, int d) {
  long long era, yoe, doy, doe;
  y -= m <= 2;
  era = (y >= 0 ? y : y - 399) / 400;
  yoe = y - era * 400;
  doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
  doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  return era * 146097 + doe - 719468;
}

static int two(const char *s, int max) {
  int v;
  if (s[0] < '0' || s[0] > '9' || s[1] < '0' || s[1] > '9') return -1;
  v = (s[0] - '0') * 10 + (s[1] - '0');
  return v <= max ? v : -1;
}

/* An IMF-fixdate exactly: 1 and the instant in *t, else 0. */
static int ref_imf_fixdate(const char *s, long long *t) {
  static const char days[] = "MonTueWedThuFriSatSun";
  static const char months[] = "JanFebMarAprMayJunJulAugSepOctNovDec";
  const char *p;
  int mday, mon = -1, year = 0, hh, mm, ss, i;
  if (strlen(s) != 29 || s[3] != ',' || s[4] != ' ' || s[7] != ' ' || s[11] != ' ' ||
      s[16] != ' ' || s[19] != ':' || s[22] != ':' || strcmp(s + 25, " GMT") != 0)
    return 0;
  for (p = days; *p && strncmp(p, s, 3) != 0; p += 3) {}
  if (*p == '\0') return 0;
  for (i = 0; i < 12; i++)
    if (strncmp(months + 3 * i, s + 8, 3) == 0) mon = i + 1;
  for (i = 12; i < 16; i++) {
    if (s[i] < '0' || s[i] > '9') return 0;
    year = year * 10 + (s[i] - '0');
  }
  mday = two(s + 5, 31);
  hh = two(s + 17, 23);
  mm = two(s + 20, 59);
  ss = two(s + 23, 60);   /* a leap second reads as the next minute's 0 */
  if (mon < 0 || mday < 1 || hh < 0 || mm < 0 || ss < 0 || year < 1970) return 0;
  *t = days_from_civil(year, mon, mday) * 86400 + hh * 3600 + mm * 60 + ss;
  return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static const long long nows[] = { 0, 784111777LL, 1700000000LL, 253402300799LL };
  char *s = (char *)malloc(size + 1);
  long got[4], want, r;
  long long t;
  size_t i;
  if (s == NULL) return 0;
  memcpy(s, data, size);
  s[size] = '\0';
  for (i = 0; i < 4; i++) {
    got[i] = stella_parse_retry_after(s, nows[i]);
    if (got[i] < -1 || got[i] > DAY_MS) fail("a result outside -1..86400000", s, nows[i], got[i]);
    if ((got[i] == -1) != (got[0] == -1)) fail("readable at one now but not at another", s, nows[i], got[i]);
  }
  want = ref_delta(s);
  if (want != -2) {
    if (got[0] != want) fail("delta-seconds read differently from the reference", s, 0, got[0]);
  } else if (got[0] >= 0) {
    for (i = 0; i < 4; i++) {   /* a date: one second earlier is one second more */
      if (got[i] >= DAY_MS) continue;
      r = stella_parse_retry_after(s, nows[i] - 1);
      if (got[i] > 0 ? r != got[i] + 1000 : r != 0 && r != 1000)
        fail("a date one second earlier does not give one second more", s, nows[i] - 1, r);
    }
  }
  if (ref_imf_fixdate(s, &t)) {
    r = stella_parse_retry_after(s, t - 30);
    if (r != 30000) fail("an IMF-fixdate 30 s ahead is not 30000", s, t - 30, r);
    r = stella_parse_retry_after(s, t);
    if (r != 0) fail("an IMF-fixdate at now is not 0", s, t, r);
  }
  free(s);
  return 0;
}
