/* kbridge: the command-line client of kbridged, on gRPC's core API.
 *
 *   kbridge [-a ADDR] [--timeout S] publish -t TOPIC [-k KEY] [--batch N] [FILE]
 *   kbridge [-a ADDR] [--timeout S] tail -t TOPIC... [--from earliest|latest] [-n COUNT] [-v]
 *
 * Each command makes one call on one channel with one completion queue, which only the
 * main thread waits on (gRPC's I/O is driven by the thread that waits). A tag names the
 * batch that completed; a call is unreferenced only once no batch is outstanding.
 *
 * Threads and locks: `publish` adds a reader thread that reads the input, encodes
 * requests and queues them, so that reading goes on while a message is being sent.
 * struct publish.lock guards the send queue and every field marked "locked"; both threads
 * start batches under it (grpc_call_start_batch is thread-safe), which is what keeps at
 * most one SEND_MESSAGE outstanding. `tail` is single-threaded. */
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

#include "codec.h"
#include "util.h"

#define DEFAULT_ADDRESS "127.0.0.1:50051"
#define ADDRESS_ENV "KBRIDGE_ADDRESS"
#define METHOD_PUBLISH "/kbridge.v1.Bridge/Publish"
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
/* The server's max_request_bytes cannot go above this, so neither can a line. */
#define MAX_LINE_BYTES (256u * 1024 * 1024)
/* How often a waiting thread looks at SIGINT and at the end of the call. */
#define POLL_MS 100

