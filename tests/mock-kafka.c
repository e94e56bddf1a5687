/*
 * kbridge-mock-kafka: librdkafka's mock Kafka cluster as a stand-alone process,
 * for the scenario tests and the benchmarks.
 *
 *   kbridge-mock-kafka [-b BROKERS] [-t TOPIC:PARTITIONS]... [-C FIFO]
 *
 * Prints the bootstrap servers as the first line on stdout, then serves until
 * SIGTERM or SIGINT. With -C, a thread reads commands from FIFO, one a line:
 *   down BROKER | up BROKER | rtt BROKER MS | topic NAME PARTITIONS | produce_errors ERR COUNT
 * and answers each with a line "ok" or "error: ..." on stdout. Brokers are
 * numbered from 1.
 *
 * Threads: the main thread sets up and then waits in sigwait(); the optional
 * control thread applies commands. The mock cluster itself runs in its own
 * librdkafka thread, which is why the signals are blocked before rd_kafka_new:
 * a signal delivered to that thread would break its poll loop. stdout is
 * written by both threads, under out_lock.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#define MAX_TOPICS 64

struct topic_arg {
	const char *name;
	int partitions;
};

struct control {
	rd_kafka_mock_cluster_t *mc;
	int brokers;
	int fifo_fd;
	int stop_pipe[2];	/* written by main to stop the thread */
};

static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

/* Prints one line on stdout and flushes it: the tests read it at once. */
static void out_line(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void out_line(const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&out_lock);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
	pthread_mutex_unlock(&out_lock);
}

static void usage(FILE *f)
{
	fprintf(f, "usage: kbridge-mock-kafka [-b BROKERS] [-t TOPIC:PARTITIONS]... [-C FIFO]\n"
		"  -b N                brokers in the cluster, 1..9 (default 3)\n"
		"  -t TOPIC:PARTITIONS create a topic (repeatable), replication min(3, N)\n"
		"  -C FIFO             read control commands from FIFO:\n"
		"                      down B | up B | rtt B MS | topic NAME PARTITIONS | produce_errors ERR COUNT\n");
}

/* Parses a decimal int in [min, max]; returns 0 or -EINVAL. */
static int parse_int(const char *s, int min, int max, int *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < min || v > max)
		return -EINVAL;
	*out = (int)v;
	return 0;
}

static int parse_topic(char *arg, struct topic_arg *t)
{
	char *colon = strrchr(arg, ':');

	if (!colon || colon == arg)
		return -EINVAL;
	*colon = '\0';
	t->name = arg;
	return parse_int(colon + 1, 1, 10000, &t->partitions);
}

static int replication(int brokers)
{
	return brokers < 3 ? brokers : 3;
}

static int create_topic(rd_kafka_mock_cluster_t *mc, int brokers, const char *name,
			int partitions)
{
	rd_kafka_resp_err_t err;

	err = rd_kafka_mock_topic_create(mc, name, partitions, replication(brokers));
	if (err) {
		fprintf(stderr, "kbridge-mock-kafka: cannot create topic %s: %s\n", name,
			rd_kafka_err2str(err));
		return -1;
	}
	fprintf(stderr, "kbridge-mock-kafka: topic %s, %d partitions\n", name, partitions);
	return 0;
}

