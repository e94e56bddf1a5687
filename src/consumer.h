/* consumer: reading Kafka for subscriptions, with one shared read per topic.
 *
 * A subscription resolves its start offsets once (a small pool of setup threads asks
 * Kafka), then each of its topics is served either by the topic's shared reader (one
 * librdkafka consumer and one thread per topic, fanned out to every subscriber whose
 * position it has reached) or, while the subscriber is behind the shared reader (it
 * started in the past, or it was too slow to keep up), by a private catch-up reader that
 * hands the subscriber over to the shared reader once it has caught up. A subscription
 * with a consumer group has its own group member (librdkafka consumer and thread): Kafka
 * splits the partitions among the group's members, and offsets are committed by the
 * subscriber once records were sent.
 *
 * Threads and locks: readers_lock (the list of shared readers) → tr->lock (one shared
 * reader) → cs->lock (one subscription), always in that order. Sink callbacks run on
 * reader and setup threads: deliver() under tr->lock when shared, started() and
 * stopped() under no lock of ours. A sink must not call into this module while holding a
 * lock that its callbacks take. */
#ifndef KB_CONSUMER_H
#define KB_CONSUMER_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <grpc/slice.h>
#include <grpc/status.h>
#include <librdkafka/rdkafka.h>

#include "codec.h"
#include "conf.h"

/* One record read from Kafka, encoded once as a subscriber receives it and shared by
 * reference by every subscriber it is fanned out to: a response is the concatenation of
 * its records' encodings, so a record is never encoded or copied per subscriber. */
struct rec {
	atomic_int refs;
	const char *topic;
	int32_t partition;
	int64_t offset;
	size_t data_len; /* bytes of key, value and headers (bounds a response's size) */
	grpc_slice enc;  /* the Record as field 1 of a SubscribeResponse */
	size_t size;     /* bytes this record takes in memory, all included */
};

/* Drops a reference; the record is freed with the last. Any thread. */
void rec_release(struct rec *r);

/* Where a subscription starts, per topic: the next offset of every partition. */
struct start_topic {
	const char *topic;
	int n_partitions;
	const int64_t *offsets; /* indexed by partition */
};

struct start_info {
	size_t n_topics;
	const struct start_topic *topics; /* in the request's order */
	/* Records below the log start that a requested position asked for and that
	 * no longer exist: "TOPIC:PARTITION:FROM-TO,..." (NULL when none). */
	const char *skipped;
};

struct reader_sink {
	/* The start offsets are fixed (code OK, info set) or the subscription cannot
	 * start (code, msg; info NULL). Called once. */
	void (*started)(void *arg, grpc_status_code code, const char *msg, const struct start_info *info);
	/* Takes up to n records in order (a reference each, to rec_release later) and
	 * returns how many it took. Taking fewer says the subscriber is full: a shared
	 * reader then moves it to a catch-up reader; a catch-up reader waits for
	 * consumer_wake(). */
	size_t (*deliver)(void *arg, struct rec **recs, size_t n);
	/* Reading failed after the start (a catch-up reader could not be opened): the
	 * subscription should end with code and msg. */
	void (*failed)(void *arg, grpc_status_code code, const char *msg);
	/* Consumer groups: Kafka takes parts away from this member. The sink drops the
	 * records of those partitions it has not sent, waits (briefly) for a send in flight,
	 * and sets each element's offset to the next offset after what it sent (or
	 * RD_KAFKA_OFFSET_INVALID), which is then committed before the partitions go.
	 * Returns the list's number in the sink's commit order (see consumer_commit). */
	uint64_t (*revoke)(void *arg, rd_kafka_topic_partition_list_t *parts);
	/* Consumer groups: Kafka gives parts to this member. The sink sets an element's
	 * offset where it already sent records of that partition (it had it before: start
	 * after them, or at the group's committed offset if that is further) and leaves
	 * RD_KAFKA_OFFSET_INVALID elsewhere (start at the committed offset). */
	void (*assign)(void *arg, rd_kafka_topic_partition_list_t *parts);
	/* Last call, after consumer_unsubscribe: nothing of this module refers to the
	 * subscription any more. */
	void (*stopped)(void *arg);
};

struct csub;

/* Keeps c and brokers; starts the setup threads. */
void consumer_init(const struct conf *c, const char *brokers);
/* Starts serving req (validated: topics, start, positions of those topics). Never NULL;
 * failures come through sink->started. */
struct csub *consumer_subscribe(const Kbridge__V1__SubscribeRequest *req, const struct reader_sink *sink,
				void *arg);
/* Consumer groups: commits offsets (next offsets after records the client was sent).
 * The sink numbers its lists (revoke's too) in the order it makes them, from 1; a list
 * that arrives after a later one is skipped, so that two threads racing to commit never
 * move the group's offsets back. No-op for other subscriptions, or once reading ended.
 * Any thread, no sink lock held. */
void consumer_commit(struct csub *cs, const rd_kafka_topic_partition_list_t *offsets, uint64_t seq);
/* The subscriber has room again. */
void consumer_wake(struct csub *cs);
/* Ends the subscription's reading; the owner calls it exactly once, whatever happened,
 * and not under a lock its sink callbacks take. sink->stopped follows (maybe at once,
 * on this thread). */
void consumer_unsubscribe(struct csub *cs);
/* Shared readers alive now (for status lines and tests). */
size_t consumer_shared_readers(void);
/* Waits until every subscription has stopped, then ends the shared readers. */
void consumer_shutdown(void);

#endif
