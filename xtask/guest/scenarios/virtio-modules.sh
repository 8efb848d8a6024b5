# Loads the virtio transports and drivers shipped in the guest initramfs (the Debian cloud
# kernel builds them as modules) and reports how many virtio devices the guest sees.
rig_modload virtio_mmio virtio_pci virtio_blk virtio_net virtio_console virtio_rng \
    && echo TERN-GUEST-MODULES=ok
echo "TERN-GUEST-VIRTIO-DEVICES=$(ls /sys/bus/virtio/devices 2>/dev/null | wc -l)"
