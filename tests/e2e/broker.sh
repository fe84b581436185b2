#!/usr/bin/env bash
# The SPIFFE Broker API source against a real SPIRE (v1.15.3 by default: the Broker API needs
# v1.15.2 or later), built from the Go module proxy and cached next to the bed's SPIRE.
# Runs tests/broker_spire.rs, which starts its own server and agent in a scratch directory on
# a free port (no containerd, kubelet or fixed host path: no bed lock). Needs root.
#
#   tests/e2e/broker.sh            # about 7 s warm; the first build of SPIRE takes minutes
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export NII_SPIRE_VERSION=${NII_BROKER_SPIRE_VERSION:-v1.15.3}
# shellcheck source=tests/e2e/lib/build.sh
. tests/e2e/lib/build.sh
mkdir -p "$NII_CACHE/bin"
exec {lock}>"$NII_CACHE/.build.lock"
flock "$lock"
_nii_build "spire $NII_SPIRE_VERSION" "$NII_SPIRE_DIR" "spire-server spire-agent" _nii_build_spire
exec {lock}>&-
NII_SPIRE_BROKER_DIR=$NII_SPIRE_DIR cargo test --all-features --test integration broker_spire -- --ignored
