/* kbridge: the command-line client of kbridged, on gRPC's core API.
 *
 *   kbridge [-a ADDR] [--timeout S] publish -t TOPIC [-k KEY] [-H K=V]... [-p PARTITION]
 *           [-z | --binary] [--batch N] [--acks] [FILE]
 *   kbridge [-a ADDR] [--timeout S] tail -t TOPIC... [--from WHERE]... [-g GROUP] [-f FORMAT]
 *           [-e] [-n COUNT] [-v]
 *
 * Each command makes one call on one channel with one completion queue, which only the
 * main thread waits on (gRPC's I/O is driven by the thread that waits). A tag names the
 * batch that completed; a call is unreferenced only once no batch is outstanding.
 *
 * Threads and locks: `publish` adds a reader thread that reads the input, encodes
 * requests and queues them, so that reading goes on while a message is being sent.
 * struct publish.lock guards the send queue and every field marked "locked"; both threads
 * start batches under it (grpc_call_start_batch is thread-safe), which is what keeps at
 * most one SEND_MESSAGE outstanding. With --acks (PublishStream) the main thread also keeps
 * one RECV_MESSAGE outstanding for the acks and prints them, so that acks are read while
 * requests are being sent: both directions progress on the one queue. `tail` is
 * single-threaded. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

#include "bench.h"
#include "client.h"
#include "codec.h"
#include "util.h"

#define DEFAULT_ADDRESS "127.0.0.1:50051"
#define ADDRESS_ENV "KBRIDGE_ADDRESS"
#define METHOD_PUBLISH "/kbridge.v1.Bridge/Publish"
#define METHOD_PUBLISH_STREAM "/kbridge.v1.Bridge/PublishStream"
#define METHOD_SUBSCRIBE "/kbridge.v1.Bridge/Subscribe"
#define DURABLE_KEY "kbridge-durable-requests"

#define EXIT_RPC 1
#define EXIT_USAGE 2
#define EXIT_INTERRUPTED 130

/* A request ends at this many records (--batch) or at about this many bytes. */
#define DEFAULT_BATCH_RECORDS 100
#define MAX_BATCH_RECORDS 100000
#define BATCH_BYTES (256 * 1024)
/* Encoded requests waiting behind the one being sent: enough to keep the stream busy
 * while the reader works, little enough to bound memory (about 2 MiB). */
#define SEND_QUEUE_MAX 8
/* The server's max_request_bytes cannot go above this, so neither can a record. */
#define MAX_RECORD_BYTES (256u * 1024 * 1024)
/* How often a waiting thread looks at SIGINT and at the end of the call. */
#define POLL_MS 100
/* How often the progress line changes: often enough to look alive, rarely enough to read. */
#define PROGRESS_MS 250

enum tag {
	TAG_SEND_MD = 1, /* SEND_INITIAL_METADATA (publish) or the whole request (tail) */
	TAG_SEND,        /* one SEND_MESSAGE, maybe with SEND_CLOSE_FROM_CLIENT */
	TAG_CLOSE,       /* SEND_CLOSE_FROM_CLIENT alone */
	TAG_RECV_MD,     /* RECV_INITIAL_METADATA (tail, publish --acks) */
	TAG_RECV,        /* one RECV_MESSAGE (tail, publish --acks) */
	TAG_STATUS,      /* RECV_STATUS_ON_CLIENT, with the response for plain publish */
};
#define TAG(t) ((void *)(intptr_t)(t))

static volatile sig_atomic_t interrupted;

/* ---- status names (status.c belongs to the daemon and needs librdkafka) ---- */

static const char *const code_names[] = {
	"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
	"ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
	"ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
	"UNAUTHENTICATED",
};

static const char *code_name(grpc_status_code code)
{
	if ((unsigned)code < ARRAY_SIZE(code_names))
		return code_names[code];
	return "UNKNOWN_STATUS";
}

/* ---- command line ---- */

struct global {
	const char *address;
	double timeout; /* seconds, 0 = none */
};

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: kbridge [OPTION]... COMMAND [ARG]...\n"
		"Publish records to Apache Kafka and tail them, through kbridged.\n"
		"\n"
		"Commands:\n"
		"  publish -t TOPIC [-k KEY] [-H KEY=VALUE]... [-p PARTITION] [-z | --binary]\n"
		"          [--batch N] [--acks] [FILE]\n"
		"      publish each line of FILE (default: standard input) as one record, in one\n"
		"      stream; print how many records were written and where, once all are durable\n"
		"      (with --acks: where each record was written, one line per record)\n"
		"  tail -t TOPIC [-t TOPIC]... [--from WHERE]... [-g GROUP] [-f FORMAT] [-e] [-n COUNT]\n"
		"       [--max-batch N] [-v]\n"
		"      print the value of each record of the topics, one per line, as it arrives\n"
		"  bench [OPTION]...\n"
		"      publish generated load and report throughput and latency\n"
		"      (see 'kbridge bench --help')\n"
		"\n"
		"Options (before or after the command):\n"
		"  -a, --address ADDR   kbridged address, HOST:PORT or unix:PATH\n"
		"                       (default: $" ADDRESS_ENV ", else " DEFAULT_ADDRESS ")\n"
		"      --timeout SECS   end the call with DEADLINE_EXCEEDED after SECS seconds\n"
		"  -h, --help           print this help and exit\n"
		"  -V, --version        print the version and exit\n"
		"\n"
		"publish:\n"
		"  -t, --topic TOPIC    topic to publish to\n"
		"  -k, --key KEY        key of every record (default: none)\n"
		"  -H, --header KEY=VALUE\n"
		"                       add this Kafka header to every record; repeat for more\n"
		"  -p, --partition P    write every record to partition P (default: chosen by\n"
		"                       Kafka's partitioner from the key)\n"
		"  -z, --null           input records end with a NUL byte instead of a newline\n"
		"      --binary         input records are length-prefixed: a 4-byte big-endian\n"
		"                       length, then that many bytes, repeated\n"
		"      --batch N        records per request message, 1..%d (default %d; a\n"
		"                       request also ends at about 256 KiB)\n"
		"      --acks           use PublishStream and print, for each record in input\n"
		"                       order, TOPIC/PARTITION@OFFSET or TOPIC: error CODE: MESSAGE;\n"
		"                       exit 1 if any record failed\n"
		"  When standard error is a terminal, a progress line shows there while publishing.\n"
		"tail:\n"
		"  -t, --topic TOPIC    topic to read; repeat it for several\n"
		"      --from WHERE     where to start (default: latest): earliest, latest,\n"
		"                       @TIMESTAMP_MS (the first record at or after that time),\n"
		"                       or next offsets as PARTITION:OFFSET,... (of the first -t\n"
		"                       topic) or TOPIC:PARTITION:OFFSET,...; partitions not\n"
		"                       listed start as the start word says. Repeatable.\n"
		"  -g, --group GROUP    join consumer group GROUP: its members share the partitions\n"
		"  -f, --format FORMAT  print each record as FORMAT: %%t topic, %%p partition,\n"
		"                       %%o offset, %%k key, %%s value, %%h headers (K=V,...),\n"
		"                       %%T timestamp (ms), %%%% a %%, \\n newline, \\t tab, \\\\ backslash\n"
		"  -e, --exit           exit (status 0) once no record has come for 1 second: the\n"
		"                       end of the data there is now, as far as a client can tell\n"
		"  -n, --count COUNT    exit after COUNT records\n"
		"      --max-batch N    most records per response message (default: the server's)\n"
		"  -v, --verbose        print TOPIC/PARTITION@OFFSET key=KEY ts=MS VALUE, and at the\n"
		"                       end 'kbridge: tail: kbridge-positions: T:P:O,...' on stderr,\n"
		"                       a --from value to resume from\n"
		"\n"
		"Exit status: 0 success, 1 the call failed, 2 usage error, 130 interrupted.\n",
		MAX_BATCH_RECORDS, DEFAULT_BATCH_RECORDS);
}

static void __attribute__((format(printf, 1, 2), noreturn)) usage_error(const char *fmt, ...)
{
	va_list ap;

	fputs("kbridge: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputs("\nTry 'kbridge --help' for more information.\n", stderr);
	exit(EXIT_USAGE);
}

/* getopt already said what was wrong. */
static void __attribute__((noreturn)) usage_hint(void)
{
	fputs("Try 'kbridge --help' for more information.\n", stderr);
	exit(EXIT_USAGE);
}

static uint64_t parse_count(const char *opt, const char *arg, uint64_t min, uint64_t max)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(arg, &end, 10);
	if (arg[0] >= '0' && arg[0] <= '9' && !*end && !errno && v >= min && v <= max)
		return v;
	if (max == UINT64_MAX)
		usage_error("%s: '%s' is not a whole number of at least %" PRIu64, opt, arg, min);
	usage_error("%s: '%s' is not a whole number from %" PRIu64 " to %" PRIu64, opt, arg, min, max);
}

