/* Unit tests for the hand-written wire code in codec.c, against protobuf-c itself:
 * - codec_decode_publish_request gives what protobuf_c_message_unpack gives, on generated
 *   requests (split over several slices or not, with unknown fields) and on thousands of
 *   corrupted ones (both refuse, or both give the same message);
 * - codec_encode_publish_ack and codec_encode_subscribe_record write the bytes
 *   protobuf_c_message_pack writes.
 * The generator is seeded, so a failure repeats. */
#include "config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/slice.h>

#include "codec.h"
#include "tap.h"

static uint64_t rng = 0x9e3779b97f4a7c15u;

static uint64_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static size_t below(size_t n)
{
	return n ? (size_t)(rnd() % n) : 0;
}

/* Interesting integers: zero, small, large, negative. */
static int64_t some_int(void)
{
	static const int64_t v[] = {0, 1, 127, 128, 300, 16384, 2147483647, -1, -2, -2147483647 - 1,
				    (int64_t)1 << 40, INT64_MAX, INT64_MIN};
	return below(3) ? v[below(sizeof(v) / sizeof(v[0]))] : (int64_t)rnd();
}

static const char *const topics[] = {"orders", "", "a.b_c-d", "events", "t"};

static void fill_bytes(ProtobufCBinaryData *b)
{
	static const size_t lens[] = {0, 0, 1, 5, 100, 127, 128, 300, 20000};
	b->len = lens[below(sizeof(lens) / sizeof(lens[0]))];
	b->data = b->len ? malloc(b->len) : NULL;
	for (size_t i = 0; i < b->len; i++)
		b->data[i] = (uint8_t)rnd();
}

static Kbridge__V1__PublishRequest *gen_request(void)
{
	Kbridge__V1__PublishRequest *m = calloc(1, sizeof(*m));
	kbridge__v1__publish_request__init(m);
	m->n_records = below(4) ? below(5) : below(200);
	m->records = calloc(m->n_records + 1, sizeof(*m->records));
	for (size_t i = 0; i < m->n_records; i++) {
		Kbridge__V1__Record *r = calloc(1, sizeof(*r));
		kbridge__v1__record__init(r);
		if (below(5))
			r->topic = (char *)topics[below(sizeof(topics) / sizeof(topics[0]))];
		fill_bytes(&r->key);
		fill_bytes(&r->value);
		r->n_headers = below(3) ? 0 : below(4);
		r->headers = calloc(r->n_headers + 1, sizeof(*r->headers));
		for (size_t h = 0; h < r->n_headers; h++) {
			Kbridge__V1__Header *hd = calloc(1, sizeof(*hd));
			kbridge__v1__header__init(hd);
			if (below(4))
				hd->key = (char *)(below(2) ? "trace-id" : "k");
			fill_bytes(&hd->value);
			r->headers[h] = hd;
		}
		if (below(2)) {
			r->placement_case = KBRIDGE__V1__RECORD__PLACEMENT_PARTITION;
			r->partition = (int32_t)some_int();
		}
		r->timestamp_ms = below(2) ? some_int() : 0;
		r->offset = below(4) ? 0 : some_int();
		m->records[i] = r;
	}
	return m;
}

static void free_request(Kbridge__V1__PublishRequest *m)
{
	for (size_t i = 0; i < m->n_records; i++) {
		Kbridge__V1__Record *r = m->records[i];
		for (size_t h = 0; h < r->n_headers; h++) {
			free(r->headers[h]->value.data);
			free(r->headers[h]);
		}
		free(r->headers);
		free(r->key.data);
		free(r->value.data);
		free(r);
	}
	free(m->records);
	free(m);
}

static int bytes_eq(const ProtobufCBinaryData *a, const ProtobufCBinaryData *b)
{
	return a->len == b->len && (a->len == 0 || memcmp(a->data, b->data, a->len) == 0);
}

