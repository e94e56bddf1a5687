#!/bin/bash
# Every Kafka broker down (issue 3, point 5), against a mock cluster of 3:
# 1. down for about 2 s, less than publish.delivery_timeout_ms (20 s): a
#    Publish and a PublishStream started during the outage wait, then
#    succeed; Kafka holds every record exactly once, where the acks say;
# 2. down for 8 s, more than delivery_timeout_ms (3 s): a Publish started
#    during the outage ends UNAVAILABLE; a PublishStream started then gets
#    code 14 for every record and ends OK; a PublishStream streaming
#    before, during and after the outage gets only codes 0 and 14, and every
#    record acked with 0 is in Kafka at the acked partition and offset (never
#    a false ack); once the brokers are up again, the daemon recovers by itself
#    (a new Publish succeeds, without a restart).
# The mock does not de-duplicate: a produce request in flight when a broker
# goes down may be written twice on retry, so exactly-once is checked only
# for records sent while every broker was already down.
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc
need "$KCAT"

mock_start -b 3 kd1:3 kd2:3
brokers() {
	local b
	for b in 1 2 3; do
		mock_ctl "$1" "$b"
	done
}

# check_acks JSON TOPIC [unique]: every record acked with code 0 is in Kafka
# at its acked partition and offset (and, with `unique`, exactly once).
check_acks() {
	kcat_read "$2" -f '%p %o %s\n' >"$T/kcat-$2.txt"
	check_py "$1: every acknowledged record is in Kafka where its ack says${3:+, once}" \
		"$1" "$T/kcat-$2.txt" "${3:-}" <<'EOF2'
import collections, json, re, sys
r = json.load(open(sys.argv[1]))
unique = sys.argv[3] == "unique"
at = collections.defaultdict(list)
for line in open(sys.argv[2]):
    p, o, v = line.rstrip("\n").split(" ", 2)
    at[int(re.match(r"v(\d+)-", v).group(1))].append((int(p), int(o)))
acked = [row for row in r.get("results", []) if row[4] == 0]
for i, seq, part, off, code, err in acked:
    assert (part, off) in at[i], f"record {i} acked at {part}/{off} is not there in kafka: {at[i]}"
    if unique:
        assert len(at[i]) == 1, f"record {i} is {len(at[i])} times in kafka: {at[i]}"
print(f"{len(acked)} acknowledged records found in kafka", file=sys.stderr)
EOF2
}

# --- 1. a short outage ---
# librdkafka backs off reconnecting up to reconnect.backoff.max.ms (10 s by default):
# keep that short, so that "brokers back" means back within the delivery timeout,
# even on a loaded machine (ASan).
kafka_block="kafka = { brokers = \"$BROKERS\"; properties = [ \"reconnect.backoff.max.ms=1000\" ]; };"
kbridged_conf 'publish = { delivery_timeout_ms = 20000; };' "$kafka_block"
kbridged_start
py publish --topic kd1 --records 10 --start 900000 >"$T/warm.json" ||
	fail "publish before the outage: $(cat "$T/warm.json")"

brokers down
py publish --topic kd1 --records 500 --per-request 10 --start 0 --timeout 60 >"$T/short-pub.json" &
PUB=$!
py stream --topic kd1 --records 500 --per-request 5 --start 10000 --timeout 60 >"$T/short-stream.json" &
STREAM=$!
sleep 2
check "the Publish call still waits during the outage" kill -0 "$PUB"
brokers up
wait "$PUB" || fail "Publish during a 2 s outage: $(cat "$T/short-pub.json")"
wait "$STREAM" || fail "PublishStream during a 2 s outage: $(head -c 600 "$T/short-stream.json")"
expect_eq "$(json_get "$T/short-pub.json" 'r["records"]')" 500 "records of the Publish started during the outage"
check_py "every record of the PublishStream started during the outage: code 0" "$T/short-stream.json" <<'EOF2'
import json, sys
r = json.load(open(sys.argv[1]))
assert sorted(r["seqs"]) == list(range(100)), f"acks {len(r['seqs'])}, want 100"
bad = [row for row in r["results"] if row[4] != 0]
assert not bad and len(r["results"]) == 500, f"{len(bad)} records failed, e.g. {bad[:3]}"
EOF2
check_acks "$T/short-stream.json" kd1 unique
check_py "kafka holds each record of the outage exactly once" "$T/kcat-kd1.txt" <<'EOF2'
import collections, re, sys
c = collections.Counter(int(re.match(r"\S+ \S+ v(\d+)-", l).group(1)) for l in open(sys.argv[1]))
want = set(range(0, 500)) | set(range(10000, 10500)) | set(range(900000, 900010))
assert set(c) == want, f"missing {sorted(want - set(c))[:5]}, unexpected {sorted(set(c) - want)[:5]}"
dups = [k for k, n in c.items() if n > 1]
assert not dups, f"{len(dups)} records twice, e.g. {dups[:5]}"
EOF2
rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM (short outage)"

