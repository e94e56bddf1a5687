/* producer: one idempotent librdkafka producer for the whole daemon.
 *
 * Threads and locks: rk_lock guards the rk pointer (swapped after a fatal error).
 * librdkafka is thread-safe; producer_send runs on completion-queue threads, the poll
 * thread serves delivery reports and errors, and the main thread inits, flushes and
 * destroys.
 *
 * Delivery reports come as events (rd_kafka_queue_poll), not per-message callbacks: an
 * event holds the reports of a whole ProduceResponse, and handing them over as an array
 * lets publish take a call's lock once per run of its records instead of once per record. */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "producer.h"
#include "util.h"

static rd_kafka_t *rk;
static rd_kafka_queue_t *rk_queue; /* rk's main queue: delivery reports and errors */
static pthread_rwlock_t rk_lock = PTHREAD_RWLOCK_INITIALIZER;
static rd_kafka_conf_t *template; /* what every producer is built from */
static rd_kafka_t *retired[8];    /* fatal producers still owing delivery reports */
static int n_retired;
static atomic_bool fatal_seen;
static pthread_t poll_thread;
static atomic_bool poll_stop;
static producer_delivery_fn *deliver;
static producer_room_fn *room;
static atomic_bool room_wanted;

static void on_error(rd_kafka_t *k, rd_kafka_event_t *ev)
{
	/* Transport errors are retried by librdkafka; the records' fate comes in their
	 * delivery reports. Fatal errors end the idempotent producer's guarantees (the
	 * event carries the underlying error, not ERR__FATAL). */
	if (rd_kafka_event_error_is_fatal(ev)) {
		log_error("kafka producer: fatal error %s: %s; its records in flight fail with "
			  "UNAVAILABLE and a new producer takes over",
			  rd_kafka_err2name(rd_kafka_event_error(ev)), rd_kafka_event_error_string(ev));
		if (k == rk)
			atomic_store(&fatal_seen, true);
	} else {
		log_warn("kafka producer: %s: %s", rd_kafka_err2name(rd_kafka_event_error(ev)),
			 rd_kafka_event_error_string(ev));
	}
}

/* Serves k's events from q: waits up to timeout_ms for the first, then takes what is
 * there without waiting. */
static void serve(rd_kafka_t *k, rd_kafka_queue_t *q, int timeout_ms)
{
	const rd_kafka_message_t *msgs[256];
	rd_kafka_event_t *ev;

	while ((ev = rd_kafka_queue_poll(q, timeout_ms))) {
		timeout_ms = 0;
		switch (rd_kafka_event_type(ev)) {
		case RD_KAFKA_EVENT_DR: {
			size_t n;
			while ((n = rd_kafka_event_message_array(ev, msgs, ARRAY_SIZE(msgs))) > 0)
				deliver(msgs, n);
			break;
		}
		case RD_KAFKA_EVENT_ERROR:
			on_error(k, ev);
			break;
		case RD_KAFKA_EVENT_OAUTHBEARER_TOKEN_REFRESH:
			/* Only a token refresh callback asks for this, and kbridged sets none
			 * (the built-in unsecured one is refused in kbridged.conf; OIDC
			 * refreshes on librdkafka's background thread). */
			log_error("kafka producer: librdkafka asks for an OAUTHBEARER token, which "
				  "kbridged cannot provide; use sasl.oauthbearer.method=oidc");
			rd_kafka_oauthbearer_set_token_failure(k, "kbridged provides no token refresh");
			break;
		default:
			break;
		}
		rd_kafka_event_destroy(ev);
	}
}

/* Serves a producer that the poll thread no longer serves until its queue is empty or
 * timeout_ms passed. */
static void serve_until_empty(rd_kafka_t *k, int timeout_ms)
{
	rd_kafka_queue_t *q = rd_kafka_queue_get_main(k);
	int64_t end = now_ms() + timeout_ms;

	while (rd_kafka_outq_len(k) > 0 && now_ms() < end)
		serve(k, q, 10);
	serve(k, q, 0);
	rd_kafka_queue_destroy(q);
}

/* Builds a producer from the template. Returns NULL with errmsg on failure. */
static rd_kafka_t *build(char *errmsg, size_t errsize)
{
	rd_kafka_conf_t *kc = rd_kafka_conf_dup(template);
	rd_kafka_t *k = rd_kafka_new(RD_KAFKA_PRODUCER, kc, errmsg, errsize);
	if (!k)
		rd_kafka_conf_destroy(kc); /* rd_kafka_new takes it only on success */
	return k;
}

