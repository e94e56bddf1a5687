/* kbridged: gRPC in front of Kafka. main() reads as the life cycle: modules start in
 * order, the main thread then only takes signals and feeds systemd, and the modules stop
 * in reverse order.
 *
 * Threads: signals are blocked in every thread (the mask is set before any thread,
 * librdkafka's included, exists) and taken here with sigtimedwait. */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/grpc.h>
#include <librdkafka/rdkafka.h>
#include <systemd/sd-daemon.h>

#include "conf.h"
#include "consumer.h"
#include "embedded.h"
#include "log.h"
#include "producer.h"
#include "publish.h"
#include "server.h"
#include "subscribe.h"
#include "topics.h"
#include "util.h"

#define DEFAULT_CONF SYSCONFDIR "/kbridge/kbridged.conf"

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: kbridged [-c FILE] [-t] [-h] [-V]\n"
		"gRPC to Kafka bridge daemon; runs in the foreground (systemd supervises it).\n\n"
		"  -c, --config FILE  configuration file (default " DEFAULT_CONF ")\n"
		"  -t, --test         check the configuration file, print \"configuration OK\" or the errors, exit\n"
		"  -h, --help         this help\n"
		"  -V, --version      print the version and exit\n\n"
		"See kbridged(8) and kbridged.conf(5).\n");
}

/* glibc gives every thread that allocates an arena of its own, up to 8 per CPU, and each
 * arena keeps its own freed memory: kbridged's ~20 threads (gRPC's, librdkafka's) used 14-15
 * arenas on 2 CPUs, and RSS crept up for millions of records before levelling off (27.3 ->
 * 30.7 MiB from 1M to 10M records). As many arenas as `threads` (at least two), about one
 * per completion-queue thread, the threads that allocate per request, keeps it flat (25-26
 * MiB from 1M to 10M) for about 4% more CPU at batch 100 and none measurable at one record
 * per request; two per thread cost nothing measurable but still crept (7-12%).
 * MALLOC_ARENA_MAX or glibc.malloc.arena_max in the environment wins. */
static void limit_malloc_arenas(const struct conf *c)
{
	const char *tunables = getenv("GLIBC_TUNABLES");

	if (getenv("MALLOC_ARENA_MAX") || (tunables && strstr(tunables, "glibc.malloc.arena_max")))
		return;
	int n = server_thread_count(c);
	mallopt(M_ARENA_MAX, n < 2 ? 2 : n);
}

/* Takes a signal within timeout_ms: the signal number, or 0 on timeout. */
static int take_signal(const sigset_t *set, int timeout_ms)
{
	struct timespec ts = {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000};
	int sig = sigtimedwait(set, NULL, &ts);
	return sig < 0 ? 0 : sig;
}

static void notify_status(const char *brokers)
{
	sd_notifyf(0, "STATUS=serving: %zu publish calls, %zu subscriptions (%zu shared readers); Kafka at %s",
		   publish_active(), subscribe_active(), consumer_shared_readers(), brokers);
}

/* Waits for Kafka to answer once. Returns 0, or the signal that ended the wait. */
static int wait_for_kafka(const sigset_t *set, const char *brokers)
{
	int64_t start = now_ms(), next_warn = start + 10000;

	for (;;) {
		if (producer_wait_ready(1000) == 0)
			return 0;
		int sig = take_signal(set, 0);
		if (sig == SIGTERM || sig == SIGINT)
			return sig;
		if (now_ms() >= next_warn) {
			log_warn("Kafka at %s has not answered for %lld s; still trying", brokers,
				 (long long)(now_ms() - start) / 1000);
			sd_notifyf(0, "STATUS=waiting for Kafka at %s", brokers);
			next_warn += 10000;
		}
	}
}