enum tag {
	TAG_SEND_MD = 1, /* SEND_INITIAL_METADATA (publish) or the whole request (tail) */
	TAG_SEND,        /* one SEND_MESSAGE, maybe with SEND_CLOSE_FROM_CLIENT */
	TAG_CLOSE,       /* SEND_CLOSE_FROM_CLIENT alone */
	TAG_RECV_MD,     /* RECV_INITIAL_METADATA (tail) */
	TAG_RECV,        /* one RECV_MESSAGE (tail) */
	TAG_STATUS,      /* RECV_STATUS_ON_CLIENT, with the response for publish */
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
		"  publish -t TOPIC [-k KEY] [--batch N] [FILE]\n"
		"      publish each line of FILE (default: standard input) as one record, in one\n"
		"      stream; print how many records were written and where, once all are durable\n"
		"  tail -t TOPIC [-t TOPIC]... [--from earliest|latest] [-n COUNT] [--max-batch N] [-v]\n"
		"      print the value of each record of the topics, one per line, as it arrives\n"
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
		"      --batch N        records per request message, 1..%d (default %d; a\n"
		"                       request also ends at about 256 KiB)\n"
		"tail:\n"
		"  -t, --topic TOPIC    topic to read; repeat it for several\n"
		"      --from WHERE     earliest or latest (default: latest)\n"
		"  -n, --count COUNT    exit after COUNT records\n"
		"      --max-batch N    most records per response message (default: the server's)\n"
		"  -v, --verbose        print TOPIC/PARTITION@OFFSET key=KEY ts=MS VALUE\n"
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
enum { OPT_TIMEOUT = 256, OPT_BATCH, OPT_FROM, OPT_MAX_BATCH };
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

struct status {
	grpc_metadata_array trailing; /* elements belong to the call: read before unref */
	grpc_status_code code;
	grpc_slice details;
};

static void status_init(struct status *st)
{
	grpc_metadata_array_init(&st->trailing);
	st->code = GRPC_STATUS_UNKNOWN;
	st->details = grpc_empty_slice();
}

static void status_destroy(struct status *st)
{
	grpc_metadata_array_destroy(&st->trailing);
	grpc_slice_unref(st->details);
}

static grpc_op status_op(struct status *st)
{
	return (grpc_op){.op = GRPC_OP_RECV_STATUS_ON_CLIENT,
			 .data.recv_status_on_client = {.trailing_metadata = &st->trailing,
							.status = &st->code,
							.status_details = &st->details}};
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

/* ---- input: lines from a file descriptor ---- */

struct input {
	const char *name; /* for messages */
	int fd;
	char *buf;
	size_t cap, start, end; /* unread bytes are buf[start..end) */
	bool eof;
	uint64_t lines; /* lines returned so far */
};

enum line_result { LINE_OK, LINE_MORE, LINE_END, LINE_TOO_LONG };

static void input_init(struct input *in, const char *name, int fd)
{
	in->name = name;
	in->fd = fd;
	in->cap = 256 * 1024;
	in->buf = xmalloc(in->cap);
	in->start = in->end = 0;
	in->eof = false;
	in->lines = 0;
}

static void input_destroy(struct input *in)
{
	if (in->fd > STDIN_FILENO)
		close(in->fd);
	free(in->buf);
}

/* The next line, without its newline, valid until the next input_* call. A last line
 * without a newline counts. LINE_MORE: call input_read first. */
static enum line_result input_line(struct input *in, const char **line, size_t *len)
{
	char *p = in->buf + in->start;
	size_t avail = in->end - in->start;
	char *nl = memchr(p, '\n', avail);

	if (!nl && !in->eof)
		return avail >= MAX_LINE_BYTES ? LINE_TOO_LONG : LINE_MORE;
	if (!nl && avail == 0)
		return LINE_END;
	*line = p;
	*len = nl ? (size_t)(nl - p) : avail;
	in->start += nl ? *len + 1 : avail;
	in->lines++;
	return LINE_OK;
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

/* One PublishRequest being filled: the lines are copied back to back into `data`. */
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
	const char *topic;
	ProtobufCBinaryData key;
	size_t batch_records;
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
	bool line_too_long;                       /* locked */

	/* reader thread's until it is joined */
	uint32_t *req_records; /* records of each request sent, for the durable prefix */
	size_t n_reqs, cap_reqs;
	uint64_t records_sent;

	/* main thread's */
	bool cancelled;
	grpc_metadata_array initial_md;
	grpc_byte_buffer *response;
	struct status st;
};

static void batch_destroy(struct batch *b)
{
	free(b->recs);
	free(b->ptrs);
	free(b->offs);
	free(b->data);
}

static void batch_add(struct publish *p, struct batch *b, const char *line, size_t len)
{
	if (b->n == b->cap) {
		size_t old = b->cap;
		b->cap = b->cap ? 2 * b->cap : 128;
		b->recs = xrealloc(b->recs, b->cap * sizeof(*b->recs));
		b->ptrs = xrealloc(b->ptrs, b->cap * sizeof(*b->ptrs));
		b->offs = xrealloc(b->offs, b->cap * sizeof(*b->offs));
		/* Every record differs only in its value: set the rest once. */
		for (size_t i = old; i < b->cap; i++) {
			b->recs[i] = (Kbridge__V1__Record)KBRIDGE__V1__RECORD__INIT;
			b->recs[i].topic = (char *)p->topic;
			b->recs[i].key = p->key;
		}
	}
	if (b->data_cap - b->used < len) {
		while (b->data_cap - b->used < len)
			b->data_cap = b->data_cap ? 2 * b->data_cap : 64 * 1024;
		b->data = xrealloc(b->data, b->data_cap);
	}
	memcpy(b->data + b->used, line, len);
	b->offs[b->n] = b->used;
	b->recs[b->n].value.len = len;
	b->used += len;
	b->n++;
	/* value, topic, key, and the tags and lengths around them */
	b->bytes += len + strlen(p->topic) + p->key.len + 16;
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
	p->queue[(p->q_head + p->q_count) % SEND_QUEUE_MAX] = bb;
	p->q_count++;
	if (!p->sending)
		publish_send_next(p);
	pthread_mutex_unlock(&p->lock);

	if (p->n_reqs == p->cap_reqs) {
		p->cap_reqs = p->cap_reqs ? 2 * p->cap_reqs : 1024;
		p->req_records = xrealloc(p->req_records, p->cap_reqs * sizeof(*p->req_records));
	}
	p->req_records[p->n_reqs++] = n;
	p->records_sent += n;
	return true;
}

static bool publish_stopped(struct publish *p)
{
	pthread_mutex_lock(&p->lock);
	bool stop = p->stop;
	pthread_mutex_unlock(&p->lock);
	return stop;
}

/* Reader: the input ended, failed or the call is over. On failure the call is cancelled:
 * half-closing would make a part of the input look like all of it. */
static void publish_reader_end(struct publish *p, int error, bool too_long)
{
	pthread_mutex_lock(&p->lock);
	p->input_done = true;
	p->read_error = error;
	p->line_too_long = too_long;
	if (error || too_long)
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
	const char *line;
	size_t len;
	int err = 0;
	bool too_long = false;
	sigset_t set;

	/* ^C is the main thread's business. */
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	pthread_sigmask(SIG_BLOCK, &set, NULL);

	for (;;) {
		enum line_result r = input_line(&p->in, &line, &len);

		if (r == LINE_OK) {
			batch_add(p, &b, line, len);
			if ((b.n >= p->batch_records || b.bytes >= BATCH_BYTES) && !publish_submit(p, &b))
				goto out;
		} else if (r == LINE_MORE) {
			if (!publish_wait_input(p, &b))
				goto out;
			err = -input_read(&p->in);
			if (err)
				break;
		} else if (r == LINE_TOO_LONG) {
			too_long = true;
			break;
		} else {
			if (b.n > 0 && !publish_submit(p, &b))
				goto out;
			break;
		}
	}
	publish_reader_end(p, err, too_long);
out:
	batch_destroy(&b);
	return NULL;
}

/* Main thread: a batch completed. */
static void publish_event(struct publish *p, enum tag tag, bool ok)
{
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
	default: /* TAG_SEND_MD, TAG_CLOSE: their outcome shows in the status */
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

	if (p->read_error) {
		fprintf(stderr, "kbridge: %s: %s\n", p->in.name, strerror(p->read_error));
		return EXIT_RPC;
	}
	if (p->line_too_long) {
		fprintf(stderr, "kbridge: %s: line %" PRIu64 " is longer than %u bytes\n", p->in.name,
			p->in.lines + 1, MAX_LINE_BYTES);
		return EXIT_RPC;
	}
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
			fprintf(stderr, "kbridge: the first %" PRIu64 " input lines are durable\n", lines);
	} else {
		fputc('\n', stderr);
	}
	return EXIT_RPC;
}

/* Starts the call: initial metadata on its own (never hinted), and the receiving side. */
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
	start_batch(p->call, recv, ARRAY_SIZE(recv), TAG_STATUS);
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
		if (interrupted && !p->cancelled) {
			p->cancelled = true;
			grpc_call_cancel(p->call, NULL);
		}
		if (ev.type == GRPC_OP_COMPLETE)
			publish_event(p, (enum tag)(intptr_t)ev.tag, ev.success);
	}
}