/* Both decoded messages hold the same fields (a NULL means refused). */
static int same(const Kbridge__V1__PublishRequest *a, const Kbridge__V1__PublishRequest *b)
{
	if (!a || !b)
		return !a && !b;
	if (a->n_records != b->n_records)
		return 0;
	for (size_t i = 0; i < a->n_records; i++) {
		const Kbridge__V1__Record *x = a->records[i], *y = b->records[i];
		if (strcmp(x->topic, y->topic) || !bytes_eq(&x->key, &y->key) || !bytes_eq(&x->value, &y->value) ||
		    x->placement_case != y->placement_case || x->timestamp_ms != y->timestamp_ms ||
		    x->offset != y->offset || x->n_headers != y->n_headers ||
		    (x->placement_case == KBRIDGE__V1__RECORD__PLACEMENT_PARTITION && x->partition != y->partition))
			return 0;
		for (size_t h = 0; h < x->n_headers; h++)
			if (strcmp(x->headers[h]->key, y->headers[h]->key) ||
			    !bytes_eq(&x->headers[h]->value, &y->headers[h]->value))
				return 0;
	}
	return 1;
}

/* bytes as a byte buffer of one slice, or of several when split is set. */
static grpc_byte_buffer *buffer_of(const uint8_t *data, size_t len, int split)
{
	grpc_slice s[3];
	size_t n = 0;
	if (!split || len < 3) {
		s[n++] = grpc_slice_from_copied_buffer((const char *)data, len);
	} else {
		size_t a = 1 + below(len - 2), b = a + 1 + below(len - a - 1);
		s[n++] = grpc_slice_from_copied_buffer((const char *)data, a);
		s[n++] = grpc_slice_from_copied_buffer((const char *)data + a, b - a);
		s[n++] = grpc_slice_from_copied_buffer((const char *)data + b, len - b);
	}
	grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(s, n);
	for (size_t i = 0; i < n; i++)
		grpc_slice_unref(s[i]);
	return bb;
}

/* Decodes data both ways; returns whether they agree. */
static int agree(const uint8_t *data, size_t len, int split, int *decoded)
{
	Kbridge__V1__PublishRequest *want = kbridge__v1__publish_request__unpack(NULL, len, data);
	grpc_byte_buffer *bb = buffer_of(data, len, split);
	ProtobufCAllocator *arena;
	Kbridge__V1__PublishRequest *got = codec_decode_publish_request(bb, &arena);
	grpc_byte_buffer_destroy(bb);
	int r = same(want, got) && (got != NULL) == (arena != NULL);
	*decoded = got != NULL;
	if (want)
		kbridge__v1__publish_request__free_unpacked(want, NULL);
	codec_arena_destroy(arena);
	return r;
}

/* Appends fields no version of the schema has: they must be stepped over. */
static size_t add_unknown(uint8_t *p)
{
	static const uint8_t unknown[][8] = {
		{3, 0x48, 0x96, 0x01},                 /* field 9, varint 150 */
		{5, 0x7d, 1, 2, 3, 4},                 /* field 15, fixed32 */
		{4, 0xa2, 0x06, 1, 'x'},               /* field 100, 1 byte */
		{7, 0x51, 1, 2, 3, 4, 5, 6},           /* field 10, fixed64: 2 bytes short */
	};
	const uint8_t *u = unknown[below(3)];
	memcpy(p, u + 1, u[0]);
	return u[0];
}

