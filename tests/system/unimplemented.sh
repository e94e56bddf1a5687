#!/bin/bash
# What is not served answers UNIMPLEMENTED at once, not at the client's
# deadline (a hang would end with DEADLINE_EXCEEDED, a distinct code):
# - Subscribe with start=TIMESTAMP, with positions, or with a group (for now),
#   each with a message naming what is missing;
# - an unknown method of the Bridge service and of an unknown service, called
#   as unary, client-streaming, server-streaming and bidi calls;
# while Produce, PublishStream and ListTopics are served (OK), and the daemon
# keeps serving afterwards.
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc

mock_start u:1
kbridged_conf
kbridged_start

for m in produce publish-stream list-topics; do
	py rpc "$m" --topic u --timeout 10 >"$T/$m.json" ||
		fail "$m: $(cat "$T/$m.json")"
	ok "$m answers OK"
done

# SubscribeRequest messages, encoded by the generated Python module.
subscribe_hex() {
	PYTHONPATH="$PYGEN" "$PYTHON3" -c 'import sys
from kbridge.v1 import bridge_pb2 as pb
r = pb.SubscribeRequest(topics=["u"])
what = sys.argv[1]
if what == "timestamp":
    r.start = pb.SubscribeRequest.TIMESTAMP
    r.start_timestamp_ms = 1
elif what == "positions":
    r.positions.add(topic="u", partition=0, offset=0)
else:
    r.group = "g1"
print(r.SerializeToString().hex())' "$1"
}
for what in timestamp positions group; do
	py raw --method /kbridge.v1.Bridge/Subscribe --kind server-stream \
		--hex "$(subscribe_hex "$what")" --timeout 10 --expect UNIMPLEMENTED >"$T/sub-$what.json" ||
		fail "Subscribe with $what: $(cat "$T/sub-$what.json")"
	case $what in
	timestamp) word=TIMESTAMP ;;
	positions) word=positions ;;
	group) word=group ;;
	esac
	grep -q "$word" "$T/sub-$what.json" ||
		fail "Subscribe with $what: the message does not say what is missing: $(cat "$T/sub-$what.json")"
	ok "Subscribe with $what answers UNIMPLEMENTED: $(json_get "$T/sub-$what.json" 'r["details"]')"
done

for method in /kbridge.v1.Bridge/Nope /no.Such/Method; do
	for kind in unary client-stream server-stream bidi; do
		py raw --method "$method" --kind "$kind" --hex 0a0161 --timeout 10 \
			--expect UNIMPLEMENTED >"$T/raw.json" ||
			fail "$method as a $kind call: $(cat "$T/raw.json")"
		ok "$method as a $kind call answers UNIMPLEMENTED"
	done
done

# The three calls above published one record each ("rpc"); the daemon still serves.
py publish --topic u --records 10 --per-request 5 >"$T/pub.json" ||
	fail "publish after the unimplemented calls: $(cat "$T/pub.json")"
expect_eq "$(json_get "$T/pub.json" 'r["records"]')" 10 "records published afterwards"
expect_eq "$(kcat_read u -f '%s\n' | wc -l)" 12 "records in kafka (2 from Produce and PublishStream, 10 published)"
rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
