# lib.sh: shared helpers for the kbridge scenario tests (bash).
#
# Every test in tests/system/ starts with
#     . "$top_srcdir/tests/system/lib.sh"
# and runs from the build directory under `make check` (in parallel with the
# others), which exports top_srcdir, top_builddir, KBRIDGED, KBRIDGE,
# MOCK_KAFKA, PYTHON3, NODE, KCAT, PYGEN, PROTO_DIR and NODE_MODULES.
# Exit status: 0 pass, 1 fail, 77 skip.
#
# Sourcing this file sets `set -euo pipefail`, makes the scratch directory $T
# afresh ($top_builddir/tests/system/NAME.dir), and installs an EXIT trap that
# kills every process the test started (mock, daemon, and any background job
# such as `cmd &`, with their children) and, when the test fails, prints the
# tail of $T/kbridged.log and $T/mock.log to stderr.
#
# Skipping
#   need CMD...            skip (77) unless every CMD (name or path) is executable
#   need_python_grpc       skip unless $PYTHON3 imports grpc and the generated stubs
#   need_node              skip unless $NODE and $NODE_MODULES/@grpc/grpc-js exist
# Mock Kafka (tests/kbridge-mock-kafka)
#   mock_start [-b N] TOPIC:PARTITIONS...
#                          start a mock cluster of N brokers (default 3); sets
#                          $BROKERS (bootstrap list) and $MOCK_PID; stdout in
#                          $T/mock.out, stderr in $T/mock.log, control FIFO $T/mock.ctl
#   mock_ctl COMMAND...    send a control command to the mock and wait for its
#                          answer: `down B`, `up B`, `rtt B MS`, `topic NAME N`;
#                          fails the test on an error answer
# Daemon
#   kbridged_conf [BLOCK...]
#                          write $T/kbridged.conf: each BLOCK is a whole libconfig
#                          setting or group, e.g. 'publish = { max_record_bytes = 1000; };'.
#                          Defaults are written only for the names no BLOCK sets:
#                            listen = [ "unix:$T/kb.sock" ]; log_level = "info";
#                            kafka = { brokers = "$BROKERS"; };
#                          (a test that passes its own kafka block sets brokers itself)
#   kbridged_start         start "$KBRIDGED" -c $T/kbridged.conf (prefixed by
#                          $KBRIDGED_WRAPPER if set, e.g. "valgrind -q"), stderr in
#                          $T/kbridged.log; waits for `kbridged ready` (30 s, or
#                          $KBRIDGED_START_TIMEOUT); sets $KBRIDGED_PID and $ADDR
#                          (the first `listen` address of the file; a long $T gets
#                          its socket under /tmp, as unix paths are limited to 108 bytes)
#   kbridged_stop [SIGNAL] send SIGNAL (default TERM), wait (60 s, or
#                          $KBRIDGED_STOP_TIMEOUT, then SIGKILL and fail) and
#                          return the daemon's exit status: use
#                          `rc=0; kbridged_stop || rc=$?` to look at it
#   kbridged_alive         succeed while the daemon process runs
#   KBRIDGED_ENV           NAME=VALUE words added to the daemon's environment only
#                          (e.g. KBRIDGED_ENV="WATCHDOG_USEC=2000000"), read by kbridged_start
# sd_notify (the daemon's READY=1, STATUS=..., STOPPING=1, WATCHDOG=1)
#   notify_listen          before kbridged_start: listen on a unix datagram socket
#                          ($T/notify.sock, or under /tmp when $T is long) and append
#                          every datagram to $T/notify.log, one assignment a line;
#                          kbridged_start then passes NOTIFY_SOCKET to the daemon
#   notify_has ERE         succeed if a line of $T/notify.log matches ERE
#   notify_wait ERE [SECONDS]
#                          wait (default 30 s) for a line matching ERE; fail after
#   notify_last NAME       print the value of the last NAME=... line (e.g. STATUS)
# Clients
#   py ARGS...             run tests/clients/python/kbclient.py --address $ADDR ARGS
#                          with PYTHONPATH=$PYGEN (see kbclient.py --help)
#   kcat_read TOPIC [KCAT ARGS...]
#                          read TOPIC from the beginning to its end with kcat
#                          (-C -e -q), at most 60 s
#   kill_tree PID [SIGNAL] send SIGNAL (default TERM) to PID and all its descendants.
#                          `py ... &` or `myfunc &` makes $! a bash subshell whose
#                          child is the client: `kill -9 $!` alone would miss it.
# Assertions: each prints what it checked ("ok: ...") or fails the test
#   fail MESSAGE           print "FAIL: MESSAGE" and exit 1
#   skip MESSAGE           print "SKIP: MESSAGE" and exit 77
#   check DESCRIPTION COMMAND...
#                          run COMMAND; fail with DESCRIPTION unless it succeeds
#   expect_eq GOT WANT WHAT
#                          fail unless GOT = WANT (strings)
#   log_has ERE [FILE]     fail unless FILE (default $T/kbridged.log) matches ERE
#   log_lacks ERE [FILE]   fail if FILE (default $T/kbridged.log) matches ERE
#   wait_until SECONDS DESCRIPTION COMMAND...
#                          poll COMMAND every 0.1 s; fail after SECONDS. COMMAND
#                          runs each time, but a $(...) in it is expanded only once,
#                          when wait_until is called: wrap such checks in a function.
#   check_each_once DESCRIPTION FILE N
#                          FILE (kbclient subscribe JSON lines) holds the records keyed
#                          X-0..X-(N-1) (any one-letter prefix), each exactly once, with
#                          offsets rising by one per partition
#   check_py DESCRIPTION [ARGS...] <<'EOF' ... EOF
#                          run the Python script on stdin with ARGS (sys.argv[1:]);
#                          fail with DESCRIPTION (and what the script printed)
#                          unless it exits 0
#   json_get FILE EXPR     print a Python expression over the JSON in FILE,
#                          bound to `r` (e.g. json_get "$T/pub.json" 'r["records"]')

