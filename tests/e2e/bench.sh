#!/usr/bin/env bash
# Benchmark on the real bed: time spent inside StartContainer for N annotated containers
# (default 50) with the daemon, against a bare reference client of the Delegated Identity
# API (examples/bare_fetch.rs) called at the same moment for the same kind of PID, with no
# files and no checks. Target: daemon p50/p99 <= 1.2 x bare + 2 ms.
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

# run_pass LABEL : N containers created and started one after another in one pod.
run_pass() {
	local label=$1 pod pid cid i t
	pod=$(bed_pod_json "bench-$label" "$(bed_uuid)" "$(nii_annotations identity.noderesource.dev/pod "$(nii_identity /var/certs)")")
	pid=$("$CRICTL" runp "$pod")
	: >"$E2E/start-$label.ms"
	for ((i = 0; i < n; i++)); do
		cid=$("$CRICTL" create "$pid" "$(bed_ctr_json "b$i" sleep 1)" "$pod")
		t=$(nii_ms)
		"$CRICTL" start "$cid" >/dev/null
		echo "$(($(nii_ms) - t))" >>"$E2E/start-$label.ms"
	done
	"$CRICTL" rmp -f "$pid" >/dev/null
}

nii_start
run_pass daemon
grep -o 'identity delivered.*elapsed_ms=[0-9.]*' "$E2E/logs/nii.log" | grep -o 'elapsed_ms=[0-9.]*' | cut -d= -f2 >"$E2E/daemon.ms"
nii_stop

bed_spawn bare "$BARE_BIN" --socket "$NRI_SOCK" --agent "$ADMIN_SOCK" >/dev/null
bed_wait 30 "bare plugin registered" grep -q 'registered as.*10-bare-fetch' "$E2E/logs/containerd.log"
run_pass bare
grep -o 'bare-fetch .*elapsed_ms=[0-9.]*' "$E2E/logs/bare.log" | grep -o 'elapsed_ms=[0-9.]*' | cut -d= -f2 >"$E2E/bare.ms"
bed_stop bare

python3 - "$E2E" "$n" <<'EOF'
import sys
e2e, n = sys.argv[1], int(sys.argv[2])
def load(name):
    return sorted(float(x) for x in open(f"{e2e}/{name}") if x.strip())
def pct(v, p):
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
d, b = load("daemon.ms"), load("bare.ms")
sd, sb = load("start-daemon.ms"), load("start-bare.ms")
assert len(d) == n and len(b) == n, (len(d), len(b))
print(f"StartContainer, {n} containers each (ms)        p50      p99")
print(f"  daemon (fetch + checks + files)           {pct(d,50):7.2f}  {pct(d,99):7.2f}")
print(f"  bare Delegated Identity fetch             {pct(b,50):7.2f}  {pct(b,99):7.2f}")
print(f"  ratio daemon / bare                       {pct(d,50)/pct(b,50):7.2f}  {pct(d,99)/pct(b,99):7.2f}")
print(f"  crictl start, daemon                      {pct(sd,50):7.0f}  {pct(sd,99):7.0f}")
print(f"  crictl start, bare                        {pct(sb,50):7.0f}  {pct(sb,99):7.0f}")
for p in (50, 99):
    ok = pct(d, p) <= 1.2 * pct(b, p) + 2
    print(f"  target p{p}: daemon <= 1.2 x bare + 2 ms: {'met' if ok else 'MISSED'}")
EOF
