/* subscribe: the Subscribe RPC. Each call is a struct sub_call with an explicit state and
 * a bounded ring of records its readers filled (see consumer.h); one SEND_MESSAGE is
 * outstanding at a time and carries up to max_batch records. The call keeps, per
 * partition, the next offset after what it has sent: the position a client resumes from,
 * sent as trailing metadata "kbridge-positions" when the stream ends.
 *
 * Threads and locks: sc->lock guards the whole sub_call; registry_lock guards the list of
 * live calls and is taken first. Reader callbacks come in under the consumer's locks
 * (which come before sc->lock), so this file never calls into the consumer while holding
 * sc->lock: consumer_unsubscribe and consumer_wake are called after unlocking.
 *
 * Ownership: each buffered struct rec holds one reference, released when the response
 * carrying it was sent (or failed) or when it is dropped with the subscription. */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "consumer.h"
#include "log.h"
#include "status.h"
#include "subscribe.h"
#include "util.h"

/* Most bytes of record data per response: clients accept 4 MiB messages by default. */
#define RESPONSE_SOFT_BYTES (1024 * 1024)

enum sub_state {
	SUB_STARTING,  /* the consumer is fixing the start offsets */
	SUB_STREAMING, /* records flow */
	SUB_ENDING,    /* a status is due (or the client left); reading is stopping */
};

static const char *const state_names[] = {"starting", "streaming", "ending"};

struct sub_topic {
	char *name;
	int n_parts;
	int64_t *pos; /* next offset after what was sent, per partition */
	bool *owned;  /* groups: the partition is assigned to this member now */
};

struct sub_call {
	struct tag t_close, t_send, t_status;
	grpc_call *call;
	grpc_metadata_array md;
	int cancelled;

	pthread_mutex_t lock;
	enum sub_state state;
	bool send_busy, md_sent, status_sent, closed;
	bool unsubscribed;  /* consumer_unsubscribe was called (or is due) */
	int refs;           /* batches outstanding + the consumer until on_stopped */
	struct csub *cs;
	size_t max_batch;

	struct rec **ring;
	size_t cap, head, count;
	size_t bytes, cap_bytes;  /* of the records in ring, and the bound */
	bool reader_waiting; /* a catch-up reader holds records we had no room for */
	size_t waiting_size; /* the size of the first of them */

	bool group;               /* a consumer group member: commits after sends */
	rd_kafka_topic_partition_list_t *commit; /* to commit after unlocking */
	uint64_t commit_no;       /* its number: the lists are numbered in order (commit_seq) */
	uint64_t commit_seq;      /* lists made so far, sends' and revokes' */
	pthread_cond_t send_cond; /* signalled when a send completes (group revokes wait) */
	struct sub_topic *topics; /* set when started */
	size_t n_topics;
	char *skipped;            /* kbridge-skipped, for the initial metadata */

	grpc_status_code end_code;
	char *end_msg;
	grpc_byte_buffer *send_bb;
	struct rec **sending; /* the records of the send in flight (cap_sending allocated) */
	size_t n_sending, cap_sending;
	grpc_slice details;
	grpc_metadata md_out[1];  /* initial (kbridge-skipped) or trailing (kbridge-positions) */
	char *md_text;

	struct sub_call *prev, *next;
};

static const struct conf *conf;
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sub_call *registry;
static atomic_size_t n_active;

static void close_done(struct tag *t, bool ok);
static void send_done(struct tag *t, bool ok);
static void status_done(struct tag *t, bool ok);
static void on_started(void *arg, grpc_status_code code, const char *msg, const struct start_info *info);
static size_t on_deliver(void *arg, struct rec **recs, size_t n);
static void on_failed(void *arg, grpc_status_code code, const char *msg);
static uint64_t on_revoke(void *arg, rd_kafka_topic_partition_list_t *parts);
static void on_assign(void *arg, rd_kafka_topic_partition_list_t *parts);
static void on_stopped(void *arg);

static const struct reader_sink sink = {on_started, on_deliver, on_failed, on_revoke, on_assign, on_stopped};

void subscribe_init(const struct conf *c)
{
	conf = c;
}

