#!/bin/bash
# Resuming a subscription without gap or duplicate:
# - a subscriber reads part of a topic and cancels; a second one starts
#   EARLIEST with positions = last offset + 1 of each partition the first one
#   got (as the client computed them): across the two streams every record
#   comes exactly once (Python, and Node resuming from Python's positions);
# - SIGTERM during a stream: the subscriber gets UNAVAILABLE with trailing
#   kbridge-positions for every partition, equal to its own last offset + 1
#   where it got records; a new daemon on the same Kafka, given those
#   positions, delivers the rest: every record exactly once again.
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc
need "$KCAT"

NODE_OK=1
( need_node ) >/dev/null 2>&1 || NODE_OK=
CLIENT="$top_srcdir/tests/clients/node/client.js"
nodec() { NODE_PATH="$NODE_MODULES" PROTO_DIR="$PROTO_DIR" "$NODE" "$CLIENT" "$1" --address "$ADDR" "${@:2}"; }

mock_start rs:3
# A small buffer, so that the daemon holds little of what the slow reader has not read.
kbridged_conf 'subscribe = { buffer_records = 200; };'
kbridged_start

py publish --topic rs --records 3000 --size 1000 --per-request 50 --key-prefix r- >"$T/pub.json" ||
	fail "publish: $(cat "$T/pub.json")"
expect_eq "$(kcat_read rs -f '%k\n' | wc -l)" 3000 "records in Kafka"

# --position arguments from a result file's FIELD (a list of "T:P:O").
position_args() {
	"$PYTHON3" -c 'import json, sys
for p in json.load(open(sys.argv[1]))[sys.argv[2]] or []:
    print("--position", p)' "$1" "$2"
}

# exactly_once WHAT N FILE...: the JSON lines of FILEs hold r-0..r-(N-1), each once.
exactly_once() {
	local what=$1 n=$2
	shift 2
	check_py "$what" "$n" "$@" <<'EOF'
import json, sys
n = int(sys.argv[1])
keys = []
for path in sys.argv[2:]:
    keys += [json.loads(l)["key"] for l in open(path) if l.strip()]
dups = len(keys) - len(set(keys))
want = {f"r-{i}" for i in range(n)}
assert dups == 0, f"{dups} records received twice"
assert set(keys) == want, f"missing {sorted(want - set(keys))[:5]}, unexpected {sorted(set(keys) - want)[:5]}"
print(f"  {len(keys)} records in {len(sys.argv) - 2} streams, each once")
EOF
}

# --- 1. cancel, then resume from the client's own positions ---
py subscribe --topic rs --start earliest --max-batch 7 --cancel-after 1000 \
	--result "$T/part1.json" >"$T/part1.jsonl" 2>"$T/part1.err" || fail "part 1: $(cat "$T/part1.err")"
expect_eq "$(wc -l <"$T/part1.jsonl")" 1000 "records of the first stream"
# shellcheck disable=SC2046 # one word each
py subscribe --topic rs --start earliest $(position_args "$T/part1.json" next_positions) \
	--cancel-after 2000 --result "$T/part2.json" >"$T/part2.jsonl" 2>"$T/part2.err" ||
	fail "part 2: $(cat "$T/part2.err")"
exactly_once "py: cancel after 1,000 and resume: every record exactly once" 3000 \
	"$T/part1.jsonl" "$T/part2.jsonl"

if test -n "$NODE_OK"; then
	# shellcheck disable=SC2046
	nodec subscribe --topic rs --from earliest $(position_args "$T/part1.json" next_positions) \
		--cancel-after 2000 --result "$T/n-part2.json" >"$T/n-part2.jsonl" 2>"$T/n-part2.err" ||
		fail "node part 2: $(cat "$T/n-part2.err")"
	exactly_once "node resumes from Python's positions: every record exactly once" 3000 \
		"$T/part1.jsonl" "$T/n-part2.jsonl"
	# And Node's own positions, after a cut in the middle of a response.
	nodec subscribe --topic rs --from earliest --max-batch 100 --cancel-after 1234 \
		--result "$T/n-a.json" >"$T/n-a.jsonl" 2>"$T/n-a.err" || fail "node a: $(cat "$T/n-a.err")"
	# shellcheck disable=SC2046
	nodec subscribe --topic rs --from earliest $(position_args "$T/n-a.json" next_positions) \
		--cancel-after 1766 --result "$T/n-b.json" >"$T/n-b.jsonl" 2>"$T/n-b.err" ||
		fail "node b: $(cat "$T/n-b.err")"
	exactly_once "node: cancel after 1,234 and resume: every record exactly once" 3000 \
		"$T/n-a.jsonl" "$T/n-b.jsonl"
fi

# --- 2. SIGTERM mid-stream, resume on a new daemon ---
# A slow reader (0.05 s per response of 10 records, a small HTTP/2 window) is
# mid-stream for seconds: 3 MB cannot hide in the buffers on the way.
py subscribe --topic rs --start earliest --max-batch 10 --read-delay 0.05 --expect UNAVAILABLE \
	--result "$T/term1.json" >"$T/term1.jsonl" 2>"$T/term1.err" &
SUB=$!
got_some() {
	kill -0 "$SUB" 2>/dev/null || fail "the slow subscriber ended early: $(cat "$T/term1.err")"
	test "$(wc -l <"$T/term1.jsonl")" -ge 300
}
wait_until 60 "300 records on the slow subscriber" got_some
rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
wait "$SUB" || fail "the subscriber did not end with UNAVAILABLE: $(cat "$T/term1.err")"
ok "the subscriber ended with UNAVAILABLE: $(json_get "$T/term1.json" 'r["details"]')"
N1=$(wc -l <"$T/term1.jsonl")
test "$N1" -lt 3000 || fail "the subscriber got all 3000 records before SIGTERM: nothing to resume"
check_py "kbridge-positions names every partition, at the client's last offset + 1 where it got records" \
	"$T/term1.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
pos = r["positions"]
assert pos is not None, f"no kbridge-positions trailer: {r['trailers']}"
parsed = {}
for p in pos:
    t, part, off = p.rsplit(":", 2)
    parsed[(t, int(part))] = int(off)
assert sorted(parsed) == [("rs", 0), ("rs", 1), ("rs", 2)], f"partitions: {pos}"
for p in r["next_positions"]:
    t, part, off = p.rsplit(":", 2)
    assert parsed[(t, int(part))] == int(off), f"trailer {pos} vs client {r['next_positions']}"
print(f"  kbridge-positions: {','.join(pos)} ({r['records']} records)")
EOF

kbridged_start
# shellcheck disable=SC2046
py subscribe --topic rs --start latest $(position_args "$T/term1.json" positions) \
	--cancel-after $((3000 - N1)) --result "$T/term2.json" >"$T/term2.jsonl" 2>"$T/term2.err" ||
	fail "resume on the new daemon: $(cat "$T/term2.err")"
exactly_once "SIGTERM and resume on a new daemon: every record exactly once" 3000 \
	"$T/term1.jsonl" "$T/term2.jsonl"

rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
