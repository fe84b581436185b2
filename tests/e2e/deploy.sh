#!/usr/bin/env bash
# The shipped DaemonSet (deploy/nri-identity-injector.yaml), run as it is on a real kubelet:
# its pod template becomes a static pod (tests/e2e/lib/render_deploy.py changes only what a
# static pod on the bed cannot have: ConfigMap, service account, node paths, the kubelet's
# address), its image is built from deploy/Containerfile without a container engine
# (tests/e2e/lib/mkimage_daemon.py), and deploy/example-pod.yaml's pod is the workload.
# Proves that the shipped securityContext (root, CHOWN + DAC_OVERRIDE, read-only root file
# system, no privilege escalation, RuntimeDefault seccomp) is enough to deliver identities,
# and that the example's required-plugins annotation keeps the workload from starting
# without the daemon. The last line is "N passed, M failed".
#
#   tests/e2e/deploy.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/e2e/lib/bed.sh
. "$here/lib/bed.sh"
# shellcheck source=tests/e2e/lib/kubelet.sh
. "$here/lib/kubelet.sh"
# shellcheck source=tests/e2e/lib/nii.sh
. "$here/lib/nii.sh"
bed_runtime_only containerd "required plugins come from containerd's NRI default validator in config.toml and the daemon image is imported with ctr"

DAEMON_POD=nri-identity-injector
DAEMON_CTR=nri-identity-injector
DAEMON_NS=nri-identity-injector
EXAMPLE_POD=web
EXAMPLE_CTR=app
EXAMPLE_NS=identity-demo
# CHOWN (bit 0) and DAC_OVERRIDE (bit 1): the DaemonSet's capabilities, nothing else.
WANT_CAPS=0000000000000003

# fail (lib/nii.sh), also showing the daemon pod's logs.
fail() {
	printf '  FAIL: %s\n' "$*" >&2
	daemon_logs
	return 1
}

# The daemon's image, as the manifest names it.
daemon_image() {
	python3 -c 'import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "DaemonSet":
        print(d["spec"]["template"]["spec"]["containers"][0]["image"])' "$NII_ROOT/deploy/nri-identity-injector.yaml"
}

# daemon_logs : the daemon container's output, into $E2E/logs/nii.log (what nii_scenarios
# shows on failure and bed_down keeps).
daemon_logs() {
	local cid
	cid=$("$CRICTL" ps -a --label "io.kubernetes.pod.namespace=$DAEMON_NS" \
		--label "io.kubernetes.container.name=$DAEMON_CTR" -q 2>/dev/null | head -1) || return 0
	if [[ -n $cid ]]; then "$CRICTL" logs "$cid" >"$E2E/logs/nii.log" 2>&1 || true; fi
}

# pod_ready UID : the kubelet reports the pod's Ready condition True (its readiness probe).
pod_ready() {
	kubelet_pods | python3 -c '
import json, sys
uid = sys.argv[1]
for p in json.load(sys.stdin).get("items") or []:
    if p["metadata"].get("uid") == uid:
        conds = (p.get("status") or {}).get("conditions") or []
        sys.exit(0 if any(c["type"] == "Ready" and c["status"] == "True" for c in conds) else 1)
sys.exit(1)' "$1"
}

# daemon_pod UID [RENDER-ARGS...] : (re)write the daemon's static pod from the DaemonSet.
daemon_pod() {
	local uid=$1
	shift
	python3 "$here/lib/render_deploy.py" daemon "$KUBELET_MANIFESTS/daemon.json" \
		--set "uid=$uid" \
		--set "nri_dir=$(dirname "$NRI_SOCK")" \
		--set "admin_dir=$(dirname "$ADMIN_SOCK")" \
		--set "artifact_root=$NII_ARTIFACTS" \
		--set "kubelet_url=http://127.0.0.1:$KUBELET_RO_PORT" \
		--set "http_port=$NII_PORT" \
		--set "config_dir=$E2E/deploy/config" "$@" >/dev/null
}

