/* null-sink: what the gRPC hop alone costs. A minimal server on the same gRPC core as
 * kbridged, with the same threading (a non-polling completion queue for Subscribe served
 * by one thread per CPU, another for the publishing methods served by half as many), that
 * registers /kbridge.v1.Bridge/Publish and PublishStream, decodes every PublishRequest
 * with kbridged's decoder and throws it away. PublishStream acks each request at once with
 * a PublishAck shaped like kbridged's and encoded by the same code (one RecordResult per
 * record); Publish answers the
 * half-close with a PublishResponse counting the records. Nothing goes to Kafka.
 *
 * It also serves Subscribe for R4's comparison: every open Subscribe call gets
 * every record published from then on, encoded once by the thread that decoded it
 * (codec_encode_subscribe_record, as kbridged does), sent by a fan-out thread (as
 * kbridged's reader thread sends) and queued per subscriber with one
 * SEND_MESSAGE outstanding, queued records going together in the next response, as in
 * kbridged; there is no Kafka round trip in between. The request's topics are ignored.
 *
 *   null-sink [-a ADDRESS] [-T THREADS]      (default unix:null-sink.sock, one per CPU;
 *                                            publishing calls get THREADS/2, at least 1)
 *
 * Logs "null-sink ready" on stderr once it serves; SIGTERM/SIGINT stop it.
 *
 * Threads and locks: the main thread sets up, waits for a signal and shuts down; the
 * queues' threads take completions. A call's completions may run on two
 * threads at once (a receive and a send), so struct call.lock guards the call's fields.
 * Acks are written one at a time (one SEND_MESSAGE outstanding), with the write-buffer
 * hint while more acks are queued behind, never on the batch with initial metadata. */
#include "config.h"

#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>

#include "codec.h"
#include "util.h"

enum method { M_PUBLISH, M_STREAM, M_SUBSCRIBE, N_METHODS };
static const char *const method_paths[] = {
	"/kbridge.v1.Bridge/Publish", "/kbridge.v1.Bridge/PublishStream", "/kbridge.v1.Bridge/Subscribe"};

enum tag_kind { T_REQUEST, T_MD, T_RECV, T_SEND, T_CLOSE, T_SHUTDOWN };

struct tag {
	enum tag_kind kind;
	struct call *call;
};

struct call {
	enum method method;
	pthread_mutex_t lock;
	grpc_call *call;
	gpr_timespec deadline;
	grpc_metadata_array md;
	grpc_byte_buffer *recv_bb;
	int cancelled;
	struct tag t_request, t_md, t_recv, t_send, t_close;
	int batches;           /* outstanding; the call is freed at zero */
	bool sending, half_closed, status_sent;
	uint64_t records;      /* Publish: all records so far */
	uint32_t *pending;     /* PublishStream: record counts of requests not acked yet */
	size_t n_pending, cap_pending, first_pending;
	uint64_t next_seq;
	uint64_t offset;
	/* Subscribe: records waiting for the next send, and those of the send in flight */
	grpc_slice *queue;
	size_t n_queue, cap_queue;
	grpc_byte_buffer *sending_bb;
	bool listed;                  /* on the subscriber list */
	struct call *sub_prev, *sub_next;
};

static grpc_server *server;
static grpc_completion_queue *pub_cq, *sub_cq; /* as kbridged's server.c */
static void *registered[N_METHODS];
/* Subscribe calls getting records; taken before a call's lock. */
static pthread_rwlock_t subs_lock = PTHREAD_RWLOCK_INITIALIZER;
static struct call *subs;
static atomic_uint_fast64_t fanout_offset;
/* Encoded records for the fan-out thread, which sends them to every subscriber as
 * kbridged's reader thread does (a publishing thread that sent to 1,000 subscribers itself
 * left every other call waiting meanwhile). */
static pthread_mutex_t fan_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t fan_cond = PTHREAD_COND_INITIALIZER;
static grpc_slice *fan_q;
static size_t fan_n, fan_cap;
static bool fan_stop;
static atomic_bool shutting_down;
static atomic_bool shutdown_done;
static struct tag shutdown_tag = {T_SHUTDOWN, NULL};

