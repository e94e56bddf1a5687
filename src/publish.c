/* publish: the Publish (client streaming), PublishStream (bidi) and Produce (unary) RPCs.
 * All three share one machine: each call is a struct pub_call with an explicit state; every
 * completion (a batch on a completion-queue thread, a delivery report on the producer's
 * poll thread) takes the call's lock, updates it, and may start the next batch. They
 * differ in what they answer:
 *   - Publish: one PublishResponse after the half-close; the first failed record ends the
 *     call (with kbridge-durable-requests in the trailers).
 *   - PublishStream: one PublishAck per request as soon as its records are settled, in
 *     completion order; a failed record is reported in its RecordResult only.
 *   - Produce: the PublishAck of its single request.
 *
 * Threads and locks:
 *   - registry_lock guards the list of live calls (drain walks it); taken before a call's lock.
 *   - pc->lock guards everything in a pub_call and its requests.
 *   - Records are handed to librdkafka without holding pc->lock, so that the poll thread's
 *     delivery reports (which take it once per run of a call's records) never wait for a
 *     whole request to be produced.
 *   - Only one RECV_MESSAGE is outstanding per call, so only one thread at a time runs
 *     request processing for a call.
 *
 * Ownership: a received request's decoded message (Kbridge__V1__PublishRequest) holds the
 * record bytes librdkafka reads; it lives in a pub_req until every record of it has its
 * delivery report. Each record's librdkafka opaque is &req->slot[i], which gives both the
 * request and the record index back in the report. */
#include "config.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "producer.h"
#include "publish.h"
#include "status.h"
#include "topics.h"
#include "util.h"

enum pub_state {
	PUB_READING,     /* taking requests (a RECV_MESSAGE outstanding) */
	PUB_PAUSED,      /* max_inflight_records reached: not reading until reports come back */
	PUB_HALF_CLOSED, /* the client sent everything; waiting for the last reports */
	PUB_FAILING,     /* a record failed, or draining: no more reading; waiting for reports */
	PUB_FINISHING,   /* the response/status batch is on its way */
	PUB_DONE,        /* the call is over for the client; reports may still come in */
};

static const char *const state_names[] = {
	"reading", "paused", "half-closed", "failing", "finishing", "done",
};

enum pub_mode {
	MODE_PUBLISH,
	MODE_STREAM,
	MODE_PRODUCE,
};

struct pub_range {
	char *topic;
	int32_t partition;
	int64_t first, last;
	uint64_t count;
};

struct pub_call;

struct pub_req {
	struct pub_call *pc;
	Kbridge__V1__PublishRequest *msg; /* freed once every record is reported */
	uint64_t index;
	size_t pending; /* records handed over whose reports are not in */
	bool failed, done;
	size_t n_records;
	size_t bytes;              /* size of the request message, counted while in flight */
	size_t cursor;             /* next record to hand to Kafka (a full queue parks here) */
	size_t handed;             /* records handed to Kafka when it was parked */
	ProtobufCAllocator *arena; /* holds msg */
	struct pub_req *next;      /* the in-order list (Publish) or the ack queue (others) */
	struct record_result *results; /* ack modes: one per record, after slot[]; else NULL; errors are
					 * ours (freed with the request) */
	struct pub_req *slot[]; /* one per record, each pointing back here: the opaques */
};

struct pub_call {
	struct tag t_recv, t_close, t_final, t_send;
	enum pub_mode mode;
	grpc_call *call;
	grpc_metadata_array md;
	grpc_byte_buffer *recv_bb;
	int cancelled;

	pthread_mutex_t lock;
	enum pub_state state;
	bool recv_busy, closed, final_sent, send_busy, md_sent;
	int refs;               /* batches outstanding + requests not yet retired */
	uint64_t next_index;    /* index of the next request received */
	uint64_t durable;       /* leading requests fully durable */
	bool prefix_broken;     /* a request failed: `durable` stops there */
	struct pub_req *oldest, *newest; /* Publish: requests not yet retired, in order */
	struct pub_req *ack_head, *ack_tail; /* ack modes: settled requests to acknowledge */
	grpc_byte_buffer *ack_bb;        /* the ack being sent */
	size_t inflight;        /* records of requests being produced, reports not all in */
	size_t inflight_bytes;  /* bytes of those requests */
	struct pub_req *parked; /* a request waiting for room in the producer's queue */
	bool waiting;           /* on the waiters list (holds a reference) */
	struct pub_call *wait_next;
	uint64_t records_ok;
	struct pub_range *ranges;
	size_t n_ranges;
	grpc_status_code code;  /* the first failure, or OK */
	char *error;

	/* what the final batch points into */
	grpc_byte_buffer *send_bb;
	grpc_metadata trailer;
	char durable_text[24];
	grpc_slice details;

