# What the L1 sides of the network-stream scenarios (snapshot-net.sh, migrate-net.sh) share: the
# bridge with its persistent TAPs, the TCP listener, the guest's parameters, reading the guest's
# progress lines and the final transfer checks. The guest side is
# guest/scenarios/snapshot-net-workload.sh (pings L1 and sends SNET_CHUNKS paced chunks of
# deterministic data over one TCP connection). Sourced after snapshot-lib.sh, with case_, tern,
# W and TAPS (the TAP names, the first one the guest's at boot) set.

# iproute2's ip (busybox's cannot create bridges or TAPs), copied into L1 by `cargo xtask images`.
IP=/usr/sbin/ip
BRIDGE=br0
HOST_IP=10.77.0.1
GUEST_IP=10.77.0.21
GUEST_MAC=52:54:00:77:00:21
PORT=5002
# The transfer (both sides generate the same stream, see the guest script): chunks, block size
# and the guest's pause after each chunk.
SNET_CHUNKS=64
SNET_CHUNK_BYTES=262144
SNET_PAUSE=0.2
SNET_TOTAL=$((SNET_CHUNKS * (26 + SNET_CHUNK_BYTES)))
# The guest's kernel parameters for the transfer (after its rig.action=).
SNET_CMDLINE="rig.net.ip=$GUEST_IP/24 rig.net.host=$HOST_IP rig.net.port=$PORT rig.net.chunks=$SNET_CHUNKS rig.net.chunk-bytes=$SNET_CHUNK_BYTES rig.net.pause=$SNET_PAUSE"

size() { stat -c %s "$1" 2>/dev/null || echo 0; }
# progress FILE: the chunk numbers of the guest's progress lines, one per line, in order.
progress() { tr -d '\r' < "$1" | sed -n 's/^TERN-SNAPNET-PROGRESS \([0-9][0-9]*\) .*/\1/p'; }
# progress_pings FILE N: the ping reply count on progress line N.
progress_pings() { tr -d '\r' < "$1" | sed -n "s/^TERN-SNAPNET-PROGRESS $2 pings:\([0-9]*\) .*/\1/p" | head -n 1; }
# seen LOG N: the console log has progress line N.
seen() { progress "$1" 2>/dev/null | grep -q -x "$2"; }
# fact FILE KEY: the rest of the first "KEY=" line in a console log.
fact() { tr -d '\r' < "$1" 2>/dev/null | sed -n "s/^$2=//p" | head -n 1; }
# field LINE NAME: NAME's value in a "k1:v1 k2:v2 ..." line.
field() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2[:=]//p" | head -n 1; }
# l1_echos: ICMP echo requests L1 has received so far.
l1_echos() { awk '/^Icmp:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == "InEchos") c = i; h = 1 } else print $c }' /proc/net/snmp; }
# established: L1's TCP connection on PORT is (still) established (busybox nc listens on the
# IPv6 wildcard address, so the connection is in tcp6 as ::ffff:10.77.0.1).
established() { awk -v p=":$(printf %04X $PORT)" '$2 ~ p "$" && $4 == "01" { f = 1 } END { exit !f }' /proc/net/tcp /proc/net/tcp6; }
# expected_stream: the bytes the guest sends (see the guest script).
expected_stream() {
    local i
    awk -v n=$((SNET_CHUNK_BYTES / 20 + 1)) 'BEGIN { for (i = 0; i < n; i++) printf "tern-snapnet-%06d\n", i }' |
        head -c "$SNET_CHUNK_BYTES" > "$W/block"
    i=1
    while [ $i -le $SNET_CHUNKS ]; do
        printf 'tern-snapnet-chunk-%06d\n' $i
        cat "$W/block"
        i=$((i + 1))
    done
}
# counters SOCK WHAT: tern's counters and the TAPs' (for a stuck or failed run).
counters() {
    local t
    "$tern" counters --api-socket "$1" 2>&1 | sed "s/^/$TAG-INFO $case_ counters $2: /"
    for t in $TAPS; do
        $IP -s link show "$t" 2>&1 | sed "s/^/$TAG-INFO $case_ $t $2: /"
    done
}
# tap_stats TAP: the TAP's packet and byte counters, one line.
tap_stats() {
    (cd "/sys/class/net/$1/statistics" && for c in rx_packets rx_bytes tx_packets tx_bytes rx_dropped tx_dropped; do printf '%s=%s ' $c "$(cat $c)"; done)
}

net_teardown() {
    local t
    for t in $TAPS; do
        $IP link del "$t" 2>/dev/null
    done
    $IP link del "$BRIDGE" 2>/dev/null
}
# L1's network, the listener: the scripts' own clean-up (finish runs it).
finish_extra() {
    [ -n "${nc_pid:-}" ] && kill "$nc_pid" 2>/dev/null
    net_teardown
}

