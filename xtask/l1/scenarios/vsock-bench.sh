#!/bin/sh
# L1 side of the vsock throughput benchmark (`cargo xtask bench-vsock`, the bench-vsock-tern
# and bench-vsock-qemu scenarios in xtask/src/scenarios.rs). Started by the rig agent as
#
#     sh /rig/l1/vsock-bench.sh tern|qemu MIB -- VMM-ARGV...
#
# Boots VMM-ARGV (the guest runs xtask/guest/scenarios/vsock-bench.sh, told MIB through
# rig.vsock_mib= on its command line) with a virtio-vsock device for guest CID 3 on
# virtio-mmio: tern's own (--vsock, Firecracker's hybrid Unix-socket backend) or QEMU's
# vhost-vsock-device (the host kernel's vhost_vsock). Then streams MIB MiB host → guest (L1
# connects to the guest's port 1026: CONNECT through tern's socket, or AF_VSOCK to CID 3) and
# MIB MiB guest → host (the guest connects to port 5003: tern's socket_5003, or an AF_VSOCK
# listener in L1). L1 times both: from its connect to the guest's "got" answer, and from
# accepting the guest's connection to the end of its data.
#
# Output: "TERN-GUEST-BENCH-H2G-MIBS=N" and "TERN-GUEST-BENCH-G2H-MIBS=N" (MiB/s; the rig reads
# them as facts), "TERN-VSOCKB-PASS|FAIL CASE/CHECK: …", and "TERN-VSOCKB-OK CASE".

set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu

case_=${1:?usage: vsock-bench.sh tern|qemu MIB -- VMM-ARGV...}
mib=${2:?usage: vsock-bench.sh tern|qemu MIB -- VMM-ARGV...}
shift 2
[ "${1:-}" = "--" ] && shift
TAG=TERN-VSOCKB
W=/tmp/vsock-bench-$case_
V=$W/v.sock
OUT=$W/vmm.out
rm -rf "$W"
mkdir -p "$W"
. /rig/l1/l1-lib.sh

# The guest's command line gets rig.vsock_mib=MIB.
set_next=
for a in "$@"; do
    case "$set_next" in --cmdline | -append) a="$a rig.vsock_mib=$mib" ;; esac
    set -- "$@" "$a"
    set_next=$a
done
shift $(($# / 2))
if [ "$case_" = qemu ]; then
    [ -c /dev/vhost-vsock ] || modprobe vhost_vsock 2>/dev/null
    [ -c /dev/vhost-vsock ] || { fail setup "no /dev/vhost-vsock in L1"; verdict; }
    set -- "$@" -device vhost-vsock-device,guest-cid=3
    vsock-rig vsock-recv 5003 > "$W/recv" 2>&1 &
else
    set -- "$@" --vsock "cid=3,socket=$V"
    vsock-rig unix-recv "${V}_5003" > "$W/recv" 2>&1 &
fi
rpid=$!
echo "$TAG-RUN $case_: $*"
"$@" > "$OUT" 2>&1 &
pid=$!

# rate_of TEXT: the MiB/s of a vsock-rig "rate=" line.
rate_of() { echo "$1" | sed -n 's/.*VSOCK-RIG rate=\([0-9.]*\) .*/\1/p' | head -n 1; }
if wait_for "$OUT" TERN-GUEST-VSOCK-BENCH-READY 120 "$pid"; then
    sleep 0.3
    if [ "$case_" = qemu ]; then
        sent=$(vsock-rig vsock-send 3 1026 "$mib" 2>&1)
    else
        sent=$(vsock-rig unix-send "$V" 1026 "$mib" 2>&1)
    fi
    r=$(rate_of "$sent")
    if [ -n "$r" ] && echo "$sent" | grep -q "answer=got $((mib * 1048576))"; then
        echo "TERN-GUEST-BENCH-H2G-MIBS=$r"
        pass host-to-guest "$mib MiB host → guest at $r MiB/s"
    else
        fail host-to-guest "$(oneline "$sent")"
    fi
else
    fail host-to-guest "the guest was not ready within 120 s"
fi
n=0
while kill -0 "$rpid" 2>/dev/null && [ $n -lt 600 ]; do
    sleep 0.2
    n=$((n + 1))
done
kill "$rpid" 2>/dev/null
r=$(rate_of "$(cat "$W/recv")")
if [ -n "$r" ] && grep -q "got=$((mib * 1048576))" "$W/recv"; then
    echo "TERN-GUEST-BENCH-G2H-MIBS=$r"
    pass guest-to-host "$mib MiB guest → host at $r MiB/s"
else
    fail guest-to-host "$(oneline "$(cat "$W/recv")")"
fi
finish_vmm exit "$pid" "$OUT"
verdict
