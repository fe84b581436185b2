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

.PHONY: demo test lint unit conformance e2e e2e-k8s bench bench-nri bench-e2e bench-daemon codegen build

demo:
	tests/e2e/demo.sh

test: lint unit conformance e2e e2e-k8s

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
	tests/e2e/run.sh

# Kubernetes: a real standalone kubelet with static pods, SPIRE's k8s attestor, selectors mode.
e2e-k8s:
	tests/e2e/k8s.sh

bench: bench-nri bench-daemon

bench-nri:
	tests/conformance/bench.sh

bench-e2e:
	tests/e2e/bench.sh 50

# CreateContainer/StartContainer latency through the NRI wire path and the memory of the
# release binary (needs root for the memory part: real processes in their own cgroups).
bench-daemon:
	cargo build --release -p nri-identity-injector
	cargo bench -p nri-identity-injector --features fake-agent --bench daemon

codegen:
	cargo xtask codegen
