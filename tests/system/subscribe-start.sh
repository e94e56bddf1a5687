#!/bin/bash
# Subscribe start positions, with Python (grpcio) and Node (grpc-js) clients:
# - EARLIEST gets every record Kafka holds, each once;
# - LATEST gets what is published after the initial metadata and nothing before;
# - TIMESTAMP starts, per partition, at the first record at or after the time
#   (checked in the middle of the data when the Kafka under test can look up
#   offsets by time; librdkafka's mock cannot, it answers "no such record", so
#   there the test checks the documented fallback: such a partition starts at
#   its end); a time after every record starts at the end;
# - positions override the start mode on the partitions they name, on one
#   topic and across two topics; a position at the very end is allowed;
# - a position below the log start (librdkafka's mock keeps about 5 MB per
#   partition and deletes older records) starts at the earliest record left,
#   and the initial metadata kbridge-skipped names the missing offsets;
# - an unknown topic → NOT_FOUND; a position beyond the end → OUT_OF_RANGE;
#   a position on a topic not subscribed, or on a partition that does not
#   exist → INVALID_ARGUMENT.
# Every record set is compared with what kcat reads from Kafka directly.
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc
need "$KCAT"

NODE_OK=1
( need_node ) >/dev/null 2>&1 || NODE_OK=
CLIENT="$top_srcdir/tests/clients/node/client.js"
nodec() { NODE_PATH="$NODE_MODULES" PROTO_DIR="$PROTO_DIR" "$NODE" "$CLIENT" "$1" --address "$ADDR" "${@:2}"; }

mock_start st:3 st2:2 gone:1
kbridged_conf
kbridged_start

T1=1000000000000 # 2001-09-09
T2=2000000000000 # 2033-05-18
TMID=1500000000000
TLATE=4000000000000

pub() {
	py publish --size 20 --per-request 10 "$@" >"$T/pub.json" ||
		fail "publish $* failed: $(cat "$T/pub.json")"
}

# The early batch, then the late one, with explicit timestamps.
pub --topic st --records 30 --key-prefix a- --start 0 --timestamp "$T1"
pub --topic st --records 30 --key-prefix b- --start 100 --timestamp "$T2"
pub --topic st2 --records 20 --key-prefix c- --start 0

# Kafka's own view, "TOPIC PARTITION OFFSET KEY TIMESTAMP" a line.
kcat_read st -f '%t %p %o %k %T\n' >"$T/kafka.txt"
kcat_read st2 -f '%t %p %o %k %T\n' >>"$T/kafka.txt"
expect_eq "$(wc -l <"$T/kafka.txt")" 80 "records in Kafka"

# expect_records WHAT FILE FILTER: FILE (a client's JSON lines) holds exactly
# the records of Kafka for which the Python expression FILTER is true, each
# once. FILTER sees t, p, o, k, ts and end[(t, p)] (the partition's next offset).
expect_records() {
	check_py "$1" "$2" "$T/kafka.txt" "$3" <<'EOF'
import json, sys
path, kafka, flt = sys.argv[1:4]
rows = [l.split() for l in open(kafka) if l.strip()]
end = {}
for t, p, o, k, ts in rows:
    end[(t, int(p))] = max(end.get((t, int(p)), 0), int(o) + 1)
want = {}
for t, p, o, k, ts in rows:
    p, o, ts = int(p), int(o), int(ts)
    if eval(flt):
        want[(t, p, o)] = k
got = [json.loads(l) for l in open(path) if l.strip()]
seen = set()
for r in got:
    place = (r["topic"], r["partition"], r["offset"])
    assert place not in seen, f"{place} received twice"
    seen.add(place)
    assert place in want, f"unexpected record {place} key {r['key']!r}"
    assert r["key"] == want[place], f"{place}: key {r['key']!r}, Kafka has {want[place]!r}"
missing = sorted(set(want) - seen)
assert not missing, f"{len(missing)} records missing, first {missing[:5]}"
print(f"  {len(seen)} records as expected")
EOF
}

count_where() {
	"$PYTHON3" -c 'import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
end = {}
for t, p, o, k, ts in rows:
    end[(t, int(p))] = max(end.get((t, int(p)), 0), int(o) + 1)
n = 0
for t, p, o, k, ts in rows:
    p, o, ts = int(p), int(o), int(ts)
    n += bool(eval(sys.argv[2]))
print(n)' "$T/kafka.txt" "$1"
}

end_of() { # TOPIC PARTITION: the partition's next offset
	count_where "t == '$1' and p == $2"
}

wait_ready() { # PID ERRFILE
	local i
	for ((i = 0; i < 300; i++)); do
		grep -q '^READY$' "$2" && return 0
		kill -0 "$1" 2>/dev/null || fail "subscriber exited before READY: $(cat "$2")"
		sleep 0.1
	done
	fail "subscriber got no initial metadata within 30 s"
}

