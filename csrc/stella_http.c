/* stella_http.c - one libcurl easy handle per client, driven through the client's own
 * multi handle: POST a body (blocking, or started and then stepped without blocking),
 * collect the answer in a buffer owned by the client; stella_outcome.c classifies it. Every transfer
 * goes through the same multi handle, so blocking and non-blocking posts share one
 * keep-alive connection.
 *
 * Two paths. https:// (TLS, proxies, HTTP/2 where the server offers it) is libcurl's
 * whole transfer. Plain http:// (a loopback host only: the sandbox, test servers) is the
 * fast path: libcurl opens the connection (CURLOPT_CONNECT_ONLY, its connect timeout and
 * connection count), and this file writes the request bytes itself, the same bytes
 * libcurl writes, and reads the answer with stella_answer.c, which reads it as libcurl
 * does; a failure carries the libcurl code libcurl gives for it. It saves libcurl's
 * per-transfer set-up (URL, header list, status-line parsing, connection cache,
 * allocations) and half the system calls (libcurl polls the socket three or four times
 * per request); see README "Benchmarks". */
#define _POSIX_C_SOURCE 200112L   /* nanosleep (for libcurl < 7.66), clock_gettime, poll */
#include <ctype.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <curl/curl.h>
#include "stella.h"
#include "stella_answer.h"

/* The fast path's state between calls (phase). */
enum { FAST_IDLE = 0, FAST_CONNECTING, FAST_SENDING, FAST_RECEIVING };

struct stella_http {
  CURL *easy;
  CURLM *multi;
  int running;                  /* a transfer is in the multi handle */
  stella_buffer request;        /* the body being sent (a copy: the caller's may go) */
  struct curl_slist *headers;
  char *base_url;               /* without trailing '/' */
  size_t base_len;
  stella_buffer url;            /* base_url .. path: the URL the handle has */
  stella_buffer body;           /* response body of the last call */
  char content_type[128];
  char retry_after[128];
  long connects;
  int too_large;                /* the answer's body passed STELLA_MAX_ANSWER_BYTES */
  char errbuf[CURL_ERROR_SIZE];
  char message[CURL_ERROR_SIZE + 64];
  /* the fast path (plain http) */
  int fast;                     /* 1: this client takes it */
  int phase;                    /* FAST_IDLE while no post runs */
  int in_multi;                 /* the easy handle is in the multi: connecting, or holding
                                 * the connection (removing it closes the connection) */
  curl_socket_t sock;           /* the connection, CURL_SOCKET_BAD when none */
  int reused;                   /* this post went out on a connection kept from before */
  int retried;                  /* this post was sent again on a fresh connection */
  short want;                   /* POLLIN or POLLOUT: what the post waits for */
  long timeout_ms;
  long long started, deadline;  /* ms on the monotonic clock */
  stella_buffer head;           /* "POST TARGET HTTP/1.1\r\n...Content-Length: " (holds the key) */
  stella_buffer out;            /* the request being sent: head, length, body */
  size_t out_off;
  stella_buffer in;             /* bytes received and not yet taken by the answer */
  size_t in_off;
  stella_answer answer;
  char *key;                    /* the API key (wiped on free) */
  char *user_agent;
};

/* ---------- option checks (also exported: the cosocket transport uses them) ---------- */

#define BAD_URL "base_url is not a valid URL (expected https://HOST)"
#define MAX_KEY 400

static int say(char *err, size_t errlen, const char *msg) {
  snprintf(err, errlen, "%s", msg);
  return 0;
}

int stella_check_key(const char *key, size_t len, char *err, size_t errlen) {
  const unsigned char *s = (const unsigned char *)key;
  size_t i;
  if (s == NULL || len == 0)
    return say(err, errlen, "api_key must be a non-empty string without whitespace or control characters");
  for (i = 0; i < len; i++)
    if (s[i] <= 0x20 || s[i] >= 0x7F)   /* no NUL, whitespace, controls or non-ASCII */
      return say(err, errlen, "api_key must be a non-empty string without whitespace or control characters");
  if (len > MAX_KEY) return say(err, errlen, "api_key is too long");
  return 1;
}

int stella_check_user_agent(const char *ua, size_t len, char *err, size_t errlen) {
  size_t i;
  for (i = 0; ua != NULL && i < len; i++)
    if ((unsigned char)ua[i] < 0x20 || ua[i] == 0x7F)   /* a header line must not break */
      return say(err, errlen, "user_agent must not contain control characters");
  return 1;
}

/* 127.x.y.z in strict dotted decimal (as inet_pton reads it): four parts of 1-3 digits
 * without leading zeros, each <= 255. Anything else ("127.0.0.300", "127.00..2") is a
 * name that libcurl would resolve through DNS, maybe to another host. */
static int loopback_ipv4(const char *host) {
  const char *p = host;
  int parts = 0;
  if (strncmp(host, "127.", 4) != 0) return 0;
  for (;;) {
    int v = 0, digits = 0;
    while (isdigit((unsigned char)*p) && digits < 4) { v = v * 10 + (*p - '0'); digits++; p++; }
    if (digits == 0 || digits > 3 || v > 255 || (digits > 1 && p[-digits] == '0')) return 0;
    parts++;
    if (*p == '\0') return parts == 4;
    if (*p != '.' || parts == 4) return 0;
    p++;
  }
}

static int host_is_loopback(const char *host) {
  if (strcmp(host, "localhost") == 0 || strcmp(host, "[::1]") == 0 || strcmp(host, "::1") == 0)
    return 1;
  return loopback_ipv4(host);
}

