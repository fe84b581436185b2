#!/usr/bin/env bash
# Kubernetes with a control plane: etcd + kube-apiserver + a minimal controller manager, the
# bed's kubelet registered as a node (TokenReview and SubjectAccessReview on its secure port),
# containerd, SPIRE with the k8s attestor. The daemon reaches the kubelet as the shipped
# DaemonSet does: with a service-account token of the service account deploy/ creates, whose
# RBAC deploy/ grants. The last line is "N passed, M failed".
#
#   tests/e2e/k8s_api.sh [SCENARIO...]     (default: all)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=tests/e2e/lib/bed.sh
. "$here/lib/bed.sh"
# shellcheck source=tests/e2e/lib/kubelet.sh
. "$here/lib/kubelet.sh"
# shellcheck source=tests/e2e/lib/apiserver.sh
. "$here/lib/apiserver.sh"
# shellcheck source=tests/e2e/lib/nii.sh
. "$here/lib/nii.sh"
bed_runtime_only containerd "not run on CRI-O yet (kubelet_smoke.sh is)"

CHECK='if [ -f /var/certs/svid.pem ]; then echo "svid exists!"; else echo "svid does NOT exist."; fi; exec sleep 3600'
DAEMON_NS=nri-identity-injector
DAEMON_SA=nri-identity-injector

# api_daemon SERVICE-ACCOUNT NAMESPACE : (re)start the daemon with a fresh token of that
# service account, on the kubelet's secure port, verifying it against the bed CA.
api_daemon() {
	local sa=$1 ns=$2 wait=()
	kubectl_e2e -n "$ns" create token "$sa" --duration=1h >"$E2E/daemon-token"
	[[ $sa == "$DAEMON_SA" ]] || wait=(NII_WAIT=healthz)
	nii_restart NRI_IDENTITY_KUBELET_CA_PATH="$KUBELET_PKI/ca.pem" \
		NRI_IDENTITY_KUBELET_TOKEN_PATH="$E2E/daemon-token" "${wait[@]}" \
		-- --kubelet-url "https://127.0.0.1:$KUBELET_PORT"
}

# api_pod NAME SERVICE-ACCOUNT : an annotated pod on this node, from the API server.
api_pod() {
	python3 - "$1" "$KUBELET_NS" "$2" "$KUBELET_NODE" "$E2E_IMAGE" "$(nii_identity /var/certs)" "$CHECK" <<'PY' | kubectl_e2e apply -f - >/dev/null
import json, sys
name, ns, sa, node, image, identity, check = sys.argv[1:]
print(json.dumps({
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": name, "namespace": ns, "labels": {"app": name},
                 "annotations": {"identity.noderesource.dev/container.w": identity}},
    "spec": {
        "nodeName": node, "serviceAccountName": sa, "automountServiceAccountToken": False,
        "hostNetwork": True, "dnsPolicy": "Default", "terminationGracePeriodSeconds": 1,
        "securityContext": {"runAsUser": 1001},
        "containers": [{"name": "w", "image": image, "imagePullPolicy": "Never",
                        "command": ["sh", "-c", check]}],
    },
}))
PY
}

api_uid() { kubectl_e2e -n "$KUBELET_NS" get pod "$1" -o jsonpath='{.metadata.uid}'; }

# api_container POD CONTAINER : the running container of an API pod, if any.
api_container() {
	local id
	id=$("$CRICTL" ps --label "io.kubernetes.pod.name=$1" --label "io.kubernetes.container.name=$2" \
		--state running -q 2>/dev/null | head -1)
	[[ -n $id ]] && echo "$id"
}

# --- the DaemonSet's own RBAC and token: an API pod's service account reaches SPIRE -------
scenario_service_account() {
	local e uid c id o a
	e=$(bed_entry /k8s/sa-web "k8s:ns:$KUBELET_NS" k8s:sa:web)
	bed_wait_entry "$e"
	api_pod sa-web web
	bed_wait 60 "container w of pod sa-web" api_container sa-web w
	c=$(api_container sa-web w)
	uid=$(api_uid sa-web)
	bed_wait 10 "w output" bash -c "$CRICTL logs $c 2>&1 | grep -q svid"
	[[ $("$CRICTL" logs "$c" 2>&1) == *"svid exists!"* ]] || fail "w: $("$CRICTL" logs "$c" 2>&1)"
	id=$(nii_spiffe_id "$(nii_dir "$uid" "$c")/svid.pem")
	[[ $id == "spiffe://$E2E_TD/k8s/sa-web" ]] || fail "w has $id"
	o=$(nii_selectors_sent "$c")
	grep -qx 'k8s:sa:web' <<<"$o" || fail "no k8s:sa:web among the selectors sent: $o"
	a=$(nii_selectors_attested "$c")
	grep -qx 'k8s:sa:web' <<<"$a" || fail "the attestor does not see k8s:sa:web: $a"
	note "API pod sa-web (service account web) = $id, delivered by k8s:ns + k8s:sa"
	note "the daemon used the token of $DAEMON_NS/$DAEMON_SA, authorised by deploy/'s ClusterRole"
	kubectl_e2e -n "$KUBELET_NS" delete pod sa-web --wait=false >/dev/null
}

