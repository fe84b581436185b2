#!/usr/bin/env bash
# Bursts on the real bed (containerd + runc + SPIRE, PID mode): for each N given (default
# 100), N annotated pods, one container each, run, created and started all at once. Every
# container must start and its first instruction (the FROM scratch idcheck) must find its
# identity; every NRI event must be answered within containerd's plugin request timeout (2 s).
# Per burst: p50/p99/max of crictl's create and start as the burst saw them, of the daemon's
# StartContainer handling (its `identity delivered` elapsed_ms), and the daemon's CPU time.
# Several sizes make the start latency vs concurrent starts curve: a CSV and (with gnuplot)
# a plot in NII_BENCH_OUT (default /tmp/nii-bench-burst).
#
#   tests/e2e/burst.sh [N...]          (make bench-burst: 1 10 25 50 100)
#
# The agent hashes no executable here (E2E_UNIX_DISCOVER_WORKLOAD_PATH=false, the unix
# attestor's default): with hashing the agent's own cost dominates; see tests/e2e/bench.sh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export E2E_UNIX_DISCOVER_WORKLOAD_PATH=${E2E_UNIX_DISCOVER_WORKLOAD_PATH:-false}
# shellcheck source=tests/e2e/lib/bed.sh
. "$here/lib/bed.sh"
# shellcheck source=tests/e2e/lib/nii.sh
. "$here/lib/nii.sh"