/* host_is_loopback on the host stella_check_base_url found (not NUL-terminated). */
static int url_host_is_loopback(const stella_base_url *u) {
  char host[64];
  if (u->host_len == 0 || u->host_len >= sizeof host) return 0;
  memcpy(host, u->host, u->host_len);
  host[u->host_len] = '\0';
  return host_is_loopback(host);
}

/* Finds host, port and path in `url` (already checked by libcurl, without user
 * credentials, query or fragment): SCHEME://HOST[:PORT][/PATH]. A host is a name of
 * letters, digits, '.', '-' and '_', or a bracketed IPv6 address. */
static int locate_parts(const char *url, size_t len, stella_base_url *out) {
  const char *p = strstr(url, "://"), *end = url + len, *h, *q;
  if (p == NULL) return 0;
  h = p + 3;
  if (*h == '[') {
    for (q = h + 1; q < end && (isxdigit((unsigned char)*q) || *q == ':' || *q == '.'); q++) {}
    if (q == end || *q != ']' || q == h + 1) return 0;
    q++;
  } else {
    for (q = h; q < end && (isalnum((unsigned char)*q) || *q == '.' || *q == '-' || *q == '_'); q++) {}
    if (q == h) return 0;
  }
  out->host = h;
  out->host_len = (size_t)(q - h);
  if (q < end && *q == ':') {
    long port = 0;
    const char *d = q + 1;
    for (q = d; q < end && isdigit((unsigned char)*q) && q - d < 5; q++) port = port * 10 + (*q - '0');
    if (q == d || port < 1 || port > 65535) return 0;
    out->port = port;
  }
  if (q < end && *q != '/') return 0;
  out->path = q;
  out->path_len = (size_t)(end - q);
  while (out->path_len && out->path[out->path_len - 1] == '/') out->path_len--;
  return 1;
}

/* 1 when the authority (between "://" and the path) holds an '@'. */
static int has_userinfo(const char *url) {
  const char *a = strstr(url, "://"), *slash;
  if (a == NULL) return 0;
  a += 3;
  slash = strchr(a, '/');
  return memchr(a, '@', slash ? (size_t)(slash - a) : strlen(a)) != NULL;
}

/* https:// anywhere; http:// only to a loopback host, so keys never cross a network in
 * clear; no credentials, query or fragment. */
int stella_check_base_url(const char *url, size_t len, stella_base_url *out, char *err, size_t errlen) {
  CURLU *u;
  char *scheme = NULL, *host = NULL, *part = NULL;
  int ok = 0;
  size_t i;
  memset(out, 0, sizeof *out);
  if (url == NULL || len == 0) return say(err, errlen, BAD_URL);
  for (i = 0; i < len; i++)   /* no NUL, spaces, controls or non-ASCII */
    if ((unsigned char)url[i] <= 0x20 || (unsigned char)url[i] >= 0x7F) return say(err, errlen, BAD_URL);
  if (url[len] != '\0') return say(err, errlen, BAD_URL);   /* a counted string must end there */
  u = curl_url();
  if (u == NULL) return say(err, errlen, "out of memory");
  if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
      curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
      curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK) {
    say(err, errlen, BAD_URL);
  } else if (curl_url_get(u, CURLUPART_QUERY, &part, 0) == CURLUE_OK || strchr(url, '?')) {
    say(err, errlen, "base_url must not have a query string");
  } else if (curl_url_get(u, CURLUPART_FRAGMENT, &part, 0) == CURLUE_OK || strchr(url, '#')) {
    say(err, errlen, "base_url must not have a fragment");
  } else if (curl_url_get(u, CURLUPART_USER, &part, 0) == CURLUE_OK || has_userinfo(url)) {
    say(err, errlen, "base_url must not hold user credentials");
  } else if (strcmp(scheme, "https") != 0 && strcmp(scheme, "http") != 0) {
    say(err, errlen, "base_url must use https:// (or http:// to a loopback host)");
  } else if (strcmp(scheme, "http") == 0 && !host_is_loopback(host)) {
    say(err, errlen, "base_url uses plain http:// to a non-loopback host; use https:// "
                     "(the API key must not cross a network in clear)");
  } else {
    out->tls = strcmp(scheme, "https") == 0;
    out->port = out->tls ? 443 : 80;
    ok = locate_parts(url, len, out);
    if (!ok) say(err, errlen, BAD_URL);
    out->port_given = ok && out->port != (out->tls ? 443 : 80);
  }
  curl_free(scheme);
  curl_free(host);
  curl_free(part);
  curl_url_cleanup(u);
  return ok;
}

/* ---------- callbacks (no Lua here: only the client's own buffers) ------------ */

static size_t on_body(char *ptr, size_t size, size_t nmemb, void *userdata) {
  stella_http *h = (stella_http *)userdata;
  size_t n = size * nmemb;
  /* one cap for both transports: a longer answer ends the transfer (CURLE_WRITE_ERROR) */
  if (n > (size_t)STELLA_MAX_ANSWER_BYTES - h->body.len) { h->too_large = 1; return 0; }
  stella_buffer_add(&h->body, ptr, n);
  return h->body.oom ? 0 : n;
}

