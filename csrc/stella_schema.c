/* stella_schema.c - field lists of POST /v1/requests and POST /v1/recoveries,
 * in the order the encoder writes them. */
#include "stella_schema.h"

#define FIELD(name, type, req, sub) \
  { name, sizeof(name) - 1, "\"" name "\":", sizeof(name) + 2, type, req, sub }

static const field customer_fields[] = {
  FIELD("name", F_STRING, 1, NULL),
  FIELD("email", F_EMAIL, 1, NULL),
  FIELD("custom_id", F_STRING, 0, NULL),
};
static const schema customer_schema = {
  2, "customer", customer_fields, 3, { -1, -1 }, NULL, NULL
};

static const field employee_fields[] = {
  FIELD("email", F_EMAIL, 0, NULL),
  FIELD("custom_id", F_STRING, 0, NULL),
};
static const schema employee_schema = {
  3, "employee", employee_fields, 2, { 0, 1 }, "employee",
  "employee needs an email or a custom_id (at least one) matching the agent's profile"
};

static const field request_fields[] = {
  FIELD("customer", F_OBJECT, 1, &customer_schema),
  FIELD("employee", F_OBJECT, 1, &employee_schema),
  FIELD("channel", F_CHANNEL, 1, NULL),
  FIELD("ext_interaction_id", F_ID, 1, NULL),
  FIELD("external_url", F_URL, 0, NULL),
  FIELD("do_not_send", F_BOOL, 0, NULL),
  FIELD("tags", F_TAGS, 0, NULL),
  FIELD("brand", F_STRING, 0, NULL),
  FIELD("language", F_LANGUAGE, 0, NULL),
  FIELD("country", F_COUNTRY, 0, NULL),
  FIELD("custom_properties", F_PROPS, 0, NULL),
};
static const schema request_schema = {
  0, "request", request_fields, 11, { -1, -1 }, NULL, NULL
};

static const field recovery_fields[] = {
  FIELD("employee", F_OBJECT, 1, &employee_schema),
  FIELD("initial_feedback_request_id", F_ID, 0, NULL),
  FIELD("ext_interaction_id", F_ID, 0, NULL),
  FIELD("external_url", F_URL, 0, NULL),
  FIELD("tags", F_TAGS, 0, NULL),
  FIELD("do_not_send", F_BOOL, 0, NULL),
};
static const schema recovery_schema = {
  1, "recovery", recovery_fields, 6, { 1, 2 }, "ext_interaction_id",
  "a recovery needs initial_feedback_request_id or ext_interaction_id (at least one)"
};

const schema *stella_schema_for(stella_endpoint endpoint) {
  return endpoint == STELLA_RECOVERY ? &recovery_schema : &request_schema;
}

const schema *stella_schema_by_id(int id) {
  static const schema *const all[STELLA_SCHEMA_COUNT] = {
    &request_schema, &recovery_schema, &customer_schema, &employee_schema
  };
  return id >= 0 && id < STELLA_SCHEMA_COUNT ? all[id] : NULL;
}
