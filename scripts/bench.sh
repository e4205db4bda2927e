#!/usr/bin/env bash
# make bench: measure pilot-gateway against direct, pilot-devd and socat
# paths in one run, inside a private network namespace. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PGW_BENCH_INSIDE:-}" ]; then
    bash scripts/deps.sh bench
    cargo build --release --quiet --bins --example bench
    exec env PGW_BENCH_INSIDE=1 unshare --net bash "$0"
fi
ip link set lo up
# 5,000 bridged connections take ~25,000 tasks (gateway, pilot-devd, the
# services); every process on the machine shares the kernel's pid space.
pid_max=$(cat /proc/sys/kernel/pid_max)
if [ "$pid_max" -lt 65536 ]; then
    echo "note: kernel.pid_max is $pid_max: the 5,000-connection level may hit it when other work runs" >&2
fi
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec target/release/examples/bench