static void start(struct call *c, const grpc_op *ops, size_t n, struct tag *tag)
{
	grpc_call_error e = grpc_call_start_batch(c->call, ops, n, tag, NULL);

	if (e != GRPC_CALL_OK) {
		fprintf(stderr, "null-sink: bug: grpc_call_start_batch failed (%d)\n", e);
		abort();
	}
	c->batches++;
}

static void request_call(enum method m)
{
	struct call *c = xcalloc(1, sizeof(*c));
	grpc_completion_queue *cq = m == M_SUBSCRIBE ? sub_cq : pub_cq;

	c->method = m;
	pthread_mutex_init(&c->lock, NULL);
	grpc_metadata_array_init(&c->md);
	c->t_request = (struct tag){T_REQUEST, c};
	c->t_md = (struct tag){T_MD, c};
	c->t_recv = (struct tag){T_RECV, c};
	c->t_send = (struct tag){T_SEND, c};
	c->t_close = (struct tag){T_CLOSE, c};
	grpc_server_request_registered_call(server, registered[m], &c->call, &c->deadline, &c->md,
					    NULL, cq, cq, &c->t_request);
}

static void call_free(struct call *c)
{
	if (c->call)
		grpc_call_unref(c->call);
	grpc_metadata_array_destroy(&c->md);
	pthread_mutex_destroy(&c->lock);
	free(c->pending);
	for (size_t i = 0; i < c->n_queue; i++)
		grpc_slice_unref(c->queue[i]);
	free(c->queue);
	free(c);
}

static void recv_next(struct call *c)
{
	grpc_op op = {.op = GRPC_OP_RECV_MESSAGE, .data.recv_message.recv_message = &c->recv_bb};
	start(c, &op, 1, &c->t_recv);
}

static void send_status_ok(struct call *c, grpc_byte_buffer *last)
{
	grpc_op ops[3];
	size_t n = 0;

	if (c->method == M_PUBLISH)
		ops[n++] = (grpc_op){.op = GRPC_OP_SEND_INITIAL_METADATA};
	if (last)
		ops[n++] = (grpc_op){.op = GRPC_OP_SEND_MESSAGE, .data.send_message.send_message = last};
	ops[n++] = (grpc_op){.op = GRPC_OP_SEND_STATUS_FROM_SERVER,
			     .data.send_status_from_server = {.status = GRPC_STATUS_OK}};
	c->sending = c->status_sent = true;
	start(c, ops, n, &c->t_send);
}

/* PublishStream: the next queued ack, or the status once the client is done. */
static void stream_send_next(struct call *c)
{
	if (c->sending || c->status_sent)
		return;
	if (c->first_pending == c->n_pending) {
		if (c->half_closed)
			send_status_ok(c, NULL);
		return;
	}
	uint32_t n = c->pending[c->first_pending++];
	struct record_result *res = xcalloc(n ? n : 1, sizeof(*res));
	for (uint32_t i = 0; i < n; i++)
		res[i] = (struct record_result){.offset = (int64_t)c->offset++};
	grpc_byte_buffer *bb = codec_encode_publish_ack(c->next_seq++, res, n);
	free(res);
	bool more = c->first_pending < c->n_pending;
	grpc_op op = {.op = GRPC_OP_SEND_MESSAGE, .flags = more ? GRPC_WRITE_BUFFER_HINT : 0,
		      .data.send_message.send_message = bb};
	c->sending = true;
	start(c, &op, 1, &c->t_send);
	grpc_byte_buffer_destroy(bb);
}

/* Subscribe: sends what is queued, if no send is in flight. Under c->lock. */
static void sub_send_next(struct call *c)
{
	if (c->sending || c->n_queue == 0 || c->status_sent)
		return;
	c->sending_bb = grpc_raw_byte_buffer_create(c->queue, c->n_queue);
	for (size_t i = 0; i < c->n_queue; i++)
		grpc_slice_unref(c->queue[i]);
	c->n_queue = 0;
	grpc_op op = {.op = GRPC_OP_SEND_MESSAGE, .data.send_message.send_message = c->sending_bb};
	c->sending = true;
	start(c, &op, 1, &c->t_send);
}

