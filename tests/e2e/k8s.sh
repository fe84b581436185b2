#!/usr/bin/env bash
# Kubernetes scenarios on a real standalone kubelet (static pods) + containerd (or CRI-O with
# E2E_RUNTIME=cri-o) + SPIRE with the k8s workload attestor: the daemon in selectors mode. The
# last line is "N passed, M failed".
#
#   tests/e2e/k8s.sh [SCENARIO...]     (default: all)
#
# Sourced (tests/e2e/openshift_crio.sh), it only defines the scenarios and helpers;
# K8S_DAEMON_ENV (an array of NRI_IDENTITY_*=VALUE) then adds settings to every daemon start.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/e2e/lib/bed.sh
. "$here/lib/bed.sh"
# shellcheck source=tests/e2e/lib/kubelet.sh
. "$here/lib/kubelet.sh"
# shellcheck source=tests/e2e/lib/nii.sh
. "$here/lib/nii.sh"

CHECK='if [ -f /var/certs/svid.pem ]; then echo "svid exists!"; else echo "svid does NOT exist."; fi; sleep 3600'

# static_pod NAME UID NAMESPACE ANNOTATIONS-JSON CONTAINER... : write the manifest, with
# every container running $CHECK.
static_pod() {
	local name=$1 uid=$2 ns=$3 ann=$4 body
	shift 4
	body=$(python3 - "$ns" "$ann" "$CHECK" "$@" <<'EOF'
import json, sys
ns, ann, check, *names = sys.argv[1:]
print(json.dumps({
    "metadata": {"namespace": ns, "annotations": json.loads(ann), "labels": {"app": "web", "tier": "e2e"}},
    "spec": {"containers": [{"name": n, "command": ["sh", "-c", check]} for n in names]},
}))
EOF
	)
	kubelet_static_pod "$name" "$uid" "$body" >/dev/null
}

# kubelet_daemon [HOW] : (re)start the daemon against the kubelet. HOW: secure (TLS checked
# against the bed CA, client certificate: the default), read-only, token (a bearer token the
# kubelet cannot accept), wrong-ca (the serving certificate checked against another CA).
kubelet_daemon() {
	local how=${1:-secure} url=https://127.0.0.1:$KUBELET_PORT ca=$KUBELET_PKI/ca.pem
	local client=(NRI_IDENTITY_KUBELET_CERTIFICATE_PATH="$KUBELET_PKI/client.pem"
		NRI_IDENTITY_KUBELET_PRIVATE_KEY_PATH="$KUBELET_PKI/client-key.pem")
	local env=("${K8S_DAEMON_ENV[@]}")
	case $how in
	secure) env+=("${client[@]}") ;;
	read-only) url=http://127.0.0.1:$KUBELET_RO_PORT ;;
	token)
		printf 'not-a-token-this-kubelet-can-review\n' >"$KUBELET_PKI/token"
		env+=(NRI_IDENTITY_KUBELET_TOKEN_PATH="$KUBELET_PKI/token" NII_WAIT=healthz)
		;;
	wrong-ca)
		ca=$KUBELET_PKI/other-ca.pem
		env+=("${client[@]}" NII_WAIT=healthz)
		;;
	*) fail "kubelet_daemon: unknown $how" ;;
	esac
	nii_restart NRI_IDENTITY_KUBELET_CA_PATH="$ca" "${env[@]}" -- --kubelet-url "$url"
}

