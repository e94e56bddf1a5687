/* kbridge-group-member: a consumer group member of the consumer module, driven directly
 * against the mock cluster (run by tests/system/group-member.sh). It joins a group
 * through consumer_subscribe with a sink of its own, and checks two things a
 * subscription cannot show from outside:
 *
 * 1. consumer_commit keeps the order in which the sink made its offset lists. A
 *    subscription's sends complete on any completion-queue thread, and each hands in the
 *    offsets sent so far after unlocking: a thread descheduled there hands its list in
 *    after a later one. Kafka keeps the last offsets committed, not the highest, so the
 *    group would go back and its next member would get records again. The race needs a
 *    preemption in a window of a few instructions, so the test makes the late list
 *    itself and reads what the group committed with a second librdkafka handle.
 * 2. Records the member read before Kafka took its partitions away are not delivered
 *    after that: between a revoke and the next assignment the sink gets nothing. Two
 *    ways they came: the member gathers up to FETCH_MAX records per round and the
 *    rebalance callback can run in mid-round; and librdkafka stops the old partitions'
 *    fetchers only once it has handled the unassign, so polls right after the revoke can
 *    still return their records. Both depend on timing: while records keep coming, a
 *    second member joins and leaves, twice (4 revokes). Without the fix this check
 *    failed in 1 of 5 runs on the development machine (417 records; an earlier version
 *    of it, in 1 of 3 with 64); with it, nothing reaches the sink in that window.
 * 3. A partition the member had before restarts after what it was sent, as the sink
 *    says, but not before what the group committed since: another member delivered
 *    that. The sink claims old positions; the first records after the rebalance must
 *    come from the committed offsets.
 *
 * Usage: kbridge-group-member BROKERS TOPIC (a topic with 2 partitions or more). */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <librdkafka/rdkafka.h>

#include "conf.h"
#include "consumer.h"
#include "log.h"
#include "unit/tap.h"

#define GROUP "kb-group-member"

static const char *brokers;
static char *topic;

/* What the sink saw, under lock. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int started, stopped; /* 0 or 1 */
static grpc_status_code start_code = GRPC_STATUS_OK;
static int assigns, revokes;
static bool revoked;           /* a revoke came and no assignment since */
static long delivered, late;   /* records delivered; of them, between a revoke and an assign */
static uint64_t lists;         /* the sink's offset lists so far: revokes count too */
static bool claim;             /* on assign, the sink says it sent up to claimed[] */
static int64_t claimed[2];
static int64_t first[2];       /* the first offset delivered since the last assign, or -1 */

static void sleep_ms(long ms)
{
	nanosleep(&(struct timespec){.tv_sec = ms / 1000, .tv_nsec = ms % 1000 * 1000000}, NULL);
}

/* Waits up to 30 s until *v >= want. */
static bool wait_for(const int *v, int want)
{
	struct timespec until;
	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += 30;
	pthread_mutex_lock(&lock);
	while (*v < want && pthread_cond_timedwait(&cond, &lock, &until) == 0)
		;
	bool r = *v >= want;
	pthread_mutex_unlock(&lock);
	return r;
}

static void on_started(void *arg, grpc_status_code code, const char *msg, const struct start_info *info)
{
	(void)arg, (void)info;
	if (code != GRPC_STATUS_OK)
		fprintf(stderr, "the subscription did not start: %s\n", msg);
	pthread_mutex_lock(&lock);
	start_code = code;
	started = 1;
	pthread_cond_broadcast(&cond);
	pthread_mutex_unlock(&lock);
}

static size_t on_deliver(void *arg, struct rec **recs, size_t n)
{
	(void)arg;
	pthread_mutex_lock(&lock);
	delivered += n;
	if (revoked)
		late += n;
	for (size_t i = 0; i < n; i++)
		if (recs[i]->partition >= 0 && recs[i]->partition < 2 && first[recs[i]->partition] < 0)
			first[recs[i]->partition] = recs[i]->offset;
	pthread_cond_broadcast(&cond);
	pthread_mutex_unlock(&lock);
	for (size_t i = 0; i < n; i++)
		rec_release(recs[i]);
	return n;
}

