/* consumer: shared readers per topic, catch-up readers, and the setup pool.
 *
 * Threads and locks (see consumer.h for the order): readers_lock guards `readers`;
 * tr->lock guards a shared reader's subscriber list, next offsets and idle time;
 * cs->lock guards a subscription's stop/woken flags, its `live` count and each tsub's
 * `tr` pointer. A tsub's wanted offsets (w) belong to whoever serves it: the setup
 * thread, then its catch-up thread or (under tr->lock) its shared reader.
 * setup_lock guards the setup queue; count_lock the number of live subscriptions and
 * shared readers (consumer_shutdown waits on it). */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <librdkafka/rdkafka.h>

#include "consumer.h"
#include "log.h"
#include "util.h"

#define FETCH_MAX 512
#define SETUP_THREADS 4
#define KAFKA_TIMEOUT_MS 10000
/* A shared reader nobody uses stops after this long (joins often come in waves). */
#define SHARED_IDLE_MS 10000

struct treader;

struct tsub { /* one subscription's interest in one topic */
	struct csub *cs;
	char *topic;
	int n_parts;
	int64_t *w;            /* next offset wanted, per partition */
	struct treader *tr;    /* the shared reader serving it, or NULL */
	struct tsub *tr_next;  /* in tr->subs */
};

struct csub {
	const struct reader_sink *sink;
	void *arg;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool stop, woken;
	int live; /* the owner's + setup + shared attachments + catch-up threads */
	int start;
	int64_t start_ts;
	char *group;          /* consumer group, or NULL */
	rd_kafka_t *group_rk; /* the group member while it reads (guarded by lock) */
	uint64_t commit_seq;  /* the sink's last list handed to Kafka (guarded by lock) */
	unsigned revokes;     /* partitions taken away so far (the group thread's own) */
	bool unassigned;      /* revoked, not yet given partitions again (the group thread's own) */
	size_t n_positions;
	struct {
		char *topic;
		int32_t partition;
		int64_t offset;
	} *positions;
	size_t n_tsubs;
	struct tsub *tsubs;
	struct csub *setup_next;
};

struct treader { /* the shared read of one topic */
	pthread_mutex_t lock;
	char *topic;
	int n_parts;
	int64_t *next; /* next offset to deliver, per partition */
	struct tsub *subs;
	int n_subs;
	int64_t idle_since;
	bool stop, dead;
	rd_kafka_t *rk;
	struct treader *list_next;
};

static const struct conf *conf;
static char *bootstrap;
static rd_kafka_t *admin; /* metadata and offsets queries; created by the first setup */
static pthread_mutex_t admin_lock = PTHREAD_MUTEX_INITIALIZER;

static pthread_mutex_t readers_lock = PTHREAD_MUTEX_INITIALIZER;
static struct treader *readers;

static pthread_mutex_t setup_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t setup_cond = PTHREAD_COND_INITIALIZER;
static struct csub *setup_head, *setup_tail;
static bool setup_stop;
static pthread_t setup_threads[SETUP_THREADS];

static pthread_mutex_t count_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t count_cond = PTHREAD_COND_INITIALIZER;
static int n_csubs, n_readers;

static void private_start(struct tsub *ts);

/* --- records --- */

static struct rec *rec_from(const rd_kafka_message_t *m)
{
	const char *topic = rd_kafka_topic_name(m->rkt);
	size_t tlen = strlen(topic) + 1;
	rd_kafka_headers_t *h = NULL;
	rd_kafka_timestamp_type_t tstype;
	struct record_fields f = {
		.topic = topic,
		.partition = m->partition,
		.offset = m->offset,
		.timestamp_ms = rd_kafka_message_timestamp(m, &tstype),
		.key = m->key,
		.key_len = m->key_len,
		.value = m->payload,
		.value_len = m->len,
	};
	enum { STACK_HEADERS = 16 };
	const char *keys_stack[STACK_HEADERS];
	const void *values_stack[STACK_HEADERS];
	size_t lens_stack[STACK_HEADERS];
	const char **keys = keys_stack;
	const void **values = values_stack;
	size_t *lens = lens_stack, data_len = m->key_len + m->len;

	if (rd_kafka_message_headers(m, &h) == RD_KAFKA_RESP_ERR_NO_ERROR) {
		size_t n = rd_kafka_header_cnt(h);
		if (n > STACK_HEADERS) {
			keys = xcalloc(n, sizeof(*keys));
			values = xcalloc(n, sizeof(*values));
			lens = xcalloc(n, sizeof(*lens));
		}
		for (size_t i = 0; i < n; i++) {
			size_t k = f.n_headers;
			if (rd_kafka_header_get_all(h, i, &keys[k], &values[k], &lens[k]) != RD_KAFKA_RESP_ERR_NO_ERROR)
				break;
			if (!values[k])
				lens[k] = 0;
			data_len += strlen(keys[k]) + lens[k];
			f.n_headers++;
		}
	}
	f.header_keys = keys;
	f.header_values = values;
	f.header_lens = lens;

	/* One allocation holds the record and its topic; the encoding is a slice. */
	struct rec *r = xmalloc(sizeof(*r) + tlen);
	atomic_init(&r->refs, 1);
	r->topic = memcpy(r + 1, topic, tlen);
	r->partition = m->partition;
	r->offset = m->offset;
	r->data_len = data_len;
	r->enc = codec_encode_subscribe_record(&f);
	r->size = sizeof(*r) + tlen + GRPC_SLICE_LENGTH(r->enc);
	if (keys != keys_stack) {
		free(keys);
		free(values);
		free(lens);
	}
	return r;
}

void rec_release(struct rec *r)
{
	if (atomic_fetch_sub(&r->refs, 1) == 1) {
		grpc_slice_unref(r->enc);
		free(r);
	}
}