/* Applies one control command; returns NULL or an error message. */
static const char *apply_command(struct control *c, char *line)
{
	char *argv[4];
	int argc = 0, broker, ms, partitions;
	char *save = NULL, *tok;
	rd_kafka_resp_err_t err;

	for (tok = strtok_r(line, " \t\r\n", &save); tok && argc < 4;
	     tok = strtok_r(NULL, " \t\r\n", &save))
		argv[argc++] = tok;
	if (argc == 0)
		return "empty command";
	if (strcmp(argv[0], "produce_errors") == 0) {
		/* The next COUNT Produce requests (API key 0) fail with Kafka error ERR. */
		int code, count;
		if (argc != 3 || parse_int(argv[1], -200, 200, &code) || parse_int(argv[2], 1, 1000, &count))
			return "usage: produce_errors ERR COUNT";
		rd_kafka_resp_err_t errs[1000];
		for (int i = 0; i < count; i++)
			errs[i] = (rd_kafka_resp_err_t)code;
		rd_kafka_mock_push_request_errors_array(c->mc, 0, count, errs);
		return NULL;
	}
	if (strcmp(argv[0], "topic") == 0) {
		if (argc != 3 || parse_int(argv[2], 1, 10000, &partitions))
			return "usage: topic NAME PARTITIONS";
		if (create_topic(c->mc, c->brokers, argv[1], partitions))
			return "cannot create topic";
		return NULL;
	}
	if (argc < 2 || parse_int(argv[1], 1, c->brokers, &broker))
		return "usage: down|up|rtt BROKER [MS] (BROKER from 1 to the number of brokers)";
	if (strcmp(argv[0], "down") == 0 && argc == 2)
		err = rd_kafka_mock_broker_set_down(c->mc, broker);
	else if (strcmp(argv[0], "up") == 0 && argc == 2)
		err = rd_kafka_mock_broker_set_up(c->mc, broker);
	else if (strcmp(argv[0], "rtt") == 0 && argc == 3 &&
		 parse_int(argv[2], 0, 3600000, &ms) == 0)
		err = rd_kafka_mock_broker_set_rtt(c->mc, broker, ms);
	else
		return "unknown command (down B | up B | rtt B MS | topic NAME PARTITIONS)";
	return err ? rd_kafka_err2str(err) : NULL;
}

/* Handles every complete line in buf[0..*len); keeps a partial line. */
static void handle_lines(struct control *c, char *buf, size_t *len)
{
	char *start = buf, *nl;
	const char *error;

	while ((nl = memchr(start, '\n', *len - (size_t)(start - buf)))) {
		*nl = '\0';
		fprintf(stderr, "kbridge-mock-kafka: command: %s\n", start);
		error = apply_command(c, start);
		if (error)
			out_line("error: %s", error);
		else
			out_line("ok");
		start = nl + 1;
	}
	*len -= (size_t)(start - buf);
	memmove(buf, start, *len);
}

