/*
 * stella.h - public C API of lua-stella's core.
 *
 * Usable from plain C without Lua: a small value model (what a Lua table or a
 * JSON document looks like), validation against the Stella Connect Requests API
 * schema, canonical JSON encoding, and a libcurl HTTP client that performs one
 * POST attempt at a time (retry policy helpers are provided; the Lua module
 * drives the retry loop so that other transports can share it).
 *
 * Memory: every value, error and string produced by validation lives in a
 * stella_arena; free it with stella_arena_free (or reuse it with
 * stella_arena_reset). Nothing here uses mutable globals of its own; stella_http_new
 * and stella_http_free call libcurl's reference-counted curl_global_init/cleanup
 * (thread-safe from libcurl 7.84; with older versions call curl_global_init once
 * yourself before creating clients from several threads).
 */
#ifndef STELLA_H
#define STELLA_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define STELLA_VERSION "0.1.0"

/* ---------- arena --------------------------------------------------------- */

typedef struct stella_arena_block stella_arena_block;
typedef struct stella_arena {
  stella_arena_block *head;   /* block currently allocated from */
  stella_arena_block *spare;  /* blocks kept for reuse after a reset */
} stella_arena;

void  stella_arena_init(stella_arena *a);
void *stella_arena_alloc(stella_arena *a, size_t size);   /* NULL when out of memory */
void  stella_arena_reset(stella_arena *a);                /* forget contents, keep memory */
void  stella_arena_free(stella_arena *a);                 /* release everything; idempotent */

/* ---------- values -------------------------------------------------------- */

typedef enum stella_type {
  STELLA_NIL,
  STELLA_BOOL,
  STELLA_NUMBER,   /* a number; is_int says whether it is integral (Lua 5.4 integer or integral float) */
  STELLA_STRING,
  STELLA_TABLE,    /* a Lua table or a JSON object/array: a list of key/value pairs */
  STELLA_OTHER,    /* anything else (function, userdata, ...): always a type error */
  STELLA_NULL      /* JSON null (and cjson.null/ngx.null from Lua): present, never valid.
                    * STELLA_NIL instead means "absent" in a member's value */
} stella_type;

/* What a table looked like where it came from. A JSON object must not stand where
 * the schema wants a list, nor an array where it wants an object; a Lua table (or
 * one built with stella_table) can be either, so an empty one fits both. */
typedef enum stella_shape {
  STELLA_SHAPE_ANY = 0,   /* Lua tables and stella_table(): the default */
  STELLA_SHAPE_OBJECT,    /* a JSON object: string keys, in document order */
  STELLA_SHAPE_ARRAY      /* a JSON array: integer keys 1..n, in order */
} stella_shape;

typedef struct stella_pair stella_pair;

typedef struct stella_value {
  stella_type type;
  union {
    int boolean;
    struct { double num; long long i; int is_int; } number;
    struct { const char *ptr; size_t len; } string;  /* not copied: must outlive the value */
    struct { stella_pair *pairs; size_t count; stella_shape shape; } table;
  } u;
} stella_value;

struct stella_pair {
  stella_value key;     /* string for object members, number 1..n for sequence items */
  stella_value value;
};

/* Builders (allocate from the arena). A table's pairs are filled by the caller;
 * stella_table gives shape STELLA_SHAPE_ANY (set u.table.shape to say more). */
stella_value  stella_nil(void);
stella_value  stella_bool(int b);
stella_value  stella_int(long long i);
stella_value  stella_double(double d);
stella_value  stella_string(const char *s, size_t len);
stella_value  stella_cstring(const char *s);
stella_pair  *stella_table(stella_arena *a, stella_value *out, size_t count);
/* Look a string key up in a table value; NULL if absent. */
const stella_value *stella_get(const stella_value *table, const char *key);

/* ---------- JSON text -> value ---------------------------------------------- */

#define STELLA_JSON_MAX_DEPTH 64   /* nested objects/arrays a document may open */

