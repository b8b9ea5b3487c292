/* stella_answer.c - one HTTP/1.x answer read from the bytes of a connection as they come
 * (see stella_answer.h). It reads what libcurl reads the way libcurl 7.88 reads it, so
 * that the plain-http path and the libcurl path come to the same outcome for the same
 * answer: a status line "HTTP/1.0" or "HTTP/1.1" and three digits; fields up to an empty
 * line (LF or CRLF), 1xx answers skipped; a body of Content-Length bytes (the last one
 * given wins; leading digits count), in chunks (Transfer-Encoding naming "chunked"; a
 * chunk size's extensions and the trailer are skipped), or up to the end of the
 * connection; none for 204 and 304. The failures carry libcurl's codes for them. */
#include <stdio.h>
#include <string.h>
#include <curl/curl.h>
#include "stella_answer.h"

enum { P_STATUS, P_HEADER, P_BODY_LEN, P_BODY_CLOSE, P_CHUNK_SIZE, P_CHUNK_DATA, P_CHUNK_END,
       P_TRAILER, P_DONE };

#define MAX_BODY ((long long)STELLA_MAX_ANSWER_BYTES)

static void reset_head(stella_answer *a) {
  a->status = 0;
  a->chunked = 0;
  a->length = -1;
  a->http10 = 0;
  a->keep_alive = 0;
  a->close = 0;
  a->content_type[0] = a->retry_after[0] = '\0';
}

void stella_answer_init(stella_answer *a, stella_buffer *body) {
  a->phase = P_STATUS;
  a->left = 0;
  a->head_bytes = 0;
  a->seen = 0;
  a->too_large = 0;
  a->code = 0;
  a->error = NULL;
  a->body = body;
  body->len = 0;
  body->oom = 0;
  reset_head(a);
}

static stella_answer_state fail(stella_answer *a, int code, const char *msg) {
  a->code = code;
  a->error = msg;
  a->phase = P_DONE;
  a->close = 1;
  return STELLA_ANSWER_ERROR;
}

static stella_answer_state too_large(stella_answer *a) {
  a->too_large = 1;
  return fail(a, CURLE_FILESIZE_EXCEEDED, "Maximum file size exceeded");
}

static int lower(int c) {
  return c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c;
}

/* 1 when [s, s+n) is `name` in any case. */
static int is_name(const char *s, size_t n, const char *name) {
  size_t i;
  if (strlen(name) != n) return 0;
  for (i = 0; i < n; i++)
    if (lower((unsigned char)s[i]) != name[i]) return 0;
  return 1;
}

/* 1 when the value holds `word` in any case (a comma-separated list is searched whole). */
static int has_word(const char *v, size_t n, const char *word) {
  size_t w = strlen(word), i, j;
  for (i = 0; i + w <= n; i++) {
    for (j = 0; j < w && lower((unsigned char)v[i + j]) == word[j]; j++) {}
    if (j == w) return 1;
  }
  return 0;
}

static void copy_value(char *out, size_t outlen, const char *v, size_t n) {
  if (n >= outlen) n = outlen - 1;
  memcpy(out, v, n);
  out[n] = '\0';
}

/* The status line (without its line end). */
static stella_answer_state status_line(stella_answer *a, const char *s, size_t n) {
  if (n < 5 || memcmp(s, "HTTP/", 5) != 0)
    return fail(a, CURLE_UNSUPPORTED_PROTOCOL, "Received HTTP/0.9 when not allowed");
  if (n < 12 || s[5] != '1' || s[6] != '.' || (s[7] != '0' && s[7] != '1') || s[8] != ' ')
    return fail(a, CURLE_UNSUPPORTED_PROTOCOL, "Unsupported HTTP version in response");
  if (s[9] < '0' || s[9] > '9' || s[10] < '0' || s[10] > '9' || s[11] < '0' || s[11] > '9' ||
      (n > 12 && s[12] != ' ' && s[12] != '\t'))
    return fail(a, CURLE_WEIRD_SERVER_REPLY, "Unsupported response code in HTTP response");
  if (s[9] == '0') return fail(a, CURLE_UNSUPPORTED_PROTOCOL, "Unsupported response code in HTTP response");
  reset_head(a);
  a->http10 = s[7] == '0';
  a->status = (s[9] - '0') * 100 + (s[10] - '0') * 10 + (s[11] - '0');
  a->phase = P_HEADER;
  return STELLA_ANSWER_MORE;
}

