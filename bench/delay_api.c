/*
 * bench/delay_api.c: a benchmark fixture, not part of the library. A loopback stand-in for
 * the Requests API that answers every request exactly `delay` after it fully arrived, so
 * that bench/lanes.lua measures the client and not the server (the nginx slow API,
 * spec/support/openresty/slow_api.lua, holds a 20 ms request 21-22 ms: millisecond
 * timers, a cached clock and per-request shared-dict work).
 *
 * Linux only (epoll, timerfd, signalfd, prctl), which is fine for a bench fixture.
 *
 *   delay_api [-d SECONDS] [PORT]      (default delay 0.02 s; PORT 0 or none: any free one)
 *
 * Listens on 127.0.0.1:PORT and prints the port it listens on as its first line of stdout.
 * One thread, one epoll loop, non-blocking sockets, HTTP/1.1 keep-alive (HTTP/1.0 and
 * "Connection: close" close after the answer); a request is its head plus a
 * Content-Length body; pipelined requests on a connection are answered in order.
 *
 *   POST /v1/requests (any other path too)  201 {"request_id":"d-N"}, `delay` after it
 *                       arrived (CLOCK_MONOTONIC; a min-heap of deadlines driving one
 *                       timerfd armed with absolute times; timer slack 1 ns)
 *   GET  /_received     {"total":..,"held_us":..,"max":..,"busy":..,"failed":..,"first":..,
 *                       "last":..,"ids":..,"dups":..,"delay":..,"status":..}: answered (201),
 *                       the sum of their hold times (arrival to answer written, µs), the
 *                       most held at once, held now, answered with another status, the first
 *                       counted arrival and the last counted answer (CLOCK_REALTIME, s),
 *                       distinct "ext_interaction_id" values answered, and how many of
 *                       those were answered more than once
 *   POST /_reset        zeroes the counters and forgets the ids (keeps delay and status)
 *   POST /_delay?s=D    the delay for requests arriving from now on
 *   POST /_status?code=C   answer C instead of 201 (not counted in total; 201 again: code=201)
 *
 * Controls answer at once (behind any request before them on the same connection).
 * SIGTERM or SIGINT: frees everything and exits 0.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_HEAD 16384
#define MAX_BODY (1024 * 1024)
#define MAX_ID 256

typedef struct conn conn;

/* One request read and not yet answered. */
typedef struct pending {
  struct pending *next;  /* the connection's answer queue, in arrival order */
  conn *c;
  int64_t arrived;       /* CLOCK_MONOTONIC, µs */
  double arrived_real;   /* CLOCK_REALTIME, s */
  int64_t due;
  uint64_t seq;          /* ties in the heap: arrival order */
  int delayed;           /* a /v1/requests answer (counted), not a control */
  int ready;             /* due: its answer may be written once those before it are */
  int close_after;
  char target[128];      /* a control's path and query */
  char id[MAX_ID];       /* its ext_interaction_id, "" when none */
} pending;

struct conn {
  conn *prev, *next;     /* the server's live or dead list */
  int fd;
  int closed;            /* the socket is gone; freed when no pending refers to it */
  int no_more;           /* a request asked to close: nothing after it is read */
  int want_out;          /* EPOLLOUT registered */
  int close_when_written;
  size_t npending;
  pending *head, *tail;
  char *in;
  size_t in_len, in_cap;
  char *out;
  size_t out_len, out_off, out_cap;
  int continued;         /* "100 Continue" sent for the request being read */
};

/* The ids answered: open addressing, keys owned. */
typedef struct {
  char **keys;
  unsigned *counts;
  size_t cap, len;
} idset;

typedef struct {
  int ep, lfd, tfd, sfd;
  int64_t delay_us;
  int status;
  pending **heap;
  size_t heap_len, heap_cap;
  int64_t armed;         /* the timerfd's deadline, 0 when disarmed */
  uint64_t seq, answers;
  /* counters */
  uint64_t total, failed, dups;
  int64_t held_us;
  size_t busy, max_busy;
  double first, last;
  idset ids;
  conn *live, *dead;     /* dead: closed, freed by sweep() once no pending refers to it */
} server;

static int64_t now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static double now_real(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
  perror(what);
  exit(2);
}

static void *xrealloc(void *p, size_t n) {
  void *q = realloc(p, n);
  if (!q) die("realloc");
  return q;
}