static void on_failed(void *arg, grpc_status_code code, const char *msg)
{
	(void)arg, (void)code;
	fprintf(stderr, "the subscription failed: %s\n", msg);
}

static uint64_t on_revoke(void *arg, rd_kafka_topic_partition_list_t *parts)
{
	(void)arg;
	for (int i = 0; i < parts->cnt; i++)
		parts->elems[i].offset = RD_KAFKA_OFFSET_INVALID; /* commit nothing */
	pthread_mutex_lock(&lock);
	revokes++;
	revoked = true;
	uint64_t no = ++lists;
	pthread_cond_broadcast(&cond);
	pthread_mutex_unlock(&lock);
	return no;
}

static void on_assign(void *arg, rd_kafka_topic_partition_list_t *parts)
{
	(void)arg;
	pthread_mutex_lock(&lock);
	assigns++;
	revoked = false;
	first[0] = first[1] = -1;
	for (int i = 0; claim && i < parts->cnt; i++)
		if (parts->elems[i].partition >= 0 && parts->elems[i].partition < 2)
			parts->elems[i].offset = claimed[parts->elems[i].partition];
	pthread_cond_broadcast(&cond);
	pthread_mutex_unlock(&lock);
}

static void on_stopped(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&lock);
	stopped = 1;
	pthread_cond_broadcast(&cond);
	pthread_mutex_unlock(&lock);
}

static const struct reader_sink sink = {on_started, on_deliver, on_failed, on_revoke, on_assign, on_stopped};

static rd_kafka_t *client(rd_kafka_type_t type, const char *group)
{
	char errmsg[512];
	rd_kafka_conf_t *kc = rd_kafka_conf_new();
	if (rd_kafka_conf_set(kc, "bootstrap.servers", brokers, errmsg, sizeof(errmsg)) != RD_KAFKA_CONF_OK ||
	    (group && rd_kafka_conf_set(kc, "group.id", group, errmsg, sizeof(errmsg)) != RD_KAFKA_CONF_OK) ||
	    (group && rd_kafka_conf_set(kc, "session.timeout.ms", "3000", errmsg, sizeof(errmsg)) != RD_KAFKA_CONF_OK) ||
	    (group && rd_kafka_conf_set(kc, "enable.auto.commit", "false", errmsg, sizeof(errmsg)) != RD_KAFKA_CONF_OK)) {
		fprintf(stderr, "%s\n", errmsg);
		exit(2);
	}
	rd_kafka_t *rk = rd_kafka_new(type, kc, errmsg, sizeof(errmsg));
	if (!rk) {
		fprintf(stderr, "%s\n", errmsg);
		exit(2);
	}
	return rk;
}

/* Commits topic[partition] = offset as the sink's next list, or as list no if no > 0. */
static void commit(struct csub *cs, int32_t partition, int64_t offset, uint64_t no)
{
	rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
	rd_kafka_topic_partition_list_add(l, topic, partition)->offset = offset;
	if (!no) {
		pthread_mutex_lock(&lock);
		no = ++lists;
		pthread_mutex_unlock(&lock);
	}
	consumer_commit(cs, l, no);
	rd_kafka_topic_partition_list_destroy(l);
}

/* The group's committed offset of topic[partition] once it equals want (up to 30 s), or
 * the last one read. */
static int64_t committed(rd_kafka_t *rk, int32_t partition, int64_t want)
{
	int64_t got = RD_KAFKA_OFFSET_INVALID;
	for (int i = 0; i < 300 && got != want; i++) {
		rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
		rd_kafka_topic_partition_list_add(l, topic, partition);
		if (rd_kafka_committed(rk, l, 5000) == RD_KAFKA_RESP_ERR_NO_ERROR && !l->elems[0].err)
			got = l->elems[0].offset;
		rd_kafka_topic_partition_list_destroy(l);
		if (got != want)
			sleep_ms(100);
	}
	return got;
}

