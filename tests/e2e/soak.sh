#!/usr/bin/env bash
# The soak run: 500 live identities (one registration entry, uid and container each, ten
# containers per pod) with 60 s SVIDs for 30 minutes on the real bed, no faults. Every
# rotation each workload sees is timed against the old certificate's rotation point; the
# daemon's memory, descriptors and CPU, and the machine's load, are sampled every second;
# a plot of memory and rotations over time is drawn (gnuplot, from Debian).
#
#   tests/e2e/soak.sh                         (make soak)
#   NII_SOAK_SECONDS=600 NII_SOAK_CONTAINERS=100 tests/e2e/soak.sh
#
# Fails when a rotation came late, a workload started without its files, or the files of a
# running container failed the checker. Needs root; not part of make test.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/e2e/lib/bed.sh
. "$here/lib/bed.sh"
# shellcheck source=tests/e2e/lib/nii.sh
. "$here/lib/nii.sh"
# shellcheck source=tests/e2e/lib/chaos.sh
. "$here/lib/chaos.sh"

bed_runtime_only containerd "the soak uses the chaos run's containerd bed"

SECONDS_=${NII_SOAK_SECONDS:-1800}
CONTAINERS=${NII_SOAK_CONTAINERS:-500}
OUT=${NII_SOAK_OUT:-/tmp/nii-soak-$(date +%Y%m%d-%H%M%S)}

trap 'nii_finish soak' EXIT
trap 'exit 130' INT TERM

_nii_apt gnuplot-nox
t0=$(nii_ms)
chaos_bed_up 64m
chaos_identities 10000 "$CONTAINERS" 60
# Info: one debug line per rotation and container would be the biggest load here.
NII_LOG_LEVEL=${NII_LOG_LEVEL:-info} nii_start
echo "soak: bed, $CONTAINERS identities and daemon up in $(($(nii_ms) - t0)) ms"
scenario_soak() {
	chaos_driver soak --seconds "$SECONDS_" --containers "$CONTAINERS" --per-pod 10 \
		--first-uid 10000 --ttl 60 --idcheck-every 10 --out "$OUT"
	gnuplot -e "csv='$OUT/plot.csv'; png='$OUT/soak.png'" "$here/lib/soak.gnuplot"
	note "plot: $OUT/soak.png"
}
nii_scenarios soak