	struct pub_call *prev, *next; /* registry */
};

static const struct conf *conf;
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct pub_call *registry;
static atomic_size_t n_active;
static atomic_size_t total_bytes; /* inflight_bytes of every call */
/* Calls waiting for room: in the producer's queue (a parked request) or under
 * publish.max_inflight_bytes_total. The producer's poll thread wakes them (publish_on_room);
 * wait_lock is taken under a call's lock, never the other way round. */
static pthread_mutex_t wait_lock = PTHREAD_MUTEX_INITIALIZER;
static struct pub_call *waiters;

static void recv_done(struct tag *t, bool ok);
static void close_done(struct tag *t, bool ok);
static void final_done(struct tag *t, bool ok);
static void send_done(struct tag *t, bool ok);
static struct pub_req *start_request(struct pub_call *pc, grpc_byte_buffer *bb, uint64_t index);
static void produce_request(struct pub_call *pc, struct pub_req *req);
static void maybe_read(struct pub_call *pc);

void publish_init(const struct conf *c)
{
	conf = c;
}

size_t publish_active(void)
{
	return atomic_load(&n_active);
}

static void set_state(struct pub_call *pc, enum pub_state s)
{
	if (log_enabled(LOG_DEBUG) && pc->state != s)
		log_debug("publish %p: %s -> %s", (void *)pc, state_names[pc->state], state_names[s]);
	pc->state = s;
}

/* Records the first failure; later ones are only logged at debug level. */
static void fail(struct pub_call *pc, grpc_status_code code, char *msg)
{
	if (pc->code == GRPC_STATUS_OK) {
		pc->code = code;
		pc->error = msg;
	} else {
		log_debug("publish %p: also failed: %s", (void *)pc, msg);
		free(msg);
	}
	if (pc->state == PUB_READING || pc->state == PUB_PAUSED || pc->state == PUB_HALF_CLOSED)
		set_state(pc, PUB_FAILING);
}

static void start_batch(struct pub_call *pc, const grpc_op *ops, size_t n, struct tag *tag)
{
	grpc_call_error e = grpc_call_start_batch(pc->call, ops, n, tag, NULL);
	if (e != GRPC_CALL_OK) {
		/* A bug in our state machine, not a client's doing. */
		log_error("publish %p: grpc_call_start_batch failed (%d) in state %s", (void *)pc, e,
			  state_names[pc->state]);
		abort();
	}
	pc->refs++;
}

static void start_recv(struct pub_call *pc)
{
	grpc_op op = {.op = GRPC_OP_RECV_MESSAGE};
	op.data.recv_message.recv_message = &pc->recv_bb;
	pc->recv_busy = true;
	start_batch(pc, &op, 1, &pc->t_recv);
}

static void req_free(struct pub_req *req)
{
	codec_arena_destroy(req->arena);
	if (req->results)
		for (size_t i = 0; i < req->n_records; i++)
			free((char *)req->results[i].error);
	free(req);
}

/* The PublishAck of a settled request. */
static grpc_byte_buffer *encode_ack(const struct pub_req *req)
{
	return codec_encode_publish_ack(req->index, req->results, req->n_records);
}

/* Takes the oldest settled request off the ack queue, encoded; the request is freed. */
static grpc_byte_buffer *pop_ack(struct pub_call *pc)
{
	struct pub_req *req = pc->ack_head;
	pc->ack_head = req->next;
	if (!pc->ack_head)
		pc->ack_tail = NULL;
	grpc_byte_buffer *bb = encode_ack(req);
	req_free(req);
	pc->refs--;
	return bb;
}