/* One encoded record to every subscriber. On the fan-out thread. */
static void fan_out_record(grpc_slice enc)
{
	pthread_rwlock_rdlock(&subs_lock);
	for (struct call *s = subs; s; s = s->sub_next) {
		pthread_mutex_lock(&s->lock);
		if (s->n_queue == s->cap_queue) {
			s->cap_queue = s->cap_queue ? 2 * s->cap_queue : 16;
			s->queue = xrealloc(s->queue, s->cap_queue * sizeof(*s->queue));
		}
		s->queue[s->n_queue++] = grpc_slice_ref(enc);
		sub_send_next(s);
		pthread_mutex_unlock(&s->lock);
	}
	pthread_rwlock_unlock(&subs_lock);
	grpc_slice_unref(enc);
}

static void *fan_main(void *arg)
{
	grpc_slice *mine = NULL;
	size_t cap = 0;

	for (;;) {
		pthread_mutex_lock(&fan_lock);
		while (fan_n == 0 && !fan_stop)
			pthread_cond_wait(&fan_cond, &fan_lock);
		if (fan_n == 0) { /* stopping, and nothing left */
			pthread_mutex_unlock(&fan_lock);
			break;
		}
		/* Take the whole queue: swap arrays. */
		grpc_slice *q = fan_q;
		size_t n = fan_n, qcap = fan_cap;
		fan_q = mine;
		fan_cap = cap;
		fan_n = 0;
		mine = q;
		cap = qcap;
		pthread_mutex_unlock(&fan_lock);
		for (size_t i = 0; i < n; i++)
			fan_out_record(mine[i]);
	}
	free(mine);
	return NULL;
}

/* Every record of req to every subscriber: encoded here, sent by the fan-out thread. */
static void fan_out(const Kbridge__V1__PublishRequest *req)
{
	pthread_rwlock_rdlock(&subs_lock);
	bool any = subs != NULL;
	pthread_rwlock_unlock(&subs_lock);
	if (!any)
		return;
	for (size_t i = 0; i < req->n_records; i++) {
		const Kbridge__V1__Record *r = req->records[i];
		struct record_fields f = {
			.topic = r->topic,
			.partition = r->placement_case == KBRIDGE__V1__RECORD__PLACEMENT_PARTITION ? r->partition : 0,
			.offset = (int64_t)atomic_fetch_add(&fanout_offset, 1),
			.timestamp_ms = r->timestamp_ms,
			.key = r->key.data, .key_len = r->key.len,
			.value = r->value.data, .value_len = r->value.len,
		};
		grpc_slice enc = codec_encode_subscribe_record(&f);
		pthread_mutex_lock(&fan_lock);
		if (fan_stop) { /* shutting down: nobody sends it */
			pthread_mutex_unlock(&fan_lock);
			grpc_slice_unref(enc);
			continue;
		}
		if (fan_n == fan_cap) {
			fan_cap = fan_cap ? 2 * fan_cap : 64;
			fan_q = xrealloc(fan_q, fan_cap * sizeof(*fan_q));
		}
		fan_q[fan_n++] = enc;
		pthread_cond_signal(&fan_cond);
		pthread_mutex_unlock(&fan_lock);
	}
}

static void sub_unlist(struct call *c)
{
	pthread_rwlock_wrlock(&subs_lock);
	if (c->listed) {
		if (c->sub_prev)
			c->sub_prev->sub_next = c->sub_next;
		else
			subs = c->sub_next;
		if (c->sub_next)
			c->sub_next->sub_prev = c->sub_prev;
		c->listed = false;
	}
	pthread_rwlock_unlock(&subs_lock);
}

