#include "config.h"

#include <grpc/slice.h>

#include "client.h"

void status_init(struct status *st)
{
	grpc_metadata_array_init(&st->trailing);
	st->code = GRPC_STATUS_UNKNOWN;
	st->details = grpc_empty_slice();
}

void status_destroy(struct status *st)
{
	grpc_metadata_array_destroy(&st->trailing);
	grpc_slice_unref(st->details);
}

grpc_op status_op(struct status *st)
{
	return (grpc_op){.op = GRPC_OP_RECV_STATUS_ON_CLIENT,
			 .data.recv_status_on_client = {.trailing_metadata = &st->trailing,
							.status = &st->code,
							.status_details = &st->details}};
}
