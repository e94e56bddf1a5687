#!/bin/bash
# The kbridge command-line client against kbridged:
# - `publish` of a 1,000-line file: Kafka holds the same lines;
# - `tail --from earliest -n 1000` prints the same set of lines;
# - `publish -k KEY` keys every record (one partition, kcat shows the key), and
#   `tail -v` shows where each record is, with its key;
# - bad usage exits 2; an unreachable daemon exits 1 and says UNAVAILABLE.
. "$top_srcdir/tests/system/lib.sh"
test -x "$KBRIDGE" || fail "$KBRIDGE is not built"

TOPIC=clitest
mock_start "$TOPIC:3" keyed:3
kbridged_conf
kbridged_start

# --- publish a file, read it back with kcat and with `kbridge tail` ---
for i in $(seq 1000); do
	printf 'line %04d of the kbridge cli test\n' "$i"
done >"$T/in.txt"
sort "$T/in.txt" >"$T/in.sorted"

timeout 60 "$KBRIDGE" -a "$ADDR" publish -t "$TOPIC" "$T/in.txt" >"$T/pub.out" 2>"$T/pub.err" ||
	fail "kbridge publish failed: $(cat "$T/pub.err")"
grep -q '^published 1000 records' "$T/pub.out" ||
	fail "kbridge publish did not report 1000 records: $(cat "$T/pub.out")"
ok "kbridge publish: $(head -n 1 "$T/pub.out")"

kcat_read "$TOPIC" -f '%s\n' | sort >"$T/kcat.sorted"
cmp -s "$T/in.sorted" "$T/kcat.sorted" ||
	fail "kafka does not hold the published lines: $(diff "$T/in.sorted" "$T/kcat.sorted" | head -n 5)"
ok "kafka holds the 1,000 lines"

timeout 60 "$KBRIDGE" -a "$ADDR" tail -t "$TOPIC" --from earliest -n 1000 >"$T/tail.out" 2>"$T/tail.err" ||
	fail "kbridge tail failed: $(cat "$T/tail.err")"
sort "$T/tail.out" >"$T/tail.sorted"
cmp -s "$T/in.sorted" "$T/tail.sorted" ||
	fail "kbridge tail printed other lines: $(diff "$T/in.sorted" "$T/tail.sorted" | head -n 5)"
ok "kbridge tail --from earliest printed the 1,000 lines"

# --- a key on every record: all in one partition, kcat shows the key ---
printf 'a\nb\nc\n' >"$T/keyed.txt"
timeout 60 "$KBRIDGE" -a "$ADDR" publish -t keyed -k user-42 "$T/keyed.txt" >"$T/keyed.out" 2>&1 ||
	fail "kbridge publish -k failed: $(cat "$T/keyed.out")"
kcat_read keyed -f '%p %k %s\n' >"$T/keyed.kcat"
test "$(awk '{print $1}' "$T/keyed.kcat" | sort -u | wc -l)" = 1 ||
	fail "keyed records landed in several partitions: $(cat "$T/keyed.kcat")"
test "$(awk '{print $2, $3}' "$T/keyed.kcat")" = "user-42 a
user-42 b
user-42 c" || fail "keyed records in kafka: $(cat "$T/keyed.kcat")"
# -v names each record's place, key and timestamp, in publish order here
timeout 60 "$KBRIDGE" -a "$ADDR" tail -t keyed --from earliest -n 3 -v >"$T/keyed.tail" 2>"$T/keyed.err" ||
	fail "kbridge tail -v failed: $(cat "$T/keyed.err")"
sed -E 's/^keyed\/[0-9]+@[0-9]+ key=user-42 ts=[0-9]+ //' "$T/keyed.tail" >"$T/keyed.values"
test "$(cat "$T/keyed.values")" = "a
b
c" || fail "kbridge tail -v printed: $(cat "$T/keyed.tail")"
ok "publish -k keys every record; tail -v shows place and key"

# --- bad usage exits 2 ---
expect_usage_error() {
	local rc=0
	timeout 10 "$KBRIDGE" "$@" >"$T/usage.out" 2>&1 || rc=$?
	test "$rc" = 2 || fail "kbridge $* exited with $rc, want 2: $(cat "$T/usage.out")"
	ok "usage error exits 2: kbridge $*"
}
expect_usage_error
expect_usage_error no-such-command
expect_usage_error -a "$ADDR" publish
expect_usage_error -a "$ADDR" tail -t "$TOPIC" --from yesterday
expect_usage_error -a "$ADDR" publish -t "$TOPIC" --no-such-option "$T/in.txt"

# --- nobody listening: exit 1, and the message says UNAVAILABLE ---
RC=0
timeout 60 "$KBRIDGE" -a "unix:$T/nobody.sock" publish -t "$TOPIC" "$T/in.txt" \
	>"$T/unreach.out" 2>&1 || RC=$?
test "$RC" = 1 || fail "publish to an unreachable address exited with $RC, want 1: $(cat "$T/unreach.out")"
grep -q UNAVAILABLE "$T/unreach.out" ||
	fail "publish to an unreachable address does not say UNAVAILABLE: $(cat "$T/unreach.out")"
ok "unreachable daemon: exit 1, UNAVAILABLE"

kbridged_stop
