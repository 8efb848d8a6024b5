#!/bin/sh
# L1 side of the memory hotplug scenario (xtask/src/scenarios.rs, "tern-mem-hotplug"). Started
# by the rig agent as
#
#     sh /rig/l1/memhotplug.sh CASE -- VMM-ARGV...
#
# Boots VMM-ARGV (512 MiB; its guest runs guest/scenarios/memhotplug.sh) with 512 MiB of
# hotpluggable memory (tern: --max-memory 1G; QEMU: a virtio-mem-pci device) and resizes it:
# 1. Sizes tern refuses, each with one line naming the limit: above --max-memory, below
#    --memory, not a whole number of 2 MiB blocks.
# 2. grow: to 1 GiB; the guest's MemTotal must grow by exactly 512 MiB, `tern info` must say
#    1024 MiB. The guest then fills 700 MiB of a tmpfs (more than its boot memory) and checks
#    a sample of it.
# 3. shrink: once the guest removed the file, to 512 MiB; MemTotal must return and the VMM's
#    RSS drop by at least 400 MiB.
# 4. regrow: to 768 MiB. tern then sets a 64 MiB balloon (tern's VM has --balloon), snapshots
#    the VM, is killed, and a new tern restores it: `tern info` must say 768 MiB of at most
#    1024 MiB and `tern balloon` 64 MiB; with the balloon emptied, a resize of the restored VM
#    to 1 GiB must reach the guest (after-restore). QEMU: the resize to 1 GiB, no snapshot.
# The guest powers off and the VMM exits 0. Each step reports the time from the request to
# the guest's line, on L1's clock.
#
# CASE qemu: the same with QEMU (VMM-ARGV is QEMU's argv, machine pc): `-m 512,maxmem=1G`,
# a virtio-mem-pci device, resized through QEMU's human monitor on a pipe (qom-set
# requested-size); no refusal or snapshot checks. The two cases in one rig run compare the
# time from request to the guest's new MemTotal, and the RSS returned.
#
# Output: "TERN-MEMHP-PASS CASE/CHECK: what" per passed check, "TERN-MEMHP-FAIL CASE/CHECK:
# why" per failed one, the VMs' output, and "TERN-MEMHP-OK CASE" when every check passed.

set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu

TAG=TERN-MEMHP
case_=${1:?usage: memhotplug.sh CASE -- VMM-ARGV...}
shift
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "$TAG-FAIL $case_/args: no VMM command line"; exit 1; }
tern=$1
W=/tmp/memhp-$case_
SOCK=$W/api.sock
OUT=$W/vm.out
mkdir -p "$W"
rm -rf "$SOCK" "$W/mon.in" "$W/mon.out" "$W/snap"
. /rig/l1/l1-lib.sh
# The guest writes and reads hundreds of MiB: look at its output twice a second.
POLL_S=0.5

