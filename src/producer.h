/* producer: the daemon's one librdkafka producer (acks=all, idempotent).
 *
 * Threads and locks: producer_init/wait_ready/flush/shutdown from the main thread;
 * producer_send from completion-queue threads; a poll thread serves delivery reports and
 * calls the on_delivery callback given to producer_init, the one place where a record
 * becomes acknowledged or failed. */
#ifndef KB_PRODUCER_H
#define KB_PRODUCER_H

#include <librdkafka/rdkafka.h>

#include "codec.h"
#include "conf.h"

/* Called on the poll thread with delivery reports, n at a time (those of one produce
 * response, so runs of one caller's records are common); each msg->_private is the opaque
 * given to producer_send. */
typedef void producer_delivery_fn(const rd_kafka_message_t **msgs, size_t n);
/* Called on the poll thread after delivery reports were served while someone waits for
 * room in the producer's queue (see producer_want_room). */
typedef void producer_room_fn(void);

/* Creates the producer for brokers (a bootstrap list). Returns 0, or -1 with errmsg. */
int producer_init(const struct conf *c, const char *brokers, producer_delivery_fn *on_delivery,
		  producer_room_fn *on_room, char *errmsg, size_t errsize);
/* Asks for on_room to be called after the next delivery reports (the queue was full). */
void producer_want_room(void);
/* Waits up to timeout_ms for the cluster to answer a metadata request: 0 when it did. */
int producer_wait_ready(int timeout_ms);
/* Reads the cluster's metadata for every topic (rd_kafka_metadata): blocking, so never on
 * a completion-queue thread. The caller frees *md with rd_kafka_metadata_destroy. */
rd_kafka_resp_err_t producer_metadata(const struct rd_kafka_metadata **md, int timeout_ms);
/* Reads the metadata of one topic (blocking). The caller frees *md. */
rd_kafka_resp_err_t producer_topic_metadata(const char *topic, const struct rd_kafka_metadata **md,
					    int timeout_ms);
/* Records are handed over in batches (a request's records): the producer is locked once
 * per batch, a topic is looked up once per run of records to it, and a record without a
 * timestamp gets the batch's (the clock is read once). Nothing in a batch blocks. */
struct producer_batch {
	rd_kafka_t *rk;
	rd_kafka_topic_t *rkt; /* the topic of the previous record, or NULL */
	int64_t now_ms;        /* wall clock at the start of the batch */
};
void producer_batch_begin(struct producer_batch *b);
/* Hands one record to librdkafka without copying key and value: they must stay valid until
 * the delivery report. Never blocks: a full queue returns RD_KAFKA_RESP_ERR__QUEUE_FULL
 * (call producer_want_room and try again from on_room). Returns the librdkafka error; on
 * error no delivery report will come. */
rd_kafka_resp_err_t producer_send(struct producer_batch *b, const Kbridge__V1__Record *r, void *opaque);
void producer_batch_end(struct producer_batch *b);
/* Waits up to timeout_ms for every queued record's delivery report; returns how many are
 * still outstanding. */
int producer_flush(int timeout_ms);
/* Fails every record still queued or in flight (their delivery reports say so) and serves
 * those reports. Used when the drain time is up. */
void producer_purge(void);
/* Stops the poll thread and destroys the producer. */
void producer_shutdown(void);

#endif