# sub NAME FILTER ARGS...: a Python subscriber that reads exactly the number of
# records FILTER selects, then is checked against Kafka.
sub() {
	local name=$1 flt=$2 n
	shift 2
	n=$(count_where "$flt")
	test "$n" -gt 0 || fail "test bug: $name expects no records"
	py subscribe --cancel-after "$n" --timeout 60 --result "$T/$name.json" "$@" \
		>"$T/$name.jsonl" 2>"$T/$name.err" || fail "$name: $(cat "$T/$name.err")"
	expect_records "py: $name gets exactly the records it should" "$T/$name.jsonl" "$flt"
}

# The same with the Node client.
nsub() {
	local name=$1 flt=$2 n
	shift 2
	test -n "$NODE_OK" || return 0
	n=$(count_where "$flt")
	nodec subscribe --cancel-after "$n" --timeout 60 --result "$T/n-$name.json" "$@" \
		>"$T/n-$name.jsonl" 2>"$T/n-$name.err" || fail "node $name: $(cat "$T/n-$name.err")"
	expect_records "node: $name gets exactly the records it should" "$T/n-$name.jsonl" "$flt"
}

# A subscription that must get nothing of what is there now: it waits for the
# initial metadata, then gets exactly the 10 records published afterwards.
sub_only_new() {
	local name=$1 prefix=$2 first=$3
	shift 3
	py subscribe --cancel-after 10 --timeout 60 "$@" >"$T/$name.jsonl" 2>"$T/$name.err" &
	local pid=$!
	wait_ready "$pid" "$T/$name.err"
	pub --topic st --records 10 --key-prefix "$prefix" --start "$first"
	wait "$pid" || fail "$name: $(cat "$T/$name.err")"
	check_py "$name gets only the 10 records published after its initial metadata" \
		"$T/$name.jsonl" "$prefix" <<'EOF'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
keys = sorted(r["key"] for r in recs)
assert all(k.startswith(sys.argv[2]) for k in keys), f"old records: {[k for k in keys if not k.startswith(sys.argv[2])][:5]}"
assert len(set(keys)) == 10 == len(keys), keys
EOF
	kcat_read st -f '%t %p %o %k %T\n' >"$T/kafka.txt"
	kcat_read st2 -f '%t %p %o %k %T\n' >>"$T/kafka.txt"
}

# --- EARLIEST ---
sub earliest "t == 'st'" --topic st --start earliest
nsub earliest "t == 'st'" --topic st --from earliest

# --- LATEST (also the default) ---
sub_only_new latest d- 200 --topic st --start latest
sub_only_new latest-default e- 300 --topic st

# --- TIMESTAMP ---
# Does the Kafka under test look up offsets by time? kcat asks it directly.
timeout 60 "$KCAT" -b "$BROKERS" -C -t st -o "s@$TMID" -e -q -f '%k\n' >"$T/kcat-ts.txt" 2>/dev/null || true
if test "$(wc -l <"$T/kcat-ts.txt")" -gt 0; then
	sub timestamp-middle "t == 'st' and ts >= $TMID" --topic st --start "timestamp:$TMID"
	nsub timestamp-middle "t == 'st' and ts >= $TMID" --topic st --from "timestamp:$TMID"
	sub timestamp-zero "t == 'st'" --topic st --start timestamp:0
else
	echo "note: this Kafka (librdkafka's mock) cannot look up offsets by time;" \
		"checking that such partitions start at their end"
	sub_only_new timestamp-middle f- 400 --topic st --start "timestamp:$TMID"
fi
sub_only_new timestamp-late g- 500 --topic st --start "timestamp:$TLATE"

# --- positions override the start mode where given ---
E0=$(end_of st 0)
sub pos-earliest "t == 'st' and (p != 0 or o >= 5) and p != 1" --topic st --start earliest \
	--position st:0:5 --position "st:1:$(end_of st 1)"
nsub pos-earliest "t == 'st' and (p != 0 or o >= 5) and p != 1" --topic st --from earliest \
	--position st:0:5 --position "st:1:$(end_of st 1)"
sub pos-latest "t == 'st' and p == 2 and o >= 3" --topic st --start latest --position st:2:3
nsub pos-latest "t == 'st' and p == 2 and o >= 3" --topic st --from latest --position st:2:3
sub pos-timestamp "t == 'st' and p == 1 and o >= 7" --topic st --start "timestamp:$TLATE" \
	--position st:1:7
sub pos-zero "t == 'st' and p == 0" --topic st --start latest --position st:0:0

# --- several topics ---
sub two-topics "t == 'st2' or (t == 'st' and p == 1)" --topic st --topic st2 --start earliest \
	--position st:0:"$E0" --position "st:2:$(end_of st 2)"
