#!/bin/bash
# Bad publish input ends the call with INVALID_ARGUMENT, names the request and
# record, keeps what came before, and leaves the daemon serving:
# - a record of exactly publish.max_record_bytes passes, one byte more fails;
# - a record over the limit in request 2: the message names request 2,
#   record 5; trailer kbridge-durable-requests = 2; Kafka holds exactly the
#   20 records of requests 0 and 1;
# - an empty topic: the same, for request 1, record 1;
# - undecodable bytes (raw gRPC, no protobuf encoding), alone and after a
#   good request, for Publish and Subscribe.
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc
need "$KCAT"

mock_start big:3 empty:3 raw:1 ok:1
kbridged_conf 'publish = { max_record_bytes = 1000; };'
kbridged_start

# Checks a publish result: status, durable trailer and a regex on the message.
check_result() {
	check_py "$1" "$2" "$3" "$4" "$5" <<'EOF'
import json, re, sys
r = json.load(open(sys.argv[1]))
code, durable, pattern = sys.argv[2], int(sys.argv[3]), sys.argv[4]
assert r["code_name"] == code, f"status {r['code_name']} ({r['details']}), want {code}"
assert r["durable"] == durable, f"kbridge-durable-requests = {r['durable']!r}, want {durable}"
assert re.search(pattern, r["details"]), f"message {r['details']!r} does not match /{pattern}/"
EOF
}

# Kafka holds exactly the records with keys PREFIX<first..last> of TOPIC, once each.
check_kafka() {
	kcat_read "$2" -f '%k\n' | sort >"$T/$2.kcat"
	for ((i = $4; i <= $5; i++)); do echo "$3$i"; done | sort >"$T/$2.want"
	cmp -s "$T/$2.want" "$T/$2.kcat" ||
		fail "$1: kafka holds other records than $3$4..$3$5: $(diff "$T/$2.want" "$T/$2.kcat" | head -n 5)"
	ok "$1"
}

# --- the limit itself: 1000 bytes of value pass, 1001 do not ---
py publish --topic ok --records 1 --size 1000 >"$T/exact.json" ||
	fail "a record of exactly max_record_bytes was refused: $(cat "$T/exact.json")"
ok "a record of exactly max_record_bytes = 1000 is accepted"
py publish --topic ok --records 1 --size 1001 --expect INVALID_ARGUMENT >"$T/over.json" ||
	fail "a record of max_record_bytes + 1: $(cat "$T/over.json")"
check_result "a record of 1001 bytes: INVALID_ARGUMENT, request 0, record 0" \
	"$T/over.json" INVALID_ARGUMENT 0 'request 0, record 0\b'
# Key and headers count too: 6 bytes of key + 5 of header + 989 of value = 1000
# pass, with 990 of value (1001) they do not.
py publish --topic ok --records 1 --size 989 --key-prefix key- --start 10 --header h=abcd \
	>"$T/exact2.json" || fail "key + value + header of exactly 1000 bytes: $(cat "$T/exact2.json")"
py publish --topic ok --records 1 --size 990 --key-prefix key- --start 10 --header h=abcd \
	--expect INVALID_ARGUMENT >"$T/over2.json" ||
	fail "key + value + header over the limit: $(cat "$T/over2.json")"
ok "key, value and headers count towards max_record_bytes"

# --- an oversized record in request 2 ---
py publish --topic big --records 30 --size 100 --per-request 10 --key-prefix big- \
	--big-record 25:2000 --expect INVALID_ARGUMENT >"$T/big.json" ||
	fail "oversized record: $(cat "$T/big.json")"
check_result "an oversized record names request 2, record 5; 2 requests durable" \
	"$T/big.json" INVALID_ARGUMENT 2 'request 2, record 5\b'
check_kafka "kafka holds exactly the 20 records of the 2 durable requests" big big- 0 19

# --- an empty topic in request 1 ---
py publish --topic empty --records 6 --size 10 --per-request 2 --key-prefix e- \
	--empty-topic 3 --expect INVALID_ARGUMENT >"$T/empty.json" ||
	fail "empty topic: $(cat "$T/empty.json")"
check_result "an empty topic names request 1, record 1; 1 request durable" \
	"$T/empty.json" INVALID_ARGUMENT 1 'request 1, record 1\b'
check_kafka "kafka holds exactly the 2 records of the durable request" empty e- 0 1

# --- undecodable bytes ---
# 0a 05 = field 1, length 5, then nothing: a truncated message.
GOOD=$(PYTHONPATH="$PYGEN" "$PYTHON3" -c 'from kbridge.v1 import bridge_pb2 as b
print(b.PublishRequest(records=[b.Record(topic="raw", key=b"raw-0", value=b"good")]).SerializeToString().hex())')
py raw --method /kbridge.v1.Bridge/Publish --kind client-stream --hex 0a05 \
	--expect INVALID_ARGUMENT >"$T/raw1.json" || fail "undecodable Publish request: $(cat "$T/raw1.json")"
check_result "an undecodable first request: INVALID_ARGUMENT, request 0, 0 durable" \
	"$T/raw1.json" INVALID_ARGUMENT 0 'request 0\b'
py raw --method /kbridge.v1.Bridge/Publish --kind client-stream --hex "$GOOD" --hex ffffffff \
	--expect INVALID_ARGUMENT >"$T/raw2.json" || fail "undecodable second request: $(cat "$T/raw2.json")"
check_result "an undecodable second request: INVALID_ARGUMENT, request 1, 1 durable" \
	"$T/raw2.json" INVALID_ARGUMENT 1 'request 1\b'
check_kafka "kafka holds the good request sent before the undecodable one" raw raw- 0 0
py raw --method /kbridge.v1.Bridge/Subscribe --kind server-stream --hex 0a05 \
	--expect INVALID_ARGUMENT >"$T/raw3.json" || fail "undecodable Subscribe request: $(cat "$T/raw3.json")"
ok "an undecodable Subscribe request: INVALID_ARGUMENT"

# --- and the daemon still works ---
py publish --topic ok --records 50 --per-request 10 --key-prefix after- --start 100 >"$T/after.json" ||
	fail "publish after the bad input failed: $(cat "$T/after.json")"
expect_eq "$(json_get "$T/after.json" 'r["records"]')" 50 "records published after the bad input"
rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
