#!/bin/sh
# L1 /init for the tern nested rig (runs under QEMU TCG with an emulated AMD-V CPU).
# Loads kvm-amd (and tun/bridge), then runs the rig agent, which runs the scenarios in
# /rig/scenarios.json and reports over this console; with rig.l1=shell on the L1 command line
# it gives an interactive shell instead.
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run
echo "@@RIG-L1-INIT uptime=$(cut -d' ' -f1 /proc/uptime)"

for ko in $(cat /lib/modules/l1/load-order); do
    insmod "$ko" || echo "@@RIG-L1-WARN insmod $ko failed"
done
[ -c /dev/kvm ] || echo "@@RIG-L1-WARN /dev/kvm missing"
# The Debian guest's disk, when the host attached it (xtask/src/debian.rs).
if grep -q ' rig.debian=1' /proc/cmdline; then
    i=0
    while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    mkdir -p /rig/debian
    mount -t ext4 -o ro /dev/vda /rig/debian || echo "@@RIG-L1-WARN cannot mount the Debian disk"
fi
dmesg | grep -iE 'nested|svm|kvm' | sed 's/^/[l1-dmesg] /'

case " $(cat /proc/cmdline) " in
    *" rig.l1=shell "*)
        echo "L1 shell. Guests: /rig/guest/{vmlinuz-cloud,vmlinux-cloud,guest-initrd.cpio}"
        echo "e.g. qemu-system-x86_64 -accel kvm -M microvm -cpu host -m 256 -nographic \\"
        echo "       -kernel /rig/guest/vmlinuz-cloud -initrd /rig/guest/guest-initrd.cpio \\"
        echo "       -append 'console=ttyS0 rig.action=shell'"
        [ -x /usr/bin/tern ] && echo "or: tern run --kernel /rig/guest/vmlinuz-cloud --initrd /rig/guest/guest-initrd.cpio --cmdline 'console=ttyS0 rig.action=shell' --serial stdio"
        echo "Disk image (ext4, root=/dev/vda boots from it): cp /rig/blk/root.ext4 /tmp/ and add --disk path=/tmp/root.ext4"
        setsid cttyhack sh
        ;;
    *)
        /rig/xtask rig-agent /rig/scenarios.json
        echo "@@RIG-L1-AGENT-EXIT $?"
        ;;
esac
poweroff -f
