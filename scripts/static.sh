#!/usr/bin/env bash
# make static: a statically linked, stripped pilot-gateway for each target
# in STATIC_TARGETS (default: x86_64 and aarch64 musl), with no C cross
# toolchain: rustup's musl targets carry musl's libc.a, crt objects and
# libunwind.a, and rust-lld links. Each binary lands in
#     target/<triple>/static/pilot-gateway
# and its path and size are printed (one "PATH SIZE" line each).
#
# Size (< 1 MiB, checked by tests/size.rs): std is rebuilt from source
# with nightly's -Zbuild-std, without its backtrace symbolizer (gimli,
# addr2line, miniz_oxide, rustc-demangle: ~200 KB of the 1.1 MB that the
# prebuilt std gives). Unwinding stays: a panic in one connection's thread
# must not end the gateway. A panic prints its message and location, but
# RUST_BACKTRACE shows raw addresses only. Static (non-PIE) relocation
# and identical-code folding save ~30 KB more. The build is reproducible:
# paths are remapped, so the same sources give the same bytes anywhere.
#
# Needs: rustup with a stable and a nightly toolchain (the nightly's
# rust-src component and the stable musl targets are added when missing).
# armv7 (armv7-unknown-linux-musleabihf): rustup has no musl component for
# it (stable and nightly answer 404), and -Zbuild-std still needs musl's
# libc.a and crt objects (Debian's musl-dev:armhf, a foreign architecture)
# and a libunwind.a, built from LLVM's C++ sources by an ARM C/C++
# compiler (-Zbuild-std-features=llvm-libunwind): not built.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=${STATIC_TARGETS:-x86_64-unknown-linux-musl aarch64-unknown-linux-musl}
nightly=${STATIC_NIGHTLY:-nightly}

die() {
    echo "make static: $*" >&2
    exit 1
}
command -v rustup >/dev/null || die "needs rustup (a distribution's Rust has no musl targets to add)"
rustup run "$nightly" rustc --version >/dev/null 2>&1 || {
    echo "make static: adding the $nightly toolchain (rustup toolchain install)" >&2
    rustup toolchain install --profile minimal "$nightly" >&2
}
sysroot=$(rustup run "$nightly" rustc --print sysroot)
[ -d "$sysroot/lib/rustlib/src/rust/library" ] || {
    echo "make static: adding rust-src to $nightly (for -Zbuild-std)" >&2
    rustup component add --toolchain "$nightly" rust-src >&2
}
stable_sysroot=$(rustup run stable rustc --print sysroot)
registry=${CARGO_HOME:-$HOME/.cargo}/registry/src

for t in $targets; do
    selfc="$stable_sysroot/lib/rustlib/$t/lib/self-contained"
    if [ ! -f "$selfc/libc.a" ]; then
        echo "make static: adding the $t target (rustup target add)" >&2
        rustup target add --toolchain stable "$t" >&2 || die "cannot add $t: rustup has no musl libc for it"
    fi
    # The linker variable cargo reads for this target.
    linker_var=CARGO_TARGET_$(echo "$t" | tr 'a-z-' 'A-Z_')_LINKER
    # One flag per field (0x1f between them): paths may hold spaces.
    flags=(-C target-feature=+crt-static -C relocation-model=static -C link-arg=--icf=all
        -L "native=$selfc" "--remap-path-prefix=$PWD=." "--remap-path-prefix=$registry=crates"
        "--remap-path-prefix=$sysroot/lib/rustlib/src/rust=rust")
    encoded=$(IFS=$'\x1f'; echo "${flags[*]}")
    env -u RUSTFLAGS "$linker_var=rust-lld" CARGO_ENCODED_RUSTFLAGS="$encoded" \
        cargo "+$nightly" build --quiet -Zbuild-std=std,panic_unwind -Zbuild-std-features=panic-unwind \
        --locked --profile static --target "$t" --bin pilot-gateway
    bin="target/$t/static/pilot-gateway"
    echo "$bin $(stat -c %s "$bin")"
done