/* Fetches up to FETCH_MAX records from q, as recs (errors are logged and skipped): waits up
 * to timeout_ms for the first, then takes what is already there. A position Kafka no
 * longer has (retention deleted it under a reader) is described in gone, if given. (A batch consume alone
 * waits for a full batch or the timeout: latency for nothing.) */
static size_t fetch(rd_kafka_queue_t *q, int timeout_ms, struct rec **out, const char *who, char *gone,
		    size_t gonesize)
{
	rd_kafka_message_t *msgs[FETCH_MAX];
	ssize_t n = 0;
	size_t k = 0;

	msgs[0] = rd_kafka_consume_queue(q, timeout_ms);
	if (msgs[0]) {
		n = rd_kafka_consume_batch_queue(q, 0, msgs + 1, FETCH_MAX - 1);
		n = n < 0 ? 1 : n + 1;
	}

	for (ssize_t i = 0; i < n; i++) {
		if (msgs[i]->err == RD_KAFKA_RESP_ERR__AUTO_OFFSET_RESET && gone && !gone[0])
			snprintf(gone, gonesize, "%s [%" PRId32 "]: %s",
				 msgs[i]->rkt ? rd_kafka_topic_name(msgs[i]->rkt) : "-", msgs[i]->partition,
				 rd_kafka_message_errstr(msgs[i]));
		else if (msgs[i]->err)
			log_warn("%s: %s [%" PRId32 "]: %s", who,
				 msgs[i]->rkt ? rd_kafka_topic_name(msgs[i]->rkt) : "-", msgs[i]->partition,
				 rd_kafka_message_errstr(msgs[i]));
		else
			out[k++] = rec_from(msgs[i]);
		rd_kafka_message_destroy(msgs[i]);
	}
	return k;
}

/* --- librdkafka handles --- */

static void rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err, rd_kafka_topic_partition_list_t *parts,
			 void *opaque);

/* A librdkafka consumer. group_id: NULL for the admin handle (queries only),
 * "kbridged-reader" for readers that use assign() (it needs a group id; no group is
 * joined or committed to), or a subscription's group, whose member is given as member
 * (for the rebalance callback). reset: where a partition without a valid offset starts. */
static rd_kafka_t *new_consumer(const char *group_id, const char *reset, struct csub *member,
				char *errmsg, size_t errsize)
{
	rd_kafka_conf_t *kc = rd_kafka_conf_new();
	const char *const fixed[][2] = {
		{"bootstrap.servers", bootstrap},
		{"client.id", "kbridged"},
		{"enable.auto.commit", "false"},
		{"enable.auto.offset.store", "false"},
		{"enable.partition.eof", "false"},
		{"allow.auto.create.topics", "false"},
		/* A bounded prefetch per reader: memory grows with readers, not with lag. */
		{"queued.max.messages.kbytes", "2048"},
		/* Tailing is about latency: the broker answers a fetch within this even when it
		 * has less than fetch.min.bytes. kafka.properties may override it. */
		{"fetch.wait.max.ms", "20"},
		{"auto.offset.reset", reset},
		{"group.id", group_id}, /* last: absent when NULL */
	};

	for (size_t i = 0; i < ARRAY_SIZE(fixed) - !group_id; i++)
		if (rd_kafka_conf_set(kc, fixed[i][0], fixed[i][1], errmsg, errsize) != RD_KAFKA_CONF_OK)
			goto fail;
	for (size_t i = 0; i < conf->n_kafka_props; i++)
		if (rd_kafka_conf_set(kc, conf->kafka_props[i].name, conf->kafka_props[i].value, errmsg,
				      errsize) != RD_KAFKA_CONF_OK)
			goto fail;
	/* kafka.properties serves producer and consumers alike: the consumers' warnings
	 * that a producer property is ignored would repeat for every reader. */
	rd_kafka_conf_set_log_cb(kc, log_rdkafka_quiet);
	if (member) {
		rd_kafka_conf_set_rebalance_cb(kc, rebalance_cb);
		rd_kafka_conf_set_opaque(kc, member);
	}
	rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, kc, errmsg, errsize);
	if (rk) {
		if (member)
			rd_kafka_poll_set_consumer(rk);
		return rk;
	}
fail:
	rd_kafka_conf_destroy(kc);
	return NULL;
}

/* A consumer reading topic's n_parts partitions from offsets[]; NULL with errmsg. reset:
 * what to do when an offset is gone (librdkafka's auto.offset.reset). */
static rd_kafka_t *open_reader(const char *topic, int n_parts, const int64_t *offsets, const char *reset,
			       char *errmsg, size_t errsize)
{
	rd_kafka_t *rk = new_consumer("kbridged-reader", reset, NULL, errmsg, errsize);
	if (!rk)
		return NULL;
	rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(n_parts);
	for (int p = 0; p < n_parts; p++)
		rd_kafka_topic_partition_list_add(list, topic, p)->offset = offsets[p];
	rd_kafka_resp_err_t err = rd_kafka_assign(rk, list);
	rd_kafka_topic_partition_list_destroy(list);
	if (err) {
		snprintf(errmsg, errsize, "cannot start reading %s: %s", topic, rd_kafka_err2str(err));
		rd_kafka_destroy(rk);
		return NULL;
	}
	return rk;
}

static void close_reader(rd_kafka_t *rk)
{
	rd_kafka_assign(rk, NULL);
	rd_kafka_consumer_close(rk);
	rd_kafka_destroy(rk);
}

/* --- subscriptions --- */

static void cs_free(struct csub *cs)
{
	for (size_t i = 0; i < cs->n_tsubs; i++) {
		free(cs->tsubs[i].topic);
		free(cs->tsubs[i].w);
	}
	free(cs->tsubs);
	for (size_t i = 0; i < cs->n_positions; i++)
		free(cs->positions[i].topic);
	free(cs->positions);
	free(cs->group);
	pthread_mutex_destroy(&cs->lock);
	pthread_cond_destroy(&cs->cond);
	free(cs);
}