typedef struct stella_parse_error {
  size_t offset;          /* byte offset of the problem in the text */
  size_t line, column;    /* 1-based; the column counts characters (UTF-8 lead bytes) */
  const char *message;    /* a static string, e.g. "unterminated string" */
} stella_parse_error;

/* Parses one JSON document (RFC 8259, strict: no comments, trailing commas,
 * NaN/Infinity, leading zeros or raw control characters in strings; whitespace
 * around the value only). Objects become STELLA_SHAPE_OBJECT tables with their
 * members in document order, repeated keys kept (stella_validate reports them as
 * duplicate_field); arrays become STELLA_SHAPE_ARRAY tables keyed 1..n; null is
 * STELLA_NULL. Strings without escapes point into `text` (which must outlive the
 * value); escaped ones are decoded into the arena, \uXXXX as UTF-8 (a lone
 * surrogate is kept as its 3-byte form, which is not valid UTF-8, so the validator
 * reports invalid_utf8 at that field). Bytes that are not UTF-8 are not a parse
 * error either. A number without fraction or exponent that fits in a long long is
 * an integer; any other number is stella_double(strtod) (an integral double within
 * +-2^53 counts as an integer, as from Lua), read independently of the C locale.
 * Returns 0 and fills `out`; 1 on a syntax error (fills `err`); -1 when out of
 * memory. Everything is allocated from `a`; nothing recurses. */
int stella_parse_json(stella_arena *a, const char *text, size_t len, stella_value *out,
                      stella_parse_error *err);

/* ---------- validation ---------------------------------------------------- */

/* Which endpoint a document is for: POST /v1/requests or POST /v1/recoveries (each has
 * its own schema). */
typedef enum stella_endpoint { STELLA_REQUEST = 0, STELLA_RECOVERY = 1 } stella_endpoint;

/* One way a document breaks the schema. */
typedef struct stella_violation {
  const char *path;     /* "customer.email", "tags[3]", "custom_properties.KEY" */
  const char *code;     /* machine-readable: "required", "invalid_email", ... */
  const char *message;  /* a sentence a person can act on */
} stella_violation;

typedef struct stella_violations {
  stella_violation *items;
  size_t count, cap;
  int oom;              /* set when an allocation failed: the list is incomplete */
} stella_violations;

typedef struct stella_options {
  const char *const *channels;   /* allowed channel names, or NULL for any */
  size_t channel_count;
} stella_options;

/* Validate `req` against `endpoint`'s schema. Returns the number of violations found
 * (0 = valid); they and their strings are allocated from `a`. Returns -1 when out of
 * memory. */
int stella_validate(stella_arena *a, stella_endpoint endpoint, const stella_value *req,
                    const stella_options *opts, stella_violations *errors);

/* ---------- checking JSON text in one call (stella_check.c) --------------------- */

/* stella_validate's question for JSON text, asked in one plain call with no Lua in it (so
 * that LuaJIT's FFI can make it: the sandbox's check of every request), with the values a
 * caller wants from a valid document. A checker owns the memory of its last call. */
typedef struct stella_checker stella_checker;

/* The value at one path of a valid document. type is STELLA_NIL when the path is absent,
 * null or not a value JSON can hold; STELLA_STRING (ptr, len: into the text, or the
 * checker's memory for a string with escapes, valid until its next call; upper is 1 when
 * it holds an ASCII capital letter); STELLA_NUMBER (num, and is_int with i when it is an
 * integer); STELLA_BOOL (boolean); STELLA_TABLE (an object or array). */
typedef struct stella_field {
  int type, is_int, boolean, upper;
  const char *ptr;
  size_t len;
  long long i;
  double num;
} stella_field;

