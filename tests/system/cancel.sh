#!/bin/bash
# Publishers that go away mid-stream:
# - five calls cancelled by the client after 10..50 requests, and four more
#   cancelled at the same time;
# - a client killed with SIGKILL while it streams, and one killed while its
#   call is open with every request sent (never half-closed);
# then:
# - the daemon is alive and a later Publish of 1,000 records works, all of
#   them in Kafka;
# - Kafka holds no record twice, and nothing a client did not hand over;
# - at SIGTERM no publish call is left, and the daemon exits 0.
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc
need "$KCAT"

TOPIC=c
mock_start "$TOPIC:3"
kbridged_conf
kbridged_start

# allowed.txt: "FIRST LAST" ranges of record numbers clients handed over.
: >"$T/allowed.txt"
cancelled() {
	local json=$1
	check_py "$2" "$json" "$T/allowed.txt" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["code_name"] == "CANCELLED" and r["cancelled_by_client"], r
assert r["sent_records"] > 0, r
EOF
	"$PYTHON3" -c 'import json, sys
r = json.load(open(sys.argv[1]))
print(sys.argv[2], int(sys.argv[2]) + r["sent_records"] - 1)' "$json" "$3" >>"$T/allowed.txt"
}

# --- cancelled by the client ---
for i in 1 2 3 4 5; do
	start=$((i * 100000))
	py publish --topic "$TOPIC" --records 50000 --size 50 --per-request 10 --key-prefix c- \
		--start $start --cancel-after $((i * 10)) --cancel-delay 0.$i --expect CANCELLED \
		>"$T/cancel$i.json" || fail "cancelled publish $i: $(cat "$T/cancel$i.json")"
	cancelled "$T/cancel$i.json" "publish $i cancelled after $((i * 10)) requests" $start
done
pids=()
for i in 6 7 8 9; do
	py publish --topic "$TOPIC" --records 50000 --size 50 --per-request 10 --key-prefix c- \
		--start $((i * 100000)) --cancel-after 5 --cancel-delay 0 --expect CANCELLED \
		>"$T/cancel$i.json" &
	pids+=($!)
done
for i in 6 7 8 9; do
	wait "${pids[$((i - 6))]}" || fail "concurrent cancelled publish $i: $(cat "$T/cancel$i.json")"
	cancelled "$T/cancel$i.json" "concurrent publish $i cancelled" $((i * 100000))
done

# --- killed with SIGKILL while streaming ---
py publish --topic "$TOPIC" --records 1000000 --size 50 --per-request 10 --key-prefix c- \
	--start 1000000 --delay 0.001 --timeout 300 >/dev/null 2>&1 &
KILLED=$!
sleep 2
kill -0 "$KILLED" 2>/dev/null || fail "the streaming publisher ended before it was killed"
kill_tree "$KILLED" KILL
wait "$KILLED" 2>/dev/null || true
echo "1000000 1999999" >>"$T/allowed.txt"
ok "a streaming publisher was killed with SIGKILL"

# --- killed with SIGKILL with every request sent but the call still open ---
py publish --topic "$TOPIC" --records 500 --size 50 --per-request 50 --key-prefix c- \
	--start 2000000 --hang --timeout 300 >/dev/null 2>"$T/hang.err" &
HUNG=$!
wait_until 30 "the hanging publisher sent its 500 records" grep -q '^SENT' "$T/hang.err"
sleep 0.5
kill_tree "$HUNG" KILL
wait "$HUNG" 2>/dev/null || true
echo "2000000 2000499" >>"$T/allowed.txt"
ok "a publisher that never half-closed was killed with SIGKILL"

# --- the daemon still serves ---
check "kbridged is still running" kbridged_alive
py publish --topic "$TOPIC" --records 1000 --size 50 --per-request 100 --key-prefix c- \
	--start 3000000 >"$T/after.json" || fail "publish after the cancellations: $(cat "$T/after.json")"
expect_eq "$(json_get "$T/after.json" 'r["records"]')" 1000 "records of the publish after the cancellations"

# --- Kafka: nothing twice, nothing invented, the last 1,000 all there ---
kcat_read "$TOPIC" -f '%k\n' >"$T/kcat.txt"
check_py "kafka holds no record twice, only records clients handed over, and the last 1,000" \
	"$T/kcat.txt" "$T/allowed.txt" <<'EOF'
import collections, sys
keys = open(sys.argv[1]).read().split()
allowed = [tuple(map(int, l.split())) for l in open(sys.argv[2])]
dups = [k for k, n in collections.Counter(keys).items() if n > 1]
assert not dups, f"{len(dups)} records are in kafka more than once, e.g. {dups[:5]}"
nums = {int(k[2:]) for k in keys}
stray = [i for i in nums if not 3000000 <= i < 3001000 and not any(a <= i <= b for a, b in allowed)]
assert not stray, f"{len(stray)} records in kafka that no client handed over, e.g. {sorted(stray)[:5]}"
missing = set(range(3000000, 3001000)) - nums
assert not missing, f"{len(missing)} records of the last publish are missing, e.g. {sorted(missing)[:5]}"
print(f"kafka holds {len(keys)} records", file=sys.stderr)
EOF

# The concurrent cancels and kills happened a moment ago: let the daemon settle.
sleep 2
rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
if grep -Eq 'draining:.*publish' "$T/kbridged.log"; then
	log_has 'draining:.* 0 publish calls'
fi
