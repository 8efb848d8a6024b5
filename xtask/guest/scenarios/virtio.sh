# virtio platform checks for rng and console, on either transport: the drivers bind, the
# device IDs are right, /dev/hwrng gives entropy, hvc0 carries output, ACPI parsed cleanly.
rig_modload virtio_mmio virtio_pci virtio_rng virtio_console || echo "TERN-GUEST-ERROR: module load failed"
sleep 0.2
n=0
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d/device" ] || continue
    n=$((n + 1))
    echo "TERN-GUEST-VIRTIO-DEV=$(basename "$d") id=$(cat "$d/device") vendor=$(cat "$d/vendor") driver=$(basename "$(readlink "$d/driver" 2>/dev/null)")"
done
echo "TERN-GUEST-VIRTIO-COUNT=$n"
for p in /sys/bus/pci/devices/*; do
    [ -e "$p/vendor" ] || continue
    echo "TERN-GUEST-PCI-DEV=$(basename "$p") vendor=$(cat "$p/vendor") device=$(cat "$p/device") class=$(cat "$p/class")"
done
echo "TERN-GUEST-MSI-IRQS=$(grep -c -i 'PCI-MSI' /proc/interrupts)"
echo "TERN-GUEST-INTX-IRQS=$(grep -i 'IO-APIC' /proc/interrupts | grep -c virtio)"
rng=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
echo "TERN-GUEST-HWRNG=${rng:-none}"
bytes=$(head -c 256 /dev/hwrng 2>/dev/null | wc -c)
distinct=$(head -c 256 /dev/hwrng 2>/dev/null | od -An -v -tx1 | tr ' ' '\n' | grep -v '^$' | sort -u | wc -l)
echo "TERN-GUEST-HWRNG-BYTES=$bytes distinct=$distinct"
if [ -c /dev/hvc0 ]; then
    echo "TERN-GUEST-HVC0-HELLO" > /dev/hvc0
    echo "TERN-GUEST-HVC0=present"
else
    echo "TERN-GUEST-HVC0=absent"
fi
if dmesg | grep -i -E "ACPI (BIOS )?Error|ACPI Exception" >/dev/null; then
    echo "TERN-GUEST-ERROR: ACPI errors in dmesg"
    dmesg | grep -i -E "ACPI (BIOS )?Error|ACPI Exception"
fi
