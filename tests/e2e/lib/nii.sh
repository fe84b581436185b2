# shellcheck shell=bash
# The daemon under test on the bed (source after bed.sh): build it, start it against the
# bed's NRI socket and SPIRE admin socket, and helpers to drive annotated pods.

_NII_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NII_ROOT=$(cd "$_NII_LIB/../../.." && pwd)
NII_PROFILE=${NII_PROFILE:-release}

# nii_build : cargo build of the daemon (release by default: timings are reported).
nii_build() {
	if [[ $NII_PROFILE == release ]]; then
		# The shipped binary (`make release`): static, for an explicit target.
		(cd "$NII_ROOT" && RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release \
			--target x86_64-unknown-linux-gnu -p nri-identity-injector --bin nri-identity-injector) || return 1
		NII_BIN=${CARGO_TARGET_DIR:-$NII_ROOT/target}/x86_64-unknown-linux-gnu/release/nri-identity-injector
	else
		(cd "$NII_ROOT" && cargo build -q -p nri-identity-injector --bin nri-identity-injector) || return 1
		NII_BIN=${CARGO_TARGET_DIR:-$NII_ROOT/target}/debug/nri-identity-injector
	fi
	export NII_BIN
}

# nii_build_identity_check : the workload-side checker (tools/identity-check), static like the
# shipped binary so it runs in any container or VM guest; sets NII_IDENTITY_CHECK.
nii_build_identity_check() {
	(cd "$NII_ROOT" && RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release \
		--target x86_64-unknown-linux-gnu -p nii-identity-check --bin identity-check) || return 1
	NII_IDENTITY_CHECK=${CARGO_TARGET_DIR:-$NII_ROOT/target}/x86_64-unknown-linux-gnu/release/identity-check
	export NII_IDENTITY_CHECK
}

# nii_places : choose (once per bed) the artifact root and the HTTP address, so that a
# daemon started in a subshell leaves its caller with the right ones.
nii_places() {
	NII_ARTIFACTS=${NII_ARTIFACTS:-$E2E/artifacts}
	NII_HTTP=${NII_HTTP:-127.0.0.1:$(_bed_free_port)}
	nii_source_sock
	export NII_ARTIFACTS NII_HTTP
}

# nii_source_sock : NII_SOURCE_SOCK, the socket annotations name as spire_agent_address: the
# agent's admin socket (Delegated Identity API), or with E2E_BROKER=1 its broker endpoint.
nii_source_sock() {
	if [[ ${E2E_BROKER:-0} == 1 ]]; then
		NII_SOURCE_SOCK=$BROKER_SOCK
	else
		NII_SOURCE_SOCK=$ADMIN_SOCK
	fi
	export NII_SOURCE_SOCK
}

# nii_start [EXTRA-ARGS...] : start the daemon and wait until /readyz says ready
# (registered with containerd, the agent answers, and the kubelet if one is configured).
nii_start() {
	nii_places
	# On a node the artifact root lives under /run, a tmpfs: keys never reach a disk and
	# fsync costs nothing. This host's /run is on ext4, so give the bed its own tmpfs
	# (bed_down unmounts everything under $E2E).
	if ! mountpoint -q "$NII_ARTIFACTS"; then
		mkdir -p "$NII_ARTIFACTS"
		mount -t tmpfs -o size=64m,mode=0700 nii-artifacts "$NII_ARTIFACTS"
	fi
	_bed_rotate_log nii
	# E2E_BROKER=1: the Broker API source, the daemon's own SVID from the Workload API (its
	# entry, unix:uid:0, serves both APIs).
	local source=()
	if [[ ${E2E_BROKER:-0} == 1 ]]; then
		source=(env NRI_IDENTITY_IDENTITY_API=broker "NRI_IDENTITY_BROKER_SOCKET=$BROKER_SOCK"
			"NRI_IDENTITY_WORKLOAD_API_SOCKET=$AGENT_SOCK")
	fi
	bed_spawn nii "${source[@]}" "$NII_BIN" run \
		--nri-socket "$NRI_SOCK" \
		--agent-socket "$ADMIN_SOCK" \
		--artifact-root "$NII_ARTIFACTS" \
		--http-address "$NII_HTTP" \
		--log-level "${NII_LOG_LEVEL:-nri_identity_injector=debug,nri_plugin=info,info}" \
		"$@" >/dev/null
	# NII_WAIT=healthz: only wait for the process to serve (a daemon meant not to be ready).
	bed_wait 30 "daemon ${NII_WAIT:-readyz}" curl -fsS -o /dev/null "http://$NII_HTTP/${NII_WAIT:-readyz}"
}

