/* tap.h: the few test helpers our unit tests need. Output is TAP; the exit status is
 * what automake's test driver reads. */
#ifndef KB_TAP_H
#define KB_TAP_H

#include <stdio.h>
#include <string.h>

static int tap_n, tap_failed;

#define ok(cond, ...)                                                          \
	do {                                                                   \
		int ok_ = !!(cond);                                            \
		tap_n++;                                                       \
		if (!ok_)                                                      \
			tap_failed++;                                          \
		printf("%sok %d - ", ok_ ? "" : "not ", tap_n);                \
		printf(__VA_ARGS__);                                           \
		printf("\n");                                                  \
		if (!ok_)                                                      \
			printf("#   failed at %s:%d: %s\n", __FILE__, __LINE__, #cond); \
	} while (0)

static inline int contains(const char *haystack, const char *needle)
{
	return haystack && strstr(haystack, needle) != NULL;
}

static inline int tap_done(void)
{
	printf("1..%d\n", tap_n);
	if (tap_failed)
		printf("# %d of %d failed\n", tap_failed, tap_n);
	return tap_failed ? 1 : 0;
}

#endif