set -euo pipefail

# Defaults for running a test by hand from the build directory.
: "${top_srcdir:=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
: "${top_builddir:=$PWD}"
: "${KBRIDGED:=$top_builddir/src/kbridged}"
: "${KBRIDGE:=$top_builddir/src/kbridge}"
: "${MOCK_KAFKA:=$top_builddir/tests/kbridge-mock-kafka}"
: "${PYTHON3:=/usr/bin/python3}"
: "${NODE:=node}"
: "${KCAT:=kcat}"
: "${PYGEN:=$top_builddir/gen/python}"
: "${PROTO_DIR:=$top_srcdir/proto}"
: "${NODE_MODULES:=$top_srcdir/tests/clients/node/node_modules}"
export top_srcdir top_builddir KBRIDGED KBRIDGE MOCK_KAFKA PYTHON3 NODE KCAT PYGEN \
	PROTO_DIR NODE_MODULES

TEST_NAME=$(basename "$0" .sh)
T="$top_builddir/tests/system/$TEST_NAME.dir"
rm -rf "$T"
mkdir -p "$T"

BROKERS=
ADDR=
MOCK_PID=
KBRIDGED_PID=
_LIB_SOCKDIR=
NOTIFY_PID=
NOTIFY_SOCK=

# --- messages and assertions ---

fail() {
	echo "FAIL: $TEST_NAME: $*" >&2
	exit 1
}

skip() {
	echo "SKIP: $TEST_NAME: $*" >&2
	exit 77
}

ok() {
	echo "ok: $*"
}

check() {
	local what=$1
	shift
	"$@" || fail "$what (command: $*)"
	ok "$what"
}

expect_eq() {
	test "$1" = "$2" || fail "$3: got '$1', want '$2'"
	ok "$3 = '$2'"
}

log_has() {
	local file=${2:-$T/kbridged.log}
	grep -Eq -- "$1" "$file" || fail "$(basename "$file") has no line matching /$1/"
	ok "$(basename "$file") matches /$1/"
}

log_lacks() {
	local file=${2:-$T/kbridged.log}
	if grep -Eq -- "$1" "$file"; then
		fail "$(basename "$file") has a line matching /$1/: $(grep -Em 3 -- "$1" "$file")"
	fi
	ok "$(basename "$file") has no line matching /$1/"
}

