#!/bin/bash
# Retention deletes records under a stalled subscriber: never a silent gap.
# - a LATEST subscriber (subscribe.buffer_records = 50) stops reading after its
#   first records and holds its stream open; it is moved off the shared read to
#   a catch-up reader at its position;
# - 10,000 records of 1 KB go to a one-partition topic (the first 500 before the
#   subscriber stalls, the rest after it left the shared read): 10 MB, twice the mock's
#   retention (about 5 MB per partition), so the records after the stalled
#   subscriber's position are deleted;
# - the subscriber stays stalled until the shared reader, idle without it, has
#   stopped (the catch-up reader must then not restart a shared read at an offset
#   that is gone: librdkafka would jump to the earliest record without a word);
# - it resumes: the stream ends with DATA_LOSS and kbridge-positions, after
#   records that are contiguous from its first one;
# - subscribing again from those positions says in kbridge-skipped exactly which
#   offsets are gone and delivers everything after them, to the end.
# Across the two streams and the skipped range every offset appears exactly once.
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc

RECORDS=10000
mock_start gone:1
kbridged_conf 'subscribe = { buffer_records = 50; max_batch = 10; };' 'log_level = "debug";'
kbridged_start

RESUME="$T/resume"
py subscribe --topic gone --stall-after 10 --resume-file "$RESUME" --timeout 180 --idle 15 \
	--expect DATA_LOSS --result "$T/first.json" >"$T/first.jsonl" 2>"$T/first.err" &
FIRST=$!
wait_until 30 "the subscriber's initial metadata" grep -q '^READY$' "$T/first.err"

# First a few records, well within retention, until the subscriber has stalled and left
# the shared read; only then the bulk. (Published at once, the bulk could outrun the
# shared reader while it still waited for the stalling subscriber, and retention would
# delete the shared reader's next records: a DATA_LOSS of the shared read, not the
# catch-up reader's this test is about.)
FEW=500
py publish --topic gone --records $FEW --size 1000 --per-request 100 --key-prefix f- \
	>"$T/pub-few.json" || fail "publish: $(cat "$T/pub-few.json")"
wait_until 30 "the subscriber to stall" grep -q '^STALLED' "$T/first.err"
wait_until 30 "the stalled subscriber to leave the shared read" \
	grep -q 'fell behind the shared read of gone: catching up on its own' "$T/kbridged.log"
py publish --topic gone --records $((RECORDS - FEW)) --size 1000 --per-request 100 --key-prefix g- \
	>"$T/pub.json" || fail "publish: $(cat "$T/pub.json")"
ok "published $RECORDS records of 1 KB"
# Nobody else reads the topic: the shared reader stops after its idle time.
wait_until 60 "the idle shared reader to stop" grep -q 'shared reader for gone stopped' "$T/kbridged.log"
ok "the shared reader stopped while the subscriber was stalled"

touch "$RESUME"
wait "$FIRST" || fail "first stream: $(cat "$T/first.err")"
ok "the first stream ended with DATA_LOSS"

# positions ARG FILE FIELD: "--position T:P:O" for each entry of FIELD.
position_args() {
	"$PYTHON3" -c 'import json, sys
for p in json.load(open(sys.argv[1]))[sys.argv[2]] or []:
    print("--position", p)' "$1" "$2"
}
test -n "$(position_args "$T/first.json" positions)" ||
	fail "no kbridge-positions on the DATA_LOSS stream: $(cat "$T/first.json")"
# shellcheck disable=SC2046 # one word each
py subscribe --topic gone $(position_args "$T/first.json" positions) --idle 5 \
	--result "$T/second.json" >"$T/second.jsonl" 2>"$T/second.err" ||
	fail "second stream: $(cat "$T/second.err")"

check_py "every offset once: first stream, then the skipped range, then the second stream" \
	"$T/first.json" "$T/first.jsonl" "$T/second.json" "$T/second.jsonl" "$RECORDS" <<'EOF'
import json, sys
first, first_recs, second, second_recs = (json.load(open(sys.argv[1])), open(sys.argv[2]),
                                          json.load(open(sys.argv[3])), open(sys.argv[4]))
n = int(sys.argv[5])

def run(lines, what):
    offs = [json.loads(l)["offset"] for l in lines if l.strip()]
    assert offs, f"{what}: no records"
    gaps = [(a, b) for a, b in zip(offs, offs[1:]) if b != a + 1]
    assert not gaps, f"{what}: offsets not contiguous at {gaps[:3]} (a silent gap)"
    return offs[0], offs[-1]

a0, a1 = run(first_recs, "first stream")
assert first["positions"] == [f"gone:0:{a1 + 1}"], \
    f"kbridge-positions {first['positions']}, want gone:0:{a1 + 1}"
b0, b1 = run(second_recs, "second stream")
assert second["skipped"] == [f"gone:0:{a1 + 1}-{b0 - 1}"], \
    f"kbridge-skipped {second['skipped']}, want gone:0:{a1 + 1}-{b0 - 1}"
assert b0 > a1 + 1, "nothing was deleted: the test did not test anything"
assert b1 == n - 1, f"the second stream ended at offset {b1}, want {n - 1}"
print(f"  first stream {a0}..{a1}, skipped {a1 + 1}..{b0 - 1}, second stream {b0}..{b1}")
EOF

rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
