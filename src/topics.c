#include "config.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "log.h"
#include "producer.h"
#include "topics.h"
#include "util.h"

/* How long an answer is served from the cache. */
#define TOPICS_TTL_MS 2000
#define METADATA_TIMEOUT_MS 10000
/* The per-topic cache. */
#define TOPIC_TTL_MS 30000
#define MISSING_TOPIC_TTL_MS 1000
#define LOOKUP_TIMEOUT_MS 5000
#define BUCKETS 256

struct topic_entry {
	struct topic_entry *next;
	int partitions; /* 0: the topic does not exist */
	int64_t expires_ms;
	char name[];
};

static pthread_rwlock_t table_lock = PTHREAD_RWLOCK_INITIALIZER;
static struct topic_entry *table[BUCKETS];

struct lt_call {
	struct tag tag;
	grpc_call *call;
	grpc_metadata_array md;
	int cancelled;
	grpc_byte_buffer *bb;
	grpc_slice details;
};

static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t fetch_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t workers_cond = PTHREAD_COND_INITIALIZER;
static int workers; /* running worker threads, under cache_lock */
static grpc_byte_buffer *cached; /* an encoded ListTopicsResponse */
static int64_t cached_at;

/* The cached answer if it is fresh: a copy the caller owns, else NULL. */
static grpc_byte_buffer *cache_get(void)
{
	grpc_byte_buffer *bb = NULL;

	pthread_mutex_lock(&cache_lock);
	if (cached && now_ms_coarse() - cached_at < TOPICS_TTL_MS)
		bb = grpc_byte_buffer_copy(cached);
	pthread_mutex_unlock(&cache_lock);
	return bb;
}

static int by_name(const void *a, const void *b)
{
	const Kbridge__V1__TopicInfo *const *x = a, *const *y = b;
	return strcmp((*x)->name, (*y)->name);
}

/* Asks Kafka and caches the answer. Returns a copy the caller owns, or NULL with *err. */
static grpc_byte_buffer *fetch(rd_kafka_resp_err_t *err)
{
	const struct rd_kafka_metadata *md;

	*err = producer_metadata(&md, METADATA_TIMEOUT_MS);
	if (*err)
		return NULL;
	Kbridge__V1__TopicInfo *infos = xcalloc(md->topic_cnt, sizeof(*infos));
	Kbridge__V1__TopicInfo **ptrs = xcalloc(md->topic_cnt, sizeof(*ptrs));
	size_t n = 0;
	for (int i = 0; i < md->topic_cnt; i++) {
		const rd_kafka_metadata_topic_t *t = &md->topics[i];
		/* Kafka's internal topics (__consumer_offsets, ...) are not for publishing. */
		if (t->err || strncmp(t->topic, "__", 2) == 0)
			continue;
		kbridge__v1__topic_info__init(&infos[n]);
		infos[n].name = t->topic;
		infos[n].partitions = t->partition_cnt;
		ptrs[n] = &infos[n];
		n++;
	}
	qsort(ptrs, n, sizeof(*ptrs), by_name);
	Kbridge__V1__ListTopicsResponse resp = KBRIDGE__V1__LIST_TOPICS_RESPONSE__INIT;
	resp.n_topics = n;
	resp.topics = ptrs;
	grpc_byte_buffer *bb = codec_encode(&resp.base);
	free(ptrs);
	free(infos);
	rd_kafka_metadata_destroy(md);

	pthread_mutex_lock(&cache_lock);
	if (cached)
		grpc_byte_buffer_destroy(cached);
	cached = grpc_byte_buffer_copy(bb);
	cached_at = now_ms_coarse();
	pthread_mutex_unlock(&cache_lock);
	return bb;
}

static unsigned bucket(const char *name)
{
	unsigned h = 2166136261u; /* FNV-1a */
	for (; *name; name++)
		h = (h ^ (unsigned char)*name) * 16777619u;
	return h % BUCKETS;
}

/* Under table_lock. */
static struct topic_entry *find(const char *topic, unsigned b)
{
	for (struct topic_entry *e = table[b]; e; e = e->next)
		if (strcmp(e->name, topic) == 0)
			return e;
	return NULL;
}

int topics_partitions(const char *topic)
{
	unsigned b = bucket(topic);
	int partitions = -1;

	pthread_rwlock_rdlock(&table_lock);
	struct topic_entry *e = find(topic, b);
	if (e && e->expires_ms > now_ms_coarse())
		partitions = e->partitions;
	pthread_rwlock_unlock(&table_lock);
	if (partitions >= 0)
		return partitions;

	const struct rd_kafka_metadata *md = NULL;
	rd_kafka_resp_err_t err = producer_topic_metadata(topic, &md, LOOKUP_TIMEOUT_MS);
	if (!err && md->topic_cnt == 1)
		err = md->topics[0].err;
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
		partitions = md->topics[0].partition_cnt;
	else if (err == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART || err == RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC)
		partitions = 0;
	if (md)
		rd_kafka_metadata_destroy(md);
	if (partitions < 0) {
		log_warn("cannot read the metadata of topic %s from Kafka: %s", topic, rd_kafka_err2str(err));
		return -1;
	}

	pthread_rwlock_wrlock(&table_lock);
	e = find(topic, b);
	if (!e) {
		e = xmalloc(sizeof(*e) + strlen(topic) + 1);
		strcpy(e->name, topic);
		e->next = table[b];
		table[b] = e;
	}
	e->partitions = partitions;
	e->expires_ms = now_ms_coarse() + (partitions ? TOPIC_TTL_MS : MISSING_TOPIC_TTL_MS);
	pthread_rwlock_unlock(&table_lock);
	return partitions;
}

