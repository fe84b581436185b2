#!/usr/bin/env bash
# CreateContainer round-trip benchmark through the NRI v0.12.2 adaptation.
#
#   tests/conformance/bench.sh [N]        (default N=5000)
#
# Benchmarks the Rust example plugin built in release mode and, for
# comparison, the Go stand-in built on NRI's own pkg/stub. Set
# NRI_CONFORMANCE_PLUGIN=/path to benchmark only that binary. Each run prints
# p50/p90/p99/max in microseconds and go test's ns/op.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
n="${1:-5000}"
export GOTOOLCHAIN=local
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"

bench() {
  echo "=== $1 ==="
  (cd "$here/v012" && NRI_CONFORMANCE_PLUGIN="$2" go test -count=1 -run '^$' \
    -bench '^BenchmarkCreateContainer$' -benchtime "${n}x" .)
}

if [[ -n "${NRI_CONFORMANCE_PLUGIN:-}" ]]; then
  bench "$NRI_CONFORMANCE_PLUGIN" "$NRI_CONFORMANCE_PLUGIN"
  exit
fi

(cd "$root" && cargo build --release -p nri-plugin --example conformance)
bench "Rust nri-plugin example (release)" "${CARGO_TARGET_DIR:-$root/target}/release/examples/conformance"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$here/stand-in" && go build -o "$tmp/stand-in" .)
bench "Go stand-in (containerd/nri pkg/stub v0.12.2)" "$tmp/stand-in"