/* Copies the value of header `name` if `line` is that header. */
static void take_header(const char *line, size_t len, const char *name, char *out, size_t outlen) {
  size_t nlen = strlen(name), i;
  if (len <= nlen || line[nlen] != ':') return;
  for (i = 0; i < nlen; i++)
    if (tolower((unsigned char)line[i]) != name[i]) return;
  line += nlen + 1;
  len -= nlen + 1;
  while (len && (*line == ' ' || *line == '\t')) { line++; len--; }
  while (len && (line[len - 1] == '\r' || line[len - 1] == '\n' || line[len - 1] == ' ')) len--;
  if (len >= outlen) len = outlen - 1;
  memcpy(out, line, len);
  out[len] = '\0';
}

static size_t on_header(char *line, size_t size, size_t nmemb, void *userdata) {
  stella_http *h = (stella_http *)userdata;
  size_t n = size * nmemb;
  if (n >= 5 && memcmp(line, "HTTP/", 5) == 0) {
    /* a new response (e.g. after 100 Continue): forget the previous one's headers */
    h->content_type[0] = '\0';
    h->retry_after[0] = '\0';
    h->body.len = 0;
  }
  take_header(line, n, "content-type", h->content_type, sizeof h->content_type);
  take_header(line, n, "retry-after", h->retry_after, sizeof h->retry_after);
  return n;
}

/* ---------- life cycle ------------------------------------------------------------ */

static char *dup_string(const char *s) {
  size_t n = strlen(s) + 1;
  char *d = (char *)malloc(n);
  if (d) memcpy(d, s, n);
  return d;
}

stella_http *stella_http_new(const stella_http_options *o, char *err, size_t errlen) {
  stella_http *h;
  const char *base = o->base_url ? o->base_url : STELLA_DEFAULT_BASE_URL;
  char line[512], ua[64];
  stella_base_url parts;
  struct curl_slist *tmp;

  if (!stella_check_key(o->api_key, o->api_key ? strlen(o->api_key) : 0, err, errlen) ||
      !stella_check_base_url(base, strlen(base), &parts, err, errlen) ||
      !stella_check_user_agent(o->user_agent, o->user_agent ? strlen(o->user_agent) : 0, err, errlen))
    return NULL;
  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
    snprintf(err, errlen, "libcurl could not be initialised");
    return NULL;
  }
  h = (stella_http *)calloc(1, sizeof *h);
  if (h == NULL) { curl_global_cleanup(); snprintf(err, errlen, "out of memory"); return NULL; }
  stella_buffer_init(&h->url);
  stella_buffer_init(&h->body);
  stella_buffer_init(&h->request);
  stella_buffer_init(&h->head);
  stella_buffer_init(&h->out);
  stella_buffer_init(&h->in);
  h->sock = CURL_SOCKET_BAD;
  h->fast = !parts.tls;
  h->timeout_ms = o->timeout_ms > 0 ? o->timeout_ms : 30000L;
  h->base_len = strlen(base);
  while (h->base_len && base[h->base_len - 1] == '/') h->base_len--;
  h->base_url = (char *)malloc(h->base_len + 1);
  h->easy = curl_easy_init();
  h->multi = curl_multi_init();
  if (h->base_url == NULL || h->easy == NULL || h->multi == NULL) goto oom;
  memcpy(h->base_url, base, h->base_len);
  h->base_url[h->base_len] = '\0';
  snprintf(ua, sizeof ua, "lua-stella/%s", STELLA_VERSION);
  if (h->fast) {
    h->key = dup_string(o->api_key);
    h->user_agent = dup_string(o->user_agent ? o->user_agent : ua);
    if (h->key == NULL || h->user_agent == NULL) goto oom;
  }

  tmp = curl_slist_append(NULL, "Accept: application/json");
  if (tmp) h->headers = tmp;
  tmp = tmp ? curl_slist_append(h->headers, "Content-Type: application/json") : NULL;
  tmp = tmp ? curl_slist_append(h->headers, "Expect:") : NULL;   /* no 100-continue round trip */
  if (tmp) {
    snprintf(line, sizeof line, "x-api-key: %s", o->api_key);
    tmp = curl_slist_append(h->headers, line);
    memset(line, 0, sizeof line);   /* don't leave the key on the stack */
  }
  if (tmp == NULL) goto oom;

  curl_easy_setopt(h->easy, CURLOPT_HTTPHEADER, h->headers);
  curl_easy_setopt(h->easy, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h->easy, CURLOPT_ERRORBUFFER, h->errbuf);
  curl_easy_setopt(h->easy, CURLOPT_TIMEOUT_MS, h->timeout_ms);
  curl_easy_setopt(h->easy, CURLOPT_CONNECTTIMEOUT_MS,
                   o->connect_timeout_ms > 0 ? o->connect_timeout_ms : 10000L);
  curl_easy_setopt(h->easy, CURLOPT_SSL_VERIFYPEER, 1L);
  curl_easy_setopt(h->easy, CURLOPT_SSL_VERIFYHOST, 2L);
  curl_easy_setopt(h->easy, CURLOPT_FOLLOWLOCATION, 0L);   /* a redirect must not carry the key */
  curl_easy_setopt(h->easy, CURLOPT_TCP_NODELAY, 1L);
  curl_easy_setopt(h->easy, CURLOPT_TCP_KEEPALIVE, 1L);
#if LIBCURL_VERSION_NUM >= 0x075500
  curl_easy_setopt(h->easy, CURLOPT_PROTOCOLS_STR, "http,https");
