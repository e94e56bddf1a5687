#!/bin/bash
# `kbridge publish` beyond plain lines, against kbridged and the mock Kafka:
# - --acks prints one line per input record, in input order, and each line's
#   TOPIC/PARTITION@OFFSET is where kcat finds that record's value;
# - a record over publish.max_record_bytes in the middle of the input gets its
#   error line, the others land, and kbridge exits 1 saying "1 records failed";
# - -H headers land on every record (in order, repeated keys kept);
# - -p puts every record in that partition (Publish and --acks), and a
#   partition the topic lacks is an error line per record;
# - -z (NUL-delimited) and --binary (length-prefixed) records with newlines,
#   NULs and every byte value land byte for byte; a cut-short --binary input
#   exits 1 after publishing the records before it;
# - a progress line on stderr only when stderr is a terminal, erased at the end;
# - bad -H/-p usage exits 2.
. "$top_srcdir/tests/system/lib.sh"
test -x "$KBRIDGE" || fail "$KBRIDGE is not built"
need "$KCAT" "$PYTHON3"

mock_start acks:3 big:3 hdr:3 part:3 nul:1 bin:1 trunc:1 slow:3
# No sticky partitioning: records without a key spread over the partitions
# record by record, so that --acks sees acks of several partitions race.
kbridged_conf 'publish = { max_record_bytes = 1000; };' \
	"kafka = { brokers = \"$BROKERS\"; properties = [ \"sticky.partitioning.linger.ms=0\" ]; };"
kbridged_start

# publish_acks NAME ARGS...: `kbridge publish --acks ARGS` with stdin as given;
# stdout in $T/NAME.out, stderr in $T/NAME.err, exit status in $RC.
publish_acks() {
	local name=$1
	shift
	RC=0
	timeout 60 "$KBRIDGE" -a "$ADDR" publish --acks "$@" >"$T/$name.out" 2>"$T/$name.err" || RC=$?
}

# positions TOPIC: "PARTITION OFFSET VALUE" of every record kcat reads, sorted.
positions() {
	kcat_read "$1" -f '%p %o %s\n' | sort
}

# --- --acks: one line per input line, in input order, where kcat finds it ---
for i in $(seq 500); do
	printf 'acks value %04d\n' "$i"
done >"$T/acks.in"
# Small requests: many acks in flight over 3 partitions, so they come in any order.
publish_acks acks -t acks --batch 7 <"$T/acks.in"
test "$RC" = 0 || fail "publish --acks exited with $RC: $(head -n 5 "$T/acks.err")"
test ! -s "$T/acks.err" || fail "publish --acks wrote to a non-tty stderr: $(head -c 300 "$T/acks.err")"
expect_eq "$(wc -l <"$T/acks.out")" 500 "--acks output lines"
grep -Evq '^acks/[0-2]@[0-9]+$' "$T/acks.out" &&
	fail "--acks printed a line that is not acks/PARTITION@OFFSET: $(grep -Evm 3 '^acks/[0-2]@[0-9]+$' "$T/acks.out")"
# Line i of the output names the place of line i of the input.
paste -d ' ' "$T/acks.out" "$T/acks.in" | sed -E 's|^acks/([0-9]+)@([0-9]+) |\1 \2 |' | sort >"$T/acks.want"
positions acks >"$T/acks.kcat"
cmp -s "$T/acks.want" "$T/acks.kcat" ||
	fail "--acks positions differ from kafka's: $(diff "$T/acks.want" "$T/acks.kcat" | head -n 6)"
test "$(cut -d ' ' -f 1 "$T/acks.kcat" | sort -u | wc -l)" -gt 1 ||
	fail "all 500 records landed in one partition: the order check proves little"
ok "--acks: 500 lines in input order, each at the partition@offset kafka holds it"

# --- a record over max_record_bytes in the middle: its error line, the rest land ---
{
	printf 'small %d\n' 1 2 3 4
	head -c 2000 /dev/zero | tr '\0' x
	echo
	printf 'small %d\n' 6 7 8 9 10
} >"$T/big.in"
publish_acks big -t big --batch 3 <"$T/big.in"
test "$RC" = 1 || fail "publish --acks with a record too large exited with $RC, want 1: $(cat "$T/big.err")"
expect_eq "$(wc -l <"$T/big.out")" 10 "--acks output lines with one bad record"
sed -n 5p "$T/big.out" | grep -Eq '^big: error INVALID_ARGUMENT: .+' ||
	fail "line 5 of the output is not its error line: $(sed -n 5p "$T/big.out")"
