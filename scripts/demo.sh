#!/usr/bin/env bash
# make demo: a curl reaches a web server through pilot-gateway and the
# stand-in daemon, inside a private network namespace (nothing on this
# host's network changes). Needs root for the namespace.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PGW_DEMO_INSIDE:-}" ]; then
    # A first build takes a while (~25 s); say so instead of sitting silent.
    if [ -x target/release/pilot-gateway ] && [ -x target/release/pilot-devd ]; then
        echo "demo: checking that target/release/pilot-gateway and pilot-devd are up to date (cargo build --release)…" >&2
    else
        echo "demo: building pilot-gateway and pilot-devd (cargo build --release; the first build takes about 25 s)…" >&2
    fi
    cargo build --release --quiet
    if [ "$(id -u)" -ne 0 ]; then
        echo "make demo needs root (it creates a private network namespace): sudo make demo" >&2
        exit 1
    fi
    exec env PGW_DEMO_INSIDE=1 unshare --net bash "$0"
fi

bin=$PWD/target/release
work=$(mktemp -d /tmp/pilot-gateway-demo.XXXXXX)
pids=()
cleanup() {
    "$bin/pilot-gateway" --state-dir "$work/state" stop >/dev/null 2>&1 || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

ip link set lo up
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

# 1. A web server: stands for the service an agent offers on port 8080.
mkdir -p "$work/www"
echo "<h1>Hello from agent 0:0000.0000.0004</h1>" > "$work/www/index.html"
python3 -m http.server 8080 --bind 127.0.0.1 --directory "$work/www" >/dev/null 2>&1 &
pids+=($!)

# 2. The stand-in daemon: dials to agent 0:0000.0000.0004 reach 127.0.0.1;
#    TCP connections to 127.0.0.1:7080 arrive as inbound pilot connections
#    from agent 0:0000.0000.0009 to whoever binds pilot port 80 (step 4).
devd_args=(--socket "$work/devd.sock" --route 0:0000.0000.0004=127.0.0.1
           --inbound 127.0.0.1:7080=0:0000.0000.0009:80)
say pilot-devd "${devd_args[@]}" '&'
"$bin/pilot-devd" "${devd_args[@]}" 2>"$work/devd.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/devd.sock" ] && break; sleep 0.05; done
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null && break; sleep 0.05; done

gw() { "$bin/pilot-gateway" --state-dir "$work/state" --socket "$work/devd.sock" "$@"; }

# 3. The gateway: agent 4 gets 10.4.0.1; port 8080 is relayed.
say pilot-gateway start --ports 8080 0:0000.0000.0004
gw start --ports 8080 0:0000.0000.0004

say curl http://10.4.0.1:8080/
curl -sS --max-time 10 http://10.4.0.1:8080/

# 4. The other direction: serve the same local web server on pilot port 80
#    of this node, and fetch it as agent 0:0000.0000.0009 would (through
#    pilot-devd's inbound path).
echo "<h1>Hello from this node, served on pilot port 80</h1>" > "$work/www/index.html"
say pilot-gateway expose 80 127.0.0.1:8080
gw expose 80 127.0.0.1:8080

say "curl http://127.0.0.1:7080/     # pilot-devd: an inbound connection from 0:0000.0000.0009 to port 80"
curl -sS --max-time 10 http://127.0.0.1:7080/

say pilot-gateway list
gw list
say pilot-gateway unexpose 80
gw unexpose 80
say pilot-gateway stop
gw stop
echo
echo "demo ok: curl reached the agent's web server through pilot-gateway, and an agent reached this node's web server through pilot-gateway expose"
