#!/usr/bin/env bash
# Smoke test of the end-to-end bed itself, with no NRI plugin attached: the
# runtime (containerd, or CRI-O with E2E_RUNTIME=cri-o) runs a host-network pod
# and a uid-1001 busybox container from the locally imported images, SPIRE
# issues an identity for uid 1001, and the teardown leaves nothing behind.
# Exits non-zero on any failure.
#
# NII_SMOKE_FAIL=1 fails on purpose with a pod and a container still running,
# to prove that teardown after a failure is complete too.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/e2e/lib/bed.sh
. "$here/lib/bed.sh"

t_start=$(_bed_ms)
step() { printf 'smoke: %-48s %s\n' "$1" "$(_bed_since "$2")"; }
fail() {
	printf 'smoke: FAIL: %s\n' "$*" >&2
	exit 1
}

# Teardown runs on every exit (success, failure, ^C); the run only passes if
# the bed is also verifiably gone afterwards.
finish() {
	local rc=$?
	trap - EXIT
	bed_down "$rc" || rc=1
	if [[ -n ${E2E:-} ]]; then
		bed_check_clean || rc=1
	fi
	if ((rc == 0)); then
		printf 'smoke: PASS in %s\n' "$(_bed_since "$t_start")"
	else
		printf 'smoke: FAILED (status %d) after %s\n' "$rc" "$(_bed_since "$t_start")" >&2
	fi
	exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

t=$(_bed_ms)
bed_up
step "bed_up (build check, $E2E_RUNTIME, images, SPIRE)" "$t"

# --- the runtime: pod + container as uid 1001 -------------------------------
t=$(_bed_ms)
pod_json=$(bed_pod_json smoke "$(bed_uuid)" '{"e2e.example/smoke": "true"}')
pod_id=$("$CRICTL" runp "$pod_json")
step "runp (host network, pinned pause image)" "$t"

ctr_json=$(bed_ctr_json idu sh -c 'id -u')
t=$(_bed_ms)
cid=$("$CRICTL" create "$pod_id" "$ctr_json" "$pod_json")
step "create of 'id -u' container" "$t"
t=$(_bed_ms)
"$CRICTL" start "$cid" >/dev/null
step "start" "$t"
bed_wait_exited "$cid" 30 || fail "container idu did not exit"

code=$("$CRICTL" inspect -o go-template --template '{{.status.exitCode}}' "$cid")
out=$("$CRICTL" logs "$cid" 2>&1)
[[ $code == 0 ]] || fail "container exited with $code: $out"
[[ $out == 1001 ]] || fail "container printed '$out', expected 1001"
echo "smoke: container ran as uid $out (exit $code)"

# A running container, left for teardown to deal with.
sleeper=$("$CRICTL" create "$pod_id" "$(bed_ctr_json sleeper sleep 3600)" "$pod_json")
"$CRICTL" start "$sleeper" >/dev/null
[[ $(bed_ctr_state "$sleeper") == CONTAINER_RUNNING ]] || fail "sleeper is not running"

if [[ ${NII_SMOKE_FAIL:-0} == 1 ]]; then
	fail "injected failure (NII_SMOKE_FAIL=1) with pod $pod_id still running"
fi

# --- SPIRE: an entry for uid 1001 reaches the agent ---------------------------
t=$(_bed_ms)
eid=$(bed_entry /smoke unix:uid:1001)
bed_wait_entry "$eid"
step "entry unix:uid:1001 created and synced to agent" "$t"

"$SPIRE_AGENT" healthcheck -socketPath "$AGENT_SOCK" >/dev/null || fail "agent unhealthy"
echo "smoke: spire-agent healthy"
# Captured first: `| grep -q` would stop reading at the match, and the
# server's SIGPIPE on its next line would fail the pipeline (pipefail).
out=$("$SPIRE_SERVER" entry show -spiffeID "spiffe://$E2E_TD/smoke")
grep -q "^Entry ID *: *$eid\$" <<<"$out" || fail "entry $eid not listed by spire-server entry show: $out"
echo "smoke: spire-server lists entry $eid"

# The Workload API hands that identity to a uid-1001 process on the host.
t=$(_bed_ms)
svid=$(setpriv --reuid=1001 --regid=1001 --clear-groups \
	"$SPIRE_AGENT" api fetch x509 -socketPath "$AGENT_SOCK" -timeout 10s 2>&1) ||
	fail "uid 1001 could not fetch an X.509 SVID: $svid"
grep -q "spiffe://$E2E_TD/smoke" <<<"$svid" || fail "unexpected SVID: $svid"
step "uid 1001 fetched spiffe://$E2E_TD/smoke" "$t"

# --- restarts: containers outlive the runtime; the agent keeps its identity -
t=$(_bed_ms)
bed_restart_runtime
[[ $(bed_ctr_state "$sleeper") == CONTAINER_RUNNING ]] || fail "sleeper did not survive the $E2E_RUNTIME restart"
out=$("$CRICTL" exec -s "$sleeper" id -u)
[[ $out == 1001 ]] || fail "exec in sleeper printed '$out', expected 1001"
step "$E2E_RUNTIME restarted, sleeper still running" "$t"

t=$(_bed_ms)
bed_restart_agent
bed_wait_entry "$eid"
svid=$(setpriv --reuid=1001 --regid=1001 --clear-groups \
	"$SPIRE_AGENT" api fetch x509 -socketPath "$AGENT_SOCK" -timeout 10s 2>&1) ||
	fail "uid 1001 could not fetch an X.509 SVID after the agent restart: $svid"
step "spire-agent restarted without a new join token" "$t"

# The admin socket exists apart from the public one (Delegated Identity API).
[[ -S $ADMIN_SOCK ]] || fail "no admin socket at $ADMIN_SOCK"
echo "smoke: admin socket at $ADMIN_SOCK, NRI socket at $NRI_SOCK"