/* The control thread: reads commands until main writes to stop_pipe. */
static void *control_main(void *arg)
{
	struct control *c = arg;
	char buf[4096];
	size_t len = 0;
	struct pollfd pfd[2] = {
		{ .fd = c->fifo_fd, .events = POLLIN },
		{ .fd = c->stop_pipe[0], .events = POLLIN },
	};
	ssize_t n;

	for (;;) {
		if (poll(pfd, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			perror("kbridge-mock-kafka: poll");
			break;
		}
		if (pfd[1].revents)
			break;
		if (!pfd[0].revents)
			continue;
		n = read(c->fifo_fd, buf + len, sizeof(buf) - 1 - len);
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (n <= 0) {
			/* Opened O_RDWR, so EOF cannot happen; anything else is fatal to control. */
			perror("kbridge-mock-kafka: read control fifo");
			break;
		}
		len += (size_t)n;
		handle_lines(c, buf, &len);
		if (len == sizeof(buf) - 1) {
			out_line("error: command line too long");
			len = 0;
		}
	}
	return NULL;
}

static rd_kafka_t *new_host_client(void)
{
	char errstr[512];
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	rd_kafka_t *rk;

	/* The client only hosts the mock cluster; quiet its own connection logs. The mock
	 * brokers' accepted connections take their socket options from this client: without
	 * Nagle, as a Kafka broker's (which sets TCP_NODELAY). With Nagle, a response written
	 * while the one before was unacknowledged waited for the client's delayed ACK: bursts
	 * of 1 ms and single 40 ms waits in kbridged's R3 runs. */
	if (rd_kafka_conf_set(conf, "log.connection.close", "false", errstr,
			      sizeof(errstr)) != RD_KAFKA_CONF_OK ||
	    rd_kafka_conf_set(conf, "socket.nagle.disable", "true", errstr,
			      sizeof(errstr)) != RD_KAFKA_CONF_OK)
		fprintf(stderr, "kbridge-mock-kafka: %s\n", errstr);
	rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	if (!rk) {
		fprintf(stderr, "kbridge-mock-kafka: rd_kafka_new: %s\n", errstr);
		rd_kafka_conf_destroy(conf);
	}
	return rk;
}

int main(int argc, char **argv)
{
	struct topic_arg topics[MAX_TOPICS];
	int ntopics = 0, brokers = 3, opt, sig, i, rc = 1;
	const char *fifo = NULL;
	struct control ctl = { .fifo_fd = -1, .stop_pipe = { -1, -1 } };
	pthread_t control_thread;
	int control_running = 0;
	rd_kafka_t *rk = NULL;
	rd_kafka_mock_cluster_t *mc = NULL;
	sigset_t sigs;

	while ((opt = getopt(argc, argv, "b:t:C:h")) != -1) {
		switch (opt) {
		case 'b':
			if (parse_int(optarg, 1, 9, &brokers)) {
				fprintf(stderr, "kbridge-mock-kafka: -b %s: want 1..9\n", optarg);
				return 2;
			}
			break;
		case 't':
			if (ntopics == MAX_TOPICS || parse_topic(optarg, &topics[ntopics])) {
				fprintf(stderr, "kbridge-mock-kafka: -t %s: want TOPIC:PARTITIONS "
					"(1..10000 partitions, at most %d topics)\n", optarg, MAX_TOPICS);
				return 2;
			}
			ntopics++;
			break;
		case 'C':
			fifo = optarg;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind != argc) {
		usage(stderr);
		return 2;
	}

	/* Before rd_kafka_new, so that every librdkafka thread inherits the mask. */
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);
	signal(SIGPIPE, SIG_IGN);

	rk = new_host_client();
	if (!rk)
		goto out;
	mc = rd_kafka_mock_cluster_new(rk, brokers);
	if (!mc) {
		fprintf(stderr, "kbridge-mock-kafka: cannot start a mock cluster of %d brokers\n",
			brokers);
		goto out;
	}
	/* The mock answers Metadata only up to v2 by default, and before v4 every metadata
	 * request creates the topics it names, so a subscriber could never be told that a
	 * topic does not exist. From v4 on, the client says whether it wants that (the
	 * producer does, consumers do not), as with a real broker. */
	rd_kafka_mock_set_apiversion(mc, 3 /* Metadata */, 0, 4);
	for (i = 0; i < ntopics; i++)
		if (create_topic(mc, brokers, topics[i].name, topics[i].partitions))
			goto out;

	if (fifo) {
		/* O_RDWR: the open does not wait for a writer, and writers closing
		 * never makes the FIFO read EOF. */
		ctl.fifo_fd = open(fifo, O_RDWR | O_CLOEXEC);
		if (ctl.fifo_fd < 0) {
			fprintf(stderr, "kbridge-mock-kafka: %s: %s\n", fifo, strerror(errno));
			goto out;
		}
		if (pipe(ctl.stop_pipe)) {
			perror("kbridge-mock-kafka: pipe");
			goto out;
		}
		ctl.mc = mc;
		ctl.brokers = brokers;
		if (pthread_create(&control_thread, NULL, control_main, &ctl)) {
			fprintf(stderr, "kbridge-mock-kafka: cannot start the control thread\n");
			goto out;
		}
		control_running = 1;
	}

	out_line("%s", rd_kafka_mock_cluster_bootstraps(mc));
	fprintf(stderr, "kbridge-mock-kafka: %d brokers at %s\n", brokers,
		rd_kafka_mock_cluster_bootstraps(mc));

	if (sigwait(&sigs, &sig) == 0)
		fprintf(stderr, "kbridge-mock-kafka: %s, stopping\n", strsignal(sig));
	rc = 0;
out:
	if (control_running) {
		if (write(ctl.stop_pipe[1], "x", 1) != 1)
			perror("kbridge-mock-kafka: write");
		pthread_join(control_thread, NULL);
	}
	if (ctl.fifo_fd >= 0)
		close(ctl.fifo_fd);
	if (ctl.stop_pipe[0] >= 0) {
		close(ctl.stop_pipe[0]);
		close(ctl.stop_pipe[1]);
	}
	if (mc)
		rd_kafka_mock_cluster_destroy(mc);
	if (rk)
		rd_kafka_destroy(rk);
	return rc;
}
