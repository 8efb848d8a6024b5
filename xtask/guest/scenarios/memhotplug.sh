# Memory hotplug (virtio-mem) under the Debian kernel's own driver (virtio_mem), driven from
# L1 (xtask/l1/scenarios/memhotplug.sh). The guest boots with 512 MiB and a virtio-mem device
# of 512 MiB more; each step waits for MemTotal to reach what L1 asked for:
#   READY          the driver is loaded; MemTotal at boot (t0)
#   GROWN          MemTotal >= t0 + 512 MiB (L1 asked for 1 GiB)
#   FILLED         700 MiB written to a tmpfs (more than the boot memory holds), a sample read back
#   FREED          the file removed (L1 then asks for 512 MiB)
#   SHRUNK         MemTotal <= t0
#   REGROWN        MemTotal >= t0 + 256 MiB (L1 asked for 768 MiB; it then sets a balloon,
#                  snapshots the VM and restores it in a new tern)
#   AFTER-RESTORE  MemTotal >= t0 + 512 MiB (L1 emptied the balloon and asked the restored VM
#                  for 1 GiB)
# (Under QEMU, L1 asks for 1 GiB again without a snapshot.)
rig_modload virtio_pci virtio_mem virtio_balloon || echo "TERN-GUEST-ERROR: cannot load virtio_mem or virtio_balloon"
. /scenarios/mem-lib.sh
# MemTotal is looked at every 50 ms: the time from L1's request to the guest's line is what
# the scenario measures.
MEM_POLL_S=0.05
t0=$(memtotal)
# step NAME CMP KB: wait up to 150 s for MemTotal CMP KB, then say NAME (or an error).
step() {
    if wait_mem "$2" "$3" 150; then
        echo "TERN-GUEST-MEM-$1 memtotal_kb=$(memtotal) was=$t0"
    else
        echo "TERN-GUEST-ERROR: MemTotal $(memtotal) kB, not $2 $3 within 150 s ($1)"
        return 1
    fi
}
echo "TERN-GUEST-MEM-READY memtotal_kb=$t0"
if step GROWN -ge $((t0 + 524288)); then
    mkdir -p /tmp/fill && mount -t tmpfs -o size=900m tmpfs /tmp/fill
    # A 1 MiB pattern, 700 times; a sample of the file's MiBs must read back as the pattern
    # (a page lost while the memory was added would read as zeroes).
    yes "tern virtio-mem" | head -c 1048576 > /tmp/one
    want=$(md5sum < /tmp/one | cut -d' ' -f1)
    i=0
    while [ $i -lt 700 ]; do cat /tmp/one; i=$((i + 1)); done > /tmp/fill/f 2>/dev/null
    size=$(wc -c < /tmp/fill/f)
    bad=0
    i=3
    while [ $i -lt 700 ]; do
        got=$(dd if=/tmp/fill/f bs=1M skip=$i count=1 2>/dev/null | md5sum | cut -d' ' -f1)
        [ "$got" = "$want" ] || bad=$((bad + 1))
        i=$((i + 7))
    done
    if [ "$size" = $((700 * 1048576)) ] && [ $bad = 0 ]; then
        echo "TERN-GUEST-MEM-FILLED bytes=$size MemFree_kb=$(awk '/^MemFree:/ { print $2 }' /proc/meminfo)"
    else
        echo "TERN-GUEST-ERROR: wrote $size bytes of 700 MiB, $bad MiB of it of the sample read back wrong"
    fi
    sleep 3
    rm /tmp/fill/f
    umount /tmp/fill
    echo "TERN-GUEST-MEM-FREED"
    step SHRUNK -le "$t0" &&
        step REGROWN -ge $((t0 + 262144)) &&
        step AFTER-RESTORE -ge $((t0 + 524288))
fi