static void test_decode(void)
{
	int bad = 0, corrupt_bad = 0, refused = 0, accepted = 0, cases = 0;

	for (int i = 0; i < 1500; i++) {
		Kbridge__V1__PublishRequest *m = gen_request();
		size_t len = kbridge__v1__publish_request__get_packed_size(m);
		uint8_t *buf = malloc(len + 64);
		kbridge__v1__publish_request__pack(m, buf);
		int decoded;
		if (below(4) == 0)
			len += add_unknown(buf + len);
		cases++;
		if (!agree(buf, len, (int)below(2), &decoded) || !decoded) {
			if (bad++ < 3)
				printf("# request %d (%zu bytes) decoded differently\n", i, len);
		}
		/* Corrupted copies: a byte changed, a cut, a byte inserted. */
		for (int c = 0; c < 8 && len; c++) {
			uint8_t *cp = malloc(len + 1);
			size_t clen = len;
			memcpy(cp, buf, len);
			switch (below(3)) {
			case 0:
				cp[below(len)] = (uint8_t)rnd();
				break;
			case 1:
				clen = below(len);
				break;
			default: {
				size_t at = below(len + 1);
				memmove(cp + at + 1, cp + at, len - at);
				cp[at] = (uint8_t)rnd();
				clen = len + 1;
			}
			}
			if (!agree(cp, clen, (int)below(2), &decoded)) {
				if (corrupt_bad++ < 3) {
					printf("# corrupted request %d/%d (%zu bytes) decoded differently:", i, c, clen);
					for (size_t k = 0; k < clen && k < 40; k++)
						printf(" %02x", cp[k]);
					printf("\n");
				}
			}
			decoded ? accepted++ : refused++;
			free(cp);
		}
		free(buf);
		free_request(m);
	}
	ok(bad == 0, "%d generated requests decode as protobuf-c decodes them (%d differ)", cases, bad);
	ok(corrupt_bad == 0, "corrupted requests: the same verdict and content as protobuf-c (%d accepted, %d refused, %d differ)",
	   accepted, refused, corrupt_bad);
	ok(accepted > 100 && refused > 100, "the corruptions exercise both outcomes");

	int decoded;
	ok(agree((const uint8_t *)"", 0, 0, &decoded) && decoded, "the empty request decodes");
	ProtobufCAllocator *arena;
	Kbridge__V1__PublishRequest *m = codec_decode_publish_request(NULL, &arena);
	ok(m && m->n_records == 0, "no message at all decodes as the empty request");
	codec_arena_destroy(arena);
	/* Groups, which protobuf-c refuses, and a field number 0. */
	static const uint8_t group[] = {0x0b, 0x0c}, zero[] = {0x00, 0x01};
	ok(agree(group, sizeof(group), 0, &decoded) && !decoded, "a group is refused");
	ok(agree(zero, sizeof(zero), 0, &decoded) && !decoded, "field number 0 is refused");
}

static void test_record_sharing(void)
{
	Kbridge__V1__PublishRequest *m = gen_request();
	for (size_t i = 0; i < m->n_records; i++)
		m->records[i]->topic = "same";
	size_t len = kbridge__v1__publish_request__get_packed_size(m);
	uint8_t *buf = malloc(len);
	kbridge__v1__publish_request__pack(m, buf);
	grpc_byte_buffer *bb = buffer_of(buf, len, 0);
	ProtobufCAllocator *arena;
	Kbridge__V1__PublishRequest *got = codec_decode_publish_request(bb, &arena);
	int shared = got != NULL;
	for (size_t i = 1; got && i < got->n_records; i++)
		shared &= got->records[i]->topic == got->records[0]->topic;
	ok(shared, "records of one topic share its string (%zu records)", m->n_records);
	codec_arena_destroy(arena);
	grpc_byte_buffer_destroy(bb);
	free(buf);
	free_request(m);
}

static int buffer_is(grpc_byte_buffer *bb, const uint8_t *want, size_t len)
{
	grpc_byte_buffer_reader r;
	grpc_byte_buffer_reader_init(&r, bb);
	grpc_slice s = grpc_byte_buffer_reader_readall(&r);
	int eq = GRPC_SLICE_LENGTH(s) == len && memcmp(GRPC_SLICE_START_PTR(s), want, len) == 0;
	grpc_slice_unref(s);
	grpc_byte_buffer_reader_destroy(&r);
	return eq;
}

