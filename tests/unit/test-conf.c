/* Unit tests for the configuration table: defaults, every kind of error with its file,
 * line and setting, and agreement between the table and the documentation. */
#include "config.h"

#include <stdlib.h>
#include <unistd.h>

#include "conf.h"
#include "log.h"
#include "tap.h"

static char dir[] = "/tmp/kbridge-test-conf-XXXXXX";

/* Loads text as a config file; returns conf_load's result and the error text in *errs. */
static int load(const char *text, struct conf *c, char **errs)
{
	static int n;
	char path[256];
	size_t len = 0;
	FILE *f;

	snprintf(path, sizeof(path), "%s/c%d.conf", dir, n++);
	f = fopen(path, "w");
	fputs(text, f);
	fclose(f);
	FILE *err = open_memstream(errs, &len);
	int rc = conf_load(path, c, err);
	fclose(err);
	return rc;
}

/* The file must fail to load with an error naming line and setting and containing what. */
static void bad(const char *text, int line, const char *setting, const char *what)
{
	struct conf c;
	char *errs = NULL, expect[128];
	int rc = load(text, &c, &errs);

	snprintf(expect, sizeof(expect), ".conf:%d: %s: ", line, setting);
	ok(rc == -1 && contains(errs, expect) && contains(errs, what),
	   "rejects %s at line %d (%s): %s", setting, line, what, errs ? errs : "(no error)");
	free(errs);
}

static char *slurp(const char *path)
{
	FILE *f = fopen(path, "r");
	char *buf = NULL;
	size_t len = 0;
	if (!f)
		return NULL;
	FILE *m = open_memstream(&buf, &len);
	int ch;
	while ((ch = fgetc(f)) != EOF)
		fputc(ch, m);
	fclose(m);
	fclose(f);
	return buf;
}

static void docs_agree(void)
{
	const char *top = getenv("top_srcdir");
	char path[1024];
	if (!top)
		top = "..";
	snprintf(path, sizeof(path), "%s/etc/kbridged.conf", top);
	char *example = slurp(path);
	snprintf(path, sizeof(path), "%s/man/kbridged.conf.5.in", top);
	char *man = slurp(path);
	ok(example != NULL, "etc/kbridged.conf is readable");
	ok(man != NULL, "man/kbridged.conf.5.in is readable");
	for (const char *const *n = conf_setting_names(); *n; n++) {
		const char *dot = strrchr(*n, '.');
		char needle[128];
		/* In the example file a grouped setting appears by its short name. */
		snprintf(needle, sizeof(needle), "%s =", dot ? dot + 1 : *n);
		ok(contains(example, needle), "etc/kbridged.conf documents %s", *n);
		/* The man page may escape '_' or '.' for roff; look for the name's last part
		 * and its full dotted name with roff's "\&" tolerated by checking both halves. */
		ok(contains(man, dot ? dot + 1 : *n) && (!dot || contains(man, *n)),
		   "kbridged.conf(5) documents %s", *n);
	}
	free(example);
	free(man);
}

