/* stella_sender.c - posts a list of bodies one after another on a background thread.
 *
 * The caller (the trigger's pipeline) keeps doing its own work - deciding the next
 * batch, settling the previous one in its store - while this batch is on the wire, so
 * the network time and libcurl's own work overlap it. The thread only ever makes first
 * attempts on the happy path: it stops at the first answer that is not 2xx or the first
 * transport failure (the caller's retry policy takes over from there, in its own
 * thread), once `budget_ms` has passed (the rest waits for the caller), or when asked to
 * stop. The clients it uses are lent to it: the caller must not use them until
 * stella_sender_wait returns. */
#define _POSIX_C_SOURCE 200112L   /* clock_gettime, pthreads */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "stella.h"

typedef struct job {
  stella_http *h;
  char *path, *body;             /* copies, owned here */
  size_t body_len;
} job;

struct stella_sender {
  job *items;
  stella_send_result *results;
  size_t n;
  size_t attempted;              /* items the thread has finished with (written by the thread) */
  long budget_ms;
  pthread_t thread;
  pthread_mutex_t lock;          /* guards done and stop */
  int done, stop;
  int started, joined;
};

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static char *copy_text(const char *s, size_t len) {
  char *c = (char *)malloc(len + 1);
  if (c == NULL) return NULL;
  if (len) memcpy(c, s, len);
  c[len] = '\0';
  return c;
}

static int should_stop(stella_sender *s) {
  int stop;
  pthread_mutex_lock(&s->lock);
  stop = s->stop;
  pthread_mutex_unlock(&s->lock);
  return stop;
}

/* Keeps what a post's result points to (the client's buffers are reused by its next call). */
static int keep_result(stella_send_result *out, const stella_http_result *r) {
  out->failure = r->failure;
  out->status = r->status;
  out->retry_after_ms = r->retry_after_ms;
  if (r->failure != STELLA_HTTP_OK) {
    out->error = copy_text(r->error ? r->error : "transfer failed",
                           strlen(r->error ? r->error : "transfer failed"));
    return out->error != NULL;
  }
  out->body = copy_text(r->body ? r->body : "", r->body ? r->body_len : 0);
  out->body_len = r->body ? r->body_len : 0;
  if (r->content_type) out->content_type = copy_text(r->content_type, strlen(r->content_type));
  return out->body != NULL && (r->content_type == NULL || out->content_type != NULL);
}

static void *run(void *arg) {
  stella_sender *s = (stella_sender *)arg;
  long long start = now_ms();
  size_t i;
  for (i = 0; i < s->n; i++) {
    stella_http_result r;
    stella_send_result *out = &s->results[i];
    if (i > 0 && (should_stop(s) || now_ms() - start >= s->budget_ms)) break;
    stella_http_post(s->items[i].h, s->items[i].path, s->items[i].body, s->items[i].body_len, &r);
    out->attempted = 1;
    s->attempted = i + 1;
    if (!keep_result(out, &r)) {   /* out of memory: report the attempt as an internal failure */
      free(out->body);
      free(out->content_type);
      free(out->error);
      out->body = out->content_type = out->error = NULL;
      out->failure = STELLA_HTTP_INTERNAL;
      out->status = 0;
      break;
    }
    if (r.failure != STELLA_HTTP_OK || r.status < 200 || r.status >= 300) break;
  }
  pthread_mutex_lock(&s->lock);
  s->done = 1;
  pthread_mutex_unlock(&s->lock);
  return NULL;
}

stella_sender *stella_sender_start(const stella_send_item *items, size_t n, long budget_ms,
                                   char *err, size_t errlen) {
  stella_sender *s = (stella_sender *)calloc(1, sizeof *s);
  size_t i;
  if (s == NULL) goto oom;
  s->n = n;
  s->budget_ms = budget_ms;
  s->items = (job *)calloc(n ? n : 1, sizeof *s->items);
  s->results = (stella_send_result *)calloc(n ? n : 1, sizeof *s->results);
  if (s->items == NULL || s->results == NULL) goto oom;
  for (i = 0; i < n; i++) {
    s->items[i].h = items[i].h;
    s->items[i].path = copy_text(items[i].path, strlen(items[i].path));
    s->items[i].body = copy_text(items[i].body, items[i].body_len);
    s->items[i].body_len = items[i].body_len;
    if (s->items[i].path == NULL || s->items[i].body == NULL) goto oom;
  }
  if (pthread_mutex_init(&s->lock, NULL) != 0) {
    stella_sender_free(s);
    if (errlen) { strncpy(err, "cannot create a mutex", errlen - 1); err[errlen - 1] = '\0'; }
    return NULL;
  }
  s->started = 1;   /* from here on free() destroys the mutex */
  if (n == 0) {
    s->done = s->joined = 1;
    return s;
  }
  if (pthread_create(&s->thread, NULL, run, s) != 0) {
    s->done = s->joined = 1;
    stella_sender_free(s);
    if (errlen) { strncpy(err, "cannot start a sending thread", errlen - 1); err[errlen - 1] = '\0'; }
    return NULL;
  }
  return s;

oom:
  stella_sender_free(s);
  if (errlen) { strncpy(err, "out of memory", errlen - 1); err[errlen - 1] = '\0'; }
  return NULL;
}

int stella_sender_done(stella_sender *s) {
  int done;
  if (s->joined) return 1;
  pthread_mutex_lock(&s->lock);
  done = s->done;
  pthread_mutex_unlock(&s->lock);
  return done;
}

size_t stella_sender_wait(stella_sender *s) {
  if (!s->joined) {
    pthread_join(s->thread, NULL);
    s->joined = 1;
  }
  return s->attempted;
}

const stella_send_result *stella_sender_result(const stella_sender *s, size_t i) {
  if (!s->joined || i >= s->attempted) return NULL;
  return &s->results[i];
}

void stella_sender_free(stella_sender *s) {
  size_t i;
  if (s == NULL) return;
  if (s->started) {
    if (!s->joined) {
      pthread_mutex_lock(&s->lock);
      s->stop = 1;   /* the post in flight ends (or times out); no further one starts */
      pthread_mutex_unlock(&s->lock);
      pthread_join(s->thread, NULL);
    }
    pthread_mutex_destroy(&s->lock);
  }
  if (s->items) {
    for (i = 0; i < s->n; i++) {
      free(s->items[i].path);
      free(s->items[i].body);
    }
  }
  if (s->results) {
    for (i = 0; i < s->n; i++) {
      free(s->results[i].body);
      free(s->results[i].content_type);
      free(s->results[i].error);
    }
  }
  free(s->items);
  free(s->results);
  free(s);
}
