/* status: librdkafka errors mapped to gRPC status codes. Any thread. */
#ifndef KB_STATUS_H
#define KB_STATUS_H

#include <grpc/status.h>
#include <librdkafka/rdkafka.h>

/* The gRPC status a client sees when Kafka answered err for its record. */
grpc_status_code status_from_kafka(rd_kafka_resp_err_t err);
/* "OK", "INVALID_ARGUMENT", ... */
const char *status_name(grpc_status_code code);

#endif