# --- the design proposal's pod, selectors mode -------------------------------
scenario_proposal() {
	local uid e0 e1 ann c0 c1 c2 d0 d1 id kinds o a missing extra
	uid=$(bed_uuid)
	e0=$(bed_entry /k8s/c0 "k8s:ns:$KUBELET_NS" k8s:container-name:c0 -- -hint c0)
	e1=$(bed_entry /k8s/pod "k8s:ns:$KUBELET_NS" "k8s:pod-uid:$uid" -- -hint pod)
	bed_wait_entry "$e0" "$e1"
	ann=$(nii_annotations \
		identity.noderesource.dev/container.c0 "$(nii_identity /var/certs 'hint: c0')" \
		identity.noderesource.dev/container.c1 "$(printf 'spire_agent_address: %s\ncert_dir: /var/certs\nhint: pod\n' "$ADMIN_SOCK")")
	static_pod proposal "$uid" "$KUBELET_NS" "$ann" c0 c1 c2
	c0=$(kubelet_wait_container proposal c0 60)
	c1=$(kubelet_wait_container proposal c1 60)
	c2=$(kubelet_wait_container proposal c2 60)
	bed_wait 10 "c0 output" bash -c "$CRICTL logs $c0 2>&1 | grep -q svid"
	bed_wait 10 "c2 output" bash -c "$CRICTL logs $c2 2>&1 | grep -q svid"
	[[ $("$CRICTL" logs "$c0" 2>&1) == *"svid exists!"* ]] || fail "c0: $("$CRICTL" logs "$c0" 2>&1)"
	[[ $("$CRICTL" logs "$c1" 2>&1) == *"svid exists!"* ]] || fail "c1: $("$CRICTL" logs "$c1" 2>&1)"
	[[ $("$CRICTL" logs "$c2" 2>&1) == *"svid does NOT exist."* ]] || fail "c2: $("$CRICTL" logs "$c2" 2>&1)"
	d0=$(nii_dir "$uid" "$c0")
	d1=$(nii_dir "$uid" "$c1")
	id=$(nii_spiffe_id "$d0/svid.pem")
	[[ $id == "spiffe://$E2E_TD/k8s/c0" ]] || fail "c0 has $id"
	id=$(nii_spiffe_id "$d1/svid.pem")
	[[ $id == "spiffe://$E2E_TD/k8s/pod" ]] || fail "c1 has $id"
	{ nii_pair_matches "$d0" && nii_pair_matches "$d1"; } || fail "key/certificate mismatch"
	note "c0 = /k8s/c0 (k8s:container-name entry), c1 = /k8s/pod (k8s:ns + k8s:pod-uid entry), c2 none"
	note "delivered at CreateContainer in $(grep "container_id=$c0" "$E2E/logs/nii.log" | grep -m1 'identity delivered' | grep -o 'elapsed_ms=[0-9.]*' | cut -d= -f2) ms (c0), $(grep "container_id=$c1" "$E2E/logs/nii.log" | grep -m1 'identity delivered' | grep -o 'elapsed_ms=[0-9.]*' | cut -d= -f2) ms (c1)"

	# Parity: every selector we sent is one the attestor produces for the running
	# container, and every attestor selector of a kind we derive is one we sent.
	kinds='^k8s:(ns|sa|pod-name|pod-uid|pod-label|container-name|node-name|pod-owner|pod-owner-uid):'
	for c in "$c0" "$c1"; do
		o=$(nii_selectors_sent "$c")
		a=$(nii_selectors_attested "$c")
		[[ -n $o && -n $a ]] || fail "no selectors to compare (ours: '$o', attested: '$a')"
		extra=$(comm -23 <(echo "$o") <(echo "$a"))
		missing=$(comm -13 <(echo "$o") <(echo "$a" | grep -E "$kinds" || true))
		[[ -z $extra ]] || fail "we sent selectors the attestor does not produce: $extra"
		[[ -z $missing ]] || fail "the attestor produces selectors we did not send: $missing"
		note "container $(echo "$c" | cut -c1-12): our $(echo "$o" | wc -l) selectors = the attestor's for the same kinds: $(echo "$o" | tr '\n' ' ')"
	done
	rm -f "$KUBELET_MANIFESTS/proposal.yaml"
}

# --- a pod elsewhere copying labels and container names gets nothing ----------
scenario_impersonation() {
	local uid ann
	uid=$(bed_uuid)
	ann=$(nii_annotations identity.noderesource.dev/container.c0 "$(nii_identity /var/certs 'hint: c0')")
	# Same labels, same container name, same annotation: another namespace.
	static_pod impostor "$uid" evil "$ann" c0
	bed_wait 30 "the daemon's refusal" grep -q "pod evil/impostor-$KUBELET_NODE container c0: .*no registration entry" "$E2E/logs/nii.log"
	sleep 2
	if kubelet_container_id impostor c0 >/dev/null; then fail "the impostor's c0 runs"; fi
	# The kubelet keeps retrying (each attempt prepares, then removes, an empty directory);
	# no file may ever be written.
	[[ -z $(find "$NII_ARTIFACTS/$uid" -type f 2>/dev/null) ]] || fail "files were written for the impostor"
	note "evil/impostor c0 refused at CreateContainer: $(grep -m1 "pod evil/impostor" "$E2E/logs/nii.log" | grep -o 'error=.*' | cut -c1-160)"
	rm -f "$KUBELET_MANIFESTS/impostor.yaml"
}