static void test_ack(void)
{
	int bad = 0;
	for (int i = 0; i < 2000; i++) {
		size_t n = below(4) ? below(4) : below(400);
		struct record_result *res = calloc(n + 1, sizeof(*res));
		Kbridge__V1__RecordResult *rr = calloc(n + 1, sizeof(*rr));
		Kbridge__V1__RecordResult **rp = calloc(n + 1, sizeof(*rp));
		for (size_t k = 0; k < n; k++) {
			res[k].partition = (int32_t)some_int();
			res[k].offset = some_int();
			res[k].code = below(3) ? 0 : (int32_t)below(17);
			res[k].error = below(3) ? NULL : below(2) ? "" : "topic t partition 1: not delivered";
			kbridge__v1__record_result__init(&rr[k]);
			rr[k].partition = res[k].partition;
			rr[k].offset = res[k].offset;
			rr[k].code = res[k].code;
			if (res[k].error)
				rr[k].error = (char *)res[k].error;
			rp[k] = &rr[k];
		}
		Kbridge__V1__PublishAck ack = KBRIDGE__V1__PUBLISH_ACK__INIT;
		ack.sequence = below(3) ? (uint64_t)some_int() : 0;
		ack.n_results = n;
		ack.results = rp;
		size_t len = kbridge__v1__publish_ack__get_packed_size(&ack);
		uint8_t *want = malloc(len + 1);
		kbridge__v1__publish_ack__pack(&ack, want);
		grpc_byte_buffer *bb = codec_encode_publish_ack(ack.sequence, res, n);
		if (!buffer_is(bb, want, len))
			bad++;
		grpc_byte_buffer_destroy(bb);
		free(want);
		free(rp);
		free(rr);
		free(res);
	}
	ok(bad == 0, "2000 PublishAcks encode byte for byte as protobuf-c packs them (%d differ)", bad);
}

static void test_subscribe_records(void)
{
	int bad = 0;
	for (int i = 0; i < 1000; i++) {
		Kbridge__V1__PublishRequest *m = gen_request(); /* records to send back */
		grpc_slice *slices = calloc(m->n_records + 1, sizeof(*slices));
		for (size_t k = 0; k < m->n_records; k++) {
			Kbridge__V1__Record *r = m->records[k];
			const char *keys[4];
			const void *values[4];
			size_t lens[4];
			for (size_t h = 0; h < r->n_headers; h++) {
				keys[h] = r->headers[h]->key;
				values[h] = r->headers[h]->value.data;
				lens[h] = r->headers[h]->value.len;
			}
			/* What a subscriber gets: the partition always set. */
			r->placement_case = KBRIDGE__V1__RECORD__PLACEMENT_PARTITION;
			struct record_fields f = {
				.topic = r->topic, .partition = r->partition, .offset = r->offset,
				.timestamp_ms = r->timestamp_ms, .key = r->key.data, .key_len = r->key.len,
				.value = r->value.data, .value_len = r->value.len, .n_headers = r->n_headers,
				.header_keys = keys, .header_values = values, .header_lens = lens,
			};
			slices[k] = codec_encode_subscribe_record(&f);
		}
		Kbridge__V1__SubscribeResponse resp = KBRIDGE__V1__SUBSCRIBE_RESPONSE__INIT;
		resp.n_records = m->n_records;
		resp.records = m->records;
		size_t len = kbridge__v1__subscribe_response__get_packed_size(&resp);
		uint8_t *want = malloc(len + 1);
		kbridge__v1__subscribe_response__pack(&resp, want);
		grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(slices, m->n_records);
		if (!buffer_is(bb, want, len))
			bad++;
		grpc_byte_buffer_destroy(bb);
		for (size_t k = 0; k < m->n_records; k++)
			grpc_slice_unref(slices[k]);
		free(slices);
		free(want);
		free_request(m);
	}
	ok(bad == 0, "1000 SubscribeResponses put together from encoded records are what protobuf-c packs (%d differ)",
	   bad);
}

int main(void)
{
	grpc_init();
	test_decode();
	test_record_sharing();
	test_ack();
	test_subscribe_records();
	grpc_shutdown();
	return tap_done();
}
