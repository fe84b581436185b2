#!/usr/bin/env bash
# A burst on a real kubelet, selectors mode: N static pods (default 100), one annotated
# container each, handed to the kubelet together. Every container must start with its files
# already there (its first command checks), every CreateContainer the daemon answers within
# containerd's plugin request timeout (2 s). Prints p50/p99/max of the daemon's
# CreateContainer handling, how many pod lists it fetched from the kubelet for the burst and
# the bytes it parsed (nri_identity_kubelet_pod_lists_total, ..._bytes_total; readiness
# probes included), and its CPU time. The kubelet reaches the daemon over its secure port, as
# on a node.
#
#   tests/e2e/k8s_burst.sh [N]          (make bench-burst)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/e2e/lib/bed.sh
. "$here/lib/bed.sh"
# shellcheck source=tests/e2e/lib/kubelet.sh
. "$here/lib/kubelet.sh"
# shellcheck source=tests/e2e/lib/nii.sh
. "$here/lib/nii.sh"
bed_runtime_only containerd "the burst measures containerd's NRI deadline"

n=${1:-100}
[[ $n =~ ^[1-9][0-9]*$ ]] || { echo "k8s_burst: N is a positive integer, not '$n'" >&2 && exit 64; }
trap 'nii_stop 2>/dev/null || true; bed_down $?' EXIT
export E2E_UNIX_DISCOVER_WORKLOAD_PATH=${E2E_UNIX_DISCOVER_WORKLOAD_PATH:-false}
nii_build
bed_up
kubelet_up
bed_wait_entry "$(bed_entry /k8s/burst "k8s:ns:$KUBELET_NS" k8s:pod-label:burst:yes)"
NRI_IDENTITY_KUBELET_CA_PATH=$KUBELET_PKI/ca.pem \
	NRI_IDENTITY_KUBELET_CERTIFICATE_PATH=$KUBELET_PKI/client.pem \
	NRI_IDENTITY_KUBELET_PRIVATE_KEY_PATH=$KUBELET_PKI/client-key.pem \
	nii_start --kubelet-url "https://127.0.0.1:$KUBELET_PORT"
cpu_ticks() { awk '{print $14 + $15}' "/proc/$(bed_pid nii)/stat"; }

# Written aside first (same file system), then renamed into the kubelet's directory in one go.
staged=$E2E/manifests-staged
mkdir -p "$staged"
value=$(nii_identity /var/certs "attestation: selectors")
for ((i = 0; i < n; i++)); do
	body=$(python3 - "$value" <<'EOF'
import json, sys
print(json.dumps({
    "metadata": {"labels": {"burst": "yes"},
                 "annotations": {"identity.noderesource.dev/container.w": sys.argv[1]}},
    "spec": {"containers": [{"name": "w", "command": ["sh", "-c", "test -f /var/certs/svid.pem && echo files-present; sleep 3600"]}]},
}))
EOF
	)
	KUBELET_MANIFESTS=$staged kubelet_static_pod "kb-$i" "$(bed_uuid)" "$body" >/dev/null
done
lists0=$(nii_metric nri_identity_kubelet_pod_lists_total)
bytes0=$(nii_metric nri_identity_kubelet_pod_list_bytes_total)
ticks0=$(cpu_ticks)
t0=$(nii_ms)
mv "$staged"/kb-*.yaml "$KUBELET_MANIFESTS"/
running() {
	"$CRICTL" ps --state running --label io.kubernetes.container.name=w -q | wc -l
}
all_running() { (($(running) >= n)); }
bed_wait 900 "$n containers running" all_running
t1=$(nii_ms)
ticks1=$(cpu_ticks)
lists1=$(nii_metric nri_identity_kubelet_pod_lists_total)
bytes1=$(nii_metric nri_identity_kubelet_pod_list_bytes_total)

fails=0
mapfile -t cids < <("$CRICTL" ps --state running --label io.kubernetes.container.name=w -q)
for cid in "${cids[@]}"; do
	out=$("$CRICTL" logs "$cid" 2>&1)
	[[ $out == *files-present* ]] || { echo "k8s_burst: container $cid started without its files: $out" >&2 && fails=$((fails + 1)); }
done
grep 'identity delivered' "$E2E/logs/nii.log" | grep 'attestation=selectors' | grep -o 'elapsed_ms=[0-9.]*' | cut -d= -f2 >"$E2E/delivered.ms"
grep 'kubelet pod list fetched' "$E2E/logs/nii.log" | grep -o 'elapsed_ms=[0-9.]*' | cut -d= -f2 >"$E2E/lists.ms"
[[ $(wc -l <"$E2E/delivered.ms") == "$n" ]] || { echo "k8s_burst: $(wc -l <"$E2E/delivered.ms") deliveries logged, not $n" >&2 && fails=$((fails + 1)); }

python3 - "$E2E" "$n" "$((t1 - t0))" "$((ticks1 - ticks0))" "$(getconf CLK_TCK)" "$((lists1 - lists0))" "$((bytes1 - bytes0))" "$fails" <<'EOF'
import sys
e2e, n, wall, ticks, hz, lists, nbytes, fails = sys.argv[1], *map(int, sys.argv[2:])
def load(name):
    return sorted(float(x) for x in open(f"{e2e}/{name}") if x.strip())
def pct(v, p):
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
d, k = load("delivered.ms"), load("lists.ms")
print(f"burst on a real kubelet: {n} static pods handed over together, selectors mode (ms)  p50      p99      max")
print(f"  daemon: CreateContainer handling (pod list, agent, files)          {pct(d,50):8.2f} {pct(d,99):8.2f} {d[-1]:8.2f}")
print(f"  daemon: one kubelet pod list (secure port), all {len(k)} this run       {pct(k,50):8.2f} {pct(k,99):8.2f} {k[-1]:8.2f}")
print(f"  wall: manifests handed over -> {n} containers running: {wall} ms")
print(f"  kubelet pod lists fetched for the burst: {lists} ({lists / n:.2f} per pod), {nbytes / 1024:.0f} KiB parsed ({nbytes / 1024 / n:.1f} KiB per pod)")
cpu = ticks * 1000 / hz
print(f"  daemon CPU for the burst: {cpu:.0f} ms, {cpu / n:.2f} ms per container")
slow = [x for x in d if x >= 2000]
print(f"  CreateContainer handling over containerd's 2 s plugin timeout: {len(slow)}")
print(f"  containers that started without their files: {fails}")
sys.exit(1 if fails or slow else 0)
EOF
