#!/usr/bin/env bash
# Conformance suite: drives an NRI plugin binary through the runtime side of
# github.com/containerd/nri (pkg/adaptation) at v0.12.2 and at v0.8.0.
#
#   tests/conformance/run.sh [--stand-in] [go test flags...]
#
# By default it builds the Rust example plugin (cargo build -p nri-plugin
# --example conformance) and tests that. --stand-in tests the Go stand-in
# plugin instead (proves the harness). NRI_CONFORMANCE_PLUGIN=/path skips the
# build and tests that binary. Extra arguments go to `go test`, e.g.
# `run.sh -run TestSplitSynchronize`. Exits non-zero if any case fails.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
export GOTOOLCHAIN=local
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"

stand_in=0
if [[ "${1:-}" == "--stand-in" ]]; then
  stand_in=1
  shift
fi

if [[ -z "${NRI_CONFORMANCE_PLUGIN:-}" ]]; then
  if (( stand_in )); then
    bin="$(mktemp -d)/stand-in"
    (cd "$here/stand-in" && go build -o "$bin" .)
    export NRI_CONFORMANCE_PLUGIN="$bin"
  else
    (cd "$root" && cargo build -p nri-plugin --example conformance)
    export NRI_CONFORMANCE_PLUGIN="${CARGO_TARGET_DIR:-$root/target}/debug/examples/conformance"
  fi
fi
echo "conformance plugin: $NRI_CONFORMANCE_PLUGIN"

status=0
for module in v012 v008; do
  echo "=== runtime side: github.com/containerd/nri $(sed -n 's#^\s*github.com/containerd/nri \(v[^ ]*\).*#\1#p' "$here/$module/go.mod") ==="
  if ! (cd "$here/$module" && go test -count=1 -v "$@" ./...); then
    echo "=== FAILED: $module ==="
    status=1
  fi
done
exit "$status"
