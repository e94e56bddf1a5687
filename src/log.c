/* Threads and locks: any thread logs; the level is an atomic int; a line is built in a
 * stack buffer and written with one write(2), so lines from threads never interleave. */
#include "config.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <grpc/support/log.h>
#include <librdkafka/rdkafka.h>

#include "log.h"

static const char *log_progname = "kbridge";
static atomic_int log_level = LOG_INFO;
static int log_tty;

static const char *const level_names[] = {
	[LOG_EMERG] = "emerg", [LOG_ALERT] = "alert", [LOG_CRIT] = "crit", [LOG_ERR] = "error",
	[LOG_WARNING] = "warning", [LOG_NOTICE] = "notice", [LOG_INFO] = "info", [LOG_DEBUG] = "debug",
};

static void log_vmsg(int prio, const char *fmt, va_list ap)
{
	char buf[2048];
	int n;

	if (prio > atomic_load_explicit(&log_level, memory_order_relaxed))
		return;
	if (log_tty)
		n = snprintf(buf, sizeof(buf), "%s: %s: ", log_progname, level_names[prio & 7]);
	else
		n = snprintf(buf, sizeof(buf), "<%d>", prio & 7);
	if (n < 0 || (size_t)n >= sizeof(buf))
		return;
	int m = vsnprintf(buf + n, sizeof(buf) - n - 1, fmt, ap);
	if (m < 0)
		return;
	n += m;
	if ((size_t)n > sizeof(buf) - 2)
		n = sizeof(buf) - 2;
	while (n > 0 && buf[n - 1] == '\n')
		n--;
	buf[n++] = '\n';
	ssize_t unused_rc = write(STDERR_FILENO, buf, n);
	(void)unused_rc;
}

void log_msg(int prio, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	log_vmsg(prio, fmt, ap);
	va_end(ap);
}

static void log_grpc(gpr_log_func_args *args)
{
	int prio = args->severity == GPR_LOG_SEVERITY_ERROR ? LOG_ERR
		   : args->severity == GPR_LOG_SEVERITY_INFO ? LOG_INFO : LOG_DEBUG;
	const char *file = strrchr(args->file, '/');
	log_msg(prio, "grpc: %s (%s:%d)", args->message, file ? file + 1 : args->file, args->line);
}

void log_rdkafka(const struct rd_kafka_s *rk, int level, const char *fac, const char *buf)
{
	if (level < 0 || level > 7)
		level = LOG_INFO;
	/* librdkafka logs its fatal errors as LOG_EMERG, which journald would broadcast to
	 * every terminal: a Kafka client's trouble is an error of this daemon, no more. */
	if (level < LOG_ERR)
		level = LOG_ERR;
	log_msg(level, "kafka: %s: %s: %s", rk ? rd_kafka_name(rk) : "-", fac, buf);
}

void log_rdkafka_quiet(const struct rd_kafka_s *rk, int level, const char *fac, const char *buf)
{
	if (strcmp(fac, "CONFWARN") != 0)
		log_rdkafka(rk, level, fac, buf);
}

void log_init(const char *progname)
{
	log_progname = progname;
	log_tty = isatty(STDERR_FILENO);
	gpr_set_log_function(log_grpc);
	gpr_set_log_verbosity(GPR_LOG_SEVERITY_ERROR);
}

void log_set_level(int level)
{
	atomic_store(&log_level, level);
	/* gRPC's own debug output is about its internals: at most its info lines. */
	gpr_set_log_verbosity(level >= LOG_DEBUG ? GPR_LOG_SEVERITY_INFO : GPR_LOG_SEVERITY_ERROR);
}

int log_get_level(void)
{
	return atomic_load_explicit(&log_level, memory_order_relaxed);
}

int log_level_parse(const char *name)
{
	static const struct { const char *name; int level; } map[] = {
		{"error", LOG_ERR}, {"warning", LOG_WARNING}, {"notice", LOG_NOTICE},
		{"info", LOG_INFO}, {"debug", LOG_DEBUG},
	};
	for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++)
		if (strcmp(name, map[i].name) == 0)
			return map[i].level;
	return -1;
}
