#!/usr/bin/env bash
# Benchmark on the real bed (containerd, or CRI-O with E2E_RUNTIME=cri-o): the daemon's time
# to deliver an identity to N annotated containers (default 50), created and started one
# after another, against a bare fetch from the agent's Delegated Identity API for the same
# workload, with no files and no checks. Target: daemon p50/p99 <= 1.2 x bare + 2 ms.
#
#   tests/e2e/bench.sh [N]
#
# The naming mode follows tests/e2e/run.sh (NII_E2E_ATTESTATION, default pid on containerd,
# selectors on CRI-O, which refuses PID mode):
# - pid: inside StartContainer. The bare reference is an NRI plugin
#   (examples/bare_fetch.rs) asking for the container's PID at the same event, in a second
#   pass with the daemon stopped.
# - selectors: inside CreateContainer, where the daemon also looks the pod up in the
#   kubelet's list (a fake kubelet here, lib/fake_kubelet.py) and derives the selectors. The
#   bare reference asks for exactly the selectors the daemon sent for that container
#   (tools/delegated-fetch), right after the container was created.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/e2e/lib/bed.sh
. "$here/lib/bed.sh"
# shellcheck source=tests/e2e/lib/nii.sh
. "$here/lib/nii.sh"

n=${1:-50}
case ${E2E_RUNTIME:-containerd} in
cri-o) MODE=${NII_E2E_ATTESTATION:-selectors} ;;
*) MODE=${NII_E2E_ATTESTATION:-pid} ;;
esac
trap 'nii_stop 2>/dev/null || true; bed_stop bare 2>/dev/null || true; bed_down $?' EXIT
nii_build
case $MODE in
pid)
	(cd "$NII_ROOT" && cargo build -q --release --example bare_fetch)
	BARE_BIN=${CARGO_TARGET_DIR:-$NII_ROOT/target}/release/examples/bare_fetch
	;;
selectors) nii_build_delegated_fetch >/dev/null ;;
*) echo "NII_E2E_ATTESTATION: pid or selectors" >&2 && exit 64 ;;
esac
bed_up

# run_pass LABEL [EACH] : N containers created and started one after another in one pod;
# EACH CID runs after each start. Records crictl's create and start latencies.
run_pass() {
	local label=$1 each=${2:-} pod pod_uid pid cid i t
	pod_uid=$(bed_uuid)
	[[ $MODE != selectors ]] || kubelet_fake_add "$pod_uid" default
	pod=$(bed_pod_json "bench-$label" "$pod_uid" "$(nii_annotations identity.noderesource.dev/pod "$(nii_identity /var/certs)")")
	pid=$("$CRICTL" runp "$pod")
	: >"$E2E/create-$label.ms"
	: >"$E2E/start-$label.ms"
	for ((i = 0; i < n; i++)); do
		t=$(nii_ms)
		cid=$("$CRICTL" create "$pid" "$(bed_ctr_json "b$i" sleep 1)" "$pod")
		echo "$(($(nii_ms) - t))" >>"$E2E/create-$label.ms"
		t=$(nii_ms)
		"$CRICTL" start "$cid" >/dev/null
		echo "$(($(nii_ms) - t))" >>"$E2E/start-$label.ms"
		[[ -z $each ]] || "$each" "$cid"
	done
	bed_rmp "$pid"
}

# bare_by_selectors CID : the bare fetch by the selectors the daemon sent for CID.
bare_by_selectors() {
	local args=() s out
	while read -r s; do args+=(-selector "$s"); done < <(nii_selectors_sent "$1")
	((${#args[@]})) || { echo "bench: no selectors logged for $1" >&2 && return 1; }
	out=$("$NII_DELEGATED_FETCH" -socket "$ADMIN_SOCK" "${args[@]}" -timeout 10s) || return 1
	sed -n 's/^msg=1 elapsed_ms=\([0-9.]*\) .*/\1/p' <<<"$out" >>"$E2E/bare.ms"
}

: >"$E2E/bare.ms"
case $MODE in
pid)
	bed_wait_entry "$(bed_entry /bench unix:uid:1001)"
	nii_start
	run_pass daemon
	nii_stop
	bed_spawn bare "$BARE_BIN" --socket "$NRI_SOCK" --agent "$ADMIN_SOCK" >/dev/null
	bed_wait 30 "bare plugin registered" grep -q 'registered as.*10-bare-fetch' "$E2E_RUNTIME_LOG"
	run_pass bare
	grep -o 'bare-fetch .*elapsed_ms=[0-9.]*' "$E2E/logs/bare.log" | grep -o 'elapsed_ms=[0-9.]*' | cut -d= -f2 >"$E2E/bare.ms"
	bed_stop bare
	;;
selectors)
	bed_wait_entry "$(bed_entry /bench k8s:ns:e2e k8s:sa:default)"
	kubelet_fake_up
	nii_start --kubelet-url "http://127.0.0.1:$KUBELET_FAKE_PORT"
	run_pass daemon bare_by_selectors
	nii_stop
	;;
esac
grep -o 'identity delivered.*elapsed_ms=[0-9.]*' "$E2E/logs/nii.log" | grep -o 'elapsed_ms=[0-9.]*' | cut -d= -f2 >"$E2E/daemon.ms"

python3 - "$E2E" "$n" "$E2E_RUNTIME" "$MODE" <<'EOF'
import sys
e2e, n, runtime, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def load(name):
    return sorted(float(x) for x in open(f"{e2e}/{name}") if x.strip())
def pct(v, p):
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
d, b = load("daemon.ms"), load("bare.ms")
assert len(d) == n and len(b) == n, (len(d), len(b))
event = "StartContainer" if mode == "pid" else "CreateContainer"
what = "fetch + checks + files" if mode == "pid" else "kubelet list + selectors + fetch + files"
bare = "bare Delegated Identity fetch by PID" if mode == "pid" else "bare fetch by the same selectors"
print(f"{runtime}, {mode} mode: {event}, {n} containers each (ms)        p50      p99")
print(f"  daemon ({what})".ljust(58) + f"{pct(d,50):7.2f}  {pct(d,99):7.2f}")
print(f"  {bare}".ljust(58) + f"{pct(b,50):7.2f}  {pct(b,99):7.2f}")
print("  ratio daemon / bare".ljust(58) + f"{pct(d,50)/pct(b,50):7.2f}  {pct(d,99)/pct(b,99):7.2f}")
for label in (["daemon", "bare"] if mode == "pid" else ["daemon"]):
    for step in ("create", "start"):
        v = load(f"{step}-{label}.ms")
        print(f"  crictl {step}, {label}".ljust(58) + f"{pct(v,50):7.0f}  {pct(v,99):7.0f}")
for p in (50, 99):
    ok = pct(d, p) <= 1.2 * pct(b, p) + 2
    print(f"  target p{p}: daemon <= 1.2 x bare + 2 ms: {'met' if ok else 'MISSED'}")
EOF
