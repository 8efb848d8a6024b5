#!/bin/sh
# L1 side of the virtio-net scenarios (xtask/src/scenarios.rs, groups "net" and "net-qemu").
# Runs inside L1, started by the rig agent as
#
#     sh /rig/l1/net.sh CASE -- VMM-ARGV...
#
# where VMM-ARGV is the scenario's normal VMM command line (tern, or QEMU to check the rig and
# these scripts themselves). The script builds the network in L1 with iproute2 (a bridge br0
# with 10.77.0.1/24 and persistent TAPs enslaved to it), then boots one or two guests, each
# with VMM-ARGV plus its NIC (tern: `--net tap=NAME,mac=MAC[,offload=off][,mtu=N]`; QEMU:
# `-netdev tap,ifname=NAME,script=no,downscript=no,vhost=off -device virtio-net-pci,...`) and
# `rig.action=` / `rig.net.*=` parameters for the guest script (guest/scenarios/net-*.sh).
# Each guest's output is passed through prefixed with "[LABEL] " and kept in $W/LABEL.out.
#
# Output: "TERN-NET-PASS CASE/CHECK: what" for each check that passed, "TERN-NET-FAIL
# CASE/CHECK: why" for one that failed, and "TERN-NET-OK CASE" at the end when every check
# passed (exit 0; otherwise exit 1). TERN-GUEST-ERROR from a guest fails it too.
#
# CASEs: pair, pair-nooffload, pair-mq (2 queue pairs, 2 vCPUs), link-down (see each function
# below).

set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu

case_=${1:?usage: net.sh CASE -- VMM-ARGV...}
shift
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "TERN-NET-FAIL $case_/args: no VMM command line"; exit 1; }

# iproute2's ip (busybox's cannot create bridges or TAPs), copied into L1 by `cargo xtask images`.
IP=/usr/sbin/ip
BRIDGE=br0
HOST_IP=10.77.0.1
PREFIX=10.77.0
# Bytes the pair's sender pushes to the receiver.
PAIR_BYTES=4194304
# The largest Ethernet frame at MTU 1500 (header included, as the TAP counters count).
ETH_FRAME_MAX=1514
# Seconds one guest boot may take before it is killed.
BOOT_TIMEOUT=240
# The link-down guest must see its carrier go within this many seconds of the TAP's deletion.
LINK_DOWN_MAX=10

case "$(basename "$1")" in
    tern*) kind=tern ;;
    qemu-system-*) kind=qemu ;;
    *) echo "TERN-NET-FAIL $case_/args: unknown VMM $1"; exit 1 ;;
esac

W=/tmp/net-$case_
rm -rf "$W"
mkdir -p "$W"
# The VMM's argv, one argument per line (none contains a newline), reused by every guest.
for a in "$@"; do
    printf '%s\n' "$a"
done > "$W/argv"

failed=0
checks=0
taps=
pass() {
    checks=$((checks + 1))
    echo "TERN-NET-PASS $case_/$1: $2"
}
fail() {
    checks=$((checks + 1))
    failed=1
    echo "TERN-NET-FAIL $case_/$1: $2"
}
info() { echo "TERN-NET-INFO $case_: $*"; }
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# Removes the bridge and TAPs (the next scenario in this L1 builds its own).
teardown() {
    for t in $taps; do
        $IP link del "$t" 2>/dev/null
    done
    $IP link del "$BRIDGE" 2>/dev/null
}
finish() {
    cd /
    # (A VMM still running here is killed with this script's process group by the agent.)
    teardown
    if [ "$failed" = 0 ] && [ "$checks" -gt 0 ]; then
        echo "TERN-NET-OK $case_ ($checks checks)"
        exit 0
    fi
    echo "TERN-NET-FAILED $case_"
    exit 1
}

# fact LABEL KEY: the value of the guest's TERN-GUEST-KEY= line (first one; rest of the line).
fact() {
    grep -m 1 -o "TERN-GUEST-$2=.*" "$W/$1.out" 2>/dev/null | head -n 1 | sed "s/^TERN-GUEST-$2=//" | tr -d '\r'
}
# field LINE NAME: NAME's value in a "k1:v1 k2=v2 ..." line (either separator).
field() {
    echo "$1" | tr ' ' '\n' | sed -n "s/^$2[:=]//p" | head -n 1
}
# bit FEATURES N: virtio feature bit N (0/1) from the guest's sysfs features string.
bit() { echo "$1" | cut -c $(($2 + 1)); }

