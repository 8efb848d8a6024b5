#!/bin/sh
# L1 side of the device hotplug scenarios (xtask/src/scenarios.rs, "tern-hotplug" and
# "qemu-hotplug"). Started by the rig agent as
#
#     sh /rig/l1/hotplug.sh tern|qemu -- VMM-ARGV...
#
# Boots TERN-ARGV (no disk, no NIC; its guest runs guest/scenarios/hotplug.sh) and, while the
# guest runs, through `tern disk|net add|remove`:
# 1. refusals, each one line, nothing changed: removing an unknown id, adding an image in use
#    (locked: the disk plugged in below, a second time), adding a disk with an id in use;
# 2. disk-add: a 64 MiB raw image as disk `hot`; the guest must see it (the time from the
#    request to its line is reported), make a file system, write and unmount;
# 3. disk-remove: the guest must lose vda and tern must drop the disk once ejected; on L1 the
#    image then passes e2fsck and holds the guest's file;
# 4. disk-readd: the same image again; the guest must find its file on it;
# 5. net-add / net-remove: an interface on a new TAP, which L1 gives 10.0.77.1/24; the guest
#    pings it, then loses it;
# 6. restore: pause, snapshot (with `hot` plugged in), kill, restore in a new tern; its
#    `tern disk list` must have `hot`, and a second disk plugged into the restored VM must reach
#    the guest, which still reads its file on vda.
# The guest powers off and tern exits 0.
#
# CASE qemu: the same with QEMU (VMM-ARGV is QEMU's argv, machine pc: ACPI PCI hotplug of
# its PIIX4), driven through its human monitor on a pipe (drive_add + device_add
# virtio-blk-pci, device_del; netdev_add tap + device_add virtio-net-pci); no refusals, and
# instead of the snapshot the second disk is plugged into the running VM. The two cases in
# one rig run compare the time from each request to the guest's line.
#
# Output: "TERN-HP-PASS tern/CHECK: what" per passed check, "TERN-HP-FAIL tern/CHECK: why" per
# failed one, the VMs' output, and "TERN-HP-OK tern" when every check passed.

set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu

TAG=TERN-HP
case_=${1:?usage: hotplug.sh tern|qemu -- VMM-ARGV...}
shift
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "$TAG-FAIL $case_/args: no VMM command line"; exit 1; }
tern=$1
W=/tmp/hotplug
SOCK=$W/api.sock
OUT=$W/vm.out
mkdir -p "$W"
mount -t tmpfs -o size=200m tmpfs "$W" || { echo "$TAG-FAIL $case_/setup: cannot mount a tmpfs on $W"; exit 1; }
. /rig/l1/l1-lib.sh
POLL_S=0.1
truncate -s 64M "$W/hot.img"
truncate -s 16M "$W/hot2.img"
if [ "$case_" = qemu ]; then
    rm -f "$W/mon.in" "$W/mon.out"
    mkfifo "$W/mon.in" "$W/mon.out"
    # (-nic none: machine pc would add an e1000 whose ROM the rig does not carry.)
    set -- "$@" -nic none -chardev "pipe,id=mon,path=$W/mon" -mon chardev=mon,mode=readline
else
    set -- "$@" --api-socket "$SOCK"
fi
# monitor COMMAND: to QEMU's monitor.
monitor() { echo "$1" > "$W/mon.in" && echo "sent to QEMU's monitor: $1"; }
# disk_add ID FILE, disk_remove ID, net_add ID TAP, net_remove ID: through tern or QEMU.
disk_add() {
    if [ "$case_" = qemu ]; then
        monitor "drive_add 0 if=none,id=$1,file=$2,format=raw" && monitor "device_add virtio-blk-pci,drive=$1,id=dev-$1"
    else
        "$tern" disk add --api-socket "$SOCK" "path=$2,id=$1" 2>&1
    fi
}
disk_remove() {
    if [ "$case_" = qemu ]; then
        monitor "device_del dev-$1"
    else
        "$tern" disk remove --api-socket "$SOCK" "$1" 2>&1
    fi
}
net_add() {
    if [ "$case_" = qemu ]; then
        /usr/sbin/ip tuntap add dev "$2" mode tap 2>&1 && monitor "netdev_add tap,id=$1,ifname=$2,script=no,downscript=no" \
            && monitor "device_add virtio-net-pci,netdev=$1,id=dev-$1,romfile="
    else
        "$tern" net add --api-socket "$SOCK" "tap=auto,id=$1" 2>&1
    fi
}
net_remove() {
    if [ "$case_" = qemu ]; then
        monitor "device_del dev-$1"
    else
        "$tern" net remove --api-socket "$SOCK" "$1" 2>&1
    fi
}

