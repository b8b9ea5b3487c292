/* stella_sender.c - posts a list of bodies on background threads: one thread per client
 * in the list, each posting items one after another: its client's own, or, for clients
 * given one group, the group's next item not yet taken (a shared queue: a lane that is
 * done with one post takes the next, so no connection waits for a slower one).
 *
 * The caller (the trigger's pipeline) keeps doing its own work - deciding the next
 * batch, settling the previous one in its store - while this batch is on the wire, so
 * the network time and libcurl's own work overlap it. The thread only ever makes first
 * attempts on the happy path: it stops at the first answer that is not 2xx or the first
 * transport failure (the caller's retry policy takes over from there, in its own
 * thread), once `budget_ms` has passed (the rest waits for the caller), or when asked to
 * stop; a stop in one lane stops all. Several clients to the same host are several
 * connections, so a caller gets concurrent sends by spreading a list over them. The
 * clients it uses are lent to it: the caller must not use them until stella_sender_wait
 * returns. */
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

/* The items a lane (or the lanes of a group) take, in list order: order[start ..
 * start + count - 1]; next: the first not taken yet (guarded by the sender's lock). */
typedef struct queue {
  size_t group;                  /* 0: one lane's own items */
  size_t start, count, next;
} queue;

typedef struct lane {
  stella_sender *s;
  stella_http *h;                /* the client this lane posts with */
  size_t first;                  /* the list index of the client's first item */
  queue *q;                      /* where it takes its items from */
  pthread_t thread;
  size_t attempted;              /* written by the lane's thread, read after the join */
  int started;
} lane;