grep -Eq '^kbridge: 1 records failed$' "$T/big.err" || fail "no '1 records failed' on stderr: $(cat "$T/big.err")"
paste -d ' ' "$T/big.out" "$T/big.in" | sed -n '1,4p;6,10p' |
	sed -E 's|^big/([0-9]+)@([0-9]+) |\1 \2 |' | sort >"$T/big.want"
positions big >"$T/big.kcat"
cmp -s "$T/big.want" "$T/big.kcat" ||
	fail "the 9 good records are not where --acks says: $(diff "$T/big.want" "$T/big.kcat" | head -n 6)"
ok "a record too large in the middle: its error line, exit 1, '1 records failed', the 9 others land"

# --- -H: headers on every record, in order ---
printf 'h1\nh2\nh3\n' >"$T/hdr.in"
publish_acks hdr -t hdr -H trace=abc -H 'eq=x=y' -H trace=def <"$T/hdr.in"
test "$RC" = 0 || fail "publish -H exited with $RC: $(cat "$T/hdr.err")"
kcat_read hdr -f '%h %s\n' | sort >"$T/hdr.kcat"
expect_eq "$(cat "$T/hdr.kcat")" "trace=abc,eq=x=y,trace=def h1
trace=abc,eq=x=y,trace=def h2
trace=abc,eq=x=y,trace=def h3" "headers kcat shows"

# --- -p: every record in that partition; a partition the topic lacks fails each ---
seq 30 >"$T/part.in"
publish_acks part -t part -p 2 --batch 4 <"$T/part.in"
test "$RC" = 0 || fail "publish -p 2 --acks exited with $RC: $(cat "$T/part.err")"
grep -Evq '^part/2@[0-9]+$' "$T/part.out" && fail "-p 2 --acks printed: $(grep -Evm 3 '^part/2@' "$T/part.out")"
expect_eq "$(wc -l <"$T/part.out")" 30 "-p 2 --acks output lines"
# the Publish path too
timeout 60 "$KBRIDGE" -a "$ADDR" publish -t part --partition 1 "$T/part.in" >"$T/part1.out" 2>&1 ||
	fail "publish --partition 1 failed: $(cat "$T/part1.out")"
grep -q '^part/1: offsets 0\.\.29 (30 records)$' "$T/part1.out" ||
	fail "publish --partition 1 summary: $(cat "$T/part1.out")"
expect_eq "$(kcat_read part -f '%p\n' | sort | uniq -c | awk '{print $2 ":" $1}' | tr '\n' ' ')" \
	"1:30 2:30 " "records per partition after -p 2 and -p 1"
publish_acks part9 -t part -p 9 <<<'nowhere'
test "$RC" = 1 || fail "publish -p 9 to a 3-partition topic exited with $RC, want 1"
grep -Eq '^part: error INVALID_ARGUMENT: .*partition 9' "$T/part9.out" ||
	fail "publish -p 9 printed: $(cat "$T/part9.out")"
ok "-p: records land in the partition asked for; a missing partition is an error line"

# --- -z and --binary: records with newlines, NULs and any byte land exactly ---
# write_records FORMAT INPUT WANT: the records in FORMAT (nul or binary), and
# what `kcat -f '%S:%s\n'` prints for them, length first: the lengths frame
# each value, so a record split or joined anywhere changes the file.
write_records() {
	"$PYTHON3" - "$@" <<'EOF'
import sys
fmt, infile, wantfile = sys.argv[1:]
records = [b"two\nlines", b"tab\there\r\n", b"\n", "caf\u00e9 \u2603".encode(), b"last, no delimiter"]
if fmt == "nul":
    data = b"\0".join(records)
else:
    records += [bytes(range(256)), b"\0\0\n\0", b"y" * 900]
    data = b"".join(len(r).to_bytes(4, "big") + r for r in records)
open(infile, "wb").write(data)
open(wantfile, "wb").write(b"".join(b"%d:%s\n" % (len(r), r) for r in records))
EOF
}
write_records nul "$T/nul.in" "$T/nul.want"
timeout 60 "$KBRIDGE" -a "$ADDR" publish -t nul -z "$T/nul.in" >"$T/nul.out" 2>&1 ||
	fail "publish -z failed: $(cat "$T/nul.out")"