static void send_final(struct pub_call *pc)
{
	grpc_op ops[3];
	size_t n = 0;

	memset(ops, 0, sizeof(ops));
	if (!pc->md_sent) {
		ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
		pc->md_sent = true;
	}
	if (pc->mode == MODE_PUBLISH && pc->code == GRPC_STATUS_OK) {
		Kbridge__V1__PublishResponse resp = KBRIDGE__V1__PUBLISH_RESPONSE__INIT;
		Kbridge__V1__PartitionRange *r = xcalloc(pc->n_ranges, sizeof(*r));
		Kbridge__V1__PartitionRange **rp = xcalloc(pc->n_ranges, sizeof(*rp));
		for (size_t i = 0; i < pc->n_ranges; i++) {
			kbridge__v1__partition_range__init(&r[i]);
			r[i].topic = pc->ranges[i].topic;
			r[i].partition = pc->ranges[i].partition;
			r[i].first_offset = pc->ranges[i].first;
			r[i].last_offset = pc->ranges[i].last;
			r[i].count = pc->ranges[i].count;
			rp[i] = &r[i];
		}
		resp.records = pc->records_ok;
		resp.n_ranges = pc->n_ranges;
		resp.ranges = rp;
		pc->send_bb = codec_encode(&resp.base);
		free(rp);
		free(r);
		ops[n].op = GRPC_OP_SEND_MESSAGE;
		ops[n++].data.send_message.send_message = pc->send_bb;
	} else if (pc->mode == MODE_PRODUCE && pc->ack_head) {
		pc->send_bb = pop_ack(pc);
		ops[n].op = GRPC_OP_SEND_MESSAGE;
		ops[n++].data.send_message.send_message = pc->send_bb;
	}
	pc->details = grpc_slice_from_copied_string(pc->error ? pc->error : "");
	ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
	ops[n].data.send_status_from_server.status = pc->code;
	ops[n].data.send_status_from_server.status_details = &pc->details;
	if (pc->mode == MODE_PUBLISH) {
		snprintf(pc->durable_text, sizeof(pc->durable_text), "%" PRIu64, pc->durable);
		pc->trailer.key = grpc_slice_from_static_string("kbridge-durable-requests");
		pc->trailer.value = grpc_slice_from_static_string(pc->durable_text);
		ops[n].data.send_status_from_server.trailing_metadata_count = 1;
		ops[n].data.send_status_from_server.trailing_metadata = &pc->trailer;
	}
	n++;
	pc->final_sent = true;
	set_state(pc, PUB_FINISHING);
	if (pc->code != GRPC_STATUS_OK && pc->mode == MODE_PUBLISH)
		log_info("publish %p ends with %s: %s (%" PRIu64 " leading requests durable)",
			 (void *)pc, status_name(pc->code), pc->error, pc->durable);
	else if (pc->code != GRPC_STATUS_OK)
		log_info("publish %p ends with %s: %s", (void *)pc, status_name(pc->code), pc->error);
	start_batch(pc, ops, n, &pc->t_final);
}

/* PublishStream: sends the next ack when none is on its way. Under pc->lock. */
static void pump_acks(struct pub_call *pc)
{
	grpc_op ops[2];
	size_t n = 0;

	if (pc->mode != MODE_STREAM || pc->send_busy || pc->closed || pc->final_sent || !pc->ack_head)
		return;
	memset(ops, 0, sizeof(ops));
	if (!pc->md_sent) {
		ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
		pc->md_sent = true;
	}
	pc->ack_bb = pop_ack(pc);
	ops[n].op = GRPC_OP_SEND_MESSAGE;
	ops[n].data.send_message.send_message = pc->ack_bb;
	/* Let gRPC coalesce writes while more acks wait behind this one; the last one
	 * (unhinted) flushes them. Never hint the batch that carries initial metadata. */
	if (n == 0 && pc->ack_head)
		ops[n].flags = GRPC_WRITE_BUFFER_HINT;
	n++;
	pc->send_busy = true;
	start_batch(pc, ops, n, &pc->t_send);
}

/* Sends the final batch once nothing is in flight and (ack modes) every ack went out.
 * Under pc->lock. */
static void maybe_finish(struct pub_call *pc)
{
	if (pc->closed || pc->final_sent || pc->inflight || pc->send_busy)
		return;
	if (pc->mode == MODE_STREAM && pc->ack_head)
		return;
	if (pc->state == PUB_HALF_CLOSED || pc->state == PUB_FAILING)
		send_final(pc);
}

/* Every record of req is settled. Publish: retire what leads the list, counting the
 * durable prefix. Ack modes: queue its ack. Under pc->lock. */
static void req_done(struct pub_call *pc, struct pub_req *req)
{
	req->done = true;
	/* librdkafka no longer reads the record bytes: free them now, not at the end. */
	codec_arena_destroy(req->arena);
	req->arena = NULL;
	req->msg = NULL;
	pc->inflight_bytes -= req->bytes;
	atomic_fetch_sub(&total_bytes, req->bytes);
	if (pc->mode != MODE_PUBLISH && pc->closed) {
		req_free(req); /* the client is gone: no ack to send */
		pc->refs--;
		return;
	}
	if (pc->mode != MODE_PUBLISH) {
		req->next = NULL;
		if (pc->ack_tail)
			pc->ack_tail->next = req;
		else
			pc->ack_head = req;
		pc->ack_tail = req;
		pump_acks(pc);
		return;
	}
	while (pc->oldest && pc->oldest->done) {
		struct pub_req *r = pc->oldest;
		if (r->failed)
			pc->prefix_broken = true;
		if (!pc->prefix_broken)
			pc->durable++;
		pc->oldest = r->next;
		if (!pc->oldest)
			pc->newest = NULL;
		req_free(r);
		pc->refs--;
	}
}

