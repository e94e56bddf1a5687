#!/bin/bash
# A storm of publishers that go away (issue 3, point 6): for 3 rounds, 4
# client processes of 50 threads each (200 clients a round), every thread on
# its own connection, open Publish or PublishStream calls, send some records
# and then cancel the call, close the connection under it, or finish it
# normally; one process each round is killed with SIGKILL mid-stream.
# Afterwards:
# - the daemon is alive and a normal Publish works;
# - every record any client got acknowledged (a code 0 in a PublishStream
#   ack, or an OK Publish response) is in Kafka, at the acked partition and
#   offset, and no record is in Kafka twice;
# - the daemon's sd_notify STATUS says 0 publish calls;
# - SIGTERM ends it with status 0 (under ASan, a leak would make it non-zero).
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc
need "$KCAT"

TOPIC=cs
mock_start "$TOPIC:3"
kbridged_conf
notify_listen
kbridged_start
notify_wait '^READY=1$'

: >"$T/acked.txt"
storm() {
	py storm --topic "$TOPIC" --clients 50 --rounds 3 --per-request 5 --max-requests 40 \
		--first-client "$1" --seed "$2" --ack-log "$T/acked.txt" --timeout 60 --delay 0.02
}
for round in 1 2 3; do
	pids=()
	for p in 0 1 2 3; do
		storm $((round * 1000 + p * 50)) "$round" >"$T/storm-$round-$p.json" 2>"$T/storm-$round-$p.err" &
		pids+=($!)
	done
	# Kill process 3 once its threads have started calls.
	wait_until 60 "storm process 3 of round $round started" grep -q STARTED "$T/storm-$round-3.err"
	sleep 1
	kill_tree "${pids[3]}" KILL
	for p in 0 1 2; do
		wait "${pids[$p]}" || fail "storm process $p of round $round: $(cat "$T/storm-$round-$p.json" "$T/storm-$round-$p.err")"
		echo "round $round process $p: $(json_get "$T/storm-$round-$p.json" 'r["calls"]')"
	done
	wait "${pids[3]}" 2>/dev/null || true
	check "kbridged is alive after round $round" kbridged_alive
done

# A normal publish works.
py publish --topic "$TOPIC" --records 1000 --per-request 10 --size 50 --key-prefix s \
	--start 1500000000 >"$T/after.json" || fail "publish after the storm: $(cat "$T/after.json")"
expect_eq "$(json_get "$T/after.json" 'r["records"]')" 1000 "records of the publish after the storm"

kcat_read "$TOPIC" -f '%p %o %s\n' >"$T/kcat.txt"
check_py "every acknowledged record is in kafka where its ack says; none twice" \
	"$T/acked.txt" "$T/kcat.txt" <<'EOF2'
import collections, re, sys
at = collections.defaultdict(list)
for line in open(sys.argv[2]):
    p, o, v = line.rstrip("\n").split(" ", 2)
    at[int(re.match(r"v(\d+)-", v).group(1))].append((int(p), int(o)))
dups = [i for i, l in at.items() if len(l) > 1]
assert not dups, f"{len(dups)} records in kafka twice, e.g. {[(i, at[i]) for i in dups[:3]]}"
acked = 0
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) != 3:
        continue      # cannot happen with whole-line writes; be safe with a killed writer
    i, p, o = map(int, f)
    acked += 1
    assert i in at, f"record {i} was acknowledged but is not in kafka"
    assert p == -1 or at[i] == [(p, o)], f"record {i} acked at {p}/{o}, kafka has it at {at[i]}"
missing = set(range(1500000000, 1500001000)) - set(at)
assert not missing, f"{len(missing)} records of the last publish missing"
assert acked > 0, "no client got any record acknowledged: the storm tested nothing"
print(f"{acked} acknowledged records checked; kafka holds {len(at)}", file=sys.stderr)
EOF2

status_zero() {
	test "$(notify_last STATUS)" = "serving: 0 publish calls, 0 subscriptions (0 shared readers); Kafka at $BROKERS"
}
wait_until 60 "sd_notify STATUS with 0 publish calls" status_zero
ok "STATUS: $(notify_last STATUS)"
rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
log_lacks 'still waiting for [1-9][0-9]* publish calls'
