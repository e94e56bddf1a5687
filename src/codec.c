#include "config.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* The arena and its first chunk are one allocation: the first chunk follows the arena,
 * rounded up to max_align_t. */
#define FIRST_CHUNK_OFFSET \
	((sizeof(struct arena) + sizeof(max_align_t) - 1) / sizeof(max_align_t) * sizeof(max_align_t))

/* An arena for decoding one message: allocations are carved out of a few large chunks
 * and frees do nothing; codec_arena_destroy frees everything at once. hint: the encoded
 * size of what it will hold. One thread at a time. */
static ProtobufCAllocator *codec_arena_new(size_t hint)
{
	/* Decoded, a message takes its encoded size (bytes and strings are copied) plus its
	 * structs: a little more for large records (one chunk), up to about 2.5 times for
	 * small ones (a chunk or two more). The encoded size is what the in-flight byte
	 * limits count, so the first chunk is not made larger than that needs. */
	size_t size = hint + 1024;
	struct arena *ar = xmalloc(FIRST_CHUNK_OFFSET + sizeof(struct chunk) + size);
	struct chunk *c = (struct chunk *)((char *)ar + FIRST_CHUNK_OFFSET);

	ar->a.alloc = arena_alloc;
	ar->a.free = arena_free;
	ar->a.allocator_data = ar;
	c->next = NULL;
	c->size = size;
	c->used = 0;
	ar->chunks = c;
	return &ar->a;
}

void codec_arena_destroy(ProtobufCAllocator *arena)
{
	if (!arena)
		return;
	struct arena *ar = (struct arena *)arena;
	for (struct chunk *c = ar->chunks, *next; c && c->next; c = next) { /* all but the first */
		next = c->next;
		free(c);
	}
	free(ar);
}

/* A compressed message's size is known only once expanded: a new arena of that size. */
static ProtobufCAllocator *arena_reset(ProtobufCAllocator *old, size_t len, uint8_t **data)
{
	codec_arena_destroy(old);
	ProtobufCAllocator *a = codec_arena_new(len);
	*data = a->alloc(a->allocator_data, len ? len : 1);
	return a;
}

/* --- messages --- */

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

/* --- hand-written wire code (codec.h) --- */

enum { WT_VARINT = 0, WT_FIXED64 = 1, WT_LEN = 2, WT_FIXED32 = 5 };

/* A length-delimited field: tag, length, bytes. */
static size_t len_field_size(size_t len)
{
	return 1 + codec_varint_size(len) + len;
}

static uint8_t *put_len_field(uint8_t *p, unsigned field, const void *data, size_t len)
{
	*p++ = (uint8_t)(field << 3 | WT_LEN);
	p = codec_put_varint(p, len);
	if (len)
		memcpy(p, data, len);
	return p + len;
}

static uint8_t *put_varint_field(uint8_t *p, unsigned field, uint64_t v)
{
	*p++ = (uint8_t)(field << 3 | WT_VARINT);
	return codec_put_varint(p, v);
}

/* Encoded, an int32 is sign-extended to 64 bits (10 bytes when negative). */
static uint64_t int32_wire(int32_t v)
{
	return (uint64_t)(int64_t)v;
}

struct in {
	const uint8_t *p, *end;
};

/* A varint of at most max bytes: protobuf-c takes 10 for values, 5 for lengths. */
static inline bool get_varint(struct in *in, unsigned max, uint64_t *v)
{
	uint64_t r = 0;
	for (unsigned i = 0; i < max && in->p < in->end; i++) {
		uint8_t b = *in->p++;
		r |= (uint64_t)(b & 0x7f) << (7 * i);
		if (!(b & 0x80)) {
			*v = r;
			return true;
		}
	}
	return false;
}

/* A field's tag as protobuf-c reads it: at most 5 bytes, field number 0 refused. */
static inline bool get_tag(struct in *in, uint32_t *field, unsigned *wt)
{
	if (in->p == in->end || (in->p[0] & 0xf8) == 0)
		return false;
	uint32_t tag = (in->p[0] & 0x7f) >> 3;
	unsigned shift = 4;
	*wt = in->p[0] & 7;
	size_t avail = (size_t)(in->end - in->p), max = avail > 5 ? 5 : avail;
	if (!(in->p[0] & 0x80)) {
		in->p++;
		*field = tag;
		return true;
	}
	for (size_t i = 1; i < max; i++) {
		if (in->p[i] & 0x80) {
			tag |= (uint32_t)(in->p[i] & 0x7f) << shift;
			shift += 7;
		} else {
			tag |= (uint32_t)in->p[i] << shift;
			in->p += i + 1;
			*field = tag;
			return true;
		}
	}
	return false;
}

