#!/bin/bash
# kbridge tail, compared with what kcat reads from Kafka directly:
# - -f FORMAT prints %t %p %o %k %s %h %T like kcat, with \t \n escapes;
#   -e exits 0 once the data there is has been printed;
# - several -t; --from P:OFFSET (the first topic) and TOPIC:P:OFFSET lists;
#   --from @TIMESTAMP (in the middle of the data if the Kafka under test can
#   look up offsets by time, else the documented fallback: the end);
# - -n COUNT -v prints the kbridge-positions to resume from; resuming with
#   --from earliest --from POSITIONS prints the rest, every record once;
# - on SIGTERM of the daemon tail exits 1 (UNAVAILABLE) and -v prints the
#   daemon's kbridge-positions trailer for every partition;
# - -g GROUP reaches the daemon (UNIMPLEMENTED until groups are served);
# - bad --from, -f and offsets beyond the end fail clearly.
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc
need "$KCAT"

mock_start ct:3 ct2:1
kbridged_conf
kbridged_start
tail_() { timeout 60 "$KBRIDGE" -a "$ADDR" tail "$@"; }

T1=1000000000000
T2=2000000000000
py publish --topic ct --records 30 --size 12 --per-request 10 --key-prefix k- --header h=1 \
	--index-header n --timestamp "$T1" >"$T/pub.json" || fail "publish: $(cat "$T/pub.json")"
py publish --topic ct --records 30 --size 12 --per-request 10 --key-prefix k- --start 100 \
	--header h=2 --index-header n --timestamp "$T2" >"$T/pub.json" || fail "publish: $(cat "$T/pub.json")"
py publish --topic ct2 --records 7 --size 12 --key-prefix c- >"$T/pub.json" ||
	fail "publish: $(cat "$T/pub.json")"

FMT='%t %p %o %k %s %h %T\n'
kcat_read ct -f "$FMT" | sort >"$T/kafka.txt"
expect_eq "$(wc -l <"$T/kafka.txt")" 60 "records of ct in Kafka"

# --- -f and -e: everything there is, as kcat prints it ---
tail_ -t ct --from earliest -e -f "$FMT" >"$T/all.txt" 2>"$T/all.err" ||
	fail "tail -e: $(cat "$T/all.err")"
sort "$T/all.txt" | cmp -s - "$T/kafka.txt" ||
	fail "tail -f differs from kcat: $(sort "$T/all.txt" | diff - "$T/kafka.txt" | head -n 5)"
ok "tail --from earliest -e -f '$FMT' prints what kcat prints"
tail_ -t ct --from earliest -n 1 -f '[%%]\t<%s>\\' >"$T/esc.txt" 2>"$T/esc.err" ||
	fail "tail -f escapes: $(cat "$T/esc.err")"
printf '[%%]\t<v%s>\\' "$(sed -n 's/.*<v\(.*\)>.*/\1/p' "$T/esc.txt")" | cmp -s - "$T/esc.txt" ||
	fail "escapes: got $(od -c "$T/esc.txt" | head -n 3)"
ok "-f: %% is a percent sign, \\t a tab, no newline is added"

# --- several topics ---
tail_ -t ct -t ct2 --from earliest -e -f '%t\n' >"$T/two.txt" 2>"$T/two.err" ||
	fail "tail two topics: $(cat "$T/two.err")"
expect_eq "$(sort "$T/two.txt" | uniq -c | awk '{print $2 "=" $1}' | tr '\n' ' ')" "ct=60 ct2=7 " \
	"records per topic of tail -t ct -t ct2"

# --- --from P:OFFSET (first topic) and TOPIC:P:OFFSET ---
# Where the count to expect is known, -n waits for it: -e ends a tail after a second
# without records, which a loaded machine (the ASan build under make -j2) once exceeded
# in the middle of a catch-up read.
awk '($2 == 0 && $3 >= 5) || ($2 == 2 && $3 >= 9)' "$T/kafka.txt" >"$T/pos.want"
tail_ -t ct -t ct2 --from 0:5 --from ct:2:9 -n "$(wc -l <"$T/pos.want")" -f "$FMT" >"$T/pos.txt" \
	2>"$T/pos.err" || fail "tail --from 0:5: $(cat "$T/pos.err")"
sort "$T/pos.txt" | cmp -s - "$T/pos.want" ||
	fail "--from 0:5 --from ct:2:9 (latest elsewhere): $(sort "$T/pos.txt" | diff - "$T/pos.want" | head -n 5)"
ok "--from 0:5 --from ct:2:9 prints ct/0 from 5, ct/2 from 9, nothing else (latest)"
awk '$2 != 1 || $3 >= 3' "$T/kafka.txt" >"$T/pos2.want"
tail_ -t ct --from earliest --from 1:3 -n "$(wc -l <"$T/pos2.want")" -f "$FMT" >"$T/pos2.txt" \
	2>"$T/pos2.err" || fail "tail --from earliest --from 1:3: $(cat "$T/pos2.err")"
sort "$T/pos2.txt" | cmp -s - "$T/pos2.want" ||
	fail "--from earliest --from 1:3: $(sort "$T/pos2.txt" | diff - "$T/pos2.want" | head -n 5)"
ok "--from earliest --from 1:3: partition 1 from offset 3, the others from the start"

# --- --from @TIMESTAMP ---
TMID=1500000000000
timeout 60 "$KCAT" -b "$BROKERS" -C -t ct -o "s@$TMID" -e -q -f '%k\n' >"$T/kcat-ts.txt" 2>/dev/null || true
tail_ -t ct --from "@$TMID" -e -f "$FMT" >"$T/ts.txt" 2>"$T/ts.err" || fail "tail --from @: $(cat "$T/ts.err")"
if test "$(wc -l <"$T/kcat-ts.txt")" -gt 0; then
	awk -v t="$TMID" '$7 >= t' "$T/kafka.txt" >"$T/ts.want"
	sort "$T/ts.txt" | cmp -s - "$T/ts.want" || fail "--from @$TMID: $(sort "$T/ts.txt" | diff - "$T/ts.want" | head -n 5)"
	ok "--from @$TMID prints the records from that time on"