# --- 2. an outage longer than delivery_timeout_ms ---
kbridged_conf 'publish = { delivery_timeout_ms = 3000; };' "$kafka_block"
kbridged_start
py publish --topic kd2 --records 10 --start 900000 >"$T/warm2.json" ||
	fail "publish before the long outage: $(cat "$T/warm2.json")"
# Streams before, during and after the outage: ~600 requests over 15 s or more.
py stream --topic kd2 --records 3000 --per-request 5 --start 100000 --delay 0.025 \
	--timeout 120 >"$T/span.json" &
SPAN=$!
sleep 2
brokers down
py publish --topic kd2 --records 50 --per-request 5 --start 200000 --timeout 60 \
	--expect UNAVAILABLE >"$T/long-pub.json" &
PUB=$!
py stream --topic kd2 --records 50 --per-request 5 --start 300000 --timeout 60 >"$T/long-stream.json" &
STREAM=$!
sleep 8
brokers up
wait "$PUB" || fail "Publish during an 8 s outage: $(cat "$T/long-pub.json")"
ok "Publish during an outage longer than delivery_timeout_ms: UNAVAILABLE: $(json_get "$T/long-pub.json" 'r["details"]')"
expect_eq "$(json_get "$T/long-pub.json" 'r["durable"]')" 0 "kbridge-durable-requests of that Publish"
wait "$STREAM" || fail "PublishStream during an 8 s outage: $(head -c 600 "$T/long-stream.json")"
check_py "PublishStream during the long outage: code 14 for every record, then OK" "$T/long-stream.json" <<'EOF2'
import json, sys
r = json.load(open(sys.argv[1]))
assert sorted(r["seqs"]) == list(range(10)), f"acks {sorted(r['seqs'])}, want 0..9"
codes = sorted({row[4] for row in r["results"]})
assert len(r["results"]) == 50 and codes == [14], f"codes {codes} over {len(r['results'])} results, want only 14"
assert all(row[5] for row in r["results"]), "a code 14 without a message"
print("e.g.:", r["results"][0][5], file=sys.stderr)
EOF2
wait "$SPAN" || fail "PublishStream across the outage: $(head -c 600 "$T/span.json")"
check_py "PublishStream across the outage: codes 0 and 14 only, some of each" "$T/span.json" <<'EOF2'
import collections, json, sys
r = json.load(open(sys.argv[1]))
assert sorted(r["seqs"]) == list(range(600)), f"{len(r['seqs'])} acks, want 600"
c = collections.Counter(row[4] for row in r["results"])
assert set(c) <= {0, 14}, f"codes {dict(c)}"
assert c[0] > 0, f"no record acknowledged: {dict(c)}"
print(f"codes {dict(c)}", file=sys.stderr)
EOF2

# The daemon recovers by itself.
new_publish() { py publish --topic kd2 --records 10 --start 400000 --timeout 20 >"$T/after.json" 2>&1; }
wait_until 90 "a Publish succeeding after the brokers came back" new_publish
expect_eq "$(json_get "$T/after.json" 'r["records"]')" 10 "records published after the outage"
check_acks "$T/span.json" kd2
check_acks "$T/long-stream.json" kd2
check_py "the records published after the outage are in kafka" "$T/kcat-kd2.txt" <<'EOF2'
import re, sys
nums = {int(re.match(r"\S+ \S+ v(\d+)-", l).group(1)) for l in open(sys.argv[1])}
missing = set(range(400000, 400010)) - nums
assert not missing, f"missing {sorted(missing)}"
EOF2
check "kbridged is still running" kbridged_alive
rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM (long outage)"
