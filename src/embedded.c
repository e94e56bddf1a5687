/* Threads and locks: main thread only; the mock cluster runs its own thread. */
#include "config.h"

#include <stddef.h>
#include <stdio.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "embedded.h"
#include "log.h"

static rd_kafka_t *host; /* the mock cluster lives inside this handle */
static rd_kafka_mock_cluster_t *cluster;

const char *embedded_init(int n, char *errmsg, size_t errsize)
{
	rd_kafka_conf_t *kc = rd_kafka_conf_new();

	/* This handle only hosts the cluster: its warning about having no brokers is noise. */
	rd_kafka_conf_set_log_cb(kc, log_rdkafka_quiet);
	/* The mock brokers' accepted connections take their socket options from this handle:
	 * without Nagle, as a Kafka broker's. */
	if (rd_kafka_conf_set(kc, "client.id", "kbridged-embedded", errmsg, errsize) != RD_KAFKA_CONF_OK ||
	    rd_kafka_conf_set(kc, "socket.nagle.disable", "true", errmsg, errsize) != RD_KAFKA_CONF_OK) {
		rd_kafka_conf_destroy(kc);
		return NULL;
	}
	host = rd_kafka_new(RD_KAFKA_PRODUCER, kc, errmsg, errsize);
	if (!host) {
		rd_kafka_conf_destroy(kc);
		return NULL;
	}
	cluster = rd_kafka_mock_cluster_new(host, n);
	if (!cluster) {
		snprintf(errmsg, errsize, "cannot start the embedded mock Kafka cluster");
		rd_kafka_destroy(host);
		host = NULL;
		return NULL;
	}
	/* The mock answers Metadata up to v2 by default, and before v4 a metadata request
	 * creates every topic it names. From v4 on, clients say whether they want that:
	 * the producer does (topics appear on first publish), subscribers do not. */
	rd_kafka_mock_set_apiversion(cluster, 3 /* Metadata */, 0, 4);
	return rd_kafka_mock_cluster_bootstraps(cluster);
}

void embedded_shutdown(void)
{
	if (cluster)
		rd_kafka_mock_cluster_destroy(cluster);
	if (host)
		rd_kafka_destroy(host);
	cluster = NULL;
	host = NULL;
}
