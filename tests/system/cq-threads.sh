#!/bin/bash
# Completion-queue threads (kbridged.conf(5) threads): Subscribe calls have a queue of
# their own served by `threads` threads (named kb-sub-N), the other calls another served
# by half as many, at least one (kb-pub-N); the log says how many.
# - threads = 4: 4 kb-sub and 2 kb-pub threads; threads = 1: one of each;
# - with both queues busy at once (a subscriber reading while a publisher publishes),
#   the subscriber gets every record and the publisher every ack.
. "$top_srcdir/tests/system/lib.sh"
need "$KBRIDGE"

mock_start q:2

# named PREFIX: how many of the daemon's threads have a name starting with PREFIX
named() {
	local f name n=0
	for f in /proc/"$KBRIDGED_PID"/task/*/comm; do
		name=$(cat "$f" 2>/dev/null) || continue
		case $name in "$1"*) n=$((n + 1)) ;; esac
	done
	echo "$n"
}

kbridged_conf 'threads = 4;'
kbridged_start
log_has 'completion-queue threads: 2 for publishing calls, 4 for subscriptions'
expect_eq "$(named kb-sub-)" 4 "threads = 4: kb-sub-N threads"
expect_eq "$(named kb-pub-)" 2 "threads = 4: kb-pub-N threads"

# A subscriber from the start of the topic, reading while records are published.
timeout 60 "$KBRIDGE" -a "$ADDR" tail -t q --from earliest -n 3000 -f '%s\n' >"$T/tail.out" \
	2>"$T/tail.err" &
TAIL=$!
seq 3000 | sed 's/^/r/' >"$T/in.txt"
timeout 60 "$KBRIDGE" -a "$ADDR" publish -t q --batch 10 "$T/in.txt" >"$T/pub.out" 2>&1 ||
	fail "publish: $(cat "$T/pub.out")"
wait "$TAIL" || fail "tail ended with status $?: $(cat "$T/tail.err")"
expect_eq "$(sort "$T/tail.out" | uniq | wc -l)" 3000 "distinct records the subscriber got"
sort "$T/in.txt" | cmp -s - <(sort "$T/tail.out") || fail "the subscriber's records differ from those published"
ok "the subscriber got every published record once"
kbridged_stop || fail "kbridged exit status $?"

kbridged_conf 'threads = 1;'
kbridged_start
log_has 'completion-queue threads: 1 for publishing calls, 1 for subscriptions'
expect_eq "$(named kb-sub-)" 1 "threads = 1: kb-sub-N threads"
expect_eq "$(named kb-pub-)" 1 "threads = 1: kb-pub-N threads"
echo one | timeout 30 "$KBRIDGE" -a "$ADDR" publish -t q >"$T/pub1.out" 2>&1 ||
	fail "publish with threads = 1: $(cat "$T/pub1.out")"
ok "publish with threads = 1"
kbridged_stop || fail "kbridged exit status $?"
