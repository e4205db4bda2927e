# pilot-gateway — see README.md.
CARGO ?= cargo
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: build test deps lint demo static bench fuzz clean install uninstall install-pilotctl-link

build:
	$(CARGO) build --release

# Every test: formatting, lints, unit and integration tests (the integration
# tests need root: each runs in its own network namespace). scripts/deps.sh
# first installs what is missing (see README). Tests build with the
# test-opt profile (optimised, no LTO: a cold build takes a fraction of the
# release profile's time); the shipped binary keeps LTO. --no-fail-fast: one
# failing test binary must not hide the results of the others. deps runs
# first even under make -j (lint needs the rustfmt and clippy it adds).
test: deps
	$(MAKE) --no-print-directory lint
	$(CARGO) test --profile test-opt --no-fail-fast -- --test-threads=2

deps:
	bash scripts/deps.sh test

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

demo:
	bash scripts/deps.sh demo
	bash scripts/demo.sh

# A statically linked, stripped binary: musl (scripts/static.sh adds the
# x86_64-unknown-linux-musl target with rustup when it is missing), else,
# with a loud warning, static glibc. STATIC_TARGET=TRIPLE picks one.
static:
	STATIC_TARGET="$(STATIC_TARGET)" CARGO="$(CARGO)" bash scripts/static.sh

# Fuzz each target for FUZZ_SECONDS (cargo-fuzz and the nightly toolchain).
FUZZ_SECONDS ?= 60
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in frame address state cli; do \
		mkdir -p corpus/$$t && cargo +nightly fuzz run $$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 || exit 1; \
	done

# Side-by-side measurements (network namespace; installs socat). See README.
bench:
	bash scripts/bench.sh

# Installation, honouring PREFIX and DESTDIR. `uninstall` removes exactly
# what `install` (and `install-pilotctl-link`) put there.
BINDIR := $(PREFIX)/bin
MANDIR := $(PREFIX)/share/man/man8
UNITDIR := $(PREFIX)/lib/systemd/system
GATEWAY_BIN ?= target/release/pilot-gateway

install: build
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR) $(DESTDIR)$(UNITDIR)
	install -m 0755 $(GATEWAY_BIN) $(DESTDIR)$(BINDIR)/pilot-gateway
	install -m 0644 doc/pilot-gateway.8 $(DESTDIR)$(MANDIR)/pilot-gateway.8
	sed 's|@BINDIR@|$(BINDIR)|g' dist/pilot-gateway.service > $(DESTDIR)$(UNITDIR)/pilot-gateway.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/pilot-gateway.service

# A `pilotctl` link for scripts that call `pilotctl gateway …` (only on request:
# it would shadow a real pilotctl).
install-pilotctl-link:
	install -d $(DESTDIR)$(BINDIR)
	ln -s pilot-gateway $(DESTDIR)$(BINDIR)/pilotctl

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/pilot-gateway $(DESTDIR)$(MANDIR)/pilot-gateway.8 $(DESTDIR)$(UNITDIR)/pilot-gateway.service
	if [ "$$(readlink $(DESTDIR)$(BINDIR)/pilotctl 2>/dev/null)" = pilot-gateway ]; then rm -f $(DESTDIR)$(BINDIR)/pilotctl; fi

clean:
	$(CARGO) clean
