#!/usr/bin/env bash
# Benchmark on a real kubelet: how long before a container's identity files are present,
# selectors mode (written inside CreateContainer, from the pod's metadata) against PID mode
# with the k8s attestor's `disable_container_selectors` (written inside StartContainer, after
# the agent attested the PID; pod-level entries only). N static pods per mode (default 20).
# Selectors mode is compared with a bare Delegated Identity fetch (tests/e2e/tools/
# delegated-fetch) by exactly the selectors the daemon sent for each container, run after the
# pass; target: daemon p50 <= bare p50 + the kubelet pod list's p50 + 1 ms. The agent hashes no
# executable (E2E_UNIX_DISCOVER_WORKLOAD_PATH=false, the unix attestor's default), else the
# two callers' executables' sizes would be what is compared (see tests/e2e/bench.sh).
#
#   tests/e2e/k8s_bench.sh [N]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/e2e/lib/bed.sh
. "$here/lib/bed.sh"
# shellcheck source=tests/e2e/lib/kubelet.sh
. "$here/lib/kubelet.sh"
# shellcheck source=tests/e2e/lib/nii.sh
. "$here/lib/nii.sh"
bed_runtime_only containerd "not run on CRI-O yet (kubelet_smoke.sh is)"

n=${1:-20}
trap 'nii_stop 2>/dev/null || true; bed_down $?' EXIT
export E2E_K8S_ATTESTOR=1 E2E_K8S_DISABLE_CONTAINER_SELECTORS=true
export E2E_UNIX_DISCOVER_WORKLOAD_PATH=${E2E_UNIX_DISCOVER_WORKLOAD_PATH:-false}
nii_build
nii_build_delegated_fetch >/dev/null
bed_up
kubelet_up
# A pod-level entry: with disable_container_selectors the attestor only knows pod selectors.
bed_wait_entry "$(bed_entry /k8s/bench "k8s:ns:$KUBELET_NS" k8s:pod-label:bench:yes)"
# NII_BENCH_KUBELET=secure (default: TLS with a client certificate, as a node would be set
# up) or read-only: how the daemon reaches the kubelet.
kubelet_how=${NII_BENCH_KUBELET:-secure}
case $kubelet_how in
secure)
	NRI_IDENTITY_KUBELET_CA_PATH=$KUBELET_PKI/ca.pem \
		NRI_IDENTITY_KUBELET_CERTIFICATE_PATH=$KUBELET_PKI/client.pem \
		NRI_IDENTITY_KUBELET_PRIVATE_KEY_PATH=$KUBELET_PKI/client-key.pem \
		nii_start --kubelet-url "https://127.0.0.1:$KUBELET_PORT"
	;;
read-only) nii_start --kubelet-url "http://127.0.0.1:$KUBELET_RO_PORT" ;;
*) echo "NII_BENCH_KUBELET: secure or read-only" >&2 && exit 64 ;;
esac

# run_mode MODE : N static pods whose container waits for its files; prints per-pod lines.
run_mode() {
	local mode=$1 i uid body
	for ((i = 0; i < n; i++)); do
		uid=$(bed_uuid)
		body=$(python3 - "$mode" "$(nii_identity /var/certs "attestation: $mode")" <<'EOF'
import json, sys
mode, value = sys.argv[1:]
print(json.dumps({
    "metadata": {"labels": {"bench": "yes"},
                 "annotations": {"identity.noderesource.dev/container.w": value}},
    "spec": {"containers": [{"name": "w", "command": ["sh", "-c", "test -f /var/certs/svid.pem && echo ok; sleep 3600"]}]},
}))
EOF
		)
		kubelet_static_pod "b-$mode-$i" "$uid" "$body" >/dev/null
		kubelet_wait_container "b-$mode-$i" w 60 >/dev/null
		rm -f "$KUBELET_MANIFESTS/b-$mode-$i.yaml"
	done
}

run_mode selectors
# The bare fetch by the selectors the daemon sent, container by container.
: >"$E2E/bare.ms"
mapfile -t cids < <(grep 'identity delivered' "$E2E/logs/nii.log" | grep 'attestation=selectors' | grep -o 'container_id=[0-9a-f]*' | cut -d= -f2)
for cid in "${cids[@]}"; do
	args=()
	while read -r sel; do args+=(-selector "$sel"); done < <(nii_selectors_sent "$cid")
	out=$("$NII_DELEGATED_FETCH" -socket "$ADMIN_SOCK" "${args[@]}" -timeout 10s)
	sed -n 's/^msg=1 elapsed_ms=\([0-9.]*\) .*/\1/p' <<<"$out" >>"$E2E/bare.ms"
done
run_mode pid
grep 'identity delivered' "$E2E/logs/nii.log" | grep 'attestation=selectors' | grep -o 'elapsed_ms=[0-9.]*' | cut -d= -f2 >"$E2E/selectors.ms"
grep 'identity delivered' "$E2E/logs/nii.log" | grep 'attestation=pid' | grep -o 'elapsed_ms=[0-9.]*' | cut -d= -f2 >"$E2E/pid.ms"
grep 'kubelet pod list fetched' "$E2E/logs/nii.log" | grep -o 'elapsed_ms=[0-9.]*' | cut -d= -f2 >"$E2E/lookup.ms"
python3 - "$E2E" "$n" "$kubelet_how" <<'EOF'
import sys
e2e, n, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def load(name):
    return sorted(float(x) for x in open(f"{e2e}/{name}") if x.strip())
def pct(v, p):
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
s, p, k, b = load("selectors.ms"), load("pid.ms"), load("lookup.ms"), load("bare.ms")
assert len(s) >= n and len(p) >= n and len(b) >= n, (len(s), len(p), len(b))
print(f"identity delivery on a real kubelet, {n} pods per mode (ms)          p50      p99")
print(f"  selectors mode, inside CreateContainer                        {pct(s,50):7.2f}  {pct(s,99):7.2f}")
print(f"    of which the kubelet pod list ({how} port, {len(k)} fetches)     {pct(k,50):7.2f}  {pct(k,99):7.2f}")
print(f"  bare fetch by the same selectors (after the pass)             {pct(b,50):7.2f}  {pct(b,99):7.2f}")
print(f"  PID mode + disable_container_selectors, inside StartContainer {pct(p,50):7.2f}  {pct(p,99):7.2f}")
ok = pct(s, 50) <= pct(b, 50) + pct(k, 50) + 1
print(f"  target p50: selectors <= bare + pod list + 1 ms ({pct(s,50):.2f} vs {pct(b,50):.2f} + {pct(k,50):.2f} + 1): {'met' if ok else 'MISSED'}")
print("  (selectors mode: the files exist before StartContainer, so StartContainer -> files present is 0)")
EOF