/* count records of req are settled (reported, or never handed over). Under pc->lock. */
static void req_settle(struct pub_call *pc, struct pub_req *req, size_t count)
{
	req->pending -= count;
	pc->inflight -= count;
	if (req->pending == 0)
		req_done(pc, req);
	if (pc->state == PUB_PAUSED)
		maybe_read(pc);
}

/* Puts pc on the waiters list, which the producer's poll thread serves. Under pc->lock. */
static void wait_add(struct pub_call *pc)
{
	if (pc->waiting)
		return;
	pc->waiting = true;
	pc->refs++;
	pthread_mutex_lock(&wait_lock);
	pc->wait_next = waiters;
	waiters = pc;
	pthread_mutex_unlock(&wait_lock);
	producer_want_room();
}

/* Reads the next request if the stream is reading and under every limit; otherwise pauses
 * it (its own delivery reports, or the waiters list for the daemon-wide limit, resume it).
 * Under pc->lock. */
static void maybe_read(struct pub_call *pc)
{
	if ((pc->state != PUB_READING && pc->state != PUB_PAUSED) || pc->closed || pc->recv_busy ||
	    pc->parked)
		return;
	if (pc->inflight >= (size_t)conf->publish_max_inflight_records ||
	    pc->inflight_bytes >= (size_t)conf->publish_max_inflight_bytes) {
		set_state(pc, PUB_PAUSED);
		return;
	}
	if (atomic_load(&total_bytes) >= (size_t)conf->publish_max_inflight_bytes_total) {
		set_state(pc, PUB_PAUSED);
		wait_add(pc);
		return;
	}
	set_state(pc, PUB_READING);
	start_recv(pc);
}

static void destroy(struct pub_call *pc)
{
	pthread_mutex_lock(&registry_lock);
	if (pc->prev)
		pc->prev->next = pc->next;
	else
		registry = pc->next;
	if (pc->next)
		pc->next->prev = pc->prev;
	pthread_mutex_unlock(&registry_lock);

	log_debug("publish %p: freed", (void *)pc);
	grpc_call_unref(pc->call);
	grpc_metadata_array_destroy(&pc->md);
	for (size_t i = 0; i < pc->n_ranges; i++)
		free(pc->ranges[i].topic);
	free(pc->ranges);
	free(pc->error);
	pthread_mutex_destroy(&pc->lock);
	free(pc);
	atomic_fetch_sub(&n_active, 1);
}

/* Drops one reference and unlocks; frees the call when it was the last. */
static void unref_unlock(struct pub_call *pc)
{
	bool last = --pc->refs == 0;
	pthread_mutex_unlock(&pc->lock);
	if (last)
		destroy(pc);
}

static void unlock_maybe_free(struct pub_call *pc)
{
	bool last = pc->refs == 0;
	pthread_mutex_unlock(&pc->lock);
	if (last)
		destroy(pc);
}

static struct pub_call *call_new(struct incoming *in, enum pub_mode mode)
{
	struct pub_call *pc = xcalloc(1, sizeof(*pc));
	grpc_op op = {.op = GRPC_OP_RECV_CLOSE_ON_SERVER};

	pc->t_recv.done = recv_done;
	pc->t_close.done = close_done;
	pc->t_final.done = final_done;
	pc->t_send.done = send_done;
	pc->mode = mode;
	pc->call = in->call;
	pc->md = in->md;
	pthread_mutexattr_t ma;
	pthread_mutexattr_init(&ma);
	pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_ADAPTIVE_NP);
	pthread_mutex_init(&pc->lock, &ma);
	pthread_mutexattr_destroy(&ma);
	pc->state = PUB_READING;
	atomic_fetch_add(&n_active, 1);

	pthread_mutex_lock(&registry_lock);
	pc->next = registry;
	if (registry)
		registry->prev = pc;
	registry = pc;
	pthread_mutex_unlock(&registry_lock);

	log_debug("publish %p: new call (%s)", (void *)pc,
		  mode == MODE_PUBLISH ? "Publish" : mode == MODE_STREAM ? "PublishStream" : "Produce");
	pthread_mutex_lock(&pc->lock);
	/* RECV_CLOSE_ON_SERVER alone: it completes when the call ends, cancelled or not. */
	op.data.recv_close_on_server.cancelled = &pc->cancelled;
	start_batch(pc, &op, 1, &pc->t_close);
	return pc; /* locked */
}

static void handle_streaming(struct incoming *in, enum pub_mode mode)
{
	struct pub_call *pc = call_new(in, mode);

	if (server_draining())
		fail(pc, GRPC_STATUS_UNAVAILABLE, xstrdup("kbridged is shutting down; publish to another instance"));
	else
		maybe_read(pc);
	maybe_finish(pc);
	pthread_mutex_unlock(&pc->lock);
}

