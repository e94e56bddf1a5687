/* server: gRPC core server, completion queues, threads, method dispatch.
 *
 * Two completion queues, each with its own threads: one for the publishing calls
 * (Publish, PublishStream, Produce) and the rest but Subscribe, one for Subscribe. A
 * publishing stream's work is a sequence (one receive, then one send, at a time): with
 * several threads on its queue, each completion went to whichever thread was idle and
 * woke it, and the stream's work bounced between them (on 2 CPUs, two threads instead of
 * one: 29% more CPU per one-record request, 16% fewer requests per second, twelve times
 * the context switches). A fan-out's sends to many subscribers complete independently,
 * and there every thread of the queue helps (one thread instead of two: p99 publish to
 * subscriber 103-286 ms instead of 63-76 at 1,000 subscribers). Hence `threads` threads
 * for subscribers and half as many (at least one) for the rest.
 *
 * Only the publishing queue polls the network (gRPC's epoll1 lets one thread at a time
 * wait in epoll for every connection): the subscription queue is non-polling, its threads
 * only take completions. When its idle threads could poll, they took the publishers'
 * network events and handed every completion over to a publishing thread (at batch 100,
 * twice the context switches and about 20% more CPU per record).
 *
 * Threads and locks: main thread for init/start/shutdown; the queues' threads run tag
 * callbacks. Shared state here is either written before the threads start (server,
 * queues, methods) or atomic (draining, heartbeats); shutdown_lock guards shutdown_done. */
#include "config.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "log.h"
#include "publish.h"
#include "server.h"
#include "subscribe.h"
#include "topics.h"
#include "util.h"

enum { Q_PUBLISH, Q_SUBSCRIBE, N_QUEUES };

struct queue;

struct qthread {
	pthread_t tid;
	struct queue *q;
	atomic_llong heartbeat; /* when it last came back from the queue (coarse clock) */
};

/* A completion queue and the threads that serve it. */
struct queue {
	const char *name; /* the threads are named kb-NAME-N */
	grpc_completion_queue *cq;
	int n_threads;
	struct qthread *threads;
};

struct method {
	const char *path;
	grpc_server_register_method_payload_handling payload;
	void (*handle)(struct incoming *in);
	int queue;
	void *registered;
};

/* Client-streaming methods take PAYLOAD_NONE: with READ_INITIAL_BYTE_BUFFER the call
 * would only be handed over once the first message arrived. */
static struct method methods[] = {
	{"/kbridge.v1.Bridge/Publish", GRPC_SRM_PAYLOAD_NONE, publish_handle, Q_PUBLISH, NULL},
	{"/kbridge.v1.Bridge/PublishStream", GRPC_SRM_PAYLOAD_NONE, publish_handle_stream, Q_PUBLISH, NULL},
	{"/kbridge.v1.Bridge/Produce", GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, publish_handle_produce,
	 Q_PUBLISH, NULL},
	{"/kbridge.v1.Bridge/Subscribe", GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, subscribe_handle,
	 Q_SUBSCRIBE, NULL},
	{"/kbridge.v1.Bridge/ListTopics", GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, topics_handle, Q_PUBLISH,
	 NULL},
};

/* An outstanding grpc_server_request_*call: a method's (method != NULL) or the generic one. */
struct request {
	struct tag tag;
	struct method *method;
	struct incoming in;
	grpc_call_details details; /* generic requests only */
};

static grpc_server *server;
static struct queue queues[N_QUEUES] = {[Q_PUBLISH] = {.name = "pub"}, [Q_SUBSCRIBE] = {.name = "sub"}};
static atomic_bool draining;
static atomic_llong last_match_ms; /* when a requested call was last matched */

static pthread_mutex_t shutdown_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t shutdown_cond = PTHREAD_COND_INITIALIZER;
static bool shutdown_done;
static struct tag shutdown_tag;

bool server_draining(void)
{
	return atomic_load(&draining);
}

static void request_done(struct tag *tag, bool ok);

