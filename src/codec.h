/* codec: protobuf-c messages <-> gRPC byte buffers. Any thread. */
#ifndef KB_CODEC_H
#define KB_CODEC_H

#include <grpc/grpc.h>
#include <protobuf-c/protobuf-c.h>

#include "kbridge/v1/bridge.pb-c.h"

/* Packs msg into a new byte buffer; the caller owns it (grpc_byte_buffer_destroy). */
grpc_byte_buffer *codec_encode(const ProtobufCMessage *msg);

/* Unpacks bb as a message of type desc. Returns NULL if it does not decode. The caller
 * frees the result with protobuf_c_message_free_unpacked(msg, NULL); bb stays the
 * caller's. A NULL bb decodes as the empty message. */
ProtobufCMessage *codec_decode(const ProtobufCMessageDescriptor *desc, grpc_byte_buffer *bb);

/* An arena for decoding one message: protobuf-c's allocations are carved out of a few
 * large chunks and its frees do nothing; codec_arena_destroy frees everything at once
 * (instead of protobuf_c_message_free_unpacked). hint: the encoded size of what it will
 * hold. One thread at a time. */
ProtobufCAllocator *codec_arena_new(size_t hint);
void codec_arena_destroy(ProtobufCAllocator *arena);
/* codec_decode with an allocator (an arena), NULL for malloc. */
ProtobufCMessage *codec_decode_with(const ProtobufCMessageDescriptor *desc, grpc_byte_buffer *bb,
				    ProtobufCAllocator *allocator);

/* Bytes in bb (0 for NULL). */
size_t codec_length(grpc_byte_buffer *bb);

#endif