stella_checker *stella_checker_new(void);          /* NULL when out of memory */
void stella_checker_free(stella_checker *c);       /* NULL is fine */
/* Parses `text` and validates it for `endpoint` (a stella_endpoint; no options: any
 * channel name). A valid document: fills out[0..n-1] with the values at the dotted paths
 * paths[0..n-1] ("customer.email") and returns 1. Returns 0 when the text is not JSON or
 * not valid (what is wrong is for stella_parse_json and stella_validate to say), -1 when
 * out of memory or given NULL. */
int stella_check_json(stella_checker *c, int endpoint, const char *text, size_t len,
                      const char *const *paths, size_t n, stella_field *out);

/* ---------- encoding ------------------------------------------------------ */

typedef struct stella_buffer {
  char *data;
  size_t len, cap;
  int oom;
} stella_buffer;

void stella_buffer_init(stella_buffer *b);
void stella_buffer_free(stella_buffer *b);            /* idempotent */
void stella_buffer_add(stella_buffer *b, const char *s, size_t len);

/* Append the canonical JSON of an already *valid* request to `out`.
 * Returns 0, or -1 when out of memory. Call stella_validate first. */
int stella_encode_json(stella_endpoint endpoint, const stella_value *req, stella_buffer *out);

/* ---------- text checks (exposed for tests and for other front ends) ------ */

int    stella_utf8_valid(const char *s, size_t len);
size_t stella_utf8_length(const char *s, size_t len);  /* characters in valid UTF-8 */
int    stella_email_valid(const char *s, size_t len);  /* WHATWG "valid e-mail address" */
int    stella_language_valid(const char *s, size_t len);
int    stella_is_language_code(const char *s, size_t len);   /* ISO 639-1 */
int    stella_is_country_code(const char *s, size_t len);    /* ISO 3166-1 alpha-2 */
int    stella_is_m49_area_code(const char *s, size_t len);   /* UN M.49 area (BCP 47 regions) */

/* SHA-256 of `len` bytes (FIPS 180-4). */
void   stella_sha256(const void *data, size_t len, unsigned char out[32]);

/* ---------- the outcome of one HTTP attempt -------------------------------------- */

/* What one POST came to, defined once (stella_outcome.c, as data): its name, the error
 * kind callers see, whether retrying may help, its message, and which HTTP statuses and
 * libcurl codes lead to it. The Lua binding exports the same table (stella.core.outcomes,
 * stella.core.classify_status), through which the Lua client reads every transport's
 * answers. */
typedef enum stella_outcome {
  STELLA_OUTCOME_OK = 0,            /* 2xx */
  STELLA_OUTCOME_REJECTED,          /* 400 and the other 4xx not named below */
  STELLA_OUTCOME_AUTH,              /* 401, 403 */
  STELLA_OUTCOME_NOT_FOUND,         /* 404 */
  STELLA_OUTCOME_REQUEST_TIMEOUT,   /* 408 */
  STELLA_OUTCOME_RATE_LIMITED,      /* 429 */
  STELLA_OUTCOME_SERVER,            /* 5xx */
  STELLA_OUTCOME_UNEXPECTED,        /* any other status (1xx, 3xx): not an answer this API gives */
  STELLA_OUTCOME_TIMEOUT,           /* from here on, no answer: none in time */
  STELLA_OUTCOME_NETWORK,           /* could not connect / connection dropped */
  STELLA_OUTCOME_PROTOCOL,          /* the peer answered something that is not HTTP */
  STELLA_OUTCOME_TOO_LARGE,         /* an answer body over STELLA_MAX_ANSWER_BYTES: not read */
  STELLA_OUTCOME_TLS,               /* certificate or handshake failure */
  STELLA_OUTCOME_INTERNAL,          /* out of memory, bad option */
  STELLA_OUTCOME_COUNT
} stella_outcome;

typedef struct stella_outcome_info {
  const char *name;       /* "ok", "rejected", ..., "request_timeout", ..., "tls", "internal" */
  const char *kind;       /* the error kind callers see ("timeout", "network", ...); NULL for ok */
  int retryable;          /* 1 when another attempt may succeed */
  int answered;           /* 1: an HTTP answer with a status; 0: a transport failure */
  const char *message;    /* a template: {status} {key} {mode} {url} {timeout} {detail}
                           * (see stella_outcome.c); NULL for ok */
} stella_outcome_info;

