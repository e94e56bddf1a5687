#!/bin/bash
# `kbridged -t -c FILE` checks a configuration file and exits:
# - the example etc/kbridged.conf and a file setting every setting to a
#   non-default value: "configuration OK" on stdout, exit 0;
# - bad files (unknown setting or group, wrong type, out-of-range values, bad
#   or reserved librdkafka properties, syntax error, missing file): exit 1,
#   nothing on stdout, and stderr names the file, the line and the setting.
# No Kafka and no network: -t only reads the file.
. "$top_srcdir/tests/system/lib.sh"
test -x "$KBRIDGED" || fail "$KBRIDGED is not built"

# Runs kbridged -t on FILE; leaves stdout, stderr and status in $T/out, $T/err, $RC.
run_check() {
	RC=0
	timeout 30 "$KBRIDGED" -t -c "$1" >"$T/out" 2>"$T/err" || RC=$?
}

expect_ok() {
	local file=$1 what=$2
	run_check "$file"
	test "$RC" = 0 || fail "$what: kbridged -t exited with $RC: $(cat "$T/err")"
	grep -qx 'configuration OK' "$T/out" ||
		fail "$what: stdout is not 'configuration OK': $(cat "$T/out")"
	ok "$what: configuration OK"
}

# expect_bad NAME LINE SETTING CONTENT: writes CONTENT to $T/NAME.conf and
# checks that kbridged -t refuses it, naming the file, LINE and SETTING
# (LINE and SETTING may be empty for errors that have none).
expect_bad() {
	local name=$1 line=$2 setting=$3 file="$T/$1.conf"
	printf '%s\n' "$4" >"$file"
	run_check "$file"
	test "$RC" = 1 || fail "$name: kbridged -t exited with $RC, want 1: $(cat "$T/out" "$T/err")"
	test ! -s "$T/out" || fail "$name: kbridged -t printed on stdout: $(cat "$T/out")"
	grep -qF "$file:$line" "$T/err" ||
		fail "$name: stderr does not name $file:$line: $(cat "$T/err")"
	if test -n "$setting"; then
		grep -F "$file:$line" "$T/err" | grep -qF "$setting" ||
			fail "$name: the error at $file:$line does not name $setting: $(cat "$T/err")"
	fi
	ok "$name: exit 1, stderr: $(head -n 1 "$T/err")"
}

# --- good files ---
if test -f "$top_srcdir/etc/kbridged.conf"; then
	expect_ok "$top_srcdir/etc/kbridged.conf" "the example etc/kbridged.conf"
else
	echo "note: $top_srcdir/etc/kbridged.conf is missing, not checked"
fi

cat >"$T/good.conf" <<EOF
# every setting, none at its default
listen = [ "127.0.0.1:0", "unix:$T/good.sock" ];
threads = 3;
log_level = "debug";
shutdown_timeout_ms = 2500;
kafka = {
	brokers = "127.0.0.1:1,127.0.0.1:2";
	embedded_brokers = 1;
	properties = [ "linger.ms=10", "batch.num.messages=1000", "client.id=kbtest" ];
};
publish = {
	max_record_bytes = 2000;
	max_request_bytes = 65536;
	delivery_timeout_ms = 5000;
	max_inflight_records = 50;
};
subscribe = {
	max_batch = 10;
	buffer_records = 100;
};
EOF
expect_ok "$T/good.conf" "a file setting every setting"
printf '# nothing but a comment\n' >"$T/empty.conf"
expect_ok "$T/empty.conf" "a file with no settings (all defaults)"
expect_ok "$T/good.conf" "the same file again (-t changes nothing)"
test ! -e "$T/good.sock" || fail "kbridged -t created the listening socket $T/good.sock"
ok "kbridged -t did not bind the listen addresses"

# --- bad files ---
expect_bad unknown-setting 3 no_such_setting '# comment
threads = 2;
publish = { no_such_setting = 1; };'
expect_bad unknown-top 2 colour '# comment
colour = "blue";'
expect_bad unknown-group 3 spool_dir '# spool is not built yet: the name must still be refused
log_level = "info";
spool_dir = "/tmp";'
expect_bad wrong-type-int 2 threads '# comment
threads = "four";'
expect_bad wrong-type-string 3 log_level '# comment

log_level = 3;'
expect_bad wrong-type-group 2 publish '# comment
publish = 5;'
expect_bad wrong-type-listen 2 listen '# comment
listen = [ 50051 ];'
expect_bad bad-log-level 2 log_level '# comment
log_level = "loud";'
expect_bad range-threads 2 threads '# comment
threads = 257;'
expect_bad range-negative 4 shutdown_timeout_ms '# comment
threads = 0;
log_level = "info";
shutdown_timeout_ms = -1;'
expect_bad range-record 3 max_record_bytes '# comment
publish = {
	max_record_bytes = 0;
};'
expect_bad range-record-high 2 max_record_bytes '# comment
publish = { max_record_bytes = 16777217; };'
expect_bad range-batch 4 max_batch '# comment
subscribe = {
	buffer_records = 10;
	max_batch = 100001;
};'
expect_bad range-embedded 2 embedded_brokers '# comment
kafka = { brokers = "embedded"; embedded_brokers = 10; };'
expect_bad empty-listen 2 listen '# comment
listen = [ ];'
expect_bad bad-property 3 no.such.prop '# comment
kafka = {
	properties = [ "linger.ms=5", "no.such.prop=1" ];
};'
expect_bad bad-property-value 2 linger.ms '# comment
kafka = { properties = [ "linger.ms=banana" ]; };'
expect_bad property-no-equals 2 linger.ms '# comment
kafka = { properties = [ "linger.ms" ]; };'
expect_bad reserved-property 2 acks '# kbridge owns acks (durability), bootstrap.servers, ...
kafka = { properties = [ "acks=1" ]; };'
expect_bad syntax-error 3 '' '# comment
threads = 2;
log_level = ;'
expect_bad syntax-missing-semicolon 3 '' '# comment
publish = { max_record_bytes = 10 }
subscribe = { max_batch = 10; ;'

# --- a missing file ---
run_check "$T/no-such-file.conf"
test "$RC" = 1 || fail "a missing file: kbridged -t exited with $RC, want 1"
grep -qF "$T/no-such-file.conf" "$T/err" || fail "a missing file: stderr does not name it: $(cat "$T/err")"
ok "a missing file: exit 1, stderr: $(head -n 1 "$T/err")"
