/* conf: one table of settings drives parsing, checking and the docs' test.
 * Only the main thread loads a configuration; a loaded struct conf is read-only. */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <libconfig.h>
#include <librdkafka/rdkafka.h>

#include "conf.h"
#include "log.h"
#include "util.h"

enum conf_type {
	CT_INT,
	CT_BOOL,
	CT_STRING,
	CT_ADDRESSES,   /* list of "host:port" / "unix:/path" */
	CT_LOG_LEVEL,
	CT_KAFKA_PROPS, /* list of "name=value" librdkafka properties */
};

struct setting {
	const char *name; /* dotted path in the file */
	enum conf_type type;
	size_t offset;    /* into struct conf */
	long long idef, min, max;
	const char *sdef;
};

#define F(field) offsetof(struct conf, field)
static const struct setting settings[] = {
	{"listen", CT_ADDRESSES, F(listen), 0, 0, 0, "127.0.0.1:50051"},
	{"threads", CT_INT, F(threads), 0, 0, 256, NULL},
	{"log_level", CT_LOG_LEVEL, F(log_level), LOG_INFO, 0, 0, "info"},
	{"shutdown_timeout_ms", CT_INT, F(shutdown_timeout_ms), 10000, 0, 3600000, NULL},
	{"kafka.brokers", CT_STRING, F(kafka_brokers), 0, 0, 0, "localhost:9092"},
	{"kafka.embedded_brokers", CT_INT, F(kafka_embedded_brokers), 3, 1, 9, NULL},
	{"kafka.properties", CT_KAFKA_PROPS, F(kafka_props), 0, 0, 0, NULL},
	{"publish.max_record_bytes", CT_INT, F(publish_max_record_bytes), 1000000, 1, 16777216, NULL},
	{"publish.max_request_bytes", CT_INT, F(publish_max_request_bytes), 4194304, 1024, 268435456, NULL},
	{"publish.delivery_timeout_ms", CT_INT, F(publish_delivery_timeout_ms), 30000, 1000, 3600000, NULL},
	{"publish.max_inflight_records", CT_INT, F(publish_max_inflight_records), 10000, 1, 1000000, NULL},
	{"publish.max_inflight_bytes", CT_INT, F(publish_max_inflight_bytes), 16777216, 1024, 1073741824, NULL},
	{"publish.max_inflight_bytes_total", CT_INT, F(publish_max_inflight_bytes_total), 268435456, 1024,
	 2147483647, NULL},
	{"publish.auto_create_topics", CT_BOOL, F(publish_auto_create_topics), 0, 0, 1, NULL},
	{"subscribe.max_subscribers", CT_INT, F(subscribe_max_subscribers), 10000, 1, 1000000, NULL},
	{"subscribe.max_batch", CT_INT, F(subscribe_max_batch), 500, 1, 100000, NULL},
	{"subscribe.buffer_records", CT_INT, F(subscribe_buffer_records), 10000, 1, 1000000, NULL},
	{"subscribe.buffer_bytes", CT_INT, F(subscribe_buffer_bytes), 16777216, 1024, 1073741824, NULL},
};
#undef F

/* Groups that may appear in the file. */
static const char *const groups[] = {"kafka", "publish", "subscribe"};

/* librdkafka properties kbridge sets itself: overriding them would break its promises. */
static const struct {
	const char *name;
	const char *why;
} owned_props[] = {
	{"bootstrap.servers", "set kafka.brokers instead"},
	{"metadata.broker.list", "set kafka.brokers instead"},
	{"acks", "kbridge always uses acks=all: a record is acknowledged only once Kafka has it"},
	{"request.required.acks", "kbridge always uses acks=all: a record is acknowledged only once Kafka has it"},
	{"enable.idempotence", "kbridge always uses the idempotent producer"},
	{"delivery.timeout.ms", "set publish.delivery_timeout_ms instead"},
	{"message.timeout.ms", "set publish.delivery_timeout_ms instead"},
	{"group.id", "consumer groups are chosen per subscription"},
	{"enable.auto.commit", "kbridge commits offsets itself"},
	{"enable.sasl.oauthbearer.unsecure.jwt",
	 "kbridged takes its producer's events itself and so cannot run librdkafka's built-in "
	 "unsecured token handler (meant for development only); use sasl.oauthbearer.method=oidc"},
};

const char *const *conf_setting_names(void)
{
	static const char *names[ARRAY_SIZE(settings) + 1];

	for (size_t i = 0; i < ARRAY_SIZE(settings); i++)
		names[i] = settings[i].name;
	return names;
}

struct loader {
	const char *path;
	FILE *err;
	int errors;
};