# --- PID mode on the kubelet fails closed, with a clear message --------------
# At StartContainer the k8s attestor cannot place a PID the kubelet does not know yet, so no
# identity comes within the start's budget and the daemon fails the start. containerd then
# does not start the container (the kubelet retries, in vain: each retry is a new container
# it does not know either). CRI-O only logs the failure and starts the container: its start
# guard holds the workload while the daemon keeps asking in the background, and once the
# kubelet has listed the running container the attestor places the PID and the workload is
# released with its files. Either way it never runs without them.
scenario_pid_mode() {
	local uid e ann refusal c out
	uid=$(bed_uuid)
	e=$(bed_entry /k8s/pidmode "k8s:ns:$KUBELET_NS" k8s:container-name:p0)
	bed_wait_entry "$e"
	ann=$(nii_annotations identity.noderesource.dev/container.p0 "$(nii_identity /var/certs 'attestation: pid')")
	static_pod pidmode "$uid" "$KUBELET_NS" "$ann" p0
	refusal="pod $KUBELET_NS/pidmode-$KUBELET_NODE container p0: no identity"
	bed_wait 60 "the daemon failing the start" grep -q "$refusal" "$E2E/logs/nii.log"
	if grep -q 'closing plugin' "$E2E_RUNTIME_LOG"; then fail "$E2E_RUNTIME closed the plugin"; fi
	curl -fsS -o /dev/null "http://$NII_HTTP/readyz" || fail "the daemon is no longer ready"
	note "PID mode: $(grep -m1 "$refusal" "$E2E/logs/nii.log" | grep -o 'error=.*' | cut -c1-200)"
	if [[ $E2E_RUNTIME == cri-o ]]; then
		c=$(kubelet_wait_container pidmode p0 30)
		out=$("$CRICTL" logs "$c" 2>&1)
		[[ $out != *"does NOT exist"* ]] || fail "p0 ran without its files: $out"
		bed_wait 60 "p0 released with its files" bash -c "$CRICTL logs $c 2>&1 | grep -q 'svid exists!'"
		[[ $(nii_spiffe_id "$(nii_dir "$uid" "$c")/svid.pem") == "spiffe://$E2E_TD/k8s/pidmode" ]] || fail "p0 has the wrong identity"
		note "CRI-O started p0 anyway; its guard held it until the attestor placed the PID: $(grep "container_id=$c" "$E2E/logs/nii.log" | grep -m1 'identity delivered' | grep -o 'spiffe_id=[^ ]*')"
	else
		sleep 1
		if kubelet_container_id pidmode p0 >/dev/null; then fail "p0 runs without identity"; fi
		[[ -z $(find "$NII_ARTIFACTS/$uid" -type f 2>/dev/null) ]] || fail "files were written for p0"
		note "the daemon stayed registered; the kubelet retries"
	fi
	rm -f "$KUBELET_MANIFESTS/pidmode.yaml"
}

# --- how the daemon reaches the kubelet ----------------------------------------
# The other scenarios run on the secure port with a client certificate. Here: refused
# credentials and an unverifiable kubelet fail the container with the reason, and the
# read-only port works too.
scenario_kubelet_access() {
	local e ann uid c id how pod line
	e=$(bed_entry /k8s/access "k8s:ns:$KUBELET_NS" k8s:container-name:a0)
	bed_wait_entry "$e"
	ann=$(nii_annotations identity.noderesource.dev/container.a0 "$(nii_identity /var/certs)")
	local -A expect=([token]='answered HTTP/1.1 401 Unauthorized' [wrong-ca]='TLS with the kubelet .* failed')
	for how in token wrong-ca; do
		kubelet_daemon "$how"
		# Not ready, and saying why: a rollout stops here instead of failing pods.
		bed_wait 10 "kubelet not ready ($how)" bash -c "curl -sS http://$NII_HTTP/readyz | grep -q 'kubelet: not ready'"
		grep -q 'the kubelet does not list this node' "$E2E/logs/nii.log" || fail "no warning about the kubelet ($how)"
		pod=access-$how
		uid=$(bed_uuid)
		static_pod "$pod" "$uid" "$KUBELET_NS" "$ann" a0
		bed_wait 30 "the daemon's refusal ($how)" grep -q "pod $KUBELET_NS/$pod-$KUBELET_NODE container a0: " "$E2E/logs/nii.log"
		line=$(grep -m1 "pod $KUBELET_NS/$pod-$KUBELET_NODE container a0: " "$E2E/logs/nii.log")
		[[ $line =~ ${expect[$how]} ]] || fail "$how: the refusal does not say '${expect[$how]}': $line"
		sleep 1
		if kubelet_container_id "$pod" a0 >/dev/null; then fail "a0 runs without identity ($how)"; fi
		[[ -z $(find "$NII_ARTIFACTS/$uid" -type f 2>/dev/null) ]] || fail "files were written ($how)"
		note "$how: $(echo "$line" | grep -o 'error=.*' | cut -c1-240)"
		rm -f "$KUBELET_MANIFESTS/$pod.yaml"
	done

	kubelet_daemon read-only
	uid=$(bed_uuid)
	static_pod access-ro "$uid" "$KUBELET_NS" "$ann" a0
	c=$(kubelet_wait_container access-ro a0 60)
	bed_wait 10 "a0 output" bash -c "$CRICTL logs $c 2>&1 | grep -q svid"
	[[ $("$CRICTL" logs "$c" 2>&1) == *"svid exists!"* ]] || fail "a0: $("$CRICTL" logs "$c" 2>&1)"
	id=$(nii_spiffe_id "$(nii_dir "$uid" "$c")/svid.pem")
	[[ $id == "spiffe://$E2E_TD/k8s/access" ]] || fail "a0 has $id"
	note "read-only port: a0 = $id"
	rm -f "$KUBELET_MANIFESTS/access-ro.yaml"
	kubelet_daemon secure
}

