#!/usr/bin/env bash
# Installs what a make target needs and a fresh machine lacks, so that
# `make test`, `make demo` and `make bench` work by themselves. Nothing is
# installed when everything is there already; as root, missing Debian
# packages are installed with apt-get; otherwise the script names what is
# missing and fails. Usage: scripts/deps.sh test|demo|bench
set -euo pipefail

what=${1:-test}
have() { command -v "$1" >/dev/null 2>&1; }
need=()

case $what in
test)
    # tests/common: `ip` in every network namespace, `setpriv` for the
    # unprivileged attacker; tests/install.rs runs make; tests/browser.rs
    # runs Chromium at this path; tests/datapath.rs checks real curl.
    have ip || need+=(iproute2)
    have setpriv || need+=(util-linux)
    have make || need+=(make)
    have curl || need+=(curl)
    [ -x /usr/bin/chromium ] || need+=(chromium)
    # tests/qemu.rs runs the aarch64 static binary under qemu-user
    # (skipped without it); tests/dist.rs checks the unit with
    # systemd-analyze when present.
    [ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
    # tests/proxy.rs runs nginx as a real PROXY protocol v2 consumer.
    [ -x /usr/sbin/nginx ] || have nginx || need+=(nginx-light)
    ;;
demo)
    have ip || need+=(iproute2)
    have unshare || need+=(util-linux)
    have curl || need+=(curl)
    have python3 || need+=(python3)
    ;;
bench)
    have ip || need+=(iproute2)
    have unshare || need+=(util-linux)
    have socat || need+=(socat)
    ;;
*)
    echo "usage: $0 test|demo|bench" >&2
    exit 2
    ;;
esac

if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] || ! have apt-get; then
        echo "make $what needs these packages: ${need[*]} (install them, or run as root on Debian/Ubuntu)" >&2
        exit 1
    fi
    echo "make $what: installing ${need[*]} (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# `make test` starts with `cargo fmt --check` and `cargo clippy`.
if [ "$what" = test ]; then
    missing=()
    cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
    if [ ${#missing[@]} -gt 0 ]; then
        if ! have rustup; then
            echo "make test needs cargo's ${missing[*]}: install them with your Rust toolchain" >&2
            exit 1
        fi
        echo "make test: installing ${missing[*]} (rustup component add)" >&2
        rustup component add "${missing[@]}"
    fi
fi
