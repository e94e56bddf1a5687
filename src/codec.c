#include "config.h"

#include <stddef.h>
#include <stdlib.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>

#include "codec.h"
#include "util.h"

grpc_byte_buffer *codec_encode(const ProtobufCMessage *msg)
{
	size_t len = protobuf_c_message_get_packed_size(msg);
	grpc_slice slice = grpc_slice_malloc(len);
	protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(slice));
	grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&slice, 1);
	grpc_slice_unref(slice);
	return bb;
}

/* --- arenas --- */

struct chunk {
	struct chunk *next;
	size_t size, used;
	max_align_t data[];
};

struct arena {
	ProtobufCAllocator a; /* first: the allocator is the arena */
	struct chunk *chunks;
};

static struct chunk *chunk_new(size_t size, struct chunk *next)
{
	struct chunk *c = xmalloc(sizeof(*c) + size);
	c->next = next;
	c->size = size;
	c->used = 0;
	return c;
}

static void *arena_alloc(void *data, size_t size)
{
	struct arena *ar = data;
	struct chunk *c = ar->chunks;
	const size_t align = sizeof(max_align_t);

	size = (size + align - 1) / align * align;
	if (c->size - c->used < size) /* another chunk like the last: waste stays under one */
		ar->chunks = c = chunk_new(c->size > size ? c->size : size, c);
	void *p = (char *)c->data + c->used;
	c->used += size;
	return p;
}

static void arena_free(void *data, void *p)
{
	(void)data;
	(void)p;
}

ProtobufCAllocator *codec_arena_new(size_t hint)
{
	struct arena *ar = xmalloc(sizeof(*ar));
	ar->a.alloc = arena_alloc;
	ar->a.free = arena_free;
	ar->a.allocator_data = ar;
	/* Decoded, a message takes its encoded size (bytes and strings are copied) plus its
	 * structs: a little more for large records (one chunk), up to about 2.5 times for
	 * small ones (a chunk or two more). The encoded size is what the in-flight byte
	 * limits count, so the first chunk is not made larger than that needs. */
	ar->chunks = chunk_new(hint + 1024, NULL);
	return &ar->a;
}

void codec_arena_destroy(ProtobufCAllocator *arena)
{
	if (!arena)
		return;
	struct arena *ar = (struct arena *)arena;
	for (struct chunk *c = ar->chunks, *next; c; c = next) {
		next = c->next;
		free(c);
	}
	free(ar);
}

/* --- messages --- */

ProtobufCMessage *codec_decode(const ProtobufCMessageDescriptor *desc, grpc_byte_buffer *bb)
{
	return codec_decode_with(desc, bb, NULL);
}

ProtobufCMessage *codec_decode_with(const ProtobufCMessageDescriptor *desc, grpc_byte_buffer *bb,
				    ProtobufCAllocator *allocator)
{
	grpc_byte_buffer_reader reader;
	grpc_slice slice;
	ProtobufCMessage *msg;

	if (!bb)
		return protobuf_c_message_unpack(desc, allocator, 0, (const uint8_t *)"");
	if (!grpc_byte_buffer_reader_init(&reader, bb))
		return NULL;
	/* Unpack in place when the message sits in one slice; protobuf-c copies what it keeps. */
	if (bb->type == GRPC_BB_RAW && bb->data.raw.compression == GRPC_COMPRESS_NONE &&
	    bb->data.raw.slice_buffer.count == 1) {
		slice = bb->data.raw.slice_buffer.slices[0];
		msg = protobuf_c_message_unpack(desc, allocator, GRPC_SLICE_LENGTH(slice),
						GRPC_SLICE_START_PTR(slice));
	} else {
		slice = grpc_byte_buffer_reader_readall(&reader);
		msg = protobuf_c_message_unpack(desc, allocator, GRPC_SLICE_LENGTH(slice),
						GRPC_SLICE_START_PTR(slice));
		grpc_slice_unref(slice);
	}
	grpc_byte_buffer_reader_destroy(&reader);
	return msg;
}

size_t codec_length(grpc_byte_buffer *bb)
{
	return bb ? grpc_byte_buffer_length(bb) : 0;
}
