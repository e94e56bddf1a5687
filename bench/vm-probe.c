/* vm-probe: does the machine itself run slow now and then? R3's tail on the 2-CPU
 * virtual machines kbridge is measured on comes in spells of some 10-80 ms in which every
 * thread of every process runs several times slower than usual; bench/run starts this
 * probe beside the R3 runs and sets their slow requests beside its spells
 * (bench/README.md, "What stands between the code and the targets").
 *
 *   vm-probe [-p PERIOD_MS] [-o FILE] [-r SAMPLES]
 *
 * Every PERIOD_MS (default 5) milliseconds the probe runs a fixed loop, calibrated at start
 * to take about 20 µs, and times it on CLOCK_MONOTONIC. A run that took SLOW_FACTOR times
 * the usual time (the median) or longer, with no context switch of the probe's thread
 * during it (getrusage RUSAGE_THREAD), means the CPU under it ran slow: on a virtual
 * machine, the host gave the CPU to something else; the guest's own scheduler had no part
 * in it. At 20 µs every 5 ms the probe takes 0.4% of one CPU.
 *
 * It runs until SIGTERM or SIGINT, then writes to FILE (default: standard output):
 *   # vm-probe: period P ms, loop U us, N samples over S s, K slow, M spells covering X% of the time
 *   span FIRST_START_NS LAST_END_NS
 *   spell START_NS END_NS SLOW_SAMPLES WORST_RATIO
 * A spell is a run of slow samples no more than SPELL_GAP periods apart; it lasts from the
 * first one's start to the last one's end, so it is shorter than the true spell by up to
 * a period at each end. START_NS and END_NS are CLOCK_MONOTONIC, like the --slow-log
 * files of kbridge bench and direct-produce.
 *
 * -r SAMPLES replays samples instead of measuring: lines "START_NS NS SWITCHED" (SWITCHED
 * 0 or 1), taken PERIOD_MS apart; the test bench/vm-probe-test.sh feeds it known spells. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "hist.h"

#define LOOP_NS 20000
#define SLOW_FACTOR 3
#define SPELL_GAP 2.5

struct sample {
	int64_t start_ns;
	int32_t ns;
	int32_t switched;
};

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static volatile uint32_t sink;

/* The work being timed: n rounds of a linear congruential step, which no compiler can
 * drop (the result goes to a volatile) or shorten. */
static void work(uint32_t n)
{
	uint32_t x = sink;
	for (uint32_t i = 0; i < n; i++)
		x = x * 1103515245u + 12345u;
	sink = x;
}

static int64_t time_work(uint32_t n)
{
	int64_t t0 = hist_now_ns();
	work(n);
	return hist_now_ns() - t0;
}

/* Rounds of work() that take about LOOP_NS on this CPU when nothing disturbs it. */
static uint32_t calibrate(void)
{
	uint32_t n = 1000;
	for (int pass = 0; pass < 3; pass++) {
		int64_t best = INT64_MAX;
		for (int i = 0; i < 50; i++) {
			int64_t t = time_work(n);
			if (t < best)
				best = t;
		}
		if (best < 1)
			best = 1;
		double scaled = (double)n * LOOP_NS / (double)best;
		n = scaled < 1 ? 1 : scaled > 1e9 ? 1000000000u : (uint32_t)scaled;
	}
	return n;
}

static long switches(void)
{
	struct rusage ru;
	getrusage(RUSAGE_THREAD, &ru);
	return ru.ru_nvcsw + ru.ru_nivcsw;
}

static int by_ns(const void *a, const void *b)
{
	int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
	return (x > y) - (x < y);
}

/* Appends a sample to *s (n of *cap used), growing it. */
static void add_sample(struct sample **s, size_t *n, size_t *cap, struct sample x)
{
	if (*n == *cap) {
		*cap = *cap ? *cap * 2 : 4096;
		*s = realloc(*s, *cap * sizeof(**s));
		if (!*s)
			abort();
	}
	(*s)[(*n)++] = x;
}

/* Samples every period_ns until SIGTERM or SIGINT. */
static struct sample *measure(int64_t period_ns, size_t *n)
{
	uint32_t rounds = calibrate();
	struct sample *s = NULL;
	size_t cap = 0;
	struct timespec nap = {period_ns / 1000000000, period_ns % 1000000000};

	*n = 0;
	while (!stop) {
		if (nanosleep(&nap, NULL) != 0 && stop)
			break;
		long sw = switches();
		int64_t t0 = hist_now_ns();
		work(rounds);
		int64_t t1 = hist_now_ns();
		add_sample(&s, n, &cap, (struct sample){t0, t1 - t0 > INT32_MAX ? INT32_MAX : (int32_t)(t1 - t0),
							 switches() != sw});
	}
	return s;
}

/* Reads samples ("START_NS NS SWITCHED" lines) from path; NULL with *n = 0 on error. */
static struct sample *replay(const char *path, size_t *n)
{
	FILE *in = fopen(path, "r");
	struct sample *s = NULL;
	size_t cap = 0;
	long long t, ns;
	int sw;