int main(void)
{
	struct conf c;
	char *errs = NULL;

	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return 1;
	}
	log_init("test-conf");

	ok(load("", &c, &errs) == 0, "an empty file loads");
	ok(c.n_listen == 1 && strcmp(c.listen[0], "127.0.0.1:50051") == 0, "default listen");
	ok(c.publish_max_record_bytes == 1000000 && c.publish_delivery_timeout_ms == 30000 &&
	   c.shutdown_timeout_ms == 10000 && c.threads == 0 && c.log_level == LOG_INFO &&
	   strcmp(c.kafka_brokers, "localhost:9092") == 0 && c.subscribe_max_batch == 500,
	   "defaults come from the table");
	conf_free(&c);
	free(errs);
	errs = NULL;

	ok(load("listen = [ \"unix:/run/kbridge/k.sock\", \"[::1]:7000\", \"0.0.0.0:0\" ];\n"
		"threads = 4;\nlog_level = \"debug\";\n"
		"kafka = { brokers = \"k1:9092,k2:9092\"; properties = [ \"linger.ms=7\", \"compression.type=lz4\" ]; };\n"
		"publish = { max_record_bytes = 2048; delivery_timeout_ms = 5000; max_inflight_records = 7; };\n"
		"subscribe = { max_batch = 9; };\n", &c, &errs) == 0,
	   "a full file loads: %s", errs ? errs : "");
	ok(c.n_listen == 3 && strcmp(c.listen[1], "[::1]:7000") == 0, "listen list read");
	ok(c.threads == 4 && c.log_level == LOG_DEBUG, "threads and log_level read");
	ok(strcmp(c.kafka_brokers, "k1:9092,k2:9092") == 0 && c.n_kafka_props == 2 &&
	   strcmp(c.kafka_props[0].name, "linger.ms") == 0 && strcmp(c.kafka_props[0].value, "7") == 0,
	   "kafka group read");
	ok(c.publish_max_record_bytes == 2048 && c.publish_delivery_timeout_ms == 5000 &&
	   c.publish_max_inflight_records == 7 && c.subscribe_max_batch == 9, "publish and subscribe read");
	conf_free(&c);
	free(errs);

	bad("threads = 2;\nnosuch = 1;\n", 2, "nosuch", "unknown setting");
	bad("publish = {\n  max_recrod_bytes = 5;\n};\n", 2, "publish.max_recrod_bytes", "unknown setting");
	bad("tls = { cert = \"x\"; };\n", 1, "tls", "unknown group");
	bad("threads = \"four\";\n", 1, "threads", "expected an integer from 0 to 256");
	bad("\n\npublish = { max_record_bytes = 0; };\n", 3, "publish.max_record_bytes",
	    "out of range: accepted 1 to 16777216");
	bad("shutdown_timeout_ms = 99999999;\n", 1, "shutdown_timeout_ms", "accepted 0 to 3600000");
	bad("log_level = \"loud\";\n", 1, "log_level", "expected one of");
	bad("kafka = {\n properties = [ \"no.such.property=1\" ];\n};\n", 2, "kafka.properties",
	    "No such configuration property");
	bad("kafka = { properties = [ \"linger.ms=lots\" ]; };\n", 1, "kafka.properties", "linger.ms");
	bad("kafka = { properties = [ \"acks=1\" ]; };\n", 1, "kafka.properties", "acks=all");
	bad("kafka = { properties = [ \"bootstrap.servers=x:1\" ]; };\n", 1, "kafka.properties",
	    "kafka.brokers");
	bad("kafka = { properties = [ \"linger.ms\" ]; };\n", 1, "kafka.properties", "name=value");
	bad("kafka = { properties = [ \"enable.sasl.oauthbearer.unsecure.jwt=true\" ]; };\n", 1,
	    "kafka.properties", "sasl.oauthbearer.method=oidc");
	bad("kafka = { properties = [ \"partition.assignment.strategy=range,cooperative-sticky\" ]; };\n", 1,
	    "kafka.properties", "eager protocol");
	ok(load("kafka = { properties = [ \"partition.assignment.strategy=roundrobin\" ]; };\n", &c, &errs) == 0,
	   "an eager assignment strategy is taken: %s", errs ? errs : "");
	conf_free(&c);
	free(errs);
	errs = NULL;
	bad("kafka = { brokers = \"\"; };\n", 1, "kafka.brokers", "non-empty string");
	bad("listen = [ ];\n", 1, "listen", "list of addresses");
	bad("listen = [ \"localhost\" ];\n", 1, "listen", "host:port");
	bad("listen = [ \"localhost:99999\" ];\n", 1, "listen", "0 to 65535");

	/* Several errors are all reported, not only the first. */
	ok(load("threads = -1;\nlog_level = 3;\n", &c, &errs) == -1 && contains(errs, ":1: threads") &&
	   contains(errs, ":2: log_level"), "every error is reported");
	free(errs);

	ok(load("threads = 2;\nlog_level = ;\n", &c, &errs) == -1 && contains(errs, ".conf:2: syntax error"),
	   "a syntax error names its line: %s", errs);
	free(errs);

	{
		size_t len;
		FILE *err = open_memstream(&errs, &len);
		ok(conf_load("/nonexistent/kbridged.conf", &c, err) == -1, "a missing file fails");
		fclose(err);
		ok(contains(errs, "/nonexistent/kbridged.conf: cannot read the file"), "and says which: %s", errs);
		free(errs);
	}

	docs_agree();
	return tap_done();
}