/* Content-Length's value as libcurl reads it: optional blanks and '+', then digits
 * (anything after them is ignored). */
static stella_answer_state content_length(stella_answer *a, const char *v, size_t n) {
  size_t i = 0;
  long long x = 0;
  if (i < n && v[i] == '+') i++;
  if (i == n || v[i] < '0' || v[i] > '9')
    return fail(a, CURLE_WEIRD_SERVER_REPLY, "Invalid Content-Length: value");
  for (; i < n && v[i] >= '0' && v[i] <= '9'; i++) {
    if (x > (0x7fffffffffffffffLL - 9) / 10) return too_large(a);
    x = x * 10 + (v[i] - '0');
  }
  a->length = x;
  return STELLA_ANSWER_MORE;
}

/* The end of a header block: a 1xx answer is skipped, the final one says how its body
 * is framed. */
static stella_answer_state end_of_head(stella_answer *a) {
  if (a->status >= 100 && a->status < 200) {
    if (a->status == 101) return fail(a, CURLE_WEIRD_SERVER_REPLY, "Unexpected protocol switch");
    a->phase = P_STATUS;
    return STELLA_ANSWER_MORE;
  }
  if (a->http10 && !a->keep_alive) a->close = 1;
  if (a->status == 204 || a->status == 304) {
    a->phase = P_DONE;
    return STELLA_ANSWER_DONE;
  }
  if (a->chunked) {
    a->phase = P_CHUNK_SIZE;
    return STELLA_ANSWER_MORE;
  }
  if (a->length >= 0) {
    if (a->length > MAX_BODY) return too_large(a);
    a->left = a->length;
    a->phase = a->left ? P_BODY_LEN : P_DONE;
    return a->left ? STELLA_ANSWER_MORE : STELLA_ANSWER_DONE;
  }
  a->close = 1;   /* the body runs to the end of the connection */
  a->phase = P_BODY_CLOSE;
  return STELLA_ANSWER_MORE;
}

/* One header field line (without its line end), or the empty line that ends the head. */
static stella_answer_state header_line(stella_answer *a, const char *s, size_t n) {
  const char *colon, *v;
  size_t name_len, vn;
  if (n == 0) return end_of_head(a);
  if (s[0] == ' ' || s[0] == '\t') return STELLA_ANSWER_MORE;   /* folded: ignored */
  colon = (const char *)memchr(s, ':', n);
  if (colon == NULL) return fail(a, CURLE_WEIRD_SERVER_REPLY, "Header without colon");
  name_len = (size_t)(colon - s);
  v = colon + 1;
  vn = n - name_len - 1;
  while (vn && (*v == ' ' || *v == '\t')) { v++; vn--; }
  while (vn && (v[vn - 1] == ' ' || v[vn - 1] == '\t' || v[vn - 1] == '\r')) vn--;
  if (is_name(s, name_len, "content-length")) return content_length(a, v, vn);
  if (is_name(s, name_len, "transfer-encoding")) {
    if (has_word(v, vn, "chunked")) a->chunked = 1;
  } else if (is_name(s, name_len, "connection")) {
    if (has_word(v, vn, "close")) a->close = 1;
    if (has_word(v, vn, "keep-alive")) a->keep_alive = 1;
  } else if (is_name(s, name_len, "content-type")) {
    copy_value(a->content_type, sizeof a->content_type, v, vn);
  } else if (is_name(s, name_len, "retry-after")) {
    copy_value(a->retry_after, sizeof a->retry_after, v, vn);
  }
  return STELLA_ANSWER_MORE;
}

