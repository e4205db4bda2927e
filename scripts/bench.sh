#!/usr/bin/env bash
# make bench: measure pilot-gateway against direct, pilot-devd and socat
# paths in one run, inside a private network namespace. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PGW_BENCH_INSIDE:-}" ]; then
    bash scripts/deps.sh bench
    cargo build --release --quiet --bins --example bench
    # The binary we ship for small hosts (`make static`, musl) is measured
    # beside the glibc release build: their idle cost per connection
    # differs (see src/relay.rs THREAD_STACK). When it cannot be built the
    # bench says "not built" for its rows.
    musl=x86_64-unknown-linux-musl
    static_bin=
    # Its output (warnings included) only when it fails.
    if out=$(STATIC_TARGETS=$musl bash scripts/static.sh 2>&1); then
        static_bin=target/$musl/static/pilot-gateway
    else
        echo "$out" >&2
        echo "note: the static musl build failed: its rows say not built" >&2
    fi
    exec env PGW_BENCH_INSIDE=1 BENCH_STATIC_BIN="$static_bin" unshare --net bash "$0"
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