/* The bytes of a length-delimited field, after its tag. */
static inline bool get_bytes(struct in *in, struct in *out)
{
	uint64_t len;
	if (!get_varint(in, 5, &len) || len > (uint64_t)(in->end - in->p))
		return false;
	out->p = in->p;
	out->end = in->p + len;
	in->p += len;
	return true;
}

/* Skips the value of a field nobody here knows (protobuf-c keeps such fields as unknown
 * fields; nothing reads them, so they are only stepped over). Groups are refused, as
 * protobuf-c refuses them. */
static inline bool skip_value(struct in *in, unsigned wt)
{
	uint64_t v;
	struct in b;
	switch (wt) {
	case WT_VARINT:
		return get_varint(in, 10, &v);
	case WT_FIXED64:
	case WT_FIXED32: {
		size_t n = wt == WT_FIXED64 ? 8 : 4;
		if ((size_t)(in->end - in->p) < n)
			return false;
		in->p += n;
		return true;
	}
	case WT_LEN:
		return get_bytes(in, &b);
	default:
		return false;
	}
}

static char *arena_string(ProtobufCAllocator *a, const struct in *s)
{
	size_t len = (size_t)(s->end - s->p);
	char *str = a->alloc(a->allocator_data, len + 1);
	memcpy(str, s->p, len);
	str[len] = '\0';
	return str;
}

static void set_bytes(ProtobufCBinaryData *b, const struct in *s)
{
	b->len = (size_t)(s->end - s->p);
	b->data = b->len ? (uint8_t *)s->p : NULL;
}

static bool decode_header(struct in in, Kbridge__V1__Header *h, ProtobufCAllocator *a)
{
	uint32_t field;
	unsigned wt;
	struct in s = {0};

	kbridge__v1__header__init(h);
	while (in.p < in.end) {
		if (!get_tag(&in, &field, &wt))
			return false;
		if (field == 1 || field == 2) {
			if (wt != WT_LEN || !get_bytes(&in, &s))
				return false;
			if (field == 1)
				h->key = arena_string(a, &s);
			else
				set_bytes(&h->value, &s);
		} else if (!skip_value(&in, wt)) {
			return false;
		}
	}
	return true;
}

/* Headers from here to the end of a record (each a field 4 of wire type 2). */
static bool count_headers(struct in in, size_t *n)
{
	uint32_t field;
	unsigned wt;

	*n = 0;
	while (in.p < in.end) {
		if (!get_tag(&in, &field, &wt) || !skip_value(&in, wt))
			return false;
		*n += field == 4 && wt == WT_LEN;
	}
	return true;
}

/* prev_topic: the topic of the record before, shared when this one's is the same. */
static bool decode_record(struct in in, Kbridge__V1__Record *r, ProtobufCAllocator *a,
			  const char **prev_topic, size_t *prev_len)
{
	uint32_t field;
	unsigned wt;
	uint64_t v;
	struct in s = {0};

	kbridge__v1__record__init(r);
	while (in.p < in.end) {
		const uint8_t *at = in.p;
		if (!get_tag(&in, &field, &wt))
			return false;
		switch (field) {
		case 1:
		case 2:
		case 3:
		case 4:
			if (wt != WT_LEN || !get_bytes(&in, &s))
				return false;
			if (field == 1) {
				size_t len = (size_t)(s.end - s.p);
				if (*prev_topic && *prev_len == len && memcmp(*prev_topic, s.p, len) == 0) {
					r->topic = (char *)*prev_topic;
				} else {
					*prev_topic = r->topic = arena_string(a, &s);
					*prev_len = len;
				}
			} else if (field == 2) {
				set_bytes(&r->key, &s);
			} else if (field == 3) {
				set_bytes(&r->value, &s);
			} else {
				if (!r->headers) { /* the first: allocate them all in one piece */
					size_t n;
					if (!count_headers((struct in){at, in.end}, &n))
						return false;
					Kbridge__V1__Header *hs = a->alloc(a->allocator_data, n * sizeof(*hs));
					r->headers = a->alloc(a->allocator_data, n * sizeof(*r->headers));
					for (size_t i = 0; i < n; i++)
						r->headers[i] = &hs[i];
				}
				if (!decode_header(s, r->headers[r->n_headers++], a))
					return false;
			}
			break;
		case 5:
		case 6:
		case 7:
			if (wt != WT_VARINT || !get_varint(&in, 10, &v))
				return false;
			if (field == 5) {
				r->placement_case = KBRIDGE__V1__RECORD__PLACEMENT_PARTITION;
				r->partition = (int32_t)(uint32_t)v;
			} else if (field == 6) {
				r->timestamp_ms = (int64_t)v;
			} else {
				r->offset = (int64_t)v;
			}
			break;
		default:
			if (!skip_value(&in, wt))
				return false;
		}
	}
	return true;
}

