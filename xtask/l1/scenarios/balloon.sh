#!/bin/sh
# L1 side of the balloon scenario (xtask/src/scenarios.rs, "tern-balloon"). Started by the rig
# agent as
#
#     sh /rig/l1/balloon.sh CASE -- TERN-ARGV...
#
# Boots TERN-ARGV (1 GiB; its guest runs guest/scenarios/balloon.sh) twice, with --api-socket:
# 1. `--balloon stats_s=1`, rig.balloon=inflate: once the guest made its free memory resident
#    on the host and said READY, `tern balloon --size 256M`; the guest's MemTotal must drop by
#    exactly 256 MiB and tern's RSS (VmRSS, read here) by at least 200 MiB; `tern balloon
#    --stats` must show the guest's statistics; `tern balloon --size 0` gives it all back
#    (MemTotal returns). Also the balloon's inflate rate as L1 sees it (request to INFLATED).
# 2. `--balloon free_page_reporting=on`, rig.balloon=report: the guest writes 300 MiB to a
#    tmpfs and removes it; without any balloon size set, tern's RSS must drop by at least
#    200 MiB within 5 s of the removal.
# Both guests power off and tern exits 0.
#
# CASE qemu: the same with QEMU as the VMM (TERN-ARGV is QEMU's argv): a virtio-balloon-pci
# device, driven through QEMU's human monitor on a pipe (`balloon 768` for a 256 MiB balloon);
# no statistics checks. The two cases in one rig run compare inflate rates and RSS returned.
#
# Output: "TERN-BALLOON-PASS CASE/CHECK: what" per passed check, "TERN-BALLOON-FAIL
# CASE/CHECK: why" per failed one, the VMs' output, and "TERN-BALLOON-OK CASE" when every check
# passed.

set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu

TAG=TERN-BALLOON
case_=${1:?usage: balloon.sh CASE -- TERN-ARGV...}
shift
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "$TAG-FAIL $case_/args: no tern command line"; exit 1; }
tern=$1
W=/tmp/balloon-$case_
SOCK=$W/api.sock
mkdir -p "$W"

