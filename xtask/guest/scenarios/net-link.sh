# tern-net-link-down: the guest brings its virtio-net interface up, pings L1, then waits while
# L1 deletes the TAP under the running VMM (xtask/l1/scenarios/net.sh). The VMM must report
# the link down (carrier 0, operstate down) and keep running; the guest then powers off.
#
# Output: TERN-GUEST-NET-PING-HOST=received:R/3, TERN-GUEST-NET-LINK-WAITING (L1 deletes the
# TAP when it sees this), TERN-GUEST-NET-CARRIER-LOST=after:Ts operstate:S (or =never ...),
# TERN-GUEST-NET-STILL-RUNNING.
. /scenarios/net-lib.sh

if net_setup; then
    net_ping HOST "$(net_param host)"
    echo "TERN-GUEST-NET-LINK-WAITING up:$(net_now)"
    t0=$(net_now)
    lost=
    n=0
    # Up to 60 s (the VMM has to notice that its TAP is gone).
    while [ $n -lt 600 ]; do
        if [ "$(cat "$NET_SYS/carrier" 2>/dev/null)" = 0 ]; then
            lost=$(net_since "$t0")
            break
        fi
        sleep 0.1
        n=$((n + 1))
    done
    if [ -n "$lost" ]; then
        # operstate follows the carrier through the kernel's linkwatch (up to ~1 s later).
        n=0
        while [ $n -lt 50 ] && [ "$(cat "$NET_SYS/operstate")" != down ]; do
            sleep 0.1
            n=$((n + 1))
        done
        echo "TERN-GUEST-NET-CARRIER-LOST=after:${lost}s operstate:$(cat "$NET_SYS/operstate") up:$(net_now)"
    else
        echo "TERN-GUEST-NET-CARRIER-LOST=never carrier:$(cat "$NET_SYS/carrier" 2>/dev/null) operstate:$(cat "$NET_SYS/operstate")"
    fi
    net_stats
    # Keep running a little: L1 checks that the VMM is still there.
    sleep 1
    echo "TERN-GUEST-NET-STILL-RUNNING uptime:$(net_now)"
fi