# setup_network TAP...: the bridge with L1's address and one persistent TAP per name in it.
setup_network() {
    local t out
    taps="$*"
    if [ ! -c /dev/net/tun ]; then
        fail setup "/dev/net/tun missing in L1 (tun.ko not loaded?)"
        finish
    fi
    if [ ! -x "$IP" ]; then
        fail setup "$IP (iproute2) missing from L1"
        finish
    fi
    teardown
    if ! out=$(
        {
            $IP link add name "$BRIDGE" type bridge forward_delay 0 &&
                $IP addr add "$HOST_IP/24" dev "$BRIDGE" &&
                $IP link set "$BRIDGE" up &&
                for t in $taps; do
                    $IP tuntap add dev "$t" mode tap ${MQ:+multi_queue} &&
                        $IP link set "$t" master "$BRIDGE" &&
                        $IP link set "$t" up || exit 1
                done
        } 2>&1
    ); then
        fail setup "building the network failed: $(echo "$out" | tail -n 3 | tr '\n' '|')"
        finish
    fi
    pass setup "bridge $BRIDGE ($HOST_IP/24) with TAPs $taps"
}

# start_guest LABEL ACTION EXTRA-CMDLINE NET...: boots a guest in the background. NET is a tern
# --net spec (tap=NAME,mac=MAC[,mtu=N][,offload=off]); for QEMU it becomes -netdev/-device.
# With kind=qemu and $QEMU_MONITOR set, QEMU also gets a monitor on the FIFOs $W/LABEL.mon.in/out.
# The guest's output goes to $W/LABEL.out and, prefixed, to this script's output; the VMM's
# exit status to $W/LABEL.rc. Sets GUEST_PID (wait for it).
start_guest() {
    local label=$1 action=$2 extra=$3 nets a prev i spec kv tap mac mtu off dev
    shift 3
    nets="$*"
    set --
    prev=
    while IFS= read -r a; do
        case "$prev" in
            --cmdline | -append) a="$a rig.action=$action${extra:+ $extra}" ;;
        esac
        set -- "$@" "$a"
        prev=$a
    done < "$W/argv"
    # romfile=: no PXE option ROM (not in L1, and nothing boots from the network).
    dev=virtio-net-device
    case "$*" in *pcie=on* | *" pc "* | *q35*) dev=virtio-net-pci,romfile= ;; esac
    i=0
    for spec in $nets; do
        if [ "$kind" = tern ]; then
            set -- "$@" --net "$spec"
        else
            tap= mac= mtu= off=
            for kv in $(echo "$spec" | tr ',' ' '); do
                case "$kv" in
                    tap=*) tap=${kv#tap=} ;;
                    mac=*) mac=${kv#mac=} ;;
                    mtu=*) mtu=,host_mtu=${kv#mtu=} ;;
                    offload=off) off=,csum=off,guest_csum=off,gso=off,guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off,host_tso4=off,host_tso6=off,host_ecn=off,host_ufo=off ;;
                esac
            done
            q= mq=
            [ -n "${MQ:-}" ] && q=,queues=2 mq=,mq=on,vectors=6
            set -- "$@" -netdev "tap,id=n$i,ifname=$tap,script=no,downscript=no,vhost=off$q" \
                -device "$dev,netdev=n$i,mac=$mac$mtu$off$mq"
        fi
        i=$((i + 1))
    done
    if [ "$kind" = qemu ] && [ -n "${QEMU_MONITOR:-}" ]; then
        mkfifo "$W/$label.mon.in" "$W/$label.mon.out"
        set -- "$@" -monitor "pipe:$W/$label.mon"
    fi
    echo "TERN-NET-BOOT $case_/$label: $*"
    rm -f "$W/$label.rc"
    : > "$W/$label.out"
    {
        { timeout -s KILL "$BOOT_TIMEOUT" "$@" 2>&1; echo $? > "$W/$label.rc"; } |
            tee "$W/$label.out" | awk -v p="[$label] " '{ print p $0; fflush() }'
    } &
    GUEST_PID=$!
    eval "start_$label=$(now)"
}

