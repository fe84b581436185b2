#!/usr/bin/env bash
# Benchmark on the real bed (containerd, or CRI-O with E2E_RUNTIME=cri-o): time spent inside
# StartContainer for N annotated containers (default 50) with the daemon, against a bare
# reference client of the Delegated Identity API (examples/bare_fetch.rs) for N containers of
# the same kind, with no files and no checks; both are registered and their containers take
# turns in one pass. Target (PID mode): daemon
# p50 <= bare p50 + 1 ms and daemon p99 <= 1.2 x bare p99. The daemon's phases (its
# `identity delivered` log line: workload named, stream open, first SVID, bundle ready, checks,
# files written, reply) are printed next to the bare client's (stream open, first SVID), so
# that the gap between the two shows where it arises; the load average is printed before and
# after each pass, as other work on the machine moves every figure.
#
# NII_E2E_ATTESTATION=selectors benchmarks selectors mode instead: time spent inside
# CreateContainer, where the daemon also looks the pod up in the kubelet's list (a fake
# kubelet here, lib/fake_kubelet.py), derives the selectors and writes the files, against a
# bare fetch by exactly the selectors the daemon sent for each container
# (tools/delegated-fetch, run after the pass); same target (the kubelet's pod list is part of
# the daemon's workload_named phase, shown in the table).
#
# Each container is the FROM scratch image's idcheck, whose first instruction records when
# it started: "crictl start -> first instruction" is what a start costs the workload, with
# the start guard, without it (a pod with on_failure: continue, served alike otherwise; the
# two pods take turns) and with the bare client. The guard alone (exec and checks, files
# present) is also timed on the host.
#
# RUNS passes (default 1) are made on one bed, one after another, each with its own table and
# verdicts; with more than one, a summary gives each run's figures, their spread, and the
# figures of all runs pooled with a bootstrap interval for the p99 ratio (a p99 of 200 is
# the third slowest delivery: one run's verdict on it is as noisy as the agent's slowest
# answers). Each run's data is kept in NII_BENCH_OUT/runR (default /tmp/nii-bench-e2e).
#
# NII_BENCH_BARE_ARGS: more flags for the bare client (examples/bare_fetch.rs), e.g. `--hold`
# to keep each container's subscription open until the container stops, as the daemon does,
# instead of dropping it after the first SVID.
#
#   tests/e2e/bench.sh [N] [RUNS]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/e2e/lib/bed.sh
. "$here/lib/bed.sh"
# shellcheck source=tests/e2e/lib/nii.sh
. "$here/lib/nii.sh"

n=${1:-50}
runs=${2:-1}
data=${NII_BENCH_OUT:-/tmp/nii-bench-e2e}
MODE=${NII_E2E_ATTESTATION:-pid}
trap 'nii_stop 2>/dev/null || true; bed_stop bare 2>/dev/null || true; bed_down $?' EXIT
nii_build
case $MODE in
pid)
	(cd "$NII_ROOT" && cargo build -q --release --example bare_fetch)
	BARE_BIN=${CARGO_TARGET_DIR:-$NII_ROOT/target}/release/examples/bare_fetch
	# The daemon's default level, as on a node (the bed's is debug); the delivery lines read
	# below are info. Selectors mode reads the selectors sent from the debug lines.
	export NII_LOG_LEVEL=${NII_LOG_LEVEL:-info}
	;;
selectors) nii_build_delegated_fetch >/dev/null ;;
*) echo "NII_E2E_ATTESTATION: pid or selectors" >&2 && exit 64 ;;
esac
bed_up
mkdir -p "$data"
# Only the runs of an earlier bench: NII_BENCH_OUT may name a directory that holds more.
rm -rf "$data"/run[0-9]*

ns() { date +%s%N; }
# Each pass puts its N containers in one pod: lift the per-pod identity limit above N.
export NRI_IDENTITY_MAX_IDENTITIES_PER_POD=$((n + 1))
load() { echo "$1 $(cut -d' ' -f1-3 /proc/loadavg)" >>"$E2E/load.txt"; }

