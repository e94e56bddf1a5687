/* bench: `kbridge bench`, a publish load generator for kbridged on gRPC's core API.
 *
 * Requests are numbered globally from 0; request r carries records r*K .. r*K+K-1 (K =
 * --batch; the last one may be shorter). With --rate R, request r is due at
 * t0 + r*K/R seconds; otherwise every request is due at once and only the windows hold
 * the client back.
 *
 * --rpc stream: S PublishStream calls; stream i sends requests i, i+S, i+2S, ... so that
 * a stream always knows whether *it* has another request ready. That is what makes the
 * write-buffer hint safe: a message is hinted only when this stream's next request is
 * already due and its window has room, so the send that completes next is certain to
 * start the next write, and the last write of every run of sends goes out unhinted
 * (hinted messages wait for an unhinted one). At most W (--window) requests per stream
 * are unacknowledged.
 * --rpc produce|publish: S*W call slots, each running one unary Produce call (or one
 * Publish call carrying one request) at a time; calls carry no hint (each ends with a
 * half-close, which flushes).
 *
 * Latency of a request: from its start to its ack (PublishAck, or the end of the call).
 * Its start is the moment it is handed to gRPC, or with --rate its due time, so that a
 * client that falls behind the schedule counts the wait too (no coordinated omission).
 *
 * Every value begins with a 24-byte stamp: magic, run id, record number, start time (ns,
 * CLOCK_MONOTONIC). With --subscribers M, M Subscribe calls (LATEST) on the topic are
 * opened on a few channels and all have their initial metadata (so the daemon has fixed
 * their start offsets) before the first publish; each received record of this run is
 * checked off in the subscriber's bitmap and its publish->subscriber latency recorded.
 *
 * Threads and locks: the main thread drives the publishing calls on its own completion
 * queue. With --rate a pacer thread hands each request to gRPC at its due time: the queue's
 * timeouts are whole milliseconds (epoll), so waiting on the queue alone started requests
 * up to 1 ms late, and that wait counted in their latency. struct bench.lock guards the
 * publishing state between the two. With --subscribers another thread drives the
 * Subscribe calls on another queue;
 * it shares only `struct subs`'s atomics with the main thread (ready, publish_done,
 * expected); its histogram and counts are read by the main thread after pthread_join. */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
#include <unistd.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

#include "bench.h"
#include "client.h"
#include "codec.h"
#include "hist.h"
#include "util.h"

#define METHOD_PUBLISH "/kbridge.v1.Bridge/Publish"
#define METHOD_PUBLISH_STREAM "/kbridge.v1.Bridge/PublishStream"
#define METHOD_PRODUCE "/kbridge.v1.Bridge/Produce"
#define METHOD_SUBSCRIBE "/kbridge.v1.Bridge/Subscribe"

#define EXIT_FAILED 1
#define EXIT_USAGE 2

#define STAMP_MAGIC 0x6e42624bu /* "KbBn" little-endian */
#define STAMP_BYTES 24
/* Subscriber bitmaps above this are refused: M*N/8 bytes. */
#define MAX_BITMAP_BYTES (1024ull * 1024 * 1024)
/* Longest wait for all subscribers' initial metadata. */
#define SUB_READY_MS 60000
/* Once publishing is done: how often the subscriber thread counts what arrived. */
#define SUB_CHECK_NS 10000000
#define POLL_NS 100000000

enum rpc { RPC_STREAM, RPC_PRODUCE, RPC_PUBLISH };
static const char *const rpc_names[] = {"stream", "produce", "publish"};

struct opts {
	const char *address;
	const char *topic;
	enum rpc rpc;
	unsigned streams, window, batch, size;
	uint64_t records;
	double rate; /* records/s, 0 = as fast as possible */
	unsigned subscribers, sub_channels, max_batch;
	double sub_wait; /* s without progress before giving up on subscribers */
	const char *slow_log; /* --slow-log FILE, or NULL */
	double slow_ms;       /* what --slow-log logs: requests taking this long or longer */
	bool json;
};

/* What a completion-queue tag points at. */
enum tag_kind {
	T_STREAM_MD,   /* SEND_INITIAL_METADATA of a PublishStream */
	T_STREAM_SEND, /* one SEND_MESSAGE, or SEND_CLOSE_FROM_CLIENT */
	T_STREAM_RECV, /* RECV_INITIAL_METADATA (first) or one RECV_MESSAGE */
	T_STREAM_STATUS,
	T_UNARY,       /* the whole Produce or Publish call */
	T_SUB_SEND,    /* Subscribe: metadata + request + half-close */
	T_SUB_MD,
	T_SUB_RECV,
	T_SUB_STATUS,
};

struct tag {
	enum tag_kind kind;
	void *obj;
};

struct bench;

struct pstream {
	struct bench *b;
	unsigned index;
	grpc_call *call;
	struct tag t_md, t_send, t_recv, t_status;
	grpc_metadata_array md;
	grpc_byte_buffer *recv_bb;
	struct status st;
	bool sending, got_md, got_rmd, closed, ended;
	uint64_t next_local; /* this stream's next request is index + next_local*S */
	unsigned inflight;
	/* per request of this stream, by its sequence: start time and records */
	int64_t *start_ns;
	uint32_t *n_records;
	bool *acked;
	size_t cap;
};

struct ucall {
	struct bench *b;
	grpc_call *call; /* NULL when the slot is free */
	struct tag tag;
	uint64_t request;
	uint32_t n_records;
	int64_t start_ns;
	grpc_byte_buffer *send_bb, *recv_bb;
	grpc_metadata_array md;
	struct status st;
};

struct sub {
	struct subs *ss;
	grpc_call *call;
	struct tag t_send, t_md, t_recv, t_status;
	grpc_byte_buffer *send_bb, *recv_bb;
	grpc_metadata_array md;
	struct status st;
	bool ended;
	uint64_t received, duplicates;
	uint8_t *seen;
};

struct subs {
	const struct opts *o;
	uint32_t run_id;
	grpc_completion_queue *cq;
	grpc_channel **channels;
	struct sub *sub;
	pthread_t thread;
	atomic_uint ready;        /* subscribers with initial metadata */
	atomic_bool publish_done; /* the publisher has every ack */
	atomic_uint_least64_t expected; /* records each subscriber must see */
	unsigned ended;
	uint64_t foreign;         /* records of other runs or producers */
	unsigned failed;          /* calls that ended other than by our cancel */
	struct hist lat;
};

