#!/usr/bin/env bash
# End-to-end scenarios: the daemon on a real runtime (containerd, or CRI-O with
# E2E_RUNTIME=cri-o) + runc + crictl + SPIRE. Each scenario asserts and prints its timings;
# the last line is "N passed, M failed". Every scenario runs on both runtimes.
#
#   tests/e2e/run.sh [SCENARIO...]     (default: all; names as in the list below)
#
# How workloads are named, NII_E2E_ATTESTATION:
# - pid (default): the agent attests the container's init process at StartContainer (entries
#   keyed by unix:uid), the start guard holding the workload until its files are in place
#   (which is what makes PID mode fail-closed on CRI-O, which only logs an error answered to
#   StartContainer and starts the container anyway);
# - selectors: the daemon names the container by the k8s selectors it derives and delivers
#   inside CreateContainer, whose errors every runtime enforces (entries keyed by k8s:ns +
#   k8s:container-name, the pods' service accounts from a fake kubelet,
#   lib/fake_kubelet.py: crictl pods have no real one). The start-guard scenarios do not
#   apply (no guard is added).
# Scenarios whose expectations differ between the modes or runtimes say why where they branch.
#
# Needs root. Builds what it needs (tests/e2e/lib/build.sh, cargo), caches Go builds.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/e2e/lib/bed.sh
. "$here/lib/bed.sh"
# shellcheck source=tests/e2e/lib/nii.sh
. "$here/lib/nii.sh"

CHECK='if [ -f /var/certs/svid.pem ]; then echo "svid exists!"; else echo "svid does NOT exist."; fi'

MODE=${NII_E2E_ATTESTATION:-pid}
case $MODE in
pid) DELIVERY=StartContainer ;;
selectors) DELIVERY=CreateContainer ;;
*) echo "NII_E2E_ATTESTATION: pid or selectors" >&2 && exit 64 ;;
esac
# The daemon's arguments for the mode (nii_start, nii_restart).
NII_ARGS=()

# entry SPIFFE-PATH CONTAINER UID [SELECTOR...] [-- EXTRA...] : a workload entry naming the
# container the way the mode can: by its uid (PID mode: the agent's unix attestor looks at the
# process) or by its namespace and container name (selectors mode: what the daemon derives).
# Further selectors are added as given; prints the entry ID.
entry() {
	local path=$1 name=$2 uid=$3
	shift 3
	case $MODE in
	pid) bed_entry "$path" "unix:uid:$uid" "$@" ;;
	selectors) bed_entry "$path" k8s:ns:e2e "k8s:container-name:$name" "$@" ;;
	esac
}

# pod_json NAME UID [ANNOTATIONS-JSON] : bed_pod_json; in selectors mode the pod also joins
# the fake kubelet's list (service account "default", as the kubelet would give it).
pod_json() {
	[[ $MODE != selectors ]] || kubelet_fake_add "$2" default
	bed_pod_json "$@"
}

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
	e0=$(entry /c0 c0 1001)
	e1=$(entry /c1 c1 1002)
	bed_wait_entry "$e0" "$e1"
	pod_uid=$(bed_uuid)
	# c1 leaves out svid_file_name: the default svid.pem applies.
	ann=$(nii_annotations \
		identity.noderesource.dev/container.c0 "$(nii_identity /var/certs)" \
		identity.noderesource.dev/container.c1 "$(printf 'spire_agent_address: %s\ncert_dir: /var/certs\nsvid_key_file_name: svid_key.pem\n' "$NII_SOURCE_SOCK")")
	pod=$(pod_json proposal "$pod_uid" "$ann")
	pid=$("$CRICTL" runp "$pod")
	start_ctr "$pid" "$(E2E_CTR_UID=1001 bed_ctr_json c0 sh -c "$CHECK; cat /var/certs/svid_key.pem >/dev/null && echo key-readable-by-\$(id -u)")" "$pod"
	c0=$CID
	note "c0: crictl start ${START_MS} ms, daemon $DELIVERY $(nii_delivered_ms "$c0") ms"
	start_ctr "$pid" "$(E2E_CTR_UID=1002 bed_ctr_json c1 sh -c "$CHECK")" "$pod"
	c1=$CID
	note "c1: crictl start ${START_MS} ms, daemon $DELIVERY $(nii_delivered_ms "$c1") ms"
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

