#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 15: the smoke `make test` runs) and prints
# per target: executions, coverage (edges "cov", features "ft"), corpus size, and whether it
# found anything. JOBS targets run at a time (default 1), niced.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# Bounds that make a run fail: a panic or sanitizer report (crash), one input running over
# TIMEOUT seconds (hang), one allocation over MALLOC_MB or the process over RSS_MB. Findings
# land in fuzz/artifacts/<target>/; the growing corpus in fuzz/corpus/<target>/ (neither is
# committed; fuzz/seeds/<target>/ is).
set -euo pipefail

cd "$(dirname "$0")"
SECONDS_EACH=${1:-15}
shift || true
ALL=(annotation annotation_structured nri_frames nri_session kubelet_http kubelet_pods spire_response spire_jwt broker_response spire_der guard_files config)
TARGETS=("$@")
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=("${ALL[@]}")
JOBS=${JOBS:-1}
TIMEOUT=${TIMEOUT:-10}
MALLOC_MB=${MALLOC_MB:-64}
RSS_MB=${RSS_MB:-2048}
TRIPLE=x86_64-unknown-linux-gnu
# The sanitized builds of the dependencies are kept with the peers the e2e beds build, so a
# fresh clone compiles only this repository's crates (a cold build of everything takes several
# minutes on two cores). FUZZ_TARGET_DIR=fuzz/target keeps it inside the checkout.
FUZZ_TARGET_DIR=${FUZZ_TARGET_DIR:-${NII_CACHE:-/var/cache/nri-identity-injector}/fuzz-target}
export PATH="$HOME/.cargo/bin:$PATH"

dict_of() {
	case $1 in
	annotation | annotation_structured) echo dict/annotation.dict ;;
	nri_frames | nri_session) echo dict/nri.dict ;;
	kubelet_http) echo dict/http.dict ;;
	kubelet_pods | spire_jwt) echo dict/json.dict ;;
	spire_response | broker_response | spire_der | guard_files) echo dict/der.dict ;;
	config) echo dict/config.dict ;;
	*) return 1 ;;
	esac
}

if ! command -v cargo-fuzz >/dev/null; then
	cargo install --locked cargo-fuzz
fi
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
started=$(date +%s)
nice cargo +nightly fuzz build --target-dir "$FUZZ_TARGET_DIR" >build.log 2>&1 || {
	tail -40 build.log
	exit 1
}
echo "fuzz build: $(($(date +%s) - started)) s"

mkdir -p logs
# FRESH=1 (the smoke): start from the seeds alone, in a corpus thrown away afterwards, so the
# smoke takes the same time however much a long run has grown corpus/ (reading thousands of
# units under the sanitizer alone takes longer than a smoke's seconds).
corpus_base=corpus
if [[ ${FRESH:-0} == 1 ]]; then
	corpus_base=$(mktemp -d)
	trap 'rm -rf "$corpus_base"' EXIT
fi
run_one() {
	local t=$1 corpus=$corpus_base/$1 seeds=seeds/$1 log=logs/$1.log dict
	dict=$(dict_of "$t")
	mkdir -p "$corpus" "artifacts/$t" "$seeds"
	set +e
	nice "$FUZZ_TARGET_DIR/$TRIPLE/release/$t" "$corpus" "$seeds" \
		-dict="$dict" \
		-max_total_time="$SECONDS_EACH" \
		-timeout="$TIMEOUT" \
		-malloc_limit_mb="$MALLOC_MB" \
		-rss_limit_mb="$RSS_MB" \
		-max_len=65536 \
		-print_final_stats=1 \
		-artifact_prefix="artifacts/$t/" \
		>"$log" 2>&1
	echo $? >"logs/$t.rc"
	set -e
}

running=0
for t in "${TARGETS[@]}"; do
	dict_of "$t" >/dev/null || {
		echo "unknown target $t" >&2
		exit 2
	}
	run_one "$t" &
	running=$((running + 1))
	if ((running >= JOBS)); then
		wait -n || true
		running=$((running - 1))
	fi
done
wait || true

failed=0
printf '%-22s %12s %8s %8s %8s  %s\n' target executions cov ft corpus result
for t in "${TARGETS[@]}"; do
	log=logs/$t.log
	rc=$(cat "logs/$t.rc")
	execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
	last=$(grep -E '^#[0-9]+' "$log" | tail -1)
	cov=$(grep -o 'cov: [0-9]*' <<<"$last" | grep -o '[0-9]*' || echo '?')
	ft=$(grep -o 'ft: [0-9]*' <<<"$last" | grep -o '[0-9]*' || echo '?')
	corp=$(grep -o 'corp: [0-9]*' <<<"$last" | grep -o '[0-9]*' || echo '?')
	if [[ $rc == 0 ]]; then
		result=clean
	else
		result="FAILED (exit $rc): $(grep -m1 -E 'ERROR: libFuzzer|panicked at|ERROR: AddressSanitizer|==[0-9]+== ERROR' "$log" | cut -c1-120)"
		failed=1
	fi
	printf '%-22s %12s %8s %8s %8s  %s\n' "$t" "$execs" "$cov" "$ft" "$corp" "$result"
done
echo "total: $(($(date +%s) - started)) s"
exit "$failed"