#else
  curl_easy_setopt(h->easy, CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
  if (o->ca_file) curl_easy_setopt(h->easy, CURLOPT_CAINFO, o->ca_file);
  curl_easy_setopt(h->easy, CURLOPT_USERAGENT, o->user_agent ? o->user_agent : ua);
  curl_easy_setopt(h->easy, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(h->easy, CURLOPT_WRITEDATA, h);
  curl_easy_setopt(h->easy, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(h->easy, CURLOPT_HEADERDATA, h);
  curl_easy_setopt(h->easy, CURLOPT_POST, 1L);
  /* an announced Content-Length over the cap fails before the body (CURLE_FILESIZE_EXCEEDED) */
  curl_easy_setopt(h->easy, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)STELLA_MAX_ANSWER_BYTES);
  /* A loopback host is never reached through a proxy (http_proxy, ALL_PROXY, ...): the
   * sandbox and test servers are local, and plain http:// (loopback only) would hand the
   * key to the proxy in clear. https:// elsewhere honours the proxy variables (a CONNECT
   * tunnel keeps TLS end to end). */
  if (url_host_is_loopback(&parts)) curl_easy_setopt(h->easy, CURLOPT_NOPROXY, "*");
  if (h->fast) {   /* libcurl only connects: to the base URL's host and port */
    curl_easy_setopt(h->easy, CURLOPT_CONNECT_ONLY, 1L);
    curl_easy_setopt(h->easy, CURLOPT_URL, h->base_url);
  }
  return h;

oom:
  stella_http_free(h);
  snprintf(err, errlen, "out of memory");
  return NULL;
}

/* Zeroes a buffer's bytes (they may hold the key), then frees it. */
static void wipe(stella_buffer *b) {
  if (b->data) memset(b->data, 0, b->cap);
  stella_buffer_free(b);
}

void stella_http_free(stella_http *h) {
  if (h == NULL) return;
  if (h->running || h->in_multi) curl_multi_remove_handle(h->multi, h->easy);   /* abandons it */
  if (h->easy) curl_easy_cleanup(h->easy);
  if (h->multi) curl_multi_cleanup(h->multi);
  if (h->headers) {
    struct curl_slist *s;
    for (s = h->headers; s; s = s->next)   /* wipe the key before the memory is reused */
      memset(s->data, 0, strlen(s->data));
    curl_slist_free_all(h->headers);
  }
  free(h->base_url);
  stella_buffer_free(&h->url);
  stella_buffer_free(&h->body);
  stella_buffer_free(&h->request);
  wipe(&h->head);
  wipe(&h->out);
  stella_buffer_free(&h->in);
  if (h->key) memset(h->key, 0, strlen(h->key));
  free(h->key);
  free(h->user_agent);
  free(h);
  curl_global_cleanup();
}

long stella_http_connects(const stella_http *h) {
  return h->connects;
}

/* ---------- one POST ------------------------------------------------------------------ */

static stella_outcome fail(stella_http_result *res, stella_outcome o, const char *msg) {
  res->outcome = o;
  res->error = msg;
  return o;
}

#define ADD_LIT(b, lit) stella_buffer_add((b), (lit), sizeof(lit) - 1)

/* The fast path's request head for h->url, up to the Content-Length value: the bytes
 * libcurl writes for it (the request target as libcurl's URL parser makes it, dot
 * segments removed; Host with the port unless 80; User-Agent unless empty; then the
 * client's header list). 0 when libcurl would refuse the URL. */
static int build_head(stella_http *h) {
  CURLU *u = curl_url();
  char *path = NULL, *query = NULL, *host = NULL, *port = NULL;
  int ok = 0;
  if (u && curl_url_set(u, CURLUPART_URL, h->url.data, 0) == CURLUE_OK &&
      curl_url_get(u, CURLUPART_PATH, &path, CURLU_URLENCODE) == CURLUE_OK &&
      curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK) {
    if (curl_url_get(u, CURLUPART_QUERY, &query, 0) != CURLUE_OK) query = NULL;
    if (curl_url_get(u, CURLUPART_PORT, &port, 0) != CURLUE_OK) port = NULL;
    h->head.len = 0;
    h->head.oom = 0;
    ADD_LIT(&h->head, "POST ");
    stella_buffer_add(&h->head, path, strlen(path));
    if (query) {
      stella_buffer_add(&h->head, "?", 1);
      stella_buffer_add(&h->head, query, strlen(query));
    }
    ADD_LIT(&h->head, " HTTP/1.1\r\nHost: ");
    stella_buffer_add(&h->head, host, strlen(host));
    if (port && strcmp(port, "80") != 0) {
      stella_buffer_add(&h->head, ":", 1);
      stella_buffer_add(&h->head, port, strlen(port));
    }
    if (h->user_agent[0]) {
      ADD_LIT(&h->head, "\r\nUser-Agent: ");
      stella_buffer_add(&h->head, h->user_agent, strlen(h->user_agent));
    }
    ADD_LIT(&h->head, "\r\nAccept: application/json\r\nContent-Type: application/json\r\nx-api-key: ");
    stella_buffer_add(&h->head, h->key, strlen(h->key));
    ADD_LIT(&h->head, "\r\nContent-Length: ");
    ok = h->head.oom ? 0 : 1;
  }
  curl_free(path);
  curl_free(query);
  curl_free(host);
  curl_free(port);
  curl_url_cleanup(u);
  return ok;
}

/* The handle keeps its URL between transfers: it is set again only when the path changes
 * (h->url holds the URL last set). Returns 1, 0 when out of memory, -1 for a URL libcurl
 * refuses (the fast path; libcurl's own transfer says so when it starts). */
static int set_url(stella_http *h, const char *path) {
  size_t plen = strlen(path);
  if (h->url.data && h->url.len == h->base_len + plen &&
      memcmp(h->url.data + h->base_len, path, plen) == 0)
    return 1;
  h->url.len = 0;
  h->url.oom = 0;
  stella_buffer_add(&h->url, h->base_url, h->base_len);
  stella_buffer_add(&h->url, path, plen);
  stella_buffer_add(&h->url, "", 0);
  if (h->url.oom) {
    h->url.len = 0;   /* not the URL the handle has */
    return 0;
  }
  if (h->fast) return build_head(h) ? 1 : (h->url.len = 0, -1);
  curl_easy_setopt(h->easy, CURLOPT_URL, h->url.data);
  return 1;
}

static stella_outcome fast_start(stella_http *h, const char *path, const char *body, size_t body_len,
                                 stella_http_result *res);

/* Starts a POST. copy: 1 to send a copy of the body (the caller's may go before the
 * transfer ends), 0 to send the caller's bytes (stella_http_post, which waits for the end). */
static stella_outcome start(stella_http *h, const char *path, const char *body, size_t body_len,
                            stella_http_result *res, int copy) {
  memset(res, 0, sizeof *res);
  res->retry_after_ms = -1;
  if (h->running) return fail(res, STELLA_OUTCOME_INTERNAL, "a transfer is already running on this client");
  if (h->fast) return fast_start(h, path, body, body_len, res);
  h->body.len = 0;
  h->body.oom = 0;
  h->too_large = 0;
  h->content_type[0] = h->retry_after[0] = h->errbuf[0] = '\0';
  stella_buffer_add(&h->body, "", 0);   /* make sure body.data is a valid string */
  if (copy) {
    h->request.len = 0;
    h->request.oom = 0;
    stella_buffer_add(&h->request, body, body_len);
    body = h->request.data;
  }
  if (!set_url(h, path) || h->body.oom || (copy && h->request.oom))
    return fail(res, STELLA_OUTCOME_INTERNAL, "out of memory");
  curl_easy_setopt(h->easy, CURLOPT_POSTFIELDS, body ? body : "");
  curl_easy_setopt(h->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
  if (curl_multi_add_handle(h->multi, h->easy) != CURLM_OK)
    return fail(res, STELLA_OUTCOME_INTERNAL, "libcurl refused the transfer");
  h->running = 1;
  return STELLA_OUTCOME_OK;
}

stella_outcome stella_http_start(stella_http *h, const char *path, const char *body,
                                      size_t body_len, stella_http_result *res) {
  return start(h, path, body, body_len, res, 1);
}

/* The finished transfer's result (rc: its CURLcode). */
static void finish(stella_http *h, CURLcode rc, stella_http_result *res) {
  long connects = 0;
  curl_multi_remove_handle(h->multi, h->easy);
  h->running = 0;
  if (curl_easy_getinfo(h->easy, CURLINFO_NUM_CONNECTS, &connects) == CURLE_OK)
    h->connects += connects;
  if (rc == CURLE_OK) curl_easy_getinfo(h->easy, CURLINFO_RESPONSE_CODE, &res->status);
  res->outcome = stella_outcome_of_curl(rc, res->status);
  if (rc == CURLE_WRITE_ERROR && h->body.oom) res->outcome = STELLA_OUTCOME_INTERNAL;
  if (rc == CURLE_WRITE_ERROR && h->too_large) res->outcome = STELLA_OUTCOME_TOO_LARGE;
  if (res->outcome == STELLA_OUTCOME_TOO_LARGE) {
    res->status = 0;
    h->body.len = 0;
    snprintf(h->message, sizeof h->message, "the answer from %s is larger than %ld bytes",
             h->base_url, STELLA_MAX_ANSWER_BYTES);
    res->error = h->message;
    return;
  }
  if (rc != CURLE_OK) {
    res->status = 0;
    snprintf(h->message, sizeof h->message, "%s", h->errbuf[0] ? h->errbuf : curl_easy_strerror(rc));
    res->error = h->message;
    return;
  }
  res->body = h->body.data ? h->body.data : "";
  res->body_len = h->body.len;
  res->content_type = h->content_type[0] ? h->content_type : NULL;
  if (h->retry_after[0]) {
    time_t t = time(NULL);
    res->retry_after_ms = stella_parse_retry_after(h->retry_after, (long long)t);
  }
}

/* curl_multi_poll (libcurl 7.66) waits even when the transfer has no socket yet (during
 * name resolution); curl_multi_wait may return at once then, so older libcurls get a short
 * sleep instead of a busy loop. */
static CURLMcode wait_for_activity(CURLM *multi, int wait_ms) {
#if LIBCURL_VERSION_NUM >= 0x074200
  return curl_multi_poll(multi, NULL, 0, wait_ms, NULL);
#else
  int fds = 0;
  CURLMcode rc = curl_multi_wait(multi, NULL, 0, wait_ms, &fds);
  if (rc == CURLM_OK && fds == 0) {
    struct timespec ts;
    ts.tv_sec = 0;
    ts.tv_nsec = 1000000L;   /* 1 ms */
    nanosleep(&ts, NULL);
  }
  return rc;
#endif
}


/* ---------- the fast path: plain http over a connection libcurl opened ---------------- */

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Closes the connection (libcurl closes a CONNECT_ONLY connection when its handle leaves
 * the multi handle). */
static void fast_close(stella_http *h) {
  if (h->in_multi) {
    curl_multi_remove_handle(h->multi, h->easy);
    h->in_multi = 0;
  }
  h->sock = CURL_SOCKET_BAD;
}

/* Asks libcurl for a new connection, within what is left of the post's time. 0 when
 * libcurl refuses. */
static int fast_connect(stella_http *h) {
  long long left = h->deadline - now_ms();
  fast_close(h);
  curl_easy_setopt(h->easy, CURLOPT_TIMEOUT_MS, (long)(left > 0 ? left : 1));
  if (curl_multi_add_handle(h->multi, h->easy) != CURLM_OK) return 0;
  h->in_multi = 1;
  h->reused = 0;
  h->phase = FAST_CONNECTING;
  return 1;
}

/* The post has ended: code CURLE_OK with a complete answer, else libcurl's code for the
 * failure and its message. Fills res as finish() does. Returns 1. */
static int fast_end(stella_http *h, CURLcode code, const char *msg, stella_http_result *res) {
  stella_answer *a = &h->answer;
  memset(res, 0, sizeof *res);
  res->retry_after_ms = -1;
  h->running = 0;
  h->phase = FAST_IDLE;
  h->in.len = h->in_off = 0;
  if (code != CURLE_OK || a->close) fast_close(h);
  res->outcome = stella_outcome_of_curl((int)code, a->status);
  if (res->outcome == STELLA_OUTCOME_TOO_LARGE) {
    h->body.len = 0;
    snprintf(h->message, sizeof h->message, "the answer from %s is larger than %ld bytes",
             h->base_url, STELLA_MAX_ANSWER_BYTES);
    res->error = h->message;
    return 1;
  }
  if (code != CURLE_OK) {
    snprintf(h->message, sizeof h->message, "%s", msg && msg[0] ? msg : curl_easy_strerror(code));
    res->error = h->message;
    return 1;
  }
  stella_buffer_add(&h->body, "", 0);   /* NUL-terminated for C callers */
  res->status = a->status;
  res->body = h->body.data ? h->body.data : "";
  res->body_len = h->body.len;
  res->content_type = a->content_type[0] ? a->content_type : NULL;
  if (a->retry_after[0]) res->retry_after_ms = stella_parse_retry_after(a->retry_after, (long long)time(NULL));
  return 1;
}

/* A failure of the system call `what` ("Send", "Recv") with errno e. On a connection kept
 * from before, with no byte of an answer yet, the server may have closed it while it was
 * idle: the request is sent once more on a fresh connection, as libcurl does. Returns
 * 1 when the post has ended, 0 when it goes on. */
static int fast_broken(stella_http *h, CURLcode code, const char *what, int e, stella_http_result *res) {
  char msg[160], text[128];
  if (h->reused && !h->retried && h->answer.seen == 0) {
    h->retried = 1;
    h->out_off = 0;
    h->in.len = h->in_off = 0;
    stella_answer_init(&h->answer, &h->body);
    if (fast_connect(h)) return 0;
    return fast_end(h, CURLE_OUT_OF_MEMORY, "libcurl refused the transfer", res);
  }
  if (what == NULL) {   /* the end of the connection */
    stella_answer_state st = stella_answer_eof(&h->answer);
    h->answer.close = 1;
    if (st == STELLA_ANSWER_DONE) return fast_end(h, CURLE_OK, NULL, res);
    return fast_end(h, (CURLcode)h->answer.code, h->answer.error, res);
  }
  if (strerror_r(e, text, sizeof text) != 0) snprintf(text, sizeof text, "error %d", e);   /* threads: not strerror */
  snprintf(msg, sizeof msg, "%s failure: %s", what, text);
  return fast_end(h, code, msg, res);
}

/* Room for `room` more bytes in b. */
static int reserve(stella_buffer *b, size_t room) {
  size_t ncap;
  char *p;
  if (b->cap - b->len > room) return 1;
  ncap = b->cap ? b->cap : 16384;
  while (ncap - b->len <= room) ncap *= 2;
  p = (char *)realloc(b->data, ncap);
  if (p == NULL) return 0;
  b->data = p;
  b->cap = ncap;
  return 1;
}

#define RECV_ROOM 16384

/* Moves the post on as far as it goes without waiting. Returns 1 when it has ended
 * (res filled), 0 when it waits: for libcurl (connecting) or for h->want on the socket. */
static int fast_progress(stella_http *h, stella_http_result *res) {
  for (;;) {
    switch (h->phase) {
    case FAST_CONNECTING: {
      int still = 0, queued = 0;
      CURLMsg *msg;
      if (curl_multi_perform(h->multi, &still) != CURLM_OK)
        return fast_end(h, CURLE_OUT_OF_MEMORY, "libcurl failed to drive the transfer", res);
      while ((msg = curl_multi_info_read(h->multi, &queued)) != NULL) {
        if (msg->msg == CURLMSG_DONE && msg->easy_handle == h->easy) {
          CURLcode rc = msg->data.result;
          long connects = 0;
          curl_socket_t sock = CURL_SOCKET_BAD;
          if (curl_easy_getinfo(h->easy, CURLINFO_NUM_CONNECTS, &connects) == CURLE_OK)
            h->connects += connects;
          if (rc == CURLE_OK &&
              (curl_easy_getinfo(h->easy, CURLINFO_ACTIVESOCKET, &sock) != CURLE_OK || sock == CURL_SOCKET_BAD))
            rc = CURLE_COULDNT_CONNECT;
          if (rc != CURLE_OK) return fast_end(h, rc, h->errbuf, res);
          h->sock = sock;
          h->phase = FAST_SENDING;
        }
      }
      if (h->phase == FAST_CONNECTING) return 0;
      break;
    }
    case FAST_SENDING:
      while (h->out_off < h->out.len) {
        ssize_t n = send(h->sock, h->out.data + h->out_off, h->out.len - h->out_off, MSG_NOSIGNAL);
        if (n >= 0) { h->out_off += (size_t)n; continue; }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) { h->want = POLLOUT; return 0; }
        if (fast_broken(h, CURLE_SEND_ERROR, "Send", errno, res)) return 1;
        break;   /* sent again on a fresh connection */
      }
      if (h->phase != FAST_SENDING) break;
      /* the answer takes a round trip: wait for it before the first read */
      h->phase = FAST_RECEIVING;
      h->want = POLLIN;
      return 0;
    default: {   /* FAST_RECEIVING */
      ssize_t n;
      size_t used = 0;
      stella_answer_state st;
      if (!reserve(&h->in, RECV_ROOM)) return fast_end(h, CURLE_OUT_OF_MEMORY, "out of memory", res);
      n = recv(h->sock, h->in.data + h->in.len, RECV_ROOM, 0);
      if (n < 0 && errno == EINTR) break;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) { h->want = POLLIN; return 0; }
      if (n <= 0) {
        if (fast_broken(h, CURLE_RECV_ERROR, n == 0 ? NULL : "Recv", errno, res)) return 1;
        break;   /* sent again on a fresh connection */
      }
      h->in.len += (size_t)n;
      st = stella_answer_feed(&h->answer, h->in.data + h->in_off, h->in.len - h->in_off, &used);
      h->in_off += used;
      if (st == STELLA_ANSWER_DONE) {
        if (h->in_off != h->in.len) h->answer.close = 1;   /* bytes after the answer: out of step */
        return fast_end(h, CURLE_OK, NULL, res);
      }
      if (st == STELLA_ANSWER_ERROR) return fast_end(h, (CURLcode)h->answer.code, h->answer.error, res);
      if (h->in_off == h->in.len) {
        h->in.len = h->in_off = 0;
      } else if (h->in_off) {   /* keep the partial line at the front */
        memmove(h->in.data, h->in.data + h->in_off, h->in.len - h->in_off);
        h->in.len -= h->in_off;
        h->in_off = 0;
      }
      if ((size_t)n < RECV_ROOM) { h->want = POLLIN; return 0; }   /* drained: wait */
      break;
    }
    }
  }
}