static void on_message(struct call *c)
{
	ProtobufCAllocator *arena;
	Kbridge__V1__PublishRequest *req = codec_decode_publish_request(c->recv_bb, &arena);

	grpc_byte_buffer_destroy(c->recv_bb);
	c->recv_bb = NULL;
	if (!req) {
		grpc_op op = {.op = GRPC_OP_SEND_STATUS_FROM_SERVER,
			      .data.send_status_from_server = {.status = GRPC_STATUS_INVALID_ARGUMENT}};
		if (!c->status_sent && !c->sending) {
			c->status_sent = c->sending = true;
			start(c, &op, 1, &c->t_send);
		}
		return;
	}
	uint32_t n = (uint32_t)req->n_records;
	fan_out(req);
	codec_arena_destroy(arena);
	recv_next(c);
	if (c->method == M_PUBLISH) {
		c->records += n;
		return;
	}
	if (c->first_pending == c->n_pending)
		c->first_pending = c->n_pending = 0;
	if (c->n_pending == c->cap_pending) {
		c->cap_pending = c->cap_pending ? 2 * c->cap_pending : 64;
		c->pending = xrealloc(c->pending, c->cap_pending * sizeof(*c->pending));
	}
	c->pending[c->n_pending++] = n;
	stream_send_next(c);
}

static void on_half_close(struct call *c)
{
	c->half_closed = true;
	if (c->method == M_STREAM) {
		stream_send_next(c);
		return;
	}
	Kbridge__V1__PublishResponse resp = KBRIDGE__V1__PUBLISH_RESPONSE__INIT;
	resp.records = c->records;
	grpc_byte_buffer *bb = codec_encode(&resp.base);
	send_status_ok(c, bb);
	grpc_byte_buffer_destroy(bb);
}

static void on_new_call(struct call *c, bool ok)
{
	if (!ok) { /* shutting down */
		call_free(c);
		return;
	}
	if (!atomic_load(&shutting_down))
		request_call(c->method);
	pthread_mutex_lock(&c->lock);
	grpc_op close = {.op = GRPC_OP_RECV_CLOSE_ON_SERVER,
			 .data.recv_close_on_server.cancelled = &c->cancelled};
	start(c, &close, 1, &c->t_close);
	if (c->method == M_SUBSCRIBE) {
		/* Records from now on; the request itself is received and ignored. */
		pthread_mutex_unlock(&c->lock);
		pthread_rwlock_wrlock(&subs_lock);
		c->listed = true;
		c->sub_next = subs;
		if (subs)
			subs->sub_prev = c;
		subs = c;
		pthread_rwlock_unlock(&subs_lock);
		pthread_mutex_lock(&c->lock);
		grpc_op md = {.op = GRPC_OP_SEND_INITIAL_METADATA};
		c->sending = true;
		start(c, &md, 1, &c->t_md);
		recv_next(c);
		pthread_mutex_unlock(&c->lock);
		return;
	}
	if (c->method == M_STREAM) {
		/* alone: a batch of initial metadata plus a hinted message may never complete */
		grpc_op md = {.op = GRPC_OP_SEND_INITIAL_METADATA};
		c->sending = true;
		start(c, &md, 1, &c->t_md);
	}
	recv_next(c);
	pthread_mutex_unlock(&c->lock);
}

static void on_event(struct tag *t, bool ok)
{
	struct call *c = t->call;

	if (t->kind == T_SHUTDOWN) {
		atomic_store(&shutdown_done, true);
		return;
	}
	if (t->kind == T_REQUEST) {
		on_new_call(c, ok);
		return;
	}
	if (t->kind == T_CLOSE && c->method == M_SUBSCRIBE)
		sub_unlist(c); /* before c->lock: the list's lock comes first */
	pthread_mutex_lock(&c->lock);
	if (c->method == M_SUBSCRIBE) {
		c->batches--;
		if (t->kind == T_RECV && c->recv_bb) {
			grpc_byte_buffer_destroy(c->recv_bb);
			c->recv_bb = NULL;
		} else if (t->kind == T_MD || t->kind == T_SEND) {
			c->sending = false;
			if (c->sending_bb) {
				grpc_byte_buffer_destroy(c->sending_bb);
				c->sending_bb = NULL;
			}
			if (ok)
				sub_send_next(c);
		}
		bool done = c->batches == 0;
		pthread_mutex_unlock(&c->lock);
		if (done)
			call_free(c);
		return;
	}
	c->batches--;
	switch (t->kind) {
	case T_MD:
	case T_SEND:
		c->sending = false;
		if (ok && c->method == M_STREAM)
			stream_send_next(c);
		break;
	case T_RECV:
		if (!ok)
			break;
		if (c->recv_bb)
			on_message(c);
		else
			on_half_close(c);
		break;
	default: /* T_CLOSE */
		break;
	}
	bool done = c->batches == 0;
	pthread_mutex_unlock(&c->lock);
	if (done)
		call_free(c);
}