static double parse_seconds(const char *arg)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(arg, &end);
	if (end == arg || *end || errno || !(v > 0) || v > 31536000)
		usage_error("--timeout: '%s' is not a number of seconds above 0", arg);
	return v;
}

/* Options every command accepts, so that they may come before or after it. */
enum { OPT_TIMEOUT = 256, OPT_BATCH, OPT_FROM, OPT_MAX_BATCH, OPT_BINARY, OPT_ACKS };
#define GLOBAL_LONG_OPTIONS                                                                  \
	{"address", required_argument, NULL, 'a'}, {"timeout", required_argument, NULL, OPT_TIMEOUT}, \
	{"help", no_argument, NULL, 'h'}, {"version", no_argument, NULL, 'V'}

/* Handles a global option; false when c is not one. */
static bool global_option(struct global *g, int c, const char *arg)
{
	switch (c) {
	case 'a':
		if (!*arg)
			usage_error("--address: empty address");
		g->address = arg;
		return true;
	case OPT_TIMEOUT:
		g->timeout = parse_seconds(arg);
		return true;
	case 'h':
		usage(stdout);
		exit(0);
	case 'V':
		printf("kbridge %s\n", PACKAGE_VERSION);
		exit(0);
	case '?':
		usage_hint();
	}
	return false;
}

/* ---- signals ---- */

static void on_sigint(int sig)
{
	(void)sig;
	interrupted = 1;
}

static void signals_init(void)
{
	struct sigaction sa = {.sa_handler = on_sigint};

	sigemptyset(&sa.sa_mask);
	/* A second ^C kills at once, should the clean path ever hang. */
	sa.sa_flags = SA_RESETHAND;
	sigaction(SIGINT, &sa, NULL);
}

/* ---- channel, completion queue, status ---- */

struct client {
	grpc_completion_queue *cq;
	grpc_channel *channel;
	gpr_timespec deadline;
};

static void client_open(struct client *c, const struct global *g)
{
	grpc_arg args[] = {
		/* Trust our own server's response sizes; it bounds them itself. */
		{.type = GRPC_ARG_INTEGER, .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, .value.integer = -1},
		{.type = GRPC_ARG_STRING, .key = GRPC_ARG_PRIMARY_USER_AGENT_STRING,
		 .value.string = "kbridge/" PACKAGE_VERSION},
	};
	grpc_channel_args cargs = {ARRAY_SIZE(args), args};
	grpc_channel_credentials *creds;

	grpc_init();
	c->cq = grpc_completion_queue_create_for_next(NULL);
	creds = grpc_insecure_credentials_create();
	c->channel = grpc_channel_create(g->address, creds, &cargs);
	grpc_channel_credentials_release(creds);
	if (g->timeout > 0)
		c->deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
					   gpr_time_from_micros((int64_t)(g->timeout * 1e6), GPR_TIMESPAN));
	else
		c->deadline = gpr_inf_future(GPR_CLOCK_MONOTONIC);
}

/* Call only once every call is unreferenced. */
static void client_close(struct client *c)
{
	grpc_channel_destroy(c->channel);
	grpc_completion_queue_shutdown(c->cq);
	while (grpc_completion_queue_next(c->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
	       GRPC_QUEUE_SHUTDOWN)
		;
	grpc_completion_queue_destroy(c->cq);
	grpc_shutdown();
}

static grpc_call *client_call(struct client *c, const char *method)
{
	return grpc_channel_create_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS, c->cq,
					grpc_slice_from_static_string(method), NULL, c->deadline, NULL);
}

/* The next completion, or GRPC_QUEUE_TIMEOUT after POLL_MS so that the caller can look
 * at `interrupted` (a signal does not wake the queue). */
static grpc_event client_next(struct client *c)
{
	gpr_timespec t = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
				      gpr_time_from_millis(POLL_MS, GPR_TIMESPAN));
	grpc_event ev = grpc_completion_queue_next(c->cq, t, NULL);

	if (ev.type == GRPC_QUEUE_SHUTDOWN) {
		fputs("kbridge: completion queue shut down unexpectedly\n", stderr);
		abort();
	}
	return ev;
}

/* Starting a batch can only fail through a bug of ours (two sends at once, ...). */
static void start_batch(grpc_call *call, const grpc_op *ops, size_t n, enum tag tag)
{
	grpc_call_error err = grpc_call_start_batch(call, ops, n, TAG(tag), NULL);

	if (err != GRPC_CALL_OK) {
		fprintf(stderr, "kbridge: bug: grpc_call_start_batch failed (%d) for tag %d\n", err, tag);
		abort();
	}
}

/* "CODE: details", as the command's error line says it. */
static void status_print(const char *what, const struct status *st)
{
	fprintf(stderr, "kbridge: %s failed: %s: %.*s", what, code_name(st->code),
		(int)GRPC_SLICE_LENGTH(st->details), (const char *)GRPC_SLICE_START_PTR(st->details));
}

/* The value of trailing metadata `key` as a number; false when absent or not a number. */
static bool status_trailer_u64(const struct status *st, const char *key, uint64_t *out)
{
	for (size_t i = 0; i < st->trailing.count; i++) {
		const grpc_metadata *md = &st->trailing.metadata[i];
		char buf[24], *end;
		size_t len = GRPC_SLICE_LENGTH(md->value);

		if (grpc_slice_str_cmp(md->key, key) != 0)
			continue;
		if (len == 0 || len >= sizeof(buf))
			return false;
		memcpy(buf, GRPC_SLICE_START_PTR(md->value), len);
		buf[len] = 0;
		errno = 0;
		*out = strtoull(buf, &end, 10);
		return buf[0] >= '0' && buf[0] <= '9' && !*end && !errno;
	}
	return false;
}

/* ---- input: records from a file descriptor ---- */

enum input_format {
	INPUT_LINES,  /* each record ends with a newline */
	INPUT_NUL,    /* each record ends with a NUL byte (-z) */
	INPUT_BINARY, /* 4-byte big-endian length, then the record (--binary) */
};

struct input {
	const char *name; /* for messages */
	int fd;
	enum input_format format;
	char *buf;
	size_t cap, start, end; /* unread bytes are buf[start..end) */
	bool eof;
	uint64_t records; /* records returned so far */
};

enum input_result { INPUT_OK, INPUT_MORE, INPUT_END, INPUT_TOO_LONG, INPUT_TRUNCATED };

static void input_init(struct input *in, const char *name, int fd, enum input_format format)
{
	in->name = name;
	in->fd = fd;
	in->format = format;
	in->cap = 256 * 1024;
	in->buf = xmalloc(in->cap);
	in->start = in->end = 0;
	in->eof = false;
	in->records = 0;
}

static void input_destroy(struct input *in)
{
	if (in->fd > STDIN_FILENO)
		close(in->fd);
	free(in->buf);
}

/* A record that ends with `delim`; a last one without it counts. */
static enum input_result input_delimited(struct input *in, char delim, const char **rec, size_t *len)
{
	char *p = in->buf + in->start;
	size_t avail = in->end - in->start;
	char *d = memchr(p, delim, avail);

	if (!d && !in->eof)
		return avail >= MAX_RECORD_BYTES ? INPUT_TOO_LONG : INPUT_MORE;
	if (!d && avail == 0)
		return INPUT_END;
	if (!d && avail > MAX_RECORD_BYTES)
		return INPUT_TOO_LONG;
	*rec = p;
	*len = d ? (size_t)(d - p) : avail;
	in->start += d ? *len + 1 : avail;
	return INPUT_OK;
}

/* A length-prefixed record; the input must not end inside one. */
static enum input_result input_prefixed(struct input *in, const char **rec, size_t *len)
{
	const unsigned char *p = (const unsigned char *)in->buf + in->start;
	size_t avail = in->end - in->start;
	uint32_t n;

	if (avail < 4) {
		if (!in->eof)
			return INPUT_MORE;
		return avail == 0 ? INPUT_END : INPUT_TRUNCATED;
	}
	n = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
	if (n > MAX_RECORD_BYTES)
		return INPUT_TOO_LONG;
	if (avail - 4 < n)
		return in->eof ? INPUT_TRUNCATED : INPUT_MORE;
	*rec = (const char *)p + 4;
	*len = n;
	in->start += 4 + (size_t)n;
	return INPUT_OK;
}

