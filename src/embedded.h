/* embedded: kafka.brokers = "embedded" — librdkafka's mock cluster inside the daemon.
 * Memory only: nothing is durable. For trying kbridge out and for tests. Main thread only. */
#ifndef KB_EMBEDDED_H
#define KB_EMBEDDED_H

/* Starts a mock cluster of n brokers. Returns its bootstrap servers (owned by the module),
 * or NULL with errmsg filled in. */
const char *embedded_init(int n, char *errmsg, size_t errsize);
/* Stops the cluster (after every client of it is gone). */
void embedded_shutdown(void);

#endif