/* Poll thread: replaces a producer that hit a fatal error. */
static void rebuild(void)
{
	char errmsg[512];

	if (n_retired == (int)ARRAY_SIZE(retired)) {
		log_error("kafka producer: too many fatal errors in a row; not rebuilding yet");
		return;
	}
	rd_kafka_t *fresh = build(errmsg, sizeof(errmsg));
	if (!fresh) {
		log_error("kafka producer: cannot build a new producer: %s; retrying", errmsg);
		atomic_store(&fatal_seen, true);
		return;
	}
	pthread_rwlock_wrlock(&rk_lock);
	retired[n_retired++] = rk;
	rd_kafka_queue_destroy(rk_queue);
	rk = fresh;
	rk_queue = rd_kafka_queue_get_main(rk);
	pthread_rwlock_unlock(&rk_lock);
	log_notice("kafka producer: a new producer replaced the one that hit a fatal error");
}

/* Poll thread: serves the retired producers' last reports and destroys those done. */
static void poll_retired(void)
{
	for (int i = 0; i < n_retired;) {
		rd_kafka_queue_t *q = rd_kafka_queue_get_main(retired[i]);
		serve(retired[i], q, 0);
		rd_kafka_queue_destroy(q);
		if (rd_kafka_outq_len(retired[i]) > 0) {
			i++;
			continue;
		}
		rd_kafka_destroy(retired[i]);
		retired[i] = retired[--n_retired];
	}
}

static void *poll_main(void *arg)
{
	while (!atomic_load(&poll_stop)) {
		serve(rk, rk_queue, 100); /* only this thread changes rk */
		if (atomic_exchange(&fatal_seen, false))
			rebuild();
		if (n_retired)
			poll_retired();
		/* Every poll, served reports or not: a waiter also needs to hear about
		 * a drain that gave up on its records. */
		if (atomic_exchange(&room_wanted, false))
			room();
	}
	return NULL;
}

void producer_want_room(void)
{
	atomic_store(&room_wanted, true);
}

static int set(rd_kafka_conf_t *kc, const char *name, const char *value, char *errmsg, size_t errsize)
{
	if (rd_kafka_conf_set(kc, name, value, errmsg, errsize) != RD_KAFKA_CONF_OK)
		return -1;
	return 0;
}

int producer_init(const struct conf *c, const char *brokers, producer_delivery_fn *on_delivery,
		  producer_room_fn *on_room, char *errmsg, size_t errsize)
{
	rd_kafka_conf_t *kc = rd_kafka_conf_new();
	char num[32];
	int rc = 0;

	deliver = on_delivery;
	room = on_room;
	snprintf(num, sizeof(num), "%d", c->publish_delivery_timeout_ms);
	rc |= set(kc, "bootstrap.servers", brokers, errmsg, errsize);
	rc |= set(kc, "client.id", "kbridged", errmsg, errsize);
	rc |= set(kc, "acks", "all", errmsg, errsize);
	rc |= set(kc, "enable.idempotence", "true", errmsg, errsize);
	rc |= set(kc, "delivery.timeout.ms", num, errmsg, errsize);
	/* Without publish.auto_create_topics, neither our metadata lookups nor produced
	 * records may make a broker create a topic. */
	rc |= set(kc, "allow.auto.create.topics", c->publish_auto_create_topics ? "true" : "false",
		  errmsg, errsize);
	/* Room for the largest record we accept plus its framing. */
	if (c->publish_max_record_bytes + 1024 > 1000000) {
		snprintf(num, sizeof(num), "%d", c->publish_max_record_bytes + 1024);
		rc |= set(kc, "message.max.bytes", num, errmsg, errsize);
	}
	for (size_t i = 0; i < c->n_kafka_props && rc == 0; i++)
		rc |= set(kc, c->kafka_props[i].name, c->kafka_props[i].value, errmsg, errsize);
	if (rc) {
		rd_kafka_conf_destroy(kc);
		return -1;
	}
	rd_kafka_conf_set_events(kc, RD_KAFKA_EVENT_DR | RD_KAFKA_EVENT_ERROR);
	/* Role warnings (a consumer property on the producer) are noise: kafka.properties
	 * serves both, and typos are refused when the file is loaded. */
	rd_kafka_conf_set_log_cb(kc, log_rdkafka_quiet);
	template = kc;
	rk = build(errmsg, errsize);
	if (!rk) {
		rd_kafka_conf_destroy(template);
		template = NULL;
		return -1;
	}
	rk_queue = rd_kafka_queue_get_main(rk);
	atomic_store(&poll_stop, false);
	if (pthread_create(&poll_thread, NULL, poll_main, NULL) != 0) {
		snprintf(errmsg, errsize, "cannot start the producer's poll thread");
		rd_kafka_queue_destroy(rk_queue);
		rk_queue = NULL;
		rd_kafka_destroy(rk);
		rk = NULL;
		return -1;
	}
	return 0;
}

