/* publish: Publish (client streaming), PublishStream (bidi) and Produce (unary) — records
 * in, acknowledged once Kafka has them.
 *
 * Threads and locks: publish_handle and batch completions run on completion-queue threads;
 * publish_on_delivery runs on the producer's poll thread; publish_drain on the main thread.
 * Each call has its own mutex; the registry of live calls has one global mutex, taken
 * before a call's mutex, never after. */
#ifndef KB_PUBLISH_H
#define KB_PUBLISH_H

#include <stdbool.h>
#include <stddef.h>

#include <grpc/status.h>
#include <librdkafka/rdkafka.h>

#include "codec.h"
#include "conf.h"
#include "server.h"

/* Takes the limits it enforces from c (kept by reference: c must outlive the module). */
void publish_init(const struct conf *c);
/* Serve a new Publish, PublishStream or Produce call; each takes ownership of everything
 * in in. */
void publish_handle(struct incoming *in);
void publish_handle_stream(struct incoming *in);
void publish_handle_produce(struct incoming *in);
/* Delivery-report callback for the producer (see producer_delivery_fn). */
void publish_on_delivery(const rd_kafka_message_t **msgs, size_t n);
/* Room-callback for the producer (see producer_room_fn): resumes streams waiting for room
 * in the producer's queue or under publish.max_inflight_bytes_total. */
void publish_on_room(void);
/* Draining: every publish stream stops reading and ends, once its records in flight are
 * delivered, with UNAVAILABLE and kbridge-durable-requests. */
void publish_drain(void);
/* Publish calls alive now (for status lines and tests). */
size_t publish_active(void);

/* Checks record rec_index of request req_index before it is produced. Returns
 * GRPC_STATUS_OK, or INVALID_ARGUMENT with a message naming the request and record
 * (indexes from 0) written to msg. */
grpc_status_code publish_validate_record(const Kbridge__V1__Record *r, uint64_t req_index,
					 size_t rec_index, size_t max_record_bytes, char *msg, size_t msgsize);
/* The same for every record of req: the first problem found. */
grpc_status_code publish_validate(const Kbridge__V1__PublishRequest *req, uint64_t req_index,
				  size_t max_record_bytes, char *msg, size_t msgsize);

#endif
