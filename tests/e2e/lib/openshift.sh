# shellcheck shell=bash
# What the OpenShift checks share (tests/e2e/openshift.sh, and the CRI-O bed that takes
# its NRI settings from openshift/): OpenShift's own CRDs, the checkers built from the Go
# module proxy, and the CRI-O drop-in decoded from the MachineConfig.
#
#   . lib/build.sh; . lib/openshift.sh
#   openshift_tools                       # NII_HELM, NII_IGNITION_CHECK, NII_SCC_ADMISSION
#   openshift_crio_dropin "$E2E/99-nri.conf"

# github.com/openshift/api, whose payload-manifests/crds/ are the CRDs OpenShift installs.
# The proxy serves no version list for it, only pseudo-versions other served modules
# require: this one is required by
# github.com/openshift/machine-api-operator@v0.2.1-0.20260226113419-88465550a74b.
NII_OPENSHIFT_API_VERSION=${NII_OPENSHIFT_API_VERSION:-v0.0.0-20260213204242-d34f11c515b3}
# The CRDs of the kinds openshift/ uses, for a cluster on the Default feature set.
# shellcheck disable=SC2034 # read by the scripts that source this file
OPENSHIFT_CRDS=(
	0000_03_config-operator_01_securitycontextconstraints.crd.yaml
	0000_80_machine-config_01_machineconfigs.crd.yaml
	0000_80_machine-config_01_machineconfigurations-Default.crd.yaml
)
# The drop-in openshift/machineconfig-*.yaml write (the chart's openshift.machineConfig.dropInPath).
OPENSHIFT_CRIO_DROPIN_PATH=/etc/crio/crio.conf.d/99-nri-identity-injector.conf

_os_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)

# openshift_tools : helm, ignition-check and scc-admission, built (first use) and cached.
openshift_tools() {
	nii_build_helm >&2 || return 1
	NII_IGNITION_CHECK=$(nii_build_e2e_tool ignition-check) || return 1
	NII_SCC_ADMISSION=$(nii_build_e2e_tool scc-admission) || return 1
	export NII_IGNITION_CHECK NII_SCC_ADMISSION
}

# openshift_crds_dir : the module's payload-manifests/crds directory (downloaded on first use
# into the Go module cache).
openshift_crds_dir() {
	local dir
	dir=$(cd /tmp && _nii_go mod download -json "github.com/openshift/api@$NII_OPENSHIFT_API_VERSION" |
		sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
	[[ -d $dir/payload-manifests/crds ]] || { echo "openshift: no CRDs in github.com/openshift/api@$NII_OPENSHIFT_API_VERSION" >&2 && return 1; }
	echo "$dir/payload-manifests/crds"
}

# openshift_crio_dropin OUT [MANIFEST] : the CRI-O drop-in the MachineConfig writes to nodes,
# decoded from its Ignition data URL by the Ignition library's own decoder, into OUT.
# MANIFEST defaults to openshift/machineconfig-worker.yaml. A CRI-O bed passes OUT as
# E2E_CRIO_NRI_DROPIN, so CRI-O takes its NRI settings from exactly what nodes get.
openshift_crio_dropin() {
	local out=$1 manifest=${2:-$_os_root/openshift/machineconfig-worker.yaml}
	[[ -n ${NII_IGNITION_CHECK:-} ]] || NII_IGNITION_CHECK=$(nii_build_e2e_tool ignition-check) || return 1
	"$NII_IGNITION_CHECK" extract "$manifest" "$OPENSHIFT_CRIO_DROPIN_PATH" "$out"
}