if [ "$case_" = qemu ]; then
    # QEMU leaves the guest's command line alone: it gets what tern adds by itself, so that
    # Linux onlines the memory virtio-mem adds.
    next=
    for a in "$@"; do
        [ "$next" = -append ] && a="$a memhp_default_state=online_movable"
        set -- "$@" "$a"
        next=$a
    done
    shift $(($# / 2))
    # QEMU's -m is given again with maxmem (QEMU merges its -m options).
    mkfifo "$W/mon.in" "$W/mon.out"
    # (-nic none: machine pc would add an e1000 whose ROM the rig does not carry.)
    set -- "$@" -nic none -m 512,maxmem=1024M -object memory-backend-ram,id=vmem0,size=512M \
        -device virtio-mem-pci,id=vm0,memdev=vmem0,block-size=2M,requested-size=0 \
        -chardev "pipe,id=mon,path=$W/mon" -mon chardev=mon,mode=readline
else
    set -- "$@" --max-memory 1G --balloon "" --api-socket "$SOCK"
fi
# resize MiB: ask for MiB of memory in all (tern resize --memory; QEMU: the virtio-mem
# device's requested size, MiB - 512).
resize() {
    if [ "$case_" = qemu ]; then
        echo "qom-set /machine/peripheral/vm0 requested-size $((($1 - 512) * 1048576))" > "$W/mon.in" \
            && echo "qom-set requested-size $((($1 - 512)))M sent to QEMU's monitor"
    else
        "$tern" resize --api-socket "$SOCK" --memory "$1M" 2>&1
    fi
}
# info_says MiB: tern info reports MiB of memory now (QEMU: nothing to ask).
info_says() {
    [ "$case_" = qemu ] && return 0
    _info=$("$tern" info --api-socket "$SOCK" 2>&1 | grep '^memory:')
    echo "$_info" | grep -q "^memory: $1 MiB"
}
# step CHECK MiB LINE: resize to MiB; the guest must say LINE within 150 s. Sets ms.
step() {
    start=$(now_ms)
    if ! out=$(resize "$2"); then
        fail "$1" "resize to $2 MiB said: $(oneline "$out")"
        return 1
    fi
    # The guest is idle while it waits: look every 0.1 s for a finer measure.
    POLL_S=0.1
    wait_for "$OUT" "TERN-GUEST-MEM-$3 " 150 "$pid"
    _found=$?
    POLL_S=0.5
    if [ $_found != 0 ]; then
        fail "$1" "the guest did not say $3 within 150 s of the resize to $2 MiB"
        return 1
    fi
    ms=$(($(now_ms) - start))
    line=$(grep "TERN-GUEST-MEM-$3 " "$OUT" | tail -n 1 | tr -d '\r')
    got=$(echo "$line" | sed -n 's/.*memtotal_kb=\([0-9]*\).*/\1/p')
}

echo "$TAG-RUN $case_: $*"
"$@" > "$OUT" 2>&1 &
pid=$!
[ "$case_" = qemu ] && cat "$W/mon.out" > "$W/mon.log" &
if ! wait_for "$OUT" TERN-GUEST-MEM-READY 150 "$pid"; then
    fail ready "the guest did not load virtio_mem and say READY within 150 s (or the VMM exited)"
    kill -9 "$pid" 2>/dev/null
    finish_vmm exit "$pid" "$OUT"
    verdict
fi
t0=$(sed -n 's/.*TERN-GUEST-MEM-READY memtotal_kb=\([0-9]*\).*/\1/p' "$OUT" | tr -d '\r')
r0=$(rss_kb "$pid")
pass ready "the guest booted with MemTotal $t0 kB; the VMM's RSS $r0 kB"
if [ "$case_" != qemu ]; then
    for bad in 2G:max_memory 256M:memory 513M:block; do
        size=${bad%%:*} why=${bad#*:}
        if out=$("$tern" resize --api-socket "$SOCK" --memory "$size" 2>&1); then
            fail "refuse-$why" "tern resize --memory $size was accepted: $(oneline "$out")"
        elif echo "$out" | grep -q "invalid memory" && echo "$out" | grep -q "$why"; then
            pass "refuse-$why" "tern resize --memory $size: $(oneline "$out")"
        else
            fail "refuse-$why" "tern resize --memory $size said: $(oneline "$out")"
        fi
    done
fi

if step grow 1024 GROWN; then
    if [ "$((got - t0))" = 524288 ] && info_says 1024; then
        pass grow "MemTotal grew by exactly 512 MiB ($t0 -> $got kB) $ms ms after the request; ${_info:-}"
    else
        fail grow "MemTotal went from $t0 to $got kB; tern info: ${_info:-}"
    fi
    if wait_for "$OUT" "TERN-GUEST-MEM-FILLED" 300; then
        sleep 1
        r1=$(rss_kb "$pid")
        pass filled "the guest filled 700 MiB of its 1 GiB and read a sample back: the VMM's RSS $r1 kB"
    else
        fail filled "the guest did not fill its memory within 300 s"
    fi
    if wait_for "$OUT" "TERN-GUEST-MEM-FREED" 60 && step shrink 512 SHRUNK; then
        sleep 1
        r2=$(rss_kb "$pid")
        if [ "$got" -le "$t0" ] && [ $((r1 - r2)) -ge 409600 ] && info_says 512; then
            pass shrink "MemTotal back to $got kB $ms ms after the request; the VMM's RSS dropped by $(((r1 - r2) / 1024)) MiB ($r1 -> $r2 kB); ${_info:-}"
        else
            fail shrink "MemTotal $got kB (boot $t0); the VMM's RSS dropped by $(((r1 - r2) / 1024)) MiB only ($r1 -> $r2 kB); tern info: ${_info:-}"
        fi
        if step regrow 768 REGROWN; then
            pass regrow "MemTotal $got kB $ms ms after the request"
        fi
    fi
fi

if [ "$case_" = qemu ]; then
    step after-restore 1024 AFTER-RESTORE \
        && pass after-restore "(no snapshot) MemTotal $got kB $ms ms after the request"
    finish_vmm exit "$pid" "$OUT"
    echo "QEMU's monitor said:"
    tr -d '\r' < "$W/mon.log"
    verdict
fi

# The tern case: a 64 MiB balloon, snapshot, kill, restore in a new tern (both sizes kept),
# empty the balloon and resize the restored VM.
if grep -q "TERN-GUEST-MEM-REGROWN" "$OUT"; then
    out=$("$tern" balloon --api-socket "$SOCK" --size 64M 2>&1)
    n=0
    while ! "$tern" balloon --api-socket "$SOCK" 2>&1 | grep -q '^balloon: 64 MiB of 64 MiB target' && [ $n -lt 60 ]; do
        n=$((n + 1))
        sleep 1
    done
    if [ $n -lt 60 ]; then
        pass balloon "a 64 MiB balloon in the resized guest: $(oneline "$out")"
    else
        fail balloon "the balloon did not reach 64 MiB within 60 s: $(oneline "$("$tern" balloon --api-socket "$SOCK" 2>&1)")"
    fi
    if out=$("$tern" pause --api-socket "$SOCK" 2>&1 \
        && "$tern" snapshot create --dir "$W/snap" --api-socket "$SOCK" 2>&1); then
        pass snapshot "tern snapshot create: $(oneline "$out")"
    else
        fail snapshot "tern pause; tern snapshot create said: $(oneline "$out")"
    fi
    kill -9 "$pid"
    wait "$pid" 2>/dev/null
    cat "$OUT"
    OUT=$W/restored.out
    rm -f "$SOCK"
    "$tern" run --restore "$W/snap" --serial "file:$OUT" --api-socket "$SOCK" > "$W/restored.err" 2>&1 &
    pid=$!
    n=0
    while [ ! -S "$SOCK" ] && [ $n -lt 60 ]; do n=$((n + 1)); sleep 0.5; done
    info=$("$tern" info --api-socket "$SOCK" 2>&1 | grep '^memory:')
    b=$("$tern" balloon --api-socket "$SOCK" 2>&1 | grep '^balloon:')
    if echo "$info" | grep -q "^memory: 768 MiB (asked for 768 MiB, at most 1024 MiB)" \
        && echo "$b" | grep -q '^balloon: 64 MiB of 64 MiB target'; then
        pass restored "the restored VM keeps its sizes: $info; $b"
    else
        fail restored "the restored VM: '$info', '$b' $(oneline "$(cat "$W/restored.err")")"
    fi
    "$tern" balloon --api-socket "$SOCK" --size 0 > /dev/null 2>&1
    step after-restore 1024 AFTER-RESTORE \
        && pass after-restore "the restored VM grew: MemTotal $got kB $ms ms after the request"
    finish_vmm exit "$pid" "$W/restored.err"
    cat "$OUT"
else
    finish_vmm exit "$pid" "$OUT"
fi
verdict
