/* conf: kbridged.conf (libconfig syntax), parsed against one table of settings.
 * Loaded by the main thread; the result is read-only afterwards. */
#ifndef KB_CONF_H
#define KB_CONF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* A librdkafka property from kafka.properties, as written in the file. */
struct conf_prop {
	char *name;
	char *value;
};

struct conf {
	char *path;                 /* the file this came from, or NULL for built-in defaults */
	char **listen;              /* NULL-terminated */
	size_t n_listen;
	int threads;                /* 0 = one per CPU */
	int log_level;              /* LOG_ERR .. LOG_DEBUG */
	int shutdown_timeout_ms;
	char *kafka_brokers;        /* "embedded" = in-process mock cluster */
	int kafka_embedded_brokers;
	struct conf_prop *kafka_props;
	size_t n_kafka_props;
	int publish_max_record_bytes;
	int publish_max_request_bytes;
	int publish_delivery_timeout_ms;
	int publish_max_inflight_records;
	int publish_max_inflight_bytes;
	int publish_max_inflight_bytes_total;
	bool publish_auto_create_topics;
	int subscribe_max_subscribers;
	int subscribe_max_batch;
	int subscribe_buffer_records;
	int subscribe_buffer_bytes;
};

/* Fills c with the built-in defaults. Free with conf_free(). */
void conf_defaults(struct conf *c);

/* Reads path into c (defaults first, then the file). Returns 0, or -1 with every error
 * found written to err as "FILE:LINE: SETTING: what is wrong" lines; on -1, c holds
 * nothing to free. */
int conf_load(const char *path, struct conf *c, FILE *err);

/* Frees what c holds; c may be zeroed. */
void conf_free(struct conf *c);

/* The names of every setting in the table, NULL-terminated (for tests and docs). */
const char *const *conf_setting_names(void);

#endif