/* ---- the set of ids ----------------------------------------------------------------- */

static uint64_t hash(const char *s) {
  uint64_t h = 1469598103934665603ULL;
  for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ULL;
  return h;
}

static void idset_free(idset *set) {
  size_t i;
  for (i = 0; i < set->cap; i++) free(set->keys[i]);
  free(set->keys);
  free(set->counts);
  memset(set, 0, sizeof *set);
}

static void idset_grow(idset *set) {
  idset bigger;
  size_t i;
  bigger.cap = set->cap ? set->cap * 2 : 1024;
  bigger.len = set->len;
  bigger.keys = calloc(bigger.cap, sizeof *bigger.keys);
  bigger.counts = calloc(bigger.cap, sizeof *bigger.counts);
  if (!bigger.keys || !bigger.counts) die("calloc");
  for (i = 0; i < set->cap; i++) {
    if (set->keys[i]) {
      size_t j = hash(set->keys[i]) & (bigger.cap - 1);
      while (bigger.keys[j]) j = (j + 1) & (bigger.cap - 1);
      bigger.keys[j] = set->keys[i];
      bigger.counts[j] = set->counts[i];
    }
  }
  free(set->keys);
  free(set->counts);
  *set = bigger;
}

/* Counts one more answer for `id`; returns how many it has now. */
static unsigned idset_add(idset *set, const char *id) {
  size_t j;
  if ((set->len + 1) * 2 > set->cap) idset_grow(set);
  j = hash(id) & (set->cap - 1);
  while (set->keys[j]) {
    if (strcmp(set->keys[j], id) == 0) return ++set->counts[j];
    j = (j + 1) & (set->cap - 1);
  }
  set->keys[j] = strdup(id);
  if (!set->keys[j]) die("strdup");
  set->counts[j] = 1;
  set->len++;
  return 1;
}

/* ---- the deadline heap -------------------------------------------------------------- */

static int earlier(const pending *a, const pending *b) {
  return a->due < b->due || (a->due == b->due && a->seq < b->seq);
}

static void heap_push(server *s, pending *p) {
  size_t i;
  if (s->heap_len == s->heap_cap) {
    s->heap_cap = s->heap_cap ? s->heap_cap * 2 : 256;
    s->heap = xrealloc(s->heap, s->heap_cap * sizeof *s->heap);
  }
  i = s->heap_len++;
  while (i > 0 && earlier(p, s->heap[(i - 1) / 2])) {
    s->heap[i] = s->heap[(i - 1) / 2];
    i = (i - 1) / 2;
  }
  s->heap[i] = p;
}

static pending *heap_pop(server *s) {
  pending *top = s->heap[0], *last = s->heap[--s->heap_len];
  size_t i = 0, n = s->heap_len;
  for (;;) {
    size_t k = 2 * i + 1;
    if (k >= n) break;
    if (k + 1 < n && earlier(s->heap[k + 1], s->heap[k])) k++;
    if (!earlier(s->heap[k], last)) break;
    s->heap[i] = s->heap[k];
    i = k;
  }
  if (n > 0) s->heap[i] = last;
  return top;
}

