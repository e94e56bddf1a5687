/* topics: what Kafka says about topics — the ListTopics RPC (the whole list, cached for a
 * few seconds) and the per-topic cache the publish path checks records against.
 *
 * Threads and locks: topics_handle runs on a completion-queue thread and hands the work
 * to a short-lived worker thread, so that a slow or absent Kafka never holds a
 * completion-queue thread. cache_lock guards the cached answer; fetch_lock lets one
 * worker at a time ask Kafka, the others then find the fresh answer. table_lock (a
 * read-write lock) guards the per-topic cache; no other lock is taken under it. */
#ifndef KB_TOPICS_H
#define KB_TOPICS_H

#include "server.h"

/* The partition count of topic: > 0, or 0 when Kafka says the topic does not exist, or -1
 * when Kafka could not be asked (let the producer decide). Cached: 30 s for a topic that
 * exists, 1 s for one that does not; a miss asks Kafka and may block up to 5 s, so it
 * happens once per topic, not per record. Any thread. */
int topics_partitions(const char *topic);
/* Forgets what is cached about topic (Kafka reported the topic or a partition unknown). */
void topics_invalidate(const char *topic);

/* Serves a new ListTopics call; takes ownership of everything in in. */
void topics_handle(struct incoming *in);
/* Waits for running workers and forgets the cached answer; before producer_shutdown. */
void topics_shutdown(void);

#endif
