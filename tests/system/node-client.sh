#!/bin/bash
# A Node (grpc-js + proto-loader) client against kbridged: the contract file
# must work with a second protobuf implementation, not only with ours.
# - 5,000 keyed records with a header over one Publish stream: the response
#   counts them, and Kafka holds each exactly once with its key and header;
# - a LATEST subscriber that has seen the initial metadata receives everything
#   published afterwards, in order per partition, with contiguous offsets;
# - an oversized record ends the call with INVALID_ARGUMENT and the trailer
#   kbridge-durable-requests.
. "$top_srcdir/tests/system/lib.sh"
need_node

CLIENT="$top_srcdir/tests/clients/node/client.js"
# NODE_PATH lets client.js find the packages when the build dir is elsewhere.
nodec() { NODE_PATH="$NODE_MODULES" PROTO_DIR="$PROTO_DIR" "$NODE" "$CLIENT" "$@"; }
# Runs a check written in JavaScript, read from stdin, with arguments.
check_js() { "$NODE" - "$@"; }

TOPIC=nodetest
mock_start "$TOPIC:3"
kbridged_conf 'publish = { max_record_bytes = 4096; };'
kbridged_start

# --- 1. 5,000 records with keys and a header over one stream ---
nodec publish --address "$ADDR" --topic "$TOPIC" --records 5000 --size 100 \
	--per-request 50 --key-prefix key- --header origin=node >"$T/pub1.json" ||
	fail "node publish of 5,000 records failed: $(cat "$T/pub1.json")"
check_js "$T/pub1.json" 5000 <<'EOF' || fail "publish response: $(cat "$T/pub1.json")"
const fs = require('fs');
const [file, want] = process.argv.slice(2);
const r = JSON.parse(fs.readFileSync(file, 'utf8'));
const die = (m) => { console.error(m); process.exit(1); };
if (Number(r.records) !== Number(want))
	die(`records = ${r.records}, want ${want}`);
let sum = 0;
for (const g of r.ranges) {
	const n = Number(g.last_offset) - Number(g.first_offset) + 1;
	if (n !== Number(g.count))
		die(`range ${JSON.stringify(g)}: count does not match its offsets`);
	sum += Number(g.count);
}
if (sum !== Number(want))
	die(`ranges add up to ${sum}, want ${want}`);
EOF
ok "publish response counts 5,000 records in its ranges"

kcat_read "$TOPIC" -f '%p\t%o\t%k\t%h\t%s\n' >"$T/kcat1.txt"
check_js "$T/kcat1.txt" 5000 <<'EOF' || fail "kafka does not hold the 5,000 records exactly once"
const fs = require('fs');
const [file, want] = process.argv.slice(2);
const die = (m) => { console.error(m); process.exit(1); };
const lines = fs.readFileSync(file, 'utf8').split('\n').filter((l) => l !== '');
if (lines.length !== Number(want))
	die(`kcat shows ${lines.length} records, want ${want}`);
const seen = new Set();
for (const l of lines) {
	const [p, o, key, hdrs, value] = l.split('\t');
	const m = /^v(\d+)-x*$/.exec(value);
	if (!m)
		die(`unexpected value at ${p}/${o}: ${value}`);
	if (value.length !== 100)
		die(`value at ${p}/${o} has ${value.length} bytes, want 100`);
	if (seen.has(m[1]))
		die(`record ${m[1]} is in Kafka twice`);
	seen.add(m[1]);
	if (key !== `key-${m[1]}`)
		die(`record ${m[1]} has key '${key}'`);
	if (hdrs !== 'origin=node')
		die(`record ${m[1]} has headers '${hdrs}'`);
}
EOF
ok "kafka holds the 5,000 records exactly once, with keys and header"

# --- 2. a LATEST subscriber sees what is published after READY ---
nodec subscribe --address "$ADDR" --topic "$TOPIC" --from latest --count 2000 \
	--max-batch 100 --timeout 60 >"$T/sub.out" 2>"$T/sub.err" &
