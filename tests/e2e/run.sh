#!/usr/bin/env bash
# End-to-end scenarios: the daemon on a real runtime (containerd, or CRI-O with
# E2E_RUNTIME=cri-o) + runc + crictl + SPIRE. Each scenario asserts and prints its timings;
# the last line is "N passed, M failed". Every scenario runs on both runtimes.
#
#   tests/e2e/run.sh [SCENARIO...]     (default: all; names as in the list below)
#
# Needs root. Builds what it needs (tests/e2e/lib/build.sh, cargo), caches Go builds.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/e2e/lib/bed.sh
. "$here/lib/bed.sh"
# shellcheck source=tests/e2e/lib/nii.sh
. "$here/lib/nii.sh"

CHECK='if [ -f /var/certs/svid.pem ]; then echo "svid exists!"; else echo "svid does NOT exist."; fi'

# start_ctr POD_ID CTR_JSON POD_JSON : create+start; sets CID and START_MS (crictl start
# latency). Not called through $(...), so the variables reach the caller.
start_ctr() {
	local t
	CID=$("$CRICTL" create "$1" "$2" "$3") || return 1
	t=$(nii_ms)
	"$CRICTL" start "$CID" >/dev/null || return 1
	START_MS=$(($(nii_ms) - t))
}

logs_of() { "$CRICTL" logs "$1" 2>&1; }

# refused_start POD CONTAINER : the daemon's reason if it failed the container's NRI
# StartContainer (CRI-O only logs that and starts the container anyway).
refused_start() {
	grep -F "failing the start" "$E2E/logs/nii.log" | grep -F "pod e2e/$1 container $2:" | tail -1 | sed 's/.*error=//'
}

# --- 1. the design proposal's pod --------------------------------------------
scenario_proposal() {
	local e0 e1 pod_uid ann pod pid c0 c1 c2 d0 d1 id
	e0=$(bed_entry /c0 unix:uid:1001)
	e1=$(bed_entry /c1 unix:uid:1002)
	bed_wait_entry "$e0" "$e1"
	pod_uid=$(bed_uuid)
	# c1 leaves out svid_file_name: the default svid.pem applies.
	ann=$(nii_annotations \
		identity.noderesource.dev/container.c0 "$(nii_identity /var/certs)" \
		identity.noderesource.dev/container.c1 "$(printf 'spire_agent_address: %s\ncert_dir: /var/certs\nsvid_key_file_name: svid_key.pem\n' "$ADMIN_SOCK")")
	pod=$(bed_pod_json proposal "$pod_uid" "$ann")
	pid=$("$CRICTL" runp "$pod")
	start_ctr "$pid" "$(E2E_CTR_UID=1001 bed_ctr_json c0 sh -c "$CHECK; cat /var/certs/svid_key.pem >/dev/null && echo key-readable-by-\$(id -u)")" "$pod"
	c0=$CID
	note "c0: crictl start ${START_MS} ms, daemon StartContainer $(nii_delivered_ms "$c0") ms"
	start_ctr "$pid" "$(E2E_CTR_UID=1002 bed_ctr_json c1 sh -c "$CHECK")" "$pod"
	c1=$CID
	note "c1: crictl start ${START_MS} ms, daemon StartContainer $(nii_delivered_ms "$c1") ms"
	start_ctr "$pid" "$(bed_ctr_json c2 sh -c "$CHECK")" "$pod"
	c2=$CID
	note "c2: crictl start ${START_MS} ms (not annotated)"
	for c in "$c0" "$c1" "$c2"; do bed_wait_exited "$c" 30 || fail "container $c did not exit"; done
	[[ $(logs_of "$c0") == *"svid exists!"* ]] || fail "c0 printed: $(logs_of "$c0")"
	[[ $(logs_of "$c0") == *"key-readable-by-1001"* ]] || fail "c0 (uid 1001) cannot read its key: $(logs_of "$c0")"
	[[ $(logs_of "$c1") == *"svid exists!"* ]] || fail "c1 printed: $(logs_of "$c1")"
	[[ $(logs_of "$c2") == *"svid does NOT exist."* ]] || fail "c2 printed: $(logs_of "$c2")"
	note "c0: $(logs_of "$c0" | tr '\n' ' ')| c1: $(logs_of "$c1") | c2: $(logs_of "$c2")"
	d0=$(nii_dir "$pod_uid" "$c0")
	d1=$(nii_dir "$pod_uid" "$c1")
	id=$(nii_spiffe_id "$d0/svid.pem")
	[[ $id == "spiffe://$E2E_TD/c0" ]] || fail "c0 has $id"
	id=$(nii_spiffe_id "$d1/svid.pem")
	[[ $id == "spiffe://$E2E_TD/c1" ]] || fail "c1 has $id"
	for d in "$d0" "$d1"; do
		nii_pair_matches "$d" || fail "key and certificate differ in $d"
		openssl verify -CAfile "$d/svid_bundle.pem" "$d/svid.pem" >/dev/null || fail "the bundle does not verify $d/svid.pem"
	done
	[[ $(stat -c '%u %a' "$d0/svid_key.pem") == "1001 600" ]] || fail "c0 key is $(stat -c '%u %a' "$d0/svid_key.pem")"
	[[ ! -e $(nii_dir "$pod_uid" "$c2") ]] || fail "c2 got a directory"
	"$CRICTL" inspect "$c0" | grep -q '"destination": "/var/certs"' || fail "no /var/certs mount in c0's OCI spec"
	note "c0 = spiffe://$E2E_TD/c0, c1 = spiffe://$E2E_TD/c1; keys match, bundle verifies, key 0600 owned by 1001"
	"$CRICTL" stopp "$pid" >/dev/null && "$CRICTL" rmp "$pid" >/dev/null
}

