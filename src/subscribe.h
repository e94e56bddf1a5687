/* subscribe: the Subscribe RPC (server streaming) — records tailed from Kafka.
 *
 * Threads and locks: subscribe_handle and batch completions on completion-queue threads;
 * the reader's callbacks on its thread; subscribe_drain on the main thread. Each call has
 * its own mutex; registry_lock is taken before a call's mutex, never after. A call's mutex
 * is taken before its reader's. */
#ifndef KB_SUBSCRIBE_H
#define KB_SUBSCRIBE_H

#include <stddef.h>

#include "conf.h"
#include "server.h"

/* Keeps c for the limits (c must outlive the module). */
void subscribe_init(const struct conf *c);
/* Serves a new Subscribe call; takes ownership of everything in in. */
void subscribe_handle(struct incoming *in);
/* Ends every subscription with UNAVAILABLE (the daemon is draining). */
void subscribe_drain(void);
/* Subscriptions alive now. */
size_t subscribe_active(void);

#endif
