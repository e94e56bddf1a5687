#!/bin/bash
# Subscribe:
# - LATEST: a subscriber that has received the initial metadata gets every
#   record published afterwards, and none published before;
# - EARLIEST gets everything, in offset order per partition;
# - one subscription to two topics gets the records of both;
# - max_batch (the client's, and subscribe.max_batch for 0) bounds every response;
# - an unknown topic ends with NOT_FOUND, no topic with INVALID_ARGUMENT;
# - subscribers that cancel or vanish are cleaned up: the daemon keeps
#   serving, and at SIGTERM it has no subscription left to end.
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc
need "$KCAT"

mock_start s1:3 s2:2
kbridged_conf 'subscribe = { max_batch = 50; };'
kbridged_start

# Waits for "READY" (initial metadata) on a background subscriber's stderr.
wait_ready() {
	local pid=$1 err=$2 i
	for ((i = 0; i < 300; i++)); do
		grep -q '^READY$' "$err" && return 0
		kill -0 "$pid" 2>/dev/null || fail "subscriber exited before READY: $(cat "$err")"
		sleep 0.1
	done
	fail "subscriber got no initial metadata within 30 s"
}

# Checks a subscriber's JSON lines: exactly the records KEYPREFIX<first..last>
# of TOPIC (values as kbclient makes them), each once, offsets rising by one
# per partition.
check_records() {
	check_py "$1" "$2" "$3" "$4" "$5" "$6" <<'EOF'
import json, sys
path, topic, prefix, first, last = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
recs = [json.loads(l) for l in open(path)]
recs = [r for r in recs if r["topic"] == topic]
want = set(range(first, last + 1))
got, prev = [], {}
for r in recs:
    assert r["key"].startswith(prefix), f"unexpected record {r['key']!r} at {r['partition']}/{r['offset']}"
    i = int(r["key"][len(prefix):])
    assert r["value"] == f"v{i}-".ljust(20, "x"), r
    got.append(i)
    p = r["partition"]
    assert p is not None, r
    if p in prev:
        assert r["offset"] == prev[p] + 1, f"{topic}/{p}: offset {r['offset']} after {prev[p]}"
    prev[p] = r["offset"]
assert len(got) == len(set(got)), f"{len(got) - len(set(got))} records received twice"
assert set(got) == want, f"missing {sorted(want - set(got))[:10]}, unexpected {sorted(set(got) - want)[:10]}"
EOF
}

pub() {
	py publish --size 20 --per-request 10 "$@" >"$T/pub.json" ||
		fail "publish $* failed: $(cat "$T/pub.json")"
}

# --- LATEST: only what comes after the initial metadata ---
pub --topic s1 --records 100 --key-prefix before- --start 0
py subscribe --topic s1 --start latest --count 200 --timeout 60 >"$T/latest.jsonl" 2>"$T/latest.err" &
SUB=$!
wait_ready "$SUB" "$T/latest.err"
pub --topic s1 --records 200 --key-prefix after- --start 1000
wait "$SUB" || fail "LATEST subscriber failed: $(cat "$T/latest.err")"
check_records "LATEST gets the 200 records published after READY and none before" \
	"$T/latest.jsonl" s1 after- 1000 1199
# Nothing more than the 200 either: a second LATEST subscriber stays empty
# while nothing is published.
py subscribe --topic s1 --start latest --idle 2 --timeout 30 >"$T/latest2.jsonl" 2>"$T/latest2.err" ||
	fail "idle LATEST subscriber failed: $(cat "$T/latest2.err")"
expect_eq "$(wc -l <"$T/latest2.jsonl")" 0 "records for a LATEST subscriber when nothing is published"

# --- EARLIEST: everything, in order ---
py subscribe --topic s1 --start earliest --count 300 --timeout 60 >"$T/earliest.jsonl" 2>"$T/earliest.err" ||
	fail "EARLIEST subscriber failed: $(cat "$T/earliest.err")"
# (--count 300: a record received twice would push out another one and be
# caught by check_records.)
grep '"key": "before-' "$T/earliest.jsonl" >"$T/earliest-before.jsonl" || true
grep '"key": "after-' "$T/earliest.jsonl" >"$T/earliest-after.jsonl" || true
check_records "EARLIEST gets the 100 early records" "$T/earliest-before.jsonl" s1 before- 0 99
check_records "EARLIEST gets the 200 later records" "$T/earliest-after.jsonl" s1 after- 1000 1199