# run_pass LABEL... : one pod per LABEL, N containers in each, created and started one after
# another, taking the pods in turn (so that load on the machine falls on all of them alike);
# records crictl start's latency and the time from crictl start to the workload's first
# instruction. The pod of label `noguard` sets `on_failure: continue`, which gets no start
# guard and is otherwise served the same. Leaves the directory of the first label's last
# container in LAST_DIR, the containers of the first label in PASS_CIDS, and those of each
# label in $E2E/cids-LABEL.
run_pass() {
	local label pod_uid cid i t first out
	local -A pods=() pids=() uids=()
	local -a cids=() starts=() labels=()
	for label in "$@"; do
		pod_uid=$(bed_uuid)
		uids[$label]=$pod_uid
		[[ $MODE != selectors ]] || kubelet_fake_add "$pod_uid" default
		if [[ $label == bare ]]; then
			# Served by the bare client only (its --pod-prefix): no annotation for the daemon.
			pods[$label]=$(bed_pod_json "bench-$label-$run" "$pod_uid")
		elif [[ $label == noguard ]]; then
			pods[$label]=$(bed_pod_json "bench-$label-$run" "$pod_uid" "$(nii_annotations identity.noderesource.dev/pod "$(nii_identity /var/certs 'on_failure: continue')")")
		else
			pods[$label]=$(bed_pod_json "bench-$label-$run" "$pod_uid" "$(nii_annotations identity.noderesource.dev/pod "$(nii_identity /var/certs)")")
		fi
		pids[$label]=$("$CRICTL" runp "${pods[$label]}")
		: >"$E2E/start-$label.ms"
		: >"$E2E/first-$label.ms"
		: >"$E2E/cids-$label"
	done
	for ((i = 0; i < n; i++)); do
		for label in "$@"; do
			cid=$("$CRICTL" create "${pids[$label]}" "$(E2E_CTR_IMAGE=$E2E_SCRATCH_IMAGE bed_ctr_json "b$i" /idcheck /var/certs)" "${pods[$label]}")
			t=$(ns)
			"$CRICTL" start "$cid" >/dev/null
			echo "$((($(ns) - t) / 1000))" >>"$E2E/start-$label.ms"
			cids+=("$cid")
			echo "$cid" >>"$E2E/cids-$label"
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

# keep RUN_DIR : moves the pass's figures into RUN_DIR, with the daemon's delivery lines of
# its containers (and, in PID mode, the bare client's lines of its containers).
keep() {
	mv "$E2E"/start-*.ms "$E2E"/first-*.ms "$E2E/load.txt" "$1/"
	sed 's/^/container_id=/' "$E2E/cids-daemon" | grep -F -f - "$E2E/logs/nii.log" | grep 'identity delivered' >"$1/daemon.log"
	if [[ $MODE == selectors ]]; then
		mv "$E2E/bare.ms" "$1/"
	else
		mv "$E2E/guard.ms" "$1/"
		sed 's/^/container=/' "$E2E/cids-bare" | grep -F -f - "$E2E/logs/bare.log" >"$1/bare.log"
	fi
}

if [[ $MODE == selectors ]]; then
	bed_wait_entry "$(bed_entry /bench k8s:ns:e2e k8s:sa:default)"
	kubelet_fake_up
	nii_start --kubelet-url "http://127.0.0.1:$KUBELET_FAKE_PORT"
else
	bed_wait_entry "$(bed_entry /bench unix:uid:1001)"
	nii_start
	read -ra bare_args <<<"${NII_BENCH_BARE_ARGS:-}"
	bed_spawn bare "$BARE_BIN" --socket "$NRI_SOCK" --agent "$ADMIN_SOCK" --pod-prefix bench-bare "${bare_args[@]}" >/dev/null
	bed_wait 30 "bare plugin registered" grep -q 'registered as.*10-bare-fetch' "$E2E_RUNTIME_LOG"
fi
for ((run = 1; run <= runs; run++)); do
	mkdir -p "$data/run$run"
	if [[ $MODE == selectors ]]; then
		load "daemon pass, before:"
		run_pass daemon
		load "daemon pass, after: "
		: >"$E2E/bare.ms"
		for cid in "${PASS_CIDS[@]}"; do bare_by_selectors "$cid"; done
	else
		# One pass, the daemon's containers and the bare client's taking turns, so that the
		# agent's and the machine's slow moments fall on both alike (two passes one after the
		# other compare two different tails).
		load "the pass, before:"
		run_pass daemon noguard bare
		load "the pass, after: "
		time_guard "$LAST_DIR"
	fi
	"$CRICTL" rmp -af >/dev/null
	keep "$data/run$run"
done
[[ $MODE == selectors ]] || bed_stop bare
nii_stop

# With discover_workload_path the agent hashes the executable of every process it attests on
# every call, the caller's (the daemon or the bare client) as well as the workload's: the
# difference in size between the two callers is a difference in the agent's answer time.
hashing=${E2E_UNIX_DISCOVER_WORKLOAD_PATH:-true}
sizes="daemon $(stat -c %s "$NII_BIN") bytes, bare client $(stat -c %s "${BARE_BIN:-/dev/null}") bytes"

python3 - "$data" "$n" "$runs" "$E2E_RUNTIME" "$MODE" "$hashing" "$sizes" <<'EOF'
import random, re, sys
out, n, runs, runtime, mode, hashing, sizes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]
FIELD = re.compile(r"\b(\w+)_ms=([0-9.]+)")
NAMES = ["workload_named", "stream_open", "first_svid", "bundle_ready", "checks", "jwt", "files_written", "reply"]
def phases(path):
    """The `<name>_ms=` fields of each line, one dict per delivery."""
    return [{k: float(v) for k, v in FIELD.findall(line)} for line in open(path) if line.strip()]
