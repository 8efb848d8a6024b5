# tern-snapshot-net: network traffic that the L1 script (xtask/l1/scenarios/snapshot-net.sh)
# snapshots in the middle, kills, and restores in a new tern. The guest has one virtio-net
# interface on L1's bridge (rig.net.ip=, L1 is rig.net.host=).
#
# Starts a continuous ping to L1 (one every 0.2 s, replies logged to /tmp/ping.log) and then
# sends rig.net.chunks chunks of deterministic data to L1's listener (rig.net.port) through one
# TCP connection (busybox nc). Chunk N is the line "tern-snapnet-chunk-NNNNNN" followed by the
# same rig.net.chunk-bytes block of 20-byte lines "tern-snapnet-LLLLLL" (L = line number), cut
# at rig.net.chunk-bytes; snapshot-net.sh generates the same stream and compares sha256 sums.
# The chunks are paced (rig.net.pause seconds after each), so the transfer spans the snapshot.
#
# Output (judged by snapshot-net.sh), on the serial console:
#   TERN-GUEST-NET-DEV=... (net_setup)
#   TERN-SNAPNET-START chunks=N bytes=B
#   TERN-SNAPNET-PROGRESS n pings:R up:T   after chunk n was handed to nc (R: ping replies so far)
#   TERN-SNAPNET-SENT=rc:R chunks:N up:T   once nc exited (L1 closed the connection)
#   TERN-SNAPNET-PING=replies:R last-seq:S sent:S'
#   TERN-SNAPNET-DONE
#   TERN-SNAP-STALL ...                    when no chunk went out for ~16 s (fails the scenario)
#
# With SNAPNET_AS_LIBRARY set, sourcing this file only defines the functions (the tern-migrate-net
# workload, migrate-net-workload.sh, runs the same transfer and redefines snapnet_after_chunk).
. /scenarios/net-lib.sh

# snapnet_stalled N: what the guest's network looks like when the transfer made no progress for
# a while (after chunk N): the interface counters, the virtio interrupt counts, the TCP socket,
# the kernel log.
snapnet_stalled() {
    echo "TERN-SNAP-STALL no chunk sent for ~16 s after chunk $1; uptime $(net_now)"
    ip -s link show "$NET_IF" | sed 's/^/TERN-SNAP-STALL link: /'
    grep -i -E 'virtio|LOC' /proc/interrupts | sed 's/^/TERN-SNAP-STALL irq: /'
    grep -v ' 0A ' /proc/net/tcp | sed 's/^/TERN-SNAP-STALL tcp: /'
    for q in "$NET_SYS"/queues/*; do
        echo "TERN-SNAP-STALL queue $(basename "$q"): $(cat "$q"/tx_timeout 2>/dev/null)"
    done
    tail -n 3 /tmp/ping.log | sed 's/^/TERN-SNAP-STALL ping: /'
    dmesg | tail -n 30 | sed 's/^/TERN-SNAP-STALL dmesg: /'
}

# snapnet_watchdog: reports (once per stall) when the transfer stands still for ~16 s.
snapnet_watchdog() {
    local last= now same=0
    while sleep 2; do
        now=$(cat /tmp/snapnet-progress 2>/dev/null)
        [ "$now" = done ] && return
        if [ "$now" = "$last" ]; then
            same=$((same + 1))
        else
            same=0
            last=$now
        fi
        [ $same -eq 8 ] && snapnet_stalled "$now"
    done
}

snapnet_replies() { grep -c 'bytes from' /tmp/ping.log; }

# snapnet_after_chunk N: run after chunk N went to nc and its progress line was printed (in the
# sending subshell: stdout is nc's stdin, the console is fd 3). Nothing here.
snapnet_after_chunk() { :; }

snapnet_workload() {
    local host port chunks bytes pause i rc ping_pid
    host=$(net_param host) || { net_fail "no rig.net.host="; return 1; }
    port=$(net_param port) || { net_fail "no rig.net.port="; return 1; }
    chunks=$(net_param chunks) || { net_fail "no rig.net.chunks="; return 1; }
    bytes=$(net_param chunk-bytes) || { net_fail "no rig.net.chunk-bytes="; return 1; }
    pause=$(net_param pause) || { net_fail "no rig.net.pause="; return 1; }
    awk -v n=$((bytes / 20 + 1)) 'BEGIN { for (i = 0; i < n; i++) printf "tern-snapnet-%06d\n", i }' |
        head -c "$bytes" > /tmp/block
    net_wait_reachable "$host" 30 || return 1
    ping -i 0.2 "$host" > /tmp/ping.log 2>&1 &
    ping_pid=$!
    echo 0 > /tmp/snapnet-progress
    snapnet_watchdog &
    echo "TERN-SNAPNET-START chunks=$chunks bytes=$((chunks * (26 + bytes))) up:$(net_now)"
    # The progress lines go to the console (fd 3); stdout is nc's stdin.
    exec 3>&1
    {
        i=1
        while [ $i -le "$chunks" ]; do
            printf 'tern-snapnet-chunk-%06d\n' $i
            cat /tmp/block
            echo "TERN-SNAPNET-PROGRESS $i pings:$(snapnet_replies) up:$(net_now)" >&3
            echo $i > /tmp/snapnet-progress
            snapnet_after_chunk $i
            sleep "$pause"
            i=$((i + 1))
        done
    } | timeout 240 nc "$host" "$port"
    rc=$?
    echo done > /tmp/snapnet-progress
    exec 3>&-
    echo "TERN-SNAPNET-SENT=rc:$rc chunks:$chunks up:$(net_now)"
    # A second more of pings after the transfer, then the count.
    sleep 1
    kill $ping_pid 2>/dev/null
    wait $ping_pid 2>/dev/null
    echo "TERN-SNAPNET-PING=replies:$(snapnet_replies) last-seq:$(sed -n 's/.*bytes from.* seq=\([0-9]*\).*/\1/p' /tmp/ping.log | tail -n 1) up:$(net_now)"
    net_stats
    echo "TERN-SNAPNET-DONE"
}

[ -n "${SNAPNET_AS_LIBRARY:-}" ] || { net_setup && snapnet_workload; }
