#!/bin/bash
# make check: bench/vm-probe finds the spells it should in samples it is given (-r): the
# loop's usual time is the median of the samples not switched out; a sample at 3 times
# that or more, not switched out, is slow; slow samples at most 2.5 periods apart make one
# spell. Nothing here is timed.
set -euo pipefail
PROBE=${VM_PROBE:-${top_builddir:-.}/bench/vm-probe}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT

# 1,000 samples 5 ms apart, 20 us each, but: 100-105 at 5x and 107 at 4.5x (one spell:
# 107 starts 10 ms after 105 ends), 300 at 10x but switched out (not slow), 500 at 2.95x
# (not slow), 600 at exactly 3x (a spell of its own).
awk 'BEGIN {
	for (i = 0; i < 1000; i++) {
		ns = 20000; sw = 0
		if (i >= 100 && i <= 105) ns = 100000
		if (i == 107) ns = 90000
		if (i == 300) { ns = 200000; sw = 1 }
		if (i == 500) ns = 59000
		if (i == 600) ns = 60000
		printf "%.0f %d %d\n", 1000000000 + i * 5000000, ns, sw # %d stops at 2^31 in mawk
	}
}' >"$T/samples"
"$PROBE" -p 5 -r "$T/samples" -o "$T/out"
cat >"$T/want" <<'WANT'
# vm-probe: period 5 ms, loop 20.0 us, 1000 samples over 5.0 s, 8 slow, 2 spells covering 0.70% of the time
span 1000000000 5995020000
spell 1500000000 1535090000 7 5.0
spell 4000000000 4000060000 1 3.0
WANT
if ! diff -u "$T/want" "$T/out"; then
	echo "vm-probe-test: FAIL: the spells differ from the expected ones (above)"
	exit 1
fi

# Input it cannot read is an error, not an empty report.
echo "not a sample" >"$T/bad"
if "$PROBE" -r "$T/bad" -o "$T/out2" 2>"$T/err"; then
	echo "vm-probe-test: FAIL: a malformed samples file was accepted"
	exit 1
fi
grep -q 'not lines of' "$T/err" || { echo "vm-probe-test: FAIL: no clear error:"; cat "$T/err"; exit 1; }
echo "vm-probe-test: ok"
