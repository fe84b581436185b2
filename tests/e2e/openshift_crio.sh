#!/usr/bin/env bash
# The OpenShift data path without OpenShift: a real CRI-O that takes its NRI settings from
# exactly the drop-in openshift/machineconfig-*.yaml write to nodes (decoded from the
# MachineConfig by Ignition's own decoder, tests/e2e/lib/openshift.sh, never copied by hand,
# handed to the bed verbatim as E2E_CRIO_NRI_DROPIN, so it wins on every key), a real kubelet
# on that CRI-O with SPIRE's k8s workload attestor, and the daemon configured as openshift/'s
# ConfigMap configures it (runtime cri-o, selectors mode, shared SELinux labels).
# The last line is "N passed, M failed".
#
#   tests/e2e/openshift_crio.sh [SCENARIO...]     (default: all; names as in ALL below)
#
# Scenarios: the daemon registers with that CRI-O; the design proposal's pod as a static pod
# gets its files before its first instruction, by a k8s:container-name entry, and the
# selectors the daemon sends equal the attestor's; a PID-mode pod, whose start the daemon
# fails (the attestor cannot place a PID the kubelet does not list yet), is started by CRI-O
# anyway and held by its start guard until the daemon, still trying, delivers (both
# tests/e2e/k8s.sh's scenarios, run here on this CRI-O); the files carry the ConfigMap's label; the drop-in's default validator keeps a pod that requires the daemon
# out while the daemon is down.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# The Kubernetes scenarios and their helpers (static_pod, kubelet_daemon), without running them.
# shellcheck source=tests/e2e/k8s.sh
. "$here/k8s.sh"
# shellcheck source=tests/e2e/lib/openshift.sh
. "$here/lib/openshift.sh"

# toml_value KEY : KEY's value in the drop-in (flat key = value lines).
toml_value() { sed -n "s/^$1 = \"\{0,1\}\([^\"]*\)\"\{0,1\}$/\1/p" "$E2E_CRIO_NRI_DROPIN"; }

# --- CRI-O serves NRI as the drop-in says, and the daemon registers --------------------
scenario_registers() {
	local listen
	listen=$(toml_value nri_listen)
	[[ $(toml_value enable_nri) == true ]] || fail "the drop-in does not enable NRI"
	[[ $NRI_SOCK == "$listen" ]] || fail "the bed's CRI-O listens on $NRI_SOCK, the drop-in says $listen"
	[[ -S $NRI_SOCK ]] || fail "CRI-O serves no NRI socket at $NRI_SOCK"
	grep -q 'registered as.*10-identity-injector' "$E2E_RUNTIME_LOG" || fail "CRI-O did not register the daemon"
	[[ $(curl -sS "http://$NII_HTTP/readyz") == *"nri: ready"* ]] || fail "the daemon is not registered"
	grep -q 'connected to the runtime runtime=cri-o backend=cri-o' "$E2E/logs/nii.log" || fail "the daemon did not serve CRI-O as CRI-O"
	note "CRI-O took its NRI settings from $OPENSHIFT_CRIO_DROPIN_PATH (decoded from openshift/machineconfig-worker.yaml): socket $NRI_SOCK"
	note "the daemon (runtime = \"cri-o\") registered: $(curl -sS "http://$NII_HTTP/readyz" | tr '\n' ' ')"
}