size_t subscribe_active(void)
{
	return atomic_load(&n_active);
}

static void set_state(struct sub_call *sc, enum sub_state s)
{
	if (log_enabled(LOG_DEBUG) && sc->state != s)
		log_debug("subscribe %p: %s -> %s", (void *)sc, state_names[sc->state], state_names[s]);
	sc->state = s;
}

static void start_batch(struct sub_call *sc, const grpc_op *ops, size_t n, struct tag *tag)
{
	grpc_call_error e = grpc_call_start_batch(sc->call, ops, n, tag, NULL);
	if (e != GRPC_CALL_OK) {
		log_error("subscribe %p: grpc_call_start_batch failed (%d) in state %s", (void *)sc, e,
			  state_names[sc->state]);
		abort();
	}
	sc->refs++;
}

static void drop_buffer(struct sub_call *sc)
{
	while (sc->count) {
		sc->bytes -= sc->ring[sc->head]->size;
		rec_release(sc->ring[sc->head]);
		sc->head = (sc->head + 1) % sc->cap;
		sc->count--;
	}
}

/* Records that r was sent: the position moves past it. */
static void advance(struct sub_call *sc, const struct rec *r)
{
	/* Readers deliver only the subscribed topics: with one, it is that one. */
	for (size_t t = 0; t < sc->n_topics; t++)
		if (sc->n_topics == 1 || strcmp(sc->topics[t].name, r->topic) == 0) {
			if (r->partition >= 0 && r->partition < sc->topics[t].n_parts)
				sc->topics[t].pos[r->partition] = r->offset + 1;
			return;
		}
}

/* The next offsets after what was sent, for every partition sent from (group commits). */
static rd_kafka_topic_partition_list_t *sent_offsets(const struct sub_call *sc)
{
	rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(4);
	for (size_t t = 0; t < sc->n_topics; t++)
		for (int p = 0; p < sc->topics[t].n_parts; p++)
			if (sc->topics[t].pos[p] >= 0 && sc->topics[t].owned[p])
				rd_kafka_topic_partition_list_add(list, sc->topics[t].name, p)->offset =
					sc->topics[t].pos[p];
	return list;
}

/* "TOPIC:PARTITION:OFFSET,..." for every partition of every topic: what a client passes
 * back as `positions` to resume. NULL before the start offsets are known. */
static char *positions_text(const struct sub_call *sc)
{
	char *buf = NULL;
	size_t len = 0;

	/* A group member resumes from the group's committed offsets, not from these. */
	if (!sc->topics || sc->group)
		return NULL;
	FILE *f = open_memstream(&buf, &len);
	for (size_t t = 0; t < sc->n_topics; t++)
		for (int p = 0; p < sc->topics[t].n_parts; p++)
			fprintf(f, "%s%s:%d:%" PRId64, (t || p) ? "," : "", sc->topics[t].name, p,
				sc->topics[t].pos[p]);
	fclose(f);
	return buf;
}

/* Takes up to max_batch buffered records (and about RESPONSE_SOFT_BYTES) into one
 * response: the concatenation of their encodings, referenced, not copied. The records
 * stay in sc->sending until the send completes: only then does the position move past
 * them (a send that fails, because the client went away, sent nothing). */
static grpc_byte_buffer *take_batch(struct sub_call *sc)
{
	size_t n = sc->count < sc->max_batch ? sc->count : sc->max_batch;
	size_t bytes = 0, k;
	grpc_slice stack[64], *slices;

	for (k = 0; k < n;) {
		bytes += sc->ring[(sc->head + k) % sc->cap]->data_len;
		k++;
		if (bytes >= RESPONSE_SOFT_BYTES)
			break;
	}
	n = k;
	slices = n <= 64 ? stack : xcalloc(n, sizeof(*slices));
	if (n > sc->cap_sending) {
		sc->cap_sending = n;
		sc->sending = xrealloc(sc->sending, n * sizeof(*sc->sending));
	}
	for (k = 0; k < n; k++) {
		struct rec *m = sc->ring[sc->head];
		slices[k] = m->enc;
		sc->sending[k] = m;
		sc->bytes -= m->size;
		sc->head = (sc->head + 1) % sc->cap;
		sc->count--;
	}
	sc->n_sending = n;
	grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(slices, n);
	if (slices != stack)
		free(slices);
	return bb;
}