# running LABEL: the guest's VMM has not exited yet.
running() { [ ! -f "$W/$1.rc" ]; }

# wait_for LABEL PATTERN SECS: waits until the guest printed PATTERN (grep -E), its VMM exited
# or SECS passed; succeeds only in the first case.
wait_for() {
    local t0
    t0=$(now)
    while ! grep -q -E "$2" "$W/$1.out"; do
        running "$1" || { grep -q -E "$2" "$W/$1.out"; return; }
        [ "$(awk -v s="$(since "$t0")" -v max="$3" 'BEGIN { print (s > max) }')" = 1 ] && return 1
        sleep 0.2
    done
}

# guest_done LABEL: after the VMM exited: it must have exited 0 after the guest's power-off
# line (check LABEL-boot; a failure there ends the case), and the guest must not have reported
# an error (LABEL-guest).
guest_done() {
    local label=$1 rc why start
    rc=$(cat "$W/$label.rc" 2>/dev/null)
    eval "start=\$start_$label"
    info "$label: $kind exited with status ${rc:-?} after $(since "$start")s"
    if [ "$rc" != 0 ]; then
        why=$(grep -i -m 3 -E 'error|unknown|unexpected|invalid|panic' "$W/$label.out" | tr '\r\n' '  ')
        [ "$rc" = 137 ] && why="killed after ${BOOT_TIMEOUT}s; $why"
        fail "$label-boot" "$kind exited with status ${rc:-?} (expected 0): ${why:-see the log}"
        return 1
    fi
    if ! grep -q TERN-GUEST-POWEROFF "$W/$label.out"; then
        fail "$label-boot" "$kind exited 0 but the guest never reached its power-off line"
        return 1
    fi
    if grep -q TERN-GUEST-ERROR "$W/$label.out"; then
        fail "$label-guest" "the guest reported: $(grep -m 3 TERN-GUEST-ERROR "$W/$label.out" | tr '\r\n' '  ')"
    fi
}

# check_device LABEL MAC MTU OFFLOAD: the guest found a virtio_net interface with the MAC we
# gave, the expected MTU, carrier up, operstate up, and the offload features OFFLOAD (on|off)
# asks for.
check_device() {
    local label=$1 mac=$2 mtu=$3 offload=$4 dev feat got b name missing extra
    dev=$(fact "$label" NET-DEV)
    if [ -z "$dev" ]; then
        fail "$label-device" "the guest never reported a virtio_net interface"
        return
    fi
    got=$(field "$dev" mac)
    if [ "$got" = "$mac" ]; then
        pass "$label-device" "the guest's $(echo "$dev" | cut -d' ' -f1) is bound to virtio_net with MAC $mac"
    else
        fail "$label-device" "the guest's interface has MAC '$got', expected $mac ($dev)"
    fi
    if [ "$(field "$dev" carrier)" = 1 ] && [ "$(field "$dev" operstate)" = up ]; then
        pass "$label-link" "carrier 1, operstate up after ip link set up"
    else
        fail "$label-link" "carrier '$(field "$dev" carrier)', operstate '$(field "$dev" operstate)', expected 1/up"
    fi
    got=$(field "$dev" mtu)
    if [ "$got" = "$mtu" ]; then
        pass "$label-mtu" "MTU $mtu"
    else
        fail "$label-mtu" "MTU '$got', expected $mtu"
    fi
    feat=$(fact "$label" NET-FEATURES)
    info "$label: virtio features $feat"
    missing=
    extra=
    if [ "$offload" = on ]; then
        # CSUM, GUEST_CSUM, GUEST_TSO4, HOST_TSO4.
        for b in 0:csum 1:guest_csum 7:guest_tso4 11:host_tso4; do
            [ "$(bit "$feat" "${b%%:*}")" = 1 ] || missing="$missing ${b#*:}"
        done
        if [ -z "$missing" ] && [ -n "$feat" ]; then
            pass "$label-offload" "checksum and TSO offloads negotiated (csum, guest_csum, guest_tso4, host_tso4)"
        else
            fail "$label-offload" "offloads not negotiated:${missing:- (no features reported)}"
        fi
    else
        # No checksum/segmentation feature: CSUM, GUEST_CSUM, GSO, GUEST_TSO4/6, GUEST_ECN,
        # GUEST_UFO, HOST_TSO4/6, HOST_ECN, HOST_UFO.
        for b in 0:csum 1:guest_csum 6:gso 7:guest_tso4 8:guest_tso6 9:guest_ecn 10:guest_ufo \
            11:host_tso4 12:host_tso6 13:host_ecn 14:host_ufo; do
            [ "$(bit "$feat" "${b%%:*}")" = 0 ] || extra="$extra ${b#*:}"
        done
        if [ -z "$extra" ] && [ -n "$feat" ]; then
            pass "$label-offload" "no checksum or segmentation offload offered (offload=off)"
        else
            fail "$label-offload" "offload=off but the guest negotiated:${extra:- (no features reported)}"
        fi
    fi
}