# --- 1b. which selectors name the workload at StartContainer -----------------
scenario_selectors() {
	local e pod_uid pod pid cid err
	# At StartContainer the PID is runc's init: already the container's uid, not yet the
	# workload's binary. A path selector names runc, so this entry never matches.
	e=$(bed_entry /by-path unix:uid:1003 unix:path:/bin/busybox)
	bed_wait_entry "$e"
	pod_uid=$(bed_uuid)
	pod=$(bed_pod_json bypath "$pod_uid" "$(nii_annotations identity.noderesource.dev/pod "$(nii_identity /var/certs)")")
	pid=$("$CRICTL" runp "$pod")
	cid=$("$CRICTL" create "$pid" "$(E2E_CTR_UID=1003 bed_ctr_json bypath sh -c "$CHECK")" "$pod")
	if err=$("$CRICTL" start "$cid" 2>&1); then
		bed_wait_exited "$cid" 10 || true
		note "it ran and printed: $(logs_of "$cid")"
		err=$(refused_start bypath bypath)
		[[ -z $err ]] || fail "$E2E_RUNTIME started it although the daemon failed the start: $err"
		fail "a unix:path entry matched at StartContainer"
	fi
	[[ $err == *"no registration entry"* ]] || fail "unexpected error: $err"
	note "unix:path:/bin/busybox does not match at StartContainer (the process is runc init): start refused"
	bed_rmp "$pid"
}

