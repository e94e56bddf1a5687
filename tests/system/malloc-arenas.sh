#!/bin/bash
# glibc's malloc arenas: kbridged caps them at one per completion-queue thread (at
# least two, the main one included), so that its RSS stays flat under sustained
# load (kbridged(8) ENVIRONMENT); MALLOC_ARENA_MAX in its environment wins.
# glibc's arenas other than the main one each live in a heap mapped at a 64 MiB
# boundary, which /proc/PID/maps shows as an anonymous rw-p mapping starting there.
# - threads = 2: at most one such heap after publishing from 4 streams;
# - MALLOC_ARENA_MAX=16 in the environment: more than two (without the cap every
#   thread that allocates gets an arena of its own: 13-14 here).
. "$top_srcdir/tests/system/lib.sh"
need "$KBRIDGE"
test -z "${KBRIDGED_WRAPPER:-}" || skip "kbridged runs under $KBRIDGED_WRAPPER, whose malloc is not glibc's"

mock_start a:2
kbridged_conf 'threads = 2;'

heaps() { # the daemon's 64 MiB-aligned anonymous rw-p mappings
	local range perms offset dev inode path n=0
	while read -r range perms offset dev inode path; do
		[ "$perms" = rw-p ] && [ "$inode" = 0 ] && [ -z "$path" ] || continue
		(((16#${range%-*}) % (64 << 20) == 0)) && n=$((n + 1))
	done <"/proc/$KBRIDGED_PID/maps"
	echo "$n"
}
# heaps_after_load: starts the daemon, publishes from 4 streams, sets $HEAPS, stops it.
heaps_after_load() {
	kbridged_start
	if grep -q libasan "/proc/$KBRIDGED_PID/maps"; then
		kbridged_stop || true
		skip "an ASan build: malloc is ASan's"
	fi
	"$KBRIDGE" bench -a "$ADDR" -t a --records 4000 --batch 10 --streams 4 >"$T/bench.out" 2>&1 ||
		fail "kbridge bench failed: $(cat "$T/bench.out")"
	HEAPS=$(heaps)
	local rc=0
	kbridged_stop || rc=$?
	expect_eq "$rc" 0 "kbridged exit status"
}

heaps_after_load
check "threads = 2: at most 1 arena besides the main one (found $HEAPS)" test "$HEAPS" -le 1
KBRIDGED_ENV="MALLOC_ARENA_MAX=16" heaps_after_load
check "MALLOC_ARENA_MAX=16 in the environment lifts the cap: more than 2 arenas (found $HEAPS)" \
	test "$HEAPS" -gt 2