# readyz : the daemon's /readyz body (host network: the port is on the host).
readyz() { curl -sS "http://127.0.0.1:$NII_PORT/readyz" 2>&1 || true; }
agent_ready() { [[ $(readyz) == *"agent: ready"* ]]; }
agent_not_ready() { [[ $(readyz) == *"agent: not ready"* ]]; }

# status_field PID FIELD : a field of /proc/PID/status.
status_field() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }

# --- without the daemon, the annotated workload is refused --------------------
scenario_refused_without_daemon() {
	python3 "$here/lib/render_deploy.py" example "$KUBELET_MANIFESTS/example.json" \
		--set "uid=$EXAMPLE_UID" --set "image=$E2E_IMAGE" >/dev/null
	bed_wait 60 "containerd refusing the example" \
		grep -qE 'required plugin .{0,2}10-identity-injector.{0,2} not present' "$E2E/logs/containerd.log"
	sleep 2
	if kubelet_container_id "$EXAMPLE_POD" "$EXAMPLE_CTR" >/dev/null; then fail "$EXAMPLE_CTR runs without the daemon"; fi
	note "containerd: $(grep -m1 -oE 'required plugin .{0,2}10-identity-injector.{0,2} not present' "$E2E/logs/containerd.log")"
	note "the kubelet keeps retrying; $EXAMPLE_CTR never ran"
}