/* The send of sc->sending completed: ok, the position moves past its records. */
static void sent(struct sub_call *sc, bool ok)
{
	for (size_t k = 0; k < sc->n_sending; k++) {
		if (ok)
			advance(sc, sc->sending[k]);
		rec_release(sc->sending[k]);
	}
	sc->n_sending = 0;
}

static void send_status(struct sub_call *sc)
{
	grpc_op ops[2];
	size_t n = 0;

	memset(ops, 0, sizeof(ops));
	if (!sc->md_sent) {
		ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
		sc->md_sent = true;
	}
	sc->details = grpc_slice_from_copied_string(sc->end_msg ? sc->end_msg : "");
	ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
	ops[n].data.send_status_from_server.status = sc->end_code;
	ops[n].data.send_status_from_server.status_details = &sc->details;
	free(sc->md_text);
	sc->md_text = positions_text(sc);
	if (sc->md_text) {
		sc->md_out[0].key = grpc_slice_from_static_string("kbridge-positions");
		sc->md_out[0].value = grpc_slice_from_static_string(sc->md_text);
		ops[n].data.send_status_from_server.trailing_metadata_count = 1;
		ops[n].data.send_status_from_server.trailing_metadata = sc->md_out;
	}
	n++;
	sc->status_sent = true;
	start_batch(sc, ops, n, &sc->t_status);
}

/* Starts the next send, if one is due and none is outstanding. Under sc->lock. */
static void pump(struct sub_call *sc)
{
	if (sc->send_busy || sc->closed)
		return;
	if (sc->state == SUB_ENDING) {
		if (!sc->status_sent)
			send_status(sc);
		return;
	}
	if (sc->state != SUB_STREAMING || sc->count == 0)
		return;
	grpc_op op = {.op = GRPC_OP_SEND_MESSAGE};
	sc->send_bb = take_batch(sc);
	op.data.send_message.send_message = sc->send_bb;
	sc->send_busy = true;
	start_batch(sc, &op, 1, &sc->t_send);
}

/* Whether the buffer has room for a record of size bytes: under both bounds, or empty (a
 * record larger than the byte bound goes alone). Under sc->lock. */
static bool fits(const struct sub_call *sc, size_t size)
{
	return sc->count == 0 || (sc->count < sc->cap && sc->bytes + size <= sc->cap_bytes);
}

/* The consumer to wake, if a catch-up reader waits for room and there is some now for its
 * next record. Under sc->lock; the caller wakes it after unlocking. */
static struct csub *wake_due(struct sub_call *sc)
{
	if (!sc->reader_waiting || !fits(sc, sc->waiting_size) || !sc->cs || sc->unsubscribed)
		return NULL;
	sc->reader_waiting = false;
	return sc->cs;
}

/* Ends the subscription with code (unless the client already left). Under sc->lock;
 * the caller then calls unlock_and_notify. */
static void end(struct sub_call *sc, grpc_status_code code, const char *msg)
{
	if (sc->state == SUB_ENDING)
		return;
	set_state(sc, SUB_ENDING);
	sc->end_code = code;
	sc->end_msg = msg ? xstrdup(msg) : NULL;
	drop_buffer(sc);
	if (code != GRPC_STATUS_OK && code != GRPC_STATUS_CANCELLED && !sc->closed)
		log_info("subscribe %p ends with %s: %s", (void *)sc, status_name(code), msg ? msg : "");
	pump(sc);
}

