#!/usr/bin/env bash
# make dist: one release tarball per static target, and SHA256SUMS:
#     DIST_DIR/pilot-gateway-VERSION-TRIPLE.tar.gz
#     DIST_DIR/SHA256SUMS
# Each tarball holds one directory, pilot-gateway-VERSION-TRIPLE/, with the
# static binary, the man page, the systemd unit (its @BINDIR@ filled in as
# /usr/local/bin, where `make install` puts the binary), the
# /etc/default/pilot-gateway example, README.md and LICENSE.
#
# Reproducible: the same sources give the same bytes. Entries are sorted,
# owned by 0:0, mode 0755 (binary) or 0644, dated SOURCE_DATE_EPOCH (by
# default the last commit's time), in GNU tar format (no pax timestamps),
# gzip -n (no name or time in the header). The binaries come from
# scripts/static.sh (itself reproducible); DIST_BUILD=0 packs the ones
# already built.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=${STATIC_TARGETS:-x86_64-unknown-linux-musl aarch64-unknown-linux-musl}
out=${DIST_DIR:-target/dist}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null) ||
        { echo "make dist: not a git checkout: set SOURCE_DATE_EPOCH" >&2; exit 1; }
fi
export SOURCE_DATE_EPOCH

if [ "${DIST_BUILD:-1}" != 0 ]; then
    STATIC_TARGETS=$targets bash scripts/static.sh
fi

mkdir -p "$out"
stage=$(mktemp -d "$out/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
tarballs=()
for t in $targets; do
    bin="target/$t/static/pilot-gateway"
    [ -f "$bin" ] || { echo "make dist: $bin is missing (make static)" >&2; exit 1; }
    name="pilot-gateway-$version-$t"
    d="$stage/$name"
    mkdir -p "$d"
    install -m 0755 "$bin" "$d/pilot-gateway"
    install -m 0644 doc/pilot-gateway.8 README.md LICENSE "$d/"
    install -m 0644 dist/pilot-gateway.default "$d/pilot-gateway.default"
    sed 's|@BINDIR@|/usr/local/bin|g' dist/pilot-gateway.service > "$d/pilot-gateway.service"
    chmod 0644 "$d/pilot-gateway.service"
    chmod 0755 "$d"
    tar --create --format=gnu --sort=name --owner=0 --group=0 --numeric-owner \
        --mtime="@$SOURCE_DATE_EPOCH" --directory="$stage" "$name" |
        gzip -9 -n > "$out/$name.tar.gz"
    tarballs+=("$name.tar.gz")
done
(cd "$out" && sha256sum "${tarballs[@]}" > SHA256SUMS)
for f in "${tarballs[@]}" SHA256SUMS; do
    echo "$out/$f $(stat -c %s "$out/$f")"
done
