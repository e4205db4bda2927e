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

# A statically linked, stripped release binary.
static:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --target $(TARGET) --bin pilot-gateway
	@ls -l target/$(TARGET)/release/pilot-gateway

clean:
	$(CARGO) clean