static int hex_value(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  c = lower(c);
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

/* A chunk-size line: hex digits (at most 16), then anything (extensions) to the end. */
static stella_answer_state chunk_size(stella_answer *a, const char *s, size_t n) {
  size_t i;
  long long size = 0;
  for (i = 0; i < n && hex_value((unsigned char)s[i]) >= 0; i++) {
    if (i == 16) return fail(a, CURLE_RECV_ERROR, "Problem (2) in the Chunked-Encoded data");
    if (size <= MAX_BODY) size = size * 16 + hex_value((unsigned char)s[i]);
  }
  if (i == 0) return fail(a, CURLE_RECV_ERROR, "Problem (3) in the Chunked-Encoded data");
  if (size == 0) {
    a->phase = P_TRAILER;
    return STELLA_ANSWER_MORE;
  }
  if (size > MAX_BODY - (long long)a->body->len) return too_large(a);
  a->left = size;
  a->phase = P_CHUNK_DATA;
  return STELLA_ANSWER_MORE;
}

/* A complete line of the head (status, field, chunk size, chunk end, trailer). */
static stella_answer_state line(stella_answer *a, const char *s, size_t n) {
  while (n && s[n - 1] == '\r') n--;
  if (a->phase == P_STATUS && memcmp(s, "HTTP/", n < 5 ? n : 5) != 0)   /* as fed piecemeal */
    return fail(a, CURLE_UNSUPPORTED_PROTOCOL, "Received HTTP/0.9 when not allowed");
  if (memchr(s, '\0', n)) return fail(a, CURLE_WEIRD_SERVER_REPLY, "Nul byte in header");
  switch (a->phase) {
  case P_STATUS: return status_line(a, s, n);
  case P_HEADER: return header_line(a, s, n);
  case P_CHUNK_SIZE: return chunk_size(a, s, n);
  case P_CHUNK_END:
    if (n) return fail(a, CURLE_RECV_ERROR, "Problem (4) in the Chunked-Encoded data");
    a->phase = P_CHUNK_SIZE;
    return STELLA_ANSWER_MORE;
  default:   /* P_TRAILER */
    if (n) return STELLA_ANSWER_MORE;
    a->phase = P_DONE;
    return STELLA_ANSWER_DONE;
  }
}

/* Appends n body bytes, within the cap. */
static stella_answer_state body(stella_answer *a, const char *s, size_t n) {
  if (n > (size_t)MAX_BODY - a->body->len) return too_large(a);
  stella_buffer_add(a->body, s, n);
  if (a->body->oom) return fail(a, CURLE_OUT_OF_MEMORY, "out of memory");
  return STELLA_ANSWER_MORE;
}

stella_answer_state stella_answer_feed(stella_answer *a, const char *data, size_t len, size_t *used) {
  size_t off = 0;
  stella_answer_state st = STELLA_ANSWER_MORE;
  a->seen += len;   /* counts bytes passed again after a partial line too: only tested > 0 */
  while (off < len && st == STELLA_ANSWER_MORE) {
    const char *s = data + off;
    size_t avail = len - off, n;
    if (a->phase == P_DONE) break;
    if (a->phase == P_BODY_LEN || a->phase == P_CHUNK_DATA || a->phase == P_BODY_CLOSE) {
      n = a->phase == P_BODY_CLOSE || (long long)avail < a->left ? avail : (size_t)a->left;
      st = body(a, s, n);
      off += n;
      if (st != STELLA_ANSWER_MORE || a->phase == P_BODY_CLOSE) continue;
      a->left -= (long long)n;
      if (a->left == 0) {
        a->phase = a->phase == P_BODY_LEN ? P_DONE : P_CHUNK_END;
        if (a->phase == P_DONE) st = STELLA_ANSWER_DONE;
      }
      continue;
    }
    {
      const char *nl = (const char *)memchr(s, '\n', avail);
      size_t take = nl ? (size_t)(nl - s) + 1 : avail;
      if (a->head_bytes + take > (size_t)STELLA_ANSWER_MAX_HEAD)
        return fail(a, CURLE_RECV_ERROR, "Too large response headers");
      if (nl == NULL) {
        /* not a line yet; an answer that does not begin as HTTP is refused at once */
        if (a->phase == P_STATUS && memcmp(s, "HTTP/", avail < 5 ? avail : 5) != 0)
          return fail(a, CURLE_UNSUPPORTED_PROTOCOL, "Received HTTP/0.9 when not allowed");
        break;
      }
      a->head_bytes += take;
      st = line(a, s, take - 1);
      off += take;
    }
  }
  *used = off;
  return st;
}

stella_answer_state stella_answer_eof(stella_answer *a) {
  if (a->phase == P_BODY_CLOSE || (a->phase == P_DONE && a->error == NULL)) {
    a->phase = P_DONE;
    return STELLA_ANSWER_DONE;
  }
  if (a->phase == P_DONE) return STELLA_ANSWER_ERROR;
  if (a->seen == 0) return fail(a, CURLE_GOT_NOTHING, "Empty reply from server");
  return fail(a, CURLE_PARTIAL_FILE, "transfer closed with outstanding read data remaining");
}