Kbridge__V1__PublishRequest *codec_decode_publish_request(grpc_byte_buffer *bb,
							  ProtobufCAllocator **arena_out)
{
	size_t len = bb ? grpc_byte_buffer_length(bb) : 0;
	/* The arena starts with the request's bytes (records point into them): copied
	 * straight from the slices gRPC received them in, or from what a compressed
	 * message expands to; then the records, their topics and their headers. */
	ProtobufCAllocator *a = codec_arena_new(len);
	uint8_t *data = a->alloc(a->allocator_data, len ? len : 1);

	*arena_out = NULL;
	if (bb && bb->type == GRPC_BB_RAW && bb->data.raw.compression == GRPC_COMPRESS_NONE) {
		size_t at = 0;
		for (size_t i = 0; i < bb->data.raw.slice_buffer.count; i++) {
			grpc_slice sl = bb->data.raw.slice_buffer.slices[i];
			memcpy(data + at, GRPC_SLICE_START_PTR(sl), GRPC_SLICE_LENGTH(sl));
			at += GRPC_SLICE_LENGTH(sl);
		}
	} else if (bb) {
		grpc_byte_buffer_reader reader;
		if (!grpc_byte_buffer_reader_init(&reader, bb)) {
			codec_arena_destroy(a);
			return NULL;
		}
		grpc_slice flat = grpc_byte_buffer_reader_readall(&reader);
		grpc_byte_buffer_reader_destroy(&reader);
		len = GRPC_SLICE_LENGTH(flat);
		a = arena_reset(a, len, &data);
		memcpy(data, GRPC_SLICE_START_PTR(flat), len);
		grpc_slice_unref(flat);
	}

	/* Pass 1: count the records and check the framing of the top level. */
	struct in in = {data, data + len}, s = {0};
	uint32_t field;
	unsigned wt;
	size_t n = 0;
	while (in.p < in.end) {
		if (!get_tag(&in, &field, &wt) || (field == 1 && wt != WT_LEN) || !skip_value(&in, wt)) {
			codec_arena_destroy(a);
			return NULL;
		}
		n += field == 1;
	}

	Kbridge__V1__PublishRequest *msg = a->alloc(a->allocator_data, sizeof(*msg));
	kbridge__v1__publish_request__init(msg);
	if (n) {
		Kbridge__V1__Record *recs = a->alloc(a->allocator_data, n * sizeof(*recs));
		msg->records = a->alloc(a->allocator_data, n * sizeof(*msg->records));
		for (size_t i = 0; i < n; i++)
			msg->records[i] = &recs[i];
	}

	/* Pass 2: the records. */
	const char *prev_topic = NULL;
	size_t prev_len = 0;
	in = (struct in){data, data + len};
	while (in.p < in.end) {
		get_tag(&in, &field, &wt);
		if (field != 1) {
			skip_value(&in, wt);
			continue;
		}
		get_bytes(&in, &s);
		if (!decode_record(s, msg->records[msg->n_records], a, &prev_topic, &prev_len)) {
			codec_arena_destroy(a);
			return NULL;
		}
		msg->n_records++;
	}
	*arena_out = a;
	return msg;
}