static void drain(const struct conf *c)
{
	int64_t deadline = now_ms() + c->shutdown_timeout_ms;

	sd_notify(0, "STOPPING=1\nSTATUS=draining: finishing in-flight publishes");
	log_notice("draining: no new calls; %zu publish calls and %zu subscriptions to end (up to %d ms)",
		   publish_active(), subscribe_active(), c->shutdown_timeout_ms);
	server_shutdown_begin(deadline);
	if (!server_shutdown_wait(deadline)) {
		log_warn("shutdown_timeout_ms (%d) passed with %zu publish calls still waiting for Kafka; cancelling them",
			 c->shutdown_timeout_ms, publish_active());
		server_cancel_all();
	}
	int64_t left = deadline - now_ms();
	int outstanding = producer_flush(left > 0 ? (int)left : 0);
	if (outstanding > 0) {
		log_warn("%d records were not delivered to Kafka before shutdown; they were never acknowledged",
			 outstanding);
		producer_purge();
	}
	while (!server_shutdown_wait(now_ms() + 5000))
		log_warn("still waiting for %zu publish calls and %zu subscriptions to end",
			 publish_active(), subscribe_active());
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"config", required_argument, NULL, 'c'}, {"test", no_argument, NULL, 't'},
		{"help", no_argument, NULL, 'h'},         {"version", no_argument, NULL, 'V'},
		{NULL, 0, NULL, 0},
	};
	const char *path = DEFAULT_CONF;
	bool test_only = false;
	struct conf c;
	char errmsg[512];
	int opt;

	while ((opt = getopt_long(argc, argv, "c:thV", longopts, NULL)) != -1) {
		switch (opt) {
		case 'c':
			path = optarg;
			break;
		case 't':
			test_only = true;
			break;
		case 'h':
			usage(stdout);
			return 0;
		case 'V':
			printf("kbridged %s (gRPC core %s, librdkafka %s)\n", PACKAGE_VERSION,
			       grpc_version_string(), rd_kafka_version_str());
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "kbridged: unexpected argument \"%s\"\n", argv[optind]);
		usage(stderr);
		return 2;
	}

	if (conf_load(path, &c, stderr) < 0) {
		fprintf(stderr, "kbridged: %s has errors%s\n", path, test_only ? "" : "; not starting");
		return 1;
	}
	if (test_only) {
		printf("configuration OK\n");
		conf_free(&c);
		return 0;
	}

	log_init("kbridged");
	log_set_level(c.log_level);

	/* Before any thread exists, so that every thread inherits the mask. */
	sigset_t sigs;
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);
	signal(SIGPIPE, SIG_IGN);
	limit_malloc_arenas(&c);

	grpc_init();
	const char *brokers = c.kafka_brokers;
	bool embedded = strcmp(brokers, "embedded") == 0;
	if (embedded) {
		brokers = embedded_init(c.kafka_embedded_brokers, errmsg, sizeof(errmsg));
		if (!brokers) {
			log_error("kafka.brokers = \"embedded\": %s", errmsg);
			return 1;
		}
		log_warn("kafka.brokers = \"embedded\": using an in-process mock Kafka cluster at %s; "
			 "NOTHING IS DURABLE — set kafka.brokers in %s to real brokers for production",
			 brokers, path);
	}
	if (producer_init(&c, brokers, publish_on_delivery, publish_on_room, errmsg, sizeof(errmsg)) < 0) {
		log_error("cannot create the Kafka producer: %s", errmsg);
		return 1;
	}
	consumer_init(&c, brokers);
	publish_init(&c);
	subscribe_init(&c);
	if (server_init(&c) < 0) {
		producer_shutdown();
		embedded_shutdown();
		return 1;
	}
	server_start();

	sd_notifyf(0, "STATUS=waiting for Kafka at %s", brokers);
	int sig = wait_for_kafka(&sigs, brokers);
	if (sig == 0) {
		uint64_t wd_usec = 0;
		int64_t wd_ms = sd_watchdog_enabled(0, &wd_usec) > 0 ? (int64_t)(wd_usec / 1000) : 0;
		int64_t next_status = 0;

		sd_notify(0, "READY=1");
		notify_status(brokers);
		log_notice("kbridged ready: %zu listeners, Kafka at %s, version %s", c.n_listen, brokers,
			   PACKAGE_VERSION);
		while (sig != SIGTERM && sig != SIGINT) {
			int wait = wd_ms ? (int)(wd_ms / 3 < 1000 ? wd_ms / 3 : 1000) : 1000;
			sig = take_signal(&sigs, wait);
			if (sig == SIGHUP)
				log_notice("SIGHUP: reloading the configuration is not supported yet; "
					   "restart kbridged to apply changes to %s", path);
			/* The watchdog is fed only while every completion-queue thread comes
			 * back from its queue: a stuck thread gets the daemon restarted. */
			if (wd_ms && server_threads_alive(wd_ms / 2))
				sd_notify(0, "WATCHDOG=1");
			if (now_ms() >= next_status) {
				notify_status(brokers);
				next_status = now_ms() + 5000;
			}
		}
		log_notice("%s: shutting down", sig == SIGTERM ? "SIGTERM" : "SIGINT");
	} else {
		log_notice("%s while waiting for Kafka: shutting down", sig == SIGTERM ? "SIGTERM" : "SIGINT");
	}

	drain(&c);
	consumer_shutdown();
	server_finish();
	topics_shutdown();
	producer_shutdown();
	embedded_shutdown();
	grpc_shutdown();
	conf_free(&c);
	log_notice("stopped");
	return 0;
}