/* Requests the next call of method m (NULL: any other method) on its queue. */
static void request_arm(struct method *m)
{
	struct request *r = xcalloc(1, sizeof(*r));
	grpc_completion_queue *cq = queues[m ? m->queue : Q_PUBLISH].cq;
	grpc_call_error e;

	r->tag.done = request_done;
	r->method = m;
	grpc_metadata_array_init(&r->in.md);
	if (m) {
		e = grpc_server_request_registered_call(
			server, m->registered, &r->in.call, &r->in.deadline, &r->in.md,
			m->payload == GRPC_SRM_PAYLOAD_NONE ? NULL : &r->in.payload, cq, cq, &r->tag);
	} else {
		grpc_call_details_init(&r->details);
		e = grpc_server_request_call(server, &r->in.call, &r->details, &r->in.md, cq, cq,
					     &r->tag);
	}
	if (e != GRPC_CALL_OK)
		log_error("cannot request a new call for %s: grpc error %d", m ? m->path : "*", e);
}

static void request_free(struct request *r)
{
	if (!r->method)
		grpc_call_details_destroy(&r->details);
	free(r);
}

static void request_done(struct tag *tag, bool ok)
{
	struct request *r = container_of(tag, struct request, tag);

	if (!ok) { /* the server is shutting down: do not re-arm */
		grpc_metadata_array_destroy(&r->in.md);
		request_free(r);
		return;
	}
	/* Re-arm first, so the next call can be accepted while this one is handled. */
	request_arm(r->method);
	atomic_store(&last_match_ms, now_ms());
	if (atomic_load(&draining)) {
		server_reject(&r->in, GRPC_STATUS_UNAVAILABLE, "kbridged is shutting down; retry on another instance");
	} else if (r->method) {
		r->method->handle(&r->in);
	} else {
		char *path = grpc_slice_to_c_string(r->details.method);
		char *msg = xasprintf("unknown method %s: kbridged serves kbridge.v1.Bridge", path);
		server_reject(&r->in, GRPC_STATUS_UNIMPLEMENTED, msg);
		free(msg);
		gpr_free(path);
	}
	request_free(r);
}

/* A call answered with a status at once. */
struct rejected {
	struct tag tag;
	grpc_call *call;
	grpc_metadata_array md;
	int cancelled;
};

static void rejected_done(struct tag *tag, bool ok)
{
	struct rejected *rj = container_of(tag, struct rejected, tag);

	grpc_call_unref(rj->call);
	grpc_metadata_array_destroy(&rj->md);
	free(rj);
}

void server_reject(struct incoming *in, grpc_status_code code, const char *msg)
{
	struct rejected *rj = xcalloc(1, sizeof(*rj));
	grpc_slice details = grpc_slice_from_copied_string(msg);
	grpc_op ops[3];

	memset(ops, 0, sizeof(ops));
	rj->tag.done = rejected_done;
	rj->call = in->call;
	rj->md = in->md;
	if (in->payload)
		grpc_byte_buffer_destroy(in->payload);
	ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
	ops[1].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
	ops[1].data.send_status_from_server.status = code;
	ops[1].data.send_status_from_server.status_details = &details;
	ops[2].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
	ops[2].data.recv_close_on_server.cancelled = &rj->cancelled;
	grpc_call_error e = grpc_call_start_batch(rj->call, ops, 3, &rj->tag, NULL);
	grpc_slice_unref(details);
	if (e != GRPC_CALL_OK) {
		log_error("cannot answer a call: grpc error %d", e);
		rejected_done(&rj->tag, false);
	}
}

/* The heartbeat and the wait's deadline use the coarse clock, and the deadline is
 * recomputed only every 100 ms: reading the clock twice per completion was a measurable
 * part of the cost of a one-record request. */
static void *cq_thread(void *arg)
{
	struct qthread *t = arg;
	grpc_completion_queue *cq = t->q->cq;
	atomic_llong *beat = &t->heartbeat;
	int64_t since = now_ms_coarse();
	gpr_timespec deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
					     gpr_time_from_millis(250, GPR_TIMESPAN));

	for (;;) {
		grpc_event ev = grpc_completion_queue_next(cq, deadline, NULL);
		int64_t now = now_ms_coarse();
		atomic_store(beat, now);
		if (now - since >= 100) {
			since = now;
			deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
						gpr_time_from_millis(250, GPR_TIMESPAN));
		}
		if (ev.type == GRPC_QUEUE_SHUTDOWN)
			break;
		if (ev.type == GRPC_OP_COMPLETE) {
			struct tag *tag = ev.tag;
			tag->done(tag, ev.success != 0);
		}
	}
	return NULL;
}