sub two-topics-pos "(t == 'st2' and (p == 0 or o >= 2)) or (t == 'st' and p == 0 and o >= 4)" \
	--topic st2 --topic st --start earliest --position st2:1:2 --position st:0:4 \
	--position "st:1:$(end_of st 1)" --position "st:2:$(end_of st 2)"
nsub two-topics-pos "(t == 'st2' and (p == 0 or o >= 2)) or (t == 'st' and p == 0 and o >= 4)" \
	--topic st2 --topic st --from earliest --position st2:1:2 --position st:0:4 \
	--position "st:1:$(end_of st 1)" --position "st:2:$(end_of st 2)"

# A position at the very end is the end, not an error: only new records.
sub_only_new pos-at-end h- 600 --topic st --start latest --position "st:0:$(end_of st 0)"

# --- a position whose records are gone: kbridge-skipped, never a silent gap ---
py publish --topic gone --records 8000 --size 1000 --per-request 100 --key-prefix z- >"$T/pub.json" ||
	fail "publish to gone: $(cat "$T/pub.json")"
LOW=$(kcat_read gone -c 1 -f '%o\n')
if test "${LOW:-0}" -gt 10; then
	for client in py node; do
		if test $client = py; then
			py subscribe --topic gone --start latest --position gone:0:3 --cancel-after 5 \
				--result "$T/gone.json" >"$T/gone.jsonl" 2>"$T/gone.err" || fail "gone: $(cat "$T/gone.err")"
		else
			test -n "$NODE_OK" || continue
			nodec subscribe --topic gone --from latest --position gone:0:3 --cancel-after 5 \
				--result "$T/gone.json" >"$T/gone.jsonl" 2>"$T/gone.err" || fail "node gone: $(cat "$T/gone.err")"
		fi
		expect_eq "$(json_get "$T/gone.json" '",".join(r["skipped"])')" "gone:0:3-$((LOW - 1))" \
			"$client: kbridge-skipped for a position below the log start ($LOW)"
		expect_eq "$(head -n 1 "$T/gone.jsonl" | json_get /dev/stdin 'r["offset"]')" "$LOW" \
			"$client: the first record after the skipped ones"
	done
	py subscribe --topic gone --start earliest --cancel-after 5 --result "$T/gone2.json" \
		>/dev/null 2>"$T/gone2.err" || fail "gone2: $(cat "$T/gone2.err")"
	expect_eq "$(json_get "$T/gone2.json" 'r["initial"].get("kbridge-skipped", "none")')" none \
		"kbridge-skipped for EARLIEST (nothing skipped)"
else
	echo "note: the mock kept every record of partition gone/0 (log start $LOW): not checking kbridge-skipped"
fi

# --- errors ---
err_case() { # NAME CODE WORD ARGS...: py and node end with CODE, the message has WORD
	local name=$1 code=$2 word=$3
	shift 3
	py subscribe --timeout 30 --expect "$code" --result "$T/$name.json" "$@" \
		>/dev/null 2>"$T/$name.err" || fail "$name: $(cat "$T/$name.err")"
	grep -q -- "$word" "$T/$name.json" || fail "$name: the message does not name '$word': $(cat "$T/$name.json")"
	ok "py: $name ends with $code: $(json_get "$T/$name.json" 'r["details"]')"
}
err_case unknown-topic NOT_FOUND no-such-topic --topic no-such-topic --start earliest
err_case unknown-topic-2 NOT_FOUND no-such-topic --topic st --topic no-such-topic
err_case beyond-end OUT_OF_RANGE "st/0" --topic st --start earliest --position "st:0:$(($(end_of st 0) + 1))"
err_case far-beyond-end OUT_OF_RANGE "st/1" --topic st --position st:1:1000000
err_case position-other-topic INVALID_ARGUMENT st2 --topic st --position st2:0:0
err_case position-no-partition INVALID_ARGUMENT "partition" --topic st --position st:7:0
err_case topic-twice INVALID_ARGUMENT "twice" --topic st --topic st

if test -n "$NODE_OK"; then
	node_err() { # NAME CODE ARGS...
		local name=$1 code=$2 rc=0
		shift 2
		nodec subscribe --count 1 --timeout 30 --result "$T/n-$name.json" "$@" \
			>/dev/null 2>"$T/n-$name.err" || rc=$?
		test "$rc" = 1 || fail "node $name exited with $rc, want 1: $(cat "$T/n-$name.err")"
		expect_eq "$(json_get "$T/n-$name.json" 'r["code"]')" "$code" "node: $name status code"
	}
	node_err unknown-topic 5 --topic no-such-topic --from earliest
	node_err beyond-end 11 --topic st --from earliest --position "st:0:$(($(end_of st 0) + 1))"
	node_err position-other-topic 3 --topic st --from latest --position st2:0:0
fi

rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