# --- the ConfigMap's shared label on the host directory and files ---------------------
scenario_labels() {
	local uid e ann c dir f got
	uid=$(bed_uuid)
	e=$(bed_entry /k8s/labels "k8s:ns:$KUBELET_NS" k8s:container-name:l0)
	bed_wait_entry "$e"
	ann=$(nii_annotations identity.noderesource.dev/container.l0 "$(nii_identity /var/certs)")
	static_pod labels "$uid" "$KUBELET_NS" "$ann" l0
	c=$(kubelet_wait_container labels l0 60)
	bed_wait 10 "l0 output" bash -c "$CRICTL logs $c 2>&1 | grep -q svid"
	[[ $("$CRICTL" logs "$c" 2>&1) == *"svid exists!"* ]] || fail "l0: $("$CRICTL" logs "$c" 2>&1)"
	dir=$(nii_dir "$uid" "$c")
	for f in "$dir" "$dir/svid.pem" "$dir/svid_key.pem" "$dir/svid_bundle.pem"; do
		got=$(python3 -c 'import os, sys; print(os.getxattr(sys.argv[1], "security.selinux").rstrip(b"\0").decode())' "$f")
		[[ $got == system_u:object_r:container_file_t:s0 ]] || fail "$f is labelled $got"
	done
	note "directory and files: system_u:object_r:container_file_t:s0 (selinux_label = \"shared\")"
	rm -f "$KUBELET_MANIFESTS/labels.yaml"
}

# --- the drop-in's default validator: a pod requiring the daemon waits for it ----------
scenario_required_plugin() {
	local uid e ann c
	[[ $(toml_value nri_enable_default_validator) == true ]] || fail "the drop-in does not enable the default validator"
	uid=$(bed_uuid)
	e=$(bed_entry /k8s/required "k8s:ns:$KUBELET_NS" k8s:container-name:q0)
	bed_wait_entry "$e"
	nii_stop
	ann=$(nii_annotations \
		identity.noderesource.dev/container.q0 "$(nii_identity /var/certs)" \
		required-plugins.noderesource.dev/container.q0 '[10-identity-injector]')
	static_pod required "$uid" "$KUBELET_NS" "$ann" q0
	bed_wait 60 "CRI-O's validator refusing q0" grep -qE 'required plugin .{0,2}10-identity-injector.{0,2} not present' "$E2E_RUNTIME_LOG"
	if kubelet_container_id required q0 >/dev/null; then fail "q0 runs without the daemon"; fi
	note "daemon down: $(grep -m1 -oE 'required plugin .{0,2}10-identity-injector.{0,2} not present' "$E2E_RUNTIME_LOG")"
	kubelet_daemon secure
	c=$(kubelet_wait_container required q0 90)
	bed_wait 10 "q0 output" bash -c "$CRICTL logs $c 2>&1 | grep -q svid"
	[[ $("$CRICTL" logs "$c" 2>&1) == *"svid exists!"* ]] || fail "q0: $("$CRICTL" logs "$c" 2>&1)"
	note "daemon back: q0 created by the kubelet's retry, with its identity"
	rm -f "$KUBELET_MANIFESTS/required.yaml"
}

ALL=(registers proposal pid_mode labels required_plugin)
(($#)) || set -- "${ALL[@]}"

trap 'nii_finish openshift-crio' EXIT
trap 'exit 130' INT TERM

E2E_CRIO_NRI_DROPIN=$(mktemp "${TMPDIR:-/tmp}/nii-crio-dropin.XXXXXX")
openshift_crio_dropin "$E2E_CRIO_NRI_DROPIN" "$repo/openshift/machineconfig-worker.yaml"
export E2E_RUNTIME=cri-o E2E_CRIO_NRI_DROPIN E2E_K8S_ATTESTOR=1
# openshift/'s ConfigMap: runtime = "cri-o", selinux_label = "shared" (kubelet_url selects
# selectors mode; the bed's kubelet is reached on its secure port with a client certificate).
K8S_DAEMON_ENV=(NRI_IDENTITY_RUNTIME=cri-o NRI_IDENTITY_SELINUX_LABEL=shared)
t0=$(nii_ms)
nii_build
nii_build_delegated_fetch >/dev/null
bed_up
# From here on, the copy CRI-O reads.
rm -f "$E2E_CRIO_NRI_DROPIN"
E2E_CRIO_NRI_DROPIN=$E2E/crio/crio.conf.d/${E2E_CRIO_NRI_DROPIN##*/}
kubelet_up
kubelet_daemon secure
echo "openshift-crio: CRI-O (the MachineConfig's drop-in), kubelet and daemon up in $(($(nii_ms) - t0)) ms"
nii_scenarios "$@"
