# vsock (scenario tern-vsock, L1 side xtask/l1/scenarios/vsock.sh): Linux's own virtio-vsock
# driver binds tern's device; the guest connects to the host (CID 2, port 5000, which reaches
# the Unix socket L1 listens on beside tern's) and listens on port 1024, where L1 connects
# through tern's socket with CONNECT 1024. Each connection carries a line and its echo.
rig_modload virtio_mmio virtio_pci vmw_vsock_virtio_transport || echo "TERN-GUEST-ERROR=vsock-modules"
sleep 0.3
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d/device" ] || continue
    echo "TERN-GUEST-VIRTIO-DEV=$(basename "$d") id=$(cat "$d/device") driver=$(basename "$(readlink "$d/driver" 2>/dev/null)") status=$(cat "$d/status" 2>/dev/null)"
done
dmesg | grep -i vsock | sed 's/^/TERN-GUEST-DMESG: /'
vsock-rig listen 1024 > /tmp/vsock-listen.out 2>&1 &
lpid=$!
sleep 0.2
echo "TERN-GUEST-VSOCK-LISTENING"
echo "TERN-GUEST-VSOCK-CONNECT=$(vsock-rig connect 5000 guest-hello 2>&1 | tr '\n' ' ')"
n=0
while kill -0 "$lpid" 2>/dev/null && [ "$n" -lt 300 ]; do
    sleep 0.1
    n=$((n + 1))
done
echo "TERN-GUEST-VSOCK-SERVED=$(tr '\n' ' ' < /tmp/vsock-listen.out)"