def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
def verdicts(d, b):
    return pct(d, 50) <= pct(b, 50) + 1, pct(d, 99) <= 1.2 * pct(b, 99)
def word(ok):
    return "met" if ok else "MISSED"

def report(run):
    """Prints one run's tables and verdicts; returns its deliveries, daemon's and bare's."""
    dir = f"{out}/run{run}"
    def us(name):
        return [float(x) / 1000 for x in open(f"{dir}/{name}") if x.strip()]
    dp = phases(f"{dir}/daemon.log")
    d = [x["elapsed"] for x in dp]
    if mode == "selectors":
        b = [float(x) for x in open(f"{dir}/bare.ms") if x.strip()]
        bp = [{"elapsed": x} for x in b]
    else:
        bp = phases(f"{dir}/bare.log")
        b = [x["elapsed"] for x in bp]
    assert len(d) == n and len(b) == n, (len(d), len(b))
    title = f" (run {run} of {runs})" if runs > 1 else ""
    if mode == "selectors":
        print(f"{runtime}, selectors mode: CreateContainer, {n} containers{title} (ms)     p50      p99")
        print(f"  daemon (kubelet list + selectors + fetch + files)    {pct(d,50):7.2f}  {pct(d,99):7.2f}")
        print(f"  bare fetch by the same selectors                     {pct(b,50):7.2f}  {pct(b,99):7.2f}")
        print(f"  ratio daemon / bare                                  {pct(d,50)/pct(b,50):7.2f}  {pct(d,99)/pct(b,99):7.2f}")
        for what, label in (("crictl start", "start"), ("crictl start -> first instruction", "first")):
            v = us(f"{label}-daemon.ms")
            print(f"  {what + ', daemon':<53}{pct(v,50):7.2f}  {pct(v,99):7.2f}")
    else:
        print(f"{runtime}, StartContainer, {n} containers each{title} (ms)        p50      p99")
        print(f"  daemon (fetch + checks + files)           {pct(d,50):7.2f}  {pct(d,99):7.2f}")
        print(f"  bare Delegated Identity fetch             {pct(b,50):7.2f}  {pct(b,99):7.2f}")
        print(f"  ratio daemon / bare                       {pct(d,50)/pct(b,50):7.2f}  {pct(d,99)/pct(b,99):7.2f}")
        for what, label in (("crictl start", "start"), ("crictl start -> first instruction", "first")):
            for kind, name in (("daemon, start guard", "daemon"), ("daemon, no guard", "noguard"), ("bare", "bare")):
                v = us(f"{label}-{name}.ms")
                print(f"  {what + ', ' + kind:<42}{pct(v,50):7.2f}  {pct(v,99):7.2f}")
        g = us("guard.ms")
        print(f"  the guard alone (exec + checks, on the host) {pct(g,50):4.2f}  {pct(g,99):7.2f}")

    # Where the time goes: each phase of each delivery as the daemon logged it, next to the
    # bare client's. The p50s of the phases do not add up to the total's p50; the means do.
    print(f"\nphases of a first delivery, {n} each (ms)  daemon p50     p99    mean |  bare p50     p99    mean")
    def cells(rows, k):
        v = [r[k] for r in rows if k in r]
        if not v or len(v) < len(rows):
            return f"{'-':>7}  {'-':>6}  {'-':>6}"
        return f"{pct(v,50):7.3f}  {pct(v,99):6.2f}  {sum(v)/len(v):6.3f}"
    for k in NAMES + ["elapsed"]:
        label = "total (event to answer)" if k == "elapsed" else k
        print(f"  {label:<37}{cells(dp, k)} | {cells(bp, k)}")
    # The agent's answer (the subscription accepted and its first SVID), and what is left: the
    # daemon's own work, the part of the gap that is in its hands.
    for rows in (dp, bp):
        for r in rows:
            if "stream_open" in r:
                r["answer"] = r["stream_open"] + r.get("first_svid", 0)
    for r in dp:
        r["own"] = r["elapsed"] - r["answer"]
    print(f"  {'agent answer (open + first SVID)':<37}{cells(dp, 'answer')} | {cells(bp, 'answer')}")
    print(f"  {'own work (total - agent answer)':<37}{cells(dp, 'own')} | {cells([], 'own')}")
    # The tail: the slowest deliveries (those at and above the p99), phase by phase, so that a
    # missed p99 shows whether the agent's answer or the daemon's own work was slow.
    slowest = sorted(dp, key=lambda r: r["elapsed"])[-max(2, n - int(round(0.99 * (n - 1)))):]
    print(f"  slowest {len(slowest)}: " + "; ".join(
        f"{r['elapsed']:.2f} = " + " + ".join(f"{k} {r[k]:.2f}" for k in NAMES if r.get(k, 0) >= 0.1)
        for r in reversed(slowest)))
    gap = max(abs(sum(r.get(k, 0) for k in NAMES) - r["elapsed"]) for r in dp)
    print(f"  phases vs total: largest difference {gap:.3f} ms (rounding of the logged values)")
    if hashing == "true":
        print(f"  the agent's unix attestor hashes each caller's executable per call (discover_workload_path): {sizes}")
    else:
        print(f"  the agent's unix attestor hashes no executable (E2E_UNIX_DISCOVER_WORKLOAD_PATH=false)")
    for line in open(f"{dir}/load.txt"):
        print(f"  load average (1, 5, 15 min), {line.strip()}")
    p50_ok, p99_ok = verdicts(d, b)
    print(f"  target p50: daemon <= bare + 1 ms ({pct(d,50):.2f} vs {pct(b,50):.2f} + 1): {word(p50_ok)}")
    print(f"  target p99: daemon <= 1.2 x bare ({pct(d,99):.2f} vs 1.2 x {pct(b,99):.2f}): {word(p99_ok)}")
    return d, b, dp, bp

