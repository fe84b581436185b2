#!/usr/bin/env bash
# The SPIFFE Broker API source against a real SPIRE (v1.15.3 by default: the Broker API needs
# v1.15.2 or later), built from the Go module proxy and cached next to the bed's SPIRE. Two
# parts (needs root):
# 1. tests/broker_spire.rs: the source's client alone, against its own server and agent in a
#    scratch directory on a free port (no bed lock);
# 2. the daemon through NRI on the containerd bed with that SPIRE, the agent serving its broker
#    endpoint (tests/e2e/run.sh with E2E_BROKER=1): annotated pods named by PID reference get
#    their identities, and the broker's own mistake is refused by name;
# 3. on a real kubelet (tests/e2e/k8s.sh with E2E_BROKER=1), selectors mode: a pod named by its
#    Kubernetes object reference, resolved by the agent's k8s attestor.
#
#   tests/e2e/broker.sh            # a few minutes warm; the first build of SPIRE takes minutes
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
E2E_BROKER=1 tests/e2e/run.sh
E2E_BROKER=1 tests/e2e/k8s.sh