static void destroy(struct sub_call *sc)
{
	pthread_mutex_lock(&registry_lock);
	if (sc->prev)
		sc->prev->next = sc->next;
	else
		registry = sc->next;
	if (sc->next)
		sc->next->prev = sc->prev;
	pthread_mutex_unlock(&registry_lock);

	log_debug("subscribe %p: freed", (void *)sc);
	drop_buffer(sc);
	free(sc->ring);
	free(sc->sending);
	for (size_t t = 0; t < sc->n_topics; t++) {
		free(sc->topics[t].name);
		free(sc->topics[t].pos);
		free(sc->topics[t].owned);
	}
	free(sc->topics);
	free(sc->skipped);
	free(sc->end_msg);
	free(sc->md_text);
	if (sc->commit)
		rd_kafka_topic_partition_list_destroy(sc->commit);
	grpc_call_unref(sc->call);
	grpc_metadata_array_destroy(&sc->md);
	pthread_mutex_destroy(&sc->lock);
	pthread_cond_destroy(&sc->send_cond);
	free(sc);
	atomic_fetch_sub(&n_active, 1);
}

/* Unlocks sc, then tells the consumer what it must know (never under sc->lock), then drops
 * one reference if unref. */
static void unlock_and_notify(struct sub_call *sc, bool unref)
{
	struct csub *unsub = NULL, *wake = wake_due(sc), *commit_cs = sc->cs;
	rd_kafka_topic_partition_list_t *commit = sc->commit;
	uint64_t commit_no = sc->commit_no;

	sc->commit = NULL;
	if (sc->unsubscribed)
		commit_cs = NULL;

	/* Before consumer_subscribe returned, sc->cs is NULL: the caller that sets it calls
	 * here again. */
	if (sc->state == SUB_ENDING && !sc->unsubscribed && sc->cs) {
		sc->unsubscribed = true;
		unsub = sc->cs;
		wake = NULL;
	}
	bool last = unref && --sc->refs == 0;
	pthread_mutex_unlock(&sc->lock);
	/* The consumer's reference (dropped in on_stopped) keeps sc alive through these. */
	if (commit) {
		if (commit->cnt && commit_cs)
			consumer_commit(commit_cs, commit, commit_no);
		rd_kafka_topic_partition_list_destroy(commit);
	}
	if (wake)
		consumer_wake(wake);
	if (unsub)
		consumer_unsubscribe(unsub);
	if (last)
		destroy(sc);
}

