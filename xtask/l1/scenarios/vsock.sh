#!/bin/sh
# L1 side of the vsock scenario (xtask/src/scenarios.rs, "tern-vsock"). Started by the rig
# agent as
#
#     sh /rig/l1/vsock.sh CASE -- TERN-ARGV...
#
# Listens on the Unix socket SOCK_5000 (what a guest connection to the host's port 5000
# reaches), runs tern (TERN-ARGV, whose guest runs xtask/guest/scenarios/vsock.sh) with
# --vsock cid=3,socket=SOCK, and once the guest listens on vsock port 1024 connects to SOCK
# with CONNECT 1024. Both connections must carry a line and its echo; tern must exit 0 and
# remove its socket.
#
# Output: "TERN-VSOCK-PASS CASE/CHECK: what" per passed check, "TERN-VSOCK-FAIL CASE/CHECK: why"
# per failed one, the VM's output, and "TERN-VSOCK-OK CASE" when every check passed.

set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu

case_=${1:?usage: vsock.sh CASE -- TERN-ARGV...}
shift
[ "${1:-}" = "--" ] && shift
V=/tmp/tern-vsock-$case_.sock
OUT=/tmp/tern-vsock-$case_.out
ECHO=/tmp/tern-vsock-$case_.echo
rm -f "$V" "${V}_5000" "$OUT" "$ECHO"

failed=0
pass() { echo "TERN-VSOCK-PASS $case_/$1: $2"; }
fail() { failed=1; echo "TERN-VSOCK-FAIL $case_/$1: $2"; }
wait_for() {
    n=0
    while ! grep -q -E "$1" "$OUT" 2>/dev/null; do
        n=$((n + 1))
        [ $n -gt $(($2 * 5)) ] && return 1
        sleep 0.2
    done
}

vsock-rig unix-echo "${V}_5000" > "$ECHO" 2>&1 &
epid=$!
"$@" --vsock "cid=3,socket=$V" > "$OUT" 2>&1 &
pid=$!

if wait_for TERN-GUEST-VSOCK-LISTENING 120; then
    pass listening "the guest's driver bound and its program listens on vsock port 1024"
    sleep 0.3
    host=$(vsock-rig unix-connect "$V" 1024 host-hello 2>&1)
    if echo "$host" | grep -q '^VSOCK-RIG ok=OK [0-9]'; then
        pass ok-line "tern answered CONNECT 1024 with OK and its port"
    else
        fail ok-line "no OK line: $(echo "$host" | tr '\n' '|')"
    fi
    if echo "$host" | grep -q '^VSOCK-RIG answer=echo:host-hello'; then
        pass host-to-guest "a host connection reached the guest's listener and got its echo"
    else
        fail host-to-guest "$(echo "$host" | tr '\n' '|')"
    fi
else
    fail listening "the guest did not listen within 120 s"
    kill -9 "$pid" 2>/dev/null
fi

n=0
while kill -0 "$pid" 2>/dev/null; do
    n=$((n + 1))
    if [ $n -gt 300 ]; then
        fail exit "tern still running 60 s after the guest's script"
        kill -9 "$pid"
        break
    fi
    sleep 0.2
done
wait "$pid"
rc=$?
kill "$epid" 2>/dev/null
cat "$OUT"
if grep -q 'TERN-GUEST-VSOCK-CONNECT=VSOCK-RIG answer=echo:guest-hello' "$OUT"; then
    pass guest-to-host "a guest connection to the host's port 5000 reached ${V}_5000 and got its echo"
else
    fail guest-to-host "$(grep TERN-GUEST-VSOCK-CONNECT "$OUT")"
fi
if grep -q 'served=guest-hello' "$ECHO"; then
    pass l1-served "L1's listener served the guest's line"
else
    fail l1-served "$(tr '\n' '|' < "$ECHO")"
fi
if grep -q 'TERN-GUEST-VSOCK-SERVED=VSOCK-RIG listening=1024 VSOCK-RIG served=host-hello' "$OUT"; then
    pass guest-served "the guest's listener served L1's line"
else
    fail guest-served "$(grep TERN-GUEST-VSOCK-SERVED "$OUT")"
fi
if [ "$rc" = 0 ]; then
    pass exit "tern exited 0"
else
    fail exit "tern exited with status $rc"
fi
if [ -e "$V" ]; then
    fail socket "tern left its vsock socket $V behind"
else
    pass socket "tern removed its vsock socket"
fi
if [ "$failed" = 0 ]; then
    echo "TERN-VSOCK-OK $case_"
    exit 0
fi
echo "TERN-VSOCK-FAILED $case_"
exit 1
