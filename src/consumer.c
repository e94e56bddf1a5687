/* consumer: one reader thread and librdkafka consumer per subscription (for now).
 *
 * Threads and locks: r->lock guards r->stop and r->woken and is never held while calling
 * the sink. count_lock guards n_readers (consumer_shutdown waits on it). */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "consumer.h"
#include "log.h"
#include "util.h"

#define FETCH_MAX 256

struct reader {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool stop, woken;
	const struct reader_sink *sink;
	void *arg;
	char **topics;
	size_t n_topics;
	int start; /* KBRIDGE__V1__SUBSCRIBE_REQUEST__START__* */
};

static const struct conf *conf;
static char *bootstrap;
static pthread_mutex_t count_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t count_cond = PTHREAD_COND_INITIALIZER;
static int n_readers;

void consumer_init(const struct conf *c, const char *brokers)
{
	conf = c;
	free(bootstrap);
	bootstrap = xstrdup(brokers);
}

static rd_kafka_t *new_consumer(char *errmsg, size_t errsize)
{
	rd_kafka_conf_t *kc = rd_kafka_conf_new();
	static const char *const fixed[][2] = {
		{"client.id", "kbridged"},
		/* assign() needs a group id; no group is ever joined or committed to. */
		{"group.id", "kbridged-reader"},
		{"enable.auto.commit", "false"},
		{"enable.auto.offset.store", "false"},
		{"enable.partition.eof", "false"},
		{"allow.auto.create.topics", "false"},
		/* A bounded prefetch per reader: memory grows with subscribers, not with lag. */
		{"queued.max.messages.kbytes", "2048"},
		{"auto.offset.reset", "earliest"},
	};

	if (rd_kafka_conf_set(kc, "bootstrap.servers", bootstrap, errmsg, errsize) != RD_KAFKA_CONF_OK)
		goto fail;
	for (size_t i = 0; i < ARRAY_SIZE(fixed); i++)
		if (rd_kafka_conf_set(kc, fixed[i][0], fixed[i][1], errmsg, errsize) != RD_KAFKA_CONF_OK)
			goto fail;
	for (size_t i = 0; i < conf->n_kafka_props; i++) {
		rd_kafka_conf_res_t res = rd_kafka_conf_set(kc, conf->kafka_props[i].name,
							    conf->kafka_props[i].value, errmsg, errsize);
		if (res != RD_KAFKA_CONF_OK)
			goto fail;
	}
	/* kafka.properties serves producer and consumers alike: the consumers' warnings
	 * that a producer property is ignored would repeat for every subscription. */
	rd_kafka_conf_set_log_cb(kc, log_rdkafka_quiet);
	rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, kc, errmsg, errsize);
	if (rk)
		return rk;
fail:
	rd_kafka_conf_destroy(kc);
	return NULL;
}

/* Builds the assignment: every partition of every topic at the start offset.
 * Returns OK or the status to end the subscription with (msg filled in). */
static grpc_status_code resolve(struct reader *r, rd_kafka_t *rk, rd_kafka_topic_partition_list_t *list,
				char *msg, size_t msgsize)
{
	for (size_t t = 0; t < r->n_topics; t++) {
		rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, r->topics[t], NULL);
		const struct rd_kafka_metadata *md = NULL;
		rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 0, rkt, &md, 10000);
		rd_kafka_topic_destroy(rkt);
		if (!err && md->topic_cnt == 1)
			err = md->topics[0].err;
		if (err == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART || err == RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC ||
		    (!err && md->topics[0].partition_cnt == 0)) {
			snprintf(msg, msgsize, "topic \"%s\" does not exist in Kafka", r->topics[t]);
			if (md)
				rd_kafka_metadata_destroy(md);
			return GRPC_STATUS_NOT_FOUND;
		}
		if (err) {
			snprintf(msg, msgsize, "cannot read the metadata of topic \"%s\" from Kafka: %s",
				 r->topics[t], rd_kafka_err2str(err));
			if (md)
				rd_kafka_metadata_destroy(md);
			return GRPC_STATUS_UNAVAILABLE;
		}
		for (int p = 0; p < md->topics[0].partition_cnt; p++) {
			int32_t part = md->topics[0].partitions[p].id;
			int64_t offset = RD_KAFKA_OFFSET_BEGINNING;
			if (r->start == KBRIDGE__V1__SUBSCRIBE_REQUEST__START__LATEST) {
				/* Fix LATEST to a number now, so that everything published after
				 * the client saw our initial metadata reaches it. */
				int64_t low, high;
				err = rd_kafka_query_watermark_offsets(rk, r->topics[t], part, &low, &high, 10000);
				if (err) {
					snprintf(msg, msgsize, "cannot read the end offset of %s/%" PRId32 " from Kafka: %s",
						 r->topics[t], part, rd_kafka_err2str(err));
					rd_kafka_metadata_destroy(md);
					return GRPC_STATUS_UNAVAILABLE;
				}
				offset = high;
			}
			rd_kafka_topic_partition_list_add(list, r->topics[t], part)->offset = offset;
		}
		rd_kafka_metadata_destroy(md);
	}
	return GRPC_STATUS_OK;
}