/* The post timed out (curl's words). */
static int fast_timeout(stella_http *h, stella_http_result *res) {
  char msg[128];
  snprintf(msg, sizeof msg, "Operation timed out after %lld milliseconds with %lu bytes received",
           now_ms() - h->started, (unsigned long)h->answer.seen);
  return fast_end(h, CURLE_OPERATION_TIMEDOUT, msg, res);
}

static int fast_step(stella_http *h, int wait_ms, stella_http_result *res) {
  int waited = 0;
  for (;;) {
    long long left;
    if (fast_progress(h, res)) return 1;
    if (h->phase == FAST_CONNECTING) {   /* libcurl keeps the time of this phase */
      if (wait_ms <= 0 || waited) return 0;
      waited = 1;
      if (wait_for_activity(h->multi, wait_ms) != CURLM_OK)
        return fast_end(h, CURLE_OUT_OF_MEMORY, "libcurl failed to wait for the transfer", res);
      continue;
    }
    left = h->deadline - now_ms();
    if (left <= 0) return fast_timeout(h, res);
    if (wait_ms <= 0 || waited) return 0;
    waited = 1;
    {
      struct pollfd p;
      p.fd = h->sock;
      p.events = h->want;
      p.revents = 0;
      if (poll(&p, 1, (int)(left < wait_ms ? left : wait_ms)) < 0 && errno != EINTR)
        return fast_end(h, CURLE_OUT_OF_MEMORY, "poll failed", res);
    }
  }
}