# check_ping LABEL NAME CHECK: the guest's TERN-GUEST-NET-PING-NAME line shows 3 of 3 replies.
# check_queues LABEL: the guest's interface has two queue pairs (multiqueue negotiated).
check_queues() {
    local label=$1 qs
    qs=$(fact "$label" NET-QUEUES)
    case "$qs" in
        *rx-0*rx-1*tx-0*tx-1*) pass "$label-queues" "the guest's eth0 has 2 queue pairs: $qs" ;;
        *) fail "$label-queues" "expected rx-0, rx-1, tx-0 and tx-1, the guest has: ${qs:-nothing}" ;;
    esac
}
check_ping() {
    local line
    line=$(fact "$1" "NET-PING-$2")
    case "$line" in
        received:3/3*) pass "$3" "$(field "$line" to) answered 3 of 3 pings ($(echo "$line" | sed -n 's/.*round-trip //p'))" ;;
        "") fail "$3" "the guest never pinged ($(fact "$1" NET-UNREACHABLE))" ;;
        *) fail "$3" "ping: $line" ;;
    esac
}

# --- pair / pair-nooffload: two guests on tap0/tap1 in br0 ping each other and L1, and move
# PAIR_BYTES of random data from a to b over TCP (a's busybox httpd, b's wget); b sends its
# sha256 back to a (nc); both sums are compared here too. ---
case_pair() {
    local offload=$1 opt= sent recv sum_a sum_b rx tx t0
    [ "$offload" = off ] && opt=,offload=off
    [ -n "${MQ:-}" ] && opt=$opt,queues=2
    setup_network tap0 tap1
    local common="rig.net.host=$HOST_IP rig.net.bytes=$PAIR_BYTES"
    t0=$(now)
    start_guest a script:net-pair "rig.net.role=send rig.net.ip=$PREFIX.11/24 rig.net.peer=$PREFIX.12 $common" \
        "tap=tap0,mac=52:54:00:77:00:11$opt"
    pid_a=$GUEST_PID
    start_guest b script:net-pair "rig.net.role=recv rig.net.ip=$PREFIX.12/24 rig.net.peer=$PREFIX.11 $common" \
        "tap=tap1,mac=52:54:00:77:00:12$opt"
    pid_b=$GUEST_PID
    wait "$pid_a" "$pid_b"
    info "both guests finished after $(since "$t0")s"
    ok=0
    guest_done a || ok=1
    guest_done b || ok=1
    # A guest that never booted (e.g. the VMM rejected its arguments) has nothing to check.
    [ "$ok" = 0 ] || finish
    check_device a 52:54:00:77:00:11 1500 "$offload"
    check_device b 52:54:00:77:00:12 1500 "$offload"
    if [ -n "${MQ:-}" ]; then
        check_queues a
        check_queues b
    fi
    check_ping a HOST a-ping-host
    check_ping a PEER a-ping-peer
    check_ping b HOST b-ping-host
    check_ping b PEER b-ping-peer
    sent=$(fact a NET-SEND-DATA)
    recv=$(fact b NET-RECEIVED)
    sum_a=$(field "$sent" sha256)
    sum_b=$(field "$recv" sha256)
    info "a sent:    $sent ($(fact a NET-SENT))"
    info "b received: $recv"
    info "a stats: $(fact a NET-STATS)"
    info "b stats: $(fact b NET-STATS)"
    case "$(fact a NET-SENT)" in
        ok*) pass send "a's httpd served /data to b (status 200)" ;;
        *) fail send "a's httpd never served /data: $(fact a NET-SENT)" ;;
    esac
    if [ "$(field "$recv" bytes)" = "$PAIR_BYTES" ] && [ "$(field "$recv" rc)" = 0 ]; then
        pass receive "b's wget fetched $PAIR_BYTES bytes in $(field "$recv" secs)s"
    else
        fail receive "b received '$recv', expected bytes:$PAIR_BYTES rc:0"
    fi
    if [ -n "$sum_a" ] && [ "$sum_a" = "$sum_b" ]; then
        pass sha256 "a sent sha256 $sum_a, b received the same"
    else
        fail sha256 "a sent sha256 '${sum_a:-none}', b received '${sum_b:-none}'"
    fi
    if [ "$(fact a NET-PEER-MATCH)" = yes ] && [ "$(fact b NET-REPORTED | cut -d' ' -f1)" = ok ]; then
        pass sha256-back "b reported its sum back to a over TCP and a found it equal"
    else
        fail sha256-back "a got b's sum '$(fact a NET-PEER-SHA256)' (match: $(fact a NET-PEER-MATCH); b: $(fact b NET-REPORTED))"
    fi
    # L1's own view: what the VMMs wrote to and read from the TAPs.
    rx=$(cat /sys/class/net/tap0/statistics/rx_bytes 2>/dev/null)
    tx=$(cat /sys/class/net/tap1/statistics/tx_bytes 2>/dev/null)
    for t in tap0 tap1; do
        info "$t: $(cd /sys/class/net/$t/statistics && for c in rx_packets rx_bytes tx_packets tx_bytes rx_dropped tx_dropped; do printf '%s=%s ' $c "$(cat $c)"; done)"
    done
    if [ "${rx:-0}" -ge "$PAIR_BYTES" ] && [ "${tx:-0}" -ge "$PAIR_BYTES" ]; then
        pass tap-counters "L1: a's VMM wrote $rx bytes into tap0, b's VMM read $tx bytes from tap1"
    else
        fail tap-counters "L1: tap0 rx_bytes ${rx:-?}, tap1 tx_bytes ${tx:-?}; expected at least $PAIR_BYTES each"
    fi
    # Whether the offload paths were really used: with offloads on, a's TCP sends GSO frames
    # (up to 64 KiB) that its VMM writes into tap0 whole, and tap1 hands b's VMM such frames
    # whole; without them every frame is at most an Ethernet frame. The frame averages over
    # the transfer show which (measured: ~3000 bytes on, ~1490 off).
    local avg0 avg1
    avg0=$(awk -v b="$rx" -v p="$(cat /sys/class/net/tap0/statistics/rx_packets)" 'BEGIN { printf "%d", p ? b / p : 0 }')
    avg1=$(awk -v b="$tx" -v p="$(cat /sys/class/net/tap1/statistics/tx_packets)" 'BEGIN { printf "%d", p ? b / p : 0 }')
    if [ "$offload" = on ]; then
        if [ "$avg0" -gt "$ETH_FRAME_MAX" ] && [ "$avg1" -gt "$ETH_FRAME_MAX" ]; then
            pass gso-frames "GSO frames crossed both TAPs (average frame: $avg0 bytes from a's VMM into tap0, $avg1 bytes from tap1 to b's VMM)"
        else
            fail gso-frames "with offloads on, the average frame from a's VMM into tap0 is $avg0 bytes and from tap1 to b's VMM $avg1 bytes: no GSO frames (expected > $ETH_FRAME_MAX)"
        fi
    else
        if [ "$avg0" -le "$ETH_FRAME_MAX" ] && [ "$avg1" -le "$ETH_FRAME_MAX" ]; then
            pass gso-frames "no GSO frames with offload=off (average frame: $avg0 bytes into tap0, $avg1 bytes out of tap1)"
        else
            fail gso-frames "offload=off, yet the average frame into tap0 is $avg0 bytes and out of tap1 $avg1 bytes (more than $ETH_FRAME_MAX)"
        fi
    fi
}