# --- 2. rotation, 4. daemon restart, 6. agent restart -------------------------
scenario_rotation() {
	local e pod_uid pod pid cid dir s0 s1 s2 s3 t
	# A 20 s TTL: the agent re-mints at half-life, about every 10 s.
	e=$(bed_entry /rotating unix:uid:1004 -- -x509SVIDTTL 20)
	bed_wait_entry "$e"
	pod_uid=$(bed_uuid)
	pod=$(bed_pod_json rotating "$pod_uid" "$(nii_annotations identity.noderesource.dev/container.r "$(nii_identity /var/certs)")")
	pid=$("$CRICTL" runp "$pod")
	# The workload re-reads its files; the host checks every version it sees.
	start_ctr "$pid" "$(E2E_CTR_UID=1004 bed_ctr_json r sh -c 'while true; do sha256sum /var/certs/svid.pem; sleep 0.5; done')" "$pod"
	cid=$CID
	dir=$(nii_dir "$pod_uid" "$cid")
	s0=$(nii_serial "$dir")
	t=$(nii_ms)
	bed_wait 40 "rotation" bash -c "[[ \$(openssl x509 -in '$dir/svid.pem' -noout -serial | cut -d= -f2) != '$s0' ]]"
	note "rotation seen after $(($(nii_ms) - t)) ms"
	bed_wait 5 "matching pair after rotation" nii_pair_matches "$dir"
	s1=$(nii_serial "$dir")

	# 4. Daemon restart while the pod runs: rotation continues.
	nii_stop
	nii_start
	t=$(nii_ms)
	bed_wait 40 "rotation after a daemon restart" bash -c "[[ \$(openssl x509 -in '$dir/svid.pem' -noout -serial | cut -d= -f2) != '$s1' ]]"
	note "daemon restarted; next rotation after $(($(nii_ms) - t)) ms"
	bed_wait 5 "matching pair" nii_pair_matches "$dir"
	s2=$(nii_serial "$dir")

	# 6. SPIRE agent restart: the files stay; updates resume (the restarted agent mints anew).
	bed_restart_agent
	[[ -s $dir/svid.pem && -s $dir/svid_key.pem ]] || fail "files gone after the agent restart"
	t=$(nii_ms)
	bed_wait 40 "update after an agent restart" bash -c "[[ \$(openssl x509 -in '$dir/svid.pem' -noout -serial | cut -d= -f2) != '$s2' ]]"
	note "agent restarted; files kept; update after $(($(nii_ms) - t)) ms"
	bed_wait 5 "matching pair" nii_pair_matches "$dir"
	s3=$(nii_serial "$dir")
	[[ $s3 != "$s2" ]] || fail "no new certificate"
	note "the workload saw $("$CRICTL" logs "$cid" 2>&1 | awk '{print $1}' | sort -u | wc -l) certificate versions"

	# 3. Removal: the directory goes and the daemon holds no stream for it.
	"$CRICTL" stop -t 1 "$cid" >/dev/null
	"$CRICTL" rm "$cid" >/dev/null
	[[ ! -e $dir ]] || fail "$dir still exists after removal"
	bed_wait 5 "no active identities" bash -c "[[ \$(curl -fsS http://$NII_HTTP/metrics | awk '\$1==\"nri_identity_active_identities\"{print \$2}') == 0 ]]"
	note "removed: directory gone, active identities 0"
	bed_rmp "$pid"
	[[ ! -e $NII_ARTIFACTS/$pod_uid ]] || fail "pod directory left behind"
}

# --- 5. runtime restart -------------------------------------------------------
scenario_runtime_restart() {
	local e pod_uid pod pid cid t
	bed_restart_runtime
	t=$(nii_ms)
	bed_wait 30 "re-registration" grep -q 'registered as.*10-identity-injector' "$E2E_RUNTIME_LOG"
	bed_wait 30 "daemon ready again" curl -fsS -o /dev/null "http://$NII_HTTP/readyz"
	note "daemon re-registered $(($(nii_ms) - t)) ms after $E2E_RUNTIME came back"
	e=$(bed_entry /after-restart unix:uid:1005)
	bed_wait_entry "$e"
	pod_uid=$(bed_uuid)
	pod=$(bed_pod_json afterrestart "$pod_uid" "$(nii_annotations identity.noderesource.dev/pod "$(nii_identity /var/certs)")")
	pid=$("$CRICTL" runp "$pod")
	start_ctr "$pid" "$(E2E_CTR_UID=1005 bed_ctr_json ar sh -c "$CHECK")" "$pod"
	cid=$CID
	bed_wait_exited "$cid" 30
	[[ $(logs_of "$cid") == *"svid exists!"* ]] || fail "new pod after the $E2E_RUNTIME restart: $(logs_of "$cid")"
	note "a new pod got its identity (crictl start ${START_MS} ms)"
	bed_rmp "$pid"
}