/* Drops one of the subscription's live references; the last one ends it. */
static void cs_unref(struct csub *cs)
{
	pthread_mutex_lock(&cs->lock);
	bool last = --cs->live == 0;
	pthread_mutex_unlock(&cs->lock);
	if (!last)
		return;
	cs->sink->stopped(cs->arg);
	cs_free(cs);
	pthread_mutex_lock(&count_lock);
	n_csubs--;
	pthread_cond_broadcast(&count_cond);
	pthread_mutex_unlock(&count_lock);
}

static bool cs_stopping(struct csub *cs)
{
	pthread_mutex_lock(&cs->lock);
	bool s = cs->stop;
	pthread_mutex_unlock(&cs->lock);
	return s;
}

/* --- shared readers --- */

static void *shared_main(void *arg);

/* Under readers_lock. */
static struct treader *shared_find(const char *topic)
{
	for (struct treader *tr = readers; tr; tr = tr->list_next)
		if (!tr->dead && strcmp(tr->topic, topic) == 0)
			return tr;
	return NULL;
}

/* Starts a shared reader for topic at offsets[]. Under readers_lock. NULL on failure. */
static struct treader *shared_new(const char *topic, int n_parts, const int64_t *offsets)
{
	char errmsg[512];
	/* Never "earliest": a shared read that lost its place (retention deleted records
	 * before it read them, or the topic was truncated) must not jump to the earliest
	 * record without a word. It ends its subscribers with DATA_LOSS instead. */
	rd_kafka_t *rk = open_reader(topic, n_parts, offsets, "error", errmsg, sizeof(errmsg));
	pthread_attr_t attr;
	pthread_t tid;

	if (!rk) {
		log_warn("cannot start a shared reader for %s: %s", topic, errmsg);
		return NULL;
	}
	struct treader *tr = xcalloc(1, sizeof(*tr));
	pthread_mutex_init(&tr->lock, NULL);
	tr->topic = xstrdup(topic);
	tr->n_parts = n_parts;
	tr->next = xmalloc(n_parts * sizeof(*tr->next));
	memcpy(tr->next, offsets, n_parts * sizeof(*tr->next));
	tr->rk = rk;
	tr->idle_since = now_ms();
	tr->list_next = readers;
	readers = tr;
	pthread_mutex_lock(&count_lock);
	n_readers++;
	pthread_mutex_unlock(&count_lock);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&tid, &attr, shared_main, tr) != 0) {
		log_error("cannot start a shared reader thread");
		abort();
	}
	pthread_attr_destroy(&attr);
	log_info("shared reader for %s started (%d partitions)", topic, n_parts);
	return tr;
}

/* Attaches ts to tr if tr has delivered nothing ts still wants: tr->next <= ts->w on
 * every partition (tr skips what is below ts->w). Under readers_lock and tr->lock. */
static bool shared_join(struct treader *tr, struct tsub *ts)
{
	if (tr->stop || tr->dead || tr->n_parts != ts->n_parts)
		return false;
	for (int p = 0; p < ts->n_parts; p++)
		if (tr->next[p] > ts->w[p])
			return false;
	pthread_mutex_lock(&ts->cs->lock);
	bool ok = !ts->cs->stop;
	if (ok)
		ts->tr = tr;
	pthread_mutex_unlock(&ts->cs->lock);
	if (!ok)
		return false;
	ts->tr_next = tr->subs;
	tr->subs = ts;
	tr->n_subs++;
	tr->idle_since = 0;
	return true;
}

/* Hands ts to its topic's shared reader when it can take it; create: start one at ts's
 * offsets when there is none. True when ts is now served by a shared reader. */
static bool try_share(struct tsub *ts, bool create)
{
	bool joined = false;

	pthread_mutex_lock(&readers_lock);
	struct treader *tr = shared_find(ts->topic);
	if (!tr && create)
		tr = shared_new(ts->topic, ts->n_parts, ts->w);
	if (tr) {
		pthread_mutex_lock(&tr->lock);
		joined = shared_join(tr, ts);
		pthread_mutex_unlock(&tr->lock);
	}
	pthread_mutex_unlock(&readers_lock);
	return joined;
}

/* Fans recs (in fetch order) out to tr's subscribers. A subscriber that takes fewer than
 * it was offered is moved to a catch-up reader, so that it slows nobody else. Under
 * tr->lock. */
static void fan_out(struct treader *tr, struct rec **recs, size_t n)
{
	struct rec *mine[FETCH_MAX];
	struct tsub **link = &tr->subs;

	while (*link) {
		struct tsub *ts = *link;
		size_t k = 0;
		for (size_t i = 0; i < n; i++)
			if (recs[i]->offset >= ts->w[recs[i]->partition]) {
				atomic_fetch_add(&recs[i]->refs, 1);
				mine[k++] = recs[i];
			}
		size_t took = k ? ts->cs->sink->deliver(ts->cs->arg, mine, k) : 0;
		for (size_t i = 0; i < took; i++)
			ts->w[mine[i]->partition] = mine[i]->offset + 1;
		for (size_t i = took; i < k; i++)
			rec_release(mine[i]);
		if (took == k) {
			link = &ts->tr_next;
			continue;
		}
		/* Too slow for the shared read: on to its own reader from its position. */
		*link = ts->tr_next;
		tr->n_subs--;
		pthread_mutex_lock(&ts->cs->lock);
		ts->tr = NULL;
		bool stop = ts->cs->stop;
		pthread_mutex_unlock(&ts->cs->lock);
		if (stop) {
			cs_unref(ts->cs);
			continue;
		}
		log_debug("subscriber %p fell behind the shared read of %s: catching up on its own",
			  ts->cs->arg, tr->topic);
		private_start(ts); /* takes over this attachment's live reference */
	}
}