static int cmd_publish(struct global *g, const char *topic, const char *key, size_t batch_records,
		       const char *file)
{
	struct client c;
	struct publish p = {.topic = topic, .batch_records = batch_records};
	pthread_t reader;
	int fd = STDIN_FILENO, rc;
	struct stat sb;

	if (file && strcmp(file, "-") != 0) {
		fd = open(file, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || (fstat(fd, &sb) == 0 && S_ISDIR(sb.st_mode))) {
			fprintf(stderr, "kbridge: %s: %s\n", file, fd < 0 ? strerror(errno) : strerror(EISDIR));
			if (fd >= 0)
				close(fd);
			return EXIT_RPC;
		}
	}
	input_init(&p.in, fd == STDIN_FILENO ? "standard input" : file, fd);
	if (key) {
		p.key.data = (uint8_t *)key;
		p.key.len = strlen(key);
	}
	pthread_mutex_init(&p.lock, NULL);
	pthread_cond_init(&p.room, NULL);
	grpc_metadata_array_init(&p.initial_md);
	status_init(&p.st);

	client_open(&c, g);
	p.call = client_call(&c, METHOD_PUBLISH);
	publish_start(&p);
	if (pthread_create(&reader, NULL, publish_reader, &p) != 0) {
		fputs("kbridge: cannot start the input thread\n", stderr);
		abort();
	}
	publish_run(&c, &p);
	pthread_join(reader, NULL);

	if (p.st.code == GRPC_STATUS_OK && !p.read_error && !p.line_too_long)
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
	input_destroy(&p.in);
	if (fflush(stdout) != 0 && rc == 0) {
		fprintf(stderr, "kbridge: standard output: %s\n", strerror(errno));
		rc = EXIT_RPC;
	}
	return rc;
}

/* ---- tail ---- */

