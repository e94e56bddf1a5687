#!/bin/bash
# 10,000 records over ONE Publish stream (Python client), with keys and
# headers, 25 records per request:
# - the response counts 10,000 records, and its per-partition ranges are
#   consistent and add up to 10,000;
# - Kafka (read with kcat) holds every record exactly once, with its key and
#   both headers, at the offsets the response named;
# - a Subscribe from EARLIEST returns all 10,000, with contiguous offsets per
#   partition, keys and headers intact.
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc
need "$KCAT"

TOPIC=p10k
N=10000
mock_start "$TOPIC:4"
kbridged_conf
kbridged_start

py publish --topic "$TOPIC" --records $N --size 60 --per-request 25 \
	--key-prefix key- --header origin=py --index-header idx >"$T/pub.json" ||
	fail "publish of $N records failed: $(cat "$T/pub.json")"
check_py "the response counts $N records in consistent ranges" "$T/pub.json" $N <<'EOF'
import json, sys
r = json.load(open(sys.argv[1])); n = int(sys.argv[2])
assert r["records"] == n, f"records = {r['records']}, want {n}"
assert r["sent_requests"] == n // 25, f"sent {r['sent_requests']} requests"
seen, total = set(), 0
for g in r["ranges"]:
    assert g["topic"] == "p10k", g
    assert g["partition"] not in seen, f"partition {g['partition']} twice: {r['ranges']}"
    seen.add(g["partition"])
    assert g["count"] == g["last_offset"] - g["first_offset"] + 1, f"range {g}"
    total += g["count"]
assert total == n, f"ranges add up to {total}, want {n}"
EOF

# Kafka holds each record once, with its key and headers, where the response said.
kcat_read "$TOPIC" -f '%p|%o|%k|%h|%s\n' >"$T/kcat.txt"
check_py "kafka holds the $N records exactly once with keys and headers" \
	"$T/kcat.txt" "$T/pub.json" $N <<'EOF'
import json, sys
lines = open(sys.argv[1]).read().splitlines()
pub = json.load(open(sys.argv[2])); n = int(sys.argv[3])
assert len(lines) == n, f"kcat shows {len(lines)} records, want {n}"
got, offsets = {}, {}
for l in lines:
    p, o, k, h, v = l.split("|")
    i = int(v[1:v.index("-")])
    assert i not in got, f"record {i} is in kafka twice"
    got[i] = (k, h, v)
    offsets.setdefault(int(p), []).append(int(o))
for i in range(n):
    want_v = f"v{i}-".ljust(60, "x")
    assert got.get(i) == (f"key-{i}", f"origin=py,idx={i}", want_v), \
        f"record {i}: kafka has {got.get(i)}"
for g in pub["ranges"]:
    o = sorted(offsets.get(g["partition"], []))
    assert (len(o), o[0], o[-1]) == (g["count"], g["first_offset"], g["last_offset"]), \
        f"partition {g['partition']}: response says {g}, kafka has {len(o)} records at {o[:1]}..{o[-1:]}"
EOF

# Tail from EARLIEST: all of them, with contiguous offsets per partition.
py subscribe --topic "$TOPIC" --start earliest --max-batch 1000 --count $N --timeout 120 \
	>"$T/sub.jsonl" 2>"$T/sub.err" || fail "subscribe failed: $(cat "$T/sub.err")"
check_py "an EARLIEST subscriber receives all $N records, contiguous per partition" \
	"$T/sub.jsonl" $N <<'EOF'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
n = int(sys.argv[2])
assert len(recs) == n, f"subscriber received {len(recs)} records, want {n}"
last, seen = {}, set()
for r in recs:
    i = int(r["value"][1:r["value"].index("-")])
    assert i not in seen, f"record {i} received twice"
    seen.add(i)
    assert r["topic"] == "p10k" and r["key"] == f"key-{i}", r
    assert r["headers"] == [["origin", "py"], ["idx", str(i)]], r
    assert r["timestamp_ms"] > 0, r
    p = r["partition"]
    want = last.get(p, -1) + 1
    assert r["offset"] == want, f"partition {p}: offset {r['offset']} after {want - 1}"
    last[p] = r["offset"]
EOF

rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
