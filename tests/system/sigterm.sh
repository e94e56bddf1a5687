#!/bin/bash
# SIGTERM while a publisher streams and a subscriber listens:
# - the brokers answer after 50 ms, so calls are in flight at SIGTERM;
# - the publisher makes many short Publish calls (20 records each) and logs
#   every call answered OK; the daemon gets SIGTERM mid-run;
# - the daemon exits 0 within shutdown_timeout_ms (plus a margin);
# - every record of every acknowledged call is in Kafka, exactly once;
# - the publisher's calls end with UNAVAILABLE once the daemon drains;
# - the open subscription ends with UNAVAILABLE, after having received records.
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc
need "$KCAT"

TOPIC=st
mock_start "$TOPIC:3"
kbridged_conf 'shutdown_timeout_ms = 5000;'
kbridged_start
# Slow acks, so that publish calls are in flight when SIGTERM comes and the
# drain has real work (well below any timeout: the mock would duplicate
# records on retries after a lost ack).
for b in 1 2 3; do
	mock_ctl rtt $b 50
done

py subscribe --topic "$TOPIC" --start latest --timeout 120 --expect UNAVAILABLE \
	--result "$T/sub.json" >"$T/sub.jsonl" 2>"$T/sub.err" &
SUB=$!
wait_until 30 "the subscriber's initial metadata" grep -q '^READY$' "$T/sub.err"

: >"$T/acked.txt"
py publish --topic "$TOPIC" --records 10000000 --size 50 --per-call 20 --per-request 5 \
	--key-prefix s- --acked-log "$T/acked.txt" --expect UNAVAILABLE --timeout 60 \
	>"$T/pub.json" 2>"$T/pub.err" &
PUB=$!
acked_calls_over() { test "$(wc -l <"$T/acked.txt")" -ge "$1"; }
wait_until 60 "30 acknowledged publish calls" acked_calls_over 30
wait_until 60 "records for the subscriber" test -s "$T/sub.jsonl"
kill -0 "$PUB" 2>/dev/null || fail "the publisher stopped early: $(cat "$T/pub.json" "$T/pub.err")"

begin=$(date +%s%N)
rc=0
kbridged_stop || rc=$?
elapsed_ms=$((($(date +%s%N) - begin) / 1000000))
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
test "$elapsed_ms" -le 10000 ||
	fail "kbridged took ${elapsed_ms} ms to exit, shutdown_timeout_ms is 5000"
ok "kbridged exited ${elapsed_ms} ms after SIGTERM (shutdown_timeout_ms = 5000)"

wait "$PUB" || fail "publisher: $(cat "$T/pub.json" "$T/pub.err")"
ok "the publisher's last call ended with UNAVAILABLE ($(json_get "$T/pub.json" 'r["details"]'))"
wait "$SUB" || fail "subscriber: $(cat "$T/sub.err")"
ok "the subscription ended with UNAVAILABLE"
check_py "the subscriber received records before the end" "$T/sub.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["records"] > 0, r
EOF

# Every acknowledged record in Kafka, once; nothing there that was never sent.
kcat_read "$TOPIC" -f '%k\n' >"$T/kcat.txt"
check_py "every acknowledged record is in kafka exactly once" \
	"$T/kcat.txt" "$T/acked.txt" "$T/pub.json" <<'EOF'
import collections, json, sys
keys = open(sys.argv[1]).read().split()
acked = [tuple(map(int, l.split())) for l in open(sys.argv[2])]
pub = json.load(open(sys.argv[3]))
count = collections.Counter(int(k[2:]) for k in keys)
dups = [i for i, n in count.items() if n > 1]
assert not dups, f"{len(dups)} records are in kafka twice, e.g. {sorted(dups)[:5]}"
want = set()
for a, b in acked:
    want.update(range(a, b + 1))
assert len(want) == pub["acked_records"], f"acked log {len(want)} != result {pub['acked_records']}"
missing = want - set(count)
assert not missing, f"{len(missing)} acknowledged records are not in kafka, e.g. {sorted(missing)[:5]}"
# What was sent but not acknowledged may or may not be there, but nothing beyond.
top = max(b for a, b in acked) + 20
stray = [i for i in count if i > top]
assert not stray, f"records in kafka that were never sent: {sorted(stray)[:5]}"
print(f"{len(want)} acknowledged records, {len(keys)} in kafka", file=sys.stderr)
EOF
