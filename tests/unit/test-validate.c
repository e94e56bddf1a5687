/* Unit tests for request validation and the protobuf <-> byte buffer codec. */
#include "config.h"

#include <stdlib.h>

#include <grpc/grpc.h>
#include <grpc/byte_buffer.h>

#include "codec.h"
#include "publish.h"
#include "tap.h"

static Kbridge__V1__Record *record(const char *topic, size_t key, size_t value)
{
	Kbridge__V1__Record *r = calloc(1, sizeof(*r));
	kbridge__v1__record__init(r);
	r->topic = (char *)topic;
	r->key.len = key;
	r->key.data = calloc(1, key + 1);
	r->value.len = value;
	r->value.data = calloc(1, value + 1);
	return r;
}

static void free_request(Kbridge__V1__PublishRequest *req)
{
	for (size_t i = 0; i < req->n_records; i++) {
		for (size_t h = 0; h < req->records[i]->n_headers; h++)
			free(req->records[i]->headers[h]);
		free(req->records[i]->headers);
		free(req->records[i]->key.data);
		free(req->records[i]->value.data);
		free(req->records[i]);
	}
	free(req->records);
}

static grpc_status_code check(Kbridge__V1__PublishRequest *req, uint64_t index, size_t max, char *msg)
{
	return publish_validate(req, index, max, msg, 256);
}

int main(void)
{
	Kbridge__V1__PublishRequest req = KBRIDGE__V1__PUBLISH_REQUEST__INIT;
	char msg[256];

	grpc_init();
	req.n_records = 3;
	req.records = calloc(3, sizeof(*req.records));
	req.records[0] = record("orders", 10, 100);
	req.records[1] = record("orders.v2_x-y", 0, 0);
	req.records[2] = record("orders", 0, 890);

	ok(check(&req, 0, 1000, msg) == GRPC_STATUS_OK, "a good request passes");

	/* Size counts key, value and header keys and values. */
	req.records[2]->n_headers = 1;
	req.records[2]->headers = calloc(1, sizeof(Kbridge__V1__Header *));
	req.records[2]->headers[0] = calloc(1, sizeof(Kbridge__V1__Header));
	kbridge__v1__header__init(req.records[2]->headers[0]);
	req.records[2]->headers[0]->key = "trace";
	req.records[2]->headers[0]->value.len = 105;
	req.records[2]->headers[0]->value.data = (uint8_t *)"";
	ok(check(&req, 0, 1000, msg) == GRPC_STATUS_OK, "exactly max_record_bytes passes (890 + 5 + 105)");
	ok(check(&req, 7, 999, msg) == GRPC_STATUS_INVALID_ARGUMENT &&
	   contains(msg, "request 7, record 2:") && contains(msg, "1000 bytes") &&
	   contains(msg, "publish.max_record_bytes (999)"), "one byte over fails, naming request and record: %s", msg);
	req.records[2]->headers[0]->value.len = 0;

	req.records[1]->topic = "";
	ok(check(&req, 3, 1000, msg) == GRPC_STATUS_INVALID_ARGUMENT &&
	   contains(msg, "request 3, record 1: the topic is empty"), "an empty topic fails: %s", msg);
	req.records[1]->topic = "bad topic!";
	ok(check(&req, 0, 1000, msg) == GRPC_STATUS_INVALID_ARGUMENT && contains(msg, "not a valid Kafka topic name"),
	   "an invalid topic name fails: %s", msg);
	req.records[1]->topic = "orders";

	req.records[0]->placement_case = KBRIDGE__V1__RECORD__PLACEMENT_PARTITION;
	req.records[0]->partition = -1;
	ok(check(&req, 0, 1000, msg) == GRPC_STATUS_INVALID_ARGUMENT && contains(msg, "record 0: partition -1"),
	   "a negative partition fails: %s", msg);
	req.records[0]->partition = 0;
	ok(check(&req, 0, 1000, msg) == GRPC_STATUS_OK, "partition 0 passes");

	req.records[0]->timestamp_ms = -5;
	ok(check(&req, 0, 1000, msg) == GRPC_STATUS_INVALID_ARGUMENT && contains(msg, "timestamp_ms -5"),
	   "a negative timestamp fails: %s", msg);
	req.records[0]->timestamp_ms = 0;

	/* Round trip through a byte buffer, as the server sees it. */
	grpc_byte_buffer *bb = codec_encode(&req.base);
	Kbridge__V1__PublishRequest *back =
		(Kbridge__V1__PublishRequest *)codec_decode(&kbridge__v1__publish_request__descriptor, bb);
	ok(back && back->n_records == 3 && back->records[2]->value.len == 890 &&
	   back->records[2]->n_headers == 1 && strcmp(back->records[2]->headers[0]->key, "trace") == 0 &&
	   back->records[0]->placement_case == KBRIDGE__V1__RECORD__PLACEMENT_PARTITION,
	   "encode/decode round trip keeps records, headers and partition presence");
	if (back)
		protobuf_c_message_free_unpacked(&back->base, NULL);
	grpc_byte_buffer_destroy(bb);

	/* Garbage does not decode. */
	grpc_slice s = grpc_slice_from_static_string("\x0a\xff\xff\xff\xff\x0f garbage");
	bb = grpc_raw_byte_buffer_create(&s, 1);
	back = (Kbridge__V1__PublishRequest *)codec_decode(&kbridge__v1__publish_request__descriptor, bb);
	ok(back == NULL, "undecodable bytes are refused");
	grpc_byte_buffer_destroy(bb);

	/* An empty request (no payload) decodes as zero records. */
	back = (Kbridge__V1__PublishRequest *)codec_decode(&kbridge__v1__publish_request__descriptor, NULL);
	ok(back && back->n_records == 0, "an empty message decodes as no records");
	if (back)
		protobuf_c_message_free_unpacked(&back->base, NULL);

	req.records[2]->headers[0]->value.data = NULL;
	free_request(&req);
	grpc_shutdown();
	return tap_done();
}
