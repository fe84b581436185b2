#!/usr/bin/env bash
# Smoke test of the bed's standalone kubelet (lib/kubelet.sh), no NRI plugin
# attached: a static pod with two uid-1001 busybox containers runs through the
# bed's containerd, its metadata reaches CRI, SPIRE's k8s workload attestor
# (on the kubelet's read-only port) attests the containers' PIDs so that
# entries keyed by k8s:ns + k8s:pod-uid (and k8s:container-name) are issued
# through the Delegated Identity API, and the teardown gives the host back
# exactly as it was (sysctls, /var/lib/kubelet & co., cgroups, processes).
#
# NII_SMOKE_FAIL=1 fails on purpose with the static pod running, to prove
# that teardown after a failure is complete too.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/e2e/lib/bed.sh
. "$here/lib/bed.sh"
# shellcheck source=tests/e2e/lib/kubelet.sh
. "$here/lib/kubelet.sh"

t_start=$(_bed_ms)
step() { printf 'kubelet-smoke: %-52s %s\n' "$1" "$(_bed_since "$2")"; }
say() { printf 'kubelet-smoke: %s\n' "$*"; }
fail() {
	printf 'kubelet-smoke: FAIL: %s\n' "$*" >&2
	exit 1
}

record=""
finish() {
	local rc=$?
	trap - EXIT
	# bed_down removes $E2E, record included: keep a copy for the check.
	if [[ -n ${E2E:-} && -d $E2E/kubelet-host ]]; then
		record=$(mktemp -d "${E2E_TMPDIR:-/tmp}/nii-e2e-kubelet-record.XXXXXX")
		cp -a "$E2E/kubelet-host/." "$record/"
	fi
	bed_down "$rc" || rc=1
	if [[ -n ${E2E:-} ]]; then
		bed_check_clean || rc=1
	fi
	if [[ -n $record ]]; then
		kubelet_check_clean "$record" || rc=1
		rm -rf "$record"
	fi
	if ((rc == 0)); then
		say "PASS in $(_bed_since "$t_start")"
	else
		printf 'kubelet-smoke: FAILED (status %d) after %s\n' "$rc" "$(_bed_since "$t_start")" >&2
	fi
	exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

export E2E_K8S_ATTESTOR=1
t=$(_bed_ms)
bed_up
nii_build_delegated_fetch
step "bed_up with the k8s workload attestor" "$t"

t=$(_bed_ms)
kubelet_up
step "kubelet_up ($NII_KUBELET_VERSION, read-only :$KUBELET_RO_PORT)" "$t"
before=$(cat /proc/sys/vm/overcommit_memory /proc/sys/kernel/panic /proc/sys/kernel/panic_on_oops | tr '\n' ' ')
say "kubelet set vm.overcommit_memory kernel.panic kernel.panic_on_oops to: $before(recorded: $(awk '$1 ~ /^(vm.overcommit_memory|kernel.panic|kernel.panic_on_oops)$/ { printf "%s ", $2 }' "$E2E/kubelet-host/sysctl"))"

# --- entries first: they must be in the agent's cache before we ask --------
uid=$(bed_uuid)
t=$(_bed_ms)
e_pod=$(bed_entry /k8s/pod "k8s:ns:$KUBELET_NS" "k8s:pod-uid:$uid")
e_c1=$(bed_entry /k8s/c1 "k8s:ns:$KUBELET_NS" "k8s:pod-uid:$uid" k8s:container-name:c1)
bed_wait_entry "$e_pod" "$e_c1"
step "entries k8s:ns+pod-uid (+container-name:c1) synced" "$t"

# --- the static pod --------------------------------------------------------
t=$(_bed_ms)
kubelet_static_pod smoke "$uid" '
metadata:
  labels: {app: kubelet-smoke, tier: e2e}
  annotations: {e2e.example/owner: kubelet-smoke}
spec:
  containers:
  - {name: c0, command: [sleep, inf]}
  - {name: c1, command: [sleep, inf]}
' >/dev/null
c0=$(kubelet_wait_container smoke c0 60) || fail "c0 never ran"
c1=$(kubelet_wait_container smoke c1 60) || fail "c1 never ran"
step "manifest written -> c0 and c1 running" "$t"
pod_id=$(kubelet_pod_id smoke) || fail "no ready sandbox for static pod smoke"

for c in "$c0" "$c1"; do
	[[ $(bed_ctr_state "$c") == CONTAINER_RUNNING ]] || fail "container $c is not running"
	out=$("$CRICTL" exec -s "$c" id -u)
	[[ $out == 1001 ]] || fail "container $c runs as '$out', expected 1001"
done
say "c0=${c0:0:12} c1=${c1:0:12} in pod ${pod_id:0:12}: running as uid 1001"
if [[ ${NII_SMOKE_FAIL:-0} == 1 ]]; then
	fail "injected failure (NII_SMOKE_FAIL=1) with static pod $pod_id running"
fi

# What CRI (and so NRI's PodSandbox) carries for the pod.
meta=$("$CRICTL" inspectp "$pod_id" | python3 -c '
import json, sys
s = json.load(sys.stdin)["status"]
m, a, l = s["metadata"], s.get("annotations") or {}, s.get("labels") or {}
print(m["namespace"], m["name"], m["uid"])
print(" ".join(f"{k}={v}" for k, v in sorted(a.items())))
print(" ".join(f"{k}={v}" for k, v in sorted(l.items())))')
{
	read -r ns name puid
	read -r ann
	read -r labels
} <<<"$meta"
[[ $ns == "$KUBELET_NS" && $name == "smoke-$KUBELET_NODE" && $puid == "$uid" ]] ||
	fail "sandbox metadata is '$ns $name $puid'"
[[ " $ann " == *" e2e.example/owner=kubelet-smoke "* ]] || fail "our pod annotation is missing: $ann"
[[ " $ann " == *" kubernetes.io/config.source=file "* ]] || fail "no config.source=file: $ann"
[[ " $labels " == *" app=kubelet-smoke "* && " $labels " == *" tier=e2e "* ]] || fail "pod labels: $labels"
say "sandbox: $ns/$name uid $puid"
say "  annotations: $ann"
say "  labels: $labels"

# --- the k8s attestor attests each container's PID ------------------------
# attest NAME CID WANT-ID : ask the agent for the container's host PID over
# the Delegated Identity API until WANT-ID arrives; print the selectors the
# agent attested for that PID.
attest() {
	local name=$1 cid=$2 want=spiffe://$E2E_TD$3 pid out sel
	pid=$("$CRICTL" inspect -o go-template --template '{{.info.pid}}' "$cid")
	[[ $pid =~ ^[0-9]+$ ]] || fail "no host PID for $name: '$pid'"
	out=$("$NII_DELEGATED_FETCH" -socket "$ADMIN_SOCK" -pid "$pid" -want "$want" -timeout 30s 2>&1) ||
		fail "$name (pid $pid) never got $want: $out"
	say "$name pid $pid: ${out//$'\n'/; }"
	sel=$(grep -F "msg=\"PID attested to have selectors\" pid=$pid " "$E2E/logs/spire-agent.log" | tail -1 |
		grep -o 'type:\\"k8s\\" value:\\"[^\\]*' | sed 's/.*value:\\"/k8s:/' | tr '\n' ' ')
	[[ -n $sel ]] || fail "the agent logged no k8s selectors for pid $pid"
	say "$name attested: $sel"
	for want in "k8s:ns:$KUBELET_NS" "k8s:pod-uid:$uid" "k8s:container-name:$name" \
		"k8s:pod-name:smoke-$KUBELET_NODE" k8s:pod-label:app:kubelet-smoke; do
		[[ " $sel " == *" $want "* ]] || fail "$name: selector $want not attested"
	done
}
t=$(_bed_ms)
attest c0 "$c0" /k8s/pod
attest c1 "$c1" /k8s/c1
step "both PIDs attested by the k8s attestor" "$t"
out=$("$NII_DELEGATED_FETCH" -socket "$ADMIN_SOCK" -pid "$("$CRICTL" inspect -o go-template --template '{{.info.pid}}' "$c0")" -timeout 10s)
[[ $out != *"/k8s/c1"* ]] || fail "c0 got c1's container-level identity: $out"
say "c0 does not get /k8s/c1 (container-name selector): $out"

# The kubelet's view, as the attestor reads it.
n=$(kubelet_pods | python3 -c '
import json, sys
print(sum(1 for p in json.load(sys.stdin)["items"] if p["metadata"].get("uid") == sys.argv[1]))' "$uid")
[[ $n == 1 ]] || fail "the read-only /pods lists the pod $n times"

# --- how soon after the start the attestor can name a fresh container -------
# (the kubelet learns the container ID from its PLEG relist, about 1 s, then
# the attestor polls it every 500 ms): informational, not asserted.
uid2=$(bed_uuid)
e_late=$(bed_entry /k8s/late "k8s:ns:$KUBELET_NS" "k8s:pod-uid:$uid2" k8s:container-name:late)
bed_wait_entry "$e_late"
kubelet_static_pod late "$uid2" 'spec: {containers: [{name: late, command: [sleep, inf]}]}' >/dev/null
# Poll CRI (not the kubelet) for the running container, then ask at once.
bed_wait 60 "container late to run" kubelet_container_id late late || fail "late never ran"
t=$(_bed_ms)
late_pid=$("$CRICTL" inspect -o go-template --template '{{.info.pid}}' "$(kubelet_container_id late late)")
out=$("$NII_DELEGATED_FETCH" -socket "$ADMIN_SOCK" -pid "$late_pid" -want "spiffe://$E2E_TD/k8s/late" -timeout 30s 2>&1) ||
	fail "late (pid $late_pid) never got its identity: $out"
say "late pid $late_pid, asked as soon as CRI showed it running: ${out//$'\n'/; }"
step "fresh container attested (container-level entry)" "$t"