/* The row of `o`; NULL for a value out of range. */
const stella_outcome_info *stella_outcome_info_of(stella_outcome o);
/* The outcome of an HTTP answer with this status. */
stella_outcome stella_outcome_of_status(long status);
/* The outcome of a libcurl transfer that ended with `curlcode` (a CURLcode) and, when
 * that is CURLE_OK, with `status`. */
stella_outcome stella_outcome_of_curl(int curlcode, long status);

/* ---------- HTTP client (libcurl) ----------------------------------------- */

typedef struct stella_http stella_http;

#define STELLA_DEFAULT_BASE_URL "https://api.stellaconnect.net"

/* The largest answer body either transport reads (libcurl here, the cosocket transport
 * through stella.core.max_answer_bytes): the service answers a few hundred bytes, so a
 * bigger answer is a fault, refused as STELLA_OUTCOME_TOO_LARGE before it fills memory. */
#define STELLA_MAX_ANSWER_BYTES (8L * 1024 * 1024)

typedef struct stella_http_options {
  const char *base_url;         /* NULL: STELLA_DEFAULT_BASE_URL; a tenant's looks like
                                 * "https://SUBDOMAIN.api.stellaconnect.net" */
  const char *api_key;          /* sent as x-api-key; never logged or echoed */
  const char *user_agent;       /* NULL: "lua-stella/VERSION" */
  const char *ca_file;          /* NULL: the system's CA bundle */
  long timeout_ms;              /* whole transfer; 0 = 30000 */
  long connect_timeout_ms;      /* 0 = 10000 */
} stella_http_options;

typedef struct stella_http_result {
  stella_outcome outcome;       /* what the attempt came to */
  long status;                  /* the HTTP status when the outcome is answered, else 0 */
  const char *body;             /* owned by the client, valid until the next call */
  size_t body_len;
  const char *content_type;     /* NULL if none; owned by the client */
  long retry_after_ms;          /* parsed Retry-After (seconds or HTTP-date), -1 if absent */
  const char *error;            /* the failure's message when not answered (never holds the key) */
} stella_http_result;

/* The checks stella_http_new makes on its options, in this order, on counted strings (a
 * NUL inside one is refused, never cut off). Each returns 1, or 0 with a message in `err`
 * (the same words whichever transport calls them; never the key).
 *   key: non-empty, at most 400 bytes, printable ASCII without spaces;
 *   base_url: https://HOST[:PORT][/PATH], or http:// to a loopback host (localhost,
 *     127.x.y.z, [::1]); no user credentials, query string or fragment; HOST a name of
 *     letters, digits, '.', '-', '_' or a bracketed IPv6 address;
 *   user_agent (NULL is fine): no control characters. */
typedef struct stella_base_url {
  int tls;                      /* https */
  const char *host;             /* points into the URL, as written ("[::1]" keeps brackets) */
  size_t host_len;
  long port;                    /* as written, or the scheme's default */
  int port_given;               /* 1 when the port is not the scheme's default */
  const char *path;             /* points into the URL: "" or "/prefix", no trailing '/' */
  size_t path_len;
} stella_base_url;

int stella_check_key(const char *key, size_t len, char *err, size_t errlen);
int stella_check_base_url(const char *url, size_t len, stella_base_url *out, char *err, size_t errlen);
int stella_check_user_agent(const char *user_agent, size_t len, char *err, size_t errlen);

/* Creates a client. On failure returns NULL and writes a message to `err`
 * (which must hold at least 256 bytes): the checks above. */
stella_http *stella_http_new(const stella_http_options *opts, char *err, size_t errlen);
/* One POST of `body` to base_url .. path. The connection is kept alive and
 * reused by the next call. Fills `res`; returns res->outcome. */
