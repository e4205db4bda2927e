# pilot-gateway — see README.md.
CARGO ?= cargo
PREFIX ?= /usr/local
DESTDIR ?=
TARGET ?= $(shell rustc -vV | sed -n 's/^host: //p')

.PHONY: build test lint unit demo static bench fuzz clean install uninstall install-pilotctl-link

build:
	$(CARGO) build --release

# Every test: formatting, lints, unit and integration tests (the integration
# tests need root: each runs in its own network namespace).
test: lint
	$(CARGO) test --release -- --test-threads=2

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

demo:
	bash scripts/demo.sh

# A statically linked, stripped binary: musl when its target is installed
# (`rustup target add x86_64-unknown-linux-musl`), else static glibc.
MUSL := $(shell rustup target list --installed 2>/dev/null | grep -q '^x86_64-unknown-linux-musl$$' && echo x86_64-unknown-linux-musl)
STATIC_TARGET ?= $(if $(MUSL),$(MUSL),$(TARGET))
static:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --profile static --target $(STATIC_TARGET) --bin pilot-gateway
	@ls -l target/$(STATIC_TARGET)/static/pilot-gateway
	@file target/$(STATIC_TARGET)/static/pilot-gateway 2>/dev/null || true

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

clean:
	$(CARGO) clean