grep -q '^published 5 records' "$T/nul.out" || fail "publish -z: $(cat "$T/nul.out")"
kcat_read nul -f '%S:%s\n' >"$T/nul.kcat"
cmp -s "$T/nul.want" "$T/nul.kcat" || fail "-z records differ in kafka: $(od -c "$T/nul.kcat" | head -n 8)"
ok "-z: 5 NUL-delimited records with newlines land byte for byte"

write_records binary "$T/bin.in" "$T/bin.want"
publish_acks bin -t bin --binary --batch 3 "$T/bin.in"
test "$RC" = 0 || fail "publish --binary --acks exited with $RC: $(cat "$T/bin.err")"
expect_eq "$(tr '\n' ' ' <"$T/bin.out")" "bin/0@0 bin/0@1 bin/0@2 bin/0@3 bin/0@4 bin/0@5 bin/0@6 bin/0@7 " \
	"--binary --acks output"
kcat_read bin -f '%S:%s\n' >"$T/bin.kcat"
cmp -s "$T/bin.want" "$T/bin.kcat" || fail "--binary records differ in kafka: $(od -c "$T/bin.kcat" | head -n 8)"
ok "--binary: 8 length-prefixed records with NULs and every byte value land byte for byte"

# A length prefix that promises more than the input holds: the records before
# it are published (and acked), then exit 1 naming the cut-short record.
"$PYTHON3" -c 'import sys
sys.stdout.buffer.write(b"\0\0\0\x03one\0\0\0\x03two\0\0\0\x64only ten b")' >"$T/trunc.in"
publish_acks trunc -t trunc --binary "$T/trunc.in"
test "$RC" = 1 || fail "publish --binary of a cut-short input exited with $RC, want 1"
grep -q 'record 3 is cut short' "$T/trunc.err" || fail "cut-short input: $(cat "$T/trunc.err")"
expect_eq "$(tr '\n' ' ' <"$T/trunc.out")" "trunc/0@0 trunc/0@1 " "acks before the cut-short record"
expect_eq "$(kcat_read trunc -f '%s ')" "one two " "kafka after a cut-short --binary input"

# --- progress line: only on a terminal, erased at the end ---
check_py "a progress line on a tty stderr, erased at the end" "$KBRIDGE" "$ADDR" <<'EOF'
import os, pty, subprocess, sys, time
kbridge, addr = sys.argv[1:]
master, slave = pty.openpty()
p = subprocess.Popen([kbridge, "-a", addr, "publish", "-t", "slow", "--acks"],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=slave)
os.close(slave)
for i in range(15):  # 1.5 s of slow input: several progress updates
    p.stdin.write(b"slow %d\n" % i)
    p.stdin.flush()
    time.sleep(0.1)
p.stdin.close()
out = p.stdout.read()
rc = p.wait()
err = b""
while True:
    try:
        chunk = os.read(master, 65536)
    except OSError:  # EIO: the child's side is closed
        break
    if not chunk:
        break
    err += chunk
print("stderr on the tty:", repr(err[-200:]))
assert rc == 0, rc
assert len(out.splitlines()) == 15, out
assert b"records/s, " in err and b" acked, " in err and b" in flight" in err, err
assert err.endswith(b"\r\x1b[K"), "progress line not erased at the end"
EOF

# --- bad -H/-p usage exits 2 ---
expect_usage_error() {
	local rc=0
	timeout 10 "$KBRIDGE" -a "$ADDR" publish "$@" </dev/null >"$T/usage.out" 2>&1 || rc=$?
	test "$rc" = 2 || fail "kbridge publish $* exited with $rc, want 2: $(cat "$T/usage.out")"
	ok "usage error exits 2: kbridge publish $*"
}
expect_usage_error -t acks -H novalue
expect_usage_error -t acks -H =value
expect_usage_error -t acks -H
expect_usage_error -t acks -p abc
expect_usage_error -t acks -p -1
expect_usage_error -t acks -p 2147483648
expect_usage_error -t acks -p ''
expect_usage_error -t acks -z --binary
expect_usage_error -t acks --acks=yes

kbridged_stop
