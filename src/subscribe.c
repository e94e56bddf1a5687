/* subscribe: the Subscribe RPC. Each call is a struct sub_call with an explicit state and
 * a bounded ring of records its reader filled; one SEND_MESSAGE is outstanding at a time
 * and carries up to max_batch records.
 *
 * Threads and locks: sc->lock guards the whole sub_call; registry_lock guards the list of
 * live calls and is taken first. The reader calls in (started/deliver/stopped) without
 * holding its own lock; we call reader_wake/stop holding sc->lock.
 *
 * Ownership: buffered rd_kafka_message_t belong to the call until they are encoded into a
 * response (then destroyed) or dropped when the subscription ends — always before the
 * reader's consumer is destroyed, since reader_stop comes after the drop. */
#include "config.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "consumer.h"
#include "log.h"
#include "status.h"
#include "subscribe.h"
#include "util.h"

/* Most bytes of record data per response: clients accept 4 MiB messages by default. */
#define RESPONSE_SOFT_BYTES (1024 * 1024)

enum sub_state {
	SUB_STARTING,  /* the reader is fixing the start offsets */
	SUB_STREAMING, /* records flow */
	SUB_ENDING,    /* a status is due (or the client left); the reader is stopping */
};

static const char *const state_names[] = {"starting", "streaming", "ending"};

struct sub_call {
	struct tag t_close, t_send, t_status;
	grpc_call *call;
	grpc_metadata_array md;
	int cancelled;

	pthread_mutex_t lock;
	enum sub_state state;
	bool send_busy, md_sent, status_sent, closed;
	int refs; /* batches outstanding + the reader while it runs */
	struct reader *reader;
	size_t max_batch;

	rd_kafka_message_t **ring;
	size_t cap, head, count;
	bool reader_waiting; /* the reader holds records we had no room for */

	grpc_status_code end_code;
	char *end_msg;
	grpc_byte_buffer *send_bb;
	grpc_slice details;

	struct sub_call *prev, *next;
};

static const struct conf *conf;
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sub_call *registry;
static atomic_size_t n_active;

static void close_done(struct tag *t, bool ok);
static void send_done(struct tag *t, bool ok);
static void status_done(struct tag *t, bool ok);
static void on_started(void *arg, grpc_status_code code, const char *msg);
static size_t on_deliver(void *arg, rd_kafka_message_t **msgs, size_t n);
static void on_stopped(void *arg);

static const struct reader_sink sink = {on_started, on_deliver, on_stopped};

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
		rd_kafka_message_destroy(sc->ring[sc->head]);
		sc->head = (sc->head + 1) % sc->cap;
		sc->count--;
	}
}

