#!/usr/bin/env bash
# Part of `make test`: the gateway must keep building on macOS and FreeBSD,
# which no test here runs (see README, "Platforms"). For each target:
# cargo check and cargo clippy -D warnings of the library and both
# binaries. Type-checking needs only the target's standard library (no
# linker, no C toolchain), which rustup adds when it is missing; if it
# cannot, this fails loudly rather than skip the check.
# CROSS_TARGETS="TRIPLE ..." checks a subset.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo=${CARGO:-cargo}
targets=${CROSS_TARGETS:-x86_64-apple-darwin aarch64-apple-darwin x86_64-unknown-freebsd}

fail() {
    {
        echo
        echo "############################################################"
        echo "# cross-check: $*"
        echo "############################################################"
        echo
    } >&2
    exit 1
}

command -v rustup >/dev/null || fail "rustup is not installed: the non-Linux targets (${targets}) cannot be added, so their build is not checked"
installed=$(rustup target list --installed)
for t in $targets; do
    if ! grep -qx "$t" <<<"$installed"; then
        echo "cross-check: adding the $t target: rustup target add $t" >&2
        out=$(rustup target add "$t" 2>&1) || fail "rustup target add $t failed (is rustup's download server reachable from here?):
$out"
    fi
done
for t in $targets; do
    echo "cross-check: $t" >&2
    "$cargo" check --quiet --target "$t" --lib --bins || fail "cargo check --target $t failed"
    "$cargo" clippy --quiet --target "$t" --lib --bins -- -D warnings || fail "cargo clippy --target $t failed"
done
echo "cross-check: ${targets} type-check and pass clippy" >&2