static void *worker(void *arg)
{
	grpc_completion_queue *cq = arg;

	for (;;) {
		grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
		if (ev.type == GRPC_QUEUE_SHUTDOWN)
			return NULL;
		if (ev.type == GRPC_OP_COMPLETE)
			on_event(ev.tag, ev.success);
	}
}

int main(int argc, char **argv)
{
	const char *address = "unix:null-sink.sock";
	long threads = sysconf(_SC_NPROCESSORS_ONLN);
	sigset_t sigs;
	int c, sig;

	while ((c = getopt(argc, argv, "a:T:h")) != -1) {
		switch (c) {
		case 'a': address = optarg; break;
		case 'T': threads = atol(optarg); break;
		case 'h':
			puts("Usage: null-sink [-a ADDRESS] [-T THREADS]");
			return 0;
		default:
			return 2;
		}
	}
	if (threads < 1 || threads > 256) {
		fputs("null-sink: -T: 1..256 threads\n", stderr);
		return 2;
	}
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);

	grpc_init();
	grpc_arg args[] = {{.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
			    .value.integer = 4194304}};
	grpc_channel_args cargs = {1, args};
	server = grpc_server_create(&cargs, NULL);
	pub_cq = grpc_completion_queue_create_for_next(NULL);
	grpc_completion_queue_attributes attr = {GRPC_CQ_CURRENT_VERSION, GRPC_CQ_NEXT, GRPC_CQ_NON_POLLING, NULL};
	sub_cq = grpc_completion_queue_create(grpc_completion_queue_factory_lookup(&attr), &attr, NULL);
	grpc_server_register_completion_queue(server, pub_cq, NULL);
	grpc_server_register_completion_queue(server, sub_cq, NULL);
	for (int m = 0; m < N_METHODS; m++)
		registered[m] = grpc_server_register_method(server, method_paths[m], NULL,
							    GRPC_SRM_PAYLOAD_NONE, 0);
	grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
	int port = grpc_server_add_http2_port(server, address, creds);
	grpc_server_credentials_release(creds);
	if (!port) {
		fprintf(stderr, "null-sink: cannot listen on %s\n", address);
		return 1;
	}
	grpc_server_start(server);
	for (int m = 0; m < N_METHODS; m++)
		request_call(m);
	long pub_threads = threads / 2 < 1 ? 1 : threads / 2, n = threads + pub_threads;
	pthread_t *tids = xcalloc((size_t)n, sizeof(*tids));
	for (long i = 0; i < n; i++)
		pthread_create(&tids[i], NULL, worker, i < pub_threads ? pub_cq : sub_cq);
	pthread_t fan_tid;
	pthread_create(&fan_tid, NULL, fan_main, NULL);
	fprintf(stderr, "null-sink ready on %s with %ld threads for publishing calls, %ld for Subscribe\n",
		address, pub_threads, threads);

	sigwait(&sigs, &sig);
	atomic_store(&shutting_down, true);
	grpc_server_shutdown_and_notify(server, pub_cq, &shutdown_tag);
	pthread_mutex_lock(&fan_lock);
	fan_stop = true;
	pthread_cond_signal(&fan_cond);
	pthread_mutex_unlock(&fan_lock);
	pthread_join(fan_tid, NULL);
	grpc_server_cancel_all_calls(server);
	while (!atomic_load(&shutdown_done))
		usleep(10000);
	grpc_server_destroy(server);
	grpc_completion_queue_shutdown(pub_cq);
	grpc_completion_queue_shutdown(sub_cq);
	for (long i = 0; i < n; i++)
		pthread_join(tids[i], NULL);
	grpc_completion_queue_destroy(pub_cq);
	grpc_completion_queue_destroy(sub_cq);
	free(fan_q);
	free(tids);
	grpc_shutdown();
	return 0;
}
