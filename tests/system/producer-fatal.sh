#!/bin/bash
# A fatal idempotent-producer error ends a librdkafka producer for good. The mock
# answers one Produce request with INVALID_PRODUCER_EPOCH and the next with
# OUT_OF_ORDER_SEQUENCE_NUMBER, which librdkafka then treats as fatal. Checks:
# - the records concerned are refused with UNAVAILABLE, never acknowledged;
# - the daemon replaces its producer by itself and publishing works again;
# - Kafka holds every acknowledged record exactly once.
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc
need "$KCAT"

mock_start -b 3 f:1
kbridged_conf 'publish = { delivery_timeout_ms = 10000; };'
kbridged_start

publish() { # KEY-PREFIX [kbclient options]
	local prefix=$1
	shift
	py publish --topic f --records 10 --per-request 10 --key-prefix "$prefix" "$@" >"$T/pub-$prefix.json"
}

publish a
mock_ctl produce_errors 47 1
publish b --expect UNAVAILABLE
mock_ctl produce_errors 45 1
publish c --expect UNAVAILABLE
wait_until 30 "the daemon replaced the producer that hit a fatal error" \
	grep -q "a new producer replaced the one that hit a fatal error" "$T/kbridged.log"
log_has "fatal error OUT_OF_ORDER_SEQUENCE_NUMBER"
for p in d e g; do
	publish "$p"
done
ok "publishing works again after the fatal error"

kcat_read f -f '%k\n' | sort >"$T/keys"
for p in a d e g; do
	for ((i = 0; i < 10; i++)); do
		n=$(grep -cx "$p$i" "$T/keys" || true)
		expect_eq "$n" 1 "copies of acknowledged record $p$i in Kafka"
	done
done

rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status"