/* Keeps records coming, about 100,000/s to 2 partitions, until told to stop: the member
 * is gathering a good part of the time, and a rebalance can find it in mid-round. */
static atomic_bool producing = true;

static void *produce_main(void *arg)
{
	rd_kafka_t *rk = arg;
	for (long i = 0; atomic_load(&producing); i++) {
		char v[32];
		int len = snprintf(v, sizeof(v), "r%ld", i);
		while (rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_PARTITION((int32_t)(i % 2)),
					 RD_KAFKA_V_VALUE(v, (size_t)len), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
					 RD_KAFKA_V_END) == RD_KAFKA_RESP_ERR__QUEUE_FULL)
			rd_kafka_poll(rk, 10);
		rd_kafka_poll(rk, 0);
		if (i % 100 == 99)
			sleep_ms(1);
	}
	rd_kafka_flush(rk, 30000);
	return NULL;
}

/* A second member: joins, reads (and drops) until told to leave. */
static atomic_bool second_on;

static void *second_main(void *arg)
{
	rd_kafka_t *rk = arg;
	rd_kafka_poll_set_consumer(rk);
	rd_kafka_topic_partition_list_t *t = rd_kafka_topic_partition_list_new(1);
	rd_kafka_topic_partition_list_add(t, topic, RD_KAFKA_PARTITION_UA);
	rd_kafka_subscribe(rk, t);
	rd_kafka_topic_partition_list_destroy(t);
	while (atomic_load(&second_on)) {
		rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 100);
		if (m)
			rd_kafka_message_destroy(m);
	}
	rd_kafka_consumer_close(rk);
	return NULL;
}

/* A second member joins (a rebalance), then leaves as soon as the first has partitions
 * again (another): the first's assignments go from n to n + 2. */
