/* log: leveled logging to stderr with sd-daemon priority prefixes ("<3>"), so journald
 * keeps the levels; on a terminal the prefix is a word instead. gRPC's and librdkafka's
 * own logs are routed here too. Any thread; each line is one write(2). */
#ifndef KB_LOG_H
#define KB_LOG_H

#include <syslog.h>

struct rd_kafka_s;

/* Sets the program name shown on each line and routes gRPC's log into ours. */
void log_init(const char *progname);
/* Lines above this priority (LOG_ERR .. LOG_DEBUG) are dropped. */
void log_set_level(int level);
int log_get_level(void);
/* Parses "error", "warning", "notice", "info" or "debug"; -1 when unknown. */
int log_level_parse(const char *name);

void log_msg(int prio, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define log_error(...) log_msg(LOG_ERR, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARNING, __VA_ARGS__)
#define log_notice(...) log_msg(LOG_NOTICE, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_enabled(prio) ((prio) <= log_get_level())

/* librdkafka log_cb: set it with rd_kafka_conf_set_log_cb(). */
void log_rdkafka(const struct rd_kafka_s *rk, int level, const char *fac, const char *buf);
/* The same, without librdkafka's configuration warnings (facility CONFWARN). */
void log_rdkafka_quiet(const struct rd_kafka_s *rk, int level, const char *fac, const char *buf);

#endif