# --- 7. hostile annotations ---------------------------------------------------
scenario_hostile() {
	local value field pod_uid pod pid err
	while IFS='|' read -r value field; do
		pod_uid=$(bed_uuid)
		pod=$(bed_pod_json evil "$pod_uid" "$(nii_annotations identity.noderesource.dev/container.c0 "$(printf '%b' "$value")")")
		pid=$("$CRICTL" runp "$pod")
		if err=$("$CRICTL" create "$pid" "$(bed_ctr_json c0 sh -c "$CHECK")" "$pod" 2>&1); then
			fail "created with '$value'"
		fi
		[[ $err == *"$field"* && $err == *"e2e/evil"* && $err == *"c0"* ]] || fail "error does not name pod, container and $field: $err"
		[[ ! -e $NII_ARTIFACTS/$pod_uid ]] || fail "something was written for '$value'"
		note "refused ($field): ${err##*nri-identity-injector: }"
		bed_rmp "$pid"
	done <<-EOF
		cert_dir: /|cert_dir
		cert_dir: /var/certs\nsvid_file_name: ../x|svid_file_name
		cert_dir: /var/certs\nspire_agent_address: /run/containerd/containerd.sock|spire_agent_address
		cert_dir: /proc/self|cert_dir
	EOF
}

# --- 8. agent down ------------------------------------------------------------
scenario_agent_down() {
	local e pod_uid pod pid cid err t dir
	e=$(bed_entry /agent-down unix:uid:1006)
	bed_wait_entry "$e"
	bed_stop spire-agent 30
	pod_uid=$(bed_uuid)
	pod=$(bed_pod_json down "$pod_uid" "$(nii_annotations \
		identity.noderesource.dev/container.strict "$(nii_identity /var/certs)" \
		identity.noderesource.dev/container.lenient "$(nii_identity /var/certs 'on_failure: continue')")")
	pid=$("$CRICTL" runp "$pod")
	cid=$("$CRICTL" create "$pid" "$(E2E_CTR_UID=1006 bed_ctr_json strict sh -c "$CHECK")" "$pod")
	t=$(nii_ms)
	if err=$("$CRICTL" start "$cid" 2>&1); then
		bed_wait_exited "$cid" 10 || true
		note "it ran and printed: $(logs_of "$cid")"
		err=$(refused_start down strict)
		[[ -z $err ]] || fail "started without an agent: $E2E_RUNTIME ignored the daemon's refusal: $err"
		fail "started without an agent"
	fi
	note "default policy: start refused after $(($(nii_ms) - t)) ms: ${err##*nri-identity-injector: }"
	[[ $err == *"SPIRE agent"* ]] || fail "unclear error: $err"
	start_ctr "$pid" "$(E2E_CTR_UID=1006 bed_ctr_json lenient sh -c 'while [ ! -f /var/certs/svid.pem ]; do sleep 0.2; done; echo "identity arrived"; sleep 3600')" "$pod"
	cid=$CID
	note "on_failure: continue: started in ${START_MS} ms without identity"
	_bed_rotate_log spire-agent
	_bed_start_agent
	dir=$(nii_dir "$pod_uid" "$cid")
	bed_wait 40 "identity after the agent is back" test -s "$dir/svid.pem"
	bed_wait 10 "workload saw it" bash -c "$CRICTL logs $cid 2>&1 | grep -q 'identity arrived'"
	note "identity delivered once the agent was back"
	bed_rmp "$pid"
}

# --- 9. the start guard: the daemon away between CreateContainer and StartContainer -----
# guarded_pod NAME : a pod whose containers are all annotated; sets POD, POD_UID, PID.
guarded_pod() {
	POD_UID=$(bed_uuid)
	POD=$(bed_pod_json "$1" "$POD_UID" "$(nii_annotations identity.noderesource.dev/pod "$(nii_identity /var/certs)")")
	PID=$("$CRICTL" runp "$POD")
}

# held CID : the container runs (its start succeeded) but its workload has written nothing.
held() { [[ $(bed_ctr_state "$1") == CONTAINER_RUNNING && -z $(logs_of "$1") ]]; }

