/* stella_outcome.c - what one HTTP attempt came to, defined once, as data: each outcome's
 * name, the error kind callers see, whether retrying may help, and its message; then the
 * HTTP statuses and the libcurl codes that lead to each. stella_http.c classifies its
 * transfers here; the Lua binding exports the table (stella.core.outcomes) and the status
 * mapping (stella.core.classify_status), so that the Lua client turns the answers of
 * every transport, libcurl's and the cosocket one alike, into results and errors here. */
#include <curl/curl.h>
#include "stella.h"

/* Message templates: {status} the HTTP status, {key} the key's last four characters,
 * {mode} "test" or "production", {url} the URL posted to, {timeout} the client's timeout
 * in seconds, {detail} the transport's own words. */
static const stella_outcome_info outcomes[STELLA_OUTCOME_COUNT] = {
  /* name               kind            retry answered message */
  { "ok",               NULL,           0, 1, NULL },
  { "rejected",         "rejected",     0, 1, "the service rejected the request (HTTP {status})" },
  { "auth",             "auth",         0, 1, "authentication failed (HTTP {status}): check the API "
                                              "key ({key}) and that it is the {mode} key the mode expects" },
  { "not_found",        "not_found",    0, 1, "HTTP {status} from {url}: check base_url" },
  { "request_timeout",  "timeout",      1, 1, "the service did not answer in time (HTTP {status})" },
  { "rate_limited",     "rate_limited", 1, 1, "rate limited by the service (HTTP {status})" },
  { "server",           "server",       1, 1, "server error (HTTP {status})" },
  { "unexpected",       "protocol",     0, 1, "unexpected answer (HTTP {status})" },
  { "timeout",          "timeout",      1, 0, "timed out after {timeout} s: {detail}" },
  { "network",          "network",      1, 0, "{detail}" },
  { "protocol",         "protocol",     0, 0, "{detail}" },
  /* certificate problems and our own failures do not heal by retrying */
  { "tls",              "network",      0, 0, "{detail}" },
  { "internal",         "network",      0, 0, "{detail}" },
};

/* Statuses, first match wins; anything else (1xx, 3xx, ...) is STELLA_OUTCOME_UNEXPECTED. */
static const struct { long lo, hi; stella_outcome outcome; } statuses[] = {
  { 200, 299, STELLA_OUTCOME_OK },
  { 401, 401, STELLA_OUTCOME_AUTH },
  { 403, 403, STELLA_OUTCOME_AUTH },
  { 404, 404, STELLA_OUTCOME_NOT_FOUND },
  { 408, 408, STELLA_OUTCOME_REQUEST_TIMEOUT },
  { 429, 429, STELLA_OUTCOME_RATE_LIMITED },
  { 400, 499, STELLA_OUTCOME_REJECTED },
  { 500, 599, STELLA_OUTCOME_SERVER },
};

/* libcurl's codes; any other failure is STELLA_OUTCOME_NETWORK (refused, reset, empty
 * reply, name not resolved, ...). */
static const struct { CURLcode code; stella_outcome outcome; } curl_codes[] = {
  { CURLE_OPERATION_TIMEDOUT, STELLA_OUTCOME_TIMEOUT },
  { CURLE_WEIRD_SERVER_REPLY, STELLA_OUTCOME_PROTOCOL },
  { CURLE_UNSUPPORTED_PROTOCOL, STELLA_OUTCOME_PROTOCOL },
  { CURLE_BAD_CONTENT_ENCODING, STELLA_OUTCOME_PROTOCOL },
  { CURLE_HTTP2, STELLA_OUTCOME_PROTOCOL },
  { CURLE_HTTP2_STREAM, STELLA_OUTCOME_PROTOCOL },
  { CURLE_PEER_FAILED_VERIFICATION, STELLA_OUTCOME_TLS },
  { CURLE_SSL_CONNECT_ERROR, STELLA_OUTCOME_TLS },
  { CURLE_SSL_CERTPROBLEM, STELLA_OUTCOME_TLS },
  { CURLE_SSL_CIPHER, STELLA_OUTCOME_TLS },
  { CURLE_SSL_CACERT_BADFILE, STELLA_OUTCOME_TLS },
  { CURLE_SSL_ISSUER_ERROR, STELLA_OUTCOME_TLS },
  { CURLE_OUT_OF_MEMORY, STELLA_OUTCOME_INTERNAL },
  { CURLE_BAD_FUNCTION_ARGUMENT, STELLA_OUTCOME_INTERNAL },
  { CURLE_URL_MALFORMAT, STELLA_OUTCOME_INTERNAL },
};

const stella_outcome_info *stella_outcome_info_of(stella_outcome o) {
  return (int)o >= 0 && o < STELLA_OUTCOME_COUNT ? &outcomes[o] : NULL;
}

stella_outcome stella_outcome_of_status(long status) {
  size_t i;
  for (i = 0; i < sizeof statuses / sizeof statuses[0]; i++)
    if (status >= statuses[i].lo && status <= statuses[i].hi) return statuses[i].outcome;
  return STELLA_OUTCOME_UNEXPECTED;
}

stella_outcome stella_outcome_of_curl(int code, long status) {
  size_t i;
  if (code == CURLE_OK) return stella_outcome_of_status(status);
  for (i = 0; i < sizeof curl_codes / sizeof curl_codes[0]; i++)
    if ((int)curl_codes[i].code == code) return curl_codes[i].outcome;
  return STELLA_OUTCOME_NETWORK;
}