/* The next record, valid until the next input_* call. INPUT_MORE: call input_read first. */
static enum input_result input_next(struct input *in, const char **rec, size_t *len)
{
	enum input_result r;

	if (in->format == INPUT_BINARY)
		r = input_prefixed(in, rec, len);
	else
		r = input_delimited(in, in->format == INPUT_NUL ? '\0' : '\n', rec, len);
	if (r == INPUT_OK)
		in->records++;
	return r;
}

/* "line" or "record", for messages about the input. */
static const char *input_unit(const struct input *in)
{
	return in->format == INPUT_LINES ? "line" : "record";
}

/* True when a read would not block, waiting up to timeout_ms. */
static bool input_ready(struct input *in, int timeout_ms)
{
	struct pollfd pfd = {.fd = in->fd, .events = POLLIN};

	return poll(&pfd, 1, timeout_ms) > 0;
}

/* Reads more; 0 or -errno. */
static int input_read(struct input *in)
{
	ssize_t n;

	if (in->start > 0) {
		memmove(in->buf, in->buf + in->start, in->end - in->start);
		in->end -= in->start;
		in->start = 0;
	}
	if (in->end == in->cap) {
		in->cap *= 2;
		in->buf = xrealloc(in->buf, in->cap);
	}
	do
		n = read(in->fd, in->buf + in->end, in->cap - in->end);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	if (n == 0)
		in->eof = true;
	in->end += n;
	return 0;
}

/* ---- publish ---- */

/* What the command line asks of `publish`. */
struct publish_opts {
	const char *topic;
	const char *key;                /* NULL: records without a key */
	Kbridge__V1__Header **headers;  /* -H, on every record, in order */
	size_t n_headers;
	int32_t partition;              /* -1: Kafka's partitioner chooses */
	enum input_format format;
	size_t batch_records;
	bool acks;                      /* PublishStream, one output line per record */
	const char *file;               /* NULL or "-": standard input */
};

/* One PublishRequest being filled: the records are copied back to back into `data`. */
struct batch {
	Kbridge__V1__Record *recs;
	Kbridge__V1__Record **ptrs;
	size_t *offs;
	size_t n, cap;
	char *data;
	size_t used, data_cap;
	size_t bytes; /* estimate of the encoded size */
};

struct publish {
	/* set before the reader starts, constant afterwards */
	grpc_call *call;
	const struct publish_opts *o;
	ProtobufCBinaryData key;
	size_t record_overhead; /* encoded bytes of a record besides its value, about */
	struct input in;

	pthread_mutex_t lock;
	pthread_cond_t room;                      /* signalled when the queue shrinks or stop is set */
	grpc_byte_buffer *queue[SEND_QUEUE_MAX];  /* locked: encoded requests to send, in order */
	size_t q_head, q_count;                   /* locked */
	grpc_byte_buffer *sending;                /* locked: the outstanding SEND_MESSAGE's message */
	int batches;                              /* locked: batches outstanding */
	bool input_done;                          /* locked: the reader queued its last request */
	bool closed;                              /* locked: SEND_CLOSE_FROM_CLIENT started */
	bool stop;                                /* locked: the call is over; the reader gives up */
	int read_error;                           /* locked: errno of a failed read, or 0 */
	enum input_result input_end;              /* locked: INPUT_TOO_LONG/TRUNCATED if the input was bad */
	uint32_t *req_records;                    /* locked: records of each request sent, by index */
	size_t n_reqs, cap_reqs;                  /* locked */
	uint64_t records_sent;                    /* locked */

	/* main thread's */
	bool cancelled;
	grpc_metadata_array initial_md;
	grpc_byte_buffer *response; /* plain: the PublishResponse; --acks: the next PublishAck */
	struct status st;

	/* main thread's, --acks: acks wait here until every earlier request's is printed */
	Kbridge__V1__PublishAck **acks; /* by sequence; NULL once printed or not yet in */
	size_t acks_cap;
	size_t next_print;              /* sequence of the next request to print */
	uint64_t records_acked, records_failed;
	bool bad_response;
	int output_error;               /* errno of a failed write to stdout */

	/* main thread's: the progress line on a terminal */
	bool progress, progress_shown;
	bool stdout_tty; /* the ack lines share the terminal with the progress line */
	int64_t started_ms, progress_ms;
};

static void batch_destroy(struct batch *b)
{
	free(b->recs);
	free(b->ptrs);
	free(b->offs);
	free(b->data);
}

/* Every record differs only in its value: set the rest once. */
static void batch_init_records(struct publish *p, struct batch *b, size_t from)
{
	for (size_t i = from; i < b->cap; i++) {
		Kbridge__V1__Record *r = &b->recs[i];

		*r = (Kbridge__V1__Record)KBRIDGE__V1__RECORD__INIT;
		r->topic = (char *)p->o->topic;
		r->key = p->key;
		r->n_headers = p->o->n_headers;
		r->headers = p->o->headers;
		if (p->o->partition >= 0) {
			r->placement_case = KBRIDGE__V1__RECORD__PLACEMENT_PARTITION;
			r->partition = p->o->partition;
		}
	}
}

static void batch_add(struct publish *p, struct batch *b, const char *value, size_t len)
{
	if (b->n == b->cap) {
		size_t old = b->cap;
		b->cap = b->cap ? 2 * b->cap : 128;
		b->recs = xrealloc(b->recs, b->cap * sizeof(*b->recs));
		b->ptrs = xrealloc(b->ptrs, b->cap * sizeof(*b->ptrs));
		b->offs = xrealloc(b->offs, b->cap * sizeof(*b->offs));
		batch_init_records(p, b, old);
	}
	if (b->data_cap - b->used < len) {
		while (b->data_cap - b->used < len)
			b->data_cap = b->data_cap ? 2 * b->data_cap : 64 * 1024;
		b->data = xrealloc(b->data, b->data_cap);
	}
	memcpy(b->data + b->used, value, len);
	b->offs[b->n] = b->used;
	b->recs[b->n].value.len = len;
	b->used += len;
	b->n++;
	b->bytes += len + p->record_overhead;
}

static grpc_byte_buffer *batch_encode(struct batch *b)
{
	Kbridge__V1__PublishRequest req = KBRIDGE__V1__PUBLISH_REQUEST__INIT;
	grpc_byte_buffer *bb;

	for (size_t i = 0; i < b->n; i++) {
		b->recs[i].value.data = (uint8_t *)b->data + b->offs[i];
		b->ptrs[i] = &b->recs[i];
	}
	req.n_records = b->n;
	req.records = b->ptrs;
	bb = codec_encode(&req.base);
	b->n = b->used = b->bytes = 0;
	return bb;
}

/* Locked. Sends the next queued request; the last one carries the half-close. The hint
 * lets gRPC hold a message back only when the next one is already queued behind it:
 * that one goes out unhinted (or hinted, with another behind it) as soon as this send
 * completes, so nothing is held for good. */
static void publish_send_next(struct publish *p)
{
	grpc_op ops[2] = {{.op = GRPC_OP_SEND_MESSAGE}};
	size_t n = 1;

	p->sending = p->queue[p->q_head];
	p->q_head = (p->q_head + 1) % SEND_QUEUE_MAX;
	p->q_count--;
	ops[0].data.send_message.send_message = p->sending;
	if (p->q_count > 0)
		ops[0].flags = GRPC_WRITE_BUFFER_HINT;
	else if (p->input_done) {
		ops[1].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
		n = 2;
		p->closed = true;
	}
	p->batches++;
	start_batch(p->call, ops, n, TAG_SEND);
}

/* Locked. Half-closes once the last request is on its way. */
static void publish_maybe_close(struct publish *p)
{
	grpc_op op = {.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT};

	if (!p->input_done || p->closed || p->stop || p->sending || p->q_count > 0)
		return;
	p->closed = true;
	p->batches++;
	start_batch(p->call, &op, 1, TAG_CLOSE);
}