scenario_guard_restart() {
	local e cid t
	e=$(bed_entry /guarded unix:uid:1007)
	bed_wait_entry "$e"
	guarded_pod guarded
	cid=$("$CRICTL" create "$PID" "$(E2E_CTR_UID=1007 bed_ctr_json g sh -c "echo first-instruction; $CHECK")" "$POD")
	[[ $("$CRICTL" inspect "$cid") == *'"startContainer"'* ]] || fail "no startContainer hook in the OCI spec"
	# CreateContainer returned; the daemon goes away before StartContainer.
	nii_stop
	t=$(nii_ms)
	"$CRICTL" start "$cid" >/dev/null || fail "crictl start failed without the daemon"
	note "daemon stopped after CreateContainer; crictl start succeeded in $(($(nii_ms) - t)) ms"
	sleep 3
	held "$cid" || fail "the workload ran without the daemon: $(bed_ctr_state "$cid") $(logs_of "$cid")"
	note "3 s later the container runs, held by its guard; the workload has printed nothing"
	t=$(nii_ms)
	nii_start
	bed_wait_exited "$cid" 30 || fail "not released after the daemon came back"
	note "daemon back; workload released $(($(nii_ms) - t)) ms after the daemon was started"
	[[ $(logs_of "$cid") == $'first-instruction\nsvid exists!' ]] || fail "workload printed: $(logs_of "$cid")"
	[[ $(bed_ctr_exit_code "$cid") == 0 ]] || fail "exit code $(bed_ctr_exit_code "$cid")"
	[[ $(grep "container_id=$cid" "$E2E/logs/nii.log") == *'resuming identity maintenance'* ]] || fail "not resumed from Synchronize"
	note "its first instruction saw the files: $(logs_of "$cid" | tr '\n' ' ')"
	bed_rmp "$PID"
}

scenario_guard_timeout() {
	local e cid log message
	e=$(bed_entry /guarded-timeout unix:uid:1007)
	bed_wait_entry "$e"
	nii_restart NRI_IDENTITY_START_GUARD_TIMEOUT_MS=3000
	guarded_pod guardtimeout
	# Kubernetes' termination message file, as the kubelet would mount it and name it.
	log=$E2E/termination-log-$POD_UID
	: >"$log"
	chmod 0666 "$log"
	cid=$("$CRICTL" create "$PID" "$(E2E_CTR_UID=1007 E2E_CTR_EXTRA="$(printf '{"annotations": {"io.kubernetes.container.terminationMessagePath": "/dev/termination-log"}, "mounts": [{"container_path": "/dev/termination-log", "host_path": "%s"}]}' "$log")" \
		bed_ctr_json g sh -c "echo first-instruction; $CHECK")" "$POD")
	nii_stop
	"$CRICTL" start "$cid" >/dev/null || fail "crictl start failed without the daemon"
	bed_wait_exited "$cid" 30 || fail "the guard did not give up"
	[[ $(bed_ctr_exit_code "$cid") != 0 ]] || fail "exit code 0"
	[[ $(logs_of "$cid") != *first-instruction* ]] || fail "the workload ran: $(logs_of "$cid")"
	message=$(logs_of "$cid")
	for part in "pod e2e/guardtimeout container g" "/var/certs" "missing svid.pem, svid_key.pem, svid_bundle.pem"; do
		[[ $message == *"$part"* ]] || fail "the log does not say $part: $message"
	done
	[[ $(cat "$log") == *"missing svid.pem"* ]] || fail "termination message: $(cat "$log")"
	note "daemon away past the guard's 3 s: exit code $(bed_ctr_exit_code "$cid"), workload never ran"
	note "container log: ${message:0:400}"
	note "termination message: $(head -c 200 "$log")"
	bed_rmp "$PID"
	nii_restart
}

scenario_scratch() {
	local e c1 c2
	e=$(bed_entry /scratch unix:uid:1008)
	bed_wait_entry "$e"
	guarded_pod scratch
	# FROM scratch, read-only root file system: nothing of the guard comes from the image.
	ctr() { E2E_CTR_UID=1008 E2E_CTR_IMAGE=$E2E_SCRATCH_IMAGE E2E_CTR_READONLY=1 bed_ctr_json "$1" /idcheck /var/certs; }
	start_ctr "$PID" "$(ctr g)" "$POD"
	c1=$CID
	bed_wait_exited "$c1" 30
	[[ $(logs_of "$c1") == *"svid exists!"*"key-readable-by-1008"* ]] || fail "scratch workload printed: $(logs_of "$c1")"
	note "daemon up: crictl start ${START_MS} ms; $(logs_of "$c1" | tail -n +2 | tr '\n' ' ')"
	c2=$("$CRICTL" create "$PID" "$(ctr g2)" "$POD")
	nii_stop
	"$CRICTL" start "$c2" >/dev/null || fail "crictl start failed without the daemon"
	sleep 2
	held "$c2" || fail "the scratch workload ran without the daemon: $(logs_of "$c2")"
	nii_start
	bed_wait_exited "$c2" 30
	[[ $(logs_of "$c2") == *"svid exists!"*"key-readable-by-1008"* ]] || fail "after the daemon came back: $(logs_of "$c2")"
	note "daemon away at start: held, then released with its files: $(logs_of "$c2" | tail -n +2 | tr '\n' ' ')"
	bed_rmp "$PID"
}

