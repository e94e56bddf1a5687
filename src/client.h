/* client: what the kbridge CLI's calls share on the gRPC core client side. Any thread. */
#ifndef KB_CLIENT_H
#define KB_CLIENT_H

#include <grpc/grpc.h>

/* A call's final status, as RECV_STATUS_ON_CLIENT fills it in. */
struct status {
	grpc_metadata_array trailing; /* elements belong to the call: read before unref */
	grpc_status_code code;
	grpc_slice details;
};

void status_init(struct status *st);
void status_destroy(struct status *st);
/* The RECV_STATUS_ON_CLIENT op that fills st; st must live until the batch completes. */
grpc_op status_op(struct status *st);

#endif