/* Encodes up to max_batch buffered records into one response and destroys them. */
static grpc_byte_buffer *take_batch(struct sub_call *sc)
{
	size_t n = sc->count < sc->max_batch ? sc->count : sc->max_batch;
	Kbridge__V1__Record *recs = xcalloc(n, sizeof(*recs));
	Kbridge__V1__Record **rp = xcalloc(n, sizeof(*rp));
	Kbridge__V1__Header **hp = NULL;
	Kbridge__V1__Header *hs = NULL;
	size_t n_hdrs = 0, bytes = 0, k;

	/* Headers first: count them, to allocate once. */
	for (k = 0; k < n; k++) {
		rd_kafka_message_t *m = sc->ring[(sc->head + k) % sc->cap];
		rd_kafka_headers_t *h;
		bytes += m->len + m->key_len;
		if (rd_kafka_message_headers(m, &h) == RD_KAFKA_RESP_ERR_NO_ERROR)
			n_hdrs += rd_kafka_header_cnt(h);
		if (bytes >= RESPONSE_SOFT_BYTES) {
			k++;
			break;
		}
	}
	n = k;
	if (n_hdrs) {
		hs = xcalloc(n_hdrs, sizeof(*hs));
		hp = xcalloc(n_hdrs, sizeof(*hp));
	}
	size_t hi = 0;
	for (k = 0; k < n; k++) {
		rd_kafka_message_t *m = sc->ring[(sc->head + k) % sc->cap];
		Kbridge__V1__Record *r = &recs[k];
		rd_kafka_headers_t *h;
		rd_kafka_timestamp_type_t tstype;

		kbridge__v1__record__init(r);
		r->topic = (char *)rd_kafka_topic_name(m->rkt);
		r->key.data = m->key;
		r->key.len = m->key_len;
		r->value.data = m->payload;
		r->value.len = m->len;
		r->placement_case = KBRIDGE__V1__RECORD__PLACEMENT_PARTITION;
		r->partition = m->partition;
		r->offset = m->offset;
		r->timestamp_ms = rd_kafka_message_timestamp(m, &tstype);
		if (rd_kafka_message_headers(m, &h) == RD_KAFKA_RESP_ERR_NO_ERROR) {
			size_t cnt = rd_kafka_header_cnt(h);
			r->headers = &hp[hi];
			for (size_t j = 0; j < cnt; j++) {
				const char *name;
				const void *val;
				size_t len;
				if (rd_kafka_header_get_all(h, j, &name, &val, &len))
					break;
				kbridge__v1__header__init(&hs[hi]);
				hs[hi].key = (char *)name;
				hs[hi].value.data = (uint8_t *)val;
				hs[hi].value.len = val ? len : 0;
				hp[hi] = &hs[hi];
				hi++;
				r->n_headers++;
			}
		}
		rp[k] = r;
	}
	Kbridge__V1__SubscribeResponse resp = KBRIDGE__V1__SUBSCRIBE_RESPONSE__INIT;
	resp.n_records = n;
	resp.records = rp;
	grpc_byte_buffer *bb = codec_encode(&resp.base);
	for (k = 0; k < n; k++) {
		rd_kafka_message_destroy(sc->ring[sc->head]);
		sc->head = (sc->head + 1) % sc->cap;
		sc->count--;
	}
	free(hp);
	free(hs);
	free(rp);
	free(recs);
	return bb;
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
	ops[n++].data.send_status_from_server.status_details = &sc->details;
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
	if (sc->reader_waiting && sc->reader) {
		sc->reader_waiting = false;
		reader_wake(sc->reader);
	}
}

/* Ends the subscription with code (unless the client already left). Under sc->lock. */
static void end(struct sub_call *sc, grpc_status_code code, const char *msg)
{
	if (sc->state == SUB_ENDING)
		return;
	set_state(sc, SUB_ENDING);
	sc->end_code = code;
	sc->end_msg = msg ? xstrdup(msg) : NULL;
	drop_buffer(sc);
	if (sc->reader)
		reader_stop(sc->reader);
	if (code != GRPC_STATUS_OK && !sc->closed)
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
	free(sc->end_msg);
	grpc_call_unref(sc->call);
	grpc_metadata_array_destroy(&sc->md);
	pthread_mutex_destroy(&sc->lock);
	free(sc);
	atomic_fetch_sub(&n_active, 1);
}

static void unref_unlock(struct sub_call *sc)
{
	bool last = --sc->refs == 0;
	pthread_mutex_unlock(&sc->lock);
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
	for (size_t i = 0; i < req->n_topics; i++)
		if (!topic_name_ok(req->topics[i])) {
			snprintf(buf, size, "topic %zu: \"%.64s\" is not a valid Kafka topic name", i,
				 req->topics[i]);
			return buf;
		}
	*code = GRPC_STATUS_UNIMPLEMENTED;
	if (req->group[0])
		return "consumer groups (group) are not implemented by this version of kbridged";
	if (req->n_positions)
		return "resuming from positions is not implemented by this version of kbridged";
	if (req->start == KBRIDGE__V1__SUBSCRIBE_REQUEST__START__TIMESTAMP)
		return "start=TIMESTAMP is not implemented by this version of kbridged";
	*code = GRPC_STATUS_INVALID_ARGUMENT;
	if (req->start != KBRIDGE__V1__SUBSCRIBE_REQUEST__START__LATEST &&
	    req->start != KBRIDGE__V1__SUBSCRIBE_REQUEST__START__EARLIEST)
		return "unknown start: use LATEST, EARLIEST or TIMESTAMP";
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
	sc->state = SUB_STARTING;
	sc->max_batch = req->max_batch ? req->max_batch : (size_t)conf->subscribe_max_batch;
	if (sc->max_batch > 100000)
		sc->max_batch = 100000;
	sc->cap = conf->subscribe_buffer_records;
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
	sc->refs++; /* the reader's, dropped in on_stopped */
	sc->reader = reader_start(req, &sink, sc);
	log_debug("subscribe %p: %zu topics from %s", (void *)sc, req->n_topics,
		  req->start == KBRIDGE__V1__SUBSCRIBE_REQUEST__START__EARLIEST ? "earliest" : "latest");
	pthread_mutex_unlock(&sc->lock);
	protobuf_c_message_free_unpacked(&req->base, NULL);
}

