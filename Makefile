# nri-identity-injector — one entry point for humans and CI.
#
#   make demo   SPIRE + containerd + the daemon + an annotated pod printing its SPIFFE ID
#   make test   every suite: lint, unit/integration, the fuzz smoke, NRI conformance (real Go
#               runtime side), end-to-end on real containerd/runc/crictl/SPIRE
#   make bench  the benchmarks whose figures are in README.md

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
export PATH := $(HOME)/.cargo/bin:/usr/local/go/bin:$(PATH)
export GOTOOLCHAIN := local
export CARGO_TERM_COLOR := never

.PHONY: release demo test check lint lint-rust lint-deny lint-shell unit fuzz-smoke fuzz conformance e2e e2e-broker e2e-churn chaos soak e2e-crio e2e-k8s e2e-k8s-api e2e-deploy e2e-openshift e2e-openshift-crio e2e-kata e2e-vm e2e-selinux manifests bench bench-nri bench-e2e bench-burst bench-e2e-crio bench-k8s bench-daemon codegen build

# The shipped binary: statically linked (no shared libc pages: idle RSS about 1.3 MiB below a
# dynamically linked build) and built for an explicit target, so the static flag reaches only the
# target's crates, never the host's proc macros.
RELEASE_TARGET := x86_64-unknown-linux-gnu
RELEASE_BIN := target/$(RELEASE_TARGET)/release/nri-identity-injector
release:
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target $(RELEASE_TARGET) -p nri-identity-injector --bin nri-identity-injector
	@echo "built $(RELEASE_BIN)"

demo:
	tests/e2e/demo.sh

# The fast tier for contributors: formatting, clippy, cargo deny, shellcheck, then the unit and
# integration tests of every crate; no bed, no fuzzing. Without root, the modules of
# tests/integration.rs whose daemon delivers files to a container's user (a chown) are skipped:
# `make unit` (in `make test`) runs them as root.
ROOTLESS_SKIP := daemon_life:: faults:: sandboxes:: selectors_mode:: start_guard:: threats::
check: lint
	if [[ $$(id -u) == 0 ]]; then \
		cargo test --workspace --all-features; \
	else \
		cargo test --workspace --all-features -- $(addprefix --skip ,$(ROOTLESS_SKIP)); \
	fi

test: lint unit fuzz-smoke conformance e2e e2e-broker e2e-crio e2e-k8s e2e-k8s-api e2e-deploy e2e-openshift e2e-openshift-crio e2e-kata e2e-selinux chaos

build:
	cargo build --workspace --all-targets

# cargo-deny (deny.toml: licenses, bans, sources) is installed once per version under the
# cache the test programs use (NII_CACHE), built into a temporary root and renamed so an
# interrupted install is simply redone.
# (Without root, where /var/cache is not writable, under ~/.cache instead.)
NII_CACHE ?= $(shell if [ -w /var/cache/nri-identity-injector ] || [ -w /var/cache ]; then echo /var/cache/nri-identity-injector; else echo "$$HOME/.cache/nri-identity-injector"; fi)
CARGO_DENY_VERSION := 0.20.2
CARGO_DENY := $(NII_CACHE)/bin/cargo-deny-$(CARGO_DENY_VERSION)/bin/cargo-deny

lint: lint-rust lint-deny lint-shell

lint-rust:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --all-features -- -D warnings

lint-deny: $(CARGO_DENY)
	$(CARGO_DENY) --locked check licenses bans sources

$(CARGO_DENY):
	rm -rf $(NII_CACHE)/bin/cargo-deny-$(CARGO_DENY_VERSION).tmp
	cargo install cargo-deny --locked --version $(CARGO_DENY_VERSION) --root $(NII_CACHE)/bin/cargo-deny-$(CARGO_DENY_VERSION).tmp
	mv -T $(NII_CACHE)/bin/cargo-deny-$(CARGO_DENY_VERSION).tmp $(NII_CACHE)/bin/cargo-deny-$(CARGO_DENY_VERSION)

# Every shell script in the repository: *.sh (sourced libraries included) and any tracked
# file whose first line is a sh/bash shebang (.ci/run, the VM guest's init). -x follows the
# files the scripts source. About 80 s of CPU for 7,000 lines: split over the cores.
lint-shell:
	command -v shellcheck >/dev/null || apt-get install -y shellcheck
	git ls-files -z | xargs -0 awk 'FNR == 1 && (FILENAME ~ /\.sh$$/ || /^#!.*[\/ ](ba|da)?sh( |$$)/) { print FILENAME } { nextfile }' \
		| xargs -n 6 -P "$$(nproc)" shellcheck -x

unit:
	cargo test --workspace --all-features

# Every fuzz target (fuzz/, cargo-fuzz on nightly) for FUZZ_SMOKE_SECONDS each; `make fuzz`
# runs them for FUZZ_SECONDS each, FUZZ_JOBS at a time. Limits, corpora: fuzz/README.md.
FUZZ_SMOKE_SECONDS ?= 15
FUZZ_SECONDS ?= 1800
FUZZ_JOBS ?= 1
fuzz-smoke:
	FRESH=1 fuzz/run.sh $(FUZZ_SMOKE_SECONDS)

fuzz:
	JOBS=$(FUZZ_JOBS) fuzz/run.sh $(FUZZ_SECONDS)

conformance:
	tests/conformance/run.sh

e2e:
	tests/e2e/run.sh

# A longer churn than run.sh's 50 pods (part of e2e): 200 pods while the daemon is SIGKILLed
# and restarted and the agent restarted; no workload may run without its files.
e2e-churn:
	NII_CHURN_PODS=200 tests/e2e/run.sh churn