void topics_invalidate(const char *topic)
{
	pthread_rwlock_wrlock(&table_lock);
	struct topic_entry *e = find(topic, bucket(topic));
	if (e)
		e->expires_ms = 0;
	pthread_rwlock_unlock(&table_lock);
}

static void lt_done(struct tag *tag, bool ok)
{
	struct lt_call *lc = container_of(tag, struct lt_call, tag);

	if (lc->bb)
		grpc_byte_buffer_destroy(lc->bb);
	grpc_slice_unref(lc->details);
	grpc_metadata_array_destroy(&lc->md);
	grpc_call_unref(lc->call);
	free(lc);
}

/* Sends the answer (bb, or the status code and msg) and ends the call. */
static void lt_finish(struct lt_call *lc, grpc_byte_buffer *bb, grpc_status_code code, const char *msg)
{
	grpc_op ops[4];
	size_t n = 0;

	memset(ops, 0, sizeof(ops));
	lc->bb = bb;
	lc->details = grpc_slice_from_copied_string(msg ? msg : "");
	ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
	if (bb) {
		ops[n].op = GRPC_OP_SEND_MESSAGE;
		ops[n++].data.send_message.send_message = bb;
	}
	ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
	ops[n].data.send_status_from_server.status = code;
	ops[n++].data.send_status_from_server.status_details = &lc->details;
	ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
	ops[n++].data.recv_close_on_server.cancelled = &lc->cancelled;
	grpc_call_error e = grpc_call_start_batch(lc->call, ops, n, &lc->tag, NULL);
	if (e != GRPC_CALL_OK) {
		log_error("ListTopics: grpc_call_start_batch failed (%d)", e);
		abort();
	}
}

static void *worker(void *arg)
{
	struct lt_call *lc = arg;
	rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;

	pthread_mutex_lock(&fetch_lock);
	grpc_byte_buffer *bb = cache_get(); /* another worker may just have fetched it */
	if (!bb)
		bb = fetch(&err);
	pthread_mutex_unlock(&fetch_lock);
	if (bb) {
		lt_finish(lc, bb, GRPC_STATUS_OK, NULL);
	} else {
		char *msg = xasprintf("cannot read the topic list from Kafka: %s", rd_kafka_err2str(err));
		lt_finish(lc, NULL, GRPC_STATUS_UNAVAILABLE, msg);
		free(msg);
	}
	pthread_mutex_lock(&cache_lock);
	if (--workers == 0)
		pthread_cond_broadcast(&workers_cond);
	pthread_mutex_unlock(&cache_lock);
	return NULL;
}

void topics_handle(struct incoming *in)
{
	struct lt_call *lc = xcalloc(1, sizeof(*lc));
	pthread_attr_t attr;
	pthread_t tid;

	lc->tag.done = lt_done;
	lc->call = in->call;
	lc->md = in->md;
	/* ListTopicsRequest has no fields: any payload that decodes is fine. */
	ProtobufCMessage *req = codec_decode(&kbridge__v1__list_topics_request__descriptor, in->payload);
	if (in->payload)
		grpc_byte_buffer_destroy(in->payload);
	if (!req) {
		lt_finish(lc, NULL, GRPC_STATUS_INVALID_ARGUMENT, "not a valid kbridge.v1.ListTopicsRequest message");
		return;
	}
	protobuf_c_message_free_unpacked(req, NULL);

	grpc_byte_buffer *bb = cache_get();
	if (bb) {
		lt_finish(lc, bb, GRPC_STATUS_OK, NULL);
		return;
	}
	pthread_mutex_lock(&cache_lock);
	workers++;
	pthread_mutex_unlock(&cache_lock);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&tid, &attr, worker, lc) != 0) {
		pthread_mutex_lock(&cache_lock);
		workers--;
		pthread_mutex_unlock(&cache_lock);
		lt_finish(lc, NULL, GRPC_STATUS_RESOURCE_EXHAUSTED, "kbridged cannot start a thread now; retry");
	}
	pthread_attr_destroy(&attr);
}

void topics_shutdown(void)
{
	pthread_mutex_lock(&cache_lock);
	while (workers > 0) /* they use the producer, which goes next */
		pthread_cond_wait(&workers_cond, &cache_lock);
	if (cached)
		grpc_byte_buffer_destroy(cached);
	cached = NULL;
	pthread_mutex_unlock(&cache_lock);

	pthread_rwlock_wrlock(&table_lock);
	for (unsigned b = 0; b < BUCKETS; b++)
		while (table[b]) {
			struct topic_entry *e = table[b];
			table[b] = e->next;
			free(e);
		}
	pthread_rwlock_unlock(&table_lock);
}
