/* stella_sender.c - posts bodies in the background over several clients ("lanes"), each
 * posting items one after another: its client's own, or, for clients given one group,
 * the group's next item not yet taken (a shared queue: a lane that is done with one post
 * takes the next, so no connection waits for a slower one).
 *
 * One thread drives every lane (loop() below): it starts a post on each idle lane
 * (stella_http_start and a first step, which sends the request), waits for all the posts
 * in flight at once (their sockets and times left, from stella_http_wait_fd: epoll on
 * Linux, poll() elsewhere) and steps those that are ready, as wrk does, instead of a
 * thread per lane each blocked in its own client: one wake-up per answer, not a thread
 * switch and a lock hand-over per post. A post's timeouts, connection reuse and
 * reconnects are the client's own, as for stella_http_post.
 *
 * Two ways to use it. stella_sender_start_shared takes one list and its lanes end once
 * it is taken. stella_sender_open makes an appendable sender: lists ("chunks") are added
 * while the lanes are busy with earlier ones (stella_sender_add), so that the lanes go
 * from one chunk straight on to the next; a chunk's results are collected as soon as it
 * is through (stella_sender_collect), while the lanes go on with later chunks. This is
 * what keeps a trigger's or a flush's connections busy across batch boundaries.
 *
 * The caller (the trigger's pipeline, flush) keeps doing its own work - deciding the
 * next batch, claiming, settling - while the posts are on the wire. The lanes only ever
 * make first attempts on the happy path: at the first answer that is not 2xx or the
 * first transport failure, a one-list sender stops (every lane ends after its post in
 * flight) and an appendable one pauses (no lane takes another item until the caller has
 * collected the failed item's chunk, done its retries in its own thread and resumed).
 * An item whose deadline (the chunk's budget; never the chunk's first item) has passed
 * when a lane gets to it is skipped; stop ends everything. The clients are lent to the
 * lanes: the caller may use one only while the sender is paused with no post in flight
 * (stella_sender_pause), or after stella_sender_wait. */
#define _POSIX_C_SOURCE 200112L   /* clock_gettime, pthreads, poll */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#if defined(__linux__) && !defined(STELLA_SENDER_POLL)
#include <sys/epoll.h>
#endif
#include "stella.h"

enum { QUEUED, TAKEN, DONE, SKIPPED, WITHDRAWN };

typedef struct chunk chunk;

typedef struct item {
  struct item *next;             /* in its queue */
  chunk *c;
  stella_http *h;                /* the client the caller named */
  char *path, *body;             /* copies, owned here */
  size_t body_len;
  long long deadline_ms;         /* 0: none */
  int state;                     /* guarded by the sender's lock */
  stella_send_result r;          /* written by the lane that took it, read once DONE */
} item;

struct chunk {
  chunk *next;                   /* the sender's chunks not collected yet */
  long id;
  size_t n, resolved, taken;     /* resolved: DONE, SKIPPED or WITHDRAWN; taken: TAKEN now */
  size_t failed;                 /* DONE with a failure (each pauses an appendable sender) */
  item *items;
};

/* The items a lane (or the lanes of a group) take, oldest first. */
typedef struct queue {
  size_t group;                  /* 0: one lane's own items */
  item *head, *tail;
} queue;

typedef struct lane {
  struct lane *next;             /* the loop's list, in the order made (linked under the lock) */
  stella_http *h;                /* the client this lane posts with */
  size_t first;                  /* one list: the index of the client's first item; else the lane's number */
  queue *q;                      /* where it takes its items from */
  /* the loop thread's (under the lock, or outside it while the item is TAKEN) */
  item *it;                      /* the item in flight, or NULL */
  int fresh;                     /* it was taken and its post is not started yet */
  int ended_post;                /* its post has ended, it->r is filled: settle it */
  int failed;                    /* ... and it failed */
  int ended;                     /* the lane takes nothing more */
  long long due;                 /* step the post by then whatever its socket does */
  int fd;                        /* the socket it waits on (in the epoll set), or -1 */
  short events;                  /* ... for these (POLLIN, POLLOUT) */
  int ready;                     /* the wait found it ready */
  size_t attempted;              /* read after the join */
} lane;

