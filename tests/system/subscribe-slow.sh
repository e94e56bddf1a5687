#!/bin/bash
# A stalled subscriber does not hold up the others, and loses nothing:
# - four LATEST subscribers of one topic (subscribe.buffer_records = 100);
#   one stops reading after its first 50 or so records and holds its stream open
#   (a small HTTP/2 window, so that it pushes back on the daemon at once);
# - 20,000 records of 200 bytes (4 MB: far more than fits in the buffers
#   between the daemon and the stalled client, and under the mock's 5 MB
#   retention per partition) are published: the three others receive every one,
#   exactly once and in order, while the stalled one is still stalled (it has
#   not been told to resume; the test checks that it is alive and has printed
#   only its first records): the shared read was not held up by its full buffer;
# - then the stalled one resumes and also receives every record exactly once
#   (it was moved to a catch-up reader from its own position and came back).
# No timing thresholds: "not held up" is "finished while the other is stalled".
# The daemon's debug log must show the move to a catch-up reader and back.
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc

RECORDS=20000
mock_start slow:3
notify_listen
# debug: the daemon logs when a subscriber moves to a catch-up reader and back.
kbridged_conf 'subscribe = { buffer_records = 100; max_batch = 50; };' 'log_level = "debug";'
kbridged_start

wait_ready() { # PID ERRFILE
	local i
	for ((i = 0; i < 300; i++)); do
		grep -q '^READY$' "$2" && return 0
		kill -0 "$1" 2>/dev/null || fail "subscriber exited before READY: $(cat "$2")"
		sleep 0.1
	done
	fail "subscriber got no initial metadata within 30 s"
}

check_all() { check_each_once "$1" "$2" "$RECORDS"; }

RESUME="$T/resume"
py subscribe --topic slow --stall-after 50 --resume-file "$RESUME" --count "$RECORDS" \
	--timeout 180 --result "$T/stalled.json" >"$T/stalled.jsonl" 2>"$T/stalled.err" &
STALLED=$!
wait_ready "$STALLED" "$T/stalled.err"
READERS=()
for i in 1 2 3; do
	py subscribe --topic slow --count "$RECORDS" --timeout 180 --result "$T/reader$i.json" \
		>"$T/reader$i.jsonl" 2>"$T/reader$i.err" &
	READERS+=($!)
	wait_ready "$!" "$T/reader$i.err"
done
ok "four subscribers ready"

py publish --topic slow --records "$RECORDS" --size 200 --per-request 200 --key-prefix s- \
	>"$T/pub.json" || fail "publish: $(cat "$T/pub.json")"
ok "published $RECORDS records of 200 bytes"

for i in 1 2 3; do
	wait "${READERS[$((i - 1))]}" || fail "reader $i: $(cat "$T/reader$i.err")"
done
# Now, before the stalled one may resume: it is still there, and stalled.
kill -0 "$STALLED" 2>/dev/null || fail "the stalled subscriber ended: $(cat "$T/stalled.err")"
N=$(sed -n 's/^STALLED //p' "$T/stalled.err")
test -n "$N" || fail "the subscriber did not stall: $(cat "$T/stalled.err")"
grep -q '^RESUMED$' "$T/stalled.err" && fail "test bug: the stalled subscriber resumed early"
# It stops after the response that brought it to 50 records or more.
test "$N" -ge 50 && test "$N" -lt "$RECORDS" || fail "the subscriber stalled after $N records"
expect_eq "$(wc -l <"$T/stalled.jsonl")" "$N" "records printed by the stalled subscriber so far"
ok "the three readers finished while the fourth subscriber was stalled"
for i in 1 2 3; do
	check_all "reader $i got all $RECORDS records exactly once, in order" "$T/reader$i.jsonl"
done
# While it is stalled the daemon still counts it (its stream is open), and it
# was moved off the shared read.
notify_wait "^STATUS=.* 1 subscriptions" 30
log_has 'fell behind the shared read of slow: catching up on its own'

touch "$RESUME"
wait "$STALLED" || fail "the stalled subscriber after resuming: $(cat "$T/stalled.err")"
grep -q '^RESUMED$' "$T/stalled.err" || fail "no RESUMED line: $(cat "$T/stalled.err")"
check_all "the stalled subscriber, resumed, got all $RECORDS records exactly once, in order" \
	"$T/stalled.jsonl"
log_has 'catch-up reader slow: caught up, handed over to the shared reader'

rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
