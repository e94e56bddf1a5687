#!/bin/bash
# PublishStream (bidi), from Python (grpcio) and Node (grpc-js) clients:
# - 2,000 requests of 5 records: one ack per request, each sequence exactly
#   once, every record code 0 with the partition and offset that kcat shows
#   for that record's value; the client's half-close ends the stream OK
#   after the last ack; Kafka holds each record exactly once;
# - one stream mixing good and bad records (empty topic, a value over
#   max_record_bytes, an explicit partition the topic lacks): the bad ones
#   carry code 3 (INVALID_ARGUMENT) and a message naming their request and
#   record, partition -1 and offset -1; the good ones of the same requests
#   are in Kafka exactly once, where their results say;
# - an undecodable request (raw bytes) sent once the earlier acks arrived
#   ends the stream with INVALID_ARGUMENT; the earlier acks all came.
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc
need "$KCAT"

TOPIC=ps
mock_start "$TOPIC:3"
kbridged_conf 'publish = { max_record_bytes = 1000; };'
kbridged_start

CLIENT="$top_srcdir/tests/clients/node/client.js"
nodec() { NODE_PATH="$NODE_MODULES" PROTO_DIR="$PROTO_DIR" "$NODE" "$CLIENT" "$@"; }
have_node=yes
{ command -v "$NODE" >/dev/null 2>&1 && test -d "$NODE_MODULES/@grpc/grpc-js"; } || have_node=

# check_stream JSON KCAT REQUESTS PER_REQUEST FIRST [BAD...]
# Checks a stream's result against Kafka: every sequence 0..REQUESTS-1 acked
# once, one result per record in order; records FIRST.. (numbers, see
# kbclient.py) OK where kcat has them, except the BAD record numbers (code 3,
# message naming request and record, not in Kafka).
check_stream() {
	check_py "$1: acks and per-record results match Kafka" "$@" <<'EOF2'
import collections, json, re, sys
res_file, kcat_file, nreq, per, first = sys.argv[1:6]
nreq, per, first = int(nreq), int(per), int(first)
bad = {int(b) for b in sys.argv[6:]}
r = json.load(open(res_file))
assert r["code"] == 0, f"stream ended with {r['code']} {r['details']!r}, want OK after the half-close"
seqs = collections.Counter(r["seqs"])
dups = [s for s, n in seqs.items() if n > 1]
assert not dups, f"sequences acked twice: {dups[:10]}"
assert set(seqs) == set(range(nreq)), \
    f"acked {len(seqs)} sequences, want 0..{nreq - 1}; missing {sorted(set(range(nreq)) - set(seqs))[:10]}"
kafka = collections.defaultdict(list)
for line in open(kcat_file):
    p, o, v = line.rstrip("\n").split(" ", 2)
    m = re.match(r"v(\d+)-", v)
    assert m, f"unexpected value in kafka: {v[:40]!r}"
    kafka[int(m.group(1))].append((int(p), int(o)))
by_seq = collections.defaultdict(list)
for row in r["results"]:
    by_seq[row[1]].append(row)
for s in range(nreq):
    want = list(range(first + s * per, first + (s + 1) * per))
    got = [row[0] for row in by_seq[s]]
    assert got == want, f"ack {s} has results for records {got}, want {want}"
for i, seq, part, off, code, err in r["results"]:
    if i in bad:
        assert code == 3, f"bad record {i}: code {code} {err!r}, want 3"
        req, rec = (i - first) // per, (i - first) % per
        assert re.search(rf"\brequest {req}, record {rec}\b", err), \
            f"bad record {i}: message {err!r} does not name request {req}, record {rec}"
        assert (part, off) == (-1, -1), f"bad record {i}: partition {part} offset {off}, want -1 -1"
        assert i not in kafka, f"bad record {i} is in kafka at {kafka[i]}"
        continue
    assert code == 0, f"record {i}: code {code} {err!r}, want 0"
    assert len(kafka[i]) == 1, f"record {i} is {len(kafka[i])} times in kafka: {kafka[i]}"
    assert kafka[i][0] == (part, off), \
        f"record {i}: ack says partition {part} offset {off}, kcat shows {kafka[i][0]}"
print(f"{nreq} acks, {len(r['results'])} results checked against kafka", file=sys.stderr)
EOF2
}