int producer_wait_ready(int timeout_ms)
{
	const struct rd_kafka_metadata *md;

	pthread_rwlock_rdlock(&rk_lock);
	rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 0, NULL, &md, timeout_ms);
	pthread_rwlock_unlock(&rk_lock);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		return -1;
	int brokers = md->broker_cnt;
	rd_kafka_metadata_destroy(md);
	return brokers > 0 ? 0 : -1;
}

rd_kafka_resp_err_t producer_metadata(const struct rd_kafka_metadata **md, int timeout_ms)
{
	pthread_rwlock_rdlock(&rk_lock);
	rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 1, NULL, md, timeout_ms);
	pthread_rwlock_unlock(&rk_lock);
	return err;
}

rd_kafka_resp_err_t producer_topic_metadata(const char *topic, const struct rd_kafka_metadata **md,
					    int timeout_ms)
{
	pthread_rwlock_rdlock(&rk_lock);
	rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
	rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 0, rkt, md, timeout_ms);
	rd_kafka_topic_destroy(rkt);
	pthread_rwlock_unlock(&rk_lock);
	return err;
}

void producer_batch_begin(struct producer_batch *b)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	b->now_ms = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
	b->rkt = NULL;
	/* The poll thread swaps rk (after a fatal error) under the write lock only. */
	pthread_rwlock_rdlock(&rk_lock);
	b->rk = rk;
}

rd_kafka_resp_err_t producer_send(struct producer_batch *b, const Kbridge__V1__Record *r, void *opaque)
{
	rd_kafka_headers_t *hdrs = NULL;
	rd_kafka_resp_err_t err;

	if (!b->rkt || strcmp(rd_kafka_topic_name(b->rkt), r->topic) != 0) {
		if (b->rkt)
			rd_kafka_topic_destroy(b->rkt);
		b->rkt = rd_kafka_topic_new(b->rk, r->topic, NULL);
		if (!b->rkt)
			return rd_kafka_last_error();
	}
	if (r->n_headers) {
		hdrs = rd_kafka_headers_new(r->n_headers);
		for (size_t i = 0; i < r->n_headers; i++)
			rd_kafka_header_add(hdrs, r->headers[i]->key, -1, r->headers[i]->value.data,
					    r->headers[i]->value.len);
	}
	/* No RD_KAFKA_MSG_F_COPY: the caller keeps key and value alive until the delivery
	 * report, which saves a copy of every record. */
	err = rd_kafka_producev(
		b->rk, RD_KAFKA_V_RKT(b->rkt),
		RD_KAFKA_V_PARTITION(r->placement_case == KBRIDGE__V1__RECORD__PLACEMENT_PARTITION
					     ? r->partition
					     : RD_KAFKA_PARTITION_UA),
		RD_KAFKA_V_KEY(r->key.len ? r->key.data : NULL, r->key.len),
		RD_KAFKA_V_VALUE(r->value.len ? r->value.data : NULL, r->value.len),
		RD_KAFKA_V_TIMESTAMP(r->timestamp_ms ? r->timestamp_ms : b->now_ms), RD_KAFKA_V_HEADERS(hdrs),
		RD_KAFKA_V_OPAQUE(opaque), RD_KAFKA_V_END);
	if (err && hdrs)
		rd_kafka_headers_destroy(hdrs); /* on success the message owns them */
	return err;
}

void producer_batch_end(struct producer_batch *b)
{
	if (b->rkt)
		rd_kafka_topic_destroy(b->rkt);
	b->rkt = NULL;
	pthread_rwlock_unlock(&rk_lock);
}

/* The poll thread may swap rk and retire producers meanwhile: the main thread reads
 * rk under the lock and counts retired producers' records through their own polls.
 * With delivery reports as events, rd_kafka_flush only waits: the poll thread serves. */
int producer_flush(int timeout_ms)
{
	pthread_rwlock_rdlock(&rk_lock);
	rd_kafka_flush(rk, timeout_ms);
	int left = rd_kafka_outq_len(rk);
	pthread_rwlock_unlock(&rk_lock);
	return left;
}

void producer_purge(void)
{
	pthread_rwlock_rdlock(&rk_lock);
	rd_kafka_purge(rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
	/* Purged records get their (failed) delivery reports on the next polls. */
	rd_kafka_flush(rk, 1000);
	pthread_rwlock_unlock(&rk_lock);
}

void producer_shutdown(void)
{
	if (!rk)
		return;
	atomic_store(&poll_stop, true);
	pthread_join(poll_thread, NULL);
	for (int i = 0; i < n_retired; i++) {
		rd_kafka_purge(retired[i], RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
		serve_until_empty(retired[i], 1000);
		rd_kafka_destroy(retired[i]);
	}
	n_retired = 0;
	rd_kafka_queue_destroy(rk_queue);
	rk_queue = NULL;
	rd_kafka_destroy(rk);
	rk = NULL;
	rd_kafka_conf_destroy(template);
	template = NULL;
}