results = []
for run in range(1, runs + 1):
    if run > 1:
        print()
    results.append(report(run))
if runs > 1:
    # Each run's verdicts, their spread, and all runs pooled. The interval is that of the
    # pooled p99 ratio over resamples of both sides' deliveries: how far the tail's own noise
    # alone moves it.
    print(f"\n{f'{runs} runs of {n} per side (ms)':<34}daemon p50     p99 |  bare p50     p99 | p50 gap  p99 ratio | p50  p99")
    for i, (d, b, _, _) in enumerate(results, 1):
        p50_ok, p99_ok = verdicts(d, b)
        print(f"  {f'run {i}':<32}{pct(d,50):10.2f} {pct(d,99):7.2f} | {pct(b,50):9.2f} {pct(b,99):7.2f} |"
              f" {pct(d,50)-pct(b,50):+7.2f} {pct(d,99)/pct(b,99):10.2f} | {word(p50_ok):<4} {word(p99_ok)}")
    gaps = [pct(r[0], 50) - pct(r[1], 50) for r in results]
    ratios = [pct(r[0], 99) / pct(r[1], 99) for r in results]
    met = [verdicts(r[0], r[1]) for r in results]
    print(f"  spread: p50 gap {min(gaps):+.2f}..{max(gaps):+.2f} ms, p99 ratio {min(ratios):.2f}..{max(ratios):.2f};"
          f" p50 met in {sum(m[0] for m in met)} of {runs}, p99 met in {sum(m[1] for m in met)} of {runs}")
    d = [x for r in results for x in r[0]]
    b = [x for r in results for x in r[1]]
    rng = random.Random(1)
    boot = sorted(pct(rng.choices(d, k=len(d)), 99) / pct(rng.choices(b, k=len(b)), 99) for _ in range(1000))
    p50_ok, p99_ok = verdicts(d, b)
    print(f"  {f'all runs pooled ({len(d)} each)':<32}{pct(d,50):10.2f} {pct(d,99):7.2f} | {pct(b,50):9.2f} {pct(b,99):7.2f} |"
          f" {pct(d,50)-pct(b,50):+7.2f} {pct(d,99)/pct(b,99):10.2f} | {word(p50_ok):<4} {word(p99_ok)}")
    print(f"  pooled p99 ratio, 95 % bootstrap interval (1,000 resamples): {pct(boot,2.5):.2f}..{pct(boot,97.5):.2f}")
    if mode != "selectors":
        def pooled(side, k):
            return [r[k] for run in results for r in run[side]]
        da, ba, own = pooled(2, "answer"), pooled(3, "answer"), pooled(2, "own")
        print(f"  {'pooled, agent answer':<32}{pct(da,50):10.2f} {pct(da,99):7.2f} | {pct(ba,50):9.2f} {pct(ba,99):7.2f}")
        label = "pooled, daemon's own work"
        print(f"  {label:<32}{pct(own,50):10.2f} {pct(own,99):7.2f}")
        # A p99 rests on a handful of deliveries; how often the agent is slow does not.
        slow = 2 * pct(ba, 50)
        print(f"  agent answers slower than {slow:.2f} ms (2 x bare p50): daemon {sum(x > slow for x in da)}"
              f" of {len(da)}, bare {sum(x > slow for x in ba)} of {len(ba)}")
print(f"\ndata: {out}/run1..run{runs}")
EOF
