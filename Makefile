# pilot-gateway — see README.md.
CARGO ?= cargo
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: build test deps lint demo static dist bench fuzz clean install uninstall install-pilotctl-link

build:
	$(CARGO) build --release

# Every test: formatting, lints, unit and integration tests (the integration
# tests need root: each runs in its own network namespace). scripts/deps.sh
# first installs what is missing (see README). Tests build with the
# test-opt profile (optimised, no LTO: a cold build takes a fraction of the
# release profile's time); the shipped binary keeps LTO. --no-fail-fast: one
# failing test binary must not hide the results of the others. deps runs
# first even under make -j (lint needs the rustfmt and clippy it adds).
# scripts/cross-check.sh type-checks and lints the macOS and FreeBSD builds
# (adding their rustup targets when missing).
test: deps
	$(MAKE) --no-print-directory lint
	CARGO="$(CARGO)" bash scripts/cross-check.sh
	CARGO="$(CARGO)" bash scripts/lib-as-user.sh
	$(CARGO) test --profile test-opt --no-fail-fast -- --test-threads=2

deps:
	bash scripts/deps.sh test

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

demo:
	bash scripts/deps.sh demo
	bash scripts/demo.sh

# Statically linked, stripped binaries, each < 1 MiB, with no C cross
# toolchain (musl from rustup, rust-lld, std rebuilt by nightly without its
# backtrace symbolizer; see scripts/static.sh): by default x86_64 and
# aarch64, into target/TRIPLE/static/pilot-gateway, each printed with its
# size. STATIC_TARGETS="TRIPLE …" picks a subset.
STATIC_TARGETS ?= x86_64-unknown-linux-musl aarch64-unknown-linux-musl
static:
	STATIC_TARGETS="$(STATIC_TARGETS)" bash scripts/static.sh

# Release tarballs (binary, man page, unit, /etc/default example, README,
# LICENSE) and SHA256SUMS in target/dist, byte-for-byte reproducible
# (SOURCE_DATE_EPOCH, default: the last commit's time). See scripts/dist.sh.
dist:
	STATIC_TARGETS="$(STATIC_TARGETS)" bash scripts/dist.sh

# Fuzz each target for FUZZ_SECONDS (cargo-fuzz and the nightly toolchain).
FUZZ_SECONDS ?= 60
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in frame address state cli; do \
		mkdir -p corpus/$$t && cargo +nightly fuzz run $$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 || exit 1; \
	done

# Side-by-side measurements (network namespace; installs socat). See docs/PERFORMANCE.md.
bench:
	bash scripts/bench.sh

# Installation, honouring PREFIX and DESTDIR: this machine's static binary
# (built first: cargo rebuilds only what changed), or with DYNAMIC=1 the
# glibc release build; the man page; the unit; and the example
# /etc/default/pilot-gateway, never over an existing one. `uninstall`
# removes exactly what `install` (and `install-pilotctl-link`) put there,
# the default file only while it is still the unchanged example.
BINDIR := $(PREFIX)/bin
MANDIR := $(PREFIX)/share/man/man8
UNITDIR := $(PREFIX)/lib/systemd/system
SYSCONFDIR ?= /etc
DEFAULTS := $(DESTDIR)$(SYSCONFDIR)/default/pilot-gateway
HOST_STATIC := $(shell uname -m)-unknown-linux-musl
# The static build is Linux's (musl); elsewhere the release build.
ifneq ($(shell uname -s),Linux)
DYNAMIC ?= 1
endif
ifeq ($(DYNAMIC),)
GATEWAY_BIN ?= target/$(HOST_STATIC)/static/pilot-gateway
BUILD_GATEWAY ?= STATIC_TARGETS=$(HOST_STATIC) bash scripts/static.sh
else
GATEWAY_BIN ?= target/release/pilot-gateway
BUILD_GATEWAY ?= $(CARGO) build --release
endif

install:
	$(BUILD_GATEWAY)
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSCONFDIR)/default
	install -m 0755 $(GATEWAY_BIN) $(DESTDIR)$(BINDIR)/pilot-gateway
	install -m 0644 doc/pilot-gateway.8 $(DESTDIR)$(MANDIR)/pilot-gateway.8
	sed 's|@BINDIR@|$(BINDIR)|g' dist/pilot-gateway.service > $(DESTDIR)$(UNITDIR)/pilot-gateway.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/pilot-gateway.service
	if [ -e $(DEFAULTS) ] || [ -L $(DEFAULTS) ]; then echo "kept $(DEFAULTS)"; \
	else install -m 0644 dist/pilot-gateway.default $(DEFAULTS); fi

# A `pilotctl` link for scripts that call `pilotctl gateway …` (only on request:
# it would shadow a real pilotctl).
install-pilotctl-link:
	install -d $(DESTDIR)$(BINDIR)
	ln -s pilot-gateway $(DESTDIR)$(BINDIR)/pilotctl

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/pilot-gateway $(DESTDIR)$(MANDIR)/pilot-gateway.8 $(DESTDIR)$(UNITDIR)/pilot-gateway.service
	if [ -f $(DEFAULTS) ] && ! [ -L $(DEFAULTS) ] && cmp -s $(DEFAULTS) dist/pilot-gateway.default; then rm -f $(DEFAULTS); fi
	if [ "$$(readlink $(DESTDIR)$(BINDIR)/pilotctl 2>/dev/null)" = pilot-gateway ]; then rm -f $(DESTDIR)$(BINDIR)/pilotctl; fi

clean:
	$(CARGO) clean
