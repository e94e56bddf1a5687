/* codec: protobuf-c messages <-> gRPC byte buffers. Any thread. */
#ifndef KB_CODEC_H
#define KB_CODEC_H

#include <stddef.h>
#include <stdint.h>

#include <grpc/grpc.h>
#include <protobuf-c/protobuf-c.h>

#include "kbridge/v1/bridge.pb-c.h"

/* Packs msg into a new byte buffer; the caller owns it (grpc_byte_buffer_destroy). */
grpc_byte_buffer *codec_encode(const ProtobufCMessage *msg);

/* Unpacks bb as a message of type desc. Returns NULL if it does not decode. The caller
 * frees the result with protobuf_c_message_free_unpacked(msg, NULL); bb stays the
 * caller's. A NULL bb decodes as the empty message. */
ProtobufCMessage *codec_decode(const ProtobufCMessageDescriptor *desc, grpc_byte_buffer *bb);

/* Frees an arena of codec_decode_publish_request (below) and all it holds; NULL is fine. */
void codec_arena_destroy(ProtobufCAllocator *arena);

/* --- hand-written wire code for the messages on the hot paths ---
 * protobuf-c's generic reflection-driven (un)packing costs about 1,000 instructions per
 * published record and 700 per acknowledged one (callgrind); these do the same work for
 * the three messages every record passes through, byte for byte as protobuf-c would
 * (tests/unit/test-codec compares them on many generated and mutated messages). */

/* Decodes a PublishRequest into a new arena (*arena_out; the caller destroys it), as
 * protobuf_c_message_unpack would: the same fields, defaults and failures (NULL, and
 * *arena_out NULL). The encoded bytes are copied into the arena once and the records'
 * keys and values point into that copy; records with the same topic as the record before
 * share its string. A NULL bb decodes as the empty message. */
Kbridge__V1__PublishRequest *codec_decode_publish_request(grpc_byte_buffer *bb,
							  ProtobufCAllocator **arena_out);

/* One RecordResult of a PublishAck. */
struct record_result {
	int32_t partition;
	int64_t offset;
	int32_t code;      /* a grpc_status_code */
	const char *error; /* NULL or "" when none */
};

/* Encodes PublishAck{sequence, results} into a new byte buffer. */
grpc_byte_buffer *codec_encode_publish_ack(uint64_t sequence, const struct record_result *results,
					   size_t n);

/* The fields of one Record a subscriber receives. */
struct record_fields {
	const char *topic;
	int32_t partition;
	int64_t offset, timestamp_ms;
	const void *key, *value; /* may be NULL when the length is 0 */
	size_t key_len, value_len;
	size_t n_headers;
	const char *const *header_keys;
	const void *const *header_values;
	const size_t *header_lens;
};

/* Encodes one Record as field 1 of SubscribeResponse (tag, length, Record), so that a
 * response is the concatenation of such slices (grpc_raw_byte_buffer_create on them, no
 * copy). The caller owns the slice (grpc_slice_unref). */
grpc_slice codec_encode_subscribe_record(const struct record_fields *f);

/* Protobuf varints: the bytes v takes, and writing it (returns the byte after). */
static inline size_t codec_varint_size(uint64_t v)
{
	size_t n = 1;
	while (v >= 0x80) {
		v >>= 7;
		n++;
	}
	return n;
}

static inline uint8_t *codec_put_varint(uint8_t *p, uint64_t v)
{
	while (v >= 0x80) {
		*p++ = (uint8_t)(v | 0x80);
		v >>= 7;
	}
	*p++ = (uint8_t)v;
	return p;
}

/* Bytes in bb (0 for NULL). */
size_t codec_length(grpc_byte_buffer *bb);

#endif