# --- two topics in one subscription ---
py subscribe --topic s1 --topic s2 --start latest --count 80 --timeout 60 >"$T/two.jsonl" 2>"$T/two.err" &
SUB=$!
wait_ready "$SUB" "$T/two.err"
pub --topic s1 --records 40 --key-prefix two1- --start 2000
pub --topic s2 --records 40 --key-prefix two2- --start 3000
wait "$SUB" || fail "two-topic subscriber failed: $(cat "$T/two.err")"
check_records "a two-topic subscription gets the s1 records" "$T/two.jsonl" s1 two1- 2000 2039
check_records "a two-topic subscription gets the s2 records" "$T/two.jsonl" s2 two2- 3000 3039

# --- max_batch: the client's, and the server default for 0 ---
py subscribe --topic s1 --start earliest --max-batch 7 --count 340 --timeout 60 \
	--result "$T/batch7.json" >"$T/batch7.jsonl" 2>"$T/batch7.err" ||
	fail "max_batch 7 subscriber failed: $(cat "$T/batch7.err")"
check_py "no response holds more than max_batch = 7 records" "$T/batch7.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["records"] == 340, r
assert 1 <= r["max_response"] <= 7, f"a response held {r['max_response']} records"
EOF
py subscribe --topic s1 --start earliest --max-batch 0 --count 340 --timeout 60 \
	--result "$T/batch0.json" >"$T/batch0.jsonl" 2>"$T/batch0.err" ||
	fail "max_batch 0 subscriber failed: $(cat "$T/batch0.err")"
check_py "with max_batch = 0 no response holds more than subscribe.max_batch = 50" "$T/batch0.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["records"] == 340, r
assert 1 <= r["max_response"] <= 50, f"a response held {r['max_response']} records"
EOF

# --- errors ---
py subscribe --topic no-such-topic --start earliest --timeout 15 --expect NOT_FOUND \
	>/dev/null 2>"$T/notfound.err" ||
	fail "unknown topic: $(cat "$T/notfound.err")"
grep -q 'no-such-topic' "$T/notfound.err" ||
	fail "the NOT_FOUND message does not name the topic: $(cat "$T/notfound.err")"
ok "an unknown topic ends with NOT_FOUND naming it"
py subscribe --topic s1 --topic no-such-topic --timeout 15 --expect NOT_FOUND \
	>/dev/null 2>"$T/notfound2.err" ||
	fail "one unknown topic among known ones: $(cat "$T/notfound2.err")"
ok "one unknown topic among known ones ends with NOT_FOUND"
py subscribe --timeout 30 --expect INVALID_ARGUMENT >/dev/null 2>"$T/notopic.err" ||
	fail "no topics: $(cat "$T/notopic.err")"
ok "a subscription without topics ends with INVALID_ARGUMENT"

# --- subscribers that go away are cleaned up ---
for i in 1 2 3 4 5; do
	py subscribe --topic s1 --topic s2 --start earliest --count 10 --timeout 30 \
		>/dev/null 2>"$T/cancel$i.err" || fail "cancelling subscriber $i: $(cat "$T/cancel$i.err")"
done
ok "five subscribers cancelled after 10 records"
py subscribe --topic s1 --start latest --timeout 60 >/dev/null 2>"$T/killed.err" &
SUB=$!
wait_ready "$SUB" "$T/killed.err"
kill_tree "$SUB" KILL
wait "$SUB" 2>/dev/null || true
ok "a subscriber was killed with SIGKILL"
# Publishing past the killed subscriber's buffer must not stall anything.
pub --topic s1 --records 500 --key-prefix late- --start 5000
py subscribe --topic s1 --start latest --count 20 --timeout 60 >"$T/final.jsonl" 2>"$T/final.err" &
SUB=$!
wait_ready "$SUB" "$T/final.err"
pub --topic s1 --records 20 --key-prefix final- --start 9000
wait "$SUB" || fail "subscriber after the cancellations failed: $(cat "$T/final.err")"
check_records "the daemon still serves subscribers after the cancellations" \
	"$T/final.jsonl" s1 final- 9000 9019

# The last subscriber cancelled a moment ago: give the daemon time to notice.
sleep 2
rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
# The drain line counts the subscriptions still open: none should be left.
if grep -Eq 'draining:.*subscription' "$T/kbridged.log"; then
	log_has 'draining:.* 0 subscriptions'
fi