# --- link-down: a guest on tap2 (MTU 1400); once it is up, L1 deletes the TAP under the
# running VMM; the guest must see carrier 0 / operstate down within LINK_DOWN_MAX seconds and
# keep running until it powers off (the VMM exits 0). ---
case_link_down() {
    local pid t_del line after wait_s
    setup_network tap2
    $IP link set tap2 mtu 1400
    QEMU_MONITOR=1
    start_guest g script:net-link "rig.net.ip=$PREFIX.13/24 rig.net.host=$HOST_IP" \
        "tap=tap2,mac=52:54:00:77:00:13,mtu=1400"
    pid=$GUEST_PID
    if wait_for g TERN-GUEST-NET-LINK-WAITING 150; then
        if [ "$kind" = qemu ]; then
            # QEMU does not notice a TAP vanishing; tell it the link is down, which is what
            # tern must do by itself (this twin checks the guest side and the choreography).
            echo "set_link n0 off" > "$W/g.mon.in"
        fi
        if out=$($IP link del tap2 2>&1) && [ ! -e /sys/class/net/tap2 ]; then
            t_del=$(now)
            pass tap-deleted "ip link del tap2 removed the TAP while the guest was running"
        else
            fail tap-deleted "ip link del tap2 failed: $out"
        fi
        if [ -n "${t_del:-}" ] && wait_for g TERN-GUEST-NET-CARRIER-LOST= 60; then
            wait_s=$(since "$t_del")
            line=$(fact g NET-CARRIER-LOST)
            if running g; then
                pass vmm-alive "the VMM still runs after the guest saw the link go down"
            else
                fail vmm-alive "the VMM exited right after the TAP was deleted"
            fi
            case "$line" in
                after:*)
                    if [ "$(awk -v s="$wait_s" -v max="$LINK_DOWN_MAX" 'BEGIN { print (s <= max) }')" = 1 ]; then
                        pass carrier-lost "the guest saw carrier 0 ${wait_s}s after the deletion (guest: $(field "$line" after))"
                    else
                        fail carrier-lost "the guest saw carrier 0 only ${wait_s}s after the deletion (limit ${LINK_DOWN_MAX}s)"
                    fi
                    ;;
                *) fail carrier-lost "the guest's carrier never went to 0: $line" ;;
            esac
            if [ "$(field "$line" operstate)" = down ]; then
                pass operstate-down "the guest's operstate is down"
            else
                fail operstate-down "operstate '$(field "$line" operstate)' after the carrier loss, expected down"
            fi
        else
            fail carrier-lost "the guest never reported its carrier (VMM running: $(running g && echo yes || echo no))"
        fi
    elif ! running g; then
        # The VMM is gone before the guest got that far: say why (its exit status, the
        # first error line) rather than what did not happen.
        wait "$pid"
        guest_done g && fail link-up "the guest powered off without bringing its link up"
        finish
    else
        fail link-up "the guest did not bring its link up within 150 s"
    fi
    wait "$pid"
    guest_done g || finish
    check_device g 52:54:00:77:00:13 1400 on
    check_ping g HOST ping-before
    if grep -q TERN-GUEST-NET-STILL-RUNNING "$W/g.out"; then
        pass survived "the guest ran on after the link loss and powered off; the VMM exited 0"
    else
        fail survived "the guest never printed TERN-GUEST-NET-STILL-RUNNING"
    fi
    info "g stats: $(fact g NET-STATS)"
}

case "$case_" in
    pair) case_pair on ;;
    pair-nooffload) case_pair off ;;
    pair-mq)
        MQ=1
        case_pair on
        ;;
    link-down) case_link_down ;;
    *) fail args "unknown case $case_" ;;
esac
finish
