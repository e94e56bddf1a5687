#!/bin/bash
# subscribe.buffer_bytes bounds a subscriber's buffer in bytes, whatever
# subscribe.buffer_records allows:
# - buffer_records = 100000 (room for every record of the test) but
#   buffer_bytes = 64 KiB; a LATEST subscriber stops reading after its first
#   records and holds its stream open, another one reads on;
# - 3,000 records of 1 KB are published: the reader gets every one while the
#   stalled one is still stalled, and the stalled one was moved off the shared
#   read (its 64 KiB filled up after about 60 records; by record count alone it
#   would have kept all 3,000 and never moved);
# - the stalled one resumes and also gets every record exactly once.
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc

RECORDS=3000
mock_start bb:2
kbridged_conf 'subscribe = { buffer_records = 100000; buffer_bytes = 65536; max_batch = 10; };' \
	'log_level = "debug";'
kbridged_start

RESUME="$T/resume"
py subscribe --topic bb --stall-after 10 --resume-file "$RESUME" --count "$RECORDS" --timeout 120 \
	--result "$T/stalled.json" >"$T/stalled.jsonl" 2>"$T/stalled.err" &
STALLED=$!
py subscribe --topic bb --count "$RECORDS" --timeout 120 --result "$T/reader.json" \
	>"$T/reader.jsonl" 2>"$T/reader.err" &
READER=$!
wait_until 30 "both subscribers' initial metadata" \
	eval 'grep -q "^READY$" "$T/stalled.err" && grep -q "^READY$" "$T/reader.err"'

py publish --topic bb --records "$RECORDS" --size 1000 --per-request 50 --key-prefix b- \
	>"$T/pub.json" || fail "publish: $(cat "$T/pub.json")"
wait "$READER" || fail "reader: $(cat "$T/reader.err")"
kill -0 "$STALLED" 2>/dev/null || fail "the stalled subscriber ended: $(cat "$T/stalled.err")"
grep -q '^RESUMED$' "$T/stalled.err" && fail "test bug: the stalled subscriber resumed early"
ok "the reader finished while the other subscriber was stalled"
log_has 'fell behind the shared read of bb: catching up on its own'

touch "$RESUME"
wait "$STALLED" || fail "the stalled subscriber after resuming: $(cat "$T/stalled.err")"

for who in reader stalled; do
	check_each_once "$who: every record exactly once, offsets rising by one per partition" \
		"$T/$who.jsonl" "$RECORDS"
done

rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
