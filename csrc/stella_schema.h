/* stella_schema.h - the Requests API schema as data, shared by the validator
 * and the encoder (private to the core). */
#ifndef STELLA_SCHEMA_H
#define STELLA_SCHEMA_H

#include "stella.h"

typedef enum field_type {
  F_STRING,     /* non-empty UTF-8 string */
  F_EMAIL,      /* WHATWG e-mail, <= 254 bytes */
  F_ID,         /* non-empty string, or an integer sent as its decimal string */
  F_URL,        /* string without whitespace or control characters */
  F_BOOL,
  F_CHANNEL,    /* non-empty string, optionally from an allowed list */
  F_TAGS,       /* sequence of <= 20 non-empty strings of <= 2000 characters */
  F_LANGUAGE,
  F_COUNTRY,
  F_PROPS,      /* flat map string -> string (numbers accepted) */
  F_OBJECT      /* nested object described by `sub` */
} field_type;

typedef struct schema schema;

typedef struct field {
  const char *name;
  size_t name_len;
  const char *key;           /* "\"name\":" as the encoder writes it */
  size_t key_len;
  field_type type;
  int required;
  const schema *sub;
} field;

struct schema {
  int id;                    /* 0 .. STELLA_SCHEMA_COUNT - 1 */
  const char *what;          /* "request", "customer", ... for messages */
  const field *fields;
  size_t count;
  int one_of[2];             /* indices of fields of which at least one is needed, or -1 */
  const char *one_of_path;   /* path the one_of_required error is reported at */
  const char *one_of_message;
};

#define STELLA_SCHEMA_COUNT 4
#define STELLA_MAX_FIELDS 16   /* fields of one schema, at most */

const schema *stella_schema_for(stella_endpoint endpoint);
/* Every schema (the endpoints' and the nested objects'), by id. */
const schema *stella_schema_by_id(int id);

/* What the validator and the encoders share (stella_validate.c, stella_json.c). */
/* stella_validate of a document stella_parse_json made from text[0..len): the same answers,
 * with no search for control characters in the strings that point into the text (not
 * escaped there: the parser refuses a raw byte below 0x20). NULL text: stella_validate. */
int stella_validate_parsed(stella_arena *a, stella_endpoint endpoint, const stella_value *req,
                           const stella_options *opts, stella_violations *errors, const char *text,
                           size_t len);
/* 1 if the string holds whitespace or a control character (external_url's rule). */
int stella_has_space_or_control(const char *s, size_t len);
/* The offset of the first C0 control other than tab, LF and CR in s (NUL included), or len. */
size_t stella_find_control(const char *s, size_t len);
/* Appends a JSON string (quotes and escapes). */
void stella_json_string(stella_buffer *b, const char *s, size_t len);
/* Appends a number as a JSON string: integers exactly, others "%.14g" with '.'. */
void stella_json_number(stella_buffer *b, int is_int, long long i, double d);

/* qsort comparator over `const stella_pair *`: string keys by bytes, then numbers. */
int stella_key_compare(const void *a, const void *b);

#define STELLA_MAX_TAGS 20
#define STELLA_MAX_TEXT_CHARS 2000
#define STELLA_MAX_EMAIL_BYTES 254

#endif