	*n = 0;
	if (!in)
		return NULL;
	while (fscanf(in, "%lld %lld %d", &t, &ns, &sw) == 3)
		add_sample(&s, n, &cap, (struct sample){t, ns > INT32_MAX ? INT32_MAX : (int32_t)ns, sw != 0});
	bool bad = !feof(in);
	fclose(in);
	if (bad) {
		free(s);
		*n = 0;
		return NULL;
	}
	return s;
}

static void __attribute__((noreturn)) usage(int status)
{
	fprintf(status ? stderr : stdout,
		"Usage: vm-probe [-p PERIOD_MS] [-o FILE] [-r SAMPLES]\n"
		"Time a ~20 us loop every PERIOD_MS (default 5) until SIGTERM or SIGINT, then write\n"
		"the spells in which it ran %d times slower than usual or worse without being\n"
		"switched out (the machine itself running slow) to FILE (default: standard output).\n"
		"-r replays SAMPLES (lines \"START_NS NS SWITCHED\") instead of measuring.\n",
		SLOW_FACTOR);
	exit(status);
}

int main(int argc, char **argv)
{
	double period_ms = 5;
	const char *out = NULL, *samples = NULL;
	int c;

	while ((c = getopt(argc, argv, "p:o:r:h")) != -1) {
		char *end;
		switch (c) {
		case 'p':
			period_ms = strtod(optarg, &end);
			if (*end || !(period_ms >= 0.1 && period_ms <= 10000))
				usage(2);
			break;
		case 'o': out = optarg; break;
		case 'r': samples = optarg; break;
		case 'h': usage(0);
		default: usage(2);
		}
	}
	if (optind < argc)
		usage(2);
	FILE *f = out ? fopen(out, "w") : stdout;
	if (!f) {
		fprintf(stderr, "vm-probe: %s: %s\n", out, strerror(errno));
		return 1;
	}
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal; /* no SA_RESTART: the sleep ends at once */
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	int64_t period_ns = (int64_t)(period_ms * 1e6);
	size_t n;
	struct sample *s;
	if (samples) {
		errno = 0;
		s = replay(samples, &n);
		if (!s) {
			fprintf(stderr, "vm-probe: %s: %s\n", samples,
				errno ? strerror(errno) : "not lines of \"START_NS NS SWITCHED\"");
			return 1;
		}
	} else {
		s = measure(period_ns, &n);
	}

	/* The usual time: the median of the undisturbed samples. */
	int32_t *quiet = malloc((n ? n : 1) * sizeof(*quiet));
	if (!quiet)
		abort();
	size_t nq = 0;
	for (size_t i = 0; i < n; i++)
		if (!s[i].switched)
			quiet[nq++] = s[i].ns;
	qsort(quiet, nq, sizeof(*quiet), by_ns);
	int64_t usual = nq ? quiet[nq / 2] : 0;
	free(quiet);

	/* The slow samples, merged into spells. */
	size_t slow = 0, spells = 0;
	int64_t covered = 0, gap = (int64_t)(SPELL_GAP * period_ns);
	struct spell {
		int64_t start, end;
		size_t samples;
		double worst;
	} *sp = malloc((n ? n : 1) * sizeof(*sp));
	if (!sp)
		abort();
	for (size_t i = 0; i < n && usual > 0; i++) {
		if (s[i].switched || s[i].ns < SLOW_FACTOR * usual)
			continue;
		slow++;
		double ratio = (double)s[i].ns / (double)usual;
		int64_t end = s[i].start_ns + s[i].ns;
		if (spells && s[i].start_ns - sp[spells - 1].end <= gap) {
			struct spell *p = &sp[spells - 1];
			p->end = end;
			p->samples++;
			if (ratio > p->worst)
				p->worst = ratio;
		} else {
			sp[spells++] = (struct spell){s[i].start_ns, end, 1, ratio};
		}
	}
	for (size_t i = 0; i < spells; i++)
		covered += sp[i].end - sp[i].start;
	int64_t span = n > 1 ? s[n - 1].start_ns + s[n - 1].ns - s[0].start_ns : 0;
	fprintf(f,
		"# vm-probe: period %g ms, loop %.1f us, %zu samples over %.1f s, %zu slow, %zu spells "
		"covering %.2f%% of the time\n",
		period_ms, usual / 1e3, n, span / 1e9, slow, spells, span > 0 ? 100.0 * covered / span : 0.0);
	if (n)
		fprintf(f, "span %lld %lld\n", (long long)s[0].start_ns,
			(long long)(s[n - 1].start_ns + s[n - 1].ns));
	for (size_t i = 0; i < spells; i++)
		fprintf(f, "spell %lld %lld %zu %.1f\n", (long long)sp[i].start, (long long)sp[i].end,
			sp[i].samples, sp[i].worst);
	free(sp);
	free(s);
	if (fflush(f) != 0 || ferror(f) || (out && fclose(f) != 0)) {
		fprintf(stderr, "vm-probe: %s: %s\n", out ? out : "standard output", strerror(errno));
		return 1;
	}
	return 0;
}