struct stella_sender {
  job *items;
  stella_send_result *results;
  size_t n;
  lane *lanes;                   /* one per distinct client, each on its own thread */
  size_t nlanes;
  queue *queues;                 /* one per group, one per client without a group */
  size_t nqueues;
  size_t *order;                 /* item indices, queue after queue */
  long budget_ms;
  long long start_ms;
  pthread_mutex_t lock;          /* guards finished, stop and the queues' next */
  pthread_cond_t ended;          /* signalled as each lane's thread ends */
  size_t finished;               /* lanes whose thread has ended */
  int stop;
  int mutex_ready, cond_ready, joined;
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

/* Keeps what a post's result points to (the client's buffers are reused by its next call). */
static int keep_result(stella_send_result *out, const stella_http_result *r) {
  out->outcome = r->outcome;
  out->status = r->status;
  out->retry_after_ms = r->retry_after_ms;
  if (!stella_outcome_info_of(r->outcome)->answered) {
    out->error = copy_text(r->error ? r->error : "transfer failed",
                           strlen(r->error ? r->error : "transfer failed"));
    return out->error != NULL;
  }
  out->body = copy_text(r->body ? r->body : "", r->body ? r->body_len : 0);
  out->body_len = r->body ? r->body_len : 0;
  if (r->content_type) out->content_type = copy_text(r->content_type, strlen(r->content_type));
  return out->body != NULL && (r->content_type == NULL || out->content_type != NULL);
}

static void request_stop(stella_sender *s) {
  pthread_mutex_lock(&s->lock);
  s->stop = 1;
  pthread_mutex_unlock(&s->lock);
}

/* The next item lane ln posts (its queue's next not taken), or 0 with none or once the
 * sender is stopping. */
static int take(lane *ln, size_t *i) {
  stella_sender *s = ln->s;
  queue *q = ln->q;
  int got = 0;
  pthread_mutex_lock(&s->lock);
  if (!s->stop && q->next < q->count) {
    *i = s->order[q->start + q->next++];
    got = 1;
  }
  pthread_mutex_unlock(&s->lock);
  return got;
}

/* One lane: its queue's items in list order. A failure stops every lane (after the post
 * each has in flight); so does the budget, except for the list's first item. */
static void *run(void *arg) {
  lane *ln = (lane *)arg;
  stella_sender *s = ln->s;
  size_t i;
  while (take(ln, &i)) {
    stella_http_result r;
    stella_send_result *out = &s->results[i];
    if (i > 0 && now_ms() - s->start_ms >= s->budget_ms) { request_stop(s); break; }
    stella_http_post(ln->h, s->items[i].path, s->items[i].body, s->items[i].body_len, &r);
    out->attempted = 1;
    out->by = ln->first;
    ln->attempted++;
    if (!keep_result(out, &r)) {   /* out of memory: report the attempt as an internal failure */
      free(out->body);
      free(out->content_type);
      free(out->error);
      out->body = out->content_type = out->error = NULL;
      out->outcome = STELLA_OUTCOME_INTERNAL;
      out->status = 0;
      request_stop(s);
      break;
    }
    if (r.outcome != STELLA_OUTCOME_OK) {
      request_stop(s);
      break;
    }
  }
  pthread_mutex_lock(&s->lock);
  s->finished++;
  pthread_cond_broadcast(&s->ended);
  pthread_mutex_unlock(&s->lock);
  return NULL;
}

stella_sender *stella_sender_start(const stella_send_item *items, size_t n, long budget_ms,
                                   char *err, size_t errlen) {
  return stella_sender_start_shared(items, NULL, n, budget_ms, err, errlen);
}

stella_sender *stella_sender_start_shared(const stella_send_item *items, const size_t *groups,
                                          size_t n, long budget_ms, char *err, size_t errlen) {
  stella_sender *s = (stella_sender *)calloc(1, sizeof *s);
  const char *why = "out of memory";
  size_t *queue_of = NULL;       /* item -> its queue */
  size_t i, k, q, at;
  if (s == NULL) goto fail;
  s->n = n;
  s->budget_ms = budget_ms;
  s->items = (job *)calloc(n ? n : 1, sizeof *s->items);
  s->results = (stella_send_result *)calloc(n ? n : 1, sizeof *s->results);
  s->lanes = (lane *)calloc(n ? n : 1, sizeof *s->lanes);
  s->queues = (queue *)calloc(n ? n : 1, sizeof *s->queues);
  s->order = (size_t *)calloc(n ? n : 1, sizeof *s->order);
  queue_of = (size_t *)calloc(n ? n : 1, sizeof *queue_of);
  if (s->items == NULL || s->results == NULL || s->lanes == NULL || s->queues == NULL ||
      s->order == NULL || queue_of == NULL) goto fail;
  for (i = 0; i < n; i++) {
    size_t g = groups ? groups[i] : 0;
    s->items[i].h = items[i].h;
    s->items[i].path = copy_text(items[i].path, strlen(items[i].path));
    s->items[i].body = copy_text(items[i].body, items[i].body_len);
    s->items[i].body_len = items[i].body_len;
    if (s->items[i].path == NULL || s->items[i].body == NULL) goto fail;
    for (k = 0; k < s->nlanes && s->lanes[k].h != items[i].h; k++) {}
    if (k == s->nlanes) {   /* a new client: a new lane, on its group's queue or its own */
      for (q = 0; g != 0 && q < s->nqueues && s->queues[q].group != g; q++) {}
      if (g == 0 || q == s->nqueues) s->queues[s->nqueues++].group = g;
      s->lanes[k].s = s;
      s->lanes[k].h = items[i].h;
      s->lanes[k].first = i;
      s->lanes[k].q = &s->queues[g == 0 ? s->nqueues - 1 : q];
      s->nlanes++;
    } else if (s->lanes[k].q->group != g) {
      why = "a client in two groups";
      goto fail;
    }
    queue_of[i] = (size_t)(s->lanes[k].q - s->queues);
    s->queues[queue_of[i]].count++;
  }
  for (q = 0, at = 0; q < s->nqueues; q++) {   /* each queue's run of order[] */
    s->queues[q].start = at;
    at += s->queues[q].count;
  }
  for (i = 0; i < n; i++) {                    /* in list order within each queue */
    queue *qu = &s->queues[queue_of[i]];
    s->order[qu->start + qu->next++] = i;
  }
  for (q = 0; q < s->nqueues; q++) s->queues[q].next = 0;
  free(queue_of);
  queue_of = NULL;
  if (pthread_mutex_init(&s->lock, NULL) != 0) { why = "cannot create a mutex"; goto fail; }
  s->mutex_ready = 1;
  if (pthread_cond_init(&s->ended, NULL) != 0) { why = "cannot create a condition variable"; goto fail; }
  s->cond_ready = 1;
  s->start_ms = now_ms();
  for (k = 0; k < s->nlanes; k++) {
    if (pthread_create(&s->lanes[k].thread, NULL, run, &s->lanes[k]) != 0) {
      why = "cannot start a sending thread";
      goto fail;   /* free() stops and joins the lanes already started */
    }
    s->lanes[k].started = 1;
  }
  return s;

fail:
  free(queue_of);
  stella_sender_free(s);
  if (errlen) { strncpy(err, why, errlen - 1); err[errlen - 1] = '\0'; }
  return NULL;
}

int stella_sender_done(stella_sender *s) {
  size_t finished;
  if (s->joined) return 1;
  pthread_mutex_lock(&s->lock);
  finished = s->finished;
  pthread_mutex_unlock(&s->lock);
  return finished == s->nlanes;
}

int stella_sender_done_within(stella_sender *s, long wait_ms) {
  struct timespec until;
  int done;
  if (s->joined) return 1;
  clock_gettime(CLOCK_REALTIME, &until);   /* pthread_cond_timedwait's clock */
  until.tv_sec += wait_ms / 1000;
  until.tv_nsec += (wait_ms % 1000) * 1000000L;
  if (until.tv_nsec >= 1000000000L) { until.tv_sec++; until.tv_nsec -= 1000000000L; }
  pthread_mutex_lock(&s->lock);
  while (s->finished < s->nlanes && wait_ms > 0)
    if (pthread_cond_timedwait(&s->ended, &s->lock, &until) != 0) break;   /* timed out */
  done = s->finished == s->nlanes;
  pthread_mutex_unlock(&s->lock);
  return done;
}

void stella_sender_stop(stella_sender *s) {
  if (s->mutex_ready && !s->joined) request_stop(s);
}

static void join_all(stella_sender *s) {
  size_t k;
  for (k = 0; k < s->nlanes; k++) {
    if (s->lanes[k].started) pthread_join(s->lanes[k].thread, NULL);
    s->lanes[k].started = 0;
  }
  s->joined = 1;
}

size_t stella_sender_wait(stella_sender *s) {
  size_t k, total = 0;
  if (!s->joined) join_all(s);
  for (k = 0; k < s->nlanes; k++) total += s->lanes[k].attempted;
  return total;
}

const stella_send_result *stella_sender_result(const stella_sender *s, size_t i) {
  if (!s->joined || i >= s->n || !s->results[i].attempted) return NULL;
  return &s->results[i];
}

void stella_sender_free(stella_sender *s) {
  size_t i;
  if (s == NULL) return;
  if (s->mutex_ready) {
    if (!s->joined) {
      request_stop(s);   /* each lane ends its post in flight (or times out); none starts another */
      join_all(s);
    }
    if (s->cond_ready) pthread_cond_destroy(&s->ended);
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
  free(s->lanes);
  free(s->queues);
  free(s->order);
  free(s);
}
