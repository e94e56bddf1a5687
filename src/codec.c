#include "config.h"

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

ProtobufCMessage *codec_decode(const ProtobufCMessageDescriptor *desc, grpc_byte_buffer *bb)
{
	grpc_byte_buffer_reader reader;
	grpc_slice slice;
	ProtobufCMessage *msg;

	if (!bb)
		return protobuf_c_message_unpack(desc, NULL, 0, (const uint8_t *)"");
	if (!grpc_byte_buffer_reader_init(&reader, bb))
		return NULL;
	/* Unpack in place when the message sits in one slice; protobuf-c copies what it keeps. */
	if (bb->type == GRPC_BB_RAW && bb->data.raw.compression == GRPC_COMPRESS_NONE &&
	    bb->data.raw.slice_buffer.count == 1) {
		slice = bb->data.raw.slice_buffer.slices[0];
		msg = protobuf_c_message_unpack(desc, NULL, GRPC_SLICE_LENGTH(slice),
						GRPC_SLICE_START_PTR(slice));
	} else {
		slice = grpc_byte_buffer_reader_readall(&reader);
		msg = protobuf_c_message_unpack(desc, NULL, GRPC_SLICE_LENGTH(slice),
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
