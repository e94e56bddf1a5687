/* hist: see hist.h. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hist.h"

#define SUB (1u << HIST_SUB_BITS)
/* Buckets for every uint64_t: the exact ones, then SUB per remaining power of two. */
#define N_BUCKETS ((64 - HIST_SUB_BITS + 1) * SUB)

static size_t bucket_of(uint64_t v)
{
	if (v < SUB)
		return v;
	int shift = 63 - __builtin_clzll(v) - HIST_SUB_BITS;
	return (size_t)(shift + 1) * SUB + ((v >> shift) - SUB);
}

/* The middle of bucket i, as its representative value. */
static uint64_t bucket_value(size_t i)
{
	if (i < 2 * SUB)
		return i;
	int shift = (int)(i / SUB) - 1;
	uint64_t low = (uint64_t)(i % SUB + SUB) << shift;
	return low + (((uint64_t)1 << shift) >> 1);
}

void hist_init(struct hist *h)
{
	h->buckets = calloc(N_BUCKETS, sizeof(*h->buckets));
	if (!h->buckets)
		abort();
	h->count = 0;
	h->max = 0;
}

void hist_destroy(struct hist *h)
{
	free(h->buckets);
	h->buckets = NULL;
}

void hist_add(struct hist *h, int64_t ns)
{
	uint64_t v = ns > 0 ? (uint64_t)ns : 0;

	h->buckets[bucket_of(v)]++;
	h->count++;
	if (v > h->max)
		h->max = v;
}

void hist_merge(struct hist *dst, const struct hist *src)
{
	for (size_t i = 0; i < N_BUCKETS; i++)
		dst->buckets[i] += src->buckets[i];
	dst->count += src->count;
	if (src->max > dst->max)
		dst->max = src->max;
}

uint64_t hist_percentile(const struct hist *h, double pct)
{
	if (h->count == 0)
		return 0;
	/* The rank of the sample that the percentile names, from 1. */
	uint64_t rank = (uint64_t)(pct / 100.0 * (double)h->count + 0.999999);
	if (rank < 1)
		rank = 1;
	if (rank > h->count)
		rank = h->count;
	uint64_t seen = 0;
	for (size_t i = 0; i < N_BUCKETS; i++) {
		seen += h->buckets[i];
		if (seen >= rank) {
			uint64_t v = bucket_value(i);
			return v < h->max ? v : h->max;
		}
	}
	return h->max;
}

void hist_print_json(FILE *f, const char *name, const struct hist *h)
{
	fprintf(f, "\"%s\": {\"count\": %llu, \"p50\": %.1f, \"p90\": %.1f, \"p99\": %.1f, "
		"\"p999\": %.1f, \"max\": %.1f}", name, (unsigned long long)h->count,
		hist_percentile(h, 50) / 1e3, hist_percentile(h, 90) / 1e3, hist_percentile(h, 99) / 1e3,
		hist_percentile(h, 99.9) / 1e3, h->max / 1e3);
}

static void print_duration(FILE *f, const char *label, uint64_t ns)
{
	if (ns >= 10000000)
		fprintf(f, "%s %.1f ms", label, ns / 1e6);
	else if (ns >= 1000000)
		fprintf(f, "%s %.2f ms", label, ns / 1e6);
	else
		fprintf(f, "%s %.0f us", label, ns / 1e3);
}

void hist_print_text(FILE *f, const struct hist *h)
{
	print_duration(f, "p50", hist_percentile(h, 50));
	print_duration(f, "  p90", hist_percentile(h, 90));
	print_duration(f, "  p99", hist_percentile(h, 99));
	print_duration(f, "  p99.9", hist_percentile(h, 99.9));
	print_duration(f, "  max", h->max);
}

int slowlog_open(struct slowlog *s, const char *path, int64_t min_ns)
{
	s->min_ns = min_ns;
	s->lines = 0;
	s->f = fopen(path, "w");
	return s->f ? 0 : -1;
}

void slowlog_add(struct slowlog *s, int64_t start_ns, int64_t latency_ns)
{
	if (!s->f || latency_ns < s->min_ns)
		return;
	fprintf(s->f, "%lld %lld\n", (long long)start_ns, (long long)latency_ns);
	s->lines++;
}

int slowlog_close(struct slowlog *s)
{
	if (!s->f)
		return 0;
	int bad = ferror(s->f);
	int rc = fclose(s->f);
	s->f = NULL;
	if (bad && rc == 0)
		errno = EIO;
	return bad || rc ? -1 : 0;
}

int64_t hist_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void hist_sleep_until(int64_t ns)
{
	struct timespec ts = {ns / 1000000000, ns % 1000000000};

	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}