# --- 1b. which selectors name the workload -----------------------------------
scenario_selectors() {
	local e pod_uid pod pid cid err
	pod_uid=$(bed_uuid)
	pod=$(pod_json bypath "$pod_uid" "$(nii_annotations identity.noderesource.dev/pod "$(nii_identity /var/certs)")")
	pid=$("$CRICTL" runp "$pod")
	if [[ $MODE == selectors ]]; then
		# The daemon sends the k8s selectors it derives, never a unix one: an entry that also
		# needs unix:path is never matched, and the container is refused at CreateContainer,
		# before it exists.
		e=$(entry /by-path bypath 1003 unix:path:/bin/busybox)
		bed_wait_entry "$e"
		if cid=$("$CRICTL" create "$pid" "$(E2E_CTR_UID=1003 bed_ctr_json bypath sh -c "$CHECK")" "$pod" 2>&1); then
			fail "created although no entry matches the selectors the daemon sends: $cid"
		fi
		err=$cid
		[[ $err == *"no registration entry"* ]] || fail "unexpected error: $err"
		[[ -z $("$CRICTL" ps -aq --pod "$pid") ]] || fail "a container exists"
		note "an entry needing unix:path never matches the derived selectors: refused at CreateContainer: ${err##*nri-identity-injector: }"
		bed_rmp "$pid"
		return 0
	fi
	# At StartContainer the PID is runc's init: already the container's uid, not yet the
	# workload's binary. A path selector names runc, so this entry never matches.
	e=$(entry /by-path bypath 1003 unix:path:/bin/busybox)
	bed_wait_entry "$e"
	cid=$("$CRICTL" create "$pid" "$(E2E_CTR_UID=1003 bed_ctr_json bypath sh -c "$CHECK")" "$pod")
	if err=$("$CRICTL" start "$cid" 2>&1); then
		held_by_guard bypath bypath "$cid" || fail "a unix:path entry matched at StartContainer"
		err=$(refused_start bypath bypath)
	fi
	[[ $err == *"no registration entry"* ]] || fail "unexpected error: $err"
	note "unix:path:/bin/busybox does not match at StartContainer (the process is runc init): start refused"
	bed_rmp "$pid"
}

# held_by_guard POD CONTAINER CID : after a start that succeeded although the daemon failed
# it: on a runtime that ignores StartContainer errors (CRI-O), the container runs but its
# start guard holds the workload (it has printed nothing 3 s later); anywhere else that start
# should have failed. Says what happened.
held_by_guard() {
	local err
	err=$(refused_start "$1" "$2")
	if [[ $E2E_RUNTIME != cri-o ]]; then
		bed_wait_exited "$3" 10 || true
		note "it ran and printed: $(logs_of "$3")"
		[[ -z $err ]] || fail "$E2E_RUNTIME started it although the daemon failed the start: $err"
		return 1
	fi
	[[ -n $err ]] || { note "the daemon did not fail the start" && return 1; }
	sleep 3
	held "$3" || fail "$E2E_RUNTIME ignored the daemon's refusal and the workload ran: $(bed_ctr_state "$3") $(logs_of "$3")"
	note "$E2E_RUNTIME started the container despite the daemon's refusal (it only logs it); 3 s later the start guard still holds the workload"
}

