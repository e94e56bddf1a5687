/* direct-produce: the physical limit kbridged is measured against. One librdkafka producer
 * with kbridged's own settings (acks=all, idempotent, delivery.timeout.ms=30000, librdkafka's
 * defaults for linger and batching unless -X changes them) produces N records of B bytes,
 * as fast as possible or at a fixed rate, and reports the same figures as `kbridge bench`:
 * records/s, MB/s and produce->delivery-report latency percentiles.
 *
 *   direct-produce -b BROKERS [-t TOPIC] [-n RECORDS] [-s SIZE] [--rate R] [-X NAME=VALUE]...
 *                  [--slow-log FILE [--slow-ms MS]] [--json]
 *
 * Values are not copied (like kbridged, which hands librdkafka the decoded request's bytes):
 * every record points at one shared buffer that outlives the producer.
 *
 * Threads: the main thread produces (and paces with --rate); a poll thread serves the
 * delivery reports, as kbridged's does, so a report is timed when it arrives and not when
 * the producer next finds time. The histogram and counters belong to the poll thread
 * until `delivered` (atomic) reaches the number produced. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <librdkafka/rdkafka.h>

#include "hist.h"

struct run {
	rd_kafka_t *rk;
	struct hist lat;
	struct slowlog slow;
	atomic_uint_least64_t delivered;
	uint64_t failed;
	int64_t t_last;
	atomic_bool stop;
	char first_error[256];
};

static void dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
	struct run *r = opaque;
	int64_t now = hist_now_ns();

	hist_add(&r->lat, now - (int64_t)(intptr_t)m->_private);
	slowlog_add(&r->slow, (int64_t)(intptr_t)m->_private, now - (int64_t)(intptr_t)m->_private);
	if (m->err) {
		if (!r->failed++)
			snprintf(r->first_error, sizeof(r->first_error), "%s", rd_kafka_err2str(m->err));
	}
	r->t_last = now;
	atomic_fetch_add(&r->delivered, 1);
}

static void *poll_main(void *arg)
{
	struct run *r = arg;

	while (!atomic_load(&r->stop))
		rd_kafka_poll(r->rk, 100);
	return NULL;
}

static void __attribute__((noreturn)) usage(int status)
{
	fprintf(status ? stderr : stdout,
		"Usage: direct-produce -b BROKERS [-t TOPIC] [-n RECORDS] [-s SIZE] [--rate R]\n"
		"                      [-X NAME=VALUE]... [--slow-log FILE [--slow-ms MS]] [--json]\n"
		"Produce RECORDS records of SIZE bytes (default 100000 x 100 B to topic bench) with\n"
		"kbridged's producer settings, and report records/s, MB/s and produce->delivery\n"
		"report latency. -X sets a librdkafka property (e.g. -X linger.ms=0). --slow-log\n"
		"writes \"START_NS LATENCY_NS\" (CLOCK_MONOTONIC) for every record that took MS\n"
		"milliseconds or more (default 1; 0 logs all), as kbridge bench --slow-log does.\n");
	exit(status);
}

static void set(rd_kafka_conf_t *kc, const char *name, const char *value)
{
	char err[512];

	if (rd_kafka_conf_set(kc, name, value, err, sizeof(err)) != RD_KAFKA_CONF_OK) {
		fprintf(stderr, "direct-produce: %s=%s: %s\n", name, value, err);
		exit(2);
	}
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"rate", required_argument, NULL, 'r'}, {"json", no_argument, NULL, 'j'},
		{"slow-log", required_argument, NULL, 'L'}, {"slow-ms", required_argument, NULL, 'M'},
		{"help", no_argument, NULL, 'h'}, {0}};
	const char *brokers = NULL, *topic = "bench";
	uint64_t records = 100000;
	size_t size = 100;
	double rate = 0, slow_ms = 1;
	const char *slow_log = NULL;
	bool json = false;
	rd_kafka_conf_t *kc = rd_kafka_conf_new();
	struct run r = {0};
	char err[512];
	int c;

	/* kbridged's settings first, so that -X may change the tunable ones */
	set(kc, "client.id", "bench-direct");
	set(kc, "acks", "all");
	set(kc, "enable.idempotence", "true");
	set(kc, "delivery.timeout.ms", "30000");
	set(kc, "allow.auto.create.topics", "false");
	while ((c = getopt_long(argc, argv, "b:t:n:s:X:h", longopts, NULL)) != -1) {
		char *eq, *end;
		switch (c) {
		case 'b': brokers = optarg; break;
		case 't': topic = optarg; break;
		case 'n':
			records = strtoull(optarg, &end, 10);
			if (*end || !records)
				usage(2);
			break;
		case 's':
			size = strtoull(optarg, &end, 10);
			if (*end || size > (16u << 20))
				usage(2);
			break;
		case 'r':
			rate = strtod(optarg, &end);
			if (*end || !(rate > 0))
				usage(2);
			break;
		case 'X':
			eq = strchr(optarg, '=');
			if (!eq)
				usage(2);
			*eq = 0;
			set(kc, optarg, eq + 1);
			break;
		case 'j': json = true; break;
		case 'L': slow_log = optarg; break;
		case 'M':
			slow_ms = strtod(optarg, &end);
			if (*end || !(slow_ms >= 0))
				usage(2);
			break;
		case 'h': usage(0);
		default: usage(2);
		}
	}
	if (!brokers || optind < argc)
		usage(2);
	set(kc, "bootstrap.servers", brokers);
	rd_kafka_conf_set_dr_msg_cb(kc, dr_cb);
	rd_kafka_conf_set_opaque(kc, &r);
	hist_init(&r.lat);
	if (slow_log && slowlog_open(&r.slow, slow_log, (int64_t)(slow_ms * 1e6)) != 0) {
		fprintf(stderr, "direct-produce: --slow-log %s: %s\n", slow_log, strerror(errno));
		return 1;
	}
	r.rk = rd_kafka_new(RD_KAFKA_PRODUCER, kc, err, sizeof(err));
	if (!r.rk) {
		fprintf(stderr, "direct-produce: %s\n", err);
		return 1;
	}
	char *value = malloc(size ? size : 1);
	if (!value)
		abort();
	memset(value, 'x', size);
	/* Like kbridged at start-up: know the cluster before the clock starts. */
	const struct rd_kafka_metadata *md;
	if (rd_kafka_metadata(r.rk, 0, NULL, &md, 10000) != RD_KAFKA_RESP_ERR_NO_ERROR) {
		fprintf(stderr, "direct-produce: no metadata from %s\n", brokers);
		return 1;
	}
	rd_kafka_metadata_destroy(md);

	pthread_t poller;
	pthread_create(&poller, NULL, poll_main, &r);
	int64_t t0 = hist_now_ns();
	for (uint64_t i = 0; i < records; i++) {
		int64_t start = hist_now_ns();
		if (rate > 0) {
			/* latency from the scheduled time, as kbridge bench does */
			int64_t due = t0 + (int64_t)((double)i * 1e9 / rate);
			if (due > start)
				hist_sleep_until(due);
			start = due;
		}
		for (;;) {
			rd_kafka_resp_err_t e = rd_kafka_producev(
				r.rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_VALUE(value, size),
				RD_KAFKA_V_MSGFLAGS(0), RD_KAFKA_V_OPAQUE((void *)(intptr_t)start),
				RD_KAFKA_V_END);
			if (e == RD_KAFKA_RESP_ERR_NO_ERROR)
				break;
			if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL) {
				fprintf(stderr, "direct-produce: produce: %s\n", rd_kafka_err2str(e));
				return 1;
			}
			/* The poll thread is serving reports; wait for room. */
			hist_sleep_until(hist_now_ns() + 200000);
		}
	}
	while (atomic_load(&r.delivered) < records)
		hist_sleep_until(hist_now_ns() + 1000000);
	atomic_store(&r.stop, true);
	pthread_join(poller, NULL);

	double secs = (r.t_last - t0) / 1e9;
	uint64_t ok = records - r.failed;
	double rps = secs > 0 ? ok / secs : 0;
	if (json) {
		printf("{\"tool\": \"direct-produce\", \"records\": %" PRIu64 ", \"size\": %zu, "
		       "\"rate\": %.0f, \"acked\": %" PRIu64 ", \"failed\": %" PRIu64 ", "
		       "\"elapsed_s\": %.6f, \"records_per_s\": %.1f, \"mb_per_s\": %.3f, ",
		       records, size, rate, ok, r.failed, secs, rps, rps * size / 1e6);
		hist_print_json(stdout, "latency_us", &r.lat);
		if (slow_log)
			printf(", \"slow_log\": {\"min_ms\": %g, \"lines\": %" PRIu64 "}", slow_ms, r.slow.lines);
		puts("}");
	} else {
		printf("direct librdkafka %s: %" PRIu64 " records of %zu B", rd_kafka_version_str(),
		       records, size);
		if (rate > 0)
			printf(", rate %.0f records/s", rate);
		printf("\ndelivered %" PRIu64 " (%" PRIu64 " failed) in %.3f s: %.0f records/s, %.2f MB/s\n",
		       ok, r.failed, secs, rps, rps * size / 1e6);
		printf("latency produce->delivery report (%" PRIu64 " records): ", r.lat.count);
		hist_print_text(stdout, &r.lat);
		putchar('\n');
		if (slow_log)
			printf("slow log: %" PRIu64 " records of %g ms or more in %s\n", r.slow.lines, slow_ms,
			       slow_log);
	}
	if (r.failed)
		fprintf(stderr, "direct-produce: %" PRIu64 " records failed, the first: %s\n", r.failed,
			r.first_error);
	rd_kafka_destroy(r.rk);
	hist_destroy(&r.lat);
	free(value);
	if (slowlog_close(&r.slow) != 0) {
		fprintf(stderr, "direct-produce: --slow-log %s: %s\n", slow_log, strerror(errno));
		return 1;
	}
	return r.failed ? 1 : 0;
}