/* Reader: queues one request, waiting while the queue is full. False once the call is over. */
static bool publish_submit(struct publish *p, struct batch *b)
{
	uint32_t n = (uint32_t)b->n; /* at most MAX_BATCH_RECORDS */
	grpc_byte_buffer *bb = batch_encode(b);

	pthread_mutex_lock(&p->lock);
	while (p->q_count == SEND_QUEUE_MAX && !p->stop)
		pthread_cond_wait(&p->room, &p->lock);
	if (p->stop) {
		pthread_mutex_unlock(&p->lock);
		grpc_byte_buffer_destroy(bb);
		return false;
	}
	/* Recorded before the send can start, so that its ack always finds it. */
	if (p->n_reqs == p->cap_reqs) {
		p->cap_reqs = p->cap_reqs ? 2 * p->cap_reqs : 1024;
		p->req_records = xrealloc(p->req_records, p->cap_reqs * sizeof(*p->req_records));
	}
	p->req_records[p->n_reqs++] = n;
	p->records_sent += n;
	p->queue[(p->q_head + p->q_count) % SEND_QUEUE_MAX] = bb;
	p->q_count++;
	if (!p->sending)
		publish_send_next(p);
	pthread_mutex_unlock(&p->lock);
	return true;
}

static bool publish_stopped(struct publish *p)
{
	pthread_mutex_lock(&p->lock);
	bool stop = p->stop;
	pthread_mutex_unlock(&p->lock);
	return stop;
}

/* Reader: the input ended, failed or the call is over. On failure a plain publish is
 * cancelled: half-closing would make a part of the input look like all of it. With
 * --acks every record sent gets its own line, so half-closing says exactly what was
 * published, and the error message says where the input went wrong. */
static void publish_reader_end(struct publish *p, int error, enum input_result end)
{
	pthread_mutex_lock(&p->lock);
	p->input_done = true;
	p->read_error = error;
	p->input_end = end;
	if ((error || end != INPUT_END) && !p->o->acks)
		grpc_call_cancel(p->call, NULL);
	else
		publish_maybe_close(p);
	pthread_mutex_unlock(&p->lock);
}

/* Reader: waits for input. A request is sent as soon as the input pauses, so that a slow
 * writer (`tail -f log | kbridge publish`) does not leave lines waiting for a full batch. */
static bool publish_wait_input(struct publish *p, struct batch *b)
{
	if (input_ready(&p->in, 0))
		return true;
	if (b->n > 0 && !publish_submit(p, b))
		return false;
	while (!input_ready(&p->in, POLL_MS))
		if (publish_stopped(p))
			return false;
	return true;
}

static void *publish_reader(void *arg)
{
	struct publish *p = arg;
	struct batch b = {0};
	const char *rec;
	size_t len;
	int err = 0;
	enum input_result r;
	sigset_t set;

	/* ^C is the main thread's business. */
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	pthread_sigmask(SIG_BLOCK, &set, NULL);

	for (;;) {
		r = input_next(&p->in, &rec, &len);
		if (r == INPUT_OK) {
			batch_add(p, &b, rec, len);
			if ((b.n >= p->o->batch_records || b.bytes >= BATCH_BYTES) && !publish_submit(p, &b))
				goto out;
		} else if (r == INPUT_MORE) {
			if (!publish_wait_input(p, &b))
				goto out;
			err = -input_read(&p->in);
			if (err)
				break;
		} else {
			/* The end, or bad input: what was read before it still goes out (--acks
			 * publishes it; a plain publish is cancelled anyway). */
			if (b.n > 0 && !publish_submit(p, &b))
				goto out;
			break;
		}
	}
	publish_reader_end(p, err, err ? INPUT_END : r);
out:
	batch_destroy(&b);
	return NULL;
}

/* ---- publish: the progress line ---- */

static void progress_erase(struct publish *p)
{
	if (p->progress_shown) {
		fputs("\r\033[K", stderr);
		p->progress_shown = false;
	}
}

/* Main thread: redraws the line when PROGRESS_MS have passed since the last time. */
static void progress_update(struct publish *p)
{
	int64_t now = now_ms();
	uint64_t sent;
	double secs;

	if (!p->progress || now - p->progress_ms < PROGRESS_MS)
		return;
	p->progress_ms = now;
	pthread_mutex_lock(&p->lock);
	sent = p->records_sent;
	pthread_mutex_unlock(&p->lock);
	secs = (double)(now - p->started_ms) / 1000;
	if (p->o->acks)
		fprintf(stderr, "\r\033[Kkbridge: %.0f records/s, %" PRIu64 " acked, %" PRIu64 " in flight",
			(double)p->records_acked / secs, p->records_acked, sent - p->records_acked);
	else
		fprintf(stderr, "\r\033[Kkbridge: %.0f records/s, %" PRIu64 " sent", (double)sent / secs, sent);
	p->progress_shown = true;
}

/* ---- publish: acks (--acks) ---- */

static void publish_cancel(struct publish *p)
{
	if (!p->cancelled) {
		p->cancelled = true;
		grpc_call_cancel(p->call, NULL);
	}
}

/* Main thread: asks for the next ack. */
static void publish_recv_next(struct publish *p)
{
	grpc_op op = {.op = GRPC_OP_RECV_MESSAGE, .data.recv_message.recv_message = &p->response};

	pthread_mutex_lock(&p->lock);
	p->batches++;
	start_batch(p->call, &op, 1, TAG_RECV);
	pthread_mutex_unlock(&p->lock);
}

/* A server's message as the rest of one output line: control characters become spaces. */
static void print_message_line(const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++)
		putchar((unsigned char)s[i] < ' ' ? ' ' : s[i]);
	putchar('\n');
}

static void publish_print_result(struct publish *p, const Kbridge__V1__RecordResult *r)
{
	const char *topic = p->o->topic;

	if (r->code != GRPC_STATUS_OK) {
		printf("%s: error %s: ", topic, code_name((grpc_status_code)r->code));
		print_message_line(r->error, strlen(r->error));
		p->records_failed++;
	} else if (r->spooled) {
		printf("%s: spooled\n", topic);
	} else {
		printf("%s/%" PRId32 "@%" PRId64 "\n", topic, r->partition, r->offset);
	}
}

/* Prints the acks that are next in input order, as far as they are in. */
static void publish_print_ready(struct publish *p)
{
	bool printed = false;

	while (p->next_print < p->acks_cap && p->acks[p->next_print]) {
		Kbridge__V1__PublishAck *ack = p->acks[p->next_print];

		if (!printed && p->stdout_tty)
			progress_erase(p);
		for (size_t i = 0; i < ack->n_results; i++)
			publish_print_result(p, ack->results[i]);
		protobuf_c_message_free_unpacked(&ack->base, NULL);
		p->acks[p->next_print++] = NULL;
		printed = true;
	}
	/* Someone may be watching the output live. */
	if (printed && fflush(stdout) != 0 && !p->output_error) {
		p->output_error = errno;
		publish_cancel(p);
	}
}

/* Keeps ack until it can be printed; false if it answers no request of ours, answers one
 * twice, or has not one result per record. */
static bool publish_ack_store(struct publish *p, Kbridge__V1__PublishAck *ack)
{
	uint64_t seq = ack->sequence;
	bool fits;

	pthread_mutex_lock(&p->lock);
	fits = seq < p->n_reqs && ack->n_results == p->req_records[seq];
	pthread_mutex_unlock(&p->lock);
	if (!fits || seq < p->next_print)
		return false;
	if (seq >= p->acks_cap) {
		size_t old = p->acks_cap;
		p->acks_cap = old ? 2 * old : 1024;
		if (p->acks_cap <= seq)
			p->acks_cap = seq + 1;
		p->acks = xrealloc(p->acks, p->acks_cap * sizeof(*p->acks));
		memset(p->acks + old, 0, (p->acks_cap - old) * sizeof(*p->acks));
	}
	if (p->acks[seq])
		return false;
	p->acks[seq] = ack;
	p->records_acked += ack->n_results;
	return true;
}

/* Main thread: the RECV_MESSAGE for an ack completed. */
static void publish_on_ack(struct publish *p, bool ok)
{
	grpc_byte_buffer *msg = p->response;
	Kbridge__V1__PublishAck *ack;

	p->response = NULL;
	if (!ok || !msg) {
		/* The stream ended; the status says how. */
		grpc_byte_buffer_destroy(msg);
		return;
	}
	ack = (Kbridge__V1__PublishAck *)codec_decode(&kbridge__v1__publish_ack__descriptor, msg);
	grpc_byte_buffer_destroy(msg);
	if (!ack || !publish_ack_store(p, ack)) {
		if (ack)
			protobuf_c_message_free_unpacked(&ack->base, NULL);
		p->bad_response = true;
		publish_cancel(p);
		return;
	}
	publish_print_ready(p);
	if (!p->cancelled)
		publish_recv_next(p);
}

/* After the call: every request sent gets its lines, acked or not, in input order. A
 * request without an ack failed as far as we know: the call's status says why. */
