# What the L1 sides of the snapshot and migration scenarios (snapshot.sh, snapshot-net.sh,
# migrate-net.sh) share: check reporting, timing, and the pause → snapshot → SIGKILL →
# snapshot-files steps. Sourced by them (it is /rig/l1/snapshot-lib.sh in L1) after they set
# case_, tern, W, SOCK and SNAP, and define finish_extra (their own clean-up, run by finish).
# Report lines start with $TAG (TERN-SNAP unless the script sets another, e.g. TERN-MIG):
# "$TAG-PASS CASE/CHECK: ...", "$TAG-FAIL ...", "$TAG-INFO ...", "$TAG-LOG ...", "$TAG-OK CASE".

TAG=${TAG:-TERN-SNAP}
failed=0
checks=0
pass() {
    checks=$((checks + 1))
    echo "$TAG-PASS $case_/$1: $2"
}
fail() {
    checks=$((checks + 1))
    failed=1
    echo "$TAG-FAIL $case_/$1: $2"
}
info() { echo "$TAG-INFO $case_: $*"; }
# show NAME FILE: a log of this script's, passed through for the rig (and for a reader).
show() {
    echo "$TAG-LOG $case_/$1:"
    [ -f "$2" ] && tr -d '\r' < "$2"
    echo "$TAG-LOG-END $case_/$1"
}
# finish: kills what is left, cleans up and reports the verdict.
finish() {
    [ -n "${pid1:-}" ] && kill -9 "$pid1" 2>/dev/null
    [ -n "${pid2:-}" ] && kill -9 "$pid2" 2>/dev/null
    finish_extra
    cd /
    umount "$W" 2>/dev/null
    if [ "$failed" = 0 ] && [ "$checks" -gt 0 ]; then
        echo "$TAG-OK $case_ ($checks checks)"
        exit 0
    fi
    echo "$TAG-FAILED $case_"
    exit 1
}
now() { cut -d' ' -f1 /proc/uptime; }
# between T1 T2: seconds from T1 to T2.
between() { echo "$1 $2" | awk '{ printf "%.1f", $2 - $1 }'; }
since() { between "$1" "$(now)"; }

# wait_for_line FILE TEXT PID SECONDS: waits until FILE holds TEXT; fails, saying why, if the
# process PID ends first or SECONDS pass.
wait_for_line() {
    local n=0
    while [ $n -le $(($4 * 5)) ]; do
        grep -q -F -- "$2" "$1" 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || { echo "the VMM exited before '$2'"; return 1; }
        n=$((n + 1))
        sleep 0.2
    done
    echo "no '$2' after $4s"
    return 1
}

# wait_gone PID SECONDS: waits until the process PID has ended; fails if SECONDS pass first.
wait_gone() {
    local n=0
    while kill -0 "$1" 2>/dev/null; do
        [ $n -ge $(($2 * 5)) ] && return 1
        n=$((n + 1))
        sleep 0.2
    done
    return 0
}

# pause_vm: the check "pause" (tern pause of the first run, on $SOCK).
pause_vm() {
    local out
    if out=$("$tern" pause --api-socket "$SOCK" 2>&1) && echo "$out" | grep -q '^paused'; then
        pass pause "tern pause"
    else
        fail pause "tern pause said: $(echo "$out" | tr '\n' '|')"
    fi
}

# snapshot_and_kill: the checks "snapshot" (tern snapshot create to $SNAP) and "killed" (the
# first tern, $pid1, was still running when killed with SIGKILL).
snapshot_and_kill() {
    local out t rc
    t=$(now)
    if out=$("$tern" snapshot create --dir "$SNAP" --api-socket "$SOCK" 2>&1); then
        pass snapshot "tern snapshot create wrote $SNAP in $(since "$t")s: $(echo "$out" | tr '\n' ' ')"
    else
        fail snapshot "tern snapshot create failed: $(echo "$out" | tr '\n' '|')"
    fi
    kill -9 "$pid1"
    wait "$pid1"
    rc=$?
    pid1=
    if [ "$rc" = 137 ]; then
        pass killed "the first tern was still running when killed with SIGKILL"
    else
        fail killed "the first tern had already exited (status $rc) before SIGKILL"
    fi
}

# check_snapshot_files MEMORY: the check "snapshot-files" ($SNAP has state.json and a
# memory.bin as long as the guest's MEMORY, e.g. 256M); the scenario ends if not.
check_snapshot_files() {
    local want_mem got_mem
    want_mem=$(($(echo "$1" | tr -d 'M') * 1048576))
    got_mem=$(stat -c %s "$SNAP/memory.bin" 2>/dev/null)
    if [ -f "$SNAP/state.json" ] && [ "${got_mem:-0}" = "$want_mem" ]; then
        pass snapshot-files "the snapshot has state.json and a memory.bin of $got_mem bytes (the guest's $1)"
    else
        fail snapshot-files "the snapshot directory holds '$(ls "$SNAP" 2>/dev/null | tr '\n' ' ')', memory.bin ${got_mem:-missing} bytes; expected state.json and memory.bin of $want_mem bytes"
        finish
    fi
}