SUB_PID=$!
sub_ready() {
	grep -q '^READY$' "$T/sub.err" && return 0
	kill -0 "$SUB_PID" 2>/dev/null ||
		fail "subscriber exited before READY: $(cat "$T/sub.err" "$T/sub.out")"
	return 1
}
wait_until 30 "initial metadata on the subscriber" sub_ready
ok "subscriber READY"
nodec publish --address "$ADDR" --topic "$TOPIC" --records 2000 --size 64 \
	--per-request 10 --key-prefix later- >"$T/pub2.json" ||
	fail "second node publish failed: $(cat "$T/pub2.json")"
SUB_RC=0
wait "$SUB_PID" || SUB_RC=$?
test "$SUB_RC" = 0 || fail "subscriber exited with $SUB_RC: $(cat "$T/sub.err"; tail -n 3 "$T/sub.out")"
check_js "$T/sub.out" "$T/pub2.json" 2000 <<'EOF' || fail "subscriber output is wrong"
const fs = require('fs');
const [file, pubFile, want] = process.argv.slice(2);
const die = (m) => { console.error(m); process.exit(1); };
const recs = fs.readFileSync(file, 'utf8').split('\n').filter((l) => l !== '').map((l) => JSON.parse(l));
if (recs.length !== Number(want))
	die(`subscriber printed ${recs.length} records, want ${want}`);
// Per partition: offsets contiguous and rising, and records in the order
// they were published (one stream, so Kafka keeps its order per partition).
const last = new Map();
const seen = new Set();
for (const r of recs) {
	const m = /^later-(\d+)$/.exec(r.key);
	if (!m)
		die(`subscriber got a record published before READY: ${JSON.stringify(r)}`);
	const n = Number(m[1]);
	if (seen.has(n))
		die(`record ${n} delivered twice`);
	seen.add(n);
	if (r.value !== `v${n}-`.padEnd(64, 'x'))
		die(`record ${n} has value '${r.value}'`);
	const prev = last.get(r.partition);
	if (prev && (r.offset !== prev.offset + 1 || n <= prev.n))
		die(`partition ${r.partition}: offset ${r.offset} (record ${n}) after offset ${prev.offset} (record ${prev.n})`);
	if (r.topic !== 'nodetest')
		die(`record ${n} has topic '${r.topic}'`);
	last.set(r.partition, { offset: r.offset, n });
}
// The publish response's ranges name the same offsets the subscriber saw.
const pub = JSON.parse(fs.readFileSync(pubFile, 'utf8'));
for (const g of pub.ranges) {
	const got = recs.filter((r) => r.partition === g.partition);
	if (got.length !== Number(g.count) || got[0].offset !== Number(g.first_offset) ||
	    got[got.length - 1].offset !== Number(g.last_offset))
		die(`partition ${g.partition}: published ${JSON.stringify(g)}, subscriber saw ${got.length} records from ${got[0] && got[0].offset}`);
}
EOF
ok "LATEST subscriber got the 2,000 later records, in order, offsets contiguous"

# --- 3. an oversized record: INVALID_ARGUMENT, two leading requests durable ---
# Requests of 10 records; record 25 (request 2, record 5) is over 4096 bytes.
RC=0
nodec publish --address "$ADDR" --topic "$TOPIC" --records 30 --size 100 \
	--per-request 10 --big-record 25:10000 >"$T/pub3.json" || RC=$?
test "$RC" = 1 || fail "oversized publish exited with $RC, want 1: $(cat "$T/pub3.json")"
check_js "$T/pub3.json" <<'EOF' || fail "oversized record: $(cat "$T/pub3.json")"
const r = JSON.parse(require('fs').readFileSync(process.argv[2], 'utf8'));
const die = (m) => { console.error(m); process.exit(1); };
if (r.code !== 3)
	die(`code ${r.code}, want 3 (INVALID_ARGUMENT)`);
if (r.durable !== 2)
	die(`kbridge-durable-requests = ${r.durable}, want 2`);
if (!/request 2, record 5\b/.test(r.details))
	die(`message does not name request 2, record 5: ${r.details}`);
EOF
ok "oversized record: INVALID_ARGUMENT, kbridge-durable-requests = 2"

kbridged_stop