stella_outcome stella_http_post(stella_http *h, const char *path, const char *body,
                                     size_t body_len, stella_http_result *res);
/* The same POST without waiting for the answer: starts it and returns STELLA_OUTCOME_OK
 * (the body is copied), or STELLA_OUTCOME_INTERNAL in `res` when it could not start (one
 * transfer at a time per client). Then call stella_http_step until it returns 1. */
stella_outcome stella_http_start(stella_http *h, const char *path, const char *body,
                                      size_t body_len, stella_http_result *res);
/* Drives the started transfer, waiting up to `wait_ms` for the network (0: not at all).
 * Returns 0 while it runs; 1 when it has ended, with `res` filled as stella_http_post
 * fills it (the body and strings are valid until the next start or post). */
int stella_http_step(stella_http *h, int wait_ms, stella_http_result *res);
/* 1 while a started transfer has not ended. */
int stella_http_running(const stella_http *h);
/* What the running transfer waits for: returns a socket to poll for `*events` (POLLIN,
 * POLLOUT), or -1 when there is none to wait on (step it again after the time); and in
 * `*timeout_ms` the time after which stella_http_step must be called whatever the socket
 * does (the post's timeout, libcurl's timers). -1 when nothing runs. */
int stella_http_wait_fd(const stella_http *h, short *events, long *timeout_ms);
/* TCP connections this client has opened so far (1 after many calls = keep-alive works). */
long stella_http_connects(const stella_http *h);
void stella_http_free(stella_http *h);             /* NULL is fine */

/* ---------- sending a list in the background ---------------------------------------- */

/* Posts items in the background (one loop thread, pthreads), so that the caller can do
 * other work meanwhile: one lane per distinct client in the list, each posting its
 * client's items in list order (several clients to one host: several connections,
 * concurrent sends); the loop thread drives every lane's post at once (epoll on Linux).
 * First attempts only: a lane stops, and stops the others after their post in flight, at
 * the first answer that is not 2xx or the first transport failure; no item but the first
 * starts once `budget_ms` has passed since the start; freeing the sender stops them too.
 * Paths and bodies are copied. The clients are lent to the lanes: do not use them
 * until stella_sender_wait has returned. */
typedef struct stella_send_item {
  stella_http *h;
  const char *path;
  const char *body;
  size_t body_len;
} stella_send_item;

typedef struct stella_send_result {
  int attempted;
  stella_outcome outcome;       /* as in stella_http_result */
  long status;
  char *body;                   /* owned by the sender (NUL-terminated) */
  size_t body_len;
  char *content_type;           /* NULL if none */
  long retry_after_ms;          /* -1 if absent */
  char *error;                  /* the failure's message, NULL when answered */
  size_t by;                    /* the list index of the first item of the client that posted it */
} stella_send_result;

typedef struct stella_sender stella_sender;

/* NULL on failure, with a message in err. */
stella_sender *stella_sender_start(const stella_send_item *items, size_t n, long budget_ms,
                                   char *err, size_t errlen);
/* The same with shared queues: groups[i] (NULL: all 0) is item i's group. The items of a
 * client in group 0 are its own; the clients of a group g > 0 take the group's items in
 * list order, each the next one not taken yet as soon as it is free (so a lane is never
 * idle while its group has items), whatever client item i names; result->by says which
 * client posted it. All items of one client must have one group ("a client in two
 * groups" otherwise). */
stella_sender *stella_sender_start_shared(const stella_send_item *items, const size_t *groups,
                                          size_t n, long budget_ms, char *err, size_t errlen);
/* 1 once every lane has finished (never waits). */
int stella_sender_done(stella_sender *s);
/* 1 once every lane has finished, waiting up to `wait_ms` for that (0: not at all). */
int stella_sender_done_within(stella_sender *s, long wait_ms);
/* Asks the lanes to stop: each ends its post in flight (or times out) and starts no
 * other; the items not attempted stay for the caller (stella_sender_result is NULL). */