# net_l1_setup: the check "setup": bridge BRIDGE (HOST_IP/24) with the persistent TAPs in TAPS,
# and nc listening on PORT (nc_pid), writing what it receives to $W/recv; the scenario ends if
# any of it fails.
net_l1_setup() {
    local out t
    [ -c /dev/net/tun ] || { fail setup "/dev/net/tun missing in L1 (tun.ko not loaded?)"; finish; }
    [ -x "$IP" ] || { fail setup "$IP (iproute2) missing from L1"; finish; }
    net_teardown
    if ! out=$(
        {
            $IP link add name "$BRIDGE" type bridge forward_delay 0 &&
                $IP addr add "$HOST_IP/24" dev "$BRIDGE" &&
                $IP link set "$BRIDGE" up &&
                for t in $TAPS; do
                    $IP tuntap add dev "$t" mode tap &&
                        $IP link set "$t" master "$BRIDGE" &&
                        $IP link set "$t" up || exit 1
                done
        } 2>&1
    ); then
        fail setup "building the network failed: $(echo "$out" | tail -n 3 | tr '\n' '|')"
        finish
    fi
    # The listener: one connection, what it receives to $W/recv. Its stdin must never reach EOF
    # (busybox nc would half-close the connection): a FIFO opened read-write.
    mkfifo "$W/idle"
    nc -l -p "$PORT" <>"$W/idle" >"$W/recv" 2>"$W/nc.err" &
    nc_pid=$!
    sleep 0.5
    if kill -0 "$nc_pid" 2>/dev/null; then
        pass setup "bridge $BRIDGE ($HOST_IP/24) with persistent TAP(s) $(echo $TAPS | tr ' ' ,), nc listening on port $PORT"
    else
        fail setup "nc -l -p $PORT exited at once: $(head -c 200 "$W/nc.err")"
        finish
    fi
}

# check_device LOG: the check "device": the guest's NIC has GUEST_MAC and carrier.
check_device() {
    local dev
    dev=$(fact "$1" TERN-GUEST-NET-DEV)
    if [ "$(field "$dev" mac)" = "$GUEST_MAC" ] && [ "$(field "$dev" carrier)" = 1 ]; then
        pass device "the guest's $(echo "$dev" | cut -d' ' -f1) is virtio_net with MAC $GUEST_MAC, carrier 1"
    else
        fail device "the guest reports '$dev', expected MAC $GUEST_MAC and carrier 1"
    fi
}

# check_sequence LOG1 LOG2 WHAT: the check "sequence": progress lines 1..SNET_CHUNKS once each,
# in order, across the two runs' console logs.
check_sequence() {
    local got want
    cat "$1" "$2" > "$W/joined"
    got=$(progress "$W/joined" | tr '\n' ' ')
    want=$(seq 1 "$SNET_CHUNKS" | tr '\n' ' ')
    if [ "$got" = "$want" ]; then
        pass sequence "progress 1..$SNET_CHUNKS, each once, in order, across the $3"
    else
        fail sequence "progress lines across both runs are '$got', expected 1..$SNET_CHUNKS"
    fi
}

# check_transfer LOG GOT_BEFORE WHAT: the checks "transfer" (L1's listener saw the connection
# close after all SNET_TOTAL bytes; the guest's nc, as LOG reports, exited 0) and "sha256" (what
# L1 received is exactly the stream generated here). GOT_BEFORE: bytes received before WHAT.
check_transfer() {
    local sent got_end nc_state want_sum got_sum
    sent=$(fact "$1" TERN-SNAPNET-SENT)
    got_end=$(size "$W/recv")
    if kill -0 "$nc_pid" 2>/dev/null; then
        nc_state="still running"
        kill "$nc_pid" 2>/dev/null
    else
        nc_state="exited"
    fi
    wait "$nc_pid" 2>/dev/null
    nc_pid=
    if [ "$nc_state" = exited ] && [ "$(field "$sent" rc)" = 0 ] && [ "$got_end" = "$SNET_TOTAL" ]; then
        pass transfer "L1 received all $SNET_TOTAL bytes ($2 before the $3) and the connection closed; the guest's nc exited 0"
    else
        fail transfer "L1 received $got_end of $SNET_TOTAL bytes ($2 before the $3), its listener $nc_state; the guest: '${sent:-no TERN-SNAPNET-SENT line}'"
    fi
    want_sum=$(expected_stream | sha256sum | cut -d' ' -f1)
    got_sum=$(sha256sum "$W/recv" | cut -d' ' -f1)
    if [ "$got_sum" = "$want_sum" ]; then
        pass sha256 "what L1 received has the expected sha256 $want_sum"
    else
        expected_stream > "$W/want"
        fail sha256 "L1 received sha256 $got_sum, expected $want_sum; first difference: $(cmp "$W/want" "$W/recv" 2>&1 | head -n 1)"
    fi
}
