#!/bin/bash
# The daemon's memory stays bounded by publish.max_inflight_bytes_total
# (issue 3, point 4) when Kafka is slow: with a 200 ms round trip on every
# mock broker and max_inflight_bytes_total = 8 MiB, 100 concurrent Publish
# calls each stream 20 MB in 64 KiB requests (2 GB in all). While they run,
# the daemon's VmRSS is sampled every 0.2 s. Checks:
# - the peak RSS stays under RSS at start + 8 MiB + ALLOWANCE (below);
# - every call ends OK and counts all its records;
# - Kafka holds every record (end offsets add up), none twice among those
#   the mock still keeps.
# Under AddressSanitizer RSS means little (shadow memory, quarantine): the
# RSS bound is skipped there, the rest is checked.
# MEMORY_BOUND_MB (default 20) scales the bytes per call, for a quick run by hand.
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc
need "$KCAT"

MB=${MEMORY_BOUND_MB:-20}
STREAMS=100
# Beyond the 8 MiB of records in flight, the daemon may hold: gRPC's receive
# buffers (HTTP/2 windows of up to a few MiB per connection, 10 connections),
# librdkafka's produce-request buffers (a copy of records up to ~1 MB per
# partition batch), and allocator slack from freeing 64 KiB messages. 64 MiB
# covers these with room; without flow control the daemon would buffer
# hundreds of MiB here (2 GB offered against ~40 MB/s drained).
ALLOWANCE_MIB=64
LIMIT_MIB=8

TOPIC=mem
mock_start "$TOPIC:6"
kbridged_conf "publish = { max_inflight_bytes_total = $((LIMIT_MIB * 1048576)); max_record_bytes = 1000000; };"
kbridged_start

asan=
if test -n "${ASAN_OPTIONS:-}" || ldd "$KBRIDGED" 2>/dev/null | grep -q libasan ||
	nm "$KBRIDGED" 2>/dev/null | grep -q __asan_init; then
	asan=yes
	echo "note: kbridged is an AddressSanitizer build: the RSS bound is not checked"
fi

rss_kib() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB$/\1/p' "/proc/$KBRIDGED_PID/status"; }
# Warm up: one small publish, so that the start RSS includes a working producer.
py publish --topic "$TOPIC" --records 10 --size 100 --key-prefix w >"$T/warm.json" ||
	fail "warm-up publish: $(cat "$T/warm.json")"
START_KIB=$(rss_kib)
test -n "$START_KIB" || fail "cannot read VmRSS of kbridged (pid $KBRIDGED_PID)"
ok "RSS at start: $START_KIB KiB"

for b in 1 2 3; do
	mock_ctl rtt "$b" 200
done

sampler() {
	while kill -0 "$KBRIDGED_PID" 2>/dev/null; do
		rss_kib >>"$T/rss.txt" || true
		sleep 0.2
	done
}
: >"$T/rss.txt"
sampler &
SAMPLER=$!

py flood --topic "$TOPIC" --streams "$STREAMS" --channels 10 --bytes $((MB * 1000000)) \
	--request-bytes 65536 --records-per-request 4 --timeout 900 >"$T/flood.json" ||
	fail "flood: $(cat "$T/flood.json")"
kill "$SAMPLER" 2>/dev/null || true
wait "$SAMPLER" 2>/dev/null || true
ok "100 calls ended OK: $(cat "$T/flood.json")"

# Records per call: 4 per 64 KiB request (as kbclient.py flood computes them).
PER_CALL=$(( (MB * 1000000 / 65536) * 4 ))
expect_eq "$(json_get "$T/flood.json" 'r["records"]')" $((PER_CALL * STREAMS)) "records acknowledged"

for b in 1 2 3; do
	mock_ctl rtt "$b" 0
done
# The mock keeps only the newest part of each partition's log (it drops old
# segments), so 2 GB cannot be read back: count the records by the end
# offsets (the topic was empty; 10 warm-up records), and check that the
# records still readable are each there once.
end_offsets() {
	local p
	for ((p = 0; p < 6; p++)); do
		timeout 60 "$KCAT" -b "$BROKERS" -Q -t "$TOPIC:$p:-1" 2>/dev/null |
			sed -nE 's/.*\[[0-9]+\] offset ([0-9]+)$/\1/p'
	done
}
end_offsets >"$T/ends.txt"
expect_eq "$(wc -l <"$T/ends.txt")" 6 "partitions with an end offset"
expect_eq "$(awk '{ s += $1 } END { print s }' "$T/ends.txt")" $((PER_CALL * STREAMS + 10)) \
	"records in kafka (sum of end offsets)"
kcat_read "$TOPIC" -f '%k\n' >"$T/keys.txt"
check_py "the records kafka still holds are each there once" "$T/keys.txt" "$STREAMS" "$PER_CALL" <<'EOF2'
import collections, re, sys
streams, per_call = int(sys.argv[2]), int(sys.argv[3])
c = collections.Counter(l.strip() for l in open(sys.argv[1]) if l.startswith("m"))
dups = [k for k, n in c.items() if n > 1]
assert not dups, f"{len(dups)} records twice, e.g. {dups[:5]}"
for k in c:
    s, i = map(int, re.match(r"m(\d+)-(\d+)$", k).groups())
    assert s < streams and i < per_call, f"unexpected record {k}"
print(f"{len(c)} records still readable", file=sys.stderr)
EOF2
# Last, so that a failed bound still shows whether the records are right.
PEAK_KIB=$(sort -n "$T/rss.txt" | tail -n 1)
SAMPLES=$(wc -l <"$T/rss.txt")
BOUND_KIB=$((START_KIB + (LIMIT_MIB + ALLOWANCE_MIB) * 1024))
echo "RSS: start $START_KIB KiB, peak $PEAK_KIB KiB over $SAMPLES samples, bound $BOUND_KIB KiB"
if test -z "$asan"; then
	check "peak RSS $PEAK_KIB KiB <= start $START_KIB KiB + $LIMIT_MIB MiB + $ALLOWANCE_MIB MiB" \
		test "$PEAK_KIB" -le "$BOUND_KIB"
fi

rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