# --- 2. rotation, 4. daemon restart, 6. agent restart -------------------------
scenario_rotation() {
	local e pod_uid pod pid cid dir s0 s1 s2 s3 t
	# A 20 s TTL: the agent re-mints at half-life, about every 10 s.
	e=$(entry /rotating r 1004 -- -x509SVIDTTL 20)
	bed_wait_entry "$e"
	pod_uid=$(bed_uuid)
	pod=$(pod_json rotating "$pod_uid" "$(nii_annotations identity.noderesource.dev/container.r "$(nii_identity /var/certs)")")
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
	nii_start "${NII_ARGS[@]}"
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
	e=$(entry /after-restart ar 1005)
	bed_wait_entry "$e"
	pod_uid=$(bed_uuid)
	pod=$(pod_json afterrestart "$pod_uid" "$(nii_annotations identity.noderesource.dev/pod "$(nii_identity /var/certs)")")
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
		pod=$(pod_json evil "$pod_uid" "$(nii_annotations identity.noderesource.dev/container.c0 "$(printf '%b' "$value")")")
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
	local e=() pod_uid pod pid cid err t dir held=""
	e+=("$(entry /agent-down strict 1006)")
	# Selectors name each container by its name; in PID mode the one uid names both.
	[[ $MODE == pid ]] || e+=("$(entry /agent-down lenient 1006)")
	bed_wait_entry "${e[@]}"
	bed_stop spire-agent 30
	pod_uid=$(bed_uuid)
	pod=$(pod_json down "$pod_uid" "$(nii_annotations \
		identity.noderesource.dev/container.strict "$(nii_identity /var/certs)" \
		identity.noderesource.dev/container.lenient "$(nii_identity /var/certs 'on_failure: continue')")")
	pid=$("$CRICTL" runp "$pod")
	t=$(nii_ms)
	if [[ $MODE == selectors ]]; then
		# Delivered inside CreateContainer: the container is never created.
		if err=$("$CRICTL" create "$pid" "$(E2E_CTR_UID=1006 bed_ctr_json strict sh -c "$CHECK")" "$pod" 2>&1); then
			"$CRICTL" start "$err" >/dev/null 2>&1 || true
			bed_wait_exited "$err" 10 || true
			note "it ran and printed: $(logs_of "$err")"
			fail "created without an agent"
		fi
		[[ -z $("$CRICTL" ps -aq --pod "$pid" --name strict) ]] || fail "a strict container exists"
		note "default policy: creation refused after $(($(nii_ms) - t)) ms: ${err##*nri-identity-injector: }"
	else
		cid=$("$CRICTL" create "$pid" "$(E2E_CTR_UID=1006 bed_ctr_json strict sh -c "$CHECK")" "$pod")
		if err=$("$CRICTL" start "$cid" 2>&1); then
			held_by_guard down strict "$cid" || fail "started without an agent"
			err=$(refused_start down strict)
			held=$cid
		fi
		note "default policy: start refused after $(($(nii_ms) - t)) ms: ${err##*nri-identity-injector: }"
	fi
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
	if [[ -n $held ]]; then
		# Started despite the refusal (CRI-O) and held: the daemon kept trying, so the workload
		# is released with its files.
		bed_wait_exited "$held" 40 || fail "the held container was not released"
		[[ $(logs_of "$held") == "svid exists!" ]] || fail "the held workload printed: $(logs_of "$held")"
		note "the held strict container was released once the agent was back: $(logs_of "$held")"
	fi
	bed_rmp "$pid"
}

# --- 11. SELinux labels on the host directory and files --------------------------
# label_of PATH : the security.selinux attribute, or "none".
label_of() {
	python3 -c 'import os, sys
try:
    print(os.getxattr(sys.argv[1], "security.selinux").rstrip(b"\0").decode())
except OSError:
    print("none")' "$1"
}

# labels_are DIR LABEL : the directory and each of its identity files carry LABEL.
labels_are() {
	local f got
	for f in "$1" "$1/svid.pem" "$1/svid_key.pem" "$1/svid_bundle.pem"; do
		got=$(label_of "$f")
		[[ $got == "$2" ]] || fail "$f is labelled $got, not $2"
	done
}

# state_dir : where the bed's runtime keeps its state (the daemon's runtime_state_dir):
# CRI-O's storage runroot, containerd's state directory.
state_dir() {
	case $E2E_RUNTIME in
	cri-o) echo "$E2E/crio/run" ;;
	containerd) echo "$E2E/containerd/state" ;;
	esac
}

# sandbox_spec SANDBOX-ID : where the runtime keeps the sandbox's OCI configuration, written
# out here as the runtime does (the daemon's own idea of it is its backend's).
sandbox_spec() {
	case $E2E_RUNTIME in
	cri-o) echo "$(state_dir)/overlay-containers/$1/userdata/config.json" ;;
	containerd) echo "$(state_dir)/io.containerd.runtime.v2.task/k8s.io/$1/config.json" ;;
	esac
}