static void conf_err(struct loader *ld, const config_setting_t *s, const char *name,
		     const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static void conf_err(struct loader *ld, const config_setting_t *s, const char *name,
		     const char *fmt, ...)
{
	va_list ap;

	ld->errors++;
	if (!ld->err)
		return;
	fprintf(ld->err, "%s:%u: %s: ", ld->path, s ? config_setting_source_line(s) : 0, name);
	va_start(ap, fmt);
	vfprintf(ld->err, fmt, ap);
	va_end(ap);
	fputc('\n', ld->err);
}

void conf_defaults(struct conf *c)
{
	memset(c, 0, sizeof(*c));
	for (size_t i = 0; i < ARRAY_SIZE(settings); i++) {
		const struct setting *st = &settings[i];
		void *field = (char *)c + st->offset;

		switch (st->type) {
		case CT_INT:
		case CT_LOG_LEVEL:
			*(int *)field = (int)st->idef;
			break;
		case CT_BOOL:
			*(bool *)field = st->idef != 0;
			break;
		case CT_STRING:
			*(char **)field = xstrdup(st->sdef);
			break;
		case CT_ADDRESSES:
			c->listen = xcalloc(2, sizeof(char *));
			c->listen[0] = xstrdup(st->sdef);
			c->n_listen = 1;
			break;
		case CT_KAFKA_PROPS:
			break;
		}
	}
}

void conf_free(struct conf *c)
{
	if (!c)
		return;
	for (size_t i = 0; i < c->n_listen; i++)
		free(c->listen[i]);
	free(c->listen);
	for (size_t i = 0; i < c->n_kafka_props; i++) {
		free(c->kafka_props[i].name);
		free(c->kafka_props[i].value);
	}
	free(c->kafka_props);
	free(c->kafka_brokers);
	free(c->path);
	memset(c, 0, sizeof(*c));
}

/* "host:port" with a port 0..65535, "[v6]:port", or "unix:/absolute/path". */
static const char *address_problem(const char *a)
{
	if (strncmp(a, "unix:", 5) == 0)
		return a[5] ? NULL : "a unix: address needs a path";
	const char *colon = strrchr(a, ':');
	if (!colon || colon == a)
		return "expected host:port or unix:/path";
	char *end;
	errno = 0;
	long port = strtol(colon + 1, &end, 10);
	if (!colon[1] || *end || errno || port < 0 || port > 65535)
		return "the port must be a number from 0 to 65535";
	return NULL;
}

static void load_addresses(struct loader *ld, config_setting_t *s, const char *name, struct conf *c)
{
	int n = config_setting_is_aggregate(s) ? config_setting_length(s) : 1;

	if (config_setting_is_group(s) || n == 0 ||
	    (!config_setting_is_aggregate(s) && config_setting_type(s) != CONFIG_TYPE_STRING)) {
		conf_err(ld, s, name, "expected a list of addresses, like [ \"127.0.0.1:50051\", \"unix:/run/kbridge/kbridged.sock\" ]");
		return;
	}
	char **list = xcalloc(n + 1, sizeof(char *));
	int k = 0;
	for (int i = 0; i < n; i++) {
		config_setting_t *e = config_setting_is_aggregate(s) ? config_setting_get_elem(s, i) : s;
		const char *v = config_setting_get_string(e);
		if (!v) {
			conf_err(ld, e, name, "address %d: expected a string like \"127.0.0.1:50051\"", i);
			continue;
		}
		const char *why = address_problem(v);
		if (why) {
			conf_err(ld, e, name, "\"%s\": %s", v, why);
			continue;
		}
		list[k++] = xstrdup(v);
	}
	for (size_t i = 0; i < c->n_listen; i++)
		free(c->listen[i]);
	free(c->listen);
	c->listen = list;
	c->n_listen = k;
}

static void load_props(struct loader *ld, config_setting_t *s, const char *name, struct conf *c)
{
	if (!config_setting_is_array(s) && !config_setting_is_list(s)) {
		conf_err(ld, s, name, "expected a list of \"name=value\" strings, like [ \"linger.ms=5\" ]");
		return;
	}
	/* A throwaway conf: librdkafka itself says whether each property is valid. */
	rd_kafka_conf_t *probe = rd_kafka_conf_new();
	int n = config_setting_length(s);
	c->kafka_props = xrealloc(c->kafka_props, (c->n_kafka_props + n) * sizeof(*c->kafka_props));
	for (int i = 0; i < n; i++) {
		config_setting_t *e = config_setting_get_elem(s, i);
		const char *v = config_setting_get_string(e);
		const char *eq = v ? strchr(v, '=') : NULL;
		if (!eq || eq == v) {
			conf_err(ld, e, name, "expected \"name=value\", got %s%s%s", v ? "\"" : "a non-string",
				 v ? v : "", v ? "\"" : "");
			continue;
		}
		char *pname = xstrndup(v, eq - v), errstr[512];
		const char *owned = NULL;
		for (size_t j = 0; j < ARRAY_SIZE(owned_props); j++)
			if (strcmp(pname, owned_props[j].name) == 0)
				owned = owned_props[j].why;
		if (owned) {
			conf_err(ld, e, name, "%s cannot be set here: %s", pname, owned);
			free(pname);
			continue;
		}
		/* librdkafka refuses the eager assign() a group member makes under the
		 * cooperative protocol: the member would never read anything. */
		if (strcmp(pname, "partition.assignment.strategy") == 0 && strstr(eq + 1, "cooperative")) {
			conf_err(ld, e, name, "%s: cooperative-sticky is not supported: kbridge's group members "
				 "use the eager protocol (range, roundrobin)", pname);
			free(pname);
			continue;
		}
		if (rd_kafka_conf_set(probe, pname, eq + 1, errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK) {
			conf_err(ld, e, name, "\"%s\": %s", v, errstr);
			free(pname);
			continue;
		}
		c->kafka_props[c->n_kafka_props].name = pname;
		c->kafka_props[c->n_kafka_props].value = xstrdup(eq + 1);
		c->n_kafka_props++;
	}
	rd_kafka_conf_destroy(probe);
}

static void load_setting(struct loader *ld, const struct setting *st, config_setting_t *s,
			 struct conf *c)
{
	void *field = (char *)c + st->offset;
	int type = config_setting_type(s);

	switch (st->type) {
	case CT_INT: {
		if (type != CONFIG_TYPE_INT && type != CONFIG_TYPE_INT64) {
			conf_err(ld, s, st->name, "expected an integer from %lld to %lld", st->min, st->max);
			return;
		}
		long long v = config_setting_get_int64(s);
		if (v < st->min || v > st->max) {
			conf_err(ld, s, st->name, "%lld is out of range: accepted %lld to %lld", v, st->min,
				 st->max);
			return;
		}
		*(int *)field = (int)v;
		return;
	}
	case CT_BOOL:
		if (type != CONFIG_TYPE_BOOL) {
			conf_err(ld, s, st->name, "expected true or false");
			return;
		}
		*(bool *)field = config_setting_get_bool(s) != 0;
		return;
	case CT_STRING:
		if (type != CONFIG_TYPE_STRING || !*config_setting_get_string(s)) {
			conf_err(ld, s, st->name, "expected a non-empty string");
			return;
		}
		free(*(char **)field);
		*(char **)field = xstrdup(config_setting_get_string(s));
		return;
	case CT_LOG_LEVEL: {
		int lvl = type == CONFIG_TYPE_STRING ? log_level_parse(config_setting_get_string(s)) : -1;
		if (lvl < 0) {
			conf_err(ld, s, st->name, "expected one of \"error\", \"warning\", \"notice\", \"info\", \"debug\"");
			return;
		}
		*(int *)field = lvl;
		return;
	}
	case CT_ADDRESSES:
		load_addresses(ld, s, st->name, c);
		return;
	case CT_KAFKA_PROPS:
		load_props(ld, s, st->name, c);
		return;
	}
}

static void load_group(struct loader *ld, config_setting_t *group, const char *prefix, struct conf *c)
{
	int n = config_setting_length(group);

	for (int i = 0; i < n; i++) {
		config_setting_t *s = config_setting_get_elem(group, i);
		char *name = prefix ? xasprintf("%s.%s", prefix, config_setting_name(s))
				    : xstrdup(config_setting_name(s));
		const struct setting *st = NULL;

		for (size_t j = 0; j < ARRAY_SIZE(settings); j++)
			if (strcmp(settings[j].name, name) == 0)
				st = &settings[j];
		if (st) {
			load_setting(ld, st, s, c);
		} else if (!prefix && config_setting_is_group(s)) {
			bool known = false;
			for (size_t j = 0; j < ARRAY_SIZE(groups); j++)
				known |= strcmp(groups[j], name) == 0;
			if (known)
				load_group(ld, s, name, c);
			else
				conf_err(ld, s, name, "unknown group (known: kafka, publish, subscribe)");
		} else {
			bool is_group_name = false;
			for (size_t j = 0; j < ARRAY_SIZE(groups); j++)
				is_group_name |= !prefix && strcmp(groups[j], name) == 0;
			if (is_group_name)
				conf_err(ld, s, name, "expected a group: %s = { ... };", name);
			else
				conf_err(ld, s, name, "unknown setting");
		}
		free(name);
	}
}

int conf_load(const char *path, struct conf *c, FILE *err)
{
	struct loader ld = {.path = path, .err = err};
	config_t cf;

	conf_defaults(c);
	c->path = xstrdup(path);
	config_init(&cf);
	if (!config_read_file(&cf, path)) {
		if (config_error_type(&cf) == CONFIG_ERR_FILE_IO) {
			if (err)
				fprintf(err, "%s: cannot read the file: %s\n", path,
					strerror(errno ? errno : ENOENT));
		} else if (err) {
			fprintf(err, "%s:%d: %s\n",
				config_error_file(&cf) ? config_error_file(&cf) : path,
				config_error_line(&cf), config_error_text(&cf));
		}
		ld.errors++;
	} else {
		load_group(&ld, config_root_setting(&cf), NULL, c);
		if (c->n_listen == 0 && ld.errors == 0) {
			conf_err(&ld, config_lookup(&cf, "listen"), "listen", "needs at least one address");
		}
	}
	config_destroy(&cf);
	if (ld.errors) {
		conf_free(c);
		return -1;
	}
	return 0;
}
