# tern-net-pair / tern-net-pair-nooffload: one of two guests booted side by side, each on its
# own TAP in the same L1 bridge (xtask/l1/scenarios/net.sh). Both ping L1 and each other. The
# sender (rig.net.role=send) serves rig.net.bytes of random data with busybox httpd (port
# 8080); the receiver fetches it with wget, then reports the sha256 of what it got back to the
# sender over TCP with busybox nc (port 5001), and the sender compares. Both print their sums;
# L1 compares them too.
#
# Why httpd rather than nc for the bulk data: busybox nc moves 1 KiB per read/write, which in
# this slow nested guest puts every write in a packet of its own, so TSO would never be used;
# httpd sends the file with one sendfile(), so with offloads on the sender's TCP builds
# 64 KiB GSO frames (host_tso4) and the receiver gets them whole (guest_tso4).
#
# Output (judged by net.sh): TERN-GUEST-NET-PING-HOST= / -PING-PEER=received:R/3,
# sender: TERN-GUEST-NET-SEND-DATA=bytes:N sha256:S, TERN-GUEST-NET-SERVING=8080,
#         TERN-GUEST-NET-SENT=ok|failed ..., TERN-GUEST-NET-PEER-SHA256=S,
#         TERN-GUEST-NET-PEER-MATCH=yes|no
# receiver: TERN-GUEST-NET-RECEIVED=bytes:N sha256:S rc:R secs:T tries:K,
#           TERN-GUEST-NET-REPORTED=ok|failed
. /scenarios/net-lib.sh

net_pair_send() {
    bytes=$(net_param bytes)
    mkdir -p /tmp/www
    head -c "$bytes" /dev/urandom > /tmp/www/data
    sum=$(sha256sum /tmp/www/data | cut -d' ' -f1)
    echo "TERN-GUEST-NET-SEND-DATA=bytes:$(wc -c < /tmp/www/data) sha256:$sum up:$(net_now)"
    # Listen for the receiver's report before it can fetch anything, so it cannot come early.
    net_listen 5001 /tmp/report 170 &
    report_pid=$!
    # Only now that the file is complete: the receiver retries until the server answers.
    httpd -f -vv -p 8080 -h /tmp/www 2>/tmp/httpd.log &
    httpd_pid=$!
    echo "TERN-GUEST-NET-SERVING=8080 up:$(net_now)"
    net_ping HOST "$host"
    net_wait_reachable "$peer" 90 && net_ping PEER "$peer"
    wait $report_pid
    if grep -q "response:200" /tmp/httpd.log; then
        echo "TERN-GUEST-NET-SENT=ok requests:$(grep -c url: /tmp/httpd.log) $(grep -m 1 url: /tmp/httpd.log)"
    else
        echo "TERN-GUEST-NET-SENT=failed httpd-log:$(tr '\n' '|' < /tmp/httpd.log | head -c 200)"
    fi
    kill $httpd_pid 2>/dev/null
    report=$(head -n 1 /tmp/report)
    echo "TERN-GUEST-NET-PEER-SHA256=${report:-none}"
    if [ "$report" = "$sum" ]; then
        echo "TERN-GUEST-NET-PEER-MATCH=yes"
    else
        echo "TERN-GUEST-NET-PEER-MATCH=no (sent $sum)"
    fi
}

net_pair_recv() {
    net_ping HOST "$host"
    net_wait_reachable "$peer" 90 && net_ping PEER "$peer"
    # The sender may still be writing its file: retry refused connections for about 60 s.
    tries=0
    rc=1
    while [ $tries -lt 120 ]; do
        tries=$((tries + 1))
        t1=$(net_now)
        timeout 120 wget -q -O /tmp/recv "http://$peer:8080/data" 2>/tmp/wget.err
        rc=$?
        [ $rc = 0 ] && break
        sleep 0.5
    done
    secs=$(net_since "$t1")
    sum=$(sha256sum /tmp/recv 2>/dev/null | cut -d' ' -f1)
    echo "TERN-GUEST-NET-RECEIVED=bytes:$(wc -c < /tmp/recv 2>/dev/null) sha256:${sum:-none} rc:$rc secs:$secs tries:$tries up:$(net_now) $(head -n 1 /tmp/wget.err)"
    reported=failed
    tries=0
    while [ $tries -lt 20 ]; do
        tries=$((tries + 1))
        if echo "$sum" | timeout 20 nc "$peer" 5001 2>/dev/null; then
            reported=ok
            break
        fi
        sleep 0.5
    done
    echo "TERN-GUEST-NET-REPORTED=$reported tries:$tries up:$(net_now)"
}

if net_setup; then
    role=$(net_param role)
    peer=$(net_param peer)
    host=$(net_param host)
    case "$role" in
        send) net_pair_send ;;
        recv) net_pair_recv ;;
        *) net_fail "unknown rig.net.role=$role" ;;
    esac
    net_stats
fi