# label_pod NAME LEVEL : a pod with one annotated container `lbl` that checks its files;
# LEVEL (e.g. s0:c1,c2), if not empty, is written into the sandbox's OCI configuration as the
# mount label the runtime would have computed on a host with SELinux (this host has none, so
# the runtime writes no mount label). Sets DIR, LBL_POD.
label_pod() {
	local name=$1 level=$2 pod_uid pod spec
	pod_uid=$(bed_uuid)
	pod=$(pod_json "$name" "$pod_uid" "$(nii_annotations identity.noderesource.dev/pod "$(nii_identity /var/certs)")")
	LBL_POD=$("$CRICTL" runp "$pod")
	spec=$(sandbox_spec "$LBL_POD")
	[[ -f $spec ]] || fail "$E2E_RUNTIME keeps no sandbox configuration at $spec"
	python3 - "$spec" "$level" <<'EOF' || fail "$spec"
import json, sys
path, level = sys.argv[1:]
with open(path) as f:
    spec = json.load(f)
linux = spec.setdefault("linux", {})
assert not linux.get("mountLabel"), f"a mount label on a host without SELinux: {linux['mountLabel']}"
if level:
    linux["mountLabel"] = "system_u:object_r:container_file_t:" + level
    with open(path, "w") as f:
        json.dump(spec, f)
EOF
	start_ctr "$LBL_POD" "$(E2E_CTR_UID=1007 bed_ctr_json lbl sh -c "$CHECK")" "$pod"
	bed_wait_exited "$CID" 30
	[[ $(logs_of "$CID") == *"svid exists!"* ]] || fail "lbl printed: $(logs_of "$CID")"
	DIR=$(nii_dir "$pod_uid" "$CID")
}