static void shutdown_tag_done(struct tag *tag, bool ok)
{
	pthread_mutex_lock(&shutdown_lock);
	shutdown_done = true;
	pthread_cond_broadcast(&shutdown_cond);
	pthread_mutex_unlock(&shutdown_lock);
}

int server_init(const struct conf *c)
{
	grpc_arg args[] = {
		{.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
		 .value.integer = c->publish_max_request_bytes},
		{.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, .value.integer = -1},
		{.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_HTTP2_MAX_PING_STRIKES, .value.integer = 0},
		/* HTTP/2 flow control must push back on a publisher that kbridged stops
		 * reading: without these, gRPC's bandwidth-delay probing grows every stream's
		 * receive window to megabytes it buffers on our behalf, and 100 paused streams
		 * held ~500 MB regardless of publish.max_inflight_bytes_total. */
		{.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_HTTP2_BDP_PROBE, .value.integer = 0},
		{.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, .value.integer = 65536},
	};
	grpc_channel_args chargs = {.num_args = ARRAY_SIZE(args), .args = args};

	int n = server_thread_count(c);
	queues[Q_SUBSCRIBE].n_threads = n;
	queues[Q_PUBLISH].n_threads = n / 2 < 1 ? 1 : n / 2;
	server = grpc_server_create(&chargs, NULL);
	for (int i = 0; i < N_QUEUES; i++) {
		grpc_completion_queue_attributes attr = {
			GRPC_CQ_CURRENT_VERSION, GRPC_CQ_NEXT,
			i == Q_SUBSCRIBE ? GRPC_CQ_NON_POLLING : GRPC_CQ_DEFAULT_POLLING, NULL};
		queues[i].cq = grpc_completion_queue_create(grpc_completion_queue_factory_lookup(&attr), &attr, NULL);
		grpc_server_register_completion_queue(server, queues[i].cq, NULL);
	}
	for (size_t i = 0; i < ARRAY_SIZE(methods); i++)
		methods[i].registered = grpc_server_register_method(server, methods[i].path, NULL,
								    methods[i].payload, 0);

	grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
	int rc = 0;
	for (size_t i = 0; i < c->n_listen; i++) {
		const char *addr = c->listen[i];
		if (strncmp(addr, "unix:", 5) == 0)
			unlink(addr + 5); /* a stale socket from an earlier run */
		int port = grpc_server_add_http2_port(server, addr, creds);
		if (port == 0) {
			log_error("cannot listen on %s (listen in %s): address in use, not permitted, or not resolvable",
				  addr, c->path ? c->path : "the configuration");
			rc = -1;
			break;
		}
		if (strncmp(addr, "unix:", 5) != 0 && strrchr(addr, ':') && strcmp(strrchr(addr, ':'), ":0") == 0)
			log_info("listening on %.*s:%d", (int)(strrchr(addr, ':') - addr), addr, port);
		else
			log_info("listening on %s", addr);
	}
	grpc_server_credentials_release(creds);
	if (rc < 0) {
		grpc_server_destroy(server);
		server = NULL;
		for (int i = 0; i < N_QUEUES; i++) {
			grpc_completion_queue_shutdown(queues[i].cq);
			while (grpc_completion_queue_next(queues[i].cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL)
				       .type != GRPC_QUEUE_SHUTDOWN)
				;
			grpc_completion_queue_destroy(queues[i].cq);
			queues[i].cq = NULL;
		}
	}
	return rc;
}

/* Calls requested ahead per method on queue q: as many as it has threads, at least two, so
 * that one can be matched while the last is being handed over. */
static int requests_ahead(const struct queue *q)
{
	return q->n_threads < 2 ? 2 : q->n_threads;
}