void publish_handle(struct incoming *in)
{
	handle_streaming(in, MODE_PUBLISH);
}

void publish_handle_stream(struct incoming *in)
{
	handle_streaming(in, MODE_STREAM);
}

void publish_handle_produce(struct incoming *in)
{
	struct pub_call *pc = call_new(in, MODE_PRODUCE);
	grpc_byte_buffer *bb = in->payload; /* NULL: an empty request */

	in->payload = NULL;
	pc->next_index = 1;
	set_state(pc, PUB_HALF_CLOSED); /* its one request is all there is */
	pc->refs++;                     /* held while the request is processed unlocked */
	pthread_mutex_unlock(&pc->lock);
	struct pub_req *req = start_request(pc, bb, 0);
	if (req)
		produce_request(pc, req);
	pthread_mutex_lock(&pc->lock);
	maybe_finish(pc);
	unref_unlock(pc);
}

static bool topic_name_ok(const char *t)
{
	size_t n = strlen(t);
	if (n == 0 || n > 249 || strcmp(t, ".") == 0 || strcmp(t, "..") == 0)
		return false;
	for (size_t i = 0; i < n; i++) {
		char c = t[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '.' || c == '_' || c == '-'))
			return false;
	}
	return true;
}

/* topic_ok: the topic is one already found valid (the record before had it). */
static grpc_status_code validate_record(const Kbridge__V1__Record *r, uint64_t req_index, size_t rec_index,
					size_t max_record_bytes, bool topic_ok, char *msg, size_t msgsize)
{
	size_t bytes = r->key.len + r->value.len;

	for (size_t h = 0; h < r->n_headers; h++)
		bytes += strlen(r->headers[h]->key) + r->headers[h]->value.len;
	if (!topic_ok && !r->topic[0]) {
		snprintf(msg, msgsize, "request %" PRIu64 ", record %zu: the topic is empty", req_index,
			 rec_index);
	} else if (!topic_ok && !topic_name_ok(r->topic)) {
		snprintf(msg, msgsize,
			 "request %" PRIu64 ", record %zu: \"%.64s\" is not a valid Kafka topic name "
			 "(1 to 249 of a-z A-Z 0-9 . _ -)", req_index, rec_index, r->topic);
	} else if (r->placement_case == KBRIDGE__V1__RECORD__PLACEMENT_PARTITION && r->partition < 0) {
		snprintf(msg, msgsize, "request %" PRIu64 ", record %zu: partition %d is negative",
			 req_index, rec_index, r->partition);
	} else if (r->timestamp_ms < 0) {
		snprintf(msg, msgsize, "request %" PRIu64 ", record %zu: timestamp_ms %" PRId64
			 " is negative (0 means now)", req_index, rec_index, r->timestamp_ms);
	} else if (bytes > max_record_bytes) {
		snprintf(msg, msgsize,
			 "request %" PRIu64 ", record %zu: key, value and headers are %zu bytes, "
			 "over publish.max_record_bytes (%zu)", req_index, rec_index, bytes, max_record_bytes);
	} else {
		return GRPC_STATUS_OK;
	}
	return GRPC_STATUS_INVALID_ARGUMENT;
}

grpc_status_code publish_validate_record(const Kbridge__V1__Record *r, uint64_t req_index,
					 size_t rec_index, size_t max_record_bytes, char *msg, size_t msgsize)
{
	return validate_record(r, req_index, rec_index, max_record_bytes, false, msg, msgsize);
}

grpc_status_code publish_validate(const Kbridge__V1__PublishRequest *req, uint64_t req_index,
				  size_t max_record_bytes, char *msg, size_t msgsize)
{
	for (size_t i = 0; i < req->n_records; i++) {
		grpc_status_code code = publish_validate_record(req->records[i], req_index, i,
								max_record_bytes, msg, msgsize);
		if (code != GRPC_STATUS_OK)
			return code;
	}
	return GRPC_STATUS_OK;
}

/* Checks one record: its fields, then Kafka's view of its topic (cached per topic; the
 * request's records mostly share one). */