# step CHECK LINE: the guest must say TERN-GUEST-HP-LINE within 120 s of start; sets line, ms.
step() {
    if ! wait_for "$OUT" "TERN-GUEST-HP-$2 " 120 "$pid"; then
        fail "$1" "the guest did not say $2 within 120 s"
        return 1
    fi
    ms=$(($(now_ms) - start))
    line=$(grep "TERN-GUEST-HP-$2 " "$OUT" | tail -n 1 | tr -d '\r')
}
# gone ID: until `tern disk list` / `tern net list` no longer has ID (60 s).
gone() {
    _n=0
    while "$tern" "$1" list --api-socket "$SOCK" 2>/dev/null | grep -q "^$2	"; do
        _n=$((_n + 1))
        [ $_n -gt 300 ] && return 1
        sleep 0.2
    done
}

echo "$TAG-RUN $case_: $*"
"$@" > "$OUT" 2>&1 &
pid=$!
[ "$case_" = qemu ] && cat "$W/mon.out" > "$W/mon.log" &
start=$(now_ms)
if ! step ready READY; then
    kill -9 "$pid" 2>/dev/null
    finish_vmm exit "$pid" "$OUT"
    verdict
fi
pass ready "the guest booted: $line"

if [ "$case_" = tern ]; then
    out=$("$tern" disk remove --api-socket "$SOCK" nope 2>&1)
    if echo "$out" | grep -q "no disk \`nope\`"; then
        pass refuse "tern disk remove nope: $(oneline "$out")"
    else
        fail refuse "tern disk remove nope said: $(oneline "$out")"
    fi
fi

start=$(now_ms)
if out=$(disk_add hot "$W/hot.img") && step disk-add DISK-ADDED; then
    pass disk-add "$ms ms from the request to the guest's line: $line; the VMM said: $(oneline "$out")"
fi
if [ "$case_" = tern ] && grep -q "TERN-GUEST-HP-DISK-ADDED" "$OUT"; then
    out=$("$tern" disk add --api-socket "$SOCK" "path=$W/hot2.img,id=hot" 2>&1)
    if echo "$out" | grep -q "has a device with that id"; then
        pass refuse "adding a second disk hot: $(oneline "$out")"
    else
        fail refuse "adding a second disk hot said: $(oneline "$out")"
    fi
    out=$("$tern" disk add --api-socket "$SOCK" "path=$W/hot.img,id=again" 2>&1)
    if echo "$out" | grep -q "in use by another process"; then
        pass refuse "adding hot.img a second time (locked): $(oneline "$out")"
    else
        fail refuse "adding hot.img a second time said: $(oneline "$out")"
    fi
fi
if grep -q "TERN-GUEST-HP-DISK-ADDED" "$OUT"; then
    POLL_S=0.5
    step disk-add DISK-USED && sha=$(echo "$line" | sed -n 's/.*sha=\([0-9a-f]*\).*/\1/p')
    POLL_S=0.1
else
    fail disk-add "the VMM said: $(oneline "$out")"
fi

start=$(now_ms)
if out=$(disk_remove hot) && step disk-remove DISK-REMOVED; then
    # (QEMU: no list to look at; its drive goes with the device.)
    if { [ "$case_" = qemu ] && sleep 1; } || gone disk hot; then
        fsck=$(e2fsck -fn "$W/hot.img" 2>&1)
        rc=$?
        text=$(debugfs -R "cat /file.txt" "$W/hot.img" 2>/dev/null)
        host_sha=$(debugfs -R "cat /data" "$W/hot.img" 2>/dev/null | sha256sum | cut -d' ' -f1)
        if [ $rc = 0 ] && [ "$text" = "tern-hotplug: written by the guest on a hotplugged disk" ] \
            && [ "$host_sha" = "${sha:-}" ]; then
            pass disk-remove "the guest lost vda $ms ms after the request; the VMM dropped the disk; the image is clean and holds the guest's files"
        else
            fail disk-remove "e2fsck rc $rc: $(oneline "$fsck"); file.txt '$text'; data sha256 $host_sha, the guest's ${sha:-?}"
        fi
    else
        fail disk-remove "tern disk list still has hot 60 s after the guest let go of it"
    fi
