# Disks and a NIC plugged in and out while the guest runs, under the Debian kernel's own
# ACPI PCI hotplug (acpiphp), virtio_blk and virtio_net; driven from L1
# (xtask/l1/scenarios/hotplug.sh), which plugs and unplugs and the guest waits for each:
#   READY           booted with no disk and no NIC
#   DISK-ADDED      a disk appeared (vda); the guest makes an ext2 file system on it, mounts
#   DISK-USED       it, writes a file, unmounts; its sha256
#   DISK-REMOVED    vda is gone (L1 asked for it back)
#   DISK-READDED    vda is back (L1 plugged the same image in again) and holds the file
#   NET-ADDED       an interface appeared; the guest gives it 10.0.77.2/24 and pings L1's
#   NET-PING        side of the TAP (10.0.77.1)
#   NET-REMOVED     the interface is gone
#   AFTER-RESTORE   a second disk (vdb) appeared after L1 snapshotted the VM and restored it
#                   in a new tern; vda (plugged in before the snapshot) still holds the file
# Each line carries ms=: how long the guest waited, from its previous line.
. /scenarios/blk-lib.sh
rig_modload virtio_pci virtio_blk virtio_net || echo "TERN-GUEST-ERROR: cannot load the virtio modules"
# Milliseconds of uptime.
ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
# wait_until WHAT TEST...: until TEST succeeds, looking every 50 ms for up to 90 s.
wait_until() {
    what=$1
    shift
    n=0
    while ! "$@"; do
        n=$((n + 1))
        if [ $n -gt 1800 ]; then
            echo "TERN-GUEST-ERROR: hotplug: $what did not happen within 90 s"
            return 1
        fi
        sleep 0.05
    done
}
present() { [ -b "/dev/$1" ]; }
absent() { [ ! -e "/dev/$1" ]; }
# The virtio_net interface, if there is one.
nic() {
    for d in /sys/class/net/*; do
        if [ "$(basename "$(readlink "$d/device/driver" 2>/dev/null)")" = virtio_net ]; then
            basename "$d"
            return 0
        fi
    done
    return 1
}
has_nic() { nic > /dev/null; }
no_nic() { ! nic > /dev/null; }
say() {
    now=$(ms)
    echo "TERN-GUEST-HP-$1 ms=$((now - t)) $2"
    t=$now
}
FILE_TEXT="tern-hotplug: written by the guest on a hotplugged disk"

t=$(ms)
say READY "disks=$(ls /sys/block | tr '\n' ',')"
if wait_until "a disk to appear" present vda; then
    say DISK-ADDED "dev=vda size=$(cat /sys/block/vda/size)"
    mkdir -p /mnt/hot
    if mke2fs -q /dev/vda > /dev/null 2>&1 && mount -t ext2 /dev/vda /mnt/hot; then
        echo "$FILE_TEXT" > /mnt/hot/file.txt
        blk_pattern 1048576 hot > /mnt/hot/data
        sum=$(sha256sum < /mnt/hot/data | cut -d' ' -f1)
        umount /mnt/hot && sync
        say DISK-USED "sha=$sum"
    else
        echo "TERN-GUEST-ERROR: hotplug: cannot make or mount a file system on vda"
    fi
fi
wait_until "vda to go" absent vda && say DISK-REMOVED ""
if wait_until "vda to come back" present vda; then
    if mount -t ext2 /dev/vda /mnt/hot && [ "$(cat /mnt/hot/file.txt)" = "$FILE_TEXT" ] \
        && [ "$(sha256sum < /mnt/hot/data | cut -d' ' -f1)" = "$sum" ]; then
        say DISK-READDED "file=ok"
    else
        echo "TERN-GUEST-ERROR: hotplug: the disk plugged in again does not hold what was written"
    fi
    umount /mnt/hot 2>/dev/null
fi
if wait_until "an interface to appear" has_nic; then
    dev=$(nic)
    say NET-ADDED "dev=$dev mac=$(cat /sys/class/net/$dev/address)"
    ip addr add 10.0.77.2/24 dev "$dev" && ip link set "$dev" up
    if ping -c 3 -W 5 10.0.77.1 > /tmp/ping.out 2>&1; then
        say NET-PING "$(grep -o '[0-9]* packets received' /tmp/ping.out | tr ' ' '_')"
    else
        echo "TERN-GUEST-ERROR: hotplug: no answer from 10.0.77.1 through $dev: $(tail -n 2 /tmp/ping.out | tr '\n' '|')"
    fi
fi
wait_until "the interface to go" no_nic && say NET-REMOVED ""
if wait_until "a second disk after the restore" present vdb; then
    if mount -t ext2 /dev/vda /mnt/hot && [ "$(cat /mnt/hot/file.txt)" = "$FILE_TEXT" ]; then
        umount /mnt/hot
        dd if=/dev/urandom of=/dev/vdb bs=4096 count=16 oflag=direct 2>/dev/null \
            && say AFTER-RESTORE "vda=ok vdb=ok"
    else
        echo "TERN-GUEST-ERROR: hotplug: after the restore vda does not hold the file"
    fi
fi
echo TERN-GUEST-HP-DONE