scenario_labels() {
	local e
	e=$(entry /labels lbl 1007)
	bed_wait_entry "$e"
	# auto: this host has no SELinux, so no label.
	label_pod lbl-auto ""
	labels_are "$DIR" none
	note "auto (no SELinux here): no label"
	bed_rmp "$LBL_POD"

	nii_restart NRI_IDENTITY_SELINUX_LABEL=shared -- "${NII_ARGS[@]}"
	label_pod lbl-shared ""
	labels_are "$DIR" system_u:object_r:container_file_t:s0
	note "shared: directory and files system_u:object_r:container_file_t:s0"
	bed_rmp "$LBL_POD"

	nii_restart NRI_IDENTITY_SELINUX_LABEL=private NRI_IDENTITY_RUNTIME_STATE_DIR="$(state_dir)" -- "${NII_ARGS[@]}"
	grep -q 'selinux_label=private policy=private' "$E2E/logs/nii.log" || fail "no startup line for the private choice"
	label_pod lbl-private s0:c123,c456
	labels_are "$DIR" system_u:object_r:container_file_t:s0:c123,c456
	note "private: the pod's level from $(sandbox_spec "$LBL_POD" | sed "s|$E2E|\$E2E|")"
	bed_rmp "$LBL_POD"
	# A pod the runtime gave no level (SELinux off in the runtime, as here): the shared one.
	label_pod lbl-private-none ""
	labels_are "$DIR" system_u:object_r:container_file_t:s0
	note "private, sandbox without a mount label: container_file_t:s0"
	bed_rmp "$LBL_POD"
	nii_restart -- "${NII_ARGS[@]}"
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


# --- 11. deployment mistakes on the agent: the daemon missing from authorized_delegates, or
# without a registration entry of its own -------------------------------------------------
readyz() { curl -s "http://$NII_HTTP/readyz"; }

# unready_because REASON : /readyz answers 503 and names REASON (the metric says it too).
unready_because() {
	[[ $(curl -s -o /dev/null -w '%{http_code}' "http://$NII_HTTP/readyz") == 503 ]] &&
		[[ $(readyz) == *"agent: not ready ($1)"* ]] &&
		[[ $(nii_metric "nri_identity_agent_refusal{reason=\"$1\"}") == 1 ]]
}

# refused_with POD_ID POD_JSON POD_NAME NAME UID : a container whose start the daemon must
# refuse; prints the daemon's reason (on either runtime: CRI-O only logs it).
refused_with() {
	local cid err
	cid=$("$CRICTL" create "$1" "$(E2E_CTR_UID=$5 bed_ctr_json "$4" sh -c "$CHECK")" "$2") || return 1
	if err=$("$CRICTL" start "$cid" 2>&1); then
		err=$(refused_start "$3" "$4")
		[[ -n $err ]] || { fail "$4 started although the agent refuses the daemon" && return 1; }
	fi
	echo "$err"
}

# refused_by_agent REASON LOG_RE ERR_GLOB POD_ID POD_JSON POD_NAME NAME UID : the agent was
# just set up wrongly: the daemon turns unready naming REASON, logs a line matching LOG_RE, and
# refuses a start with a message matching the pattern ERR_GLOB.
refused_by_agent() {
	local reason=$1 log_re=$2 err_glob=$3 t err
	t=$(nii_ms)
	bed_wait 30 "not ready: $reason" unready_because "$reason"
	note "$reason: unready after $(($(nii_ms) - t)) ms: $(readyz | grep agent | cut -c1-160)..."
	grep -q "not ready: the SPIRE agent refuses the daemon.*$log_re.*reason=\"\\?$reason" "$E2E/logs/nii.log" ||
		fail "no log line naming the mistake"
	err=$(refused_with "$4" "$5" "$6" "$7" "$8")
	# shellcheck disable=SC2053 # ERR_GLOB is a pattern
	[[ $err == $err_glob ]] || fail "start refused with: $err"
	note "start refused: ${err##*nri-identity-injector: }"
}

# served_again WHAT POD_ID POD_JSON NAME UID : the mistake was just mended: the daemon turns
# ready again by itself and a new container of the pod gets its identity.
served_again() {
	local t
	t=$(nii_ms)
	bed_wait 30 "ready again" curl -fsS -o /dev/null "http://$NII_HTTP/readyz"
	note "$1: ready again $(($(nii_ms) - t)) ms after, without restarting the daemon"
	start_ctr "$2" "$(E2E_CTR_UID=$5 bed_ctr_json "$4" sh -c "$CHECK")" "$3"
	bed_wait_exited "$CID" 30
	[[ $(logs_of "$CID") == *"svid exists!"* ]] || fail "after the fix: $(logs_of "$CID")"
}

scenario_delegate_mistakes() {
	local e pod_uid pod pid own
	e=$(bed_entry /mistakes unix:uid:1010)
	bed_wait_entry "$e"
	pod_uid=$(bed_uuid)
	pod=$(bed_pod_json mistakes "$pod_uid" "$(nii_annotations identity.noderesource.dev/pod "$(nii_identity /var/certs)")")
	pid=$("$CRICTL" runp "$pod")

	# The daemon's SPIFFE ID missing from the agent's authorized_delegates.
	sed -i "s|authorized_delegates = \[\"$E2E_DELEGATE_ID\"\]|authorized_delegates = [\"spiffe://$E2E_TD/someone-else\"]|" "$E2E/spire/agent.conf"
	grep -q someone-else "$E2E/spire/agent.conf" || fail "agent.conf not rewritten"
	bed_restart_agent
	refused_by_agent not_authorized_delegate authorized_delegates \
		'*refuses the daemon itself*caller not configured as an authorized delegate*authorized_delegates*' \
		"$pid" "$pod" mistakes notdelegate 1010
	sed -i "s|spiffe://$E2E_TD/someone-else|$E2E_DELEGATE_ID|" "$E2E/spire/agent.conf"
	bed_restart_agent
	served_again "authorized_delegates fixed" "$pid" "$pod" delegate-ok 1010

	# The daemon without a registration entry of its own.
	own=$("$SPIRE_SERVER" entry show -spiffeID "$E2E_DELEGATE_ID" | sed -n 's/^Entry ID *: *//p')
	[[ -n $own ]] || fail "no entry for $E2E_DELEGATE_ID"
	"$SPIRE_SERVER" entry delete -entryID "$own" >/dev/null
	refused_by_agent no_delegate_entry "registration entry" \
		'*refuses the daemon itself*no identity issued*registration entry*' \
		"$pid" "$pod" mistakes noentry 1010
	own=$(bed_entry "$E2E_DELEGATE_ID" unix:uid:0)
	served_again "entry created again" "$pid" "$pod" entry-ok 1010
	bed_rmp "$pid"
}

# --- 14b. the broker endpoint refusing the daemon (E2E_BROKER=1) ------------
# The Broker API's deployment mistake, through NRI on the bed: the daemon's SPIFFE ID missing
# from the agent's experimental.broker.brokers (the agent rejects its certificate in the TLS
# handshake) makes it unready and refuses starts by name, and is healed by fixing the agent
# alone.
scenario_broker_mistakes() {
	local e pod_uid pod pid
	e=$(bed_entry /broker-mistakes unix:uid:1013)
	bed_wait_entry "$e"
	pod_uid=$(bed_uuid)
	pod=$(bed_pod_json broker-mistakes "$pod_uid" "$(nii_annotations identity.noderesource.dev/pod "$(nii_identity /var/certs)")")
	pid=$("$CRICTL" runp "$pod")

	sed -i "s|id = \"$E2E_DELEGATE_ID\"|id = \"spiffe://$E2E_TD/someone-else\"|" "$E2E/spire/agent.conf"
	grep -q someone-else "$E2E/spire/agent.conf" || fail "agent.conf not rewritten"
	bed_restart_agent
	refused_by_agent broker_not_listed experimental.broker.brokers \
		'*refuses the daemon itself*experimental.broker.brokers*' \
		"$pid" "$pod" broker-mistakes unlisted 1013
	sed -i "s|spiffe://$E2E_TD/someone-else|$E2E_DELEGATE_ID|" "$E2E/spire/agent.conf"
	bed_restart_agent
	served_again "broker listed again" "$pid" "$pod" listed 1013
	bed_rmp "$pid"
}

# --- 15. JWT-SVIDs as files ---------------------------------------------------
scenario_jwt() {
	local e pod_uid pod pid cid dir tok0 out t want
	# A 20 s JWT lifetime: the daemon asks again at half-life, about every 10 s.
	e=$(entry /jwt j 1011 -- -jwtSVIDTTL 20)
	bed_wait_entry "$e"
	pod_uid=$(bed_uuid)
	pod=$(pod_json jwt "$pod_uid" "$(nii_annotations identity.noderesource.dev/container.j "$(nii_identity /var/certs 'jwt_audience: [e2e-api, other]')")")
	pid=$("$CRICTL" runp "$pod")
	start_ctr "$pid" "$(E2E_CTR_UID=1011 bed_ctr_json j sh -c 'test -s /var/certs/jwt_svid.token && test -s /var/certs/jwt_bundle.json && echo token-there; while true; do cat /var/certs/jwt_svid.token >/dev/null; sleep 1; done')" "$pod"
	cid=$CID
	note "crictl start ${START_MS} ms, daemon $DELIVERY $(nii_delivered_ms "$cid") ms"
	dir=$(nii_dir "$pod_uid" "$cid")
	want="spiffe://$E2E_TD/jwt"
	out=$(python3 "$here/lib/jwt_verify.py" "$dir/jwt_svid.token" "$dir/jwt_bundle.json" "$want" e2e-api) || fail "first token: $out"
	note "first token verifies against the written JWKS: $out"
	[[ $(stat -c '%u %a' "$dir/jwt_svid.token") == "1011 600" ]] || fail "token file is $(stat -c '%u %a' "$dir/jwt_svid.token")"
	bed_wait 10 "the workload saw its token" bash -c "[[ \$('$CRICTL' logs '$cid' 2>&1) == *token-there* ]]"
	tok0=$(sha256sum <"$dir/jwt_svid.token")
	t=$(nii_ms)
	bed_wait 20 "a new token" bash -c "[[ \$(sha256sum <'$dir/jwt_svid.token') != '$tok0' ]]"
	note "new token after $(($(nii_ms) - t)) ms (half of a 20 s lifetime)"
	out=$(python3 "$here/lib/jwt_verify.py" "$dir/jwt_svid.token" "$dir/jwt_bundle.json" "$want" other) || fail "refreshed token: $out"
	note "refreshed token verifies: $out"
	out=$(curl -fsS "http://$NII_HTTP/metrics" | awk '$1=="nri_identity_jwt_refreshes_total"{print $2}')
	((out >= 2)) || fail "nri_identity_jwt_refreshes_total is $out"
	"$CRICTL" stop -t 1 "$cid" >/dev/null
	"$CRICTL" rm "$cid" >/dev/null
	[[ ! -e $dir ]] || fail "$dir still exists after removal"
	bed_rmp "$pid"
}

# --- 16. the draft SPIFFE file-system delivery layout -------------------------
scenario_spiffe_layout() {
	local e pod_uid pod pid cid dir folder creds files id
	e=$(entry /fsd f 1012)
	bed_wait_entry "$e"
	pod_uid=$(bed_uuid)
	folder=/run/secrets/workload-spiffe-credentials
	pod=$(pod_json fsd "$pod_uid" "$(nii_annotations identity.noderesource.dev/container.f "$(printf 'spire_agent_address: %s\nlayout: spiffe\n' "$NII_SOURCE_SOCK")")")
	pid=$("$CRICTL" runp "$pod")
	start_ctr "$pid" "$(E2E_CTR_UID=1012 bed_ctr_json f sh -c "ls $folder; head -1 $folder/credential-bundle.private-key.pem")" "$pod"
	cid=$CID
	bed_wait_exited "$cid" 30 || fail "container did not exit"
	[[ $(logs_of "$cid") == *"-----BEGIN PRIVATE KEY-----"* ]] || fail "the workload saw: $(logs_of "$cid")"
	note "the workload lists $folder: $(logs_of "$cid" | tr '\n' ' ')"
	dir=$(nii_dir "$pod_uid" "$cid")
	files=$(find "$dir" -mindepth 1 -printf '%f\n' | sort | tr '\n' ' ')
	[[ $files == "credential-bundle.private-key.pem $E2E_TD.x509.pem " ]] || fail "files: $files"
	creds=$dir/credential-bundle.private-key.pem
	[[ $(grep -c -- '-----BEGIN' "$creds") -ge 2 && $(head -1 "$creds") == "-----BEGIN PRIVATE KEY-----" ]] || fail "credential bundle does not start with the key"
	[[ $(grep -c -- '-----BEGIN PRIVATE KEY' "$creds") == 1 ]] || fail "more than one key block"
	[[ $(openssl pkey -in "$creds" -pubout) == "$(openssl x509 -in "$creds" -pubkey -noout)" ]] || fail "key and leaf differ"
	openssl verify -CAfile "$dir/$E2E_TD.x509.pem" "$creds" >/dev/null || fail "the trust bundle does not verify the leaf"
	id=$(nii_spiffe_id "$creds")
	[[ $id == "spiffe://$E2E_TD/fsd" ]] || fail "leaf is $id"
	[[ $(stat -c '%u %a' "$creds") == "1012 600" ]] || fail "credential bundle is $(stat -c '%u %a' "$creds")"
	"$CRICTL" inspect "$cid" | grep -q "\"destination\": \"$folder\"" || fail "no $folder mount"
	note "one atomic credential file (key first, matching leaf $id) and $E2E_TD.x509.pem in $folder"
	bed_rmp "$pid"
}

ALL=(proposal selectors rotation runtime_restart hostile agent_down labels)
# The start guard holds PID-mode workloads until their files are in place; selectors mode
# delivers inside CreateContainer and adds no guard.
[[ $MODE != pid ]] || ALL+=(guard_restart guard_timeout scratch churn)
# The agent refusing the daemon, JWT-SVIDs and the SPIFFE layout: checked once, on the runtime
# that enforces a failed start (what they prove does not depend on the runtime).
[[ $MODE != pid || ${E2E_RUNTIME:-containerd} != containerd ]] || ALL+=(delegate_mistakes jwt spiffe_layout)
# E2E_BROKER=1 (tests/e2e/broker.sh): the Broker API source, PID references, on containerd: the
# PID-mode scenarios, with the broker's deployment mistake instead of the Delegated API's.
if [[ ${E2E_BROKER:-0} == 1 ]]; then
	[[ $MODE == pid ]] || { echo "E2E_BROKER=1 runs PID mode only" >&2 && exit 64; }
	ALL=(proposal rotation runtime_restart hostile agent_down guard_restart guard_timeout scratch jwt spiffe_layout broker_mistakes)
fi
(($#)) || set -- "${ALL[@]}"

trap 'nii_finish e2e' EXIT
trap 'exit 130' INT TERM

t0=$(nii_ms)
nii_build
bed_up
if [[ $MODE == selectors ]]; then
	kubelet_fake_up
	NII_ARGS=(--kubelet-url "http://127.0.0.1:$KUBELET_FAKE_PORT")
fi
nii_start "${NII_ARGS[@]}"
echo "e2e: bed ($E2E_RUNTIME, $MODE mode) and daemon up in $(($(nii_ms) - t0)) ms"
nii_scenarios "$@"
