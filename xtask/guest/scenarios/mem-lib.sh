# What the guest sides of the memory scenarios (balloon.sh, memhotplug.sh) share. Sourced by
# them (it is /scenarios/mem-lib.sh in the guest).

# memtotal: the guest's MemTotal in kB.
memtotal() { awk '/^MemTotal:/ { print $2 }' /proc/meminfo; }
# uptime_s: whole seconds since boot.
uptime_s() { awk '{ printf "%d", $1 }' /proc/uptime; }
# wait_mem CMP KB SECS: until MemTotal CMP KB (-le or -ge), at most SECS seconds, looking
# every MEM_POLL_S seconds (default 0.2).
wait_mem() {
    _end=$(($(uptime_s) + $3))
    while ! [ "$(memtotal)" "$1" "$2" ]; do
        [ "$(uptime_s)" -ge "$_end" ] && return 1
        sleep "${MEM_POLL_S:-0.2}"
    done
}
