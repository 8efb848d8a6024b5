# Helpers for the virtio-net guest scripts (net-*.sh); sourced by them, not a scenario itself.
# The L1 side of these scenarios is xtask/l1/scenarios/net.sh: it creates the TAPs and the
# bridge, boots the guests with `rig.net.KEY=VALUE` parameters on their kernel command line
# (read here with net_param) and judges what they print (TERN-GUEST-NET-*= lines).

# net_param KEY: the value of rig.net.KEY= on the kernel command line (fails when absent).
net_param() {
    for a in $(cat /proc/cmdline); do
        case "$a" in
            "rig.net.$1="*)
                echo "${a#*=}"
                return 0
                ;;
        esac
    done
    return 1
}

net_fail() {
    echo "TERN-GUEST-ERROR=net: $*"
}

net_now() { cut -d' ' -f1 /proc/uptime; }
# net_since T0: seconds since net_now printed T0.
net_since() { awk -v a="$1" -v b="$(net_now)" 'BEGIN { printf "%.2f", b - a }'; }

# net_setup: load virtio_net, find its interface (NET_IF), print what the device offers
# (TERN-GUEST-NET-FEATURES: the negotiated virtio feature bits, bit N is character N+1), give
# it rig.net.ip, bring it up, wait for carrier and operstate "up" (up to 5 s) and print
# TERN-GUEST-NET-DEV=IF driver=... mac=... mtu=... carrier=... operstate=...
net_setup() {
    NET_IF=
    rig_modload virtio_pci virtio_mmio virtio_net || return 1
    n=0
    while [ $n -lt 100 ]; do
        for d in /sys/class/net/*; do
            if [ "$(basename "$(readlink "$d/device/driver" 2>/dev/null)")" = virtio_net ]; then
                NET_IF=$(basename "$d")
                break
            fi
        done
        [ -n "$NET_IF" ] && break
        sleep 0.1
        n=$((n + 1))
    done
    if [ -z "$NET_IF" ]; then
        net_fail "no virtio_net interface appeared (have: $(ls /sys/class/net | tr '\n' ' '))"
        return 1
    fi
    NET_SYS=/sys/class/net/$NET_IF
    echo "TERN-GUEST-NET-FEATURES=$(cat "$NET_SYS/device/features")"
    echo "TERN-GUEST-NET-QUEUES=$(ls "$NET_SYS/queues" | tr '\n' ' ')"
    ip link set lo up
    addr=$(net_param ip) || { net_fail "no rig.net.ip= on the command line"; return 1; }
    ip addr add "$addr" dev "$NET_IF" || { net_fail "ip addr add $addr dev $NET_IF failed"; return 1; }
    ip link set "$NET_IF" up || { net_fail "ip link set $NET_IF up failed"; return 1; }
    n=0
    while [ $n -lt 50 ]; do
        [ "$(cat "$NET_SYS/carrier" 2>/dev/null)" = 1 ] && [ "$(cat "$NET_SYS/operstate")" = up ] && break
        sleep 0.1
        n=$((n + 1))
    done
    echo "TERN-GUEST-NET-DEV=$NET_IF driver=virtio_net mac=$(cat "$NET_SYS/address") mtu=$(cat "$NET_SYS/mtu") carrier=$(cat "$NET_SYS/carrier" 2>/dev/null) operstate=$(cat "$NET_SYS/operstate") up:$(net_now)"
}

# net_ping NAME IP: three pings 0.2 s apart (15 s deadline); prints
# TERN-GUEST-NET-PING-NAME=received:R/3 to:IP up:UPTIME round-trip ...
net_ping() {
    out=$(ping -c 3 -i 0.2 -w 15 "$2" 2>&1)
    rx=$(echo "$out" | sed -n 's/.* \([0-9][0-9]*\) packets received.*/\1/p')
    echo "TERN-GUEST-NET-PING-$1=received:${rx:-0}/3 to:$2 up:$(net_now) $(echo "$out" | grep round-trip)"
}

# net_wait_reachable IP SECS: one ping a second until IP answers (the peer may still be booting).
net_wait_reachable() {
    t0=$(net_now)
    while ! ping -c 1 -W 1 "$1" >/dev/null 2>&1; do
        if [ "$(awk -v s="$(net_since "$t0")" -v max="$2" 'BEGIN { print (s > max) }')" = 1 ]; then
            echo "TERN-GUEST-NET-UNREACHABLE=$1 after:${2}s"
            return 1
        fi
        sleep 0.2
    done
    echo "TERN-GUEST-NET-REACHABLE=$1 after:$(net_since "$t0")s up:$(net_now)"
}

# net_listen PORT FILE SECS: busybox nc accepting one connection on PORT and writing what it
# receives to FILE, for at most SECS; run it in the background. Its stdin must never reach EOF:
# busybox nc half-closes the connection at stdin EOF, and the sender's nc then exits before it
# has sent everything. A FIFO opened read-write never delivers EOF.
net_listen() {
    [ -p /tmp/net-idle ] || mkfifo /tmp/net-idle
    timeout "$3" nc -l -p "$1" <>/tmp/net-idle >"$2"
}

# net_stats: the interface's counters (informational).
net_stats() {
    st=$NET_SYS/statistics
    echo "TERN-GUEST-NET-STATS=rx_packets:$(cat $st/rx_packets),rx_bytes:$(cat $st/rx_bytes),tx_packets:$(cat $st/tx_packets),tx_bytes:$(cat $st/tx_bytes),rx_errors:$(cat $st/rx_errors),tx_errors:$(cat $st/tx_errors),rx_dropped:$(cat $st/rx_dropped),tx_dropped:$(cat $st/tx_dropped)"
}