/* tr lost its place in the log (gone describes where): it leaves the list, and its
 * subscribers end with DATA_LOSS and their positions, from which they can resubscribe
 * (kbridge-skipped then says what is gone). */
static void shared_lost(struct treader *tr, const char *gone)
{
	pthread_mutex_lock(&readers_lock);
	pthread_mutex_lock(&tr->lock);
	tr->dead = true;
	for (struct treader **l = &readers; *l; l = &(*l)->list_next)
		if (*l == tr) {
			*l = tr->list_next;
			break;
		}
	struct tsub *subs = tr->subs;
	tr->subs = NULL;
	tr->n_subs = 0;
	for (struct tsub *ts = subs; ts; ts = ts->tr_next) {
		pthread_mutex_lock(&ts->cs->lock);
		ts->tr = NULL;
		pthread_mutex_unlock(&ts->cs->lock);
	}
	pthread_mutex_unlock(&tr->lock);
	pthread_mutex_unlock(&readers_lock);

	log_warn("shared reader for %s: Kafka no longer has the records it was to read next (%s); "
		 "its subscribers end with DATA_LOSS", tr->topic, gone);
	char *msg = xasprintf("Kafka deleted records before kbridged could read them (%s); subscribe "
			      "again from kbridge-positions to go on (kbridge-skipped will say what is "
			      "gone)", gone);
	/* Each attachment holds a live reference: ts and its subscription are valid until
	 * cs_unref. */
	while (subs) {
		struct tsub *ts = subs;
		subs = ts->tr_next;
		ts->cs->sink->failed(ts->cs->arg, GRPC_STATUS_DATA_LOSS, msg);
		cs_unref(ts->cs);
	}
	free(msg);
}

static void *shared_main(void *arg)
{
	struct treader *tr = arg;
	rd_kafka_queue_t *q = rd_kafka_queue_get_consumer(tr->rk);
	struct rec *recs[FETCH_MAX];
	char who[300];

	snprintf(who, sizeof(who), "shared reader %s", tr->topic);
	for (;;) {
		char gone[512] = "";
		size_t n = fetch(q, 100, recs, who, gone, sizeof(gone));
		pthread_mutex_lock(&tr->lock);
		for (size_t i = 0; i < n; i++)
			if (recs[i]->partition >= 0 && recs[i]->partition < tr->n_parts)
				tr->next[recs[i]->partition] = recs[i]->offset + 1;
		fan_out(tr, recs, n);
		if (tr->n_subs > 0)
			tr->idle_since = 0;
		else if (!tr->idle_since)
			tr->idle_since = now_ms();
		bool idle = tr->n_subs == 0 && (tr->stop || now_ms() - tr->idle_since > SHARED_IDLE_MS);
		pthread_mutex_unlock(&tr->lock);
		for (size_t i = 0; i < n; i++)
			rec_release(recs[i]);
		if (gone[0]) {
			shared_lost(tr, gone);
			break;
		}
		if (!idle)
			continue;
		/* Leave the list unless someone joined meanwhile (joins hold readers_lock). */
		pthread_mutex_lock(&readers_lock);
		pthread_mutex_lock(&tr->lock);
		bool leave = tr->n_subs == 0;
		if (leave) {
			tr->dead = true;
			for (struct treader **l = &readers; *l; l = &(*l)->list_next)
				if (*l == tr) {
					*l = tr->list_next;
					break;
				}
		}
		pthread_mutex_unlock(&tr->lock);
		pthread_mutex_unlock(&readers_lock);
		if (leave)
			break;
	}
	rd_kafka_queue_destroy(q);
	close_reader(tr->rk);
	log_info("shared reader for %s stopped", tr->topic);
	free(tr->topic);
	free(tr->next);
	pthread_mutex_destroy(&tr->lock);
	free(tr);
	pthread_mutex_lock(&count_lock);
	n_readers--;
	pthread_cond_broadcast(&count_cond);
	pthread_mutex_unlock(&count_lock);
	return NULL;
}

/* --- catch-up readers --- */

/* Waits until the subscriber has room (consumer_wake) or stops; true to go on. */
static bool wait_for_room(struct csub *cs)
{
	pthread_mutex_lock(&cs->lock);
	while (!cs->woken && !cs->stop)
		pthread_cond_wait(&cs->cond, &cs->lock);
	cs->woken = false;
	bool go_on = !cs->stop;
	pthread_mutex_unlock(&cs->lock);
	return go_on;
}

/* True when ts's wanted offsets are at the end of the log, as far as rk's last fetch
 * responses tell. Fetching nothing for a while is no proof of that: a fetch can be slow
 * or backed off, and a shared read started behind the end would be wrong twice (a
 * shared read far behind, and one that retention can overtake). */
static bool at_end(rd_kafka_t *rk, const struct tsub *ts)
{
	for (int p = 0; p < ts->n_parts; p++) {
		int64_t lo = -1, hi = -1;
		if (rd_kafka_get_watermark_offsets(rk, ts->topic, p, &lo, &hi) != RD_KAFKA_RESP_ERR_NO_ERROR ||
		    hi < 0 || ts->w[p] < hi)
			return false;
	}
	return true;
}

