/* topics: the ListTopics RPC — topic names and partition counts from Kafka's metadata,
 * cached for a few seconds.
 *
 * Threads and locks: topics_handle runs on a completion-queue thread and hands the work
 * to a short-lived worker thread, so that a slow or absent Kafka never holds a
 * completion-queue thread. cache_lock guards the cached answer; fetch_lock lets one
 * worker at a time ask Kafka, the others then find the fresh answer. */
#ifndef KB_TOPICS_H
#define KB_TOPICS_H

#include "server.h"

/* Serves a new ListTopics call; takes ownership of everything in in. */
void topics_handle(struct incoming *in);
/* Waits for running workers and forgets the cached answer; before producer_shutdown. */
void topics_shutdown(void);

#endif