static void join_and_leave(int n)
{
	pthread_t st;
	rd_kafka_t *second = client(RD_KAFKA_CONSUMER, GROUP);
	atomic_store(&second_on, true);
	pthread_create(&st, NULL, second_main, second);
	ok(wait_for(&assigns, n + 1), "a second member joined: the first has partitions again");
	atomic_store(&second_on, false);
	pthread_join(st, NULL);
	rd_kafka_destroy(second);
	ok(wait_for(&assigns, n + 2), "the second member left: the first has partitions again");
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: kbridge-group-member BROKERS TOPIC\n");
		return 2;
	}
	brokers = argv[1];
	topic = argv[2];
	log_init("kbridge-group-member");

	struct conf c;
	conf_defaults(&c);
	/* Quick rebalances: the mock waits a little less than session.timeout.ms for members. */
	c.kafka_props = calloc(2, sizeof(*c.kafka_props));
	c.kafka_props[0] = (struct conf_prop){strdup("session.timeout.ms"), strdup("3000")};
	c.kafka_props[1] = (struct conf_prop){strdup("heartbeat.interval.ms"), strdup("100")};
	c.n_kafka_props = 2;
	consumer_init(&c, brokers);

	Kbridge__V1__SubscribeRequest req = KBRIDGE__V1__SUBSCRIBE_REQUEST__INIT;
	req.n_topics = 1;
	req.topics = &topic;
	req.group = GROUP;
	req.start = KBRIDGE__V1__SUBSCRIBE_REQUEST__START__LATEST;
	struct csub *cs = consumer_subscribe(&req, &sink, NULL);
	ok(wait_for(&started, 1) && start_code == GRPC_STATUS_OK, "the group member started");
	ok(wait_for(&assigns, 1), "Kafka assigned it partitions");

	/* 1. The commit order. */
	rd_kafka_t *reader = client(RD_KAFKA_CONSUMER, GROUP); /* never joins: reads offsets */
	commit(cs, 0, 20, 0);
	ok(committed(reader, 0, 20) == 20, "list 1 (partition 0 at 20) is committed");
	pthread_mutex_lock(&lock);
	uint64_t list2 = ++lists; /* made now, handed in after list 3 */
	pthread_mutex_unlock(&lock);
	commit(cs, 0, 30, 0);
	ok(committed(reader, 0, 30) == 30, "list 3 (partition 0 at 30) is committed");
	commit(cs, 0, 25, list2);
	commit(cs, 1, 7, 0); /* list 4: once it is in, list 2 was handled */
	ok(committed(reader, 1, 7) == 7, "list 4 (partition 1 at 7) is committed");
	int64_t p0 = committed(reader, 0, 30);
	ok(p0 == 30, "list 2, handed in after list 3, was skipped: partition 0 at %" PRId64 " (want 30)", p0);

	/* 2. Nothing read before a revoke is delivered after it. */
	rd_kafka_t *producer = client(RD_KAFKA_PRODUCER, NULL);
	pthread_t pt;
	pthread_create(&pt, NULL, produce_main, producer);
	long before = 0;
	for (int i = 0; i < 300 && before < 1000; i++) {
		sleep_ms(100);
		pthread_mutex_lock(&lock);
		before = delivered;
		pthread_mutex_unlock(&lock);
	}
	ok(before >= 1000, "records flow to the member (%ld)", before);
	join_and_leave(1);
	join_and_leave(3);
	atomic_store(&producing, false);
	pthread_join(pt, NULL);
	rd_kafka_destroy(producer);
	pthread_mutex_lock(&lock);
	ok(revokes >= 4 && late == 0,
	   "%d revokes; records delivered between a revoke and the next assignment: %ld (of %ld)", revokes,
	   late, delivered);
	pthread_mutex_unlock(&lock);

	/* 3. Not before what the group committed. The mock keeps a bounded log: the offsets
	 * are taken near each partition's end. */
	int64_t lo, hi[2] = {-1, -1}, want[2];
	for (int p = 0; p < 2; p++)
		if (rd_kafka_query_watermark_offsets(reader, topic, p, &lo, &hi[p], 5000))
			hi[p] = -1;
	ok(hi[0] >= 5000 && hi[1] >= 5000, "the partitions hold records (ends at %" PRId64 " and %" PRId64 ")",
	   hi[0], hi[1]);
	want[0] = hi[0] - 1000;
	want[1] = hi[1] - 2000;
	commit(cs, 0, want[0], 0);
	commit(cs, 1, want[1], 0);
	ok(committed(reader, 0, want[0]) == want[0] && committed(reader, 1, want[1]) == want[1],
	   "the group committed partition 0 at %" PRId64 ", partition 1 at %" PRId64, want[0], want[1]);
	pthread_mutex_lock(&lock);
	claim = true; /* "I sent up to here before" */
	claimed[0] = want[0] - 3000;
	claimed[1] = want[1] - 2000;
	pthread_mutex_unlock(&lock);
	join_and_leave(5);
	int64_t f0 = -1, f1 = -1;
	for (int i = 0; i < 300 && (f0 < 0 || f1 < 0); i++) {
		pthread_mutex_lock(&lock);
		f0 = first[0], f1 = first[1];
		pthread_mutex_unlock(&lock);
		if (f0 < 0 || f1 < 0)
			sleep_ms(100);
	}
	ok(f0 >= want[0] && f1 >= want[1],
	   "claimed %" PRId64 " and %" PRId64 ", the group has %" PRId64 " and %" PRId64
	   ": the first records came from %" PRId64 " and %" PRId64 " (not before the group's)",
	   claimed[0], claimed[1], want[0], want[1], f0, f1);
	rd_kafka_destroy(reader);

	consumer_unsubscribe(cs);
	ok(wait_for(&stopped, 1), "the subscription stopped");
	consumer_shutdown();
	conf_free(&c);
	return tap_done();
}
