# Disks changed while the guest runs, under the Debian kernel's own virtio_blk driver, driven
# from L1 (xtask/l1/scenarios/diskupdate.sh). vda is a raw image (tern id `data`), vdb a qcow2
# image (id `aux`) whose size L1 also moves as a signal: each step below waits for vdb to
# reach a size, so the guest measures only once L1 changed what it measures.
#   READY              both disks are there (vda 64 MiB, vdb 32 MiB)
#   GROWN              L1 grew vda to 96 MiB and vdb to 48 MiB; a 1 MiB pattern written past
#                      vda's old end (at 80 MiB) and read back, its sha256
#   LIMITED iops=N     L1 set vda to 50 ops/s (vdb 49 MiB): 4 KiB direct reads per second
#   BW kibps=N         L1 set vda to 4 MiB/s and no ops limit (vdb 50 MiB): 1 MiB direct reads
#   UNLIMITED iops=N   L1 lifted both limits (vdb 51 MiB): 4 KiB direct reads per second
. /scenarios/blk-lib.sh
MIB=1048576
bytes() { echo $(($(cat "/sys/block/$1/size") * 512)); }
# wait_size DEV BYTES: until DEV holds at least BYTES, looking every 50 ms for up to 60 s.
wait_size() {
    n=0
    while [ "$(bytes "$1")" -lt "$2" ]; do
        n=$((n + 1))
        [ $n -gt 1200 ] && { blk_fail "$1 is $(bytes "$1") bytes, not $2, after 60 s"; return 1; }
        sleep 0.05
    done
}
# Centiseconds of uptime.
cs() { awk '{ printf "%d", $1 * 100 }' /proc/uptime; }
# per_s DEV BS COUNT UNIT: COUNT direct reads of BS bytes from DEV; prints UNITs per second
# (UNIT 1: reads; 1024: KiB).
per_s() {
    t0=$(cs)
    dd if="/dev/$1" of=/dev/null bs="$2" count="$3" iflag=direct 2>/dev/null || blk_fail "dd from $1 failed"
    d=$(($(cs) - t0))
    [ "$d" -gt 0 ] || d=1
    if [ "$4" = 1 ]; then
        echo $(($3 * 100 / d))
    else
        echo $(($3 * ($2 / $4) * 100 / d))
    fi
}
if blk_wait_disks vda vdb; then
    echo "TERN-GUEST-DISKUP-READY vda=$(bytes vda) vdb=$(bytes vdb)"
    if wait_size vda $((96 * MIB)) && wait_size vdb $((48 * MIB)); then
        blk_pattern $MIB grown > /tmp/pattern
        dd if=/tmp/pattern of=/dev/vda bs=$MIB seek=80 count=1 oflag=direct conv=notrunc 2>/dev/null \
            || blk_fail "cannot write past vda's old end"
        dd if=/dev/vda of=/tmp/back bs=$MIB skip=80 count=1 iflag=direct 2>/dev/null
        if cmp -s /tmp/pattern /tmp/back; then
            echo "TERN-GUEST-DISKUP-GROWN vda=$(bytes vda) vdb=$(bytes vdb) sha=$(sha256sum < /tmp/back | cut -d' ' -f1)"
        else
            blk_fail "the pattern written at 80 MiB of vda did not read back"
        fi
    fi
    if wait_size vdb $((49 * MIB)); then
        echo "TERN-GUEST-DISKUP-LIMITED iops=$(per_s vda 4096 100 1)"
    fi
    if wait_size vdb $((50 * MIB)); then
        echo "TERN-GUEST-DISKUP-BW kibps=$(per_s vda $MIB 12 1024)"
    fi
    if wait_size vdb $((51 * MIB)); then
        echo "TERN-GUEST-DISKUP-UNLIMITED iops=$(per_s vda 4096 1000 1)"
    fi
    dmesg | grep -i "capacity change" | tail -n 3 | sed 's/^/TERN-GUEST-DISKUP-DMESG /'
fi
echo TERN-GUEST-DISKUP-DONE