static void on_started(void *arg, grpc_status_code code, const char *msg)
{
	struct sub_call *sc = arg;

	pthread_mutex_lock(&sc->lock);
	if (sc->state == SUB_STARTING) {
		if (code != GRPC_STATUS_OK) {
			end(sc, code, msg);
		} else {
			/* Initial metadata tells the client its start offsets are fixed. */
			grpc_op op = {.op = GRPC_OP_SEND_INITIAL_METADATA};
			set_state(sc, SUB_STREAMING);
			sc->md_sent = true;
			sc->send_busy = true;
			start_batch(sc, &op, 1, &sc->t_send);
		}
	}
	pthread_mutex_unlock(&sc->lock);
}

static size_t on_deliver(void *arg, rd_kafka_message_t **msgs, size_t n)
{
	struct sub_call *sc = arg;
	size_t took = 0;

	pthread_mutex_lock(&sc->lock);
	if (sc->state == SUB_ENDING) {
		/* Nobody will read these: take and drop them. */
		for (; took < n; took++)
			rd_kafka_message_destroy(msgs[took]);
	} else {
		for (; took < n && sc->count < sc->cap; took++) {
			sc->ring[(sc->head + sc->count) % sc->cap] = msgs[took];
			sc->count++;
		}
		if (took < n)
			sc->reader_waiting = true;
		pump(sc);
	}
	pthread_mutex_unlock(&sc->lock);
	return took;
}

static void on_stopped(void *arg)
{
	struct sub_call *sc = arg;

	pthread_mutex_lock(&sc->lock);
	sc->reader = NULL;
	unref_unlock(sc);
}

static void send_done(struct tag *t, bool ok)
{
	struct sub_call *sc = container_of(t, struct sub_call, t_send);

	pthread_mutex_lock(&sc->lock);
	sc->send_busy = false;
	if (sc->send_bb) {
		grpc_byte_buffer_destroy(sc->send_bb);
		sc->send_bb = NULL;
	}
	if (!ok) /* the stream broke: the client is gone */
		end(sc, GRPC_STATUS_CANCELLED, NULL);
	pump(sc);
	unref_unlock(sc);
}

static void status_done(struct tag *t, bool ok)
{
	struct sub_call *sc = container_of(t, struct sub_call, t_status);

	pthread_mutex_lock(&sc->lock);
	grpc_slice_unref(sc->details);
	unref_unlock(sc);
}

static void close_done(struct tag *t, bool ok)
{
	struct sub_call *sc = container_of(t, struct sub_call, t_close);

	pthread_mutex_lock(&sc->lock);
	sc->closed = true;
	if (sc->cancelled && sc->state != SUB_ENDING)
		log_debug("subscribe %p: the client cancelled or went away", (void *)sc);
	end(sc, GRPC_STATUS_CANCELLED, NULL);
	unref_unlock(sc);
}

void subscribe_drain(void)
{
	pthread_mutex_lock(&registry_lock);
	for (struct sub_call *sc = registry; sc; sc = sc->next) {
		pthread_mutex_lock(&sc->lock);
		end(sc, GRPC_STATUS_UNAVAILABLE, "kbridged is shutting down; subscribe again to another instance");
		pthread_mutex_unlock(&sc->lock);
	}
	pthread_mutex_unlock(&registry_lock);
}
