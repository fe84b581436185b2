#!/usr/bin/env bash
# Benchmark on the real bed (containerd, or CRI-O with E2E_RUNTIME=cri-o): time spent inside
# StartContainer for N annotated containers (default 50) with the daemon, against a bare
# reference client of the Delegated Identity API (examples/bare_fetch.rs) called at the same
# moment for the same kind of PID, with no files and no checks. Target: daemon p50/p99 <=
# 1.2 x bare + 2 ms.
#
# NII_E2E_ATTESTATION=selectors benchmarks selectors mode instead: time spent inside
# CreateContainer, where the daemon also looks the pod up in the kubelet's list (a fake
# kubelet here, lib/fake_kubelet.py), derives the selectors and writes the files, against a
# bare fetch by exactly the selectors the daemon sent for each container
# (tools/delegated-fetch, run after the pass), same target.
#
# Each container is the FROM scratch image's idcheck, whose first instruction records when
# it started: "crictl start -> first instruction" is what a start costs the workload, with
# the start guard, without it (a pod with on_failure: continue, served alike otherwise; the
# two pods take turns) and with the bare client. The guard alone (exec and checks, files
# present) is also timed on the host.
#
#   tests/e2e/bench.sh [N]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/e2e/lib/bed.sh
. "$here/lib/bed.sh"
# shellcheck source=tests/e2e/lib/nii.sh
. "$here/lib/nii.sh"

n=${1:-50}
MODE=${NII_E2E_ATTESTATION:-pid}
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

ns() { date +%s%N; }

# run_pass LABEL... : one pod per LABEL, N containers in each, created and started one after
# another, taking the pods in turn (so that load on the machine falls on all of them alike);
# records crictl start's latency and the time from crictl start to the workload's first
# instruction. The pod of label `noguard` sets `on_failure: continue`, which gets no start
# guard and is otherwise served the same. Leaves the directory of the first label's last
# container in LAST_DIR and the containers of the first label in PASS_CIDS.
run_pass() {
	local label pod_uid cid i t first out
	local -A pods=() pids=() uids=()
	local -a cids=() starts=() labels=()
	for label in "$@"; do
		pod_uid=$(bed_uuid)
		uids[$label]=$pod_uid
		[[ $MODE != selectors ]] || kubelet_fake_add "$pod_uid" default
		if [[ $label == noguard ]]; then
			pods[$label]=$(bed_pod_json "bench-$label" "$pod_uid" "$(nii_annotations identity.noderesource.dev/pod "$(nii_identity /var/certs 'on_failure: continue')")")
		else
			pods[$label]=$(bed_pod_json "bench-$label" "$pod_uid" "$(nii_annotations identity.noderesource.dev/pod "$(nii_identity /var/certs)")")
		fi
		pids[$label]=$("$CRICTL" runp "${pods[$label]}")
		: >"$E2E/start-$label.ms"
		: >"$E2E/first-$label.ms"
	done
	for ((i = 0; i < n; i++)); do
		for label in "$@"; do
			cid=$("$CRICTL" create "${pids[$label]}" "$(E2E_CTR_IMAGE=$E2E_SCRATCH_IMAGE bed_ctr_json "b$i" /idcheck /var/certs)" "${pods[$label]}")
			t=$(ns)
			"$CRICTL" start "$cid" >/dev/null
			echo "$((($(ns) - t) / 1000))" >>"$E2E/start-$label.ms"
			cids+=("$cid")
			starts+=("$t")
			labels+=("$label")
		done
	done
	for i in "${!cids[@]}"; do
		bed_wait_exited "${cids[i]}" 60
		out=$("$CRICTL" logs "${cids[i]}" 2>&1)
		first=$(sed -n 's/^started-at-ns=//p' <<<"$out")
		[[ -n $first ]] || _bed_die "${cids[i]} printed no start time: $out" || return 1
		echo "$(((first - starts[i]) / 1000))" >>"$E2E/first-${labels[i]}.ms"
		if [[ ${labels[i]} != bare && $out != *"svid exists!"* ]]; then
			_bed_die "${labels[i]}: ${cids[i]} ran without its files: $out" || return 1
		fi
	done
	LAST_DIR=$(nii_dir "${uids[$1]}" "${cids[${#cids[@]} - $#]}")
	PASS_CIDS=()
	for i in "${!cids[@]}"; do
		[[ ${labels[i]} != "$1" ]] || PASS_CIDS+=("${cids[i]}")
	done
}