grpc_byte_buffer *codec_encode_publish_ack(uint64_t sequence, const struct record_result *results,
					   size_t n)
{
	size_t len = sequence ? 1 + codec_varint_size(sequence) : 0;
	size_t stack_inner[128]; /* the size of each RecordResult */
	size_t *inner = n <= 128 ? stack_inner : xcalloc(n, sizeof(size_t));

	for (size_t i = 0; i < n; i++) {
		const struct record_result *r = &results[i];
		size_t m = 0;
		if (r->partition)
			m += 1 + codec_varint_size(int32_wire(r->partition));
		if (r->offset)
			m += 1 + codec_varint_size((uint64_t)r->offset);
		if (r->code)
			m += 1 + codec_varint_size(int32_wire(r->code));
		if (r->error && r->error[0])
			m += len_field_size(strlen(r->error));
		inner[i] = m;
		len += len_field_size(m);
	}
	grpc_slice slice = grpc_slice_malloc(len);
	uint8_t *p = GRPC_SLICE_START_PTR(slice);
	if (sequence)
		p = put_varint_field(p, 1, sequence);
	for (size_t i = 0; i < n; i++) {
		const struct record_result *r = &results[i];
		*p++ = 2 << 3 | WT_LEN;
		p = codec_put_varint(p, inner[i]);
		if (r->partition)
			p = put_varint_field(p, 1, int32_wire(r->partition));
		if (r->offset)
			p = put_varint_field(p, 2, (uint64_t)r->offset);
		if (r->code)
			p = put_varint_field(p, 3, int32_wire(r->code));
		if (r->error && r->error[0])
			p = put_len_field(p, 4, r->error, strlen(r->error));
	}
	if (inner != stack_inner)
		free(inner);
	grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&slice, 1);
	grpc_slice_unref(slice);
	return bb;
}

/* The encoded size of header i of f (without its own tag and length); *klen: its key's. */
static size_t header_size(const struct record_fields *f, size_t i, size_t *klen)
{
	size_t h = 0;
	*klen = f->header_keys[i] ? strlen(f->header_keys[i]) : 0;
	if (*klen)
		h += len_field_size(*klen);
	if (f->header_lens[i])
		h += len_field_size(f->header_lens[i]);
	return h;
}

grpc_slice codec_encode_subscribe_record(const struct record_fields *f)
{
	size_t tlen = f->topic ? strlen(f->topic) : 0, m = 0;

	if (tlen)
		m += len_field_size(tlen);
	if (f->key_len)
		m += len_field_size(f->key_len);
	if (f->value_len)
		m += len_field_size(f->value_len);
	for (size_t i = 0; i < f->n_headers; i++) {
		size_t klen;
		m += len_field_size(header_size(f, i, &klen));
	}
	m += 1 + codec_varint_size(int32_wire(f->partition)); /* a oneof member: always there */
	if (f->timestamp_ms)
		m += 1 + codec_varint_size((uint64_t)f->timestamp_ms);
	if (f->offset)
		m += 1 + codec_varint_size((uint64_t)f->offset);

	grpc_slice slice = grpc_slice_malloc(len_field_size(m));
	uint8_t *p = GRPC_SLICE_START_PTR(slice);
	*p++ = 1 << 3 | WT_LEN;
	p = codec_put_varint(p, m);
	if (tlen)
		p = put_len_field(p, 1, f->topic, tlen);
	if (f->key_len)
		p = put_len_field(p, 2, f->key, f->key_len);
	if (f->value_len)
		p = put_len_field(p, 3, f->value, f->value_len);
	for (size_t i = 0; i < f->n_headers; i++) {
		size_t klen, h = header_size(f, i, &klen);
		*p++ = 4 << 3 | WT_LEN;
		p = codec_put_varint(p, h);
		if (klen)
			p = put_len_field(p, 1, f->header_keys[i], klen);
		if (f->header_lens[i])
			p = put_len_field(p, 2, f->header_values[i], f->header_lens[i]);
	}
	p = put_varint_field(p, 5, int32_wire(f->partition));
	if (f->timestamp_ms)
		p = put_varint_field(p, 6, (uint64_t)f->timestamp_ms);
	if (f->offset)
		p = put_varint_field(p, 7, (uint64_t)f->offset);
	return slice;
}