static bool topic_name_ok(const char *t)
{
	size_t n = strlen(t);
	if (n == 0 || n > 249)
		return false;
	return strspn(t, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") == n;
}

/* What is wrong with req, or NULL; code set to the status to answer. */
static const char *request_problem(const Kbridge__V1__SubscribeRequest *req, grpc_status_code *code,
				   char *buf, size_t size)
{
	*code = GRPC_STATUS_INVALID_ARGUMENT;
	if (!req)
		return "not a valid kbridge.v1.SubscribeRequest message";
	if (req->n_topics == 0)
		return "no topics: set at least one topic to subscribe to";
	for (size_t i = 0; i < req->n_topics; i++) {
		if (!topic_name_ok(req->topics[i])) {
			snprintf(buf, size, "topic %zu: \"%.64s\" is not a valid Kafka topic name", i,
				 req->topics[i]);
			return buf;
		}
		for (size_t j = 0; j < i; j++)
			if (strcmp(req->topics[i], req->topics[j]) == 0) {
				snprintf(buf, size, "topic \"%.64s\" is listed twice", req->topics[i]);
				return buf;
			}
	}
	for (size_t i = 0; i < req->n_positions; i++) {
		const Kbridge__V1__Position *p = req->positions[i];
		bool listed = false;
		for (size_t j = 0; j < req->n_topics; j++)
			listed |= strcmp(p->topic, req->topics[j]) == 0;
		if (!listed) {
			snprintf(buf, size, "position %zu: topic \"%.64s\" is not one of the subscription's topics",
				 i, p->topic);
			return buf;
		}
		if (p->partition < 0 || p->offset < 0) {
			snprintf(buf, size, "position %zu: partition and offset must not be negative", i);
			return buf;
		}
	}
	if (req->start != KBRIDGE__V1__SUBSCRIBE_REQUEST__START__LATEST &&
	    req->start != KBRIDGE__V1__SUBSCRIBE_REQUEST__START__EARLIEST &&
	    req->start != KBRIDGE__V1__SUBSCRIBE_REQUEST__START__TIMESTAMP)
		return "unknown start: use LATEST, EARLIEST or TIMESTAMP";
	if (req->start == KBRIDGE__V1__SUBSCRIBE_REQUEST__START__TIMESTAMP && req->start_timestamp_ms < 0)
		return "start=TIMESTAMP needs start_timestamp_ms >= 0 (milliseconds since the epoch)";
	if (req->group[0] && (req->n_positions || req->start == KBRIDGE__V1__SUBSCRIBE_REQUEST__START__TIMESTAMP))
		return "a group member starts where its group's committed offsets are (or LATEST/EARLIEST "
		       "for partitions without one): positions and start=TIMESTAMP do not apply";
	return NULL;
}

void subscribe_handle(struct incoming *in)
{
	Kbridge__V1__SubscribeRequest *req = NULL;
	grpc_status_code code;
	char buf[256];

	/* A NULL payload means the client sent no request at all. */
	if (in->payload)
		req = (Kbridge__V1__SubscribeRequest *)codec_decode(
			&kbridge__v1__subscribe_request__descriptor, in->payload);
	const char *why = request_problem(req, &code, buf, sizeof(buf));
	if (!why && atomic_load(&n_active) >= (size_t)conf->subscribe_max_subscribers) {
		code = GRPC_STATUS_RESOURCE_EXHAUSTED;
		snprintf(buf, sizeof(buf), "this kbridged serves its maximum of %d subscriptions "
			 "(subscribe.max_subscribers); try another instance", conf->subscribe_max_subscribers);
		why = buf;
	}
	if (why) {
		server_reject(in, code, why); /* frees the payload */
		if (req)
			protobuf_c_message_free_unpacked(&req->base, NULL);
		return;
	}
	grpc_byte_buffer_destroy(in->payload);

	struct sub_call *sc = xcalloc(1, sizeof(*sc));
	sc->t_close.done = close_done;
	sc->t_send.done = send_done;
	sc->t_status.done = status_done;
	sc->call = in->call;
	sc->md = in->md;
	pthread_mutex_init(&sc->lock, NULL);
	pthread_cond_init(&sc->send_cond, NULL);
	sc->group = req->group[0] != 0;
	sc->state = SUB_STARTING;
	sc->max_batch = req->max_batch ? req->max_batch : (size_t)conf->subscribe_max_batch;
	if (sc->max_batch > 100000)
		sc->max_batch = 100000;
	sc->cap = conf->subscribe_buffer_records;
	sc->cap_bytes = conf->subscribe_buffer_bytes;
	sc->ring = xcalloc(sc->cap, sizeof(*sc->ring));
	atomic_fetch_add(&n_active, 1);

	pthread_mutex_lock(&registry_lock);
	sc->next = registry;
	if (registry)
		registry->prev = sc;
	registry = sc;
	pthread_mutex_unlock(&registry_lock);

	pthread_mutex_lock(&sc->lock);
	grpc_op op = {.op = GRPC_OP_RECV_CLOSE_ON_SERVER};
	op.data.recv_close_on_server.cancelled = &sc->cancelled;
	start_batch(sc, &op, 1, &sc->t_close);
	sc->refs++; /* the consumer's, dropped in on_stopped */
	log_debug("subscribe %p: %zu topics, start %d, %zu positions", (void *)sc, req->n_topics,
		  (int)req->start, req->n_positions);
	pthread_mutex_unlock(&sc->lock);
	/* Not under sc->lock: the consumer may call back at once. sc->cs is set before any
	 * callback can need it, since callbacks take sc->lock and the setup runs later. */
	struct csub *cs = consumer_subscribe(req, &sink, sc);
	pthread_mutex_lock(&sc->lock);
	sc->cs = cs;
	unlock_and_notify(sc, false);
	protobuf_c_message_free_unpacked(&req->base, NULL);
}

static void on_started(void *arg, grpc_status_code code, const char *msg, const struct start_info *info)
{
	struct sub_call *sc = arg;

	pthread_mutex_lock(&sc->lock);
	if (sc->state == SUB_STARTING && code != GRPC_STATUS_OK) {
		end(sc, code, msg);
	} else if (sc->state == SUB_STARTING) {
		sc->n_topics = info->n_topics;
		sc->topics = xcalloc(info->n_topics, sizeof(*sc->topics));
		for (size_t t = 0; t < info->n_topics; t++) {
			struct sub_topic *st = &sc->topics[t];
			st->name = xstrdup(info->topics[t].topic);
			st->n_parts = info->topics[t].n_partitions;
			st->pos = xmalloc(st->n_parts * sizeof(*st->pos));
			st->owned = xcalloc(st->n_parts, sizeof(*st->owned));
			memcpy(st->pos, info->topics[t].offsets, st->n_parts * sizeof(*st->pos));
		}
		/* Initial metadata tells the client its start offsets are fixed, and which
		 * requested records no longer exist. */
		grpc_op op = {.op = GRPC_OP_SEND_INITIAL_METADATA};
		if (info->skipped) {
			sc->skipped = xstrdup(info->skipped);
			sc->md_out[0].key = grpc_slice_from_static_string("kbridge-skipped");
			sc->md_out[0].value = grpc_slice_from_static_string(sc->skipped);
			op.data.send_initial_metadata.count = 1;
			op.data.send_initial_metadata.metadata = sc->md_out;
			log_info("subscribe %p: requested records no longer in Kafka: %s", (void *)sc, sc->skipped);
		}
		set_state(sc, SUB_STREAMING);
		sc->md_sent = true;
		sc->send_busy = true;
		start_batch(sc, &op, 1, &sc->t_send);
	}
	unlock_and_notify(sc, false);
}

static size_t on_deliver(void *arg, struct rec **recs, size_t n)
{
	struct sub_call *sc = arg;
	size_t took = 0;

	pthread_mutex_lock(&sc->lock);
	if (sc->state == SUB_ENDING) {
		/* Nobody will read these: take and drop them. */
		for (; took < n; took++)
			rec_release(recs[took]);
	} else {
		for (; took < n && fits(sc, recs[took]->size); took++) {
			sc->ring[(sc->head + sc->count) % sc->cap] = recs[took];
			sc->count++;
			sc->bytes += recs[took]->size;
		}
		if (took < n) {
			sc->reader_waiting = true;
			sc->waiting_size = recs[took]->size;
		}
		pump(sc);
	}
	/* Under the consumer's locks we may only wake it (cs->lock comes after tr->lock),
	 * and only after releasing sc->lock. */
	struct csub *wake = wake_due(sc);
	pthread_mutex_unlock(&sc->lock);
	if (wake)
		consumer_wake(wake);
	return took;
}

static void on_failed(void *arg, grpc_status_code code, const char *msg)
{
	struct sub_call *sc = arg;

	pthread_mutex_lock(&sc->lock);
	end(sc, code, msg);
	unlock_and_notify(sc, false);
}

static uint64_t on_revoke(void *arg, rd_kafka_topic_partition_list_t *parts)
{
	struct sub_call *sc = arg;
	struct timespec until;

	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += 5;
	pthread_mutex_lock(&sc->lock);
	/* A send in flight decides whether its records count as sent: wait for it. */
	while (sc->send_busy && pthread_cond_timedwait(&sc->send_cond, &sc->lock, &until) == 0)
		;
	/* Unsent records of the revoked partitions go back to Kafka (the next owner reads
	 * them after the commit); the others keep their order. */
	size_t kept = 0;
	for (size_t i = 0; i < sc->count; i++) {
		struct rec *r = sc->ring[(sc->head + i) % sc->cap];
		bool revoked = false;
		for (int j = 0; j < parts->cnt && !revoked; j++)
			revoked = parts->elems[j].partition == r->partition && strcmp(parts->elems[j].topic, r->topic) == 0;
		if (revoked) {
			sc->bytes -= r->size;
			rec_release(r);
		} else {
			sc->ring[(sc->head + kept++) % sc->cap] = r;
		}
	}
	sc->count = kept;
	for (int j = 0; j < parts->cnt; j++) {
		parts->elems[j].offset = RD_KAFKA_OFFSET_INVALID;
		for (size_t t = 0; t < sc->n_topics; t++)
			if (strcmp(sc->topics[t].name, parts->elems[j].topic) == 0 && parts->elems[j].partition >= 0 &&
			    parts->elems[j].partition < sc->topics[t].n_parts) {
				int32_t p = parts->elems[j].partition;
				if (sc->topics[t].pos[p] >= 0 && sc->topics[t].owned[p])
					parts->elems[j].offset = sc->topics[t].pos[p];
				sc->topics[t].owned[p] = false; /* never commit it again */
			}
	}
	uint64_t no = ++sc->commit_seq;
	pthread_mutex_unlock(&sc->lock);
	return no;
}

static void on_assign(void *arg, rd_kafka_topic_partition_list_t *parts)
{
	struct sub_call *sc = arg;

	pthread_mutex_lock(&sc->lock);
	for (int j = 0; j < parts->cnt; j++)
		for (size_t t = 0; t < sc->n_topics; t++)
			if (strcmp(sc->topics[t].name, parts->elems[j].topic) == 0 && parts->elems[j].partition >= 0 &&
			    parts->elems[j].partition < sc->topics[t].n_parts) {
				int32_t p = parts->elems[j].partition;
				sc->topics[t].owned[p] = true;
				if (sc->topics[t].pos[p] >= 0)
					parts->elems[j].offset = sc->topics[t].pos[p];
			}
	pthread_mutex_unlock(&sc->lock);
}

static void on_stopped(void *arg)
{
	struct sub_call *sc = arg;

	pthread_mutex_lock(&sc->lock);
	sc->cs = NULL;
	bool last = --sc->refs == 0;
	pthread_mutex_unlock(&sc->lock);
	if (last)
		destroy(sc);
}

static void send_done(struct tag *t, bool ok)
{
	struct sub_call *sc = container_of(t, struct sub_call, t_send);

	pthread_mutex_lock(&sc->lock);
	sc->send_busy = false;
	if (sc->group) /* a revoke may be waiting for this send */
		pthread_cond_broadcast(&sc->send_cond);
	if (sc->send_bb) {
		grpc_byte_buffer_destroy(sc->send_bb);
		sc->send_bb = NULL;
		sent(sc, ok);
		/* Records are committed only once handed to the client's stream: the
		 * positions now, before the next batch moves them. */
		if (ok && sc->group && !sc->commit) {
			sc->commit = sent_offsets(sc);
			sc->commit_no = ++sc->commit_seq;
		}
	}
	if (!ok) /* the stream broke: the client is gone */
		end(sc, GRPC_STATUS_CANCELLED, NULL);
	pump(sc);
	unlock_and_notify(sc, true);
}

static void status_done(struct tag *t, bool ok)
{
	struct sub_call *sc = container_of(t, struct sub_call, t_status);

	pthread_mutex_lock(&sc->lock);
	grpc_slice_unref(sc->details);
	unlock_and_notify(sc, true);
}

static void close_done(struct tag *t, bool ok)
{
	struct sub_call *sc = container_of(t, struct sub_call, t_close);

	pthread_mutex_lock(&sc->lock);
	sc->closed = true;
	if (sc->cancelled && sc->state != SUB_ENDING)
		log_debug("subscribe %p: the client cancelled or went away", (void *)sc);
	end(sc, GRPC_STATUS_CANCELLED, NULL);
	unlock_and_notify(sc, true);
}

void subscribe_drain(void)
{
	struct sub_call **list = NULL;
	size_t n = 0;

	/* End them under the registry lock (holding a reference each), tell the consumer
	 * after releasing it: its callbacks may free calls, which takes the registry lock. */
	pthread_mutex_lock(&registry_lock);
	for (struct sub_call *sc = registry; sc; sc = sc->next) {
		pthread_mutex_lock(&sc->lock);
		end(sc, GRPC_STATUS_UNAVAILABLE, "kbridged is shutting down; subscribe again to another "
						 "instance from the positions in kbridge-positions");
		sc->refs++;
		pthread_mutex_unlock(&sc->lock);
		list = xrealloc(list, (n + 1) * sizeof(*list));
		list[n++] = sc;
	}
	pthread_mutex_unlock(&registry_lock);
	for (size_t i = 0; i < n; i++) {
		pthread_mutex_lock(&list[i]->lock);
		unlock_and_notify(list[i], true);
	}
	free(list);
}