. /rig/l1/l1-lib.sh
# boot PART BALLOON-OPTS OUT: the VMM with the argv, rig.balloon=PART on its command line, a
# balloon with BALLOON-OPTS (tern's --balloon, or QEMU's device properties) and its control
# (tern's API socket, or QEMU's monitor on the pipe $W/mon.in / $W/mon.out).
boot() {
    part=$1 opts=$2 out=$3
    shift 3
    set_next=
    for a in "$@"; do
        case "$set_next" in --cmdline | -append) a="$a rig.balloon=$part" ;; esac
        set -- "$@" "$a"
        set_next=$a
    done
    shift $(($# / 2))
    rm -f "$SOCK" "$W/mon.in" "$W/mon.out"
    if [ "$case_" = qemu ]; then
        mkfifo "$W/mon.in" "$W/mon.out"
        set -- "$@" -device "virtio-balloon-pci$opts" -chardev "pipe,id=mon,path=$W/mon" \
            -mon chardev=mon,mode=readline
    else
        set -- "$@" --balloon "$opts" --api-socket "$SOCK"
    fi
    echo "$TAG-RUN $case_/$part: $*"
    "$@" > "$out" 2>&1 &
    pid=$!
    # QEMU's monitor output must be read, or QEMU blocks writing it.
    [ "$case_" = qemu ] && cat "$W/mon.out" > "$W/mon-$part.log" &
}
# size MiB: set the balloon to MiB (tern balloon --size; QEMU: guest memory 1024 - MiB).
size() {
    if [ "$case_" = qemu ]; then
        echo "balloon $((1024 - $1))" > "$W/mon.in" && echo "balloon $((1024 - $1)) sent to QEMU's monitor"
    else
        "$tern" balloon --api-socket "$SOCK" --size "$1M" 2>&1
    fi
}
# finish PART OUT: the VMM must exit 0 after its guest powered off.
finish() { finish_vmm "$1-exit" "$pid" "$2"; }

# 1. Inflate and deflate.
OUT1=$W/inflate.out
if [ "$case_" = qemu ]; then o1= o2=,free-page-reporting=on; else o1=stats_s=1 o2=free_page_reporting=on; fi
boot inflate "$o1" "$OUT1" "$@"
if wait_for "$OUT1" TERN-GUEST-BALLOON-READY 150; then
    t0=$(sed -n 's/.*TERN-GUEST-BALLOON-READY memtotal_kb=\([0-9]*\).*/\1/p' "$OUT1")
    sleep 1
    r0=$(rss_kb "$pid")
    pass ready "the guest's free memory is resident: the VMM's RSS ${r0} kB, guest MemTotal ${t0} kB"
    start=$(now_ms)
    if out=$(size 256); then
        pass size "a 256 MiB balloon: $out"
    else
        fail size "a 256 MiB balloon: $(echo "$out" | tr '\n' '|')"
    fi
    if wait_for "$OUT1" TERN-GUEST-BALLOON-INFLATED 150; then
        ms=$(($(now_ms) - start))
        t1=$(sed -n 's/.*TERN-GUEST-BALLOON-INFLATED memtotal_kb=\([0-9]*\).*/\1/p' "$OUT1")
        if [ $((t0 - t1)) = 262144 ]; then
            pass memtotal "the guest's MemTotal dropped by exactly 256 MiB ($t0 -> $t1 kB) in $ms ms (L1's clock: $((256 * 1000 / (ms + 1))) MiB/s)"
        else
            fail memtotal "the guest's MemTotal went from $t0 to $t1 kB, not 262144 kB less"
        fi
        sleep 1
        r1=$(rss_kb "$pid")
        if [ $((r0 - r1)) -ge 204800 ]; then
            pass rss "the VMM's RSS dropped by $(((r0 - r1) / 1024)) MiB ($r0 -> $r1 kB)"
        else
            fail rss "the VMM's RSS dropped by $(((r0 - r1) / 1024)) MiB only ($r0 -> $r1 kB)"
        fi
    else
        fail memtotal "the guest did not see its MemTotal drop within 150 s"
    fi
    if [ "$case_" = qemu ]; then
        :
    elif out=$("$tern" balloon --api-socket "$SOCK" --stats 2>&1) \
        && echo "$out" | grep -q '^balloon: 256 MiB of 256 MiB target' \
        && echo "$out" | grep -q 'total_memory: ' && echo "$out" | grep -q 'available_memory: '; then
        pass stats "tern balloon --stats: $(echo "$out" | tr '\n' '|')"
    else
        fail stats "tern balloon --stats said: $(echo "$out" | tr '\n' '|')"
    fi
    size 0 > /dev/null
    if wait_for "$OUT1" TERN-GUEST-BALLOON-DEFLATED 150; then
        pass deflate "an empty balloon: the guest's MemTotal came back"
    else
        fail deflate "the guest's MemTotal did not come back within 150 s"
    fi
else
    fail ready "the guest did not say READY within 150 s"
    kill -9 "$pid" 2>/dev/null
fi
finish inflate "$OUT1"

# 2. Free page reporting.
OUT2=$W/report.out
boot report "$o2" "$OUT2" "$@"
if wait_for "$OUT2" TERN-GUEST-BALLOON-FILLED 150; then
    sleep 2
    r0=$(rss_kb "$pid")
    pass filled "the guest wrote 300 MiB to a tmpfs: the VMM's RSS ${r0} kB"
    if wait_for "$OUT2" TERN-GUEST-BALLOON-FREED 30; then
        start=$(now_ms)
        best=$r0
        while [ $(($(now_ms) - start)) -lt 5000 ]; do
            r=$(rss_kb "$pid")
            [ "${r:-$best}" -lt "$best" ] && best=$r
            [ $((r0 - best)) -ge 204800 ] && break
            sleep 0.2
        done
        ms=$(($(now_ms) - start))
        if [ $((r0 - best)) -ge 204800 ]; then
            pass report "the VMM's RSS dropped by $(((r0 - best) / 1024)) MiB $ms ms after the guest removed the file"
        else
            fail report "the VMM's RSS dropped by $(((r0 - best) / 1024)) MiB only within 5 s of the removal"
        fi
        if [ "$case_" != qemu ]; then
            out=$("$tern" balloon --api-socket "$SOCK" 2>&1)
            echo "$out" | grep -q 'reported free' && pass reported "tern balloon: $(echo "$out" | tr '\n' '|')" \
                || fail reported "tern balloon said: $(echo "$out" | tr '\n' '|')"
        fi
    else
        fail report "the guest did not say FREED"
    fi
else
    fail filled "the guest did not say FILLED within 150 s"
    kill -9 "$pid" 2>/dev/null
fi
finish report "$OUT2"

verdict
