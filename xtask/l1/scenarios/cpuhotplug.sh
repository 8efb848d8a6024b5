#!/bin/sh
# L1 side of the vCPU hotplug scenario (xtask/src/scenarios.rs, "tern-cpu-hotplug"). Started
# by the rig agent as
#
#     sh /rig/l1/cpuhotplug.sh CASE -- TERN-ARGV...
#
# Boots TERN-ARGV (1 vCPU; its guest runs guest/scenarios/cpuhotplug.sh) with --max-cpus 4 and
# --api-socket, then resizes it with `tern resize --cpus`: to 4 (the guest must online three
# added vCPUs and run a task on each), to 2 (the guest's kernel offlines and ejects two), to 4
# again (the ejected vCPUs come back). After each step `tern info` must report the count, and
# the time from the request to the guest's line is reported. Bad sizes (0, 5) must be refused
# with one line naming the limit. The guest powers off and tern exits 0.
#
# L1 is one emulated CPU that the guest's vCPUs share: this script looks at the guest's output
# once a second, and the guest's work is a short task per CPU. An earlier version that polled
# five times a second while the guest ran busy loops on every CPU left L1 silent right after
# the guest onlined the added vCPUs in every try on 2026-12-02 (two freezes the rig detected,
# four more tries stopped by hand, one of them with both vCPUs there from boot); this one
# passed three runs in a row.
#
# CASE qemu: the same with QEMU as the VMM (TERN-ARGV is QEMU's argv, machine pc): -smp
# 1,maxcpus=4, vCPUs added with `device_add host-x86_64-cpu` and removed with `device_del`
# on QEMU's human monitor on a pipe; no refusal or `tern info` checks. The two cases in one
# rig run compare the time from the request to the guest's line.
#
# Output: "TERN-CPUHP-PASS CASE/CHECK: what" per passed check, "TERN-CPUHP-FAIL CASE/CHECK:
# why" per failed one, the VM's output, and "TERN-CPUHP-OK CASE" when every check passed.

set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu

TAG=TERN-CPUHP
case_=${1:?usage: cpuhotplug.sh CASE -- TERN-ARGV...}
shift
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "$TAG-FAIL $case_/args: no tern command line"; exit 1; }
tern=$1
W=/tmp/cpuhp-$case_
SOCK=$W/api.sock
OUT=$W/vm.out
mkdir -p "$W"
rm -f "$SOCK" "$W/mon.in" "$W/mon.out"

. /rig/l1/l1-lib.sh
# The VM's output is looked at once a second: L1 is one emulated CPU, and what runs in it
# competes with the guest's vCPUs.
POLL_S=1
# resize N: ask for N vCPUs (tern resize --cpus; QEMU: device_add or device_del of the vCPUs
# between the current count and N, on its monitor).
cur=1
resize() {
    if [ "$case_" != qemu ]; then
        "$tern" resize --api-socket "$SOCK" --cpus "$1"
        return
    fi
    while [ "$cur" -lt "$1" ]; do
        echo "device_add host-x86_64-cpu,id=cpu$cur,socket-id=0,core-id=$cur,thread-id=0" > "$W/mon.in" || return 1
        cur=$((cur + 1))
    done
    while [ "$cur" -gt "$1" ]; do
        cur=$((cur - 1))
        echo "device_del cpu$cur" > "$W/mon.in" || return 1
    done
    echo "sent to QEMU's monitor"
}
# step CHECK N: resize to N vCPUs; the guest must say count=N and have worked on each, and
# tern info must say N.
step() {
    check=$1 want=$2
    lines=$(grep -c 'TERN-GUEST-CPUS-WORKED' "$OUT")
    start=$(now_ms)
    if ! out=$(resize "$want" 2>&1); then
        fail "$check" "resize to $want vCPUs said: $out"
        return
    fi
    # (resize ran in a subshell: the count it reached is set here.)
    cur=$want
    n=0
    # (The guest's lines end in \r\n on the serial port.)
    while [ "$(grep -c 'TERN-GUEST-CPUS-WORKED' "$OUT")" -le "$lines" ] \
        || ! grep 'TERN-GUEST-CPUS online' "$OUT" | tail -n 1 | tr -d '\r' | grep -q "count=$want\$"; do
        n=$((n + 1))
        if [ $n -gt 120 ]; then
            fail "$check" "the guest did not report $want online CPUs within 120 s: $(grep 'TERN-GUEST-CPUS' "$OUT" | tail -n 2 | tr '\n' '|')"
            return
        fi
        sleep 1
    done
    ms=$(($(now_ms) - start))
    line=$(grep 'TERN-GUEST-CPUS online' "$OUT" | tail -n 1 | tr -d '\r')
    worked=$(grep 'TERN-GUEST-CPUS-WORKED' "$OUT" | tail -n 1 | tr -d '\r')
    info=$("$tern" info --api-socket "$SOCK" 2>&1 | grep '^vcpus:')
    [ "$case_" = qemu ] && info="vcpus: $want (QEMU: not asked)"
    if echo "$info" | grep -q -E "^vcpus: $want( |\$)"; then
        pass "$check" "$want vCPUs: the guest saw '${line#*TERN-GUEST-CPUS }' $ms ms after the request (L1's clock), ran work on${worked#TERN-GUEST-CPUS-WORKED}; tern info: $info"
    else
        fail "$check" "the guest saw '$line' but tern info says '$info'"
    fi
}

if [ "$case_" = qemu ]; then
    # (-nic none: machine pc would add an e1000 whose ROM the rig does not carry.)
    mkfifo "$W/mon.in" "$W/mon.out"
    set -- "$@" -nic none -smp 1,maxcpus=4 -chardev "pipe,id=mon,path=$W/mon" \
        -mon chardev=mon,mode=readline
else
    set -- "$@" --max-cpus 4 --api-socket "$SOCK"
fi
echo "$TAG-RUN $case_: $*"
"$@" > "$OUT" 2>&1 &
pid=$!
[ "$case_" = qemu ] && cat "$W/mon.out" > "$W/mon.log" &
if wait_for "$OUT" TERN-GUEST-CPUS-READY 120 "$pid"; then
    pass ready "the guest booted with $(grep -o 'online=[^ ]* count=[0-9]*' "$OUT" | head -n 1)"
    [ "$case_" = qemu ] || for bad in 0 5; do
        if out=$("$tern" resize --api-socket "$SOCK" --cpus "$bad" 2>&1); then
            fail "refuse-$bad" "tern resize --cpus $bad was accepted: $out"
        elif echo "$out" | grep -q "max_cpus (4)"; then
            pass "refuse-$bad" "tern resize --cpus $bad: $out"
        else
            fail "refuse-$bad" "tern resize --cpus $bad said: $out"
        fi
    done
    step grow 4
    step shrink 2
    step regrow 4
else
    fail ready "the guest did not start its script within 120 s"
    kill -9 "$pid" 2>/dev/null
fi

finish_vmm exit "$pid" "$OUT"
if [ "$case_" = qemu ]; then
    echo "QEMU's monitor said:"
    tr -d '\r' < "$W/mon.log" | grep -v '^$' | tail -n 20
fi
verdict
