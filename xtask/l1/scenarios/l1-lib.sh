# What the L1 sides of the resource scenarios (balloon.sh, cpuhotplug.sh, memhotplug.sh)
# share: check reporting, L1's clock, a process's RSS, waiting for a VM's output and for the
# VMM's exit. Sourced by them (it is /rig/l1/l1-lib.sh in L1) after they set TAG and case_.
# Report lines: "$TAG-PASS CASE/CHECK: what", "$TAG-FAIL CASE/CHECK: why".

failed=0
pass() { echo "$TAG-PASS $case_/$1: $2"; }
fail() { failed=1; echo "$TAG-FAIL $case_/$1: $2"; }
# Milliseconds of L1's uptime.
now_ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
# rss_kb PID: the process's resident memory in kB.
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null; }
# oneline TEXT: TEXT with its lines joined by '|' (for one report line).
oneline() { echo "$1" | tr -d '\r' | tr '\n' '|'; }
# wait_for FILE PATTERN SECONDS [PID]: until FILE matches the extended regular expression,
# looking every POLL_S seconds (default 0.2; L1 is one emulated CPU that the guest's vCPUs
# share, so a script whose guest works hard looks less often); fails at once if PID exits.
wait_for() {
    _n=0
    _tries=$(awk -v s="$3" -v p="${POLL_S:-0.2}" 'BEGIN { printf "%d", s / p }')
    while ! grep -q -E "$2" "$1" 2>/dev/null; do
        _n=$((_n + 1))
        [ $_n -gt "$_tries" ] && return 1
        [ -n "${4:-}" ] && ! kill -0 "$4" 2>/dev/null && return 1
        sleep "${POLL_S:-0.2}"
    done
}
# finish_vmm CHECK PID OUT: the VMM PID must exit 0 (its guest powered off) within 120 s;
# prints its output OUT.
finish_vmm() {
    _n=0
    while kill -0 "$2" 2>/dev/null; do
        _n=$((_n + 1))
        if [ $_n -gt 600 ]; then
            fail "$1" "the VMM still running 120 s after the guest's part"
            kill -9 "$2"
            break
        fi
        sleep 0.2
    done
    wait "$2"
    _rc=$?
    cat "$3"
    if [ "$_rc" = 0 ]; then
        pass "$1" "the guest powered off and the VMM exited 0"
    else
        fail "$1" "the VMM exited with status $_rc"
    fi
}
# verdict: "$TAG-OK CASE" and exit 0 when every check passed.
verdict() {
    if [ "$failed" = 0 ]; then
        echo "$TAG-OK $case_"
        exit 0
    fi
    echo "$TAG-FAILED $case_"
    exit 1
}
