#!/bin/sh
# Verify that the ring-0 code of the probe (boot.rs assembly in .text.entry and
# ring0.rs in .text.ring0, linked first in .text up to __ring0_text_end) uses
# no SSE/AVX/x87-MMX registers and calls nothing outside itself. Ring 0 is
# emulated instruction by instruction on the development host, and its
# emulator cannot run those instructions.
# Usage: ./check-ring0.sh [path/to/probe]
set -eu
elf=${1:-$(dirname "$0")/target/x86_64-unknown-linux-gnu/release/probe}
start=$(nm "$elf" | awk '$3 == "__image_start" { print $1 }')
end=$(nm "$elf" | awk '$3 == "__ring0_text_end" { print $1 }')
[ -n "$start" ] && [ -n "$end" ] || { echo "check-ring0: symbols not found in $elf" >&2; exit 2; }
dis=$(objdump -d --no-show-raw-insn --start-address=0x"$start" --stop-address=0x"$end" "$elf")
bad=0
if echo "$dis" | grep -E '%(x|y|z)mm[0-9]|%mm[0-7]|\b(fld|fst|fxsave|fxrstor|xsave|xrstor|ldmxcsr|stmxcsr)' ; then
    echo "check-ring0: SSE/AVX/x87 instructions in ring-0 code" >&2
    bad=1
fi
# Direct calls/jumps must stay inside [start, end).
outside=$(echo "$dis" | awk -v s=$((0x$start)) -v e=$((0x$end)) '
    function hex(h,   v, i) {
        v = 0
        for (i = 1; i <= length(h); i++) v = v * 16 + index("0123456789abcdef", substr(h, i, 1)) - 1
        return v
    }
    /\t(call|jmp|j[a-z]+) +[0-9a-f]+ </ {
        for (i = 1; i <= NF; i++) if ($i ~ /^(call|jmp|j[a-z]+)$/) { t = hex($(i+1)); break }
        if (t < s || t >= e) print
    }')
if [ -n "$outside" ]; then
    echo "$outside"
    echo "check-ring0: ring-0 code branches outside the ring-0 text" >&2
    bad=1
fi
n=$(echo "$dis" | grep -c '^ ' || true)
[ $bad -eq 0 ] && echo "check-ring0: ok ($n instructions in 0x$start..0x$end, no SSE, no outside calls)"
exit $bad