void stella_sender_stop(stella_sender *s);
/* Waits for the lanes and the loop thread (an appendable sender's lanes are stopped
 * first); returns how many items they attempted (with one client, a prefix of the list;
 * with several, any subset: see stella_sender_result). */
size_t stella_sender_wait(stella_sender *s);
/* Item i's result after stella_sender_wait, or NULL if it was not attempted. */
const stella_send_result *stella_sender_result(const stella_sender *s, size_t i);
/* Stops the lanes after their posts in flight, waits for them, frees everything. NULL is fine. */
void stella_sender_free(stella_sender *s);

/* Asks the scheduler for a time slice of slice_ns for the calling thread (Linux 6.12+,
 * SCHED_OTHER; elsewhere nothing): the sender's loop thread uses it so that an answer
 * wakes it at once even while the caller's thread keeps the same CPU busy
 * (stella_slice.c). */
void stella_short_slice(long slice_ns);

/* An appendable sender (stella_sender.c): its lanes wait for items added while they are
 * busy, chunk after chunk, so that they go from one chunk straight on to the next. At a
 * failure (the first answer that is not 2xx, or a transport failure) it pauses: no lane
 * takes another item until every chunk with a failed item has been collected and the
 * caller resumes it. NULL on failure, with a message in err. */
stella_sender *stella_sender_open(char *err, size_t errlen);
/* Adds a chunk (items and groups as for stella_sender_start_shared; a client keeps its
 * lane and group from the first chunk that names it). No item but the chunk's first
 * starts once `budget_ms` has passed since now: such an item is skipped. Returns the
 * chunk's id (> 0), or -1 with a message in err (nothing added). */
long stella_sender_add(stella_sender *s, const stella_send_item *items, const size_t *groups,
                       size_t n, long budget_ms, char *err, size_t errlen);
/* 1 once chunk `id` can be collected without waiting for a post: every item posted or
 * skipped, or the sender paused or stopped with no post in flight (waits up to wait_ms). */
int stella_sender_ready(stella_sender *s, long id, long wait_ms);
/* Collects chunk `id`: takes its items no lane has taken out of the queues, waits for its
 * posts in flight; it is then the sender's collected chunk (the one collected before is
 * freed). Returns its number of items, or -1 when there is no such chunk. */
long stella_sender_collect(stella_sender *s, long id);
/* Item i of the collected chunk: its result when posted (state DONE), or NULL with state
 * SKIPPED (its budget had passed) or NOT_TAKEN (paused, stopped or withdrawn first). */
enum { STELLA_SEND_NOT_TAKEN, STELLA_SEND_DONE, STELLA_SEND_SKIPPED };
const stella_send_result *stella_sender_collected(const stella_sender *s, size_t i, int *state);
/* Pauses an appendable sender and waits until no post is in flight: the clients are the
 * caller's until it resumes. Returns 0 for a one-list sender (it only waits). */
int stella_sender_pause(stella_sender *s);
/* Lets the lanes take items again, unless the sender was stopped or a chunk with a failed
 * item is not collected yet. Returns 1 when the lanes run. */
int stella_sender_resume(stella_sender *s);
/* 1 while paused or stopped */
int stella_sender_paused(stella_sender *s);

/* ---------- retry policy -------------------------------------------------- */

/* Delay before retry number `attempt` (1 = first retry): exponential backoff
 * with full jitter, base * 2^(attempt-1) capped at max, times `unit_random`
 * in [0,1). A server's Retry-After (ms, or -1) wins, capped at max. */
long stella_retry_delay_ms(int attempt, long base_ms, long max_ms, long retry_after_ms,
                           double unit_random);

/* Parses a Retry-After header value: delta-seconds or an HTTP-date relative to
 * `now` (seconds since the epoch). Returns milliseconds, or -1 if unreadable. */
long stella_parse_retry_after(const char *value, long long now);

#ifdef __cplusplus
}
#endif
#endif