/* Starts a post on the fast path: the request's bytes in h->out, then a connection (the
 * one kept from before, or a new one). */
static stella_outcome fast_start(stella_http *h, const char *path, const char *body, size_t body_len,
                                 stella_http_result *res) {
  char len[32];
  int u = set_url(h, path);
  if (u <= 0) return fail(res, STELLA_OUTCOME_INTERNAL, u == 0 ? "out of memory" : curl_easy_strerror(CURLE_URL_MALFORMAT));
  h->out.len = 0;
  h->out.oom = 0;
  stella_buffer_add(&h->out, h->head.data, h->head.len);
  snprintf(len, sizeof len, "%lu\r\n\r\n", (unsigned long)body_len);
  stella_buffer_add(&h->out, len, strlen(len));
  if (body_len) stella_buffer_add(&h->out, body, body_len);
  if (h->out.oom) return fail(res, STELLA_OUTCOME_INTERNAL, "out of memory");
  h->out_off = 0;
  h->retried = 0;
  h->in.len = h->in_off = 0;
  h->errbuf[0] = '\0';
  stella_answer_init(&h->answer, &h->body);
  h->started = now_ms();
  h->deadline = h->started + h->timeout_ms;
  h->running = 1;
  if (h->sock != CURL_SOCKET_BAD) {
    h->reused = 1;
    h->phase = FAST_SENDING;
  } else if (!fast_connect(h)) {
    fast_end(h, CURLE_OUT_OF_MEMORY, "libcurl refused the transfer", res);
    return res->outcome;
  }
  return STELLA_OUTCOME_OK;
}