void server_start(void)
{
	grpc_server_start(server);
	for (size_t i = 0; i < ARRAY_SIZE(methods); i++)
		for (int k = 0; k < requests_ahead(&queues[methods[i].queue]); k++)
			request_arm(&methods[i]);
	for (int k = 0; k < requests_ahead(&queues[Q_PUBLISH]); k++)
		request_arm(NULL);
	for (int i = 0; i < N_QUEUES; i++) {
		struct queue *q = &queues[i];
		q->threads = xcalloc(q->n_threads, sizeof(*q->threads));
		for (int k = 0; k < q->n_threads; k++) {
			char name[16];
			q->threads[k].q = q;
			atomic_store(&q->threads[k].heartbeat, now_ms_coarse());
			if (pthread_create(&q->threads[k].tid, NULL, cq_thread, &q->threads[k]) != 0) {
				log_error("cannot start completion-queue thread kb-%s-%d", q->name, k);
				abort();
			}
			snprintf(name, sizeof(name), "kb-%s-%d", q->name, k);
			pthread_setname_np(q->threads[k].tid, name);
		}
	}
	log_info("completion-queue threads: %d for publishing calls, %d for subscriptions",
		 queues[Q_PUBLISH].n_threads, queues[Q_SUBSCRIBE].n_threads);
}

int server_thread_count(const struct conf *c)
{
	int n = c->threads > 0 ? c->threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
	return n < 1 ? 1 : n;
}

bool server_threads_alive(int64_t max_ms)
{
	int64_t now = now_ms_coarse();
	for (int i = 0; i < N_QUEUES; i++)
		for (int k = 0; k < queues[i].n_threads; k++)
			if (now - atomic_load(&queues[i].threads[k].heartbeat) > max_ms)
				return false;
	return true;
}

void server_shutdown_begin(int64_t deadline_ms)
{
	atomic_store(&draining, true);
	/* Streams do not end by themselves: end them so the shutdown can complete. */
	subscribe_drain();
	publish_drain();
	/* gRPC cancels the calls it has taken in but not yet handed to us when the shutdown
	 * starts, and a client sees CANCELLED, which it does not retry. Calls matched from
	 * now on are answered UNAVAILABLE (request_done). A client whose call ends (the
	 * publishes finishing now) may start its next one at once: so the server is shut
	 * down only once no call of ours is left and none was matched for QUIET_MS (or at
	 * the deadline). */
	enum { QUIET_MS = 500 };
	int64_t quiet_since = now_ms();
	for (;;) {
		int64_t now = now_ms(), matched = atomic_load(&last_match_ms);
		if (publish_active() || subscribe_active())
			quiet_since = now;
		if (matched > quiet_since)
			quiet_since = matched;
		if (now - quiet_since >= QUIET_MS || now >= deadline_ms)
			break;
		usleep(10 * 1000);
	}
	shutdown_tag.done = shutdown_tag_done;
	grpc_server_shutdown_and_notify(server, queues[Q_PUBLISH].cq, &shutdown_tag);
}

bool server_shutdown_wait(int64_t deadline_ms)
{
	bool done;

	pthread_mutex_lock(&shutdown_lock);
	while (!shutdown_done) {
		/* The condition variable waits on CLOCK_REALTIME: wait in short steps and
		 * judge the deadline on the monotonic clock. */
		struct timespec step;
		clock_gettime(CLOCK_REALTIME, &step);
		step.tv_nsec += 50 * 1000000;
		if (step.tv_nsec >= 1000000000) {
			step.tv_sec++;
			step.tv_nsec -= 1000000000;
		}
		pthread_cond_timedwait(&shutdown_cond, &shutdown_lock, &step);
		if (now_ms() >= deadline_ms)
			break;
	}
	done = shutdown_done;
	pthread_mutex_unlock(&shutdown_lock);
	return done;
}

void server_cancel_all(void)
{
	grpc_server_cancel_all_calls(server);
}

void server_finish(void)
{
	grpc_server_destroy(server);
	server = NULL;
	for (int i = 0; i < N_QUEUES; i++)
		grpc_completion_queue_shutdown(queues[i].cq);
	for (int i = 0; i < N_QUEUES; i++) {
		struct queue *q = &queues[i];
		for (int k = 0; k < q->n_threads; k++)
			pthread_join(q->threads[k].tid, NULL);
		grpc_completion_queue_destroy(q->cq);
		q->cq = NULL;
		free(q->threads);
		q->threads = NULL;
	}
}
