# vsock (scenario tern-vsock, L1 side xtask/l1/scenarios/vsock.sh): Linux's own virtio-vsock
# driver binds tern's device.
# 1. The guest connects to the host (CID 2, port 5000, which reaches the Unix socket L1 listens
#    on beside tern's) and listens on port 1024, where L1 connects through tern's socket with
#    CONNECT 1024. Each connection carries a line and its echo.
# 2. The guest holds a connection to the host's port 5001 open and listens on port 1025; L1
#    snapshots the VM, kills tern and restores the snapshot in a new tern. The held connection
#    must end with ECONNRESET (the transport-reset event), and new connections must work both
#    ways: to the host's port 5002, and L1's CONNECT 1025.
# 3. The same across a live migration to a third tern on the same host, whose vsock is on
#    another socket (--vsock-socket): held 5003, then 5004 and CONNECT 1026.
rig_modload virtio_mmio virtio_pci vmw_vsock_virtio_transport || echo "TERN-GUEST-ERROR=vsock-modules"
sleep 0.3
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d/device" ] || continue
    echo "TERN-GUEST-VIRTIO-DEV=$(basename "$d") id=$(cat "$d/device") driver=$(basename "$(readlink "$d/driver" 2>/dev/null)") status=$(cat "$d/status" 2>/dev/null)"
done
dmesg | grep -i vsock | sed 's/^/TERN-GUEST-DMESG: /'
# vsock_wait PID TENTHS: waits until PID ends, at most TENTHS tenths of a second.
vsock_wait() {
    n=0
    while kill -0 "$1" 2>/dev/null && [ "$n" -lt "$2" ]; do
        sleep 0.1
        n=$((n + 1))
    done
}
vsock-rig listen 1024 > /tmp/vsock-listen.out 2>&1 &
lpid=$!
sleep 0.2
echo "TERN-GUEST-VSOCK-LISTENING"
echo "TERN-GUEST-VSOCK-CONNECT=$(vsock-rig connect 5000 guest-hello 2>&1 | tr '\n' ' ')"
vsock_wait "$lpid" 300
echo "TERN-GUEST-VSOCK-SERVED=$(tr '\n' ' ' < /tmp/vsock-listen.out)"

# 2: across a snapshot and restore.
vsock-rig listen 1025 > /tmp/vsock-listen2.out 2>&1 &
l2pid=$!
vsock-rig hold 5001 > /tmp/vsock-hold.out 2>&1 &
hpid=$!
n=0
while ! grep -q held= /tmp/vsock-hold.out && kill -0 "$hpid" 2>/dev/null && [ "$n" -lt 100 ]; do
    sleep 0.1
    n=$((n + 1))
done
echo "TERN-GUEST-VSOCK-HELD=$(tr '\n' ' ' < /tmp/vsock-hold.out)"
vsock_wait "$hpid" 1800
echo "TERN-GUEST-VSOCK-HOLD-ENDED=$(tr '\n' ' ' < /tmp/vsock-hold.out)"
echo "TERN-GUEST-VSOCK-CONNECT2=$(vsock-rig connect 5002 after-restore 2>&1 | tr '\n' ' ')"
vsock_wait "$l2pid" 300
echo "TERN-GUEST-VSOCK-SERVED2=$(tr '\n' ' ' < /tmp/vsock-listen2.out)"

# 3: across a live migration.
vsock-rig listen 1026 > /tmp/vsock-listen3.out 2>&1 &
l3pid=$!
vsock-rig hold 5003 > /tmp/vsock-hold3.out 2>&1 &
h3pid=$!
n=0
while ! grep -q held= /tmp/vsock-hold3.out && kill -0 "$h3pid" 2>/dev/null && [ "$n" -lt 100 ]; do
    sleep 0.1
    n=$((n + 1))
done
echo "TERN-GUEST-VSOCK-HELD3=$(tr '\n' ' ' < /tmp/vsock-hold3.out)"
vsock_wait "$h3pid" 1800
echo "TERN-GUEST-VSOCK-HOLD3-ENDED=$(tr '\n' ' ' < /tmp/vsock-hold3.out)"
echo "TERN-GUEST-VSOCK-CONNECT3=$(vsock-rig connect 5004 after-migration 2>&1 | tr '\n' ' ')"
vsock_wait "$l3pid" 300
echo "TERN-GUEST-VSOCK-SERVED3=$(tr '\n' ' ' < /tmp/vsock-listen3.out)"