wait_until() {
	local secs=$1 what=$2 i
	shift 2
	for ((i = 0; i < secs * 10; i++)); do
		"$@" && return 0
		sleep 0.1
	done
	fail "timed out after ${secs}s waiting for: $what"
}

check_py() {
	local what=$1
	shift
	"$PYTHON3" - "$@" || fail "$what"
	ok "$what"
}

check_each_once() {
	check_py "$1" "$2" "$3" <<'EOF'
import json, sys
n = int(sys.argv[2])
prev, seen = {}, set()
for l in open(sys.argv[1]):
    r = json.loads(l)
    i = int(r["key"][2:])
    assert i not in seen, f"record {i} twice"
    seen.add(i)
    p = r["partition"]
    assert p not in prev or r["offset"] == prev[p] + 1, f"partition {p}: offset {r['offset']} after {prev[p]}"
    prev[p] = r["offset"]
missing = sorted(set(range(n)) - seen)
assert not missing, f"{len(missing)} records missing, first {missing[:5]}"
assert len(seen) == n, f"{len(seen)} records, want {n}"
EOF
}

json_get() {
	"$PYTHON3" -c 'import json, sys
r = json.load(open(sys.argv[1]))
print(eval(sys.argv[2]))' "$1" "$2"
}

# --- skipping ---

need() {
	local c
	for c in "$@"; do
		test -n "$c" || skip "a required tool was not found by configure (empty variable)"
		command -v "$c" >/dev/null 2>&1 || skip "$c is not available"
	done
}

need_python_grpc() {
	need "$PYTHON3"
	test -s "$PYGEN/kbridge/v1/bridge_pb2.py" && test -s "$PYGEN/kbridge/v1/bridge_pb2_grpc.py" ||
		skip "no Python stubs in $PYGEN (protoc or grpc_python_plugin missing at configure time)"
	PYTHONPATH="$PYGEN" "$PYTHON3" -c 'import grpc
from kbridge.v1 import bridge_pb2, bridge_pb2_grpc' >/dev/null 2>&1 ||
		skip "$PYTHON3 cannot import grpc and the kbridge stubs (install python3-grpcio python3-protobuf)"
}

need_node() {
	need "$NODE"
	test -d "$NODE_MODULES/@grpc/grpc-js" ||
		skip "$NODE_MODULES/@grpc/grpc-js is missing (npm ci in tests/clients/node)"
}

# --- processes ---

# Prints PID and all its descendants, children first.
_lib_tree() {
	local c
	for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do
		_lib_tree "$c"
	done
	echo "$1"
}

_lib_kill_tree() {
	local p
	for p in $(_lib_tree "$1"); do
		kill "-$2" "$p" 2>/dev/null || true
	done
}

kill_tree() {
	_lib_kill_tree "$1" "${2:-TERM}"
}

_lib_stop_all() {
	local p i alive
	for p in "$@"; do
		_lib_kill_tree "$p" TERM
	done
	for ((i = 0; i < 50; i++)); do
		alive=
		for p in "$@"; do
			kill -0 "$p" 2>/dev/null && alive=1
		done
		test -z "$alive" && break
		sleep 0.1
	done
	for p in "$@"; do
		_lib_kill_tree "$p" KILL
	done
}

_lib_exit() {
	local rc=$? f
	set +e
	trap - EXIT
	# The daemon first, politely (ASan and valgrind report at exit; the mock
	# should outlive it), then the mock and every other background job of
	# this shell, with their children.
	test -n "$KBRIDGED_PID" && _lib_stop_all "$KBRIDGED_PID"
	# shellcheck disable=SC2046 # one pid a word
	_lib_stop_all $MOCK_PID $(jobs -p)
	wait 2>/dev/null
	if test "$rc" != 0 && test "$rc" != 77; then
		for f in "$T/kbridged.log" "$T/mock.log"; do
			test -s "$f" || continue
			echo "--- last lines of $f ---" >&2
			tail -n 40 "$f" >&2
		done
		echo "FAILED: $TEST_NAME (exit $rc); files in $T" >&2
	fi
	test -n "$_LIB_SOCKDIR" && rm -rf "$_LIB_SOCKDIR"
	exit "$rc"
}
trap _lib_exit EXIT

# --- mock Kafka ---