# --- the Broker API source names the pod (E2E_BROKER=1, tests/e2e/broker.sh) --------------
# Selectors mode on the Broker API: the daemon sends a KubernetesObjectReference of the pod
# (namespace, name and UID, from the kubelet's list) and the agent's k8s attestor resolves it
# itself. Pod-level entries match; a container-level entry (k8s:container-name) cannot, since
# the reference names no container: every annotated container of the pod gets the pod's ID.
scenario_broker_pod_reference() {
	local uid e_pod e_ctr ann c0 c1 id
	uid=$(bed_uuid)
	e_pod=$(bed_entry /k8s/broker-pod "k8s:ns:$KUBELET_NS" "k8s:pod-uid:$uid")
	e_ctr=$(bed_entry /k8s/broker-b1 "k8s:ns:$KUBELET_NS" k8s:container-name:b1)
	bed_wait_entry "$e_pod" "$e_ctr"
	ann=$(nii_annotations identity.noderesource.dev/pod "$(nii_identity /var/certs)")
	static_pod brokered "$uid" "$KUBELET_NS" "$ann" b0 b1
	c0=$(kubelet_wait_container brokered b0 60)
	c1=$(kubelet_wait_container brokered b1 60)
	for c in "$c0" "$c1"; do
		bed_wait 10 "output of $c" bash -c "$CRICTL logs $c 2>&1 | grep -q svid"
		[[ $("$CRICTL" logs "$c" 2>&1) == *"svid exists!"* ]] || fail "$c: $("$CRICTL" logs "$c" 2>&1)"
		id=$(nii_spiffe_id "$(nii_dir "$uid" "$c")/svid.pem")
		[[ $id == "spiffe://$E2E_TD/k8s/broker-pod" ]] || fail "container $c has $id"
		nii_pair_matches "$(nii_dir "$uid" "$c")" || fail "key/certificate mismatch"
	done
	grep -q 'identities from the SPIFFE Broker API' "$E2E/logs/nii.log" || fail "the daemon does not use the Broker API"
	note "b0 and b1 = /k8s/broker-pod by the pod's reference (the k8s:container-name entry of b1 is not matched), delivered at CreateContainer in $(nii_delivered_ms "$c0") ms (b0), $(nii_delivered_ms "$c1") ms (b1)"
	rm -f "$KUBELET_MANIFESTS/brokered.yaml"
}

ALL=(proposal impersonation pid_mode kubelet_access)
[[ ${E2E_BROKER:-0} != 1 ]] || ALL=(broker_pod_reference)
declare -a K8S_DAEMON_ENV
# Sourced: the caller runs the scenarios it wants.
[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0
(($#)) || set -- "${ALL[@]}"

trap 'nii_finish k8s' EXIT
trap 'exit 130' INT TERM

export E2E_K8S_ATTESTOR=1
t0=$(nii_ms)
nii_build
nii_build_delegated_fetch >/dev/null
bed_up
kubelet_up
kubelet_daemon secure
echo "k8s: bed ($E2E_RUNTIME), kubelet and daemon up in $(($(nii_ms) - t0)) ms"
nii_scenarios "$@"
