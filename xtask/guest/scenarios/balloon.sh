# virtio-balloon under the Debian kernel's own driver (virtio_balloon), driven from L1
# (xtask/l1/scenarios/balloon.sh). `rig.balloon=` on the command line picks the part:
#   inflate: writes 600 MiB to a tmpfs and removes it (so free guest memory is resident on
#            the host), says READY with MemTotal, then waits for MemTotal to drop by the
#            balloon L1 sets (INFLATED) and to come back when L1 empties it (DEFLATED).
#   report:  writes 300 MiB to a tmpfs (FILLED), keeps it 4 s, removes it (FREED) and stays
#            up 15 s while free page reporting hands it to the host.
rig_modload virtio_pci virtio_balloon || echo "TERN-GUEST-ERROR: cannot load virtio_balloon"
. /scenarios/mem-lib.sh
part=$(sed -n 's/.*rig\.balloon=\([a-z]*\).*/\1/p' /proc/cmdline)
mkdir -p /tmp/fill && mount -t tmpfs -o size=700m tmpfs /tmp/fill
case "$part" in
    inflate)
        dd if=/dev/zero of=/tmp/fill/f bs=1M count=600 2>/dev/null
        rm /tmp/fill/f
        t0=$(memtotal)
        echo "TERN-GUEST-BALLOON-READY memtotal_kb=$t0"
        if wait_mem -le $((t0 - 262144)) 120; then
            echo "TERN-GUEST-BALLOON-INFLATED memtotal_kb=$(memtotal) was=$t0"
        else
            echo "TERN-GUEST-ERROR: MemTotal still $(memtotal) kB (was $t0) 120 s after READY"
        fi
        if wait_mem -ge "$t0" 120; then
            echo "TERN-GUEST-BALLOON-DEFLATED memtotal_kb=$(memtotal)"
        else
            echo "TERN-GUEST-ERROR: MemTotal $(memtotal) kB, not back to $t0 within 120 s"
        fi
        ;;
    report)
        dd if=/dev/zero of=/tmp/fill/f bs=1M count=300 2>/dev/null
        echo "TERN-GUEST-BALLOON-FILLED"
        sleep 4
        rm /tmp/fill/f
        echo "TERN-GUEST-BALLOON-FREED"
        sleep 15
        echo "TERN-GUEST-BALLOON-REPORT-DONE"
        ;;
    *) echo "TERN-GUEST-ERROR: rig.balloon=inflate|report missing" ;;
esac
umount /tmp/fill