static grpc_status_code check_record(const Kbridge__V1__Record *r, uint64_t index, size_t i,
				     const char **last_topic, int *last_parts, char *err, size_t errsize)
{
	/* Decoded records of one topic share its string (codec.h): compare pointers first. */
	grpc_status_code code = validate_record(r, index, i, conf->publish_max_record_bytes,
						*last_topic == r->topic, err, errsize);
	if (code != GRPC_STATUS_OK)
		return code;
	if (*last_topic != r->topic && (!*last_topic || strcmp(*last_topic, r->topic) != 0)) {
		*last_topic = r->topic;
		*last_parts = topics_partitions(r->topic);
	}
	if (*last_parts == 0 && !conf->publish_auto_create_topics) {
		snprintf(err, errsize,
			 "request %" PRIu64 ", record %zu: topic \"%s\" does not exist in Kafka (create it "
			 "first, or set publish.auto_create_topics = true)", index, i, r->topic);
		return GRPC_STATUS_NOT_FOUND;
	}
	if (*last_parts > 0 && r->placement_case == KBRIDGE__V1__RECORD__PLACEMENT_PARTITION &&
	    r->partition >= *last_parts) {
		snprintf(err, errsize,
			 "request %" PRIu64 ", record %zu: topic %s has %d partitions: there is no partition %" PRId32,
			 index, i, r->topic, *last_parts, r->partition);
		return GRPC_STATUS_INVALID_ARGUMENT;
	}
	return GRPC_STATUS_OK;
}

/* Decodes and checks a request and accounts for it. Publish: a bad record fails the call
 * and nothing of its request is produced (NULL). Ack modes: a bad record gets its own
 * result and the others go on. Runs without pc->lock (see the top of the file). */
static struct pub_req *start_request(struct pub_call *pc, grpc_byte_buffer *bb, uint64_t index)
{
	size_t bytes = codec_length(bb);
	/* The decoded request lives in one arena that also holds its bytes (keys and values
	 * point into them), all freed at once when its last record is settled. */
	ProtobufCAllocator *arena;
	Kbridge__V1__PublishRequest *msg = codec_decode_publish_request(bb, &arena);
	bool acks = pc->mode != MODE_PUBLISH;
	const char *last_topic = NULL;
	int last_parts = -1;
	char err[512];

	if (bb)
		grpc_byte_buffer_destroy(bb);
	if (!msg) {
		pthread_mutex_lock(&pc->lock);
		fail(pc, GRPC_STATUS_INVALID_ARGUMENT,
		     xasprintf("request %" PRIu64 ": not a valid kbridge.v1.PublishRequest message", index));
		pthread_mutex_unlock(&pc->lock);
		return NULL;
	}

	size_t n = msg->n_records;
	/* The request, its opaques and (ack modes) its results: one allocation. */
	struct pub_req *req = xcalloc(1, sizeof(*req) + n * sizeof(req->slot[0]) +
					     (acks ? n * sizeof(*req->results) : 0));
	req->pc = pc;
	req->arena = arena;
	req->msg = msg;
	req->index = index;
	req->n_records = n;
	req->pending = n;
	req->bytes = bytes;
	req->results = acks ? (struct record_result *)&req->slot[n] : NULL;
	for (size_t i = 0; i < n; i++) {
		req->slot[i] = req;
		grpc_status_code code = check_record(msg->records[i], index, i, &last_topic, &last_parts,
						     err, sizeof(err));
		if (code == GRPC_STATUS_OK)
			continue;
		if (!acks) {
			req_free(req);
			pthread_mutex_lock(&pc->lock);
			fail(pc, code, xstrdup(err));
			pthread_mutex_unlock(&pc->lock);
			return NULL;
		}
		req->results[i] = (struct record_result){-1, -1, code, xstrdup(err)};
	}

	pthread_mutex_lock(&pc->lock);
	if (!acks) {
		if (pc->newest)
			pc->newest->next = req;
		else
			pc->oldest = req;
		pc->newest = req;
	}
	pc->inflight += n;
	pc->inflight_bytes += bytes;
	atomic_fetch_add(&total_bytes, bytes);
	pc->refs++;
	pthread_mutex_unlock(&pc->lock);
	return req;
}

static grpc_status_code produce_status(rd_kafka_resp_err_t err)
{
	/* librdkafka knows the partition count: an explicit partition beyond it is the
	 * caller's mistake, not Kafka's. */
	return err == RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION ? GRPC_STATUS_INVALID_ARGUMENT
							   : status_from_kafka(err);
}

/* Hands req's records to Kafka from its cursor on. A full producer queue parks req on
 * the call (which then reads nothing) until the poll thread finds room. Runs without
 * pc->lock, on one thread at a time for a request.
 *
 * Once the last record is handed over, delivery reports may settle and free req on the
 * producer's poll thread at any moment, so the count of handed records lives in a local
 * and req is not touched after that: it is alive only while handed < n. */
