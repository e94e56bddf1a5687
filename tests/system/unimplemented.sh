#!/bin/bash
# What is not served answers UNIMPLEMENTED at once, not at the client's
# deadline (a hang would end with DEADLINE_EXCEEDED, a distinct code):
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