kcat_snapshot() {
	kcat_read "$TOPIC" -f '%p %o %s\n' >"$T/kcat.txt"
}

# --- 1. Python: 2,000 requests x 5 records ---
py stream --topic "$TOPIC" --records 10000 --per-request 5 --size 100 --start 0 \
	--key-prefix k >"$T/py-big.json" || fail "python stream: $(head -c 500 "$T/py-big.json")"
kcat_snapshot
check_stream "$T/py-big.json" "$T/kcat.txt" 2000 5 0

# --- 2. Python: good and bad records in the same requests ---
# Request 0: record 1 has an empty topic, record 3 is over max_record_bytes;
# request 1: record 2 (number 7) names partition 7 of a 3-partition topic.
py stream --topic "$TOPIC" --records 10 --per-request 5 --size 100 --start 100000 \
	--empty-topic 1 --big-record 3:5000 --bad-partition 7:7 >"$T/py-mixed.json" ||
	fail "python mixed stream: $(cat "$T/py-mixed.json")"
kcat_snapshot
check_stream "$T/py-mixed.json" "$T/kcat.txt" 2 5 100000 100001 100003 100007

# --- 3. Python: an undecodable request after 20 acked ones ---
py stream --topic "$TOPIC" --records 100 --per-request 5 --size 100 --start 200000 \
	--garbage-after 20 --expect INVALID_ARGUMENT >"$T/py-garbage.json" ||
	fail "python stream with an undecodable request: $(cat "$T/py-garbage.json")"
check_py "undecodable request: INVALID_ARGUMENT after the 20 earlier acks" "$T/py-garbage.json" <<'EOF2'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["garbage_sent"], "the client never sent the undecodable request"
assert sorted(r["seqs"]) == list(range(20)), f"acks {sorted(r['seqs'])}, want 0..19"
assert all(row[4] == 0 for row in r["results"]), "an earlier record failed"
assert "request 20" in r["details"], f"message does not name request 20: {r['details']!r}"
EOF2
kcat_snapshot
check_py "the 100 records before the undecodable request are in kafka once" "$T/kcat.txt" <<'EOF2'
import collections, re, sys
c = collections.Counter(int(m.group(1)) for l in open(sys.argv[1])
                        for m in [re.match(r"\S+ \S+ v(\d+)-", l)] if m and 200000 <= int(m.group(1)) < 300000)
assert sorted(c) == list(range(200000, 200100)) and set(c.values()) == {1}, \
    f"kafka has {len(c)} distinct records of 200000.., duplicates {[k for k, n in c.items() if n > 1][:5]}"
EOF2
check "kbridged survives the undecodable request" kbridged_alive

# --- 4. Node: the same from grpc-js ---
if test -n "$have_node"; then
	# Node numbers records from 0 in each run: use another topic per run.
	mock_ctl topic psn 3
	mock_ctl topic psn2 3
	nodec stream --address "$ADDR" --topic psn --records 10000 --per-request 5 --size 100 \
		--key-prefix n >"$T/node-big.json" || fail "node stream: $(head -c 500 "$T/node-big.json")"
	TOPIC=psn kcat_snapshot
	check_stream "$T/node-big.json" "$T/kcat.txt" 2000 5 0
	nodec stream --address "$ADDR" --topic psn2 --records 10 --per-request 5 --size 100 \
		--empty-topic 1 --big-record 3:5000 --bad-partition 7:7 >"$T/node-mixed.json" ||
		fail "node mixed stream: $(cat "$T/node-mixed.json")"
	TOPIC=psn2 kcat_snapshot
	check_stream "$T/node-mixed.json" "$T/kcat.txt" 2 5 0 1 3 7
else
	echo "note: no Node client ($NODE_MODULES/@grpc/grpc-js missing): Node part not run"
fi

rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