static void produce_request(struct pub_call *pc, struct pub_req *req)
{
	Kbridge__V1__PublishRequest *msg = req->msg;
	size_t n = req->n_records;
	size_t handed = req->handed;
	bool acks = req->results != NULL;

	pthread_mutex_lock(&pc->lock);
	/* A stream that failed or is draining publishes nothing more. */
	bool abandon = pc->closed || pc->state == PUB_FAILING;
	pthread_mutex_unlock(&pc->lock);

	struct producer_batch pb;
	bool begun = false;
	for (size_t i = req->cursor; i < n; i++) {
		const Kbridge__V1__Record *r = msg->records[i];
		if (acks && req->results[i].code != GRPC_STATUS_OK)
			continue; /* refused by check_record */
		if (abandon) {
			if (acks)
				req->results[i] = (struct record_result){
					-1, -1, GRPC_STATUS_UNAVAILABLE,
					xasprintf("request %" PRIu64 ", record %zu: not published: the stream ended "
						  "before Kafka had room for it", req->index, i)};
			continue;
		}
		if (!begun) {
			producer_batch_begin(&pb);
			begun = true;
		}
		rd_kafka_resp_err_t kerr = producer_send(&pb, r, &req->slot[i]);
		if (!kerr) {
			handed++;
			continue;
		}
		if (kerr == RD_KAFKA_RESP_ERR__QUEUE_FULL || kerr == RD_KAFKA_RESP_ERR__FATAL) {
			/* Pause, never drop or fail for load: the poll thread calls us again
			 * (after replacing a producer that hit a fatal error). */
			req->cursor = i;
			req->handed = handed;
			producer_batch_end(&pb);
			pthread_mutex_lock(&pc->lock);
			pc->parked = req;
			wait_add(pc);
			pthread_mutex_unlock(&pc->lock);
			return;
		}
		char *why = kerr == RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION
				    ? xasprintf("request %" PRIu64 ", record %zu: topic %s has no partition %" PRId32,
						req->index, i, r->topic, r->partition)
				    : xasprintf("request %" PRIu64 ", record %zu: topic %s: %s", req->index, i,
						r->topic, rd_kafka_err2str(kerr));
		if (acks) {
			req->results[i] = (struct record_result){-1, -1, produce_status(kerr), why};
			continue;
		}
		pthread_mutex_lock(&pc->lock);
		req->failed = true;
		fail(pc, produce_status(kerr), why);
		pthread_mutex_unlock(&pc->lock);
		break;
	}
	if (begun)
		producer_batch_end(&pb);

	/* Settles what was never handed over, and an empty request. When every record was
	 * handed over, their reports settle req (it may be freed already). */
	if (handed < n || n == 0) {
		pthread_mutex_lock(&pc->lock);
		req_settle(pc, req, n - handed);
		pthread_mutex_unlock(&pc->lock);
	}
}

void publish_on_room(void)
{
	pthread_mutex_lock(&wait_lock);
	struct pub_call *list = waiters;
	waiters = NULL;
	pthread_mutex_unlock(&wait_lock);

	while (list) {
		struct pub_call *pc = list;
		list = pc->wait_next;
		pthread_mutex_lock(&pc->lock);
		pc->waiting = false;
		struct pub_req *req = pc->parked;
		pc->parked = NULL;
		if (req) {
			pthread_mutex_unlock(&pc->lock);
			produce_request(pc, req);
			pthread_mutex_lock(&pc->lock);
		}
		maybe_read(pc);
		maybe_finish(pc);
		unref_unlock(pc);
	}
}

static void recv_done(struct tag *t, bool ok)
{
	struct pub_call *pc = container_of(t, struct pub_call, t_recv);

	pthread_mutex_lock(&pc->lock);
	grpc_byte_buffer *bb = pc->recv_bb;
	pc->recv_bb = NULL;
	pc->recv_busy = false;
	if (!ok || pc->closed || pc->state != PUB_READING) {
		/* The call is over or failing: whatever came is not published. */
		if (bb)
			grpc_byte_buffer_destroy(bb);
		maybe_finish(pc);
		unref_unlock(pc);
		return;
	}
	if (!bb) { /* the client half-closed */
		set_state(pc, PUB_HALF_CLOSED);
		maybe_finish(pc);
		unref_unlock(pc);
		return;
	}
	uint64_t index = pc->next_index++;
	pthread_mutex_unlock(&pc->lock);

	struct pub_req *req = start_request(pc, bb, index);
	if (req)
		produce_request(pc, req);

	pthread_mutex_lock(&pc->lock);
	maybe_read(pc);
	maybe_finish(pc);
	unref_unlock(pc);
}

static void close_done(struct tag *t, bool ok)
{
	struct pub_call *pc = container_of(t, struct pub_call, t_close);

	pthread_mutex_lock(&pc->lock);
	pc->closed = true;
	if (pc->cancelled && !pc->final_sent)
		log_info("publish %p: the client cancelled or went away after %" PRIu64
			 " requests; %zu records in flight will still be delivered",
			 (void *)pc, pc->next_index, pc->inflight);
	/* Acks nobody will read. Requests still in flight come here when settled. */
	while (pc->ack_head)
		grpc_byte_buffer_destroy(pop_ack(pc));
	set_state(pc, PUB_DONE);
	unref_unlock(pc);
}

