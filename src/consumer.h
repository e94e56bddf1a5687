/* consumer: readers that tail Kafka topics for subscriptions.
 *
 * A reader is one librdkafka consumer (assign(), no group) and one thread that resolves
 * the start offsets, then fetches and hands records to its sink. For now each subscription
 * has its own reader; a shared reader per topic (fan-out) fits behind the same sink.
 *
 * Threads and locks: reader_start/wake/stop from any thread; the sink's callbacks run on
 * the reader's thread, never under the reader's lock, so a sink may call reader_wake
 * while holding its own lock. */
#ifndef KB_CONSUMER_H
#define KB_CONSUMER_H

#include <stddef.h>

#include <grpc/status.h>
#include <librdkafka/rdkafka.h>

#include "codec.h"
#include "conf.h"

struct reader;

struct reader_sink {
	/* The start offsets are fixed (code OK) or the reader cannot start (code, msg). */
	void (*started)(void *arg, grpc_status_code code, const char *msg);
	/* Takes up to n records (their ownership) and returns how many it took; when fewer,
	 * the reader keeps the rest and waits for reader_wake(). */
	size_t (*deliver)(void *arg, rd_kafka_message_t **msgs, size_t n);
	/* Last call: the reader is gone and holds no record of the sink's. */
	void (*stopped)(void *arg);
};

/* Keeps c and brokers for the readers to come. */
void consumer_init(const struct conf *c, const char *brokers);
/* Starts a reader for req's topics and start position. Never NULL; failures come
 * through sink->started. */
struct reader *reader_start(const Kbridge__V1__SubscribeRequest *req, const struct reader_sink *sink,
			    void *arg);
/* The sink has room again. */
void reader_wake(struct reader *r);
/* Asks the reader to stop; sink->stopped follows from its thread. */
void reader_stop(struct reader *r);
/* Waits until every reader has stopped. */
void consumer_shutdown(void);

#endif
