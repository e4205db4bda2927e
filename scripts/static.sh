#!/usr/bin/env bash
# make static: a statically linked, stripped pilot-gateway. musl is the
# target of choice (910 KB); when its rustup target is missing we try to add
# it, and when that fails (no rustup, or its download server unreachable) we
# say so loudly and build a static glibc binary instead (1.9 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo=${CARGO:-cargo}
musl=x86_64-unknown-linux-musl
target=${STATIC_TARGET:-}

if [ -z "$target" ]; then
    if rustup target list --installed 2>/dev/null | grep -qx "$musl"; then
        target=$musl
    else
        echo "make static: the $musl target is missing; trying: rustup target add $musl" >&2
        if ! command -v rustup >/dev/null; then
            why="rustup is not installed (a distribution's Rust has no musl target to add)"
        elif out=$(rustup target add "$musl" 2>&1); then
            target=$musl
        else
            why="rustup target add failed (is rustup's download server reachable from here?):
$out"
        fi
        if [ -z "$target" ]; then
            target=$(rustc -vV | sed -n 's/^host: //p')
            {
                echo
                echo "############################################################"
                echo "# make static: NO MUSL TARGET: $why"
                echo "# Falling back to a static glibc build for $target"
                echo "# (about twice the size). Install the musl target and rerun"
                echo "# for the small binary."
                echo "############################################################"
                echo
            } >&2
        fi
    fi
fi

RUSTFLAGS="-C target-feature=+crt-static" "$cargo" build --profile static --target "$target" --bin pilot-gateway
ls -l "target/$target/static/pilot-gateway"
file "target/$target/static/pilot-gateway" 2>/dev/null || true