static void send_done(struct tag *t, bool ok)
{
	struct pub_call *pc = container_of(t, struct pub_call, t_send);

	pthread_mutex_lock(&pc->lock);
	pc->send_busy = false;
	grpc_byte_buffer_destroy(pc->ack_bb);
	pc->ack_bb = NULL;
	pump_acks(pc);
	maybe_finish(pc);
	unref_unlock(pc);
}

static void final_done(struct tag *t, bool ok)
{
	struct pub_call *pc = container_of(t, struct pub_call, t_final);

	pthread_mutex_lock(&pc->lock);
	if (pc->send_bb) {
		grpc_byte_buffer_destroy(pc->send_bb);
		pc->send_bb = NULL;
	}
	grpc_slice_unref(pc->details);
	unref_unlock(pc);
}

static struct pub_range *range_for(struct pub_call *pc, const char *topic, int32_t partition)
{
	for (size_t i = 0; i < pc->n_ranges; i++)
		if (pc->ranges[i].partition == partition && strcmp(pc->ranges[i].topic, topic) == 0)
			return &pc->ranges[i];
	pc->ranges = xrealloc(pc->ranges, (pc->n_ranges + 1) * sizeof(*pc->ranges));
	struct pub_range *r = &pc->ranges[pc->n_ranges++];
	r->topic = xstrdup(topic);
	r->partition = partition;
	r->first = INT64_MAX;
	r->last = -1;
	r->count = 0;
	return r;
}

/* One delivery report: records m's fate in its request. Under pc->lock. */
static void delivered(struct pub_call *pc, const rd_kafka_message_t *m)
{
	struct pub_req **slot = m->_private;
	struct pub_req *req = *slot;
	size_t index = slot - req->slot;

	if (req->results) {
		struct record_result *res = &req->results[index];
		res->partition = m->partition;
		res->offset = m->err ? -1 : m->offset;
		res->code = status_from_kafka(m->err);
		if (m->err)
			res->error = xasprintf("topic %s partition %" PRId32 ": not delivered to Kafka: %s",
					       rd_kafka_topic_name(m->rkt), m->partition,
					       rd_kafka_err2str(m->err));
	} else if (m->err) {
		req->failed = true;
		fail(pc, status_from_kafka(m->err),
		     xasprintf("request %" PRIu64 ", record %zu: topic %s partition %" PRId32
			       ": not delivered to Kafka: %s", req->index, index,
			       rd_kafka_topic_name(m->rkt), m->partition, rd_kafka_err2str(m->err)));
	} else {
		struct pub_range *r = range_for(pc, rd_kafka_topic_name(m->rkt), m->partition);
		if (m->offset >= 0) {
			if (m->offset < r->first)
				r->first = m->offset;
			if (m->offset > r->last)
				r->last = m->offset;
		}
		r->count++;
		pc->records_ok++;
	}
	req_settle(pc, req, 1);
}

/* The reports of one produce response usually come in runs of one call's records: the
 * call's lock is taken once per run. A record's request (and so its call) is alive until
 * its report is in, and a call is freed only once no request of it is left. */
void publish_on_delivery(const rd_kafka_message_t **msgs, size_t n)
{
	struct pub_call *pc = NULL;

	for (size_t i = 0; i < n; i++) {
		const rd_kafka_message_t *m = msgs[i];
		struct pub_req *req = *(struct pub_req **)m->_private;

		if (m->err == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART ||
		    m->err == RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC || m->err == RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION)
			topics_invalidate(rd_kafka_topic_name(m->rkt)); /* a leaf lock */
		if (req->pc != pc) {
			if (pc) {
				maybe_finish(pc);
				unlock_maybe_free(pc);
			}
			pc = req->pc;
			pthread_mutex_lock(&pc->lock);
		}
		delivered(pc, m);
	}
	if (pc) {
		maybe_finish(pc);
		unlock_maybe_free(pc);
	}
}

void publish_drain(void)
{
	pthread_mutex_lock(&registry_lock);
	for (struct pub_call *pc = registry; pc; pc = pc->next) {
		pthread_mutex_lock(&pc->lock);
		if (!pc->closed && (pc->state == PUB_READING || pc->state == PUB_PAUSED))
			fail(pc, GRPC_STATUS_UNAVAILABLE,
			     xasprintf("kbridged is shutting down: requests from index %" PRIu64
				       " on were not published; send them to another instance",
				       pc->next_index));
		maybe_finish(pc);
		pthread_mutex_unlock(&pc->lock);
	}
	pthread_mutex_unlock(&registry_lock);
}