struct bench {
	const struct opts *o;
	uint32_t run_id;
	grpc_completion_queue *cq;
	grpc_channel *channel;
	uint64_t n_requests, next_request; /* next_request: unary slots only */
	uint64_t acked_records, failed_records, done_requests;
	unsigned calls_failed;
	int64_t t0, t_last;
	struct pstream *streams;
	struct ucall *calls;
	size_t n_calls;
	unsigned live; /* streams not ended, or unary calls in flight */
	char *filler;
	struct hist lat;
	struct slowlog slow; /* --slow-log */
	bool first_error_printed;
	pthread_mutex_t lock; /* the main thread and the pacer (--rate) */
	bool finished;
};

/* ---- small helpers ---- */

static void __attribute__((format(printf, 1, 2), noreturn)) usage_error(const char *fmt, ...)
{
	va_list ap;

	fputs("kbridge bench: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputs("\nTry 'kbridge bench --help' for more information.\n", stderr);
	exit(EXIT_USAGE);
}

static uint64_t parse_u64(const char *opt, const char *arg, uint64_t min, uint64_t max)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(arg, &end, 10);
	if (arg[0] < '0' || arg[0] > '9' || *end || errno || v < min || v > max)
		usage_error("%s: '%s' is not a whole number from %" PRIu64 " to %" PRIu64, opt, arg,
			    min, max);
	return v;
}

static double parse_double(const char *opt, const char *arg, bool zero_ok)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(arg, &end);
	if (end == arg || *end || errno || !(zero_ok ? v >= 0 : v > 0) || v > 1e9)
		usage_error("%s: '%s' is not a number %s 0", opt, arg, zero_ok ? "of at least" : "above");
	return v;
}

static double parse_positive(const char *opt, const char *arg)
{
	return parse_double(opt, arg, false);
}

static void start_batch(grpc_call *call, const grpc_op *ops, size_t n, struct tag *tag)
{
	grpc_call_error err = grpc_call_start_batch(call, ops, n, tag, NULL);

	if (err != GRPC_CALL_OK) {
		fprintf(stderr, "kbridge bench: bug: grpc_call_start_batch failed (%d), tag kind %d\n",
			err, tag->kind);
		abort();
	}
}

static grpc_channel *channel_open(const char *address, bool own_connection)
{
	grpc_arg args[] = {
		{.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, .value.integer = -1},
		{.type = GRPC_ARG_STRING, .key = GRPC_ARG_PRIMARY_USER_AGENT_STRING,
		 .value.string = "kbridge-bench/" PACKAGE_VERSION},
		/* Channels to one address share a connection unless each has its own pool. */
		{.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, .value.integer = 1},
	};
	grpc_channel_args cargs = {own_connection ? 3 : 2, args};
	grpc_channel_credentials *creds = grpc_insecure_credentials_create();
	grpc_channel *ch = grpc_channel_create(address, creds, &cargs);

	grpc_channel_credentials_release(creds);
	return ch;
}

static grpc_call *call_new(grpc_channel *ch, grpc_completion_queue *cq, const char *method)
{
	return grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
					grpc_slice_from_static_string(method), NULL,
					gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
}

static void print_status_error(const char *what, const struct status *st)
{
	fprintf(stderr, "kbridge bench: %s: status %d: %.*s\n", what, st->code,
		(int)GRPC_SLICE_LENGTH(st->details), (const char *)GRPC_SLICE_START_PTR(st->details));
}

/* ---- request encoding ----
 * PublishRequest is encoded by hand, a handful of bytes around each value, because the
 * generator must cost far less than what it measures; bench_check_encoding proves the
 * result against protobuf-c once per run. */

static size_t record_body_len(const struct opts *o)
{
	size_t tlen = strlen(o->topic);

	return 1 + codec_varint_size(tlen) + tlen + 1 + codec_varint_size(o->size) + o->size;
}

static void stamp_put(uint8_t *p, uint32_t run_id, uint64_t seq, int64_t ns)
{
	uint32_t magic = STAMP_MAGIC;

	memcpy(p, &magic, 4);
	memcpy(p + 4, &run_id, 4);
	memcpy(p + 8, &seq, 8);
	memcpy(p + 16, &ns, 8);
}

/* Request r's records, each value stamped with `start_ns`. */
static grpc_byte_buffer *encode_request(struct bench *b, uint64_t r, uint32_t n, int64_t start_ns)
{
	const struct opts *o = b->o;
	size_t tlen = strlen(o->topic), body = record_body_len(o);
	size_t rec = 1 + codec_varint_size(body) + body;
	grpc_slice s = grpc_slice_malloc(rec * n);
	uint8_t *p = GRPC_SLICE_START_PTR(s);

	for (uint32_t i = 0; i < n; i++) {
		*p++ = 0x0a; /* PublishRequest.records, length-delimited */
		p = codec_put_varint(p, body);
		*p++ = 0x0a; /* Record.topic */
		p = codec_put_varint(p, tlen);
		memcpy(p, o->topic, tlen);
		p += tlen;
		*p++ = 0x1a; /* Record.value */
		p = codec_put_varint(p, o->size);
		memcpy(p, b->filler, o->size);
		if (o->size >= STAMP_BYTES)
			stamp_put(p, b->run_id, r * o->batch + i, start_ns);
		p += o->size;
	}
	grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
	grpc_slice_unref(s);
	return bb;
}

static uint32_t request_records(const struct bench *b, uint64_t r)
{
	uint64_t first = r * b->o->batch;
	uint64_t left = b->o->records - first;

	return left < b->o->batch ? (uint32_t)left : b->o->batch;
}

/* One encoded request must decode with protobuf-c to exactly what we meant. */
static bool bench_check_encoding(struct bench *b)
{
	uint32_t n = request_records(b, 0);
	grpc_byte_buffer *bb = encode_request(b, 0, n, 12345);
	Kbridge__V1__PublishRequest *req = (Kbridge__V1__PublishRequest *)codec_decode(
		&kbridge__v1__publish_request__descriptor, bb);
	bool ok = req && req->n_records == n;

	for (size_t i = 0; ok && i < req->n_records; i++) {
		const Kbridge__V1__Record *rec = req->records[i];
		ok = strcmp(rec->topic, b->o->topic) == 0 && rec->value.len == b->o->size &&
		     rec->n_headers == 0 && rec->key.len == 0;
	}
	if (req)
		protobuf_c_message_free_unpacked(&req->base, NULL);
	grpc_byte_buffer_destroy(bb);
	return ok;
}

