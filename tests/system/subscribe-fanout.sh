#!/bin/bash
# Fan-out:
# - 1,000 concurrent LATEST subscribers of one topic (one Python process,
#   grpc.aio, 4 connections) each receive every record of a 2,000-record
#   publish exactly once, in offset order per partition;
# - while they are connected the daemon's notify STATUS counts 1,000
#   subscriptions and 1 shared reader, and its thread count (from /proc) stays
#   under THREAD_BOUND. The bound: kbridged has about 30 threads with one
#   subscriber (3 completion-queue threads on 2 CPUs, gRPC's own, the producer's
#   librdkafka threads, and one reader = a librdkafka consumer with a thread
#   per broker plus its own thread); 60 leaves room for a few catch-up readers
#   and gRPC's thread pool, while one reader or thread per subscriber (1,000+)
#   or per handful of subscribers would be far above it;
# - subscribe.max_subscribers = 5: with 5 subscriptions open the 6th gets
#   RESOURCE_EXHAUSTED, and once they end a new one is served again.
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc

THREAD_BOUND=60
SUBSCRIBERS=1000
RECORDS=2000

mock_start fan:3
notify_listen
kbridged_conf
kbridged_start

threads() { sed -n 's/^Threads:[[:space:]]*//p' "/proc/$KBRIDGED_PID/status"; }
echo "kbridged threads before any subscriber: $(threads)"

# wait_line PID FILE ERE: until FILE has a line matching ERE (PID must live).
wait_line() {
	local i
	for ((i = 0; i < 1200; i++)); do
		grep -Eq -- "$3" "$2" && return 0
		kill -0 "$1" 2>/dev/null || fail "the client exited early: $(tail -n 5 "$2")"
		sleep 0.1
	done
	fail "no line matching /$3/ in $2 within 120 s: $(tail -n 5 "$2")"
}

py fanout --topic fan --subscribers "$SUBSCRIBERS" --channels 4 --key-prefix f- \
	--last $((RECORDS - 1)) --timeout 300 >"$T/fan.json" 2>"$T/fan.err" &
FAN=$!
wait_line "$FAN" "$T/fan.err" "^READY $SUBSCRIBERS\$"
ok "$SUBSCRIBERS subscribers have their initial metadata"

notify_wait "^STATUS=.* $SUBSCRIBERS subscriptions \\(1 shared reader" 30
N=$(threads)
test "$N" -lt "$THREAD_BOUND" ||
	fail "kbridged has $N threads with $SUBSCRIBERS subscribers connected, bound $THREAD_BOUND"
ok "kbridged has $N threads with $SUBSCRIBERS subscribers connected (bound $THREAD_BOUND)"

py publish --topic fan --records "$RECORDS" --size 50 --per-request 100 --key-prefix f- \
	>"$T/pub.json" || fail "publish: $(cat "$T/pub.json")"
wait "$FAN" || fail "fan-out: $(cat "$T/fan.json") $(tail -n 3 "$T/fan.err")"
expect_eq "$(json_get "$T/fan.json" 'r["complete"]')" "$SUBSCRIBERS" \
	"subscribers that got all $RECORDS records exactly once, in order"
N=$(threads)
test "$N" -lt "$THREAD_BOUND" || fail "kbridged has $N threads after the fan-out, bound $THREAD_BOUND"
ok "kbridged has $N threads after the fan-out (bound $THREAD_BOUND)"

# --- max_subscribers ---
rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
kbridged_conf 'subscribe = { max_subscribers = 5; };'
kbridged_start
py fanout --topic fan --subscribers 5 --channels 1 --key-prefix m- --last 9 --timeout 120 \
	>"$T/five.json" 2>"$T/five.err" &
FIVE=$!
wait_line "$FIVE" "$T/five.err" "^READY 5\$"
py subscribe --topic fan --timeout 30 --expect RESOURCE_EXHAUSTED --result "$T/sixth.json" \
	>/dev/null 2>"$T/sixth.err" || fail "the 6th subscriber: $(cat "$T/sixth.err")"
grep -q max_subscribers "$T/sixth.json" ||
	fail "the message does not name subscribe.max_subscribers: $(cat "$T/sixth.json")"
ok "the 6th subscriber gets RESOURCE_EXHAUSTED: $(json_get "$T/sixth.json" 'r["details"]')"
py publish --topic fan --records 10 --size 50 --key-prefix m- >"$T/pub2.json" ||
	fail "publish: $(cat "$T/pub2.json")"
wait "$FIVE" || fail "the 5 subscribers: $(cat "$T/five.json")"
expect_eq "$(json_get "$T/five.json" 'r["complete"]')" 5 "of the 5 admitted subscribers, those that got every record"
# Their slots are free again once the daemon has seen them go.
again() {
	py subscribe --topic fan --idle 0.2 --timeout 10 >/dev/null 2>"$T/again.err"
}
wait_until 30 "a new subscriber admitted after the 5 ended" again
ok "a new subscriber is admitted once the 5 have ended"

rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