int stella_http_step(stella_http *h, int wait_ms, stella_http_result *res) {
  int still = 0, queued = 0, waited = 0;
  CURLMsg *msg;
  memset(res, 0, sizeof *res);
  res->retry_after_ms = -1;
  if (!h->running) {
    fail(res, STELLA_OUTCOME_INTERNAL, "no transfer is running on this client");
    return 1;
  }
  if (h->fast) return fast_step(h, wait_ms, res);
  for (;;) {
    if (curl_multi_perform(h->multi, &still) != CURLM_OK) {
      curl_multi_remove_handle(h->multi, h->easy);
      h->running = 0;
      fail(res, STELLA_OUTCOME_INTERNAL, "libcurl failed to drive the transfer");
      return 1;
    }
    while ((msg = curl_multi_info_read(h->multi, &queued)) != NULL) {
      if (msg->msg == CURLMSG_DONE && msg->easy_handle == h->easy) {
        finish(h, msg->data.result, res);
        return 1;
      }
    }
    if (wait_ms <= 0 || waited) return 0;
    waited = 1;
    /* waits for the socket or curl's own timer (the transfer's timeouts), at most wait_ms */
    if (wait_for_activity(h->multi, wait_ms) != CURLM_OK) {
      curl_multi_remove_handle(h->multi, h->easy);
      h->running = 0;
      fail(res, STELLA_OUTCOME_INTERNAL, "libcurl failed to wait for the transfer");
      return 1;
    }
  }
}