# bare_by_selectors CID : the bare fetch by the selectors the daemon sent for CID.
bare_by_selectors() {
	local args=() s out
	while read -r s; do args+=(-selector "$s"); done < <(nii_selectors_sent "$1")
	((${#args[@]})) || { echo "bench: no selectors logged for $1" >&2 && return 1; }
	out=$("$NII_DELEGATED_FETCH" -socket "$ADMIN_SOCK" "${args[@]}" -timeout 10s) || return 1
	sed -n 's/^msg=1 elapsed_ms=\([0-9.]*\) .*/\1/p' <<<"$out" >>"$E2E/bare.ms"
}

# The guard as the runtime runs it, files present: N runs on the host.
time_guard() {
	local i t
	: >"$E2E/guard.ms"
	for ((i = 0; i < n; i++)); do
		t=$(ns)
		"$NII_BIN" guard --cert-dir "$1" --cert svid.pem --key svid_key.pem --file svid_bundle.pem --timeout-ms=1000
		echo "$((($(ns) - t) / 1000))" >>"$E2E/guard.ms"
	done
}

if [[ $MODE == selectors ]]; then
	bed_wait_entry "$(bed_entry /bench k8s:ns:e2e k8s:sa:default)"
	kubelet_fake_up
	nii_start --kubelet-url "http://127.0.0.1:$KUBELET_FAKE_PORT"
	run_pass daemon
	grep 'identity{pod=bench-daemon ' "$E2E/logs/nii.log" | grep -o 'identity delivered.*elapsed_ms=[0-9.]*' |
		grep -o 'elapsed_ms=[0-9.]*' | cut -d= -f2 >"$E2E/daemon.ms"
	: >"$E2E/bare.ms"
	for cid in "${PASS_CIDS[@]}"; do bare_by_selectors "$cid"; done
	"$CRICTL" rmp -af >/dev/null
	nii_stop
else
	bed_wait_entry "$(bed_entry /bench unix:uid:1001)"
	nii_start
	run_pass daemon noguard
	time_guard "$LAST_DIR"
	"$CRICTL" rmp -af >/dev/null
	grep 'identity{pod=bench-daemon ' "$E2E/logs/nii.log" | grep -o 'identity delivered.*elapsed_ms=[0-9.]*' |
		grep -o 'elapsed_ms=[0-9.]*' | cut -d= -f2 >"$E2E/daemon.ms"
	nii_stop

	bed_spawn bare "$BARE_BIN" --socket "$NRI_SOCK" --agent "$ADMIN_SOCK" >/dev/null
	bed_wait 30 "bare plugin registered" grep -q 'registered as.*10-bare-fetch' "$E2E_RUNTIME_LOG"
	run_pass bare
	"$CRICTL" rmp -af >/dev/null
	grep -o 'bare-fetch .*elapsed_ms=[0-9.]*' "$E2E/logs/bare.log" | grep -o 'elapsed_ms=[0-9.]*' | cut -d= -f2 >"$E2E/bare.ms"
	bed_stop bare
fi

python3 - "$E2E" "$n" "$E2E_RUNTIME" "$MODE" <<'EOF'
import sys
e2e, n, runtime, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def load(name):
    return sorted(float(x) for x in open(f"{e2e}/{name}") if x.strip())
def pct(v, p):
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
def us(name):
    return [x / 1000 for x in load(name)]
d, b = load("daemon.ms"), load("bare.ms")
assert len(d) == n and len(b) == n, (len(d), len(b))
if mode == "selectors":
    print(f"{runtime}, selectors mode: CreateContainer, {n} containers (ms)     p50      p99")
    print(f"  daemon (kubelet list + selectors + fetch + files)    {pct(d,50):7.2f}  {pct(d,99):7.2f}")
    print(f"  bare fetch by the same selectors                     {pct(b,50):7.2f}  {pct(b,99):7.2f}")
    print(f"  ratio daemon / bare                                  {pct(d,50)/pct(b,50):7.2f}  {pct(d,99)/pct(b,99):7.2f}")
    for what, label in (("crictl start", "start"), ("crictl start -> first instruction", "first")):
        v = us(f"{label}-daemon.ms")
        print(f"  {what + ', daemon':<53}{pct(v,50):7.2f}  {pct(v,99):7.2f}")
else:
    print(f"{runtime}, StartContainer, {n} containers each (ms)        p50      p99")
    print(f"  daemon (fetch + checks + files)           {pct(d,50):7.2f}  {pct(d,99):7.2f}")
    print(f"  bare Delegated Identity fetch             {pct(b,50):7.2f}  {pct(b,99):7.2f}")
    print(f"  ratio daemon / bare                       {pct(d,50)/pct(b,50):7.2f}  {pct(d,99)/pct(b,99):7.2f}")
    for what, label in (("crictl start", "start"), ("crictl start -> first instruction", "first")):
        for run, name in (("daemon, start guard", "daemon"), ("daemon, no guard", "noguard"), ("bare", "bare")):
            v = us(f"{label}-{name}.ms")
            print(f"  {what + ', ' + run:<42}{pct(v,50):7.2f}  {pct(v,99):7.2f}")
    g = us("guard.ms")
    print(f"  the guard alone (exec + checks, on the host) {pct(g,50):4.2f}  {pct(g,99):7.2f}")
for p in (50, 99):
    ok = pct(d, p) <= 1.2 * pct(b, p) + 2
    print(f"  target p{p}: daemon <= 1.2 x bare + 2 ms: {'met' if ok else 'MISSED'}")
EOF