/* Arms the timerfd for the heap's first deadline (absolute), or disarms it. */
static void arm(server *s) {
  struct itimerspec its;
  int64_t due = s->heap_len ? s->heap[0]->due : 0;
  if (due == s->armed) return;
  memset(&its, 0, sizeof its);
  if (due) {
    its.it_value.tv_sec = due / 1000000;
    its.it_value.tv_nsec = (long)(due % 1000000) * 1000;
  }
  if (timerfd_settime(s->tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0) die("timerfd_settime");
  s->armed = due;
}

/* ---- connections -------------------------------------------------------------------- */

static void set_out_interest(server *s, conn *c) {
  int want = c->out_len > c->out_off;
  struct epoll_event ev;
  if (want == c->want_out || c->closed) return;
  ev.events = EPOLLIN | (want ? EPOLLOUT : 0);
  ev.data.ptr = c;
  if (epoll_ctl(s->ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl");
  c->want_out = want;
}

static void list_remove(conn **list, conn *c) {
  if (c->prev) c->prev->next = c->next;
  else *list = c->next;
  if (c->next) c->next->prev = c->prev;
  c->prev = c->next = NULL;
}

static void list_push(conn **list, conn *c) {
  c->prev = NULL;
  c->next = *list;
  if (*list) (*list)->prev = c;
  *list = c;
}

/* Closes the socket and moves the connection to the dead list (an event later in the same
 * epoll batch may still name it: it is freed by sweep(), after the batch). */
static void conn_close(server *s, conn *c) {
  pending *p, *next;
  if (c->closed) return;
  epoll_ctl(s->ep, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
  c->closed = 1;
  list_remove(&s->live, c);
  list_push(&s->dead, c);
  /* the answers not in the heap (controls, and delayed ones already due) go now; those in
   * the heap are freed when they come due */
  for (p = c->head; p; p = next) {
    next = p->next;
    if (p->ready) {
      if (p->delayed) s->busy--;
      free(p);
      c->npending--;
    }
  }
  c->head = c->tail = NULL;
}

/* Frees the closed connections no pending answer refers to any more. */
static void sweep(server *s) {
  conn *c = s->dead, *next;
  for (; c; c = next) {
    next = c->next;
    if (c->npending == 0) {
      list_remove(&s->dead, c);
      free(c->in);
      free(c->out);
      free(c);
    }
  }
}

static void out_append(conn *c, const char *data, size_t n) {
  if (c->out_off > 0 && c->out_off == c->out_len) c->out_off = c->out_len = 0;
  if (c->out_len + n > c->out_cap) {
    while (c->out_len + n > c->out_cap) c->out_cap = c->out_cap ? c->out_cap * 2 : 4096;
    c->out = xrealloc(c->out, c->out_cap);
  }
  memcpy(c->out + c->out_len, data, n);
  c->out_len += n;
}

/* Writes what it can; 0 when the connection was closed. */
static int flush_out(server *s, conn *c) {
  while (c->out_off < c->out_len) {
    ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      conn_close(s, c);
      return 0;
    }
    c->out_off += (size_t)w;
  }
  if (c->out_off == c->out_len && c->close_when_written) {
    conn_close(s, c);
    return 0;
  }
  set_out_interest(s, c);
  return 1;
}

static void run_control(server *s, conn *c, const pending *p);

/* The answer of a due /v1/requests: counted when it is a 201. */
static void answer_delayed(server *s, conn *c, pending *p) {
  char buf[512];
  int n;
  s->busy--;
  if (s->status == 201) {
    double real = now_real();
    s->total++;
    s->held_us += now_us() - p->arrived;
    if (s->total == 1 || p->arrived_real < s->first) s->first = p->arrived_real;
    if (real > s->last) s->last = real;
    if (p->id[0] && idset_add(&s->ids, p->id) == 2) s->dups++;
    s->answers++;
    {
      char body[64];
      int bn = snprintf(body, sizeof body, "{\"request_id\":\"d-%llu\"}", (unsigned long long)s->answers);
      n = snprintf(buf, sizeof buf,
                   "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s",
                   bn, p->close_after ? "Connection: close\r\n" : "", body);
    }
  } else {
    static const char body[] = "{\"message\":\"unavailable\"}";
    s->failed++;
    n = snprintf(buf, sizeof buf,
                 "HTTP/1.1 %d Status\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s",
                 s->status, (int)sizeof body - 1, p->close_after ? "Connection: close\r\n" : "", body);
  }
  out_append(c, buf, (size_t)n);
}

/* Writes the answers at the head of c's queue that are due, in order. */
static void emit_ready(server *s, conn *c) {
  int any = 0;
  while (c->head && c->head->ready) {
    pending *p = c->head;
    c->head = p->next;
    if (!c->head) c->tail = NULL;
    if (p->delayed) answer_delayed(s, c, p);
    else run_control(s, c, p);
    if (p->close_after) c->close_when_written = 1;
    free(p);
    c->npending--;
    any = 1;
  }
  if (any) flush_out(s, c);
}

/* Pops and answers every request due by now. */
static void answer_due(server *s) {
  int64_t t = now_us();
  while (s->heap_len && s->heap[0]->due <= t) {
    pending *p = heap_pop(s);
    conn *c = p->c;
    if (c->closed) {   /* its connection went meanwhile */
      s->busy--;
      free(p);
      c->npending--;
      continue;
    }
    p->ready = 1;
    emit_ready(s, c);
  }
  arm(s);
}

/* ---- requests ----------------------------------------------------------------------- */

static char *control_answer(int status, const char *json, int close_after) {
  size_t n = strlen(json) + 160;
  char *a = malloc(n);
  if (!a) die("malloc");
  snprintf(a, n, "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n%s\r\n%s", status,
           status == 200 ? "OK" : "Not Found", strlen(json), close_after ? "Connection: close\r\n" : "", json);
  return a;
}

/* The value of header `name` in the head (lines after the request line), or NULL. */
static const char *header(const char *head, size_t len, const char *name, size_t *vlen) {
  const char *p = memchr(head, '\n', len), *end = head + len;
  size_t nl = strlen(name);
  while (p && p + 1 < end) {
    const char *line = p + 1, *eol = memchr(line, '\n', (size_t)(end - line));
    if (!eol) break;
    if ((size_t)(eol - line) > nl && line[nl] == ':' && strncasecmp(line, name, nl) == 0) {
      const char *v = line + nl + 1, *ve = eol;
      while (v < ve && (*v == ' ' || *v == '\t')) v++;
      while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t')) ve--;
      *vlen = (size_t)(ve - v);
      return v;
    }
    p = eol;
  }
  return NULL;
}

static int has_token(const char *v, size_t vlen, const char *token) {
  size_t tl = strlen(token), i;
  for (i = 0; v && i + tl <= vlen; i++)
    if (strncasecmp(v + i, token, tl) == 0) return 1;
  return 0;
}

/* The body's "ext_interaction_id":"..." value into out ("" when none). */
static void scan_id(const char *body, size_t len, char *out) {
  static const char key[] = "\"ext_interaction_id\"";
  const char *p = body, *end = body + len;
  out[0] = '\0';
  while ((p = memmem(p, (size_t)(end - p), key, sizeof key - 1)) != NULL) {
    const char *v = p + sizeof key - 1;
    size_t n = 0;
    while (v < end && (*v == ' ' || *v == ':' || *v == '\t')) v++;
    if (v < end && *v == '"') {
      v++;
      while (v < end && *v != '"' && n < MAX_ID - 1) {
        if (*v == '\\' && v + 1 < end) out[n++] = *v++;
        out[n++] = *v++;
      }
      out[n] = '\0';
      return;
    }
    p = v;
  }
}

static void received_json(server *s, char *buf, size_t n) {
  snprintf(buf, n,
           "{\"total\":%llu,\"held_us\":%lld,\"max\":%zu,\"busy\":%zu,\"failed\":%llu,\"first\":%.6f,"
           "\"last\":%.6f,\"ids\":%zu,\"dups\":%llu,\"delay\":%.6f,\"status\":%d}",
           (unsigned long long)s->total, (long long)s->held_us, s->max_busy, s->busy,
           (unsigned long long)s->failed, s->first, s->last, s->ids.len, (unsigned long long)s->dups,
           s->delay_us / 1e6, s->status);
}

/* Runs a control and appends its answer: when its turn on the connection comes. */
static void run_control(server *s, conn *c, const pending *p) {
  const char *target = p->target;
  size_t tlen = strlen(target);
  char json[512], *answer;
#define IS(path) (tlen >= sizeof(path) - 1 && memcmp(target, path, sizeof(path) - 1) == 0)
  if (IS("/_received")) {
    received_json(s, json, sizeof json);
    answer = control_answer(200, json, p->close_after);
  } else if (IS("/_reset")) {
    s->total = s->failed = s->dups = 0;
    s->held_us = 0;
    s->max_busy = s->busy;
    s->first = s->last = 0;
    idset_free(&s->ids);
    answer = control_answer(200, "{}", p->close_after);
  } else if (IS("/_delay?s=")) {
    s->delay_us = (int64_t)(strtod(target + sizeof "/_delay?s=" - 1, NULL) * 1e6 + 0.5);
    if (s->delay_us < 0) s->delay_us = 0;
    answer = control_answer(200, "{}", p->close_after);
  } else if (IS("/_status?code=")) {
    s->status = atoi(target + sizeof "/_status?code=" - 1);
    if (s->status < 100 || s->status > 599) s->status = 201;
    answer = control_answer(200, "{}", p->close_after);
  } else {
    answer = control_answer(404, "{}", p->close_after);
  }
#undef IS
  out_append(c, answer, strlen(answer));
  free(answer);
}

/* Queues the request: a control answers at once (in its turn), a request at its deadline. */
static void take_request(server *s, conn *c, const char *head, size_t head_len, const char *body, size_t body_len) {
  pending *p = calloc(1, sizeof *p);
  const char *sp = memchr(head, ' ', head_len), *target, *te, *v;
  size_t tlen, vlen = 0;
  if (!p) die("calloc");
  target = sp ? sp + 1 : head;
  te = memchr(target, ' ', (size_t)(head + head_len - target));
  if (!te) te = target;
  tlen = (size_t)(te - target);
  v = header(head, head_len, "Connection", &vlen);
  p->close_after = has_token(v, vlen, "close") ||
                   (te + 9 <= head + head_len && memcmp(te, " HTTP/1.0", 9) == 0 && !has_token(v, vlen, "keep-alive"));
  p->c = c;
  p->seq = s->seq++;
  p->arrived = now_us();
  if (tlen >= 2 && target[0] == '/' && target[1] == '_') {
    if (tlen >= sizeof p->target) tlen = sizeof p->target - 1;
    memcpy(p->target, target, tlen);
    p->target[tlen] = '\0';
  } else {
    p->delayed = 1;
    p->arrived_real = now_real();
    p->due = p->arrived + s->delay_us;
    scan_id(body, body_len, p->id);
    if (++s->busy > s->max_busy) s->max_busy = s->busy;
  }
  if (c->tail) c->tail->next = p;
  else c->head = p;
  c->tail = p;
  c->npending++;
  if (p->close_after) c->no_more = 1;
  if (p->delayed) {
    heap_push(s, p);
    if (!s->armed || p->due < s->armed) arm(s);
  } else {
    p->ready = 1;
    emit_ready(s, c);
  }
}

/* Takes every complete request from c's input; 0 when the connection was closed. */
static int parse_input(server *s, conn *c) {
  size_t off = 0;
  while (!c->closed && !c->no_more) {
    const char *start = c->in + off, *end;
    size_t avail = c->in_len - off, head_len, body_len = 0, vlen;
    const char *v;
    end = avail >= 4 ? memmem(start, avail, "\r\n\r\n", 4) : NULL;
    if (!end) {
      if (avail > MAX_HEAD) { conn_close(s, c); return 0; }
      break;
    }
    head_len = (size_t)(end - start) + 4;
    v = header(start, head_len - 2, "Content-Length", &vlen);
    if (v) {
      body_len = (size_t)strtoul(v, NULL, 10);
      if (body_len > MAX_BODY) { conn_close(s, c); return 0; }
    } else if (header(start, head_len - 2, "Transfer-Encoding", &vlen)) {
      conn_close(s, c);   /* chunked bodies: not for this fixture */
      return 0;
    }
    if (avail < head_len + body_len) {
      if (!c->continued) {
        const char *e = header(start, head_len - 2, "Expect", &vlen);
        if (e && has_token(e, vlen, "100-continue")) {
          out_append(c, "HTTP/1.1 100 Continue\r\n\r\n", 25);
          c->continued = 1;
          if (!flush_out(s, c)) return 0;
        }
      }
      break;
    }
    c->continued = 0;
    take_request(s, c, start, head_len - 2, start + head_len, body_len);
    off += head_len + body_len;
  }
  if (c->closed) return 0;
  if (off > 0) {
    memmove(c->in, c->in + off, c->in_len - off);
    c->in_len -= off;
  }
  return 1;
}

static void on_readable(server *s, conn *c) {
  for (;;) {
    ssize_t r;
    size_t room;
    if (c->in_cap - c->in_len < 4096) {
      c->in_cap = c->in_cap ? c->in_cap * 2 : 8192;
      c->in = xrealloc(c->in, c->in_cap);
    }
    room = c->in_cap - c->in_len;
    r = recv(c->fd, c->in + c->in_len, room, 0);
    if (r > 0) {
      c->in_len += (size_t)r;
      if ((size_t)r < room) break;   /* the socket is drained */
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    conn_close(s, c);   /* EOF or error */
    return;
  }
  parse_input(s, c);
}

static void on_accept(server *s) {
  for (;;) {
    int one = 1;
    struct epoll_event ev;
    conn *c;
    int fd = accept4(s->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      if (errno == EMFILE || errno == ENFILE) return;
      die("accept4");
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c = calloc(1, sizeof *c);
    if (!c) die("calloc");
    c->fd = fd;
    list_push(&s->live, c);
    ev.events = EPOLLIN;
    ev.data.ptr = c;
    if (epoll_ctl(s->ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
  }
}

/* ---- main --------------------------------------------------------------------------- */

static void usage(void) {
  fprintf(stderr, "usage: delay_api [-d SECONDS] [PORT]\n");
  exit(2);
}

int main(int argc, char **argv) {
  server s;
  struct sockaddr_in addr;
  socklen_t alen = sizeof addr;
  struct epoll_event ev, evs[256];
  sigset_t mask;
  int one = 1, port = 0, i, running = 1;
  memset(&s, 0, sizeof s);
  s.delay_us = 20000;
  s.status = 201;
  for (i = 1; i < argc; i++) {
    if (strcmp(argv[i], "-d") == 0 && i + 1 < argc) s.delay_us = (int64_t)(strtod(argv[++i], NULL) * 1e6 + 0.5);
    else if (argv[i][0] >= '0' && argv[i][0] <= '9') port = atoi(argv[i]);
    else usage();
  }
  prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);

  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0) die("sigprocmask");
  s.sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
  if (s.sfd < 0) die("signalfd");
  signal(SIGPIPE, SIG_IGN);

  s.lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (s.lfd < 0) die("socket");
  setsockopt(s.lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  memset(&addr, 0, sizeof addr);
  addr.sin_family = AF_INET;
  addr.sin_port = htons((unsigned short)port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(s.lfd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
  if (listen(s.lfd, 4096) < 0) die("listen");
  if (getsockname(s.lfd, (struct sockaddr *)&addr, &alen) < 0) die("getsockname");
  printf("%d\n", ntohs(addr.sin_port));
  fflush(stdout);

  s.tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (s.tfd < 0) die("timerfd_create");
  s.ep = epoll_create1(EPOLL_CLOEXEC);
  if (s.ep < 0) die("epoll_create1");
  ev.events = EPOLLIN;
  ev.data.ptr = &s.lfd;   /* the tags of the three: their fields' addresses */
  if (epoll_ctl(s.ep, EPOLL_CTL_ADD, s.lfd, &ev) < 0) die("epoll_ctl");
  ev.data.ptr = &s.tfd;
  if (epoll_ctl(s.ep, EPOLL_CTL_ADD, s.tfd, &ev) < 0) die("epoll_ctl");
  ev.data.ptr = &s.sfd;
  if (epoll_ctl(s.ep, EPOLL_CTL_ADD, s.sfd, &ev) < 0) die("epoll_ctl");

  while (running) {
    int n = epoll_wait(s.ep, evs, (int)(sizeof evs / sizeof evs[0]), -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      die("epoll_wait");
    }
    for (i = 0; i < n; i++) {
      void *tag = evs[i].data.ptr;
      if (tag == (void *)&s.lfd) {
        on_accept(&s);
      } else if (tag == (void *)&s.tfd) {
        uint64_t expirations;
        if (read(s.tfd, &expirations, sizeof expirations) < 0 && errno != EAGAIN) die("read timerfd");
        s.armed = 0;   /* fired: arm() sets it again for what is left */
        answer_due(&s);
      } else if (tag == (void *)&s.sfd) {
        running = 0;
      } else {
        conn *c = tag;
        if (c->closed) continue;
        if (evs[i].events & (EPOLLERR | EPOLLHUP)) {
          on_readable(&s, c);   /* reads what is left, then sees the end */
          if (!c->closed) conn_close(&s, c);
          continue;
        }
        if (evs[i].events & EPOLLOUT) {
          if (!flush_out(&s, c)) continue;
        }
        if (evs[i].events & EPOLLIN) on_readable(&s, c);
      }
    }
    answer_due(&s);   /* whatever came due while handling the events */
    sweep(&s);
  }

  /* SIGTERM: close every connection (their pending answers go), then the rest */
  while (s.live) conn_close(&s, s.live);
  while (s.heap_len) {
    pending *p = heap_pop(&s);
    p->c->npending--;
    free(p);
  }
  sweep(&s);
  free(s.heap);
  idset_free(&s.ids);
  close(s.ep);
  close(s.lfd);
  close(s.tfd);
  close(s.sfd);
  return 0;
}
