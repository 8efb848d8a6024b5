# What the guest sides of the memory scenarios (balloon.sh, memhotplug.sh) share. Sourced by
# them (it is /scenarios/mem-lib.sh in the guest).

# memtotal: the guest's MemTotal in kB.
memtotal() { awk '/^MemTotal:/ { print $2 }' /proc/meminfo; }
# wait_mem CMP KB SECS: until MemTotal CMP KB (-le or -ge), at most SECS seconds.
wait_mem() {
    n=0
    while ! [ "$(memtotal)" "$1" "$2" ]; do
        n=$((n + 1))
        [ $n -gt $(($3 * 5)) ] && return 1
        sleep 0.2
    done
}
