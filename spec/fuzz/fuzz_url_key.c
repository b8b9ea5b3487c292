/* fuzz_url_key.c - libFuzzer harness: the checks of a client's base_url and api_key.
 * The input is "BASE_URL\0API_KEY" (without a NUL byte: the whole input is the key
 * and base_url is the default). Checked against plain references:
 *   - a key is accepted only if it is 1..400 printable ASCII bytes without spaces,
 *     and every such key is (when the base URL is accepted);
 *   - a base URL is accepted only if the URL libcurl will POST to (base_url without
 *     trailing '/', then "/v1/requests") is https://, or http:// to a host that is
 *     "localhost" or a numeric loopback address (inet_pton: 127.0.0.0/8 or ::1);
 *   - an error message has no part of the key: the same key with each of its bytes
 *     changed (keeping whether it is allowed) must give the same message.
 * No network I/O: creating a client only builds the libcurl handles. */
#define _POSIX_C_SOURCE 200112L
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <curl/curl.h>
#include "stella.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define DEFAULT_BASE "https://api.stellaconnect.net"

/* The check under test: 1 if a client with these options can be created, else 0 with
 * a message in err. (When the core exports the check on its own, call it here.) */
static int options_ok(const char *base_url, const char *api_key, char *err, size_t errlen) {
  stella_http_options o;
  stella_http *h;
  memset(&o, 0, sizeof o);
  o.base_url = base_url;
  o.api_key = api_key;
  h = stella_http_new(&o, err, errlen);
  stella_http_free(h);
  return h != NULL;
}

static void fail(const char *why, const char *base_url, const char *api_key) {
  fprintf(stderr, "fuzz_url_key: %s (base_url \"%s\", key of %zu bytes)\n", why,
          base_url ? base_url : "(default)", strlen(api_key));
  abort();
}

static int ref_key_ok(const char *key) {
  size_t n = strlen(key), i;
  if (n == 0 || n > 400) return 0;
  for (i = 0; i < n; i++)
    if ((unsigned char)key[i] < 0x21 || (unsigned char)key[i] > 0x7E) return 0;
  return 1;
}

static int ref_loopback(const char *host) {
  struct in_addr a4;
  struct in6_addr a6;
  char inner[256];
  size_t n = strlen(host);
  if (strcmp(host, "localhost") == 0) return 1;
  if (inet_pton(AF_INET, host, &a4) == 1) return (ntohl(a4.s_addr) >> 24) == 127;
  if (n >= 2 && n < sizeof inner + 2 && host[0] == '[' && host[n - 1] == ']') {
    memcpy(inner, host + 1, n - 2);
    inner[n - 2] = '\0';
    return inet_pton(AF_INET6, inner, &a6) == 1 && IN6_IS_ADDR_LOOPBACK(&a6);
  }
  return 0;
}

/* Where the key would go: the URL stella_http_post builds, parsed as libcurl parses
 * CURLOPT_URL. 1 when that is https://, or http:// to loopback (or does not parse,
 * so nothing is sent). */
static int ref_destination_ok(const char *base_url) {
  const char *base = base_url ? base_url : DEFAULT_BASE;
  size_t n = strlen(base);
  char *url;
  CURLU *u;
  char *scheme = NULL, *host = NULL;
  int ok = 1;
  while (n && base[n - 1] == '/') n--;
  url = (char *)malloc(n + sizeof "/v1/requests");
  u = curl_url();
  if (url == NULL || u == NULL) abort();
  memcpy(url, base, n);
  memcpy(url + n, "/v1/requests", sizeof "/v1/requests");
  if (curl_url_set(u, CURLUPART_URL, url, CURLU_GUESS_SCHEME | CURLU_NON_SUPPORT_SCHEME) == CURLUE_OK &&
      curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
      curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK)
    ok = strcmp(scheme, "https") == 0 || (strcmp(scheme, "http") == 0 && ref_loopback(host));
  curl_free(scheme);
  curl_free(host);
  curl_url_cleanup(u);
  free(url);
  return ok;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc; (void)argv;
  curl_global_init(CURL_GLOBAL_DEFAULT);   /* once, so each client does not redo it */
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *buf = (char *)malloc(size + 1), *other, *base_url = NULL, *api_key;
  const char *nul;
  char err[256], err2[256];
  size_t i, klen;
  int ok, ok2;
  if (buf == NULL) return 0;
  memcpy(buf, data, size);
  buf[size] = '\0';
  nul = (const char *)memchr(buf, '\0', size);
  if (nul) { base_url = buf; api_key = buf + (nul - buf) + 1; }
  else api_key = buf;
  err[0] = '\0';
  ok = options_ok(base_url, api_key, err, sizeof err);
  if (ok) {
    if (!ref_key_ok(api_key)) fail("a key the reference refuses is accepted", base_url, api_key);
    if (!ref_destination_ok(base_url))
      fail("a base URL that sends the key over plain http to a non-loopback host is accepted",
           base_url, api_key);
  } else {
    if (err[0] == '\0' || memchr(err, '\0', sizeof err) == NULL)
      fail("a refusal without a message", base_url, api_key);
  }
  /* the same key with every byte changed, keeping which are allowed */
  klen = strlen(api_key);
  other = (char *)malloc(klen + 1);
  if (other == NULL) abort();
  for (i = 0; i <= klen; i++) {
    unsigned char c = (unsigned char)api_key[i];
    other[i] = (char)(c >= 0x21 && c <= 0x7E ? 0x21 + (c - 0x21 + 47) % 94 : c);
  }
  err2[0] = '\0';
  ok2 = options_ok(base_url, other, err2, sizeof err2);
  if (ok2 != ok) fail("accepting a key depends on its bytes, not only on which are allowed", base_url, api_key);
  if (!ok && strcmp(err, err2) != 0) fail("an error message depends on the key's bytes", base_url, api_key);
  free(other);
  free(buf);
  return 0;
}