/* ---- schedule ---- */

/* Requests due by `now`: all of them without --rate. */
static uint64_t requests_due(const struct bench *b, int64_t now)
{
	if (b->o->rate <= 0)
		return b->n_requests;
	double due = floor((double)(now - b->t0) * 1e-9 * b->o->rate / b->o->batch) + 1;
	return due >= (double)b->n_requests ? b->n_requests : (uint64_t)due;
}

static int64_t request_due_ns(const struct bench *b, uint64_t r)
{
	return b->t0 + (int64_t)((double)r * b->o->batch * 1e9 / b->o->rate);
}

/* Where a request's latency starts: its due time with --rate, else now. */
static int64_t request_start(const struct bench *b, uint64_t r, int64_t now)
{
	return b->o->rate > 0 ? request_due_ns(b, r) : now;
}

static void account(struct bench *b, int64_t start_ns, uint64_t ok, uint64_t failed)
{
	int64_t now = hist_now_ns();

	hist_add(&b->lat, now - start_ns);
	slowlog_add(&b->slow, start_ns, now - start_ns);
	b->acked_records += ok;
	b->failed_records += failed;
	b->done_requests++;
	b->t_last = now;
}

static void record_error(struct bench *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void record_error(struct bench *b, const char *fmt, ...)
{
	va_list ap;

	if (b->first_error_printed)
		return;
	b->first_error_printed = true;
	fputs("kbridge bench: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputs(" (only the first error is shown)\n", stderr);
}

/* Counts an ack's per-record results; true when it matches the request. */
static void count_results(struct bench *b, int64_t start_ns, uint32_t n, Kbridge__V1__PublishAck *ack)
{
	uint64_t ok = 0;

	for (size_t i = 0; i < ack->n_results; i++) {
		if (ack->results[i]->code == 0)
			ok++;
		else
			record_error(b, "record failed: code %d: %s", ack->results[i]->code,
				     ack->results[i]->error);
	}
	if (ack->n_results != n)
		record_error(b, "ack of request %" PRIu64 " has %zu results for %u records",
			     ack->sequence, ack->n_results, n);
	account(b, start_ns, ok, n - ok);
}

/* ---- PublishStream ---- */

static void stream_grow(struct pstream *s, uint64_t seq)
{
	if (seq < s->cap)
		return;
	size_t cap = s->cap ? s->cap * 2 : 1024;
	while (cap <= seq)
		cap *= 2;
	s->start_ns = xrealloc(s->start_ns, cap * sizeof(*s->start_ns));
	s->n_records = xrealloc(s->n_records, cap * sizeof(*s->n_records));
	s->acked = xrealloc(s->acked, cap * sizeof(*s->acked));
	memset(s->acked + s->cap, 0, (cap - s->cap) * sizeof(*s->acked));
	s->cap = cap;
}

static uint64_t stream_request(const struct pstream *s, uint64_t local)
{
	return s->index + local * s->b->o->streams;
}

/* Starts this stream's next write if it has one: a request, or the half-close. */
static void stream_pump(struct pstream *s, int64_t now)
{
	struct bench *b = s->b;

	if (s->sending || s->closed || !s->got_md || s->ended)
		return;
	uint64_t r = stream_request(s, s->next_local);
	if (r >= b->n_requests) {
		grpc_op op = {.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT};
		s->closed = s->sending = true;
		start_batch(s->call, &op, 1, &s->t_send);
		return;
	}
	uint64_t due = requests_due(b, now);
	if (r >= due || s->inflight >= b->o->window)
		return;
	uint64_t seq = s->next_local++;
	uint32_t n = request_records(b, r);
	int64_t start = request_start(b, r, now);
	/* Hint only when our own next request is due and fits the window: then the
	 * completion of this send starts it, and the run of writes ends unhinted. */
	bool more = stream_request(s, s->next_local) < due && s->inflight + 1 < b->o->window;
	stream_grow(s, seq);
	s->start_ns[seq] = start;
	s->n_records[seq] = n;
	grpc_op op = {.op = GRPC_OP_SEND_MESSAGE, .flags = more ? GRPC_WRITE_BUFFER_HINT : 0,
		      .data.send_message.send_message = encode_request(b, r, n, start)};
	s->inflight++;
	s->sending = true;
	start_batch(s->call, &op, 1, &s->t_send);
	grpc_byte_buffer_destroy(op.data.send_message.send_message);
}

static void stream_recv_next(struct pstream *s)
{
	grpc_op op = {.op = GRPC_OP_RECV_MESSAGE, .data.recv_message.recv_message = &s->recv_bb};
	start_batch(s->call, &op, 1, &s->t_recv);
}

static void stream_on_ack(struct pstream *s)
{
	struct bench *b = s->b;
	Kbridge__V1__PublishAck *ack = (Kbridge__V1__PublishAck *)codec_decode(
		&kbridge__v1__publish_ack__descriptor, s->recv_bb);

	grpc_byte_buffer_destroy(s->recv_bb);
	s->recv_bb = NULL;
	if (!ack) {
		record_error(b, "stream %u: undecodable PublishAck", s->index);
		grpc_call_cancel(s->call, NULL);
		return;
	}
	uint64_t seq = ack->sequence;
	if (seq >= s->next_local || s->acked[seq]) {
		record_error(b, "stream %u: unexpected ack sequence %" PRIu64, s->index, seq);
	} else {
		s->acked[seq] = true;
		s->inflight--;
		count_results(b, s->start_ns[seq], s->n_records[seq], ack);
	}
	protobuf_c_message_free_unpacked(&ack->base, NULL);
	stream_recv_next(s);
}

static void stream_start(struct pstream *s)
{
	struct bench *b = s->b;
	grpc_op md = {.op = GRPC_OP_SEND_INITIAL_METADATA};
	grpc_op rmd = {.op = GRPC_OP_RECV_INITIAL_METADATA,
		       .data.recv_initial_metadata.recv_initial_metadata = &s->md};
	grpc_op st = status_op(&s->st);

	s->call = call_new(b->channel, b->cq, METHOD_PUBLISH_STREAM);
	/* Initial metadata alone: never together with a hinted message. */
	start_batch(s->call, &md, 1, &s->t_md);
	start_batch(s->call, &st, 1, &s->t_status);
	start_batch(s->call, &rmd, 1, &s->t_recv);
	s->sending = true;
	b->live++;
}

static void stream_event(struct pstream *s, enum tag_kind kind, bool ok)
{
	struct bench *b = s->b;

	switch (kind) {
	case T_STREAM_MD:
		s->sending = false;
		s->got_md = true;
		break;
	case T_STREAM_SEND:
		s->sending = false;
		break;
	case T_STREAM_RECV:
		if (!ok)
			break;
		if (!s->got_rmd) { /* the initial metadata; now the acks */
			s->got_rmd = true;
			stream_recv_next(s);
		} else if (s->recv_bb) {
			stream_on_ack(s);
		} /* else the server ended the stream: the status follows */
		break;
	case T_STREAM_STATUS:
		s->ended = true;
		b->live--;
		if (s->st.code != GRPC_STATUS_OK || s->inflight || !s->closed) {
			b->calls_failed++;
			print_status_error("PublishStream ended", &s->st);
		}
		return;
	default:
		abort();
	}
}

/* ---- Produce / Publish: one call per request ---- */

static void unary_start(struct ucall *c, uint64_t r, int64_t now)
{
	struct bench *b = c->b;
	const char *method = b->o->rpc == RPC_PRODUCE ? METHOD_PRODUCE : METHOD_PUBLISH;

	c->request = r;
	c->n_records = request_records(b, r);
	c->start_ns = request_start(b, r, now);
	c->send_bb = encode_request(b, r, c->n_records, c->start_ns);
	c->recv_bb = NULL;
	grpc_metadata_array_init(&c->md);
	status_init(&c->st);
	c->call = call_new(b->channel, b->cq, method);
	grpc_op ops[] = {
		{.op = GRPC_OP_SEND_INITIAL_METADATA},
		{.op = GRPC_OP_SEND_MESSAGE, .data.send_message.send_message = c->send_bb},
		{.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT},
		{.op = GRPC_OP_RECV_INITIAL_METADATA, .data.recv_initial_metadata.recv_initial_metadata = &c->md},
		{.op = GRPC_OP_RECV_MESSAGE, .data.recv_message.recv_message = &c->recv_bb},
		status_op(&c->st),
	};
	start_batch(c->call, ops, ARRAY_SIZE(ops), &c->tag);
	b->live++;
}

static void unary_done(struct ucall *c)
{
	struct bench *b = c->b;

	b->live--;
	if (c->st.code != GRPC_STATUS_OK) {
		b->calls_failed++;
		record_error(b, "%s call of request %" PRIu64 " failed: status %d: %.*s",
			     rpc_names[b->o->rpc], c->request, c->st.code,
			     (int)GRPC_SLICE_LENGTH(c->st.details),
			     (const char *)GRPC_SLICE_START_PTR(c->st.details));
		account(b, c->start_ns, 0, c->n_records);
	} else if (b->o->rpc == RPC_PRODUCE) {
		Kbridge__V1__PublishAck *ack = (Kbridge__V1__PublishAck *)codec_decode(
			&kbridge__v1__publish_ack__descriptor, c->recv_bb);
		if (ack) {
			count_results(b, c->start_ns, c->n_records, ack);
			protobuf_c_message_free_unpacked(&ack->base, NULL);
		} else {
			record_error(b, "undecodable PublishAck");
			account(b, c->start_ns, 0, c->n_records);
		}
	} else {
		Kbridge__V1__PublishResponse *resp = (Kbridge__V1__PublishResponse *)codec_decode(
			&kbridge__v1__publish_response__descriptor, c->recv_bb);
		uint64_t ok = resp && resp->records == c->n_records ? c->n_records : 0;
		if (!ok)
			record_error(b, "PublishResponse of request %" PRIu64 " does not count %u records",
				     c->request, c->n_records);
		account(b, c->start_ns, ok, c->n_records - ok);
		if (resp)
			protobuf_c_message_free_unpacked(&resp->base, NULL);
	}
	grpc_byte_buffer_destroy(c->send_bb);
	if (c->recv_bb)
		grpc_byte_buffer_destroy(c->recv_bb);
	grpc_metadata_array_destroy(&c->md);
	status_destroy(&c->st);
	grpc_call_unref(c->call);
	c->call = NULL;
}

/* ---- subscribers (their own thread and completion queue) ---- */

static void sub_recv_next(struct sub *s)
{
	grpc_op op = {.op = GRPC_OP_RECV_MESSAGE, .data.recv_message.recv_message = &s->recv_bb};
	start_batch(s->call, &op, 1, &s->t_recv);
}

static void sub_start(struct subs *ss, struct sub *s, grpc_channel *ch)
{
	char *topics[] = {(char *)ss->o->topic};
	Kbridge__V1__SubscribeRequest req = KBRIDGE__V1__SUBSCRIBE_REQUEST__INIT;

	req.n_topics = 1;
	req.topics = topics;
	req.start = KBRIDGE__V1__SUBSCRIBE_REQUEST__START__LATEST;
	req.max_batch = ss->o->max_batch;
	s->ss = ss;
	s->t_send = (struct tag){T_SUB_SEND, s};
	s->t_md = (struct tag){T_SUB_MD, s};
	s->t_recv = (struct tag){T_SUB_RECV, s};
	s->t_status = (struct tag){T_SUB_STATUS, s};
	grpc_metadata_array_init(&s->md);
	status_init(&s->st);
	s->send_bb = codec_encode(&req.base);
	s->call = call_new(ch, ss->cq, METHOD_SUBSCRIBE);
	grpc_op send[] = {
		{.op = GRPC_OP_SEND_INITIAL_METADATA},
		{.op = GRPC_OP_SEND_MESSAGE, .data.send_message.send_message = s->send_bb},
		{.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT},
	};
	grpc_op md = {.op = GRPC_OP_RECV_INITIAL_METADATA,
		      .data.recv_initial_metadata.recv_initial_metadata = &s->md};
	grpc_op st = status_op(&s->st);
	start_batch(s->call, send, ARRAY_SIZE(send), &s->t_send);
	start_batch(s->call, &md, 1, &s->t_md);
	start_batch(s->call, &st, 1, &s->t_status);
}

static void sub_on_message(struct sub *s, int64_t now)
{
	struct subs *ss = s->ss;
	uint64_t n = atomic_load(&ss->expected);
	Kbridge__V1__SubscribeResponse *resp = (Kbridge__V1__SubscribeResponse *)codec_decode(
		&kbridge__v1__subscribe_response__descriptor, s->recv_bb);

	grpc_byte_buffer_destroy(s->recv_bb);
	s->recv_bb = NULL;
	if (!resp) {
		fputs("kbridge bench: undecodable SubscribeResponse\n", stderr);
		grpc_call_cancel(s->call, NULL);
		return;
	}
	for (size_t i = 0; i < resp->n_records; i++) {
		const ProtobufCBinaryData *v = &resp->records[i]->value;
		uint32_t magic, run;
		uint64_t seq;
		int64_t ns;

		if (v->len < STAMP_BYTES) {
			ss->foreign++;
			continue;
		}
		memcpy(&magic, v->data, 4);
		memcpy(&run, v->data + 4, 4);
		memcpy(&seq, v->data + 8, 8);
		memcpy(&ns, v->data + 16, 8);
		if (magic != STAMP_MAGIC || run != ss->run_id || seq >= n) {
			ss->foreign++;
			continue;
		}
		if (s->seen[seq / 8] & (1u << (seq % 8))) {
			s->duplicates++;
			continue;
		}
		s->seen[seq / 8] |= (uint8_t)(1u << (seq % 8));
		s->received++;
		hist_add(&ss->lat, now - ns);
	}
	protobuf_c_message_free_unpacked(&resp->base, NULL);
	sub_recv_next(s);
}

static void sub_event(struct sub *s, enum tag_kind kind, bool ok, int64_t now)
{
	struct subs *ss = s->ss;

	switch (kind) {
	case T_SUB_SEND:
		break;
	case T_SUB_MD:
		if (ok) {
			atomic_fetch_add(&ss->ready, 1);
			sub_recv_next(s);
		}
		break;
	case T_SUB_RECV:
		if (ok && s->recv_bb)
			sub_on_message(s, now);
		break;
	case T_SUB_STATUS:
		s->ended = true;
		ss->ended++;
		if (s->st.code != GRPC_STATUS_CANCELLED || !atomic_load(&ss->publish_done)) {
			ss->failed++;
			if (ss->failed == 1)
				print_status_error("Subscribe ended", &s->st);
		}
		break;
	default:
		abort();
	}
}

static bool subs_all_received(struct subs *ss)
{
	uint64_t n = atomic_load(&ss->expected);

	for (unsigned i = 0; i < ss->o->subscribers; i++)
		if (ss->sub[i].received < n && !ss->sub[i].ended)
			return false;
	return true;
}

static uint64_t subs_total(struct subs *ss)
{
	uint64_t t = 0;

	for (unsigned i = 0; i < ss->o->subscribers; i++)
		t += ss->sub[i].received;
	return t;
}

static void *subs_main(void *arg)
{
	struct subs *ss = arg;
	unsigned m = ss->o->subscribers;
	bool cancelled = false;
	uint64_t last_total = 0;
	int64_t last_progress = hist_now_ns(), last_check = 0;

	for (unsigned i = 0; i < m; i++)
		sub_start(ss, &ss->sub[i], ss->channels[i % ss->o->sub_channels]);
	while (ss->ended < m) {
		gpr_timespec t = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
					      gpr_time_from_millis(50, GPR_TIMESPAN));
		grpc_event ev = grpc_completion_queue_next(ss->cq, t, NULL);
		int64_t now = hist_now_ns();
		if (ev.type == GRPC_OP_COMPLETE) {
			struct tag *tag = ev.tag;
			sub_event(tag->obj, tag->kind, ev.success, now);
		}
		/* Checking walks every subscriber: not after every completion while the
		 * last records still arrive, or it would slow their receipt. */
		if (cancelled || !atomic_load(&ss->publish_done) ||
		    (ev.type == GRPC_OP_COMPLETE && now - last_check < SUB_CHECK_NS))
			continue;
		last_check = now;
		uint64_t total = subs_total(ss);
		if (total != last_total) {
			last_total = total;
			last_progress = now;
		}
		if (subs_all_received(ss) || now - last_progress > (int64_t)(ss->o->sub_wait * 1e9)) {
			for (unsigned i = 0; i < m; i++)
				grpc_call_cancel(ss->sub[i].call, NULL);
			cancelled = true;
		}
	}
	return NULL;
}

static void subs_open(struct subs *ss, const struct opts *o, uint32_t run_id)
{
	uint64_t bitmap = (o->records + 7) / 8;

	memset(ss, 0, sizeof(*ss));
	ss->o = o;
	ss->run_id = run_id;
	atomic_store(&ss->expected, o->records);
	hist_init(&ss->lat);
	ss->cq = grpc_completion_queue_create_for_next(NULL);
	ss->channels = xcalloc(o->sub_channels, sizeof(*ss->channels));
	for (unsigned i = 0; i < o->sub_channels; i++)
		ss->channels[i] = channel_open(o->address, true);
	ss->sub = xcalloc(o->subscribers, sizeof(*ss->sub));
	for (unsigned i = 0; i < o->subscribers; i++)
		ss->sub[i].seen = xcalloc(bitmap, 1);
	if (pthread_create(&ss->thread, NULL, subs_main, ss) != 0) {
		fputs("kbridge bench: cannot start the subscriber thread\n", stderr);
		exit(EXIT_FAILED);
	}
}

/* Waits until every subscriber has its initial metadata; false after SUB_READY_MS. */
static bool subs_wait_ready(struct subs *ss)
{
	int64_t end = hist_now_ns() + (int64_t)SUB_READY_MS * 1000000;

	while (atomic_load(&ss->ready) < ss->o->subscribers) {
		if (hist_now_ns() > end)
			return false;
		struct timespec ts = {0, 10000000};
		nanosleep(&ts, NULL);
	}
	return true;
}

/* After the publisher is done: waits for the thread and closes everything. */
static void subs_close(struct subs *ss)
{
	atomic_store(&ss->publish_done, true);
	pthread_join(ss->thread, NULL);
	for (unsigned i = 0; i < ss->o->subscribers; i++) {
		struct sub *s = &ss->sub[i];
		grpc_call_unref(s->call);
		grpc_byte_buffer_destroy(s->send_bb);
		if (s->recv_bb)
			grpc_byte_buffer_destroy(s->recv_bb);
		grpc_metadata_array_destroy(&s->md);
		status_destroy(&s->st);
	}
	for (unsigned i = 0; i < ss->o->sub_channels; i++)
		grpc_channel_destroy(ss->channels[i]);
	grpc_completion_queue_shutdown(ss->cq);
	while (grpc_completion_queue_next(ss->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
	       GRPC_QUEUE_SHUTDOWN)
		;
	grpc_completion_queue_destroy(ss->cq);
}

static void subs_free(struct subs *ss)
{
	for (unsigned i = 0; i < ss->o->subscribers; i++)
		free(ss->sub[i].seen);
	free(ss->sub);
	free(ss->channels);
	hist_destroy(&ss->lat);
}

/* ---- the publishing run ---- */

static void bench_pump(struct bench *b, int64_t now)
{
	if (b->o->rpc == RPC_STREAM) {
		for (unsigned i = 0; i < b->o->streams; i++)
			stream_pump(&b->streams[i], now);
		return;
	}
	uint64_t due = requests_due(b, now);
	for (size_t i = 0; i < b->n_calls && b->next_request < due; i++)
		if (!b->calls[i].call)
			unary_start(&b->calls[i], b->next_request++, now);
}

static bool bench_finished(const struct bench *b)
{
	if (b->o->rpc == RPC_STREAM)
		return b->live == 0;
	return b->live == 0 && b->next_request == b->n_requests;
}

/* How long the queue may block (due requests are the pacer's with --rate). */
static gpr_timespec bench_wait_until(void)
{
	return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_nanos(POLL_NS, GPR_TIMESPAN));
}

/* --rate: starts each request at its due time (when its window has room; otherwise the
 * ack that makes room starts it, on the main thread). */
static void *pacer_main(void *arg)
{
	struct bench *b = arg;

	pthread_mutex_lock(&b->lock);
	while (!b->finished) {
		uint64_t next = requests_due(b, hist_now_ns());
		if (next >= b->n_requests)
			break;
		int64_t at = request_due_ns(b, next);
		pthread_mutex_unlock(&b->lock);
		hist_sleep_until(at);
		pthread_mutex_lock(&b->lock);
		if (!b->finished)
			bench_pump(b, hist_now_ns());
	}
	pthread_mutex_unlock(&b->lock);
	return NULL;
}

static void bench_run(struct bench *b)
{
	const struct opts *o = b->o;
	pthread_t pacer;

	b->t0 = hist_now_ns();
	b->t_last = b->t0;
	if (o->rpc == RPC_STREAM) {
		b->streams = xcalloc(o->streams, sizeof(*b->streams));
		for (unsigned i = 0; i < o->streams; i++) {
			struct pstream *s = &b->streams[i];
			s->b = b;
			s->index = i;
			s->t_md = (struct tag){T_STREAM_MD, s};
			s->t_send = (struct tag){T_STREAM_SEND, s};
			s->t_recv = (struct tag){T_STREAM_RECV, s};
			s->t_status = (struct tag){T_STREAM_STATUS, s};
			grpc_metadata_array_init(&s->md);
			status_init(&s->st);
			stream_start(s);
		}
	} else {
		b->n_calls = (size_t)o->streams * o->window;
		b->calls = xcalloc(b->n_calls, sizeof(*b->calls));
		for (size_t i = 0; i < b->n_calls; i++) {
			b->calls[i].b = b;
			b->calls[i].tag = (struct tag){T_UNARY, &b->calls[i]};
		}
	}
	pthread_mutex_init(&b->lock, NULL);
	pthread_mutex_lock(&b->lock);
	bench_pump(b, hist_now_ns());
	if (o->rate > 0 && pthread_create(&pacer, NULL, pacer_main, b) != 0) {
		fputs("kbridge bench: cannot start the pacer thread\n", stderr);
		exit(EXIT_FAILURE);
	}
	while (!bench_finished(b)) {
		pthread_mutex_unlock(&b->lock);
		grpc_event ev = grpc_completion_queue_next(b->cq, bench_wait_until(), NULL);
		int64_t now = hist_now_ns();
		pthread_mutex_lock(&b->lock);
		if (ev.type == GRPC_OP_COMPLETE) {
			struct tag *tag = ev.tag;
			if (tag->kind == T_UNARY)
				unary_done(tag->obj);
			else
				stream_event(tag->obj, tag->kind, ev.success);
		}
		bench_pump(b, now);
	}
	b->finished = true;
	pthread_mutex_unlock(&b->lock);
	if (o->rate > 0)
		pthread_join(pacer, NULL);
	pthread_mutex_destroy(&b->lock);
	if (b->streams) {
		for (unsigned i = 0; i < o->streams; i++) {
			struct pstream *s = &b->streams[i];
			grpc_call_unref(s->call);
			grpc_metadata_array_destroy(&s->md);
			status_destroy(&s->st);
			free(s->start_ns);
			free(s->n_records);
			free(s->acked);
		}
		free(b->streams);
	}
	free(b->calls);
}

/* ---- report ---- */

/* CPU seconds (user + system) this process has used so far, every thread. */
static double process_cpu_s(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void report_text(const struct bench *b, const struct subs *ss, double secs, double cpu_s)
{
	const struct opts *o = b->o;
	double rps = secs > 0 ? b->acked_records / secs : 0;

	printf("rpc %s, %u stream(s), window %u, %" PRIu64 " records of %u B, %u per request",
	       rpc_names[o->rpc], o->streams, o->window, o->records, o->size, o->batch);
	if (o->rate > 0)
		printf(", rate %.0f records/s", o->rate);
	printf("\nacked %" PRIu64 " records (%" PRIu64 " failed) in %.3f s: %.0f records/s, %.2f MB/s\n",
	       b->acked_records, b->failed_records, secs, rps, rps * o->size / 1e6);
	printf("latency %s (%" PRIu64 " requests): ",
	       o->rpc == RPC_PUBLISH ? "of a Publish call" : "request->ack", b->lat.count);
	hist_print_text(stdout, &b->lat);
	putchar('\n');
	printf("client CPU %.2f s (user + system, every thread of this process)\n", cpu_s);
	if (o->slow_log)
		printf("slow log: %" PRIu64 " requests of %g ms or more in %s\n", b->slow.lines, o->slow_ms,
		       o->slow_log);
	if (!ss)
		return;
	unsigned complete = 0;
	uint64_t lo = UINT64_MAX, hi = 0, dup = 0;
	for (unsigned i = 0; i < o->subscribers; i++) {
		const struct sub *s = &ss->sub[i];
		complete += s->received == o->records;
		lo = s->received < lo ? s->received : lo;
		hi = s->received > hi ? s->received : hi;
		dup += s->duplicates;
	}
	printf("subscribers %u: %u received all %" PRIu64 " records (fewest %" PRIu64 ", most %" PRIu64
	       ", duplicates %" PRIu64 ", other records %" PRIu64 ", failed calls %u)\n",
	       o->subscribers, complete, o->records, lo, hi, dup, ss->foreign, ss->failed);
	printf("latency publish->subscriber (%" PRIu64 " deliveries): ", ss->lat.count);
	hist_print_text(stdout, &ss->lat);
	putchar('\n');
}

static void report_json(const struct bench *b, const struct subs *ss, double secs, double cpu_s)
{
	const struct opts *o = b->o;
	double rps = secs > 0 ? b->acked_records / secs : 0;

	printf("{\"tool\": \"kbridge-bench\", \"rpc\": \"%s\", \"streams\": %u, \"window\": %u, "
	       "\"records\": %" PRIu64 ", \"size\": %u, \"batch\": %u, \"rate\": %.0f, "
	       "\"acked\": %" PRIu64 ", \"failed\": %" PRIu64 ", \"calls_failed\": %u, "
	       "\"elapsed_s\": %.6f, \"records_per_s\": %.1f, \"mb_per_s\": %.3f, \"client_cpu_s\": %.3f, ",
	       rpc_names[o->rpc], o->streams, o->window, o->records, o->size, o->batch, o->rate,
	       b->acked_records, b->failed_records, b->calls_failed, secs, rps, rps * o->size / 1e6, cpu_s);
	hist_print_json(stdout, "latency_us", &b->lat);
	if (o->slow_log)
		printf(", \"slow_log\": {\"min_ms\": %g, \"lines\": %" PRIu64 "}", o->slow_ms, b->slow.lines);
	if (ss) {
		unsigned complete = 0;
		uint64_t lo = UINT64_MAX, hi = 0, dup = 0;
		for (unsigned i = 0; i < o->subscribers; i++) {
			const struct sub *s = &ss->sub[i];
			complete += s->received == o->records;
			lo = s->received < lo ? s->received : lo;
			hi = s->received > hi ? s->received : hi;
			dup += s->duplicates;
		}
		printf(", \"subscribers\": {\"count\": %u, \"complete\": %u, \"min_records\": %" PRIu64
		       ", \"max_records\": %" PRIu64 ", \"duplicates\": %" PRIu64 ", \"foreign\": %" PRIu64
		       ", \"failed\": %u, ",
		       o->subscribers, complete, lo, hi, dup, ss->foreign, ss->failed);
		hist_print_json(stdout, "latency_us", &ss->lat);
		putchar('}');
	}
	puts("}");
}

static bool subs_ok(const struct subs *ss)
{
	for (unsigned i = 0; i < ss->o->subscribers; i++)
		if (ss->sub[i].received != ss->o->records || ss->sub[i].duplicates)
			return false;
	return ss->failed == 0;
}

/* ---- command line ---- */

static void usage(FILE *f)
{
	fputs("Usage: kbridge bench [OPTION]...\n"
	      "Publish generated records through kbridged as fast as possible or at a fixed rate,\n"
	      "and report throughput and latency percentiles.\n"
	      "\n"
	      "  -a, --address ADDR     kbridged address, HOST:PORT or unix:PATH\n"
	      "  -t, --topic TOPIC      topic to publish to (default: bench)\n"
	      "      --rpc RPC          stream (PublishStream, default), produce (one unary\n"
	      "                         Produce call per request) or publish (one short Publish\n"
	      "                         call per request: its latency is the whole call's)\n"
	      "      --streams S        PublishStream calls, or S*W concurrent calls (default 1)\n"
	      "      --window W         unacknowledged requests per stream (default 64)\n"
	      "      --records N        records in all (default 100000)\n"
	      "      --size B           bytes of each value (default 100; at least 24 with\n"
	      "                         --subscribers: a value starts with a timestamp)\n"
	      "      --batch K          records per request (default 100)\n"
	      "      --rate R           records per second (default: as fast as possible)\n"
	      "      --subscribers M    also open M LATEST subscriptions of the topic before\n"
	      "                         publishing and check that each receives every record\n"
	      "      --sub-channels C   connections the subscriptions share (default 4)\n"
	      "      --max-batch N      max_batch of the subscriptions (default: the server's)\n"
	      "      --sub-wait SECS    give up on subscribers after SECS without progress\n"
	      "                         once publishing is done (default 10)\n"
	      "      --slow-log FILE    write \"START_NS LATENCY_NS\" to FILE for every request\n"
	      "                         that took --slow-ms or longer (CLOCK_MONOTONIC)\n"
	      "      --slow-ms MS       the threshold of --slow-log (default 1; 0 logs all)\n"
	      "      --json             print one JSON object instead of text\n"
	      "  -h, --help             print this help and exit\n"
	      "\n"
	      "Latency starts when a request is handed to gRPC, or with --rate at its scheduled\n"
	      "time, and ends at its ack. Exit status: 0 when every record was acknowledged\n"
	      "(and every subscriber received every record), 1 otherwise, 2 usage error.\n",
	      f);
}

enum {
	OPT_RPC = 256, OPT_STREAMS, OPT_WINDOW, OPT_RECORDS, OPT_SIZE, OPT_BATCH, OPT_RATE,
	OPT_SUBSCRIBERS, OPT_SUB_CHANNELS, OPT_MAX_BATCH, OPT_SUB_WAIT, OPT_SLOW_LOG, OPT_SLOW_MS,
	OPT_JSON,
};

static void parse_args(struct opts *o, int argc, char **argv)
{
	static const struct option longopts[] = {
		{"address", required_argument, NULL, 'a'}, {"topic", required_argument, NULL, 't'},
		{"rpc", required_argument, NULL, OPT_RPC}, {"streams", required_argument, NULL, OPT_STREAMS},
		{"window", required_argument, NULL, OPT_WINDOW},
		{"records", required_argument, NULL, OPT_RECORDS},
		{"size", required_argument, NULL, OPT_SIZE}, {"batch", required_argument, NULL, OPT_BATCH},
		{"rate", required_argument, NULL, OPT_RATE},
		{"subscribers", required_argument, NULL, OPT_SUBSCRIBERS},
		{"sub-channels", required_argument, NULL, OPT_SUB_CHANNELS},
		{"max-batch", required_argument, NULL, OPT_MAX_BATCH},
		{"sub-wait", required_argument, NULL, OPT_SUB_WAIT},
		{"slow-log", required_argument, NULL, OPT_SLOW_LOG},
		{"slow-ms", required_argument, NULL, OPT_SLOW_MS},
		{"json", no_argument, NULL, OPT_JSON}, {"help", no_argument, NULL, 'h'}, {0}};
	int c;

	while ((c = getopt_long(argc, argv, "a:t:h", longopts, NULL)) != -1) {
		switch (c) {
		case 'a': o->address = optarg; break;
		case 't': o->topic = optarg; break;
		case OPT_RPC:
			if (strcmp(optarg, "stream") == 0)
				o->rpc = RPC_STREAM;
			else if (strcmp(optarg, "produce") == 0)
				o->rpc = RPC_PRODUCE;
			else if (strcmp(optarg, "publish") == 0)
				o->rpc = RPC_PUBLISH;
			else
				usage_error("--rpc: '%s' is not stream, produce or publish", optarg);
			break;
		case OPT_STREAMS: o->streams = parse_u64("--streams", optarg, 1, 1000); break;
		case OPT_WINDOW: o->window = parse_u64("--window", optarg, 1, 100000); break;
		case OPT_RECORDS: o->records = parse_u64("--records", optarg, 1, UINT64_C(1) << 40); break;
		case OPT_SIZE: o->size = parse_u64("--size", optarg, 0, 16 << 20); break;
		case OPT_BATCH: o->batch = parse_u64("--batch", optarg, 1, 100000); break;
		case OPT_RATE: o->rate = parse_positive("--rate", optarg); break;
		case OPT_SUBSCRIBERS: o->subscribers = parse_u64("--subscribers", optarg, 0, 100000); break;
		case OPT_SUB_CHANNELS: o->sub_channels = parse_u64("--sub-channels", optarg, 1, 1000); break;
		case OPT_MAX_BATCH: o->max_batch = parse_u64("--max-batch", optarg, 0, 100000); break;
		case OPT_SUB_WAIT: o->sub_wait = parse_positive("--sub-wait", optarg); break;
		case OPT_SLOW_LOG: o->slow_log = optarg; break;
		case OPT_SLOW_MS: o->slow_ms = parse_double("--slow-ms", optarg, true); break;
		case OPT_JSON: o->json = true; break;
		case 'h': usage(stdout); exit(0);
		default:
			fputs("Try 'kbridge bench --help' for more information.\n", stderr);
			exit(EXIT_USAGE);
		}
	}
	if (optind < argc)
		usage_error("unexpected argument '%s'", argv[optind]);
	if (!*o->topic)
		usage_error("--topic: empty topic");
	if (o->subscribers) {
		if (o->size < STAMP_BYTES)
			usage_error("--subscribers needs --size %d or more (each value carries a stamp)",
				    STAMP_BYTES);
		if ((o->records + 7) / 8 * o->subscribers > MAX_BITMAP_BYTES)
			usage_error("--records times --subscribers is too large to check (at most %llu bits)",
				    MAX_BITMAP_BYTES * 8);
		if (o->sub_channels > o->subscribers)
			o->sub_channels = o->subscribers;
	}
	if ((uint64_t)o->batch * o->size > 200u << 20)
		usage_error("--batch times --size is above 200 MiB");
}

int bench_main(const char *address, int argc, char **argv)
{
	struct opts o = {.address = address, .topic = "bench", .rpc = RPC_STREAM, .streams = 1,
			 .window = 64, .batch = 100, .size = 100, .records = 100000,
			 .sub_channels = 4, .sub_wait = 10, .slow_ms = 1};
	struct bench b = {.o = &o};
	struct subs ss;
	int rc = 0;

	signal(SIGINT, SIG_DFL); /* no clean stop to wait for: ^C ends the run */
	parse_args(&o, argc, argv);
	b.run_id = (uint32_t)(hist_now_ns() ^ ((int64_t)getpid() << 16));
	b.n_requests = (o.records + o.batch - 1) / o.batch;
	b.filler = xmalloc(o.size ? o.size : 1);
	memset(b.filler, 'x', o.size);
	hist_init(&b.lat);
	if (o.slow_log && slowlog_open(&b.slow, o.slow_log, (int64_t)(o.slow_ms * 1e6)) != 0) {
		fprintf(stderr, "kbridge bench: --slow-log %s: %s\n", o.slow_log, strerror(errno));
		return EXIT_FAILED;
	}
	grpc_init();
	if (!bench_check_encoding(&b)) {
		fputs("kbridge bench: bug: the hand-encoded PublishRequest does not decode\n", stderr);
		return EXIT_FAILED;
	}
	b.cq = grpc_completion_queue_create_for_next(NULL);
	b.channel = channel_open(o.address, false);
	if (o.subscribers) {
		subs_open(&ss, &o, b.run_id);
		if (!subs_wait_ready(&ss)) {
			fprintf(stderr, "kbridge bench: only %u of %u subscribers started within %d s\n",
				atomic_load(&ss.ready), o.subscribers, SUB_READY_MS / 1000);
			rc = EXIT_FAILED;
		}
	}
	/* The client's CPU from here: publishing, and receiving until the last subscriber
	 * is done (not connecting and subscribing). */
	double cpu0 = process_cpu_s();
	if (rc == 0)
		bench_run(&b);
	if (o.subscribers)
		subs_close(&ss);
	double secs = (b.t_last - b.t0) / 1e9, cpu_s = process_cpu_s() - cpu0;
	if (rc == 0) {
		if (o.json)
			report_json(&b, o.subscribers ? &ss : NULL, secs, cpu_s);
		else
			report_text(&b, o.subscribers ? &ss : NULL, secs, cpu_s);
		fflush(stdout);
		if (b.acked_records != o.records || b.calls_failed || (o.subscribers && !subs_ok(&ss)))
			rc = EXIT_FAILED;
	}
	if (o.subscribers)
		subs_free(&ss);
	grpc_channel_destroy(b.channel);
	grpc_completion_queue_shutdown(b.cq);
	while (grpc_completion_queue_next(b.cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
	       GRPC_QUEUE_SHUTDOWN)
		;
	grpc_completion_queue_destroy(b.cq);
	hist_destroy(&b.lat);
	if (slowlog_close(&b.slow) != 0) {
		fprintf(stderr, "kbridge bench: --slow-log %s: %s\n", o.slow_log, strerror(errno));
		rc = EXIT_FAILED;
	}
	free(b.filler);
	grpc_shutdown();
	return rc;
}