# --- the DaemonSet's pod, as shipped, runs and becomes ready -------------------
scenario_daemonset_pod() {
	local cid pid v
	daemon_pod "$DAEMON_UID"
	cid=$(kubelet_wait_container "$DAEMON_POD" "$DAEMON_CTR" 90) || fail "the daemon's container does not run"
	bed_wait 60 "the daemon's readiness probe" pod_ready "$DAEMON_UID" || fail "the kubelet never saw the daemon ready"
	note "ready by its readinessProbe (/readyz: registered with containerd, agent reachable, kubelet lists the pods)"
	pid=$("$CRICTL" inspect -o go-template --template '{{.info.pid}}' "$cid")
	[[ $(status_field "$pid" Uid) == 0 ]] || fail "uid $(status_field "$pid" Uid)"
	for v in CapPrm CapEff CapBnd; do
		[[ $(status_field "$pid" "$v") == "$WANT_CAPS" ]] || fail "$v $(status_field "$pid" "$v"), want $WANT_CAPS"
	done
	[[ $(status_field "$pid" CapAmb) == 0000000000000000 ]] || fail "ambient capabilities"
	[[ $(status_field "$pid" NoNewPrivs) == 1 ]] || fail "privilege escalation is possible"
	[[ $(status_field "$pid" Seccomp) == 2 ]] || fail "no seccomp filter"
	v=$(awk '$5 == "/" { print $6 }' "/proc/$pid/mountinfo")
	[[ ,$v, == *,ro,* ]] || fail "root file system mounted $v"
	note "daemon pid $pid: uid 0, CapEff=CapBnd=$WANT_CAPS (CHOWN, DAC_OVERRIDE), NoNewPrivs 1, seccomp filter, root fs $v"
	[[ $(readlink "/proc/$pid/ns/pid") != $(readlink /proc/1/ns/pid) ]] || fail "the daemon shares the host PID namespace"
	note "own PID namespace (hostPID false): selectors mode needs no PIDs"
	v=$("$CRICTL" inspect "$cid" | python3 -c '
import json, sys
for e in json.load(sys.stdin)["info"]["config"].get("envs") or []:
    if e["key"] == "HOST_IP":
        print(e["value"])')
	[[ -n $v ]] || fail "the downward API gave no HOST_IP"
	note "HOST_IP=$v from status.hostIP (the manifest's kubelet URL is https://\$(HOST_IP):10250)"
}

# --- the example workload then gets its identity --------------------------------
scenario_example_gets_its_identity() {
	local cid dir id owner out mount
	# The kubelet retries the refused container on its own (about every 10 s).
	cid=$(kubelet_wait_container "$EXAMPLE_POD" "$EXAMPLE_CTR" 120) || fail "$EXAMPLE_CTR never started"
	dir=$(nii_dir "$EXAMPLE_UID" "$cid")
	id=$(nii_spiffe_id "$dir/svid.pem")
	[[ $id == "spiffe://$E2E_TD/ns/$EXAMPLE_NS/app" ]] || fail "$EXAMPLE_CTR has '$id'"
	nii_pair_matches "$dir" || fail "key and certificate do not match"
	owner=$(stat -c '%u:%g %a' "$dir/svid_key.pem")
	[[ $owner == "1001:1001 600" ]] || fail "key is $owner"
	bed_wait 10 "$EXAMPLE_CTR output" bash -c "$CRICTL logs $cid 2>&1 | grep -q 'BEGIN CERTIFICATE'"
	out=$("$CRICTL" logs "$cid" 2>&1)
	[[ $out == *svid_key.pem* ]] || fail "output: $out"
	note "$EXAMPLE_CTR: $id, key 1001:1001 0600 (chowned by the daemon with CAP_CHOWN)"
	note "in the container: $(grep -c pem <<<"$out") files in /var/certs, then $(grep -m1 'BEGIN' <<<"$out")"
	# The bind mount's source is the path the daemon named: the artifact root is mounted
	# at its host path.
	mount=$("$CRICTL" inspect "$cid" | python3 -c '
import json, sys
for m in json.load(sys.stdin)["info"]["runtimeSpec"]["mounts"]:
    if m["destination"] == "/var/certs":
        print(m["source"], ",".join(m.get("options") or []))' 2>/dev/null)
	[[ ${mount%% *} == "$dir" ]] || fail "$EXAMPLE_CTR mounts '$mount' at /var/certs, not $dir"
	note "/var/certs is $mount (the artifact root has the same path in and out of the daemon)"
}

# --- why each added capability is there ------------------------------------------
# DAC_OVERRIDE: the agent's admin socket is 0770 for the agent's uid and gid; a root daemon
# without it cannot connect when the agent is not root. CHOWN alone suffices with a root
# agent, and no path (delivery, removal) needs FOWNER.
scenario_capabilities_justified() {
	local mode uid cid dir
	mode=$(stat -c '%a %u:%g' "$ADMIN_SOCK")
	[[ $mode == "770 0:0" ]] || fail "the agent's admin socket is $mode, expected 770 0:0"
	# As if the agent ran as uid 4242: the shipped daemon still reaches it.
	chown 4242:4242 "$ADMIN_SOCK"
	sleep 11 # one probe period of a ready daemon (10 s)
	agent_ready || fail "the shipped daemon lost a 4242-owned agent socket: $(readyz)"
	note "agent socket 0770 4242:4242: the shipped daemon (CHOWN, DAC_OVERRIDE) still connects"
	# The same pod template with CHOWN only.
	rm -f "$KUBELET_MANIFESTS/daemon.json"
	bed_wait 30 "the shipped daemon to stop" bash -c "! curl -fsS -o /dev/null http://127.0.0.1:$NII_PORT/healthz"
	uid=$(bed_uuid)
	daemon_pod "$uid" --set caps=CHOWN
	kubelet_wait_container "$DAEMON_POD" "$DAEMON_CTR" 60 >/dev/null || fail "the CHOWN-only daemon does not run"
	bed_wait 20 "the CHOWN-only daemon to report the agent" agent_not_ready || fail "CHOWN only: $(readyz)"
	note "CHOWN only, agent socket 0770 4242:4242: $(readyz | tr '\n' ' ')"
	chown 0:0 "$ADMIN_SOCK"
	bed_wait 20 "the CHOWN-only daemon to reach a root-owned agent socket" agent_ready || fail "CHOWN only, root agent: $(readyz)"
	bed_wait 20 "the kubelet to see it ready" pod_ready "$uid" || fail "not ready for the kubelet"
	note "agent socket 0770 0:0: the CHOWN-only daemon is ready"
	# Delivery and removal with CHOWN only: no FOWNER, no DAC_OVERRIDE.
	uid=$(bed_uuid)
	python3 "$here/lib/render_deploy.py" example "$KUBELET_MANIFESTS/example2.json" \
		--set "uid=$uid" --set "image=$E2E_IMAGE" --set name=web2 >/dev/null
	cid=$(kubelet_wait_container web2 "$EXAMPLE_CTR" 60) || fail "web2 does not run"
	dir=$(nii_dir "$uid" "$cid")
	[[ $(stat -c '%u:%g %a' "$dir/svid_key.pem") == "1001:1001 600" ]] || fail "web2's key: $(stat -c '%u:%g %a' "$dir/svid_key.pem")"
	note "web2 got $(nii_spiffe_id "$dir/svid.pem"), key 1001:1001 0600, from the CHOWN-only daemon"
	rm -f "$KUBELET_MANIFESTS/example2.json"
	# The kubelet removes a deleted pod's containers at its next garbage collection (1 min).
	bed_wait 120 "web2's directory to be removed" test ! -e "$NII_ARTIFACTS/$uid" || fail "$NII_ARTIFACTS/$uid stays"
	note "web2 deleted: its directory (files owned by 1001) removed by the CHOWN-only daemon"
}

trap 'rc=$?; daemon_logs 2>/dev/null; (exit $rc); nii_finish deploy' EXIT
trap 'exit 130' INT TERM

export E2E_K8S_ATTESTOR=1
t0=$(nii_ms)
_kubelet_need_yaml
nii_build
bed_up
# containerd's NRI default validator, which honours required-plugins.noderesource.dev.
cat >>"$E2E/containerd/config.toml" <<'EOF'

[plugins.'io.containerd.nri.v1.nri'.default_validator]
  enable = true
EOF
bed_restart_runtime
if grep -E 'Ignoring unknown key in TOML|default validator is disabled' "$E2E/logs/containerd.log" >&2; then
	echo "deploy: containerd did not take the default validator" >&2
	exit 1
fi
kubelet_up

# The image of deploy/Containerfile, from the binary just built.
python3 "$here/lib/mkimage_daemon.py" --binary "$NII_BIN" "$(daemon_image)" "$E2E/images/nii.tar" >/dev/null
"$CTR" images import "$E2E/images/nii.tar" >/dev/null 2>&1
"$CRICTL" images | grep -qF "$(daemon_image | cut -d: -f1)" || { echo "deploy: image not imported" >&2 && exit 1; }

# The artifact root on a tmpfs, as /run is on a node.
NII_ARTIFACTS=$E2E/artifacts
mkdir -p "$NII_ARTIFACTS" "$E2E/deploy/config"
mount -t tmpfs -o size=64m,mode=0700 nii-artifacts "$NII_ARTIFACTS"
NII_PORT=$(_bed_free_port)
DAEMON_UID=$(bed_uuid)
EXAMPLE_UID=$(bed_uuid)
export NII_ARTIFACTS NII_PORT DAEMON_UID EXAMPLE_UID

# The example's entry: a static pod has no service account, so the bed keys it on the
# namespace and the container name instead of k8s:sa.
e=$(bed_entry "/ns/$EXAMPLE_NS/app" "k8s:ns:$EXAMPLE_NS" "k8s:container-name:$EXAMPLE_CTR")
bed_wait_entry "$e"
echo "deploy: bed, kubelet and image up in $(($(nii_ms) - t0)) ms"
nii_scenarios refused_without_daemon daemonset_pod example_gets_its_identity capabilities_justified
