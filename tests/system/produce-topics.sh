#!/bin/bash
# Produce (unary) and ListTopics:
# - Produce of 10 good records: status OK, one result per record, each code 0
#   with the partition and offset where kcat shows that record;
# - Produce mixing good and bad records (empty topic, a value over
#   max_record_bytes, an explicit partition the topic lacks): status OK, the
#   bad ones code 3 naming request 0 and their record, the good ones in
#   Kafka exactly once where their results say;
# - Produce to a topic Kafka does not have (auto_create_topics off): code 5
#   (NOT_FOUND) in the record's result, and the topic is not created;
# - ListTopics lists exactly the mock's topics with their partition counts,
#   sorted by name, and a topic created later shows up (within the cache time).
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc
need "$KCAT"

mock_start pt:3 other:1 zeta:5
kbridged_conf 'publish = { max_record_bytes = 1000; };'
kbridged_start

# check_results JSON TOPIC FIRST COUNT [BAD...]: see the header.
check_results() {
	kcat_read "$2" -f '%p %o %s\n' >"$T/kcat-$2.txt"
	check_py "$1: per-record results match Kafka" "$1" "$T/kcat-$2.txt" "${@:3}" <<'EOF2'
import collections, json, re, sys
res_file, kcat_file, first, count = sys.argv[1:5]
first, count = int(first), int(count)
bad = {int(b) for b in sys.argv[5:]}
r = json.load(open(res_file))
assert r["code"] == 0, f"Produce ended with {r['code_name']} {r['details']!r}, want OK"
assert r["sequence"] == 0, f"sequence {r['sequence']}, want 0"
assert [row[0] for row in r["results"]] == list(range(first, first + count)), \
    f"{len(r['results'])} results, want {count}"
kafka = collections.defaultdict(list)
for line in open(kcat_file):
    p, o, v = line.rstrip("\n").split(" ", 2)
    kafka[int(re.match(r"v(\d+)-", v).group(1))].append((int(p), int(o)))
for i, seq, part, off, code, err in r["results"]:
    if i in bad:
        assert code == 3, f"bad record {i}: code {code} {err!r}, want 3"
        assert re.search(rf"\brequest 0, record {i - first}\b", err), \
            f"bad record {i}: {err!r} does not name request 0, record {i - first}"
        assert i not in kafka, f"bad record {i} is in kafka"
        continue
    assert code == 0, f"record {i}: code {code} {err!r}"
    assert kafka[i] == [(part, off)], f"record {i}: result {part}/{off}, kafka {kafka[i]}"
EOF2
}

# --- Produce ---
py produce --topic pt --records 10 --start 0 >"$T/good.json" ||
	fail "Produce of 10 records: $(cat "$T/good.json")"
check_results "$T/good.json" pt 0 10

py produce --topic pt --records 6 --start 1000 --empty-topic 1 --big-record 2:5000 \
	--bad-partition 4:3 >"$T/mixed.json" || fail "Produce of mixed records: $(cat "$T/mixed.json")"
check_results "$T/mixed.json" pt 1000 6 1001 1002 1004

py produce --topic nosuch --records 2 --start 2000 >"$T/nosuch.json" ||
	fail "Produce to a missing topic: $(cat "$T/nosuch.json")"
check_py "Produce to a missing topic: NOT_FOUND per record, naming the topic" "$T/nosuch.json" <<'EOF2'
import json, sys
r = json.load(open(sys.argv[1]))
assert len(r["results"]) == 2, r
for i, seq, part, off, code, err in r["results"]:
    assert code == 5 and "nosuch" in err, f"record {i}: code {code} {err!r}, want 5 naming nosuch"
EOF2

# --- ListTopics ---
topics_are() {
	py topics >"$T/topics.json" 2>"$T/topics.err" || return 1
	test "$(json_get "$T/topics.json" 'r["topics"]')" = "$1"
}
want="[['other', 1], ['pt', 3], ['zeta', 5]]"
wait_until 10 "ListTopics = $want" topics_are "$want"
ok "ListTopics lists exactly the mock's topics: $want"

mock_ctl topic middle 7
want="[['middle', 7], ['other', 1], ['pt', 3], ['zeta', 5]]"
wait_until 20 "ListTopics = $want (last: $(cat "$T/topics.json"))" topics_are "$want"
ok "ListTopics shows the topic created later: $want"

rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
