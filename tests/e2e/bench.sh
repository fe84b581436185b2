#!/usr/bin/env bash
# Benchmark on the real bed: time spent inside StartContainer for N annotated containers
# (default 50) with the daemon, against a bare reference client of the Delegated Identity
# API (examples/bare_fetch.rs) called at the same moment for the same kind of PID, with no
# files and no checks. Target: daemon p50/p99 <= 1.2 x bare + 2 ms.
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
bed_runtime_only containerd "its figures and the bare plugin's registration check are containerd's; not run on CRI-O yet"

n=${1:-50}
trap 'nii_stop 2>/dev/null || true; bed_stop bare 2>/dev/null || true; bed_down $?' EXIT
nii_build
(cd "$NII_ROOT" && cargo build -q --release --example bare_fetch)
BARE_BIN=${CARGO_TARGET_DIR:-$NII_ROOT/target}/release/examples/bare_fetch
bed_up
bed_wait_entry "$(bed_entry /bench unix:uid:1001)"

ns() { date +%s%N; }

# run_pass LABEL... : one pod per LABEL, N containers in each, created and started one after
# another, taking the pods in turn (so that load on the machine falls on all of them alike);
# records crictl start's latency and the time from crictl start to the workload's first
# instruction. The pod of label `noguard` sets `on_failure: continue`, which gets no start
# guard and is otherwise served the same. Leaves the directory of the first label's last
# container in LAST_DIR.
run_pass() {
	local label pod_uid cid i t first out
	local -A pods=() pids=() uids=()
	local -a cids=() starts=() labels=()
	for label in "$@"; do
		pod_uid=$(bed_uuid)
		uids[$label]=$pod_uid
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

nii_start
run_pass daemon noguard
time_guard "$LAST_DIR"
"$CRICTL" rmp -af >/dev/null
grep 'identity{pod=bench-daemon ' "$E2E/logs/nii.log" | grep -o 'identity delivered.*elapsed_ms=[0-9.]*' |
	grep -o 'elapsed_ms=[0-9.]*' | cut -d= -f2 >"$E2E/daemon.ms"
nii_stop

bed_spawn bare "$BARE_BIN" --socket "$NRI_SOCK" --agent "$ADMIN_SOCK" >/dev/null
bed_wait 30 "bare plugin registered" grep -q 'registered as.*10-bare-fetch' "$E2E/logs/containerd.log"
run_pass bare
"$CRICTL" rmp -af >/dev/null
grep -o 'bare-fetch .*elapsed_ms=[0-9.]*' "$E2E/logs/bare.log" | grep -o 'elapsed_ms=[0-9.]*' | cut -d= -f2 >"$E2E/bare.ms"
bed_stop bare

python3 - "$E2E" "$n" <<'EOF'
import sys
e2e, n = sys.argv[1], int(sys.argv[2])
def load(name):
    return sorted(float(x) for x in open(f"{e2e}/{name}") if x.strip())
def pct(v, p):
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
def us(name):
    return [x / 1000 for x in load(name)]
d, b = load("daemon.ms"), load("bare.ms")
assert len(d) == n and len(b) == n, (len(d), len(b))
print(f"StartContainer, {n} containers each (ms)        p50      p99")
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