static void *private_main(void *arg)
{
	struct tsub *ts = arg;
	struct csub *cs = ts->cs;
	struct rec *recs[FETCH_MAX];
	char errmsg[512], who[300];
	bool shared = false;

	snprintf(who, sizeof(who), "catch-up reader %s", ts->topic);
	/* A catch-up reader may be far behind: when retention deletes records under it,
	 * the subscription ends (DATA_LOSS, with its positions) instead of jumping over them;
	 * resubscribing from those positions reports the gap in kbridge-skipped. */
	rd_kafka_t *rk = open_reader(ts->topic, ts->n_parts, ts->w, "error", errmsg, sizeof(errmsg));
	if (!rk) {
		log_error("%s: %s", who, errmsg);
		cs->sink->failed(cs->arg, GRPC_STATUS_UNAVAILABLE, errmsg);
		cs_unref(cs);
		return NULL;
	}
	rd_kafka_queue_t *q = rd_kafka_queue_get_consumer(rk);
	while (!shared && !cs_stopping(cs)) {
		char gone[512] = "";
		size_t n = fetch(q, 200, recs, who, gone, sizeof(gone)), k = 0;
		for (size_t i = 0; i < n; i++) {
			if (recs[i]->partition >= 0 && recs[i]->partition < ts->n_parts &&
			    recs[i]->offset >= ts->w[recs[i]->partition])
				recs[k++] = recs[i];
			else
				rec_release(recs[i]);
		}
		/* The sink takes a reference of each record it takes; ours is dropped once
		 * the record's position is noted. */
		for (size_t i = 0; i < k; i++)
			atomic_fetch_add(&recs[i]->refs, 1);
		size_t done = 0;
		while (done < k) {
			size_t took = cs->sink->deliver(cs->arg, recs + done, k - done);
			for (size_t i = done; i < done + took; i++)
				ts->w[recs[i]->partition] = recs[i]->offset + 1;
			done += took;
			if (done < k && !wait_for_room(cs))
				break;
		}
		for (size_t i = done; i < k; i++)
			rec_release(recs[i]); /* the reference offered and not taken */
		for (size_t i = 0; i < k; i++)
			rec_release(recs[i]);
		if (gone[0]) {
			char *msg = xasprintf("Kafka deleted records before this subscriber could read "
					      "them (%s); subscribe again from kbridge-positions to go on "
					      "(kbridge-skipped will say what is gone)", gone);
			cs->sink->failed(cs->arg, GRPC_STATUS_DATA_LOSS, msg);
			free(msg);
			break;
		}
		/* Caught up with the shared read? Start one if there is none and this
		 * reader is at the end of the log. */
		shared = try_share(ts, n == 0 && at_end(rk, ts));
	}
	rd_kafka_queue_destroy(q);
	close_reader(rk);
	/* Once shared, cs and ts belong to the attachment: the subscription may end and be
	 * freed at any moment, so they are not touched again. */
	if (shared)
		log_debug("%s: caught up, handed over to the shared reader", who);
	else
		cs_unref(cs);
	return NULL;
}

static void private_start(struct tsub *ts)
{
	pthread_attr_t attr;
	pthread_t tid;

	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&tid, &attr, private_main, ts) != 0) {
		log_error("cannot start a catch-up reader thread");
		abort();
	}
	pthread_attr_destroy(&attr);
}

/* --- consumer groups --- */

/* Moves each offset of at that is set up to the group's committed offset, if that is
 * further: another member delivered what lies between since this one had the partition. */
static void not_before_committed(rd_kafka_t *rk, struct csub *cs, rd_kafka_topic_partition_list_t *at)
{
	rd_kafka_topic_partition_list_t *q = rd_kafka_topic_partition_list_new(at->cnt);
	for (int i = 0; i < at->cnt; i++)
		if (at->elems[i].offset >= 0)
			rd_kafka_topic_partition_list_add(q, at->elems[i].topic, at->elems[i].partition);
	rd_kafka_resp_err_t err = q->cnt ? rd_kafka_committed(rk, q, KAFKA_TIMEOUT_MS) : RD_KAFKA_RESP_ERR_NO_ERROR;
	if (err)
		log_warn("group %s: reading the committed offsets failed: %s (the partitions this member had "
			 "before restart after what it was sent)", cs->group, rd_kafka_err2str(err));
	for (int i = 0; !err && i < q->cnt; i++) {
		rd_kafka_topic_partition_t *c = &q->elems[i];
		rd_kafka_topic_partition_t *a = rd_kafka_topic_partition_list_find(at, c->topic, c->partition);
		if (a && !c->err && c->offset > a->offset)
			a->offset = c->offset;
	}
	rd_kafka_topic_partition_list_destroy(q);
}

static void rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err, rd_kafka_topic_partition_list_t *parts,
			 void *opaque)
{
	struct csub *cs = opaque;

	if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
		log_debug("group %s member %p: %d partitions assigned", cs->group, cs->arg, parts->cnt);
		/* A partition this stream had before restarts after what it was sent, even if
		 * the commit made when it was taken away did not go through, but not before
		 * what the group committed since. The others start at the committed offset. */
		rd_kafka_topic_partition_list_t *at = rd_kafka_topic_partition_list_copy(parts);
		for (int i = 0; i < at->cnt; i++)
			at->elems[i].offset = RD_KAFKA_OFFSET_INVALID;
		cs->sink->assign(cs->arg, at);
		not_before_committed(rk, cs, at);
		rd_kafka_assign(rk, at);
		cs->unassigned = false;
		rd_kafka_topic_partition_list_destroy(at);
		return;
	}
	/* Revoked (or lost): commit exactly what the client was sent, so that the next
	 * owner starts after it and this stream never sees a record twice. No list the
	 * sink made before this one may be committed after it. */
	cs->revokes++;
	cs->unassigned = true;
	rd_kafka_topic_partition_list_t *offsets = rd_kafka_topic_partition_list_copy(parts);
	uint64_t seq = cs->sink->revoke(cs->arg, offsets);
	pthread_mutex_lock(&cs->lock);
	if (seq > cs->commit_seq)
		cs->commit_seq = seq;
	pthread_mutex_unlock(&cs->lock);
	rd_kafka_topic_partition_list_t *commit = rd_kafka_topic_partition_list_new(offsets->cnt);
	for (int i = 0; i < offsets->cnt; i++)
		if (offsets->elems[i].offset >= 0)
			rd_kafka_topic_partition_list_add(commit, offsets->elems[i].topic,
							  offsets->elems[i].partition)->offset = offsets->elems[i].offset;
	if (commit->cnt && (err = rd_kafka_commit(rk, commit, 0)) != RD_KAFKA_RESP_ERR_NO_ERROR)
		log_warn("group %s: committing before a rebalance failed: %s (records may come again "
			 "to the partitions' next owner)", cs->group, rd_kafka_err2str(err));
	rd_kafka_topic_partition_list_destroy(commit);
	rd_kafka_topic_partition_list_destroy(offsets);
	rd_kafka_assign(rk, NULL);
}