else
    fail disk-remove "the VMM said: $(oneline "$out")"
fi

start=$(now_ms)
if out=$(disk_add hot "$W/hot.img") && step disk-readd DISK-READDED; then
    pass disk-readd "$ms ms: $line"
else
    fail disk-readd "the VMM said: $(oneline "$out")"
fi

start=$(now_ms)
if out=$(net_add nic qtap0); then
    if [ "$case_" = qemu ]; then
        tap=qtap0
    else
        tap=$("$tern" net list --api-socket "$SOCK" 2>&1 | awk '$1 == "nic" { print $2 }')
    fi
    ip addr add 10.0.77.1/24 dev "$tap" 2>/dev/null
    ip link set "$tap" up
    if step net-add NET-ADDED; then
        pass net-add "$ms ms from the request to the guest's line: $line (TAP $tap)"
    fi
    POLL_S=0.5
    step net-ping NET-PING && pass net-ping "the guest pinged L1 through the new interface: $line"
    POLL_S=0.1
else
    fail net-add "the VMM said: $(oneline "$out")"
fi
start=$(now_ms)
if out=$(net_remove nic) && step net-remove NET-REMOVED; then
    if [ "$case_" = qemu ] || gone net nic; then
        pass net-remove "the guest lost its interface $ms ms after the request; the VMM dropped it"
    else
        fail net-remove "tern net list still has nic 60 s after the guest let go of it"
    fi
else
    fail net-remove "the VMM said: $(oneline "$out")"
fi

if [ "$case_" = qemu ]; then
    start=$(now_ms)
    if out=$(disk_add hot2 "$W/hot2.img") && step restore AFTER-RESTORE; then
        pass restore "(no snapshot) hot2 reached the guest $ms ms after the request: $line"
    fi
    wait_for "$OUT" "TERN-GUEST-HP-DONE" 60 "$pid"
    finish_vmm exit "$pid" "$OUT"
    echo "QEMU's monitor said:"
    tr -d '\r' < "$W/mon.log"
    cd /
    umount "$W" 2>/dev/null
    verdict
fi

# Snapshot with the hotplugged disk, restore in a new tern, plug a second disk in.
if out=$("$tern" pause --api-socket "$SOCK" 2>&1 \
    && "$tern" snapshot create --dir "$W/snap" --api-socket "$SOCK" 2>&1); then
    kill -9 "$pid"
    wait "$pid" 2>/dev/null
    cat "$OUT"
    OUT=$W/restored.out
    rm -f "$SOCK"
    "$tern" run --restore "$W/snap" --serial "file:$OUT" --api-socket "$SOCK" > "$W/restored.err" 2>&1 &
    pid=$!
    n=0
    while [ ! -S "$SOCK" ] && [ $n -lt 100 ]; do n=$((n + 1)); sleep 0.2; done
    list=$("$tern" disk list --api-socket "$SOCK" 2>&1)
    start=$(now_ms)
    if echo "$list" | grep -q "^hot	" \
        && out=$("$tern" disk add --api-socket "$SOCK" "path=$W/hot2.img,id=hot2" 2>&1) \
        && step restore AFTER-RESTORE; then
        pass restore "restored with hot plugged in ($(oneline "$list")); hot2 reached the guest $ms ms after the request: $line"
    else
        fail restore "tern disk list: $(oneline "$list"); tern disk add: $(oneline "${out:-}"); $(oneline "$(cat "$W/restored.err")")"
    fi
else
    fail restore "tern pause; tern snapshot create said: $(oneline "$out")"
fi
wait_for "$OUT" "TERN-GUEST-HP-DONE" 60 "$pid"
finish_vmm exit "$pid" "$OUT"
cd /
umount "$W" 2>/dev/null
verdict