struct tail {
	grpc_call *call;
	int batches;
	uint64_t count, limit; /* limit 0: no limit */
	bool verbose;
	bool cancelled;     /* by us: count reached, ^C, or output failed */
	bool limit_reached;
	int output_error;   /* errno of a failed write to stdout */
	bool bad_response;
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

static void tail_print(struct tail *t, const Kbridge__V1__Record *r)
{
	if (t->verbose) {
		printf("%s/%" PRId32 "@%" PRId64 " key=", r->topic, r->partition, r->offset);
		print_escaped(&r->key);
		printf(" ts=%" PRId64 " ", r->timestamp_ms);
	}
	fwrite(r->value.data, 1, r->value.len, stdout);
	putchar('\n');
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
	for (size_t i = 0; i < resp->n_records && !t->limit_reached; i++) {
		tail_print(t, resp->records[i]);
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
		if (ev.type != GRPC_OP_COMPLETE)
			continue;
		t->batches--;
		if ((enum tag)(intptr_t)ev.tag == TAG_RECV) {
			if (ev.success)
				tail_on_message(t);
			else {
				grpc_byte_buffer_destroy(t->msg);
				t->msg = NULL;
			}
		}
		/* TAG_SEND_MD, TAG_RECV_MD, TAG_STATUS: the status says all that matters. */
	}
}

static int tail_result(struct tail *t)
{
	if (t->output_error) {
		fprintf(stderr, "kbridge: standard output: %s\n", strerror(t->output_error));
		return EXIT_RPC;
	}
	if (t->bad_response) {
		fputs("kbridge: tail: a response does not decode as a SubscribeResponse\n", stderr);
		return EXIT_RPC;
	}
	if (t->limit_reached)
		return 0;
	if (t->cancelled && interrupted)
		return EXIT_INTERRUPTED;
	if (t->st.code == GRPC_STATUS_OK)
		return 0;
	status_print("tail", &t->st);
	fputc('\n', stderr);
	return EXIT_RPC;
}

static int cmd_tail(struct global *g, char **topics, size_t n_topics, bool earliest, uint64_t limit,
		    uint32_t max_batch, bool verbose)
{
	Kbridge__V1__SubscribeRequest req = KBRIDGE__V1__SUBSCRIBE_REQUEST__INIT;
	struct tail t = {.limit = limit, .verbose = verbose};
	struct client c;
	int rc;

	req.n_topics = n_topics;
	req.topics = topics;
	req.start = earliest ? KBRIDGE__V1__SUBSCRIBE_REQUEST__START__EARLIEST
			     : KBRIDGE__V1__SUBSCRIBE_REQUEST__START__LATEST;
	req.max_batch = max_batch;
	t.request = codec_encode(&req.base);
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
	return rc;
}

/* ---- commands ---- */

static int main_publish(struct global *g, int argc, char **argv)
{
	static const struct option longopts[] = {
		{"topic", required_argument, NULL, 't'}, {"key", required_argument, NULL, 'k'},
		{"batch", required_argument, NULL, OPT_BATCH}, GLOBAL_LONG_OPTIONS, {0}};
	const char *topic = NULL, *key = NULL, *file = NULL;
	size_t batch = DEFAULT_BATCH_RECORDS;
	int c;

	while ((c = getopt_long(argc, argv, "t:k:a:hV", longopts, NULL)) != -1) {
		switch (c) {
		case 't':
			if (topic)
				usage_error("publish: one topic only (-t given twice)");
			topic = optarg;
			break;
		case 'k':
			key = optarg;
			break;
		case OPT_BATCH:
			batch = parse_count("--batch", optarg, 1, MAX_BATCH_RECORDS);
			break;
		default:
			global_option(g, c, optarg);
		}
	}
	if (!topic)
		usage_error("publish: a topic is required (-t TOPIC)");
	if (!*topic)
		usage_error("publish: the topic must not be empty");
	if (optind < argc)
		file = argv[optind++];
	if (optind < argc)
		usage_error("publish: one input file at most ('%s' is extra)", argv[optind]);
	return cmd_publish(g, topic, key, batch, file);
}

static int main_tail(struct global *g, int argc, char **argv)
{
	static const struct option longopts[] = {
		{"topic", required_argument, NULL, 't'}, {"from", required_argument, NULL, OPT_FROM},
		{"count", required_argument, NULL, 'n'}, {"max-batch", required_argument, NULL, OPT_MAX_BATCH},
		{"verbose", no_argument, NULL, 'v'}, GLOBAL_LONG_OPTIONS, {0}};
	char **topics = xcalloc(argc, sizeof(*topics));
	size_t n_topics = 0;
	bool earliest = false, verbose = false;
	uint64_t limit = 0;
	uint32_t max_batch = 0;
	int c, rc;

	while ((c = getopt_long(argc, argv, "t:n:va:hV", longopts, NULL)) != -1) {
		switch (c) {
		case 't':
			if (!*optarg)
				usage_error("tail: a topic must not be empty");
			topics[n_topics++] = optarg;
			break;
		case OPT_FROM:
			if (strcmp(optarg, "earliest") == 0)
				earliest = true;
			else if (strcmp(optarg, "latest") == 0)
				earliest = false;
			else
				usage_error("--from: '%s' is neither 'earliest' nor 'latest'", optarg);
			break;
		case 'n':
			limit = parse_count("--count", optarg, 1, UINT64_MAX);
			break;
		case OPT_MAX_BATCH:
			max_batch = (uint32_t)parse_count("--max-batch", optarg, 1, 100000);
			break;
		case 'v':
			verbose = true;
			break;
		default:
			global_option(g, c, optarg);
		}
	}
	if (n_topics == 0)
		usage_error("tail: at least one topic is required (-t TOPIC)");
	if (optind < argc)
		usage_error("tail: unexpected argument '%s'", argv[optind]);
	rc = cmd_tail(g, topics, n_topics, earliest, limit, max_batch, verbose);
	free(topics);
	return rc;
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {GLOBAL_LONG_OPTIONS, {0}};
	static char publish_name[] = "kbridge publish", tail_name[] = "kbridge tail";
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
		usage_error("a command is required: publish or tail");
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
	usage_error("unknown command '%s' (commands: publish, tail)", cmd);
}
