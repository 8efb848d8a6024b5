# vsock-bench (the bench-vsock pair, L1 side xtask/l1/scenarios/vsock-bench.sh): stream
# throughput through the VMM's virtio-vsock device, with Linux's own driver. The guest receives
# rig.vsock_mib= MiB from the host on port 1026, then sends as much to the host's port 5003;
# L1 times both ends.
rig_modload virtio_mmio virtio_pci vmw_vsock_virtio_transport || echo "TERN-GUEST-ERROR=vsock-modules"
mib=$(sed -n 's/.*rig\.vsock_mib=\([0-9][0-9]*\).*/\1/p' /proc/cmdline)
mib=${mib:-64}
vsock-rig sink 1026 > /tmp/vsock-sink.out 2>&1 &
spid=$!
sleep 0.2
echo "TERN-GUEST-VSOCK-BENCH-READY"
n=0
while kill -0 "$spid" 2>/dev/null && [ "$n" -lt 3000 ]; do
    sleep 0.1
    n=$((n + 1))
done
echo "TERN-GUEST-VSOCK-SINK=$(tr '\n' ' ' < /tmp/vsock-sink.out)"
echo "TERN-GUEST-VSOCK-SOURCE=$(vsock-rig source 5003 "$mib" 2>&1 | tr '\n' ' ')"