# --- 10. churn: pods created and started one after another while the daemon is SIGKILLed
# and restarted and the agent restarted; no workload may ever run without its files --------
scenario_churn() {
	local n=${NII_CHURN_PODS:-50} e i pod pid cid kills=0 uid=1009 bg ok=0 without=0 refused=0 guarded=0 t0 t restarts=0
	local -a cids=() pids=()
	e=$(bed_entry /churn unix:uid:$uid)
	bed_wait_entry "$e"
	t0=$(nii_ms)
	for ((i = 0; i < n; i++)); do
		pod=$(bed_pod_json "churn$i" "$(bed_uuid)" "$(nii_annotations identity.noderesource.dev/pod "$(nii_identity /var/certs)")")
		pid=$("$CRICTL" runp "$pod")
		pids+=("$pid")
		cid=$("$CRICTL" create "$pid" "$(E2E_CTR_UID=$uid bed_ctr_json "w$i" sh -c "$CHECK")" "$pod")
		cids+=("$cid")
		case $((i % 8)) in
		3)
			# Between CreateContainer and StartContainer.
			nii_kill
			kills=$((kills + 1))
			"$CRICTL" start "$cid" >/dev/null 2>&1 || true
			t=$(nii_ms)
			nii_start
			restarts=$((restarts + $(nii_ms) - t))
			;;
		6)
			# During StartContainer.
			"$CRICTL" start "$cid" >/dev/null 2>&1 &
			bg=$!
			sleep "0.0$((RANDOM % 3))"
			nii_kill
			kills=$((kills + 1))
			wait "$bg" 2>/dev/null || true
			t=$(nii_ms)
			nii_start
			restarts=$((restarts + $(nii_ms) - t))
			;;
		*)
			"$CRICTL" start "$cid" >/dev/null 2>&1 || true
			;;
		esac
		if ((i == n / 2)); then
			# The agent restarts while pods keep coming.
			bed_restart_agent >/dev/null 2>&1 &
			bg=$!
		fi
	done
	wait "$bg" || fail "agent restart"
	for cid in "${cids[@]}"; do
		if [[ $(bed_ctr_state "$cid") == CONTAINER_CREATED ]]; then
			refused=$((refused + 1)) # the start was refused: fail-closed
			continue
		fi
		bed_wait_exited "$cid" 90 || fail "$cid did not finish"
		case $(logs_of "$cid") in
		*"svid does NOT exist."*) without=$((without + 1)) ;;
		*"svid exists!"*) ok=$((ok + 1)) ;;
		*"nri-identity-injector guard:"*) guarded=$((guarded + 1)) ;;
		*) refused=$((refused + 1)) ;;
		esac
	done
	note "$n pods in $(($(nii_ms) - t0)) ms (of which $restarts ms restarting the daemon), daemon SIGKILLed $kills times (before and during StartContainer), agent restarted once"
	note "ran with their files: $ok; ran WITHOUT: $without; start refused: $refused; stopped by the guard: $guarded"
	((without == 0)) || fail "$without workloads ran without their files"
	((ok + refused + guarded == n)) || fail "unaccounted containers"
	for pid in "${pids[@]}"; do bed_rmp "$pid" 2>/dev/null || true; done
}

ALL=(proposal selectors rotation runtime_restart hostile agent_down guard_restart guard_timeout scratch churn)
(($#)) || set -- "${ALL[@]}"

trap 'nii_finish e2e' EXIT
trap 'exit 130' INT TERM

t0=$(nii_ms)
nii_build
bed_up
nii_start
echo "e2e: bed ($E2E_RUNTIME) and daemon up in $(($(nii_ms) - t0)) ms"
nii_scenarios "$@"
