#!/usr/bin/env bash
# The Helm chart (charts/nri-identity-injector) and what it renders for OpenShift
# (openshift/), checked by the real tools rather than by reading YAML:
#
#   - helm (built from the Go module proxy) lints the chart for both value sets, and its
#     rendering is byte for byte the checked-in deploy/nri-identity-injector.yaml and
#     openshift/*.yaml;
#   - Ignition's own library (github.com/coreos/ignition/v2) parses and validates the
#     MachineConfigs' Ignition payload, and decodes the CRI-O drop-in from it;
#   - OpenShift's own SCC admission plugin (github.com/openshift/apiserver-library-go)
#     admits the DaemonSet's pod under the chart's SCC and refuses widened variants;
#   - a real kube-apiserver (tests/e2e/lib/apiserver.sh) with OpenShift's own CRDs
#     (github.com/openshift/api, payload-manifests/crds) validates every object of
#     openshift/ server-side, applies the NodeDisruptionPolicy with server-side apply and
#     removes it again without touching other owners' entries, and takes a `helm install`
#     and `helm uninstall` of the chart with both value sets.
#
# No OpenShift cluster and no CRI-O: tests/e2e/openshift_crio.sh runs the drop-in on CRI-O.
# The last line is "N passed, M failed".
#
#   tests/e2e/openshift.sh [SCENARIO...]     (default: all)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=tests/e2e/lib/bed.sh
. "$here/lib/bed.sh"
# shellcheck source=tests/e2e/lib/apiserver.sh
. "$here/lib/apiserver.sh"
# shellcheck source=tests/e2e/lib/nii.sh
. "$here/lib/nii.sh"
# shellcheck source=tests/e2e/lib/openshift.sh
. "$here/lib/openshift.sh"

CHART=$repo/charts/nri-identity-injector
OPENSHIFT_VALUES=$CHART/values-openshift.yaml
NS=nri-identity-injector

helm_e2e() { "$NII_HELM" --kubeconfig "$APISERVER_ADMIN_KUBECONFIG" "$@"; }

# yq_py FILE EXPR : a Python expression over the YAML documents of FILE (list `docs`).
yq_py() {
	python3 -c 'import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
print(eval(sys.argv[2]))' "$1" "$2"
}

# --- offline: the chart is the one source -------------------------------------------

