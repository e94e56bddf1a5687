#!/bin/bash
# sd_notify, as systemd (Type=notify, WatchdogSec=) sees it, through a unix
# datagram socket named by NOTIFY_SOCKET:
# - READY=1 once the daemon serves, and a STATUS= line saying it serves
#   (publish calls, subscriptions, Kafka address);
# - STATUS= follows the number of publish calls: 1 while a call is open;
# - with WATCHDOG_USEC=2000000 in its environment (WATCHDOG_PID unset), the
#   daemon sends WATCHDOG=1 again and again (several within a few seconds);
# - STOPPING=1 on SIGTERM, then exit 0.
# Without WATCHDOG_USEC the daemon sends no WATCHDOG=1.
. "$top_srcdir/tests/system/lib.sh"
need_python_grpc

mock_start n:2
kbridged_conf
notify_listen

# --- 1. a plain run: READY, STATUS, STOPPING, no WATCHDOG ---
kbridged_start
notify_wait '^READY=1$'
notify_wait '^STATUS=serving: 0 publish calls, 0 subscriptions \(0 shared readers\); Kafka at '
log_has 'kbridged ready'

# A publish call held open (all sent, never half-closed) shows in STATUS
# (sent every 5 s and on changes).
py publish --topic n --records 10 --per-request 5 --hang --timeout 120 >/dev/null 2>"$T/hang.err" &
HUNG=$!
wait_until 30 "the open publish call sent its records" grep -q '^SENT' "$T/hang.err"
status_is() { test "$(notify_last STATUS)" = "$1"; }
wait_until 20 "STATUS with 1 publish call (last: $(notify_last STATUS))" \
	status_is "serving: 1 publish calls, 0 subscriptions (0 shared readers); Kafka at $BROKERS"
ok "STATUS counts the open publish call"
kill_tree "$HUNG" KILL
wait "$HUNG" 2>/dev/null || true
wait_until 20 "STATUS back to 0 publish calls after the client was killed" \
	status_is "serving: 0 publish calls, 0 subscriptions (0 shared readers); Kafka at $BROKERS"
ok "STATUS back to 0 publish calls"

sleep 1
if notify_has '^WATCHDOG='; then
	fail "WATCHDOG=1 sent although the daemon has no WATCHDOG_USEC"
fi
ok "no WATCHDOG=1 without WATCHDOG_USEC"
notify_has '^STOPPING=1$' && fail "STOPPING=1 before SIGTERM"
rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM"
notify_wait '^STOPPING=1$' 5
check "STOPPING=1 comes after READY=1" test \
	"$(grep -Enm1 '^STOPPING=1$' "$T/notify.log" | cut -d: -f1)" -gt \
	"$(grep -Enm1 '^READY=1$' "$T/notify.log" | cut -d: -f1)"

# --- 2. with a watchdog of 2 s ---
: >"$T/notify.log"
unset WATCHDOG_PID
KBRIDGED_ENV="WATCHDOG_USEC=2000000"
kbridged_start
notify_wait '^READY=1$'
watchdogs() { grep -c '^WATCHDOG=1$' "$T/notify.log" || true; }
# The daemon should ping at least every second (half the period); several
# pings over a generous wait show it keeps doing so, whatever the load.
several_watchdogs() { test "$(watchdogs)" -ge 4; }
wait_until 30 "4 WATCHDOG=1 messages" several_watchdogs
ok "$(watchdogs) WATCHDOG=1 messages"
# Still serving while it pings.
py publish --topic n --records 10 --per-request 5 >"$T/pub.json" ||
	fail "publish with the watchdog on: $(cat "$T/pub.json")"
expect_eq "$(json_get "$T/pub.json" 'r["records"]')" 10 "records published with the watchdog on"
before=$(watchdogs)
more_watchdogs() { test "$(watchdogs)" -gt "$before"; }
wait_until 30 "WATCHDOG=1 after the publish" more_watchdogs
ok "WATCHDOG=1 goes on after the publish"
rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM (watchdog run)"
notify_wait '^STOPPING=1$' 5

# --- 3. WATCHDOG_PID naming another process: not ours, no pings ---
: >"$T/notify.log"
KBRIDGED_ENV="WATCHDOG_USEC=2000000 WATCHDOG_PID=1"
kbridged_start
notify_wait '^READY=1$'
sleep 3
if notify_has '^WATCHDOG='; then
	fail "WATCHDOG=1 sent although WATCHDOG_PID names another process"
fi
ok "no WATCHDOG=1 when WATCHDOG_PID is another process"
rc=0
kbridged_stop || rc=$?
expect_eq "$rc" 0 "kbridged exit status after SIGTERM (WATCHDOG_PID=1)"