# --- a service account without the ClusterRole is refused, and says so; the token file is
# read for every connection, so putting a good token back heals without a restart -------
scenario_rbac_refused() {
	local e line c id good
	kubectl_e2e -n "$DAEMON_NS" create serviceaccount no-rbac >/dev/null
	kubectl_e2e -n "$KUBELET_NS" create serviceaccount web2 >/dev/null
	e=$(bed_entry /k8s/sa-web2 "k8s:ns:$KUBELET_NS" k8s:sa:web2)
	bed_wait_entry "$e"
	good=$(<"$E2E/daemon-token")
	kubectl_e2e -n "$DAEMON_NS" create token no-rbac --duration=1h >"$E2E/daemon-token.new"
	mv "$E2E/daemon-token.new" "$E2E/daemon-token"
	api_pod refused web2
	bed_wait 30 "the daemon's refusal" grep -q "pod $KUBELET_NS/refused container w: " "$E2E/logs/nii.log"
	line=$(grep -m1 "pod $KUBELET_NS/refused container w: " "$E2E/logs/nii.log")
	[[ $line == *"403 Forbidden"*"nodes/proxy or nodes/pods"* ]] || fail "the refusal does not say 403: $line"
	if api_container refused w >/dev/null; then fail "w runs without identity"; fi
	note "no-rbac token: $(echo "$line" | grep -o 'error=.*' | cut -c1-200)"

	# The kubelet retries the container with back-off; the next attempt reads the good token.
	printf '%s\n' "$good" >"$E2E/daemon-token.new"
	mv "$E2E/daemon-token.new" "$E2E/daemon-token"
	bed_wait 90 "w started after the token was restored" api_container refused w
	c=$(api_container refused w)
	id=$(nii_spiffe_id "$(nii_dir "$(api_uid refused)" "$c")/svid.pem")
	[[ $id == "spiffe://$E2E_TD/k8s/sa-web2" ]] || fail "w has $id"
	note "good token back in the file, no restart: w = $id"
	kubectl_e2e -n "$KUBELET_NS" delete pod refused --wait=false >/dev/null

	# Readiness says the same when the daemon starts with a refused token.
	api_daemon no-rbac "$DAEMON_NS"
	bed_wait 10 "kubelet not ready" bash -c "curl -sS http://$NII_HTTP/readyz | grep -q 'kubelet: not ready'"
	grep -q 'the kubelet does not list this node.*403 Forbidden' "$E2E/logs/nii.log" || fail "no warning naming the 403"
	api_daemon "$DAEMON_SA" "$DAEMON_NS"
}

ALL=(service_account rbac_refused)
(($#)) || set -- "${ALL[@]}"

trap 'nii_finish k8s-api' EXIT
trap 'exit 130' INT TERM

export E2E_K8S_ATTESTOR=1
t0=$(nii_ms)
nii_build
nii_build_delegated_fetch >/dev/null
bed_up
apiserver_up
kubelet_up
# Registered is enough: the node stays NotReady (the bed has no CNI network), which stops
# nothing but pods on a pod network; these use the host's.
bed_wait 60 "node $KUBELET_NODE registered" kubectl_e2e get node "$KUBELET_NODE"
# What an operator applies (the DaemonSet itself never runs here: no controller for it).
kubectl_e2e apply -f "$repo/deploy/nri-identity-injector.yaml" >/dev/null
kubectl_e2e create namespace "$KUBELET_NS" >/dev/null
kubectl_e2e -n "$KUBELET_NS" create serviceaccount web >/dev/null
api_daemon "$DAEMON_SA" "$DAEMON_NS"
echo "k8s-api: bed, control plane, kubelet and daemon up in $(($(nii_ms) - t0)) ms"
nii_scenarios "$@"