bed_runtime_only containerd "the burst measures containerd's NRI deadline"
sizes=("$@")
((${#sizes[@]})) || sizes=(100)
for n in "${sizes[@]}"; do
	[[ $n =~ ^[1-9][0-9]*$ ]] || { echo "burst: sizes are positive integers, not '$n'" >&2 && exit 64; }
done
trap 'nii_stop 2>/dev/null || true; bed_down $?' EXIT
nii_build
bed_up
out=${NII_BENCH_OUT:-/tmp/nii-bench-burst}
mkdir -p "$out"
ns() { date +%s%N; }
# The daemon's user + system CPU time, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$(bed_pid nii)/stat"; }

bed_wait_entry "$(bed_entry /burst unix:uid:1001)"
nii_start
echo "concurrent starts,StartContainer handling p50 (ms),p99,max,crictl start p50 (ms),p99,max,daemon CPU per container (ms)" >"$out/burst-starts.csv"

# One background crictl per pod and step; each records its own latency. A bare `wait` would
# also wait for the bed's own processes (bed_spawn starts them from this shell).
jobs_=()
wait_jobs() {
	wait "${jobs_[@]}"
	jobs_=()
}
# timed LATENCY_FILE OUT_FILE CMD... : CMD in the background, its output into OUT_FILE and its
# latency (µs) into LATENCY_FILE.
timed() {
	local latency=$1 out=$2
	shift 2
	(
		t=$(ns)
		"$@" >"$out"
		echo "$((($(ns) - t) / 1000))" >"$latency"
	) &
	jobs_+=($!)
}

# burst N : one burst of N pods; prints its table, appends its row to the CSV, removes its pods.
burst() {
	local n=$1 d=$E2E/burst/$1 i cid out_ fails=0 ctr ticks0 ticks1 t0 t1 t2
	mkdir -p "$d"
	for ((i = 0; i < n; i++)); do
		# bed_pod_json writes the spec to a file and prints its path.
		bed_pod_json "burst-$n-$i" "$(bed_uuid)" "$(nii_annotations identity.noderesource.dev/pod "$(nii_identity /var/certs)")" >"$d/$i.podpath"
	done
	for ((i = 0; i < n; i++)); do
		"$CRICTL" runp "$(cat "$d/$i.podpath")" >"$d/$i.pid" &
		jobs_+=($!)
	done
	wait_jobs
	# One container spec for all: bed_ctr_json writes a file named after the container.
	ctr=$(E2E_CTR_IMAGE=$E2E_SCRATCH_IMAGE bed_ctr_json c /idcheck /var/certs)
	ticks0=$(cpu_ticks)
	t0=$(ns)
	for ((i = 0; i < n; i++)); do
		timed "$d/$i.create" "$d/$i.cid" "$CRICTL" create "$(cat "$d/$i.pid")" "$ctr" "$(cat "$d/$i.podpath")"
	done
	wait_jobs
	t1=$(ns)
	for ((i = 0; i < n; i++)); do
		timed "$d/$i.start" /dev/null "$CRICTL" start "$(cat "$d/$i.cid")"
	done
	wait_jobs
	t2=$(ns)
	for ((i = 0; i < n; i++)); do
		cid=$(cat "$d/$i.cid")
		bed_wait_exited "$cid" 60
		out_=$("$CRICTL" logs "$cid" 2>&1)
		[[ $out_ == *"svid exists!"* ]] || { echo "burst: pod $i of $n ran without its identity: $out_" >&2 && fails=$((fails + 1)); }
	done
	ticks1=$(cpu_ticks)
	grep "identity{pod=burst-$n-" "$E2E/logs/nii.log" | grep 'identity delivered' | grep -o 'elapsed_ms=[0-9.]*' | cut -d= -f2 >"$d/delivered.ms"
	[[ $(wc -l <"$d/delivered.ms") == "$n" ]] || { echo "burst: $(wc -l <"$d/delivered.ms") deliveries logged, not $n" >&2 && fails=$((fails + 1)); }

	python3 - "$d" "$n" "$(((t1 - t0) / 1000000))" "$(((t2 - t1) / 1000000))" "$((ticks1 - ticks0))" "$(getconf CLK_TCK)" "$fails" "$out/burst-starts.csv" <<'EOF' || return 1
import glob, sys
d, n, create_ms, start_ms, ticks, hz, fails, csv = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:8]), sys.argv[8]
def read(suffix, scale):
    return sorted(float(open(f).read()) / scale for f in glob.glob(f"{d}/*.{suffix}"))
def pct(v, p):
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
rows = [("crictl create (all at once)", read("create", 1000)),
        ("crictl start (all at once)", read("start", 1000)),
        ("daemon: StartContainer handling", sorted(float(x) for x in open(f"{d}/delivered.ms")))]
print(f"burst: {n} annotated pods, created together then started together (ms)   p50      p99      max")
for label, v in rows:
    print(f"  {label:<62}{pct(v,50):8.2f} {pct(v,99):8.2f} {v[-1]:8.2f}")
print(f"  wall: all creates {create_ms} ms, all starts {start_ms} ms")
cpu = ticks * 1000 / hz
if ticks:
    print(f"  daemon CPU for the burst (creates, starts, first deliveries): {cpu:.0f} ms, {cpu / n:.2f} ms per container")
else:
    print(f"  daemon CPU for the burst (creates, starts, first deliveries): under one clock tick ({1000 / hz:.0f} ms)")
slow = [x for x in rows[2][1] if x >= 2000]
print(f"  StartContainer handling over containerd's 2 s plugin timeout: {len(slow)}")
print(f"  containers that ran without their identity: {fails}")
h, s = rows[2][1], rows[1][1]
per = f"{cpu / n:.2f}" if ticks else ""
with open(csv, "a") as f:
    f.write(f"{n},{pct(h,50):.2f},{pct(h,99):.2f},{h[-1]:.2f},{pct(s,50):.2f},{pct(s,99):.2f},{s[-1]:.2f},{per}\n")
sys.exit(1 if fails or slow else 0)
EOF
	mapfile -t pods < <(cat "$d"/*.pid)
	bed_rmp "${pods[@]}"
}

failed=0
for n in "${sizes[@]}"; do
	burst "$n" || failed=1
done
echo "data: $out/burst-starts.csv"
if ((${#sizes[@]} > 1)); then
	if command -v gnuplot >/dev/null &&
		gnuplot -e "csv='$out/burst-starts.csv'; png='$out/burst-starts.png'" "$here/burst.gnuplot"; then
		echo "plot: $out/burst-starts.png"
	else
		echo "(no plot: gnuplot missing or failed)"
	fi
fi
exit "$failed"