static void publish_print_rest(struct publish *p)
{
	grpc_status_code code = p->st.code != GRPC_STATUS_OK ? p->st.code : GRPC_STATUS_UNKNOWN;
	const char *details = (const char *)GRPC_SLICE_START_PTR(p->st.details);
	size_t details_len = GRPC_SLICE_LENGTH(p->st.details);

	if (p->st.code == GRPC_STATUS_OK) {
		details = "the stream ended without it";
		details_len = strlen(details);
	}
	progress_erase(p);
	for (; p->next_print < p->n_reqs; p->next_print++) {
		Kbridge__V1__PublishAck *ack = p->next_print < p->acks_cap ? p->acks[p->next_print] : NULL;

		if (ack) {
			for (size_t i = 0; i < ack->n_results; i++)
				publish_print_result(p, ack->results[i]);
			protobuf_c_message_free_unpacked(&ack->base, NULL);
			p->acks[p->next_print] = NULL;
			continue;
		}
		for (uint32_t i = 0; i < p->req_records[p->next_print]; i++) {
			printf("%s: error %s: not acknowledged: ", p->o->topic, code_name(code));
			print_message_line(details, details_len);
			p->records_failed++;
		}
	}
}

/* ---- publish: the call ---- */

/* Says on stderr why the input stopped early; false when it did not. */
static bool publish_input_failed(struct publish *p)
{
	if (p->read_error)
		fprintf(stderr, "kbridge: %s: %s\n", p->in.name, strerror(p->read_error));
	else if (p->input_end == INPUT_TOO_LONG)
		fprintf(stderr, "kbridge: %s: %s %" PRIu64 " is longer than %u bytes\n", p->in.name,
			input_unit(&p->in), p->in.records + 1, MAX_RECORD_BYTES);
	else if (p->input_end == INPUT_TRUNCATED)
		fprintf(stderr, "kbridge: %s: record %" PRIu64 " is cut short: the input ends inside it\n",
			p->in.name, p->in.records + 1);
	else
		return false;
	return true;
}

/* Main thread: a batch completed. */
static void publish_event(struct publish *p, enum tag tag, bool ok)
{
	if (tag == TAG_RECV)
		publish_on_ack(p, ok);
	pthread_mutex_lock(&p->lock);
	p->batches--;
	switch (tag) {
	case TAG_SEND:
		grpc_byte_buffer_destroy(p->sending);
		p->sending = NULL;
		if (!ok) {
			/* The call is over; its status (still to come) says why. */
			p->stop = true;
		} else if (!p->stop) {
			if (p->q_count > 0)
				publish_send_next(p);
			else
				publish_maybe_close(p);
		}
		pthread_cond_signal(&p->room);
		break;
	case TAG_STATUS:
		p->stop = true;
		while (p->q_count > 0) {
			grpc_byte_buffer_destroy(p->queue[p->q_head]);
			p->q_head = (p->q_head + 1) % SEND_QUEUE_MAX;
			p->q_count--;
		}
		pthread_cond_signal(&p->room);
		break;
	default: /* TAG_SEND_MD, TAG_CLOSE, TAG_RECV_MD: their outcome shows in the status */
		break;
	}
	pthread_mutex_unlock(&p->lock);
}

static int range_cmp(const void *a, const void *b)
{
	const Kbridge__V1__PartitionRange *x = *(Kbridge__V1__PartitionRange *const *)a;
	const Kbridge__V1__PartitionRange *y = *(Kbridge__V1__PartitionRange *const *)b;
	int c = strcmp(x->topic, y->topic);

	return c ? c : (x->partition > y->partition) - (x->partition < y->partition);
}

static int publish_print_summary(struct publish *p)
{
	Kbridge__V1__PublishResponse *resp = (Kbridge__V1__PublishResponse *)codec_decode(
		&kbridge__v1__publish_response__descriptor, p->response);

	if (!resp) {
		fputs("kbridge: publish: the server's response does not decode as a PublishResponse\n",
		      stderr);
		return EXIT_RPC;
	}
	qsort(resp->ranges, resp->n_ranges, sizeof(*resp->ranges), range_cmp);
	printf("published %" PRIu64 " records", resp->records);
	if (resp->spooled)
		printf(" (%" PRIu64 " in the local spool only)", resp->spooled);
	putchar('\n');
	for (size_t i = 0; i < resp->n_ranges; i++) {
		const Kbridge__V1__PartitionRange *r = resp->ranges[i];
		printf("%s/%" PRId32 ": offsets %" PRId64 "..%" PRId64 " (%" PRIu64 " records)\n",
		       r->topic, r->partition, r->first_offset, r->last_offset, r->count);
	}
	int rc = 0;
	if (resp->records != p->records_sent) {
		fprintf(stderr, "kbridge: publish: %" PRIu64 " records sent but the server reports %" PRIu64 "\n",
			p->records_sent, resp->records);
		rc = EXIT_RPC;
	}
	protobuf_c_message_free_unpacked(&resp->base, NULL);
	return rc;
}

static int publish_report_failure(struct publish *p)
{
	uint64_t durable;

	if (publish_input_failed(p))
		return EXIT_RPC;
	if (p->cancelled && interrupted) {
		fputs("kbridge: publish interrupted; records already sent may be in Kafka\n", stderr);
		return EXIT_INTERRUPTED;
	}
	status_print("publish", &p->st);
	if (status_trailer_u64(&p->st, DURABLE_KEY, &durable)) {
		fprintf(stderr, " (%" PRIu64 " leading requests durable)\n", durable);
		/* Say it in lines too: `tail -n +LINES+1 FILE` resends the rest. */
		uint64_t lines = 0;
		for (size_t i = 0; i < durable && i < p->n_reqs; i++)
			lines += p->req_records[i];
		if (lines > 0)
			fprintf(stderr, "kbridge: the first %" PRIu64 " input %ss are durable\n", lines,
				input_unit(&p->in));
	} else {
		fputc('\n', stderr);
	}
	return EXIT_RPC;
}

/* --acks: the lines of the records not printed yet, then what went wrong, if anything. */
static int publish_acks_result(struct publish *p)
{
	int rc = 0;

	publish_print_rest(p);
	if (fflush(stdout) != 0 && !p->output_error)
		p->output_error = errno;
	if (p->output_error) {
		fprintf(stderr, "kbridge: standard output: %s\n", strerror(p->output_error));
		rc = EXIT_RPC;
	}
	if (publish_input_failed(p))
		rc = EXIT_RPC;
	if (p->bad_response) {
		fputs("kbridge: publish: the server sent an ack that does not decode or fits no request\n",
		      stderr);
		rc = EXIT_RPC;
	} else if (p->cancelled && interrupted) {
		fputs("kbridge: publish interrupted; records not acknowledged may be in Kafka\n", stderr);
		rc = EXIT_INTERRUPTED;
	} else if (p->st.code != GRPC_STATUS_OK && !p->cancelled) {
		status_print("publish", &p->st);
		fputc('\n', stderr);
		rc = EXIT_RPC;
	}
	if (p->records_failed > 0) {
		fprintf(stderr, "kbridge: %" PRIu64 " records failed\n", p->records_failed);
		if (rc == 0)
			rc = EXIT_RPC;
	}
	return rc;
}

/* Starts the call: initial metadata on its own (never hinted), and the receiving side:
 * the status with the one response (plain), or the status and the first ack (--acks). */
static void publish_start(struct publish *p)
{
	grpc_op md = {.op = GRPC_OP_SEND_INITIAL_METADATA};
	grpc_op recv[3] = {
		{.op = GRPC_OP_RECV_INITIAL_METADATA,
		 .data.recv_initial_metadata.recv_initial_metadata = &p->initial_md},
		{.op = GRPC_OP_RECV_MESSAGE, .data.recv_message.recv_message = &p->response},
		status_op(&p->st),
	};

	p->batches = 2;
	start_batch(p->call, &md, 1, TAG_SEND_MD);
	if (!p->o->acks) {
		start_batch(p->call, recv, ARRAY_SIZE(recv), TAG_STATUS);
		return;
	}
	p->batches = 3;
	start_batch(p->call, &recv[0], 1, TAG_RECV_MD);
	start_batch(p->call, &recv[2], 1, TAG_STATUS);
	publish_recv_next(p);
}

/* Main thread: runs the call until no batch is outstanding. */
static void publish_run(struct client *c, struct publish *p)
{
	for (;;) {
		pthread_mutex_lock(&p->lock);
		bool done = p->batches == 0;
		pthread_mutex_unlock(&p->lock);
		if (done)
			break;
		grpc_event ev = client_next(c);
		if (interrupted)
			publish_cancel(p);
		if (ev.type == GRPC_OP_COMPLETE)
			publish_event(p, (enum tag)(intptr_t)ev.tag, ev.success);
		progress_update(p);
	}
	progress_erase(p);
}

