#!/usr/bin/env bash
# The CRI-O drop-in that openshift/machineconfig-*.yaml write to OpenShift nodes, on a real
# CRI-O: the bed's CRI-O takes its NRI settings from exactly that file, decoded from the
# MachineConfig by Ignition's own decoder (tests/e2e/lib/openshift.sh), never copied by
# hand; the daemon, configured as openshift/'s ConfigMap configures it (runtime cri-o,
# shared SELinux labels), registers with that CRI-O.
#
# It needs the CRI-O bed: tests/e2e/lib/bed.sh with E2E_RUNTIME=cri-o, whose CRI-O reads
# E2E_CRIO_NRI_DROPIN as a drop-in of its configuration directory. Until the bed has it,
# this script says so and fails; it is not part of `make test`.
# The last line is "N passed, M failed".
#
#   tests/e2e/openshift_crio.sh [SCENARIO...]     (default: all)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=tests/e2e/lib/bed.sh
. "$here/lib/bed.sh"
# shellcheck source=tests/e2e/lib/nii.sh
. "$here/lib/nii.sh"
# shellcheck source=tests/e2e/lib/openshift.sh
. "$here/lib/openshift.sh"

if ! grep -q E2E_CRIO_NRI_DROPIN "$here/lib/bed.sh"; then
	echo "openshift-crio: tests/e2e/lib/bed.sh has no CRI-O bed yet (E2E_RUNTIME=cri-o, E2E_CRIO_NRI_DROPIN)" >&2
	exit 1
fi

# toml_value KEY : KEY's value in the drop-in (flat key = value lines).
toml_value() { sed -n "s/^$1 = \"\{0,1\}\([^\"]*\)\"\{0,1\}$/\1/p" "$E2E_CRIO_NRI_DROPIN"; }

# --- CRI-O serves NRI as the drop-in says, and the daemon registers --------------------
scenario_daemon_registers_with_crio_configured_by_the_machineconfig() {
	local listen
	listen=$(toml_value nri_listen)
	[[ $(toml_value enable_nri) == true ]] || fail "the drop-in does not enable NRI"
	# The bed may keep its NRI socket private (it runs beside other beds' files): then it
	# must say so by exporting NRI_SOCK, and everything else of the drop-in still applies.
	[[ -S ${NRI_SOCK:-$listen} ]] || fail "CRI-O serves no NRI socket at ${NRI_SOCK:-$listen}"
	note "CRI-O took NRI settings from $OPENSHIFT_CRIO_DROPIN_PATH (decoded from openshift/machineconfig-worker.yaml); socket ${NRI_SOCK:-$listen}"
	# The daemon configured for CRI-O as openshift/'s ConfigMap says (a configured runtime
	# that differs from the one NRI reports makes the daemon exit). Its SELinux setting stays
	# auto: this host has no SELinux to label with.
	nii_restart NRI_IDENTITY_RUNTIME=cri-o
	[[ $(curl -sS "http://$NII_HTTP/readyz") == *"nri: ready"* ]] || fail "the daemon did not register"
	note "the daemon (runtime = \"cri-o\") registered: $(curl -sS "http://$NII_HTTP/readyz" | tr '\n' ' ')"
}

ALL=(daemon_registers_with_crio_configured_by_the_machineconfig)
(($#)) || set -- "${ALL[@]}"

trap 'nii_finish openshift-crio' EXIT
trap 'exit 130' INT TERM

E2E_CRIO_NRI_DROPIN=$(mktemp "${TMPDIR:-/tmp}/nii-crio-dropin.XXXXXX")
openshift_crio_dropin "$E2E_CRIO_NRI_DROPIN" "$repo/openshift/machineconfig-worker.yaml"
export E2E_RUNTIME=cri-o E2E_CRIO_NRI_DROPIN
nii_build
bed_up
nii_scenarios "$@"