mock_start() {
	local nbrokers=3 topic args=()
	if test "${1:-}" = -b; then
		nbrokers=$2
		shift 2
	fi
	test -x "$MOCK_KAFKA" || fail "$MOCK_KAFKA is not built (make tests/kbridge-mock-kafka)"
	for topic in "$@"; do
		args+=(-t "$topic")
	done
	rm -f "$T/mock.ctl"
	mkfifo "$T/mock.ctl"
	"$MOCK_KAFKA" -b "$nbrokers" -C "$T/mock.ctl" "${args[@]}" >"$T/mock.out" 2>"$T/mock.log" &
	MOCK_PID=$!
	local i
	for ((i = 0; i < 300; i++)); do
		test -s "$T/mock.out" && break
		kill -0 "$MOCK_PID" 2>/dev/null || fail "the mock Kafka cluster died: $(cat "$T/mock.log")"
		sleep 0.1
	done
	BROKERS=$(head -n 1 "$T/mock.out")
	test -n "$BROKERS" || fail "the mock Kafka cluster printed no bootstrap servers in 30 s"
	ok "mock Kafka: $nbrokers brokers at $BROKERS; topics: $*"
}

mock_ctl() {
	local before i answer
	test -n "$MOCK_PID" || fail "mock_ctl: no mock running"
	before=$(wc -l <"$T/mock.out")
	echo "$*" >"$T/mock.ctl"
	for ((i = 0; i < 300; i++)); do
		test "$(wc -l <"$T/mock.out")" -gt "$before" && break
		sleep 0.1
	done
	answer=$(sed -n "$((before + 1))p" "$T/mock.out")
	test "$answer" = ok || fail "mock command '$*': ${answer:-no answer in 30 s}"
	ok "mock: $*"
}

# --- the daemon ---

# Sets _LIB_SOCK to a path for the unix socket NAME: $T/NAME, unless that
# would not fit in sun_path (108 bytes): deep build directories get a short
# one under /tmp instead.
_lib_sock_path() {
	_LIB_SOCK="$T/$1"
	if test "${#_LIB_SOCK}" -gt 100; then
		test -n "$_LIB_SOCKDIR" || _LIB_SOCKDIR=$(mktemp -d /tmp/kbtest.XXXXXX)
		_LIB_SOCK="$_LIB_SOCKDIR/$1"
	fi
}

# shellcheck disable=SC2120 # the blocks are optional
kbridged_conf() {
	local block name given=" "
	for block in "$@"; do
		name=$(printf '%s\n' "$block" | sed -nE '1s/^[[:space:]]*([A-Za-z_][A-Za-z0-9_-]*).*/\1/p')
		given+="$name "
	done
	_lib_sock_path kb.sock
	ADDR="unix:$_LIB_SOCK"
	{
		echo "# written by $TEST_NAME.sh (tests/system/lib.sh)"
		case $given in *" listen "*) ;; *) echo "listen = [ \"$ADDR\" ];" ;; esac
		case $given in *" log_level "*) ;; *) echo 'log_level = "info";' ;; esac
		case $given in *" kafka "*) ;; *) echo "kafka = { brokers = \"$BROKERS\"; };" ;; esac
		for block in "$@"; do
			printf '%s\n' "$block"
		done
	} >"$T/kbridged.conf"
}

kbridged_alive() {
	test -n "$KBRIDGED_PID" && kill -0 "$KBRIDGED_PID" 2>/dev/null
}

