/* server: the gRPC core server, its completion queues and the threads that drive them.
 *
 * Threads and locks: the main thread calls server_init/start/shutdown_*; completion-queue
 * threads run every tag's done() callback: `threads` of them for Subscribe calls, half as
 * many (at least one) for the other calls (server.c says why). A call's callbacks may
 * run on any thread of its queue, concurrently with others; modules lock their own call
 * state. */
#ifndef KB_SERVER_H
#define KB_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <grpc/grpc.h>

#include "conf.h"

/* A completion-queue tag: every pointer given to grpc_call_start_batch is one of these,
 * embedded in the struct of the call it belongs to. */
struct tag {
	void (*done)(struct tag *tag, bool ok);
};

#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

/* A new call handed to a method handler, which takes ownership of every field. */
struct incoming {
	grpc_call *call;
	gpr_timespec deadline;
	grpc_metadata_array md;    /* the client's initial metadata; destroy it when done */
	grpc_byte_buffer *payload; /* the request for unary/server-streaming methods, else NULL */
};

/* Creates the server and binds every listen address. Returns 0, or -1 after logging
 * which address could not be bound. */
int server_init(const struct conf *c);
/* The `threads` of c (0: one per CPU): the threads serving subscriptions; publishing
 * calls get half as many, at least one. */
int server_thread_count(const struct conf *c);
/* Starts serving: each queue's threads, and calls requested ahead for every method on its
 * queue (as many as the queue has threads, at least two). */
void server_start(void);
/* True once the daemon began draining. */
bool server_draining(void);
/* Draining: ends the streams, answers new calls UNAVAILABLE, and once the calls running
 * have ended and no new one came for a moment (or at deadline_ms, monotonic), stops
 * taking calls. */
void server_shutdown_begin(int64_t deadline_ms);
/* Waits until every call has ended or deadline_ms (monotonic) passes; true when ended. */
bool server_shutdown_wait(int64_t deadline_ms);
/* Cancels every call still running (after the grace period). */
void server_cancel_all(void);
/* Joins the threads and destroys the server; after server_shutdown_wait returned true. */
void server_finish(void);
/* True when every completion-queue thread came back from its queue within max_ms. */
bool server_threads_alive(int64_t max_ms);

/* Ends a call that was just handed over with status code and message, then frees it. */
void server_reject(struct incoming *in, grpc_status_code code, const char *msg);

#endif