/* Opens the input; -1 after saying why. */
static int publish_open_input(const char *file)
{
	struct stat sb;
	int fd;

	if (!file || strcmp(file, "-") == 0)
		return STDIN_FILENO;
	fd = open(file, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || (fstat(fd, &sb) == 0 && S_ISDIR(sb.st_mode))) {
		fprintf(stderr, "kbridge: %s: %s\n", file, fd < 0 ? strerror(errno) : strerror(EISDIR));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

static int cmd_publish(struct global *g, const struct publish_opts *o)
{
	struct client c;
	struct publish p = {.o = o, .input_end = INPUT_END};
	pthread_t reader;
	int fd = publish_open_input(o->file), rc;

	if (fd < 0)
		return EXIT_RPC;
	input_init(&p.in, fd == STDIN_FILENO ? "standard input" : o->file, fd, o->format);
	if (o->key) {
		p.key.data = (uint8_t *)o->key;
		p.key.len = strlen(o->key);
	}
	/* topic, key, headers, partition, and the tags and lengths around them */
	p.record_overhead = strlen(o->topic) + p.key.len + 16;
	for (size_t i = 0; i < o->n_headers; i++)
		p.record_overhead += strlen(o->headers[i]->key) + o->headers[i]->value.len + 8;
	p.progress = isatty(STDERR_FILENO);
	p.stdout_tty = isatty(STDOUT_FILENO);
	pthread_mutex_init(&p.lock, NULL);
	pthread_cond_init(&p.room, NULL);
	grpc_metadata_array_init(&p.initial_md);
	status_init(&p.st);

	client_open(&c, g);
	p.call = client_call(&c, o->acks ? METHOD_PUBLISH_STREAM : METHOD_PUBLISH);
	p.started_ms = p.progress_ms = now_ms();
	publish_start(&p);
	if (pthread_create(&reader, NULL, publish_reader, &p) != 0) {
		fputs("kbridge: cannot start the input thread\n", stderr);
		abort();
	}
	publish_run(&c, &p);
	pthread_join(reader, NULL);

	if (o->acks)
		rc = publish_acks_result(&p);
	else if (p.st.code == GRPC_STATUS_OK && !p.read_error && p.input_end == INPUT_END)
		rc = publish_print_summary(&p);
	else
		rc = publish_report_failure(&p);

	grpc_byte_buffer_destroy(p.response);
	grpc_metadata_array_destroy(&p.initial_md);
	status_destroy(&p.st);
	grpc_call_unref(p.call);
	client_close(&c);
	pthread_cond_destroy(&p.room);
	pthread_mutex_destroy(&p.lock);
	free(p.req_records);
	free(p.acks);
	input_destroy(&p.in);
	if (fflush(stdout) != 0 && rc == 0) {
		fprintf(stderr, "kbridge: standard output: %s\n", strerror(errno));
		rc = EXIT_RPC;
	}
	return rc;
}

/* ---- tail ---- */

/* -e: the stream counts as at the end of the current data once no record came for this
 * long after the start offsets were fixed. kbridged has no call that says where the end
 * is, and the records do not say it either, so quiet time is the only signal a client has. */
#define EOF_IDLE_MS 1000
#define POSITIONS_KEY "kbridge-positions"
#define SKIPPED_KEY "kbridge-skipped"

/* Where tail starts: one start mode plus positions (next offset) for some partitions. */
struct tail_from {
	Kbridge__V1__SubscribeRequest__Start start;
	int64_t timestamp_ms;
	Kbridge__V1__Position *positions; /* topics point into argv or are NULL: the first -t */
	size_t n_positions;
};

/* The next offset after the last record printed, per partition seen. */
struct tail_pos {
	char *topic;
	int32_t partition;
	int64_t next;
};

struct tail {
	grpc_call *call;
	int batches;
	uint64_t count, limit; /* limit 0: no limit */
	bool verbose;
	const char *format;    /* -f, or NULL */
	bool exit_at_end;      /* -e */
	bool md_received;
	int64_t last_activity_ms; /* initial metadata or the last record (for -e) */
	bool cancelled;     /* by us: count reached, -e, ^C, or output failed */
	bool limit_reached;
	bool end_reached;   /* -e: quiet for EOF_IDLE_MS */
	int output_error;   /* errno of a failed write to stdout */
	bool bad_response;
	struct tail_pos *pos;
	size_t n_pos;
	grpc_byte_buffer *request;
	grpc_metadata_array initial_md;
	grpc_byte_buffer *msg; /* the message RECV_MESSAGE fills */
	struct status st;
};

/* Key bytes as they are when printable, else \xHH, so the line stays one word. */
static void print_escaped(const ProtobufCBinaryData *d)
{
	for (size_t i = 0; i < d->len; i++) {
		unsigned char ch = d->data[i];
		if (ch > ' ' && ch < 0x7f && ch != '\\')
			putchar(ch);
		else
			printf("\\x%02x", ch);
	}
}

/* Checks a -f FORMAT; exits with a usage error naming what is wrong. */
static void format_check(const char *f)
{
	for (const char *p = f; *p; p++) {
		if (*p != '%' && *p != '\\')
			continue;
		if (!p[1])
			usage_error("--format: '%s' ends with a lone '%c'", f, *p);
		p++;
		if (p[-1] == '%' && !strchr("tpokshT%", *p))
			usage_error("--format: unknown conversion '%%%c' (known: %%t %%p %%o %%k %%s %%h %%T %%%%)", *p);
		if (p[-1] == '\\' && !strchr("nt\\", *p))
			usage_error("--format: unknown escape '\\%c' (known: \\n \\t \\\\)", *p);
	}
}

/* Headers as kcat prints them: KEY=VALUE,KEY=VALUE, raw bytes. */
static void print_headers(const Kbridge__V1__Record *r)
{
	for (size_t i = 0; i < r->n_headers; i++) {
		printf("%s%s=", i ? "," : "", r->headers[i]->key);
		fwrite(r->headers[i]->value.data, 1, r->headers[i]->value.len, stdout);
	}
}

static void print_formatted(const char *f, const Kbridge__V1__Record *r)
{
	for (const char *p = f; *p; p++) {
		if (*p == '\\') {
			p++;
			putchar(*p == 'n' ? '\n' : *p == 't' ? '\t' : '\\');
			continue;
		}
		if (*p != '%') {
			putchar(*p);
			continue;
		}
		switch (*++p) {
		case 't': fputs(r->topic, stdout); break;
		case 'p': printf("%" PRId32, r->partition); break;
		case 'o': printf("%" PRId64, r->offset); break;
		case 'k': fwrite(r->key.data, 1, r->key.len, stdout); break;
		case 's': fwrite(r->value.data, 1, r->value.len, stdout); break;
		case 'h': print_headers(r); break;
		case 'T': printf("%" PRId64, r->timestamp_ms); break;
		default: putchar('%'); break; /* %% (format_check let nothing else through) */
		}
	}
}

static void tail_print(struct tail *t, const Kbridge__V1__Record *r)
{
	if (t->format) {
		print_formatted(t->format, r);
		return;
	}
	if (t->verbose) {
		printf("%s/%" PRId32 "@%" PRId64 " key=", r->topic, r->partition, r->offset);
		print_escaped(&r->key);
		printf(" ts=%" PRId64 " ", r->timestamp_ms);
	}
	fwrite(r->value.data, 1, r->value.len, stdout);
	putchar('\n');
}

/* Remembers that r was printed: its partition resumes at r's offset + 1. */
static void tail_track(struct tail *t, const Kbridge__V1__Record *r)
{
	for (size_t i = 0; i < t->n_pos; i++)
		if (t->pos[i].partition == r->partition && strcmp(t->pos[i].topic, r->topic) == 0) {
			t->pos[i].next = r->offset + 1;
			return;
		}
	t->pos = xrealloc(t->pos, (t->n_pos + 1) * sizeof(*t->pos));
	t->pos[t->n_pos++] = (struct tail_pos){xstrdup(r->topic), r->partition, r->offset + 1};
}

static void tail_cancel(struct tail *t)
{
	if (!t->cancelled) {
		t->cancelled = true;
		grpc_call_cancel(t->call, NULL);
	}
}

static void tail_recv_next(struct tail *t)
{
	grpc_op op = {.op = GRPC_OP_RECV_MESSAGE, .data.recv_message.recv_message = &t->msg};

	t->batches++;
	start_batch(t->call, &op, 1, TAG_RECV);
}

/* A response message arrived (or the stream ended: NULL). */
static void tail_on_message(struct tail *t)
{
	Kbridge__V1__SubscribeResponse *resp;

	if (!t->msg)
		return; /* end of stream: the status follows */
	resp = (Kbridge__V1__SubscribeResponse *)codec_decode(&kbridge__v1__subscribe_response__descriptor,
							       t->msg);
	grpc_byte_buffer_destroy(t->msg);
	t->msg = NULL;
	if (!resp) {
		t->bad_response = true;
		tail_cancel(t);
		return;
	}
	t->last_activity_ms = now_ms();
	for (size_t i = 0; i < resp->n_records && !t->limit_reached; i++) {
		tail_print(t, resp->records[i]);
		tail_track(t, resp->records[i]);
		if (++t->count == t->limit)
			t->limit_reached = true;
	}
	protobuf_c_message_free_unpacked(&resp->base, NULL);
	/* Someone may be watching the output live: hand over each message at once. */
	if (fflush(stdout) != 0) {
		t->output_error = errno;
		tail_cancel(t);
	} else if (t->limit_reached) {
		tail_cancel(t);
	} else if (!t->cancelled) {
		tail_recv_next(t);
	}
}

/* The value of metadata `key` in md, or NULL; *len set. */
static const char *metadata_value(const grpc_metadata_array *md, const char *key, size_t *len)
{
	for (size_t i = 0; i < md->count; i++)
		if (grpc_slice_str_cmp(md->metadata[i].key, key) == 0) {
			*len = GRPC_SLICE_LENGTH(md->metadata[i].value);
			return (const char *)GRPC_SLICE_START_PTR(md->metadata[i].value);
		}
	return NULL;
}

/* The start offsets are fixed. Records deleted before they could be read are never a
 * silent gap: say which. */
static void tail_on_initial_md(struct tail *t)
{
	size_t len;
	const char *skipped = metadata_value(&t->initial_md, SKIPPED_KEY, &len);

	t->md_received = true;
	t->last_activity_ms = now_ms();
	if (skipped)
		fprintf(stderr, "kbridge: tail: warning: records were deleted from Kafka before they could "
				"be read (TOPIC:PARTITION:FROM-TO): %.*s\n", (int)len, skipped);
}

static void tail_start(struct tail *t)
{
	grpc_op send[3] = {
		{.op = GRPC_OP_SEND_INITIAL_METADATA},
		{.op = GRPC_OP_SEND_MESSAGE, .data.send_message.send_message = t->request},
		{.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT},
	};
	grpc_op md = {.op = GRPC_OP_RECV_INITIAL_METADATA,
		      .data.recv_initial_metadata.recv_initial_metadata = &t->initial_md};
	grpc_op status = status_op(&t->st);

	t->batches = 3;
	start_batch(t->call, send, ARRAY_SIZE(send), TAG_SEND_MD);
	start_batch(t->call, &md, 1, TAG_RECV_MD);
	start_batch(t->call, &status, 1, TAG_STATUS);
	tail_recv_next(t);
}

static void tail_run(struct client *c, struct tail *t)
{
	while (t->batches > 0) {
		grpc_event ev = client_next(c);

		if (interrupted)
			tail_cancel(t);
		if (t->exit_at_end && t->md_received && !t->cancelled &&
		    now_ms() - t->last_activity_ms >= EOF_IDLE_MS) {
			t->end_reached = true;
			tail_cancel(t);
		}
		if (ev.type != GRPC_OP_COMPLETE)
			continue;
		t->batches--;
		switch ((enum tag)(intptr_t)ev.tag) {
		case TAG_RECV:
			if (ev.success)
				tail_on_message(t);
			else {
				grpc_byte_buffer_destroy(t->msg);
				t->msg = NULL;
			}
			break;
		case TAG_RECV_MD:
			if (ev.success)
				tail_on_initial_md(t);
			break;
		default:
			break; /* TAG_SEND_MD, TAG_STATUS: the status says all that matters */
		}
	}
}

/* -v: where to resume, on stderr, in the form --from takes. The server's trailer covers
 * every partition and is exact when it ended the call (we print all we receive); when we
 * cancelled there is none, and the partitions we printed records from are what we know. */
static void tail_print_positions(struct tail *t)
{
	size_t len;
	const char *trailer = metadata_value(&t->st.trailing, POSITIONS_KEY, &len);

	if (trailer && !t->limit_reached) {
		fprintf(stderr, "kbridge: tail: " POSITIONS_KEY ": %.*s\n", (int)len, trailer);
		return;
	}
	fputs("kbridge: tail: " POSITIONS_KEY ": ", stderr);
	for (size_t i = 0; i < t->n_pos; i++)
		fprintf(stderr, "%s%s:%" PRId32 ":%" PRId64, i ? "," : "", t->pos[i].topic, t->pos[i].partition,
			t->pos[i].next);
	fputc('\n', stderr);
}

static int tail_result(struct tail *t)
{
	if (t->verbose)
		tail_print_positions(t);
	if (t->output_error) {
		fprintf(stderr, "kbridge: standard output: %s\n", strerror(t->output_error));
		return EXIT_RPC;
	}
	if (t->bad_response) {
		fputs("kbridge: tail: a response does not decode as a SubscribeResponse\n", stderr);
		return EXIT_RPC;
	}
	if (t->limit_reached || t->end_reached)
		return 0;
	if (t->cancelled && interrupted)
		return EXIT_INTERRUPTED;
	if (t->st.code == GRPC_STATUS_OK)
		return 0;
	status_print("tail", &t->st);
	fputc('\n', stderr);
	return EXIT_RPC;
}

struct tail_opts {
	char **topics;
	size_t n_topics;
	struct tail_from from;
	const char *group;
	const char *format;
	uint64_t limit;
	uint32_t max_batch;
	bool verbose, exit_at_end;
};

static int cmd_tail(struct global *g, struct tail_opts *o)
{
	Kbridge__V1__SubscribeRequest req = KBRIDGE__V1__SUBSCRIBE_REQUEST__INIT;
	Kbridge__V1__Position **positions = xcalloc(o->from.n_positions + 1, sizeof(*positions));
	struct tail t = {.limit = o->limit, .verbose = o->verbose, .format = o->format,
			 .exit_at_end = o->exit_at_end};
	struct client c;
	int rc;

	req.n_topics = o->n_topics;
	req.topics = o->topics;
	req.start = o->from.start;
	req.start_timestamp_ms = o->from.timestamp_ms;
	for (size_t i = 0; i < o->from.n_positions; i++) {
		positions[i] = &o->from.positions[i];
		if (!positions[i]->topic)
			positions[i]->topic = o->topics[0]; /* P:OFFSET means the first -t */
	}
	req.n_positions = o->from.n_positions;
	req.positions = positions;
	if (o->group)
		req.group = (char *)o->group;
	req.max_batch = o->max_batch;
	t.request = codec_encode(&req.base);
	free(positions);
	grpc_metadata_array_init(&t.initial_md);
	status_init(&t.st);

	client_open(&c, g);
	t.call = client_call(&c, METHOD_SUBSCRIBE);
	tail_start(&t);
	tail_run(&c, &t);
	rc = tail_result(&t);

	grpc_byte_buffer_destroy(t.request);
	grpc_metadata_array_destroy(&t.initial_md);
	status_destroy(&t.st);
	grpc_call_unref(t.call);
	client_close(&c);
	for (size_t i = 0; i < t.n_pos; i++)
		free(t.pos[i].topic);
	free(t.pos);
	return rc;
}

/* ---- commands ---- */

/* -H KEY=VALUE: the key is copied (it needs its NUL), the value stays in argv. */
static void header_parse(Kbridge__V1__Header *h, const char *arg)
{
	const char *eq = strchr(arg, '=');

	if (!eq)
		usage_error("--header: '%s' is not KEY=VALUE", arg);
	if (eq == arg)
		usage_error("--header: '%s' has an empty key", arg);
	*h = (Kbridge__V1__Header)KBRIDGE__V1__HEADER__INIT;
	h->key = xstrndup(arg, (size_t)(eq - arg));
	h->value.data = (uint8_t *)eq + 1;
	h->value.len = strlen(eq + 1);
}

static int main_publish(struct global *g, int argc, char **argv)
{
	static const struct option longopts[] = {
		{"topic", required_argument, NULL, 't'}, {"key", required_argument, NULL, 'k'},
		{"header", required_argument, NULL, 'H'}, {"partition", required_argument, NULL, 'p'},
		{"null", no_argument, NULL, 'z'}, {"binary", no_argument, NULL, OPT_BINARY},
		{"batch", required_argument, NULL, OPT_BATCH}, {"acks", no_argument, NULL, OPT_ACKS},
		GLOBAL_LONG_OPTIONS, {0}};
	struct publish_opts o = {.partition = -1, .format = INPUT_LINES,
				 .batch_records = DEFAULT_BATCH_RECORDS};
	Kbridge__V1__Header *headers = xcalloc(argc, sizeof(*headers));
	bool nul = false, binary = false;
	int c, rc;

	o.headers = xcalloc(argc, sizeof(*o.headers));
	while ((c = getopt_long(argc, argv, "t:k:H:p:za:hV", longopts, NULL)) != -1) {
		switch (c) {
		case 't':
			if (o.topic)
				usage_error("publish: one topic only (-t given twice)");
			o.topic = optarg;
			break;
		case 'k':
			o.key = optarg;
			break;
		case 'H':
			header_parse(&headers[o.n_headers], optarg);
			o.headers[o.n_headers] = &headers[o.n_headers];
			o.n_headers++;
			break;
		case 'p':
			o.partition = (int32_t)parse_count("--partition", optarg, 0, INT32_MAX);
			break;
		case 'z':
			nul = true;
			break;
		case OPT_BINARY:
			binary = true;
			break;
		case OPT_BATCH:
			o.batch_records = parse_count("--batch", optarg, 1, MAX_BATCH_RECORDS);
			break;
		case OPT_ACKS:
			o.acks = true;
			break;
		default:
			global_option(g, c, optarg);
		}
	}
	if (!o.topic)
		usage_error("publish: a topic is required (-t TOPIC)");
	if (!*o.topic)
		usage_error("publish: the topic must not be empty");
	if (nul && binary)
		usage_error("publish: -z and --binary exclude each other");
	o.format = nul ? INPUT_NUL : binary ? INPUT_BINARY : INPUT_LINES;
	if (optind < argc)
		o.file = argv[optind++];
	if (optind < argc)
		usage_error("publish: one input file at most ('%s' is extra)", argv[optind]);
	rc = cmd_publish(g, &o);
	for (size_t i = 0; i < o.n_headers; i++)
		free(headers[i].key);
	free(headers);
	free(o.headers);
	return rc;
}

/* One item of a --from position list: P:OFFSET (the first -t topic, topic NULL) or
 * TOPIC:P:OFFSET (as kbridge-positions writes them; topic names have no colon). */
static void position_parse(Kbridge__V1__Position *pos, const char *item, size_t len)
{
	char *s = xstrndup(item, len), *offset = strrchr(s, ':'), *part;

	if (!offset || offset == s)
		usage_error("--from: '%s' is not PARTITION:OFFSET or TOPIC:PARTITION:OFFSET", s);
	*offset++ = 0;
	part = strrchr(s, ':');
	if (part)
		*part++ = 0;
	*pos = (Kbridge__V1__Position)KBRIDGE__V1__POSITION__INIT;
	pos->partition = (int32_t)parse_count("--from: partition", part ? part : s, 0, INT32_MAX);
	pos->offset = (int64_t)parse_count("--from: offset", offset, 0, INT64_MAX);
	pos->topic = part ? (*s ? xstrdup(s) : NULL) : NULL;
	if (part && !pos->topic)
		usage_error("--from: '%.*s' has an empty topic", (int)len, item);
	free(s);
}

/* --from WHERE: earliest, latest, @TIMESTAMP_MS, or a list of positions. Given more than
 * once, the last start word counts and the positions add up. */
static void from_parse(struct tail_from *f, const char *arg)
{
	if (strcmp(arg, "earliest") == 0) {
		f->start = KBRIDGE__V1__SUBSCRIBE_REQUEST__START__EARLIEST;
	} else if (strcmp(arg, "latest") == 0) {
		f->start = KBRIDGE__V1__SUBSCRIBE_REQUEST__START__LATEST;
	} else if (arg[0] == '@') {
		f->start = KBRIDGE__V1__SUBSCRIBE_REQUEST__START__TIMESTAMP;
		f->timestamp_ms = (int64_t)parse_count("--from: timestamp", arg + 1, 0, INT64_MAX);
	} else if (strchr(arg, ':')) {
		for (const char *p = arg;;) {
			size_t len = strcspn(p, ",");
			f->positions = xrealloc(f->positions, (f->n_positions + 1) * sizeof(*f->positions));
			position_parse(&f->positions[f->n_positions++], p, len);
			if (!p[len])
				break;
			p += len + 1;
		}
	} else {
		usage_error("--from: '%s' is none of earliest, latest, @TIMESTAMP_MS, "
			    "PARTITION:OFFSET,... or TOPIC:PARTITION:OFFSET,...", arg);
	}
}

static int main_tail(struct global *g, int argc, char **argv)
{
	static const struct option longopts[] = {
		{"topic", required_argument, NULL, 't'}, {"from", required_argument, NULL, OPT_FROM},
		{"count", required_argument, NULL, 'n'}, {"max-batch", required_argument, NULL, OPT_MAX_BATCH},
		{"group", required_argument, NULL, 'g'}, {"format", required_argument, NULL, 'f'},
		{"exit", no_argument, NULL, 'e'}, {"verbose", no_argument, NULL, 'v'},
		GLOBAL_LONG_OPTIONS, {0}};
	struct tail_opts o = {.from.start = KBRIDGE__V1__SUBSCRIBE_REQUEST__START__LATEST};
	int c, rc;

	o.topics = xcalloc(argc, sizeof(*o.topics));
	while ((c = getopt_long(argc, argv, "t:n:g:f:eva:hV", longopts, NULL)) != -1) {
		switch (c) {
		case 't':
			if (!*optarg)
				usage_error("tail: a topic must not be empty");
			o.topics[o.n_topics++] = optarg;
			break;
		case OPT_FROM:
			from_parse(&o.from, optarg);
			break;
		case 'n':
			o.limit = parse_count("--count", optarg, 1, UINT64_MAX);
			break;
		case OPT_MAX_BATCH:
			o.max_batch = (uint32_t)parse_count("--max-batch", optarg, 1, 100000);
			break;
		case 'g':
			if (!*optarg)
				usage_error("--group: the group name must not be empty");
			o.group = optarg;
			break;
		case 'f':
			format_check(optarg);
			o.format = optarg;
			break;
		case 'e':
			o.exit_at_end = true;
			break;
		case 'v':
			o.verbose = true;
			break;
		default:
			global_option(g, c, optarg);
		}
	}
	if (o.n_topics == 0)
		usage_error("tail: at least one topic is required (-t TOPIC)");
	if (optind < argc)
		usage_error("tail: unexpected argument '%s'", argv[optind]);
	rc = cmd_tail(g, &o);
	for (size_t i = 0; i < o.from.n_positions; i++)
		if (o.from.positions[i].topic != o.topics[0])
			free(o.from.positions[i].topic);
	free(o.from.positions);
	free(o.topics);
	return rc;
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {GLOBAL_LONG_OPTIONS, {0}};
	static char publish_name[] = "kbridge publish", tail_name[] = "kbridge tail",
		    bench_name[] = "kbridge bench";
	struct global g = {.address = getenv(ADDRESS_ENV)};
	const char *cmd;
	int c;

	if (!g.address || !*g.address)
		g.address = DEFAULT_ADDRESS;
	argv[0] = "kbridge"; /* for getopt's messages */
	/* '+': options up to the command are ours, the rest belongs to the command. */
	while ((c = getopt_long(argc, argv, "+a:hV", longopts, NULL)) != -1)
		global_option(&g, c, optarg);
	if (optind == argc)
		usage_error("a command is required: publish, tail or bench");
	cmd = argv[optind];
	argc -= optind;
	argv += optind;
	optind = 0; /* GNU getopt: start over on the command's arguments */

	signals_init();
	if (strcmp(cmd, "publish") == 0) {
		argv[0] = publish_name;
		return main_publish(&g, argc, argv);
	}
	if (strcmp(cmd, "tail") == 0) {
		argv[0] = tail_name;
		return main_tail(&g, argc, argv);
	}
	if (strcmp(cmd, "bench") == 0) {
		argv[0] = bench_name;
		return bench_main(g.address, argc, argv);
	}
	usage_error("unknown command '%s' (commands: publish, tail, bench)", cmd);
}