nii_stop() { bed_stop nii 15; }

# nii_kill : SIGKILL the daemon (no draining, no goodbye to the runtime) and forget it.
nii_kill() {
	local pid
	if pid=$(bed_pid nii); then
		kill -KILL "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	fi
	bed_stop nii
}

# nii_restart [VAR=VALUE...] [-- EXTRA-ARGS...] : stop the daemon if it runs, then start it
# with those environment variables (NRI_IDENTITY_*, NII_WAIT) and arguments.
nii_restart() {
	if bed_pid nii >/dev/null; then nii_stop; fi
	nii_places
	(
		while (($#)) && [[ $1 != -- ]]; do
			export "${1?}"
			shift
		done
		(($#)) && shift
		nii_start "$@"
	)
}

# nii_metric NAME : the value of a metric line (first match).
nii_metric() {
	curl -fsS "http://$NII_HTTP/metrics" | awk -v m="$1" '$1 == m { print $2; exit }'
}

# nii_annotations KEY VALUE [KEY VALUE...] : a JSON object for bed_pod_json.
nii_annotations() {
	python3 -c 'import json, sys; a = sys.argv[1:]; print(json.dumps(dict(zip(a[::2], a[1::2]))))' "$@"
}

# nii_identity CERT_DIR [EXTRA-YAML-LINES...] : the design proposal's annotation value.
nii_identity() {
	local dir=$1
	shift
	printf -- '- spire_agent_address: %s\n  cert_dir: %s\n  svid_file_name: svid.pem\n  svid_key_file_name: svid_key.pem\n  svid_bundle_file_name: svid_bundle.pem\n' "${NII_SOURCE_SOCK:-$ADMIN_SOCK}" "$dir"
	local line
	for line in "$@"; do printf '  %s\n' "$line"; done
}

# nii_dir POD_UID CID : the container's directory on the host.
nii_dir() { echo "$NII_ARTIFACTS/$1/$2"; }

# nii_spiffe_id CERT_PEM : the URI SAN of a certificate.
nii_spiffe_id() {
	openssl x509 -in "$1" -noout -ext subjectAltName 2>/dev/null | grep -o 'URI:spiffe://[^, ]*' | head -1 | cut -c5-
}

# nii_pair_matches DIR : the key in DIR belongs to the leaf certificate in DIR.
nii_pair_matches() {
	local a b
	a=$(openssl x509 -in "$1/svid.pem" -noout -pubkey 2>/dev/null) || return 1
	b=$(openssl pkey -in "$1/svid_key.pem" -pubout 2>/dev/null) || return 1
	[[ -n $a && $a == "$b" ]]
}

# nii_serial DIR : the leaf certificate's serial number.
nii_serial() { openssl x509 -in "$1/svid.pem" -noout -serial 2>/dev/null | cut -d= -f2; }

# nii_delivered_ms CID : the daemon's own time from StartContainer to files on disk.
nii_delivered_ms() {
	grep "container_id=$1" "$E2E/logs/nii.log" | grep -m1 'identity delivered' | grep -o 'elapsed_ms=[0-9.]*' | cut -d= -f2
}

# nii_ms : milliseconds since the epoch.
nii_ms() { date +%s%3N; }

# nii_selectors_sent CID : the selectors the daemon derived for a container (its debug log).
nii_selectors_sent() {
	grep "container_id=$1" "$E2E/logs/nii.log" | grep -m1 'derived selectors' |
		grep -o 'selectors=\[.*\]' | tr -d '[]"' | sed 's/^selectors=//; s/, /\n/g' | sort
}

# nii_selectors_attested CID : the k8s selectors SPIRE's attestor produces for the container's PID.
nii_selectors_attested() {
	local pid
	pid=$("$CRICTL" inspect -o go-template --template '{{.info.pid}}' "$1")
	"$NII_DELEGATED_FETCH" -socket "$ADMIN_SOCK" -pid "$pid" -timeout 30s >/dev/null 2>&1 || true
	grep -F "msg=\"PID attested to have selectors\" pid=$pid " "$E2E/logs/spire-agent.log" | tail -1 |
		grep -o 'type:\\"k8s\\" value:\\"[^\\]*' | sed 's/.*value:\\"/k8s:/' | sort -u
}

# --- a fake kubelet --------------------------------------------------------------------------

# kubelet_fake_up : a stand-in for the kubelet's read-only port (lib/fake_kubelet.py) on a free
# port, KUBELET_FAKE_PORT, serving KUBELET_FAKE_PODS (stopped by bed_down). For selectors mode
# on pods made with crictl: the daemon needs what only the kubelet knows (the service account).
kubelet_fake_up() {
	KUBELET_FAKE_PODS=$E2E/kubelet-pods.json
	KUBELET_FAKE_PORT=$(_bed_free_port)
	export KUBELET_FAKE_PODS KUBELET_FAKE_PORT
	echo '{"kind": "PodList", "items": []}' >"$KUBELET_FAKE_PODS"
	bed_spawn fake-kubelet python3 "$_NII_LIB/fake_kubelet.py" "$KUBELET_FAKE_PORT" "$KUBELET_FAKE_PODS" >/dev/null
	bed_wait 10 "fake kubelet" curl -fsS -o /dev/null "http://127.0.0.1:$KUBELET_FAKE_PORT/pods"
}

# kubelet_fake_add POD_UID SERVICE_ACCOUNT : the pod joins the fake kubelet's list.
kubelet_fake_add() {
	python3 - "$KUBELET_FAKE_PODS" "$1" "$2" <<'EOF'
import json, os, sys
path, uid, sa = sys.argv[1:]
with open(path) as f:
    pods = json.load(f)
pods["items"].append({"metadata": {"uid": uid, "labels": {}},
                      "spec": {"serviceAccountName": sa, "nodeName": "node-1"}})
with open(path + ".tmp", "w") as f:
    json.dump(pods, f)
os.rename(path + ".tmp", path)
EOF
}

# --- running scenarios --------------------------------------------------------------------

# note TEXT : a result line of a scenario. fail TEXT : a failed check (errexit ends the
# scenario).
note() { printf '  %s\n' "$*"; }
fail() {
	printf '  FAIL: %s\n' "$*" >&2
	return 1
}
NII_PASSED=0
NII_FAILED=0
NII_FAILURES=()

# nii_scenarios NAME... : runs scenario_NAME for each, in a subshell with errexit (a plain
# statement, not a condition: only there does errexit apply inside the subshell), and counts.
nii_scenarios() {
	local s t rc opts=$-
	for s in "$@"; do
		echo "--- $s"
		t=$(nii_ms)
		# A subshell under `||` would run without errexit: turn it off around the
		# subshell instead, and back on only if the caller had it.
		set +e
		(
			set -e
			"scenario_$s"
		)
		rc=$?
		if [[ $opts == *e* ]]; then
			set -e
		fi
		if ((rc == 0)); then
			NII_PASSED=$((NII_PASSED + 1))
			echo "PASS $s ($(($(nii_ms) - t)) ms)"
		else
			NII_FAILED=$((NII_FAILED + 1))
			NII_FAILURES+=("$s")
			echo "FAIL $s ($(($(nii_ms) - t)) ms)"
			# Suites without a bed (openshift.sh) have no daemon log.
			if [[ -n ${E2E:-} && -f $E2E/logs/nii.log ]]; then
				tail -20 "$E2E/logs/nii.log" | sed 's/^/  nii| /' | cut -c1-300
			fi
		fi
	done
}

# nii_finish LABEL [STATUS] : the EXIT trap of a scenario script: stops the daemon, tears the
# bed down, checks the host is clean, and prints the closing "N passed, M failed" line. STATUS
# (default: the status the script is exiting with) is for traps that do more first.
nii_finish() {
	local rc=$? label=$1
	rc=${2:-$rc}
	trap - EXIT
	nii_stop 2>/dev/null || true
	# A failed scenario keeps the bed's logs too, not only a failed script.
	bed_down "$((rc != 0 ? rc : NII_FAILED != 0))" || true
	if [[ -n ${E2E:-} ]] && ! bed_check_clean; then
		echo "$label: the bed was not left clean" >&2
		NII_FAILED=$((NII_FAILED + 1))
	fi
	((${#NII_FAILURES[@]} == 0)) || printf '%s: failed: %s\n' "$label" "${NII_FAILURES[*]}"
	echo "$label: $NII_PASSED passed, $NII_FAILED failed"
	((NII_FAILED == 0 && rc == 0)) || exit 1
}