struct stella_sender {
  lane **lanes;                  /* each its own allocation (the caller's index of them) */
  lane *first_lane, *last_lane;  /* the same lanes as a list: the loop thread's */
  size_t nlanes, cap_lanes;
  queue **queues;
  size_t nqueues, cap_queues;
  chunk *chunks;                 /* not collected yet, newest first */
  chunk *held;                   /* the chunk collected last (its results are read from here) */
  long next_id;
  int appendable;
  pthread_t thread;              /* the loop thread: drives every lane's posts */
  int wake_r, wake_w;            /* the pipe that wakes it from its wait (-1: none) */
  int ep;                        /* Linux: the loop's epoll set (-1: none) */
  pthread_mutex_t lock;          /* guards everything below, the queues and the items' state */
  pthread_cond_t changed;        /* signalled when an item is resolved or a lane ends */
  int woken;                     /* a byte is in the pipe */
  size_t finished;               /* lanes that have ended (take no more items) */
  size_t busy;                   /* posts in flight */
  size_t failures;               /* failed items in chunks not collected yet */
  int sealed;                    /* one list: no more items come; lanes end when theirs are taken */
  int stop, paused, broken;
  int mutex_ready, changed_ready, started, joined;
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

static void set_err(char *err, size_t errlen, const char *why) {
  if (errlen) { strncpy(err, why, errlen - 1); err[errlen - 1] = '\0'; }
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

static void free_chunk(chunk *c) {
  size_t i;
  if (c == NULL) return;
  for (i = 0; c->items && i < c->n; i++) {
    free(c->items[i].path);
    free(c->items[i].body);
    free(c->items[i].r.body);
    free(c->items[i].r.content_type);
    free(c->items[i].r.error);
  }
  free(c->items);
  free(c);
}

/* Keeps the result of item it's post, which ended on lane ln with r (the lock not held).
 * Returns 1 when it failed. */
static int keep(lane *ln, item *it, const stella_http_result *r) {
  stella_send_result *out = &it->r;
  out->attempted = 1;
  out->by = ln->first;
  if (!keep_result(out, r)) {   /* out of memory: report the attempt as an internal failure */
    free(out->body);
    free(out->content_type);
    free(out->error);
    out->body = out->content_type = out->error = NULL;
    out->outcome = STELLA_OUTCOME_INTERNAL;
    out->status = 0;
  }
  return out->outcome != STELLA_OUTCOME_OK;
}

/* Wakes the loop thread from its wait (the lock held): one byte in the pipe, unless one
 * is there already. */
static void wake(stella_sender *s) {
  if (s->woken || s->wake_w < 0) return;
  s->woken = 1;
  while (write(s->wake_w, "w", 1) < 0 && errno == EINTR) {}
}

/* Lane ln ends (the lock held). */
static void end_lane(stella_sender *s, lane *ln) {
  ln->ended = 1;
  s->finished++;
  pthread_cond_broadcast(&s->changed);
}

/* An idle lane takes its queue's next item (the lock held): sets ln->it, or ends the lane
 * when the sender stops (or, for one list, when its queue is empty), or leaves it idle. */
static void take(stella_sender *s, lane *ln, int *signal) {
  queue *q = ln->q;
  for (;;) {
    item *it;
    if (s->stop) { end_lane(s, ln); return; }
    if (s->paused || q->head == NULL) {
      if (s->sealed) end_lane(s, ln);
      return;
    }
    it = q->head;
    q->head = it->next;
    if (q->head == NULL) q->tail = NULL;
    it->next = NULL;
    if (it->deadline_ms != 0 && now_ms() >= it->deadline_ms) {   /* past its budget: not sent */
      it->state = SKIPPED;
      it->c->resolved++;
      if (it->c->resolved == it->c->n) *signal = 1;
      continue;
    }
    it->state = TAKEN;
    it->c->taken++;
    s->busy++;
    ln->it = it;
    ln->fresh = 1;
    return;
  }
}

/* Lane ln's post has ended (the lock held): its item is resolved. */
static void settle(stella_sender *s, lane *ln, int *signal) {
  item *it = ln->it;
  ln->it = NULL;
  ln->ended_post = 0;
  ln->attempted++;
  it->state = DONE;
  it->c->taken--;
  it->c->resolved++;
  s->busy--;
  if (ln->failed) {
    it->c->failed++;
    if (s->appendable) { s->paused = 1; s->failures++; }
    else s->stop = 1;   /* a one-list sender's lanes end */
  }
  /* wake the caller only for what it waits for (not at every post: that costs it a
   * wake-up per request): a chunk through, a chunk's or all posts in flight ended */
  if (it->c->resolved == it->c->n || it->c->taken == 0 || s->busy == 0 || ln->failed) *signal = 1;
}

/* ---------- what the loop thread waits on ------------------------------------------- */

/* Linux: an epoll set holding the wake-up pipe (no lane) and the lanes' sockets, each
 * armed for one event at a time (EPOLLONESHOT: an idle keep-alive connection that the
 * server closes wakes the loop once at most; a closed socket leaves the set by itself).
 * Elsewhere: one poll() over the pipe and the sockets of the posts in flight. */
#if defined(__linux__) && !defined(STELLA_SENDER_POLL)
#define USE_EPOLL 1
#endif

typedef struct waiter {
  int wake_r;
#ifdef USE_EPOLL
  int ep;
  struct epoll_event ready[64];
#else
  struct pollfd *fds;            /* entry 0: the pipe; entry k: polled[k - 1]'s socket */
  lane **polled;
  size_t cap;
#endif
} waiter;

/* Where lane ln's post stands after a call on its client (the loop thread): what to wait
 * for (ln->fd, ln->events, in the waiter) and until when (ln->due). */
static void watch(waiter *w, lane *ln, long long now) {
  short events = 0;
  long t = 0;
  int fd = -1;
  if (ln->it != NULL && !ln->ended_post) fd = stella_http_wait_fd(ln->h, &events, &t);
  ln->due = now + t;
#ifdef USE_EPOLL
  ln->fd = -1;
  if (fd >= 0) {
    /* one shot, armed again after every call: a socket closed (which leaves the set) and
     * opened again within the call may have the same number; a lane's socket stays in the
     * set while the lane is idle, disarmed, or armed for one event that wakes nobody */
    struct epoll_event e;
    memset(&e, 0, sizeof e);
    e.events = (uint32_t)(EPOLLONESHOT | ((events & POLLIN) ? EPOLLIN : 0) | ((events & POLLOUT) ? EPOLLOUT : 0));
    e.data.ptr = ln;
    if (epoll_ctl(w->ep, EPOLL_CTL_MOD, fd, &e) == 0 ||
        (errno == ENOENT && epoll_ctl(w->ep, EPOLL_CTL_ADD, fd, &e) == 0)) ln->fd = fd;
  }
#else
  (void)w;
  ln->fd = fd;
#endif
  ln->events = events;
  if (fd >= 0 && ln->fd < 0 && t > 1) ln->due = now + 1;   /* not watched: stepped every 1 ms */
}

/* Waits up to wait_ms (-1: until woken) for the watched sockets; marks the lanes whose
 * socket is ready (ln->ready). Returns 1 when the caller woke the loop. */
static int wait_for(waiter *w, lane *first, lane *last, long wait_ms) {
  int woken = 0, n, k;
  int timeout = wait_ms < 0 ? -1 : (int)(wait_ms > INT_MAX ? INT_MAX : wait_ms);
#ifdef USE_EPOLL
  (void)first;
  (void)last;
  n = epoll_wait(w->ep, w->ready, (int)(sizeof w->ready / sizeof w->ready[0]), timeout);
  for (k = 0; k < n; k++) {
    lane *ln = (lane *)w->ready[k].data.ptr;
    if (ln == NULL) woken = 1;
    else ln->ready = 1;
  }
#else
  lane *ln;
  size_t count = 1;
  for (ln = first; ln; ln = ln == last ? NULL : ln->next) count++;
  if (count > w->cap) {
    struct pollfd *f = (struct pollfd *)realloc(w->fds, count * sizeof *f);
    lane **p = f ? (lane **)realloc(w->polled, count * sizeof *p) : NULL;
    if (f) w->fds = f;
    if (p) { w->polled = p; w->cap = count; }
  }
  if (count > w->cap) {   /* out of memory: every post is stepped every 1 ms */
    for (ln = first; ln; ln = ln == last ? NULL : ln->next) ln->ready = 1;
    poll(NULL, 0, timeout < 0 || timeout > 1 ? 1 : timeout);
    return 1;
  }
  w->fds[0].fd = w->wake_r;
  w->fds[0].events = POLLIN;
  w->fds[0].revents = 0;
  count = 1;
  for (ln = first; ln; ln = ln == last ? NULL : ln->next) {
    if (ln->fd < 0) continue;
    w->fds[count].fd = ln->fd;
    w->fds[count].events = ln->events;
    w->fds[count].revents = 0;
    w->polled[count - 1] = ln;
    count++;
  }
  n = poll(w->fds, (nfds_t)count, timeout);
  for (k = 1; n > 0 && (size_t)k < count; k++)
    if (w->fds[k].revents) w->polled[k - 1]->ready = 1;
  if (n > 0 && w->fds[0].revents) woken = 1;
#endif
  if (woken) {   /* empty the pipe */
    char buf[64];
    while (read(w->wake_r, buf, sizeof buf) > 0) {}
  }
  return woken;
}

/* ---------- the loop thread --------------------------------------------------------- */

/* Starts lane ln's post and moves it on as far as it goes without waiting: the request
 * goes out at once (the lock not held). */
static void begin(lane *ln) {
  stella_http_result r;
  item *it = ln->it;
  ln->fresh = 0;
  if (stella_http_start(ln->h, it->path, it->body, it->body_len, &r) != STELLA_OUTCOME_OK ||
      stella_http_step(ln->h, 0, &r)) {
    ln->failed = keep(ln, it, &r);
    ln->ended_post = 1;
  }
}

/* Steps lane ln's post in flight (the lock not held). */
static void advance(lane *ln) {
  stella_http_result r;
  if (stella_http_step(ln->h, 0, &r)) {
    ln->failed = keep(ln, ln->it, &r);
    ln->ended_post = 1;
  }
}

/* The loop thread: every lane's posts, one at a time per lane, all lanes at once. Each
 * round, under the lock: the posts that ended are resolved, the idle lanes take their
 * next items. Then, without it: the new posts start (their requests go out at once), one
 * wait for every post in flight (its socket, its time left) and the wake-up pipe (the
 * caller added items, resumed or stopped), and the posts whose socket is ready or whose
 * time has come are stepped. The thread ends once every lane has ended. */
static void *loop(void *arg) {
  stella_sender *s = (stella_sender *)arg;
  waiter w;
  stella_short_slice(100000);   /* 0.1 ms: an answer wakes it at once beside a busy caller */
  memset(&w, 0, sizeof w);
  w.wake_r = s->wake_r;
#ifdef USE_EPOLL
  w.ep = s->ep;
#endif
  pthread_mutex_lock(&s->lock);
  for (;;) {
    lane *ln, *first = s->first_lane, *last = s->last_lane;   /* lanes added later: next round */
    int signal = 0, live = 0, ended = 0;
    long wait = -1;
    long long now;
    for (ln = first; ln; ln = ln == last ? NULL : ln->next)   /* every failure is seen ... */
      if (!ln->ended && ln->ended_post) settle(s, ln, &signal);
    for (ln = first; ln; ln = ln == last ? NULL : ln->next) {   /* ... before a lane takes more */
      if (ln->ended) continue;
      if (ln->it == NULL) take(s, ln, &signal);
      if (!ln->ended) live++;
    }
    if (signal) pthread_cond_broadcast(&s->changed);
    if (live == 0) break;
    s->woken = 0;   /* whatever the caller did so far is seen: the pipe may be emptied */
    pthread_mutex_unlock(&s->lock);

    now = now_ms();
    for (ln = first; ln; ln = ln == last ? NULL : ln->next) {
      if (ln->ended || !ln->fresh) continue;
      begin(ln);
      watch(&w, ln, now);
    }
    for (ln = first; ln; ln = ln == last ? NULL : ln->next) {
      long t;
      if (ln->ended || ln->it == NULL) continue;
      if (ln->ended_post) { ended = 1; continue; }
      t = ln->due > now ? (long)(ln->due - now) : 0;
      if (wait < 0 || t < wait) wait = t;
    }
    if (!ended) wait_for(&w, first, last, wait);   /* else: resolve it at once */
    now = now_ms();
    for (ln = first; ln; ln = ln == last ? NULL : ln->next) {
      if (ln->ended || ln->it == NULL || ln->ended_post) { ln->ready = 0; continue; }
      if (!ln->ready && now < ln->due) continue;
      ln->ready = 0;
      advance(ln);
      watch(&w, ln, now);
    }
    pthread_mutex_lock(&s->lock);
  }
  pthread_mutex_unlock(&s->lock);
#ifndef USE_EPOLL
  free(w.fds);
  free(w.polled);
#endif
  return NULL;
}

static stella_sender *new_sender(int appendable, char *err, size_t errlen) {
  stella_sender *s = (stella_sender *)calloc(1, sizeof *s);
  const char *why = "out of memory";
  if (s == NULL) goto fail;
  s->appendable = appendable;
  s->next_id = 1;
  s->wake_r = s->wake_w = s->ep = -1;
  {
    int p[2], k;
    if (pipe(p) != 0) { why = "cannot create a pipe"; goto fail; }
    s->wake_r = p[0];
    s->wake_w = p[1];
    for (k = 0; k < 2; k++)
      if (fcntl(p[k], F_SETFL, fcntl(p[k], F_GETFL) | O_NONBLOCK) != 0 ||
          fcntl(p[k], F_SETFD, FD_CLOEXEC) != 0) { why = "cannot set up a pipe"; goto fail; }
  }
#if defined(__linux__) && !defined(STELLA_SENDER_POLL)
  {
    struct epoll_event e;
    memset(&e, 0, sizeof e);
    e.events = EPOLLIN;
    e.data.ptr = NULL;   /* the pipe: no lane */
    s->ep = epoll_create1(EPOLL_CLOEXEC);
    if (s->ep < 0 || epoll_ctl(s->ep, EPOLL_CTL_ADD, s->wake_r, &e) != 0) {
      why = "cannot create an epoll set";
      goto fail;
    }
  }
#endif
  if (pthread_mutex_init(&s->lock, NULL) != 0) { why = "cannot create a mutex"; goto fail; }
  s->mutex_ready = 1;
  if (pthread_cond_init(&s->changed, NULL) != 0) { why = "cannot create a condition variable"; goto fail; }
  s->changed_ready = 1;
  return s;
fail:
  stella_sender_free(s);
  set_err(err, errlen, why);
  return NULL;
}

stella_sender *stella_sender_open(char *err, size_t errlen) {
  return new_sender(1, err, errlen);
}

static int grow(void **array, size_t *cap, size_t need, size_t size) {
  void *p;
  size_t c;
  if (need <= *cap) return 1;
  c = *cap ? *cap * 2 : 8;
  while (c < need) c *= 2;
  p = realloc(*array, c * size);
  if (p == NULL) return 0;
  *array = p;
  *cap = c;
  return 1;
}

/* The lane of client h, made (with its queue) when new; NULL with *why set on failure.
 * Only the caller's thread makes lanes and queues (the loop thread reads a new lane's
 * queue once it is in the list). */
static lane *lane_for(stella_sender *s, stella_http *h, size_t group, size_t first, const char **why) {
  size_t k, q;
  lane *ln;
  queue *qu = NULL;
  for (k = 0; k < s->nlanes; k++) {
    if (s->lanes[k]->h != h) continue;
    if (s->lanes[k]->q->group != group) { *why = "a client in two groups"; return NULL; }
    return s->lanes[k];
  }
  *why = "out of memory";
  if (!grow((void **)&s->lanes, &s->cap_lanes, s->nlanes + 1, sizeof *s->lanes) ||
      !grow((void **)&s->queues, &s->cap_queues, s->nqueues + 1, sizeof *s->queues)) return NULL;
  for (q = 0; group != 0 && q < s->nqueues; q++)
    if (s->queues[q]->group == group) { qu = s->queues[q]; break; }
  ln = (lane *)calloc(1, sizeof *ln);
  if (ln == NULL) return NULL;
  if (qu == NULL) {
    qu = (queue *)calloc(1, sizeof *qu);
    if (qu == NULL) { free(ln); return NULL; }
    qu->group = group;
    s->queues[s->nqueues++] = qu;
  }
  ln->h = h;
  ln->fd = -1;
  ln->first = s->appendable ? s->nlanes : first;
  ln->q = qu;
  s->lanes[s->nlanes++] = ln;
  pthread_mutex_lock(&s->lock);   /* the loop thread walks the list */
  if (s->last_lane) s->last_lane->next = ln;
  else s->first_lane = ln;
  s->last_lane = ln;
  pthread_mutex_unlock(&s->lock);
  return ln;
}

long stella_sender_add(stella_sender *s, const stella_send_item *items, const size_t *groups,
                       size_t n, long budget_ms, char *err, size_t errlen) {
  const char *why = "out of memory";
  chunk *c = NULL;
  lane **of = NULL;   /* item -> its lane */
  size_t i, old_lanes = s->nlanes;
  long long deadline = now_ms() + (budget_ms > 0 ? budget_ms : 0);
  if (s->stop || s->broken || s->joined || s->sealed) { why = "the sender has stopped"; goto fail; }
  c = (chunk *)calloc(1, sizeof *c);
  if (c == NULL) goto fail;
  c->n = n;
  c->items = (item *)calloc(n ? n : 1, sizeof *c->items);
  of = (lane **)calloc(n ? n : 1, sizeof *of);
  if (c->items == NULL || of == NULL) goto fail;
  for (i = 0; i < n; i++) {
    item *it = &c->items[i];
    it->c = c;
    it->h = items[i].h;
    it->path = copy_text(items[i].path, strlen(items[i].path));
    it->body = copy_text(items[i].body, items[i].body_len);
    it->body_len = items[i].body_len;
    it->deadline_ms = i > 0 ? deadline : 0;   /* the chunk's first item always goes */
    if (it->path == NULL || it->body == NULL) goto fail;
    of[i] = lane_for(s, items[i].h, groups ? groups[i] : 0, i, &why);
    if (of[i] == NULL) goto fail;
  }
  if (!s->started && s->nlanes > 0) {   /* the loop thread: its lanes wait for work */
    if (pthread_create(&s->thread, NULL, loop, s) != 0) {
      s->broken = 1;   /* lanes without a thread: no more items may come */
      why = "cannot start a sending thread";
      goto fail;
    }
    s->started = 1;
  }
  pthread_mutex_lock(&s->lock);
  c->id = s->next_id++;
  c->next = s->chunks;
  s->chunks = c;
  for (i = 0; i < n; i++) {
    queue *q = of[i]->q;
    item *it = &c->items[i];
    it->state = QUEUED;
    if (q->tail) q->tail->next = it;
    else q->head = it;
    q->tail = it;
  }
  wake(s);
  pthread_mutex_unlock(&s->lock);
  free(of);
  return c->id;

fail:
  if (s->nlanes > old_lanes) s->broken = 1;   /* lanes without their items or thread: no more */
  free(of);
  free_chunk(c);
  set_err(err, errlen, why);
  return -1;
}

static chunk *find_chunk(stella_sender *s, long id) {
  chunk *c;
  for (c = s->chunks; c && c->id != id; c = c->next) {}
  return c;
}

/* Whether chunk c can be collected without waiting for a post: every item resolved, or
 * the lanes paused or stopped with no post in flight. */
static int chunk_ready(stella_sender *s, chunk *c) {
  return c == NULL || c->resolved == c->n || ((s->paused || s->stop || s->finished == s->nlanes) && s->busy == 0);
}

static void deadline_in(struct timespec *until, long wait_ms) {
  clock_gettime(CLOCK_REALTIME, until);   /* pthread_cond_timedwait's clock */
  until->tv_sec += wait_ms / 1000;
  until->tv_nsec += (wait_ms % 1000) * 1000000L;
  if (until->tv_nsec >= 1000000000L) { until->tv_sec++; until->tv_nsec -= 1000000000L; }
}

int stella_sender_ready(stella_sender *s, long id, long wait_ms) {
  struct timespec until;
  int ready;
  deadline_in(&until, wait_ms);
  pthread_mutex_lock(&s->lock);
  while (!chunk_ready(s, find_chunk(s, id)) && wait_ms > 0)
    if (pthread_cond_timedwait(&s->changed, &s->lock, &until) != 0) break;   /* timed out */
  ready = chunk_ready(s, find_chunk(s, id));
  pthread_mutex_unlock(&s->lock);
  return ready;
}

/* Takes chunk c's items no lane has taken out of their queues and waits for its posts in
 * flight: afterwards no lane touches it again. The lock is held. */
static void withdraw(stella_sender *s, chunk *c) {
  size_t q;
  for (q = 0; q < s->nqueues; q++) {
    queue *qu = s->queues[q];
    item **at = &qu->head;
    qu->tail = NULL;
    while (*at) {
      if ((*at)->c == c) {
        item *it = *at;
        *at = it->next;
        it->next = NULL;
        it->state = WITHDRAWN;
        c->resolved++;
      } else {
        qu->tail = *at;
        at = &(*at)->next;
      }
    }
  }
  while (c->taken > 0) pthread_cond_wait(&s->changed, &s->lock);
}

long stella_sender_collect(stella_sender *s, long id) {
  chunk *c, **at;
  pthread_mutex_lock(&s->lock);
  for (at = &s->chunks; *at && (*at)->id != id; at = &(*at)->next) {}
  c = *at;
  if (c == NULL) { pthread_mutex_unlock(&s->lock); return -1; }
  withdraw(s, c);
  *at = c->next;
  s->failures -= c->failed;
  pthread_mutex_unlock(&s->lock);
  free_chunk(s->held);
  s->held = c;
  return (long)c->n;
}

const stella_send_result *stella_sender_collected(const stella_sender *s, size_t i, int *state) {
  const item *it;
  *state = STELLA_SEND_NOT_TAKEN;
  if (s->held == NULL || i >= s->held->n) return NULL;
  it = &s->held->items[i];
  if (it->state == SKIPPED) *state = STELLA_SEND_SKIPPED;
  if (it->state != DONE) return NULL;
  *state = STELLA_SEND_DONE;
  return &it->r;
}

int stella_sender_pause(stella_sender *s) {
  pthread_mutex_lock(&s->lock);
  if (s->appendable) s->paused = 1;
  while (s->busy > 0) pthread_cond_wait(&s->changed, &s->lock);
  pthread_mutex_unlock(&s->lock);
  return s->appendable;
}

int stella_sender_resume(stella_sender *s) {
  int running;
  pthread_mutex_lock(&s->lock);
  if (s->appendable && !s->stop && s->failures == 0) s->paused = 0;
  running = s->appendable && !s->stop && !s->paused;
  if (running) wake(s);
  pthread_mutex_unlock(&s->lock);
  return running;
}

int stella_sender_paused(stella_sender *s) {
  int paused;
  pthread_mutex_lock(&s->lock);
  paused = s->paused || s->stop;
  pthread_mutex_unlock(&s->lock);
  return paused;
}

stella_sender *stella_sender_start(const stella_send_item *items, size_t n, long budget_ms,
                                   char *err, size_t errlen) {
  return stella_sender_start_shared(items, NULL, n, budget_ms, err, errlen);
}

stella_sender *stella_sender_start_shared(const stella_send_item *items, const size_t *groups,
                                          size_t n, long budget_ms, char *err, size_t errlen) {
  stella_sender *s = new_sender(0, err, errlen);
  if (s == NULL) return NULL;
  if (stella_sender_add(s, items, groups, n, budget_ms, err, errlen) < 0) {
    stella_sender_free(s);
    return NULL;
  }
  pthread_mutex_lock(&s->lock);
  s->sealed = 1;   /* the lanes end once their queue is empty */
  wake(s);
  pthread_mutex_unlock(&s->lock);
  return s;
}

int stella_sender_done(stella_sender *s) {
  return stella_sender_done_within(s, 0);
}

int stella_sender_done_within(stella_sender *s, long wait_ms) {
  struct timespec until;
  int done;
  if (s->joined) return 1;
  deadline_in(&until, wait_ms);
  pthread_mutex_lock(&s->lock);
  while (s->finished < s->nlanes && wait_ms > 0)
    if (pthread_cond_timedwait(&s->changed, &s->lock, &until) != 0) break;   /* timed out */
  done = s->finished == s->nlanes;
  pthread_mutex_unlock(&s->lock);
  return done;
}

void stella_sender_stop(stella_sender *s) {
  if (!s->mutex_ready || s->joined) return;
  pthread_mutex_lock(&s->lock);
  s->stop = 1;
  wake(s);
  pthread_cond_broadcast(&s->changed);
  pthread_mutex_unlock(&s->lock);
}

static void join_all(stella_sender *s) {
  if (s->started) pthread_join(s->thread, NULL);
  s->started = 0;
  s->joined = 1;
}

size_t stella_sender_wait(stella_sender *s) {
  size_t k, total = 0;
  if (!s->joined) {
    if (s->appendable) stella_sender_stop(s);   /* its lanes would wait for more items */
    join_all(s);
  }
  for (k = 0; k < s->nlanes; k++) total += s->lanes[k]->attempted;
  return total;
}

const stella_send_result *stella_sender_result(const stella_sender *s, size_t i) {
  const chunk *c = s->chunks;
  if (!s->joined || s->appendable || c == NULL || i >= c->n || c->items[i].state != DONE) return NULL;
  return &c->items[i].r;
}

void stella_sender_free(stella_sender *s) {
  size_t k;
  if (s == NULL) return;
  if (s->mutex_ready && s->changed_ready && !s->joined) {
    stella_sender_stop(s);   /* each lane ends its post in flight (or times out); none starts another */
    join_all(s);
  }
  if (s->changed_ready) pthread_cond_destroy(&s->changed);
  if (s->mutex_ready) pthread_mutex_destroy(&s->lock);
  if (s->wake_r >= 0) close(s->wake_r);
  if (s->wake_w >= 0) close(s->wake_w);
  if (s->ep >= 0) close(s->ep);
  free_chunk(s->held);
  while (s->chunks) {
    chunk *c = s->chunks;
    s->chunks = c->next;
    free_chunk(c);
  }
  for (k = 0; k < s->nlanes; k++) free(s->lanes[k]);
  for (k = 0; k < s->nqueues; k++) free(s->queues[k]);
  free(s->lanes);
  free(s->queues);
  free(s);
}
