/* util: allocation that aborts on failure, clocks, small helpers. Any thread. */
#ifndef KB_UTIL_H
#define KB_UTIL_H

#include <stddef.h>
#include <stdint.h>

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define UNUSED __attribute__((unused))

/* malloc/calloc/realloc/strdup that abort the process when memory is exhausted. */
void *xmalloc(size_t n);
void *xcalloc(size_t nmemb, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);
/* asprintf that aborts on failure; the caller frees the result. */
char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Milliseconds on CLOCK_MONOTONIC. */
int64_t now_ms(void);
/* Milliseconds on CLOCK_MONOTONIC_COARSE: the last tick's time (a few ms behind
 * now_ms), read without touching the hardware clock. For per-request paths that need only
 * tick accuracy (expiry, heartbeats): clock_gettime(CLOCK_MONOTONIC) was 6% of kbridged's
 * CPU at one record per request. */
int64_t now_ms_coarse(void);
/* Microseconds on CLOCK_MONOTONIC. */
int64_t now_us(void);

#endif