/* Waits until the sink has room (woken) or the reader must stop; true to go on. */
static bool wait_for_room(struct reader *r)
{
	pthread_mutex_lock(&r->lock);
	while (!r->woken && !r->stop)
		pthread_cond_wait(&r->cond, &r->lock);
	r->woken = false;
	bool go_on = !r->stop;
	pthread_mutex_unlock(&r->lock);
	return go_on;
}

static bool stopping(struct reader *r)
{
	pthread_mutex_lock(&r->lock);
	bool s = r->stop;
	pthread_mutex_unlock(&r->lock);
	return s;
}

static void fetch_loop(struct reader *r, rd_kafka_t *rk)
{
	rd_kafka_queue_t *q = rd_kafka_queue_get_consumer(rk);
	rd_kafka_message_t *msgs[FETCH_MAX];

	while (!stopping(r)) {
		ssize_t n = rd_kafka_consume_batch_queue(q, 200, msgs, FETCH_MAX);
		size_t k = 0;
		for (ssize_t i = 0; i < n; i++) {
			if (msgs[i]->err) {
				log_warn("subscription reader: %s [%" PRId32 "]: %s",
					 msgs[i]->rkt ? rd_kafka_topic_name(msgs[i]->rkt) : "-",
					 msgs[i]->partition, rd_kafka_message_errstr(msgs[i]));
				rd_kafka_message_destroy(msgs[i]);
				continue;
			}
			msgs[k++] = msgs[i];
		}
		size_t done = 0;
		while (done < k) {
			done += r->sink->deliver(r->arg, msgs + done, k - done);
			if (done < k && !wait_for_room(r))
				break;
		}
		for (; done < k; done++)
			rd_kafka_message_destroy(msgs[done]);
	}
	rd_kafka_queue_destroy(q);
}

static void reader_free(struct reader *r)
{
	for (size_t i = 0; i < r->n_topics; i++)
		free(r->topics[i]);
	free(r->topics);
	pthread_mutex_destroy(&r->lock);
	pthread_cond_destroy(&r->cond);
	free(r);
}

static void *reader_main(void *arg)
{
	struct reader *r = arg;
	char msg[512];
	rd_kafka_t *rk = new_consumer(msg, sizeof(msg));

	if (!rk) {
		r->sink->started(r->arg, GRPC_STATUS_INTERNAL, msg);
	} else {
		rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(8);
		grpc_status_code code = resolve(r, rk, list, msg, sizeof(msg));
		rd_kafka_resp_err_t err;
		if (code == GRPC_STATUS_OK && (err = rd_kafka_assign(rk, list))) {
			snprintf(msg, sizeof(msg), "cannot start reading from Kafka: %s", rd_kafka_err2str(err));
			code = GRPC_STATUS_UNAVAILABLE;
		}
		rd_kafka_topic_partition_list_destroy(list);
		if (!stopping(r))
			r->sink->started(r->arg, code, code == GRPC_STATUS_OK ? NULL : msg);
		if (code == GRPC_STATUS_OK)
			fetch_loop(r, rk);
		rd_kafka_assign(rk, NULL);
		rd_kafka_consumer_close(rk);
		rd_kafka_destroy(rk);
	}
	r->sink->stopped(r->arg);
	reader_free(r);

	pthread_mutex_lock(&count_lock);
	if (--n_readers == 0)
		pthread_cond_broadcast(&count_cond);
	pthread_mutex_unlock(&count_lock);
	return NULL;
}

struct reader *reader_start(const Kbridge__V1__SubscribeRequest *req, const struct reader_sink *sink,
			    void *arg)
{
	struct reader *r = xcalloc(1, sizeof(*r));
	pthread_attr_t attr;
	pthread_t tid;

	pthread_mutex_init(&r->lock, NULL);
	pthread_cond_init(&r->cond, NULL);
	r->sink = sink;
	r->arg = arg;
	r->start = req->start;
	r->n_topics = req->n_topics;
	r->topics = xcalloc(req->n_topics, sizeof(char *));
	for (size_t i = 0; i < req->n_topics; i++)
		r->topics[i] = xstrdup(req->topics[i]);

	pthread_mutex_lock(&count_lock);
	n_readers++;
	pthread_mutex_unlock(&count_lock);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&tid, &attr, reader_main, r) != 0) {
		log_error("cannot start a subscription reader thread");
		abort();
	}
	pthread_attr_destroy(&attr);
	return r;
}

void reader_wake(struct reader *r)
{
	pthread_mutex_lock(&r->lock);
	r->woken = true;
	pthread_cond_signal(&r->cond);
	pthread_mutex_unlock(&r->lock);
}

void reader_stop(struct reader *r)
{
	pthread_mutex_lock(&r->lock);
	r->stop = true;
	pthread_cond_signal(&r->cond);
	pthread_mutex_unlock(&r->lock);
}

void consumer_shutdown(void)
{
	pthread_mutex_lock(&count_lock);
	while (n_readers > 0)
		pthread_cond_wait(&count_cond, &count_lock);
	pthread_mutex_unlock(&count_lock);
	free(bootstrap);
	bootstrap = NULL;
}
