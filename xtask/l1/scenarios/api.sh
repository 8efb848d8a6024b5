#!/bin/sh
# L1 side of the control-API scenario (xtask/src/scenarios.rs, "tern-api-shutdown"). Started by
# the rig agent as
#
#     sh /rig/l1/api.sh CASE -- TERN-ARGV...
#
# Runs tern (TERN-ARGV, whose guest runs the power-button script) with --api-socket, waits for
# the guest to arm its power button, then drives the VM with tern's own client verbs: info,
# pause (the guest's output stops), resume, counters, and shutdown, which presses the ACPI power
# button; the guest must power itself off (its own shutdown messages on the console) and tern
# exit 0.
#
# Output: "TERN-API-PASS CASE/CHECK: what" per passed check, "TERN-API-FAIL CASE/CHECK: why"
# per failed one, the VM's output, and "TERN-API-OK CASE" when every check passed.

set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu

case_=${1:?usage: api.sh CASE -- TERN-ARGV...}
shift
[ "${1:-}" = "--" ] && shift
tern=$1
SOCK=/tmp/tern-api-$case_.sock
OUT=/tmp/tern-api-$case_.out
rm -f "$SOCK" "$OUT"

failed=0
pass() { echo "TERN-API-PASS $case_/$1: $2"; }
fail() { failed=1; echo "TERN-API-FAIL $case_/$1: $2"; }
# client ID WHAT PATTERN VERB...: tern VERB --api-socket succeeds and prints PATTERN.
client() {
    local id=$1 what=$2 pattern=$3 out
    shift 3
    if out=$("$tern" "$@" --api-socket "$SOCK" 2>&1) && echo "$out" | grep -q -E "$pattern"; then
        pass "$id" "$what"
    else
        fail "$id" "$what: tern $* said: $(echo "$out" | tr '\n' '|')"
    fi
}
# wait_for PATTERN SECONDS: until the VM's output matches.
wait_for() {
    local n=0
    while ! grep -q -E "$1" "$OUT" 2>/dev/null; do
        n=$((n + 1))
        [ $n -gt $(($2 * 5)) ] && return 1
        sleep 0.2
    done
}

"$@" --api-socket "$SOCK" > "$OUT" 2>&1 &
pid=$!

if wait_for TERN-GUEST-WAITING-FOR-BUTTON 90; then
    pass armed "the guest booted and armed its power button"
    client info-running "tern info reports a running VM" '^state: running' info
    client pause "tern pause" '^paused' pause
    client info-paused "tern info reports a paused VM" '^state: paused' info
    before=$(wc -c < "$OUT")
    sleep 1
    after=$(wc -c < "$OUT")
    if [ "$before" = "$after" ]; then
        pass quiet "no guest output for 1 s while paused"
    else
        fail quiet "the guest printed $((after - before)) bytes while paused"
    fi
    client resume "tern resume" '^resumed' resume
    client counters "tern counters lists vCPU 0's exits" '^vcpu0: pio [0-9]+' counters
    client shutdown "tern shutdown presses the power button" 'pressed the power button' shutdown
else
    fail armed "the guest did not arm its power button within 90 s"
    kill -9 "$pid" 2>/dev/null
fi

# tern must end by itself once the guest powered off.
n=0
while kill -0 "$pid" 2>/dev/null; do
    n=$((n + 1))
    if [ $n -gt 300 ]; then
        fail exit "tern still running 60 s after the shutdown request"
        kill -9 "$pid"
        break
    fi
    sleep 0.2
done
wait "$pid"
rc=$?
cat "$OUT"
if [ "$rc" = 0 ]; then
    pass exit "tern exited 0 after the guest powered off"
else
    fail exit "tern exited with status $rc"
fi
if grep -q TERN-GUEST-POWER-BUTTON "$OUT" && grep -q -E 'reboot: Power down|Power down' "$OUT"; then
    pass guest-poweroff "the guest handled the button and printed its own power-down message"
else
    fail guest-poweroff "no TERN-GUEST-POWER-BUTTON / 'reboot: Power down' in the console output"
fi
if [ -e "$SOCK" ]; then
    fail socket "the API socket $SOCK is still there after tern exited"
else
    pass socket "tern removed its API socket"
fi
if [ "$failed" = 0 ]; then
    echo "TERN-API-OK $case_"
    exit 0
fi
echo "TERN-API-FAILED $case_"
exit 1
