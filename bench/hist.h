/* hist: latency histogram in log-linear buckets (HdrHistogram's layout, simplified), shared
 * by `kbridge bench` and the comparison programs in bench/ so that they report alike.
 *
 * Values are nanoseconds. Below 2^HIST_SUB_BITS each value has its own bucket; above, every
 * power of two is split into 2^HIST_SUB_BITS buckets, so a reported percentile is within
 * 1/128 (0.8%) of the true sample. Not thread-safe: one writer, or merge per-thread ones. */
#ifndef KB_HIST_H
#define KB_HIST_H

#include <stdint.h>
#include <stdio.h>

#define HIST_SUB_BITS 7

struct hist {
	uint64_t *buckets;
	uint64_t count;
	uint64_t max;
};

void hist_init(struct hist *h);
void hist_destroy(struct hist *h);
void hist_add(struct hist *h, int64_t ns);
/* Adds every sample of src to dst. */
void hist_merge(struct hist *dst, const struct hist *src);
/* The value (ns) at or below which `pct` percent of the samples lie; 0 when empty. */
uint64_t hist_percentile(const struct hist *h, double pct);

/* Prints `"name": {"count": N, "p50": .., "p90": .., "p99": .., "p999": .., "max": ..}`
 * with the values in microseconds. */
void hist_print_json(FILE *f, const char *name, const struct hist *h);
/* Prints "p50 X  p90 X  p99 X  p99.9 X  max X" with units chosen for the values. */
void hist_print_text(FILE *f, const struct hist *h);

/* A log of the slow samples: one line "START_NS LATENCY_NS" for every sample of at least
 * min_ns, START_NS on CLOCK_MONOTONIC, so that bench/run can set them beside
 * bench/vm-probe's slow spells. One writer. */
struct slowlog {
	FILE *f;
	int64_t min_ns;
	uint64_t lines;
};

/* Opens path for writing (truncates it); -1 with errno set when it cannot. */
int slowlog_open(struct slowlog *s, const char *path, int64_t min_ns);
/* Logs the sample when the log is open and latency_ns >= min_ns. */
void slowlog_add(struct slowlog *s, int64_t start_ns, int64_t latency_ns);
/* Closes the log (if open); -1 with errno set when a write failed. */
int slowlog_close(struct slowlog *s);

/* Nanoseconds on CLOCK_MONOTONIC: the same clock in every process of the machine. */
int64_t hist_now_ns(void);
/* Sleeps until hist_now_ns() reaches ns (to the clock's precision, not whole ms). */
void hist_sleep_until(int64_t ns);

#endif
