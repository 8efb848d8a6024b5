# tern-migrate-net: network traffic and disk writes that the L1 script
# (xtask/l1/scenarios/migrate-net.sh) live-migrates to another tern in the middle. The guest has
# one virtio-net interface on L1's bridge (rig.net.* as for snapshot-net-workload.sh) and a
# virtio-blk data disk /dev/vda holding an ext4 file system (a copy of the rig's blk-root image),
# mounted on /data.
#
# The transfer is snapshot-net-workload.sh's (a continuous ping to L1, rig.net.chunks paced
# chunks over one TCP connection, the same TERN-SNAPNET-* lines); after each chunk the guest
# also appends the record "tern-migrate-record-NNNNNN" (N = chunk number) to
# /data/migrate/records and syncs, so disk writes go on through the migration. At the end it
# reports the records and unmounts /data, so the image is clean for L1's e2fsck and debugfs.
#
# Output (judged by migrate-net.sh), on the serial console, besides snapshot-net-workload.sh's:
#   TERN-MIGNET-DISK=mounted /dev/vda on /data
#   TERN-MIGNET-PING-GAP=missing:N after-seq:S   the longest run of unanswered pings (0.2 s
#                                          each, in the guest's time) and the reply before it
#   TERN-MIGNET-RECORDS=count:N sha256:S   (the records file as the guest reads it back)
#   TERN-MIGNET-UNMOUNTED
SNAPNET_AS_LIBRARY=1
. /scenarios/snapshot-net-workload.sh
. /scenarios/blk-lib.sh

MIGNET_RECORDS=/data/migrate/records

# One record per chunk, synced; a failure goes to the console (fd 3 in the sending subshell).
snapnet_after_chunk() {
    if ! { printf 'tern-migrate-record-%06d\n' "$1" >> "$MIGNET_RECORDS" && sync; }; then
        echo "TERN-GUEST-ERROR=migrate-net: record $1 not written" >&3
    fi
}

mignet_mount() {
    blk_wait_disks vda || return 1
    mkdir -p /data
    if ! mount -t ext4 -o rw /dev/vda /data; then
        blk_fail "cannot mount /dev/vda (ext4) on /data"
        return 1
    fi
    mkdir -p "${MIGNET_RECORDS%/*}" && : > "$MIGNET_RECORDS" && sync || {
        blk_fail "cannot create $MIGNET_RECORDS"
        return 1
    }
    echo "TERN-MIGNET-DISK=mounted /dev/vda on /data"
}

# mignet_ping_gap: the longest run of pings the guest sent without a reply (the switch-over).
mignet_ping_gap() {
    echo "TERN-MIGNET-PING-GAP=$(sed -n 's/.* seq=\([0-9]*\) .*/\1/p' /tmp/ping.log |
        awk 'NR > 1 && $1 - prev - 1 > gap { gap = $1 - prev - 1; at = prev } { prev = $1 }
             END { printf "missing:%d after-seq:%s", gap, (at == "" ? "-" : at) }')"
}

mignet_unmount() {
    echo "TERN-MIGNET-RECORDS=count:$(wc -l < "$MIGNET_RECORDS") sha256:$(sha256sum < "$MIGNET_RECORDS" | cut -d' ' -f1)"
    sync
    if umount /data; then
        echo "TERN-MIGNET-UNMOUNTED"
    else
        blk_fail "cannot unmount /data"
    fi
}

if mignet_mount; then
    net_setup && snapnet_workload && mignet_ping_gap
    mignet_unmount
fi