static void *group_main(void *arg)
{
	struct csub *cs = arg;
	struct rec *recs[FETCH_MAX];
	char errmsg[512];

	/* Where a partition with no committed offset starts. */
	const char *reset = cs->start == KBRIDGE__V1__SUBSCRIBE_REQUEST__START__EARLIEST ? "earliest" : "latest";
	rd_kafka_t *rk = new_consumer(cs->group, reset, cs, errmsg, sizeof(errmsg));
	if (!rk) {
		cs->sink->failed(cs->arg, GRPC_STATUS_INTERNAL, errmsg);
		cs_unref(cs);
		return NULL;
	}
	rd_kafka_topic_partition_list_t *topics = rd_kafka_topic_partition_list_new(cs->n_tsubs);
	for (size_t i = 0; i < cs->n_tsubs; i++)
		rd_kafka_topic_partition_list_add(topics, cs->tsubs[i].topic, RD_KAFKA_PARTITION_UA);
	rd_kafka_resp_err_t err = rd_kafka_subscribe(rk, topics);
	rd_kafka_topic_partition_list_destroy(topics);
	if (err) {
		snprintf(errmsg, sizeof(errmsg), "cannot join group %s: %s", cs->group, rd_kafka_err2str(err));
		cs->sink->failed(cs->arg, GRPC_STATUS_UNAVAILABLE, errmsg);
	}
	pthread_mutex_lock(&cs->lock);
	cs->group_rk = rk;
	pthread_mutex_unlock(&cs->lock);

	while (!err && !cs_stopping(cs)) {
		size_t k = 0;
		/* Gather what is there now, one wait at most. */
		for (int timeout = 200; k < FETCH_MAX; timeout = 0) {
			unsigned revokes = cs->revokes;
			rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, timeout);
			/* The poll ran the rebalance callback: what was gathered before it is
			 * of partitions this member no longer has (their next owner starts
			 * after what was sent; if they come back, so does this member). */
			if (revokes != cs->revokes)
				while (k > 0)
					rec_release(recs[--k]);
			if (!m)
				break;
			if (cs->unassigned) {
				/* librdkafka stops the old partitions' fetchers only once it
				 * has handled the unassign, so a few of their records can still
				 * come after the revoke: they are their next owner's. */
			} else if (m->err)
				log_warn("group %s: %s", cs->group, rd_kafka_message_errstr(m));
			else
				recs[k++] = rec_from(m);
			rd_kafka_message_destroy(m);
		}
		size_t done = 0;
		while (done < k) {
			done += cs->sink->deliver(cs->arg, recs + done, k - done);
			if (done < k && !wait_for_room(cs))
				break;
		}
		for (; done < k; done++)
			rec_release(recs[done]);
	}
	pthread_mutex_lock(&cs->lock);
	cs->group_rk = NULL;
	pthread_mutex_unlock(&cs->lock);
	rd_kafka_consumer_close(rk); /* leaves the group: the revoke commits what was sent */
	rd_kafka_destroy(rk);
	cs_unref(cs);
	return NULL;
}

void consumer_commit(struct csub *cs, const rd_kafka_topic_partition_list_t *offsets, uint64_t seq)
{
	pthread_mutex_lock(&cs->lock);
	/* Under the lock, in the sink's order: Kafka keeps the last offsets committed, not
	 * the highest, so an older list committed late would move the group back. */
	if (cs->group_rk && seq > cs->commit_seq) {
		cs->commit_seq = seq;
		rd_kafka_resp_err_t err = rd_kafka_commit(cs->group_rk, offsets, 1);
		if (err)
			log_debug("group %s: commit: %s", cs->group, rd_kafka_err2str(err));
	}
	pthread_mutex_unlock(&cs->lock);
}

/* --- setup: start offsets --- */

static rd_kafka_t *get_admin(char *errmsg, size_t errsize)
{
	pthread_mutex_lock(&admin_lock);
	if (!admin)
		admin = new_consumer(NULL, "earliest", NULL, errmsg, errsize);
	rd_kafka_t *rk = admin;
	pthread_mutex_unlock(&admin_lock);
	return rk;
}

/* Sets ts->n_parts and ts->w from Kafka and the request. Returns OK or the status to end
 * with (msg set). Appends skipped ranges to *skipped. */