# The same scenarios on real CRI-O v1.36.3: PID mode, which CRI-O (ignoring StartContainer
# errors) serves fail-closed only behind the start guard; then selectors mode, OpenShift's,
# with a fake kubelet for crictl's pods.
e2e-crio:
	E2E_RUNTIME=cri-o tests/e2e/run.sh
	E2E_RUNTIME=cri-o NII_E2E_ATTESTATION=selectors tests/e2e/run.sh

# Faults, load and time: annotated pods churned while the daemon, containerd, the SPIRE agent
# and server are killed, the agent frozen and the artifact root filled; an invariant checker
# samples every second. CHAOS_SECONDS (default 120) and CHAOS_SEED (default 1) pick the
# length and the schedule; make test runs the default.
CHAOS_SECONDS ?= 120
CHAOS_SEED ?= 1
chaos:
	NII_CHAOS_SECONDS=$(CHAOS_SECONDS) NII_CHAOS_SEED=$(CHAOS_SEED) tests/e2e/chaos.sh

# 500 live identities with 60 s SVIDs for 30 minutes (SOAK_SECONDS): rotations in time,
# memory, CPU per rotation, descriptors, and a plot. Not part of make test.
SOAK_SECONDS ?= 1800
soak:
	NII_SOAK_SECONDS=$(SOAK_SECONDS) tests/e2e/soak.sh

# Kubernetes: a real standalone kubelet with static pods, SPIRE's k8s attestor, selectors mode.
e2e-k8s:
	tests/e2e/k8s.sh

# Kubernetes with a control plane (etcd, kube-apiserver): the daemon authenticates to the
# kubelet with a service-account token under deploy/'s RBAC; pods have service accounts.
e2e-k8s-api:
	tests/e2e/k8s_api.sh

# The shipped DaemonSet (deploy/) as a static pod on the real kubelet: its security context
# is enough, required-plugins keeps annotated pods out until it runs.
e2e-deploy:
	tests/e2e/deploy.sh

# The Helm chart and openshift/, by the real tools: helm lint and template (the rendering
# must be the checked-in deploy/ and openshift/ files), Ignition's validator on the
# MachineConfigs, OpenShift's SCC admission on the DaemonSet's pod, an API server with
# OpenShift's CRDs for server-side validation and helm install/uninstall.
e2e-openshift:
	tests/e2e/openshift.sh

# The OpenShift data path without OpenShift: real CRI-O configured by the MachineConfig's own
# drop-in, the real kubelet on it with SPIRE's k8s attestor, the daemon as openshift/
# configures it (selectors mode, shared labels).
e2e-openshift-crio:
	tests/e2e/openshift_crio.sh

# deploy/nri-identity-injector.yaml and openshift/*.yaml are the chart's rendering: edit
# charts/nri-identity-injector, then run this.
manifests:
	charts/render.sh

# The SPIFFE Broker API source against a real SPIRE v1.15.3 server and agent (its own scratch
# directory and port: no bed lock).
e2e-broker:
	tests/e2e/broker.sh

# Kata/VM guests: pods of Kata runtime handlers on real containerd, the daemon's mount carried
# into a Kata-style virtio-fs guest (cache auto and never), checked from inside the guest.
e2e-kata:
	tests/e2e/kata.sh

# The kernel's decision on the SELinux labels: a guest with SELinux and Debian's reference
# policy answers whether a process at a pod's MCS level may read each label the daemon sets.
e2e-selinux:
	tests/e2e/selinux_mcs.sh

# The VM bed alone: a Kata-style virtio-fs guest per cache mode (qemu TCG, virtiofsd, no containerd).
e2e-vm:
	tests/e2e/vm_smoke.sh

bench: bench-nri bench-daemon bench-burst

bench-nri:
	tests/conformance/bench.sh

# Three runs of 200 containers per side, the daemon's and the bare client's taking turns: each
# run's verdicts, their spread, and all three pooled. The agent hashes no executable unless
# asked (the unix attestor's default; the bed's is to hash, for its unix:path scenarios).
bench-e2e:
	E2E_UNIX_DISCOVER_WORKLOAD_PATH=$${E2E_UNIX_DISCOVER_WORKLOAD_PATH:-false} tests/e2e/bench.sh 200 3

# Bursts of 1 to 100 annotated pods created together, then started together, on containerd
# (PID mode): start latency vs concurrent starts. Then 100 static pods handed to a real
# kubelet together (selectors mode): pod lists fetched and bytes parsed.
bench-burst:
	tests/e2e/burst.sh 1 10 25 50 100
	tests/e2e/k8s_burst.sh 100

# On CRI-O: PID mode (behind the start guard), then selectors mode (OpenShift's); three runs
# each, the agent hashing no executable unless asked, as in bench-e2e.
bench-e2e-crio:
	E2E_RUNTIME=cri-o E2E_UNIX_DISCOVER_WORKLOAD_PATH=$${E2E_UNIX_DISCOVER_WORKLOAD_PATH:-false} tests/e2e/bench.sh 100 3
	E2E_RUNTIME=cri-o NII_E2E_ATTESTATION=selectors E2E_UNIX_DISCOVER_WORKLOAD_PATH=$${E2E_UNIX_DISCOVER_WORKLOAD_PATH:-false} tests/e2e/bench.sh 50 3

bench-k8s:
	tests/e2e/k8s_bench.sh 20

# CreateContainer/StartContainer latency through the NRI wire path and the memory of the
# release binary (needs root for the memory part: real processes in their own cgroups).
bench-daemon: release
	NII_BENCH_DAEMON_BIN=$(CURDIR)/$(RELEASE_BIN) cargo bench -p nri-identity-injector --features testing --bench daemon

codegen:
	cargo xtask codegen
