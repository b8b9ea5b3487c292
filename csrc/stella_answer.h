/* stella_answer.h - reading one HTTP/1.x answer from the bytes of a connection, as they
 * come (stella_answer.c): the status line, the header fields the client needs, and a body
 * framed by Content-Length, by chunks or by the end of the connection, with 1xx answers
 * skipped. No I/O here: the plain-http path of stella_http.c feeds it what it receives
 * (and spec/fuzz/fuzz_answer.c feeds it anything). Each failure carries the libcurl code
 * (CURLcode) libcurl gives for the same answer, so stella_outcome_of_curl classifies both
 * paths alike. */
#ifndef STELLA_ANSWER_H
#define STELLA_ANSWER_H

#include <stddef.h>
#include "stella.h"

/* The longest header block read (status line, fields, trailer): libcurl's own limit. */
#define STELLA_ANSWER_MAX_HEAD (300L * 1024)

typedef enum stella_answer_state {
  STELLA_ANSWER_MORE = 0,   /* give it more bytes (or stella_answer_eof at the end) */
  STELLA_ANSWER_DONE,       /* the answer is complete */
  STELLA_ANSWER_ERROR       /* code and error say why */
} stella_answer_state;

typedef struct stella_answer {
  int phase;                /* private */
  long status;              /* of the final answer, once its status line has been read */
  int close;                /* 1: the connection cannot carry another request */
  int chunked;
  long long length;         /* Content-Length, -1 if none */
  long long left;           /* bytes of the body (or chunk) still to come */
  size_t head_bytes;        /* header bytes read so far (capped at STELLA_ANSWER_MAX_HEAD) */
  size_t seen;              /* every byte fed so far */
  int http10;
  int keep_alive;           /* "Connection: keep-alive" (an HTTP/1.0 answer may stay open) */
  int too_large;            /* the body passed STELLA_MAX_ANSWER_BYTES */
  int code;                 /* on STELLA_ANSWER_ERROR: the CURLcode libcurl gives */
  const char *error;        /* on STELLA_ANSWER_ERROR: a static message */
  char content_type[128];   /* "" if none (longer values cut, as the libcurl path has them) */
  char retry_after[128];
  stella_buffer *body;      /* the caller's: the body is appended here */
} stella_answer;

/* Starts reading an answer whose body goes to `body` (emptied here). */
void stella_answer_init(stella_answer *a, stella_buffer *body);
/* Reads from `data` (len bytes): returns the state, with *used the bytes it took (a
 * partial line is left for the next call, which must pass it again at the start). Once
 * DONE, bytes after the answer are not taken. */
stella_answer_state stella_answer_feed(stella_answer *a, const char *data, size_t len, size_t *used);
/* The connection ended: DONE for a body that runs to the end of the connection (or an
 * answer already complete), else ERROR (nothing at all came: CURLE_GOT_NOTHING). */
stella_answer_state stella_answer_eof(stella_answer *a);

#endif
