# `cargo xtask demo`: show what the guest sees, then power off.
echo "--- Debian cloud kernel booted by tern: $(uname -r)"
echo "--- CPUs: $(grep -c ^processor /proc/cpuinfo) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
echo "--- memory: $(grep MemTotal /proc/meminfo)"
echo "--- kernel command line: $(cat /proc/cmdline)"
echo "--- uptime: $(cut -d' ' -f1 /proc/uptime) s"
