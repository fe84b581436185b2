#!/usr/bin/env bash
# Renders charts/nri-identity-injector into the plain manifests that `kubectl apply` and
# `oc apply` users take: deploy/nri-identity-injector.yaml (the chart's defaults) and
# openshift/*.yaml (values-openshift.yaml). Those files are this script's output, checked in;
# `make manifests` rewrites them and tests/e2e/openshift.sh fails when they differ from it.
#
#   charts/render.sh [OUT-DIR]      (default: the repository itself)
#
# HELM names the helm binary; by default the one tests/e2e/lib/build.sh builds and caches.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$repo}
chart=$repo/charts/nri-identity-injector
openshift=(-f "$chart/values-openshift.yaml")

if [[ -z ${HELM:-} ]]; then
	# shellcheck source=tests/e2e/lib/build.sh
	. "$repo/tests/e2e/lib/build.sh"
	nii_build_helm >&2
	HELM=$NII_HELM
fi

# render FILE ARGS... : `helm template` of the chart into OUT-DIR/FILE, written aside first
# so that a failed render leaves the previous file.
render() {
	local file=$out/$1 tmp
	shift
	mkdir -p "$(dirname "$file")"
	tmp=$(mktemp "$file.XXXXXX")
	if ! "$HELM" template nri-identity-injector "$chart" "$@" >"$tmp"; then
		rm -f "$tmp"
		return 1
	fi
	chmod 644 "$tmp"
	mv "$tmp" "$file"
}

render deploy/nri-identity-injector.yaml
render openshift/nri-identity-injector.yaml "${openshift[@]}"
render openshift/machineconfig-worker.yaml "${openshift[@]}" \
	--set openshift.machineConfig.enabled=true --show-only templates/openshift-machineconfig.yaml
render openshift/machineconfig-master.yaml "${openshift[@]}" \
	--set openshift.machineConfig.enabled=true --set 'openshift.machineConfig.roles={master}' \
	--show-only templates/openshift-machineconfig.yaml
render openshift/node-disruption-policy.yaml "${openshift[@]}" \
	--set openshift.nodeDisruptionPolicy.enabled=true --show-only templates/openshift-node-disruption-policy.yaml