stella_outcome stella_http_post(stella_http *h, const char *path, const char *body,
                                     size_t body_len, stella_http_result *res) {
  if (start(h, path, body, body_len, res, 0) != STELLA_OUTCOME_OK) return res->outcome;
  while (!stella_http_step(h, 1000, res)) { /* each step waits for activity, up to 1 s */ }
  return res->outcome;
}

int stella_http_running(const stella_http *h) {
  return h->running;
}

/* What a running post waits for, so that one thread can wait for many clients at once
 * (stella_sender.c). The fast path, once connected: its socket, what it waits for and the
 * time left of the post. libcurl's phases (connecting, https): libcurl's socket when it
 * has exactly one, and libcurl's timer, at most 1 s (none or several sockets: at most
 * 10 ms, so that the caller steps it often). */
int stella_http_wait_fd(const stella_http *h, short *events, long *timeout_ms) {
  fd_set r, w, e;
  int maxfd = -1, fd, found = -1, count = 0;
  long t = -1;
  *events = 0;
  *timeout_ms = 0;
  if (!h->running) return -1;
  if (h->fast && h->phase != FAST_CONNECTING) {
    long long left = h->deadline - now_ms();
    *events = h->want;
    *timeout_ms = left > 0 ? (long)left : 0;
    return (int)h->sock;
  }
  FD_ZERO(&r);
  FD_ZERO(&w);
  FD_ZERO(&e);
  if (curl_multi_fdset(h->multi, &r, &w, &e, &maxfd) != CURLM_OK) maxfd = -1;
  for (fd = 0; fd <= maxfd; fd++) {
    short ev = (short)((FD_ISSET(fd, &r) ? POLLIN : 0) | (FD_ISSET(fd, &w) ? POLLOUT : 0));
    if (ev == 0 && !FD_ISSET(fd, &e)) continue;
    count++;
    found = fd;
    *events = ev;
  }
  if (curl_multi_timeout(h->multi, &t) != CURLM_OK) t = 0;
  if (count != 1) {
    *events = 0;
    found = -1;
    if (t < 0 || t > 10) t = 10;
  } else if (t < 0 || t > 1000) {
    t = 1000;
  }
  *timeout_ms = t;
  return found;
}

/* ---------- retry policy ------------------------------------------------------------ */

long stella_retry_delay_ms(int attempt, long base_ms, long max_ms, long retry_after_ms,
                           double unit_random) {
  double cap = (double)base_ms;
  int i;
  if (max_ms < 0) max_ms = 0;
  if (retry_after_ms >= 0) return retry_after_ms < max_ms ? retry_after_ms : max_ms;
  for (i = 1; i < attempt && cap < (double)max_ms; i++) cap *= 2;
  if (cap > (double)max_ms) cap = (double)max_ms;
  if (unit_random < 0) unit_random = 0;
  if (unit_random >= 1) unit_random = 0.999999;
  return (long)(cap * unit_random);
}

long stella_parse_retry_after(const char *value, long long now) {
  const char *p = value;
  while (*p == ' ') p++;
  if (*p >= '0' && *p <= '9') {
    long long secs = 0;
    for (; *p >= '0' && *p <= '9'; p++) {
      secs = secs * 10 + (*p - '0');
      if (secs > 86400) secs = 86400;   /* clamp: a day fits a 32-bit long in ms */
    }
    while (*p == ' ') p++;
    return *p ? -1 : (long)(secs * 1000);
  }
  {
    time_t t = curl_getdate(p, NULL);
    unsigned long long d;
    if (t == (time_t)-1) return -1;
    if ((long long)t <= now) return 0;
    /* t > now: the difference is exact in unsigned arithmetic, and a far-off date
     * (year 1979999990) must not overflow when turned into milliseconds */
    d = (unsigned long long)(long long)t - (unsigned long long)now;
    return d >= 86400 ? 86400L * 1000 : (long)(d * 1000);
  }
}