scenario_chart_renders_the_checked_in_manifests() {
	local out f n=0
	"$NII_HELM" lint --strict "$CHART" >/dev/null || fail "helm lint (defaults)"
	"$NII_HELM" lint --strict "$CHART" -f "$OPENSHIFT_VALUES" >/dev/null || fail "helm lint (OpenShift values)"
	note "helm $NII_HELM_VERSION lint --strict: clean with the defaults and with values-openshift.yaml"
	out=$(mktemp -d)
	HELM=$NII_HELM "$repo/charts/render.sh" "$out"
	for f in "$out"/deploy/*.yaml "$out"/openshift/*.yaml; do
		f=${f#"$out"/}
		diff -u "$repo/$f" "$out/$f" >&2 || fail "$f is not the chart's rendering: run make manifests"
		n=$((n + 1))
	done
	# Everything else in openshift/ is written by hand: the example and the README.
	for f in "$repo"/openshift/*; do
		case ${f##*/} in example-pod.yaml | README.md) continue ;; esac
		[[ -e $out/openshift/${f##*/} ]] || fail "openshift/${f##*/} is no longer rendered by the chart"
	done
	rm -rf "$out"
	note "$n checked-in manifests are byte for byte charts/render.sh's output"
	# values.schema.json is enforced: a runtime the daemon does not know is refused.
	if out=$("$NII_HELM" template x "$CHART" --set runtime=docker 2>&1); then fail "helm took runtime=docker"; fi
	[[ $out == *values.schema.json* || $out == *"value must be one of"* ]] || fail "not refused by the schema: $out"
	note "values.schema.json refuses runtime=docker: $(grep -o 'runtime.*' <<<"$out" | head -1 | cut -c1-100)"
}

scenario_ignition_payload_is_valid() {
	local out dropin listen
	out=$("$NII_IGNITION_CHECK" validate "$repo"/openshift/machineconfig-*.yaml) || fail "Ignition refuses a MachineConfig"
	while read -r line; do note "ignition: $line"; done <<<"$out"
	dropin=$(mktemp)
	openshift_crio_dropin "$dropin"
	grep -qx 'enable_nri = true' "$dropin" || fail "the drop-in does not enable NRI"
	# CRI-O listens where the daemon connects.
	listen=$(sed -n 's/^nri_listen = "\(.*\)"$/\1/p' "$dropin")
	[[ $listen == "$(yq_py "$repo/openshift/nri-identity-injector.yaml" \
		'[d for d in docs if d["kind"] == "ConfigMap"][0]["data"]["config.toml"]' |
		sed -n 's/^nri_socket = "\(.*\)"$/\1/p')" ]] || fail "CRI-O's nri_listen $listen is not the daemon's nri_socket"
	grep -qx 'nri_validator_reject_oci_hook_adjustment = false' "$dropin" || fail "OCI hook adjustments may be rejected"
	cmp -s "$dropin" <(openshift_crio_dropin /dev/stdout "$repo/openshift/machineconfig-master.yaml") ||
		fail "the master and worker MachineConfigs write different files"
	note "decoded $OPENSHIFT_CRIO_DROPIN_PATH ($(wc -c <"$dropin") bytes): enable_nri = true, nri_listen = \"$listen\" (the daemon's nri_socket), OCI hooks not rejected; same file for master and worker"
	rm -f "$dropin"
}

scenario_scc_admits_the_daemonset_pod_and_nothing_wider() {
	local out pid
	out=$("$NII_SCC_ADMISSION" "$repo/openshift/nri-identity-injector.yaml") || {
		echo "$out" >&2
		fail "OpenShift's SCC admission does not agree with the chart"
	}
	while read -r line; do note "$line"; done <<<"$out"
	# PID mode: the same chart with hostPID, whose SCC then allows the host PID namespace.
	pid=$(mktemp)
	"$NII_HELM" template nri-identity-injector "$CHART" -f "$OPENSHIFT_VALUES" --set hostPID=true >"$pid"
	out=$("$NII_SCC_ADMISSION" "$pid") || {
		echo "$out" >&2
		fail "the hostPID rendering is not admitted"
	}
	grep -qx "admitted the DaemonSet's pod scc=$NS" <<<"$out" || fail "hostPID: $out"
	note "hostPID=true: $(head -1 <<<"$out") (its SCC allows the host PID namespace)"
	rm -f "$pid"
}

# --- on the API server, with OpenShift's CRDs -----------------------------------------

# server_apply FILE... : dry-run=server with strict field validation: the API server's
# schema (OpenShift's CRDs for their kinds) must accept every field.
server_apply() {
	local f args=()
	for f in "$@"; do args+=(-f "$f"); done
	kubectl_e2e apply --dry-run=server --validate=strict "${args[@]}"
}

scenario_openshift_manifests_pass_server_side_validation() {
	local out bad
	# Their namespace must exist for namespaced objects in a server-side dry run.
	kubectl_e2e create namespace "$NS" --dry-run=client -o yaml | kubectl_e2e apply -f - >/dev/null
	out=$(server_apply "$repo"/openshift/nri-identity-injector.yaml "$repo"/openshift/machineconfig-*.yaml) ||
		fail "the API server refuses openshift/: $out"
	note "dry-run=server, strict: $(tr '\n' ';' <<<"$out" | sed 's/ (server dry run)//g; s/;$//')"
	# The CRDs' schemas are in force: a field the SCC does not have, kernel arguments that
	# are not a list, an unknown disruption action are refused. (spec.config, the Ignition
	# payload, is free-form for the API server: scenario_ignition_payload_is_valid checks it.)
	bad=$(mktemp)
	yq_py "$repo/openshift/nri-identity-injector.yaml" \
		'"\n".join(__import__("json").dumps(dict(d, allowHostPaths=["/"])) for d in docs if d["kind"] == "SecurityContextConstraints")' >"$bad"
	if out=$(server_apply "$bad" 2>&1); then fail "an SCC with allowHostPaths was accepted"; fi
	note "refused: $(grep -o 'unknown field.*' <<<"$out" | head -1)"
	yq_py "$repo/openshift/machineconfig-worker.yaml" \
		'__import__("json").dumps([dict(d, spec=dict(d["spec"], kernelArguments="nosmt")) for d in docs][0])' >"$bad"
	if out=$(server_apply "$bad" 2>&1); then fail "a MachineConfig with kernelArguments \"nosmt\" was accepted"; fi
	note "refused: $(grep -o 'spec.kernelArguments.*' <<<"$out" | head -1 | cut -c1-120)"
	yq_py "$repo/openshift/node-disruption-policy.yaml" \
		'__import__("json").dumps(docs[0]).replace("\"Restart\"", "\"Reexec\"")' >"$bad"
	if out=$(server_apply "$bad" 2>&1); then fail "a disruption action Reexec was accepted"; fi
	note "refused: $(grep -o 'spec.nodeDisruptionPolicy.*' <<<"$out" | head -1 | cut -c1-120)"
	rm -f "$bad"
	kubectl_e2e delete namespace "$NS" --wait=true --timeout=60s >/dev/null
}

# The MachineConfiguration "cluster" as the Machine Config Operator creates it, plus an
# entry another admin owns: server-side apply must add ours beside it and take only ours away.
scenario_node_disruption_policy_applies_and_reverts_server_side() {
	local files
	kubectl_e2e apply --server-side --field-manager=machine-config-operator -f - >/dev/null <<'EOF'
apiVersion: operator.openshift.io/v1
kind: MachineConfiguration
metadata:
  name: cluster
spec:
  logLevel: Normal
  operatorLogLevel: Normal
  managementState: Managed
EOF
	kubectl_e2e apply --server-side --field-manager=another-admin -f - >/dev/null <<'EOF'
apiVersion: operator.openshift.io/v1
kind: MachineConfiguration
metadata:
  name: cluster
spec:
  nodeDisruptionPolicy:
    files:
      - path: /etc/other-admin.conf
        actions:
          - type: None
EOF
	# openshift/README.md, "Install".
	kubectl_e2e apply --server-side --field-manager=nri-identity-injector \
		-f "$repo/openshift/node-disruption-policy.yaml" >/dev/null || fail "server-side apply refused"
	files=$(kubectl_e2e get machineconfiguration cluster -o jsonpath='{range .spec.nodeDisruptionPolicy.files[*]}{.path}={.actions[0].type}:{.actions[0].restart.serviceName} {end}')
	[[ $files == *"$OPENSHIFT_CRIO_DROPIN_PATH=Restart:crio.service"* && $files == *"/etc/other-admin.conf=None:"* ]] ||
		fail "after apply: $files"
	[[ $(kubectl_e2e get machineconfiguration cluster -o jsonpath='{.spec.managementState}') == Managed ]] ||
		fail "the operator's fields changed"
	note "applied beside another admin's entry and the operator's fields: $files"
	# openshift/README.md, "Uninstall": the same manager applies nothing.
	kubectl_e2e apply --server-side --field-manager=nri-identity-injector -f - >/dev/null <<'EOF'
apiVersion: operator.openshift.io/v1
kind: MachineConfiguration
metadata:
  name: cluster
EOF
	files=$(kubectl_e2e get machineconfiguration cluster -o jsonpath='{range .spec.nodeDisruptionPolicy.files[*]}{.path} {end}')
	[[ $files != *"$OPENSHIFT_CRIO_DROPIN_PATH"* && $files == *"/etc/other-admin.conf"* ]] || fail "after removal: $files"
	note "removed by an empty apply of the same field manager; left: $files"
	kubectl_e2e delete machineconfiguration cluster >/dev/null
}

# helm_roundtrip LABEL ARGS... : install the chart with ARGS, check what landed, uninstall,
# wait until nothing of it is left.
helm_roundtrip() {
	local label=$1 kinds
	shift
	helm_e2e install nri-identity-injector "$CHART" --namespace default "$@" >/dev/null ||
		fail "$label: helm install refused"
	kinds=$(helm_e2e get manifest nri-identity-injector --namespace default |
		python3 -c 'import sys, yaml; print(" ".join(sorted(d["kind"] for d in yaml.safe_load_all(sys.stdin) if d)))')
	kubectl_e2e -n "$NS" get daemonset,configmap,serviceaccount "$NS" >/dev/null || fail "$label: objects missing"
	note "$label: helm install created $kinds"
	helm_e2e uninstall nri-identity-injector --namespace default --wait --timeout 2m >/dev/null ||
		fail "$label: helm uninstall"
	bed_wait 90 "namespace $NS to go" bash -c "! $NII_CONTROL_PLANE_DIR/kubectl --kubeconfig=$APISERVER_ADMIN_KUBECONFIG get namespace $NS" ||
		fail "$label: namespace $NS stays"
	if kubectl_e2e get clusterrole "$NS" >/dev/null 2>&1; then fail "$label: the ClusterRole stays"; fi
	note "$label: helm uninstall removed all of it, namespace included"
}

scenario_helm_installs_and_uninstalls_both_value_sets() {
	helm_roundtrip "Kubernetes defaults"
	helm_roundtrip "OpenShift values, MachineConfigs included" -f "$OPENSHIFT_VALUES" \
		--set openshift.machineConfig.enabled=true --set 'openshift.machineConfig.roles={worker,master}'
	# The MachineConfiguration "cluster" is never the chart's to install: with the value set,
	# Helm refuses to adopt the operator's object instead of taking it over.
	kubectl_e2e apply --server-side --field-manager=machine-config-operator -f - >/dev/null <<'EOF'
apiVersion: operator.openshift.io/v1
kind: MachineConfiguration
metadata:
  name: cluster
spec:
  managementState: Managed
EOF
	local out
	if out=$(helm_e2e install nri-identity-injector "$CHART" --namespace default -f "$OPENSHIFT_VALUES" \
		--set openshift.nodeDisruptionPolicy.enabled=true 2>&1); then
		fail "helm took over the MachineConfiguration cluster"
	fi
	[[ $out == *'MachineConfiguration "cluster"'*"cannot be imported"* ]] || fail "refused for another reason: $out"
	note "with the NodeDisruptionPolicy: $(grep -o 'MachineConfiguration "cluster".*' <<<"$out" | cut -c1-110)"
	[[ $(kubectl_e2e get machineconfiguration cluster -o jsonpath='{.spec.managementState}') == Managed ]] ||
		fail "the operator's MachineConfiguration changed"
	if kubectl_e2e get namespace "$NS" >/dev/null 2>&1; then fail "the refused install left its namespace"; fi
	kubectl_e2e delete machineconfiguration cluster >/dev/null
}

ALL_OFFLINE=(chart_renders_the_checked_in_manifests ignition_payload_is_valid scc_admits_the_daemonset_pod_and_nothing_wider)
ALL_SERVER=(openshift_manifests_pass_server_side_validation node_disruption_policy_applies_and_reverts_server_side
	helm_installs_and_uninstalls_both_value_sets)
offline=() server=()
(($#)) || set -- "${ALL_OFFLINE[@]}" "${ALL_SERVER[@]}"
for s in "$@"; do
	if [[ " ${ALL_OFFLINE[*]} " == *" $s "* ]]; then offline+=("$s"); else server+=("$s"); fi
done

trap 'nii_finish openshift' EXIT
trap 'exit 130' INT TERM

t0=$(nii_ms)
openshift_tools
echo "openshift: helm, ignition-check and scc-admission ready in $(($(nii_ms) - t0)) ms"
((${#offline[@]} == 0)) || nii_scenarios "${offline[@]}"
if ((${#server[@]})); then
	t0=$(nii_ms)
	# The API server only: no SPIRE, no kubelet, no daemon.
	E2E_SPIRE=0 bed_up
	apiserver_up
	crds=$(openshift_crds_dir)
	for f in "${OPENSHIFT_CRDS[@]}"; do
		kubectl_e2e apply --server-side -f "$crds/$f" >/dev/null
	done
	kubectl_e2e wait --for=condition=Established --timeout=60s \
		crd/securitycontextconstraints.security.openshift.io crd/machineconfigs.machineconfiguration.openshift.io \
		crd/machineconfigurations.operator.openshift.io >/dev/null
	echo "openshift: control plane with OpenShift's CRDs (github.com/openshift/api@$NII_OPENSHIFT_API_VERSION) up in $(($(nii_ms) - t0)) ms"
	nii_scenarios "${server[@]}"
fi