static grpc_status_code resolve_topic(struct csub *cs, struct tsub *ts, rd_kafka_t *rk, char **skipped,
				      char *msg, size_t msgsize)
{
	rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, ts->topic, NULL);
	const struct rd_kafka_metadata *md = NULL;
	rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 0, rkt, &md, KAFKA_TIMEOUT_MS);
	rd_kafka_topic_destroy(rkt);

	if (!err && md->topic_cnt == 1)
		err = md->topics[0].err;
	if (err == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART || err == RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC ||
	    (!err && md->topics[0].partition_cnt == 0)) {
		snprintf(msg, msgsize, "topic \"%s\" does not exist in Kafka", ts->topic);
		if (md)
			rd_kafka_metadata_destroy(md);
		return GRPC_STATUS_NOT_FOUND;
	}
	if (err) {
		snprintf(msg, msgsize, "cannot read the metadata of topic \"%s\" from Kafka: %s", ts->topic,
			 rd_kafka_err2str(err));
		if (md)
			rd_kafka_metadata_destroy(md);
		return GRPC_STATUS_UNAVAILABLE;
	}
	ts->n_parts = md->topics[0].partition_cnt;
	rd_kafka_metadata_destroy(md);
	ts->w = xcalloc(ts->n_parts, sizeof(*ts->w));
	if (cs->group) { /* the group's committed offsets decide where it starts */
		for (int p = 0; p < ts->n_parts; p++)
			ts->w[p] = -1;
		return GRPC_STATUS_OK;
	}

	int64_t *low = xcalloc(ts->n_parts, sizeof(*low)), *high = xcalloc(ts->n_parts, sizeof(*high));
	grpc_status_code code = GRPC_STATUS_OK;
	for (int p = 0; p < ts->n_parts && code == GRPC_STATUS_OK; p++) {
		err = rd_kafka_query_watermark_offsets(rk, ts->topic, p, &low[p], &high[p], KAFKA_TIMEOUT_MS);
		if (err) {
			snprintf(msg, msgsize, "cannot read the offsets of %s/%d from Kafka: %s", ts->topic, p,
				 rd_kafka_err2str(err));
			code = GRPC_STATUS_UNAVAILABLE;
		}
		ts->w[p] = cs->start == KBRIDGE__V1__SUBSCRIBE_REQUEST__START__EARLIEST ? low[p] : high[p];
	}
	if (code == GRPC_STATUS_OK && cs->start == KBRIDGE__V1__SUBSCRIBE_REQUEST__START__TIMESTAMP) {
		rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(ts->n_parts);
		for (int p = 0; p < ts->n_parts; p++)
			rd_kafka_topic_partition_list_add(list, ts->topic, p)->offset = cs->start_ts;
		err = rd_kafka_offsets_for_times(rk, list, KAFKA_TIMEOUT_MS);
		if (err) {
			snprintf(msg, msgsize, "cannot look up offsets by time in %s: %s", ts->topic,
				 rd_kafka_err2str(err));
			code = GRPC_STATUS_UNAVAILABLE;
		}
		for (int i = 0; i < list->cnt && code == GRPC_STATUS_OK; i++) {
			const rd_kafka_topic_partition_t *tp = &list->elems[i];
			/* -1: no record at or after the time: start at the end. */
			if (tp->partition >= 0 && tp->partition < ts->n_parts && tp->offset >= 0)
				ts->w[tp->partition] = tp->offset;
		}
		rd_kafka_topic_partition_list_destroy(list);
	}
	for (size_t i = 0; i < cs->n_positions && code == GRPC_STATUS_OK; i++) {
		int32_t p = cs->positions[i].partition;
		int64_t off = cs->positions[i].offset;
		if (strcmp(cs->positions[i].topic, ts->topic) != 0)
			continue;
		if (p < 0 || p >= ts->n_parts) {
			snprintf(msg, msgsize, "position %zu: topic %s has %d partitions: there is no partition %" PRId32,
				 i, ts->topic, ts->n_parts, p);
			code = GRPC_STATUS_INVALID_ARGUMENT;
		} else if (off > high[p]) {
			snprintf(msg, msgsize,
				 "position %zu: offset %" PRId64 " is beyond the end of %s/%" PRId32 " (next offset %" PRId64 ")",
				 i, off, ts->topic, p, high[p]);
			code = GRPC_STATUS_OUT_OF_RANGE;
		} else if (off < low[p]) {
			/* The data is gone (retention): start at the earliest record and say so. */
			char *more = xasprintf("%s%s%s:%" PRId32 ":%" PRId64 "-%" PRId64, *skipped ? *skipped : "",
					       *skipped ? "," : "", ts->topic, p, off, low[p] - 1);
			free(*skipped);
			*skipped = more;
			ts->w[p] = low[p];
		} else {
			ts->w[p] = off;
		}
	}
	free(low);
	free(high);
	return code;
}

static void setup(struct csub *cs)
{
	char msg[512];
	char *skipped = NULL;
	grpc_status_code code = GRPC_STATUS_OK;
	rd_kafka_t *rk = get_admin(msg, sizeof(msg));

	if (!rk)
		code = GRPC_STATUS_INTERNAL;
	for (size_t i = 0; i < cs->n_tsubs && code == GRPC_STATUS_OK; i++)
		code = resolve_topic(cs, &cs->tsubs[i], rk, &skipped, msg, sizeof(msg));
	if (code != GRPC_STATUS_OK) {
		cs->sink->started(cs->arg, code, msg, NULL);
		free(skipped);
		cs_unref(cs);
		return;
	}

	struct start_topic *st = xcalloc(cs->n_tsubs, sizeof(*st));
	for (size_t i = 0; i < cs->n_tsubs; i++)
		st[i] = (struct start_topic){cs->tsubs[i].topic, cs->tsubs[i].n_parts, cs->tsubs[i].w};
	struct start_info info = {cs->n_tsubs, st, skipped};
	cs->sink->started(cs->arg, GRPC_STATUS_OK, NULL, &info);
	free(st);
	free(skipped);

	if (cs->group) {
		pthread_attr_t attr;
		pthread_t tid;
		pthread_mutex_lock(&cs->lock);
		cs->live++;
		pthread_mutex_unlock(&cs->lock);
		pthread_attr_init(&attr);
		pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
		if (pthread_create(&tid, &attr, group_main, cs) != 0) {
			log_error("cannot start a group member thread");
			abort();
		}
		pthread_attr_destroy(&attr);
		cs_unref(cs);
		return;
	}
	/* LATEST: the shared read (started here if needed). Any other start catches up on
	 * its own reader first, unless the shared read happens to be where it starts. */
	bool latest = cs->start == KBRIDGE__V1__SUBSCRIBE_REQUEST__START__LATEST && cs->n_positions == 0;
	for (size_t i = 0; i < cs->n_tsubs; i++) {
		struct tsub *ts = &cs->tsubs[i];
		pthread_mutex_lock(&cs->lock);
		cs->live++;
		pthread_mutex_unlock(&cs->lock);
		if (!try_share(ts, latest))
			private_start(ts);
	}
	cs_unref(cs); /* setup's own reference */
}

