#!/usr/bin/env bash
# The library's unit tests need no privilege: run them as an ordinary user
# (nobody, when we are root) and require at least MIN_LIB_TESTS of them, so
# neither a test that quietly needs root nor a shrinking suite goes unseen.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
MIN_LIB_TESTS=${MIN_LIB_TESTS:-120}
bin=$("$CARGO" test --profile test-opt --lib --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
[ -x "$bin" ] || { echo "lib-as-user: no library test binary found" >&2; exit 1; }
if [ "$(id -u)" = 0 ]; then
    dir=$(mktemp -d)
    trap 'rm -rf "$dir"' EXIT
    install -m 0755 "$bin" "$dir/lib-tests"
    chmod 0755 "$dir"
    out=$(cd "$dir" && setpriv --reuid=65534 --regid=65534 --clear-groups \
        env -u HOME TMPDIR=/tmp ./lib-tests 2>&1) \
        || { printf '%s\n' "$out" | tail -n 40; echo "lib-as-user: unit tests failed as uid 65534" >&2; exit 1; }
else
    out=$("$bin" 2>&1) || { printf '%s\n' "$out" | tail -n 40; exit 1; }
fi
passed=$(printf '%s\n' "$out" | sed -n 's/^test result: ok\. \([0-9]*\) passed.*/\1/p' | tail -n 1)
echo "lib-as-user: ${passed:-0} unit tests passed as uid $( [ "$(id -u)" = 0 ] && echo 65534 || id -u )"
[ "${passed:-0}" -ge "$MIN_LIB_TESTS" ] || { echo "lib-as-user: fewer than $MIN_LIB_TESTS unit tests" >&2; exit 1; }