kbridged_start() {
	local timeout=${KBRIDGED_START_TIMEOUT:-30} i
	test -x "$KBRIDGED" || fail "$KBRIDGED is not built (make src/kbridged)"
	test -f "$T/kbridged.conf" || kbridged_conf
	# The address written in the file, so a test's own `listen` works too.
	ADDR=$(sed -nE 's/^[[:space:]]*listen[[:space:]]*=[[:space:]]*\[[[:space:]]*"([^"]*)".*/\1/p' \
		"$T/kbridged.conf" | head -n 1)
	# Only this start's lines count: a restarted daemon appends to the log.
	local from=1
	test -f "$T/kbridged.log" && from=$(($(wc -l <"$T/kbridged.log") + 1))
	_lib_ready() { tail -n +"$from" "$T/kbridged.log" | grep -q 'kbridged ready'; }
	local envs=()
	test -n "$NOTIFY_SOCK" && envs+=("NOTIFY_SOCKET=$NOTIFY_SOCK")
	# shellcheck disable=SC2206 # NAME=VALUE words
	envs+=(${KBRIDGED_ENV:-})
	# env execs the daemon (or its wrapper): $! is the daemon's pid.
	# shellcheck disable=SC2086 # the wrapper is a command line to split
	env "${envs[@]}" ${KBRIDGED_WRAPPER:-} "$KBRIDGED" -c "$T/kbridged.conf" 2>>"$T/kbridged.log" &
	KBRIDGED_PID=$!
	for ((i = 0; i < timeout * 10; i++)); do
		_lib_ready && break
		if ! kbridged_alive; then
			local rc=0
			wait "$KBRIDGED_PID" || rc=$?
			KBRIDGED_PID=
			fail "kbridged exited with status $rc before it was ready"
		fi
		sleep 0.1
	done
	_lib_ready || fail "kbridged did not log 'kbridged ready' within ${timeout}s"
	ok "kbridged ready (pid $KBRIDGED_PID) at $ADDR"
}

kbridged_stop() {
	local sig=${1:-TERM} timeout=${KBRIDGED_STOP_TIMEOUT:-60} i rc=0
	test -n "$KBRIDGED_PID" || fail "kbridged_stop: kbridged is not running"
	kill "-$sig" "$KBRIDGED_PID" 2>/dev/null || true
	for ((i = 0; i < timeout * 10; i++)); do
		kbridged_alive || break
		sleep 0.1
	done
	if kbridged_alive; then
		_lib_kill_tree "$KBRIDGED_PID" KILL
		wait "$KBRIDGED_PID" 2>/dev/null || true
		KBRIDGED_PID=
		fail "kbridged did not exit within ${timeout}s of SIG$sig"
	fi
	wait "$KBRIDGED_PID" || rc=$?
	KBRIDGED_PID=
	echo "kbridged exited with status $rc after SIG$sig"
	return "$rc"
}

# --- sd_notify ---

notify_listen() {
	_lib_sock_path notify.sock
	NOTIFY_SOCK=$_LIB_SOCK
	rm -f "$NOTIFY_SOCK"
	: >"$T/notify.log"
	# One datagram may hold several assignments (STOPPING=1\nSTATUS=...).
	"$PYTHON3" -c 'import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
with open(sys.argv[2], "a") as log:
    while True:
        data = s.recv(65536).decode("utf-8", "backslashreplace")
        for line in data.splitlines():
            if line:
                log.write(line + "\n")
        log.flush()' "$NOTIFY_SOCK" "$T/notify.log" &
	NOTIFY_PID=$!
	local i
	for ((i = 0; i < 100; i++)); do
		test -S "$NOTIFY_SOCK" && break
		kill -0 "$NOTIFY_PID" 2>/dev/null || fail "the notify listener died"
		sleep 0.1
	done
	test -S "$NOTIFY_SOCK" || fail "the notify listener did not bind $NOTIFY_SOCK in 10 s"
	ok "listening for sd_notify datagrams at $NOTIFY_SOCK"
}

notify_has() {
	grep -Eq -- "$1" "$T/notify.log"
}

notify_wait() {
	local i secs=${2:-30}
	for ((i = 0; i < secs * 10; i++)); do
		notify_has "$1" && break
		sleep 0.1
	done
	notify_has "$1" || fail "no sd_notify message matching /$1/ in ${secs}s; got: $(tail -n 5 "$T/notify.log" | tr '\n' '|')"
	ok "sd_notify: $(grep -Em 1 -- "$1" "$T/notify.log")"
}

notify_last() {
	sed -n "s/^$1=//p" "$T/notify.log" | tail -n 1
}

# --- clients ---

py() {
	PYTHONPATH="$PYGEN" "$PYTHON3" "$top_srcdir/tests/clients/python/kbclient.py" \
		--address "$ADDR" "$@"
}

kcat_read() {
	local topic=$1
	shift
	timeout 60 "$KCAT" -b "$BROKERS" -C -t "$topic" -e -q "$@"
}