static void *setup_main(void *arg)
{
	for (;;) {
		pthread_mutex_lock(&setup_lock);
		while (!setup_head && !setup_stop)
			pthread_cond_wait(&setup_cond, &setup_lock);
		struct csub *cs = setup_head;
		if (cs) {
			setup_head = cs->setup_next;
			if (!setup_head)
				setup_tail = NULL;
		}
		pthread_mutex_unlock(&setup_lock);
		if (!cs)
			return NULL;
		if (cs_stopping(cs)) {
			cs->sink->started(cs->arg, GRPC_STATUS_CANCELLED, "the subscription ended", NULL);
			cs_unref(cs);
		} else {
			setup(cs);
		}
	}
}

/* --- the public face --- */

void consumer_init(const struct conf *c, const char *brokers)
{
	conf = c;
	free(bootstrap);
	bootstrap = xstrdup(brokers);
	setup_stop = false;
	for (int i = 0; i < SETUP_THREADS; i++)
		if (pthread_create(&setup_threads[i], NULL, setup_main, NULL) != 0) {
			log_error("cannot start a subscription setup thread");
			abort();
		}
}

struct csub *consumer_subscribe(const Kbridge__V1__SubscribeRequest *req, const struct reader_sink *sink,
				void *arg)
{
	struct csub *cs = xcalloc(1, sizeof(*cs));

	pthread_mutex_init(&cs->lock, NULL);
	pthread_cond_init(&cs->cond, NULL);
	cs->sink = sink;
	cs->arg = arg;
	cs->live = 2; /* the owner's (consumer_unsubscribe) and setup's */
	cs->start = req->start;
	cs->start_ts = req->start_timestamp_ms;
	cs->group = req->group[0] ? xstrdup(req->group) : NULL;
	cs->n_tsubs = req->n_topics;
	cs->tsubs = xcalloc(req->n_topics, sizeof(*cs->tsubs));
	for (size_t i = 0; i < req->n_topics; i++) {
		cs->tsubs[i].cs = cs;
		cs->tsubs[i].topic = xstrdup(req->topics[i]);
	}
	cs->n_positions = req->n_positions;
	cs->positions = xcalloc(req->n_positions, sizeof(*cs->positions));
	for (size_t i = 0; i < req->n_positions; i++) {
		cs->positions[i].topic = xstrdup(req->positions[i]->topic);
		cs->positions[i].partition = req->positions[i]->partition;
		cs->positions[i].offset = req->positions[i]->offset;
	}
	pthread_mutex_lock(&count_lock);
	n_csubs++;
	pthread_mutex_unlock(&count_lock);

	pthread_mutex_lock(&setup_lock);
	if (setup_tail)
		setup_tail->setup_next = cs;
	else
		setup_head = cs;
	setup_tail = cs;
	pthread_cond_signal(&setup_cond);
	pthread_mutex_unlock(&setup_lock);
	return cs;
}

void consumer_wake(struct csub *cs)
{
	pthread_mutex_lock(&cs->lock);
	cs->woken = true;
	pthread_cond_broadcast(&cs->cond);
	pthread_mutex_unlock(&cs->lock);
}

void consumer_unsubscribe(struct csub *cs)
{
	struct treader *trs[cs->n_tsubs];

	pthread_mutex_lock(&cs->lock);
	cs->stop = true;
	pthread_cond_broadcast(&cs->cond);
	for (size_t i = 0; i < cs->n_tsubs; i++)
		trs[i] = cs->tsubs[i].tr;
	pthread_mutex_unlock(&cs->lock);

	for (size_t i = 0; i < cs->n_tsubs; i++) {
		if (!trs[i])
			continue;
		struct tsub *ts = &cs->tsubs[i];
		bool removed = false;
		pthread_mutex_lock(&readers_lock); /* keeps trs[i] from being freed */
		pthread_mutex_lock(&trs[i]->lock);
		for (struct tsub **l = &trs[i]->subs; *l; l = &(*l)->tr_next)
			if (*l == ts) {
				*l = ts->tr_next;
				trs[i]->n_subs--;
				removed = true;
				break;
			}
		pthread_mutex_unlock(&trs[i]->lock);
		pthread_mutex_unlock(&readers_lock);
		if (removed) {
			pthread_mutex_lock(&cs->lock);
			ts->tr = NULL;
			pthread_mutex_unlock(&cs->lock);
			cs_unref(cs);
		}
	}
	cs_unref(cs); /* the owner's: the last one unless readers are still closing */
}

size_t consumer_shared_readers(void)
{
	pthread_mutex_lock(&count_lock);
	size_t n = n_readers;
	pthread_mutex_unlock(&count_lock);
	return n;
}

void consumer_shutdown(void)
{
	pthread_mutex_lock(&count_lock);
	while (n_csubs > 0)
		pthread_cond_wait(&count_cond, &count_lock);
	pthread_mutex_unlock(&count_lock);

	pthread_mutex_lock(&setup_lock);
	setup_stop = true;
	pthread_cond_broadcast(&setup_cond);
	pthread_mutex_unlock(&setup_lock);
	for (int i = 0; i < SETUP_THREADS; i++)
		pthread_join(setup_threads[i], NULL);

	pthread_mutex_lock(&readers_lock);
	for (struct treader *tr = readers; tr; tr = tr->list_next) {
		pthread_mutex_lock(&tr->lock);
		tr->stop = true;
		pthread_mutex_unlock(&tr->lock);
	}
	pthread_mutex_unlock(&readers_lock);
	pthread_mutex_lock(&count_lock);
	while (n_readers > 0)
		pthread_cond_wait(&count_cond, &count_lock);
	pthread_mutex_unlock(&count_lock);

	if (admin)
		rd_kafka_destroy(admin);
	admin = NULL;
	free(bootstrap);
	bootstrap = NULL;
}