else
	expect_eq "$(wc -l <"$T/ts.txt")" 0 \
		"records of --from @$TMID on a Kafka that cannot look up offsets by time (starts at the end)"
fi
tail_ -t ct --from @4000000000000 -e >"$T/ts2.txt" 2>"$T/ts2.err" || fail "tail --from @late: $(cat "$T/ts2.err")"
expect_eq "$(wc -l <"$T/ts2.txt")" 0 "records of --from @(after every record)"

# --- -n -v, then resume from the printed positions ---
tail_ -t ct --from earliest -n 25 --max-batch 7 -v -f "$FMT" >"$T/n1.txt" 2>"$T/n1.err" ||
	fail "tail -n 25 -v: $(cat "$T/n1.err")"
expect_eq "$(wc -l <"$T/n1.txt")" 25 "records printed by -n 25"
POS=$(sed -n 's/^kbridge: tail: kbridge-positions: //p' "$T/n1.err")
test -n "$POS" || fail "-v printed no kbridge-positions line: $(cat "$T/n1.err")"
check_py "the positions are the last printed offset + 1 of each partition printed" "$T/n1.txt" "$POS" <<'EOF'
import sys
last = {}
for l in open(sys.argv[1]):
    t, p, o = l.split()[:3]
    last[f"{t}:{p}"] = int(o) + 1
got = dict((x.rsplit(":", 1)[0], int(x.rsplit(":", 1)[1])) for x in sys.argv[2].split(","))
assert got == last, f"printed {sys.argv[2]}, want {last}"
EOF
tail_ -t ct --from earliest --from "$POS" -n 35 -f "$FMT" >"$T/n2.txt" 2>"$T/n2.err" ||
	fail "tail --from $POS: $(cat "$T/n2.err")"
sort "$T/n1.txt" "$T/n2.txt" | cmp -s - "$T/kafka.txt" ||
	fail "-n 25 then resume: $(sort "$T/n1.txt" "$T/n2.txt" | diff - "$T/kafka.txt" | head -n 5)"
ok "-n 25, then --from earliest --from $POS: every record exactly once"

# --- -g GROUP reaches the daemon ---
rc=0
tail_ -t ct -g tailers --from earliest -n 60 -f "$FMT" >"$T/group.txt" 2>"$T/group.err" || rc=$?
if test "$rc" = 0; then
	sort "$T/group.txt" | cmp -s - "$T/kafka.txt" || fail "tail -g: $(sort "$T/group.txt" | diff - "$T/kafka.txt" | head -n 5)"
	ok "tail -g (the only member of its group) prints every record"
else
	grep -q 'UNIMPLEMENTED.*group' "$T/group.err" || fail "tail -g exited $rc: $(cat "$T/group.err")"
	ok "tail -g: the daemon says groups are not served yet: $(cat "$T/group.err")"
fi

# --- errors ---
expect_rc() { # RC WHAT ARGS...
	local want=$1 what=$2 rc=0
	shift 2
	tail_ "$@" >"$T/err.out" 2>"$T/err.txt" || rc=$?
	test "$rc" = "$want" || fail "$what: exit $rc, want $want: $(cat "$T/err.txt")"
	ok "$what: exit $want: $(head -n 1 "$T/err.txt")"
}
expect_rc 2 "--from nowhere" -t ct --from nowhere
expect_rc 2 "--from 0:x" -t ct --from 0:x
expect_rc 2 "--from :0:1" -t ct --from :0:1
expect_rc 2 "--from @soon" -t ct --from @soon
expect_rc 2 "-f %x" -t ct -f '%x'
expect_rc 2 "-f ending in %" -t ct -f 'a%'
expect_rc 1 "--from 0:100000 (beyond the end)" -t ct --from 0:100000 -e
grep -q OUT_OF_RANGE "$T/err.txt" || fail "beyond the end: $(cat "$T/err.txt")"
expect_rc 1 "--from ct2:0:0 with -t ct only" -t ct --from ct2:0:0 -e
grep -q INVALID_ARGUMENT "$T/err.txt" || fail "position on another topic: $(cat "$T/err.txt")"

# --- SIGTERM: exit 1 with UNAVAILABLE, -v prints the daemon's positions ---
tail_ -t ct -t ct2 --from 1:4 -v -f "$FMT" >"$T/term.txt" 2>"$T/term.err" &
TAILPID=$!
have_lines() { test "$(wc -l <"$T/term.txt")" -ge 1; }
wait_until 30 "records from the tail to be stopped" have_lines
rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
rc=0
wait "$TAILPID" || rc=$?
expect_eq "$rc" 1 "tail exit status when the daemon stops"
grep -q UNAVAILABLE "$T/term.err" || fail "no UNAVAILABLE: $(cat "$T/term.err")"
END1=$(awk '$2 == 1' "$T/kafka.txt" | wc -l)
expect_eq "$(sed -n 's/^kbridge: tail: kbridge-positions: //p' "$T/term.err" | tr "," "\n" | LC_ALL=C sort | tr '\n' ' ')" \
	"ct2:0:7 ct:0:$(awk '$2 == 0' "$T/kafka.txt" | wc -l) ct:1:$END1 ct:2:$(awk '$2 == 2' "$T/kafka.txt" | wc -l) " \
	"kbridge-positions printed at SIGTERM (every partition at its end)"
