#!/usr/bin/env bash
# Kata/VM guests with the real daemon: pods of a Kata runtime handler on real containerd, the
# daemon's CreateContainer answer carried into a Kata-style guest (lib/vm.sh) exactly as Kata's
# shim and agent do, and checked from inside the guest by tools/identity-check.
#
#   tests/e2e/kata.sh [SCENARIO...]     (default: all; names as in ALL below)
#
# The bed: containerd knows the handlers `kata-qemu` and `kata-fc`, served by runc
# (E2E_RUNC_HANDLERS): containerd reports them through CRI and NRI as Kata's would be, and the
# host container is only a stand-in; the workload runs in the guest. The daemon runs in
# selectors mode (VM pods are always named by selectors) against a fake kubelet's read-only
# port (lib/fake_kubelet.py: the service account is all that selectors need from it; the real
# kubelet is proven in k8s.sh); SPIRE entries are keyed by k8s:ns + k8s:sa.
#
# Per virtio-fs cache mode (scenarios vm_auto, vm_never): a pod with two annotated containers
# (spiffe-helper files, and `layout: combined`), SVIDs of KATA_SVID_TTL seconds (default 20,
# so the agent renews about every 5 s). For each container: the mounts of its OCI spec (from
# `crictl inspect`) shared into the sandbox by vm_shim_add_mount, its user from the spec; in
# the guest its first instruction checks the identity (SPIFFE ID, validity, key, chain to the
# bundle), then a reader re-reads for KATA_WATCH_S seconds (default 20): every rotation must
# reach it, the combined file must never pair a key with another certificate, separate files
# must converge, and inotify in the guest reports none of the host's renames. Reported: the
# time from the daemon's rename on the host (its log) to the guest reader seeing the new
# certificate. Removal: stop (Kata's shim unshares), RemoveContainer (the
# daemon removes the directory); the guest must no longer see the files.
# Scenario refusals: copy-once without consent and PID mode for a VM pod are refused at
# CreateContainer through crictl; with `copy_once: true` the files are there.
#
# Needs root. Builds what it needs; the VM parts are cached by lib/build_vm.sh.
# shellcheck disable=SC2016 # the guest's shells expand the '...' scripts
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/e2e/lib/bed.sh
. "$here/lib/bed.sh"
# shellcheck source=tests/e2e/lib/nii.sh
. "$here/lib/nii.sh"
# shellcheck source=tests/e2e/lib/vm.sh
. "$here/lib/vm.sh"

export E2E_RUNC_HANDLERS="kata-qemu kata-fc"
# SPIRE backdates certificates by 10 s and the agent renews at half their lifetime, so a
# 20 s TTL renews about every 5 s (below about 12 s it would renew at every agent sync).
TTL=${KATA_SVID_TTL:-20}
WATCH_S=${KATA_WATCH_S:-20}
# Rotations each reader must see (the first delivery not counted).
MIN_ROTATIONS=${KATA_MIN_ROTATIONS:-2}
CTR_UID=1001
CTR_GID=1002
SEP_DIR=/var/run/secrets/spiffe
COMB_DIR=/var/run/secrets/credentials

# --- the fake kubelet -----------------------------------------------------------------------

kubelet_fake_up() {
	KUBELET_FAKE_PODS=$E2E/kubelet-pods.json
	KUBELET_FAKE_PORT=$(_bed_free_port)
	echo '{"kind": "PodList", "items": []}' >"$KUBELET_FAKE_PODS"
	bed_spawn fake-kubelet python3 "$here/lib/fake_kubelet.py" "$KUBELET_FAKE_PORT" "$KUBELET_FAKE_PODS" >/dev/null
	bed_wait 10 "fake kubelet" curl -fsS -o /dev/null "http://127.0.0.1:$KUBELET_FAKE_PORT/pods"
}

# kubelet_fake_add POD_UID SERVICE_ACCOUNT : the pod joins the kubelet's list.
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

# --- Kata's shim side -----------------------------------------------------------------------

# kata_spec CID : from the OCI spec containerd built (NRI adjustments included): a line
# "user<TAB>UID<TAB>GID", then "mount<TAB>SOURCE<TAB>DESTINATION<TAB>OPTIONS" per bind mount.
kata_spec() {
	"$CRICTL" inspect "$1" | python3 -c '
import json, sys
spec = json.load(sys.stdin)["info"]["runtimeSpec"]
user = spec["process"]["user"]
print("user", user.get("uid", 0), user.get("gid", 0), sep="\t")
for m in spec.get("mounts") or []:
    opts = m.get("options") or []
    if m.get("type") == "bind" or "bind" in opts or "rbind" in opts:
        print("mount", m["source"], m["destination"], ",".join(opts), sep="\t")
'
}

# kata_share SB CID : what Kata's shim does with the container's OCI mounts at creation: every
# bind mount it shares goes into the sandbox (vm_shim_add_mount decides, as Kata does). Sets
# CTR_USER ("UID GID" from the spec) and ENTRIES (destination -> shared entry name).
declare -A ENTRIES
kata_share() {
	local sb=$1 cid=$2 spec kind a b c name
	spec=$(kata_spec "$cid")
	ENTRIES=()
	while IFS=$'\t' read -r kind a b c; do
		case $kind in
		user) CTR_USER="$a $b" ;;
		mount)
			name=$(vm_shim_add_mount "$sb" "$cid" "$a" "$b" "$c")
			[[ -z $name ]] || ENTRIES[$b]=$name
			;;
		esac
	done <<<"$spec"
}

# --- timing ---------------------------------------------------------------------------------

# stamp FILE OUT : copies each line written to FILE into OUT as it appears, prefixed by the
# host's clock in microseconds (run in the background; ends when killed).
stamp() {
	local line partial=""
	exec 5<"$1"
	while :; do
		if IFS= read -r -u 5 line; then
			printf '%s %s\n' "${EPOCHREALTIME/./}" "$partial$line" >>"$2"
			partial=
		else
			partial+=$line
			_vm_nap 0.002
		fi
	done
}

# rename_to_seen CID STAMPED : per rotation of CID while the guest reader ran, milliseconds
# from the daemon's log line after the rename ("identity files updated", expires_at) to the
# reader's "seen" line with that not_after; prints "N median M max X" (N = rotations matched).
rename_to_seen() {
	python3 - "$E2E/logs/nii.log" "$1" "$2" <<'EOF'
import datetime, re, statistics, sys
log, cid, stamped = sys.argv[1:]
renamed = {}
for line in open(log):
    if "identity files updated" in line and f"container_id={cid}" in line:
        ts = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))
        m = re.search(r"expires_at=(\d+)", line)
        renamed.setdefault(int(m.group(1)), ts.timestamp() * 1e6)
lat = []
seen = 0
for line in open(stamped):
    us, _, text = line.partition(" ")
    m = re.search(r"^seen .*not_after=(\d+)", text)
    if not m:
        continue
    seen += 1
    # The first is what the reader found when it started, written before it ran.
    if seen > 1 and int(m.group(1)) in renamed:
        lat.append((int(us) - renamed[int(m.group(1))]) / 1000)
if lat:
    print(f"{len(lat)} median {statistics.median(lat):.0f} max {max(lat):.0f}")
else:
    print("0")
EOF
}

note_result() { echo "$*" >>"$E2E/kata-results"; }

# --- scenarios ------------------------------------------------------------------------------

# A pod of handler kata-qemu in a sandbox with virtio-fs cache MODE.
vm_scenario() {
	local mode=$1 sa=vm-$1 e pod_uid ann pod sb t ino gino id out rc i c dest summary n lat
	local stats f owner m
	local -A cids dirs names outs stamped
	local stampers=()
	id=spiffe://$E2E_TD/ns/e2e/sa/$sa
	e=$(bed_entry "/ns/e2e/sa/$sa" k8s:ns:e2e "k8s:sa:$sa" -- -x509SVIDTTL "$TTL")
	bed_wait_entry "$e"
	pod_uid=$(bed_uuid)
	kubelet_fake_add "$pod_uid" "$sa"
	ann=$(nii_annotations \
		identity.noderesource.dev/container.sep "$(nii_identity "$SEP_DIR")" \
		identity.noderesource.dev/container.comb "$(printf 'spire_agent_address: %s\ncert_dir: %s\nlayout: combined\n' "$ADMIN_SOCK" "$COMB_DIR")")
	pod=$(bed_pod_json "vm-$mode" "$pod_uid" "$ann")
	sb=$("$CRICTL" runp --runtime kata-qemu "$pod")
	# Kata boots the guest while it runs the sandbox; its directory is named by the sandbox ID.
	trap 'rc=$?; kill "${stampers[@]}" 2>/dev/null || true; vm_down "'"$sb"'" "$rc" || true' EXIT
	VM_CACHE_MODE=$mode vm_up "$sb"
	note "sandbox ${sb:0:12} (cache=$mode) booted in ${VM_BOOT_MS} ms"

	for c in sep comb; do
		t=$(nii_ms)
		cids[$c]=$("$CRICTL" create "$sb" "$(E2E_CTR_UID=$CTR_UID E2E_CTR_GID=$CTR_GID bed_ctr_json "$c" sleep 3600)" "$pod")
		dirs[$c]=$(nii_dir "$pod_uid" "${cids[$c]}")
		[[ -s ${dirs[$c]}/svid_bundle.pem ]] || fail "$c: no files on the host when CreateContainer returned"
		grep "container_id=${cids[$c]}" "$E2E/logs/nii.log" | grep -q 'sandbox=VM (shared file system)' ||
			fail "$c: the daemon did not treat ${cids[$c]} as a VM container"
		kata_share "$sb" "${cids[$c]}"
		case $c in sep) dest=$SEP_DIR ;; comb) dest=$COMB_DIR ;; esac
		names[$c]=${ENTRIES[$dest]:-}
		[[ -n ${names[$c]} ]] || fail "$c: no shared entry for $dest (spec mounts: $(kata_spec "${cids[$c]}" | tr '\t\n' ' |'))"
		[[ $CTR_USER == "$CTR_UID $CTR_GID" ]] || fail "$c: the spec's user is $CTR_USER"
		# The daemon gave the files the user the runtime reported through NRI.
		[[ $(stat -c '%u %g' "${dirs[$c]}/svid_bundle.pem") == "$CTR_USER" ]] ||
			fail "$c: the files on the host are owned by $(stat -c '%u %g' "${dirs[$c]}/svid_bundle.pem")"
		# The host stand-in starts too (NRI StartContainer; nothing left to deliver).
		"$CRICTL" start "${cids[$c]}" >/dev/null
		note "$c: created with its identity and shared in $(($(nii_ms) - t)) ms: entry ${names[$c]:0:12}…-${names[$c]##*-}, user $CTR_USER"
	done
	ino=$(stat -c %i "${dirs[sep]}")
	gino=$(vm_exec "$sb" stat -c %i "$VM_GUEST_SHARED/${names[sep]}")

	# The workload's first instruction checks what it was given, then it re-reads.
	vm_container_start "$sb" "${cids[sep]}" "$CTR_UID" "$CTR_GID" sh -c '
		identity-check --spiffe-id "$1" "$2" || exit 3
		cd "$2" && stat -c "%n %u:%g %a" svid.pem svid_key.pem svid_bundle.pem
		exec identity-check --watch --inotify --for "$3" --interval-ms 20 --spiffe-id "$1" "$2"' - "$id" "$SEP_DIR" "$WATCH_S"
	vm_container_start "$sb" "${cids[comb]}" "$CTR_UID" "$CTR_GID" sh -c '
		identity-check --layout combined --spiffe-id "$1" "$2" || exit 3
		cd "$2" && stat -c "%n %u:%g %a" credential-bundle.pem svid_bundle.pem
		exec identity-check --layout combined --watch --for "$3" --interval-ms 20 --spiffe-id "$1" "$2"' - "$id" "$COMB_DIR" "$WATCH_S"
	for c in sep comb; do
		outs[$c]=$(vm_container_out "$sb" "${cids[$c]}")
		stamped[$c]=$E2E/logs/guest-$c-$mode.log
		: >"${stamped[$c]}"
		stamp "${outs[$c]}" "${stamped[$c]}" &
		stampers+=($!)
	done

	for c in sep comb; do
		rc=0
		out=$(vm_container_wait "$sb" "${cids[$c]}" $((WATCH_S + 60))) || rc=$?
		((rc == 0)) || fail "$c: the guest reader failed ($rc):"$'\n'"$out"
		[[ $(sed -n 1p <<<"$out") == "ok spiffe_id=$id "* ]] || fail "$c: first instruction: $(sed -n 1p <<<"$out")"
		# Files as on the host: the container's uid:gid, the key 0600.
		stats=$(grep -E '^[a-z_.-]+\.pem [0-9]+:[0-9]+ [0-7]+$' <<<"$out") || fail "$c: no file listing: $out"
		[[ $(wc -l <<<"$stats") == "$([[ $c == sep ]] && echo 3 || echo 2)" ]] || fail "$c: files in the guest: $stats"
		while read -r f owner m; do
			[[ $owner == "$CTR_UID:$CTR_GID" ]] || fail "$c: $f is owned by $owner in the guest"
			case $f in svid_key.pem | credential-bundle.pem) [[ $m == 600 ]] || fail "$c: $f has mode $m" ;; esac
		done <<<"$stats"
		summary=$(grep '^summary ' <<<"$out")
		i=$(grep -o 'serials=[0-9]*' <<<"$summary" | cut -d= -f2)
		((i >= MIN_ROTATIONS + 1)) || fail "$c: the guest saw $((i - 1)) rotations in ${WATCH_S} s (want $MIN_ROTATIONS): $out"
		if [[ $c == comb ]]; then
			[[ $summary == *" torn=0 "* ]] || fail "comb: a torn read of the combined file: $summary"
		else
			# virtio-fs tells the guest nothing of changes made on the host.
			[[ $summary == *" inotify_events=0" ]] || fail "sep: inotify reported host changes in the guest: $summary"
		fi
		note "$c: in the guest as $CTR_UID:$CTR_GID: $(sed -n 1p <<<"$out" | cut -d' ' -f1-2); files $CTR_UID:$CTR_GID, key 0600; reader: ${summary#summary }"
		read -r n lat <<<"$(rename_to_seen "${cids[$c]}" "${stamped[$c]}")"
		((n >= MIN_ROTATIONS)) || fail "$c: only $n rotations matched between the daemon's log and the guest"
		note "$c: rename on the host -> seen in the guest ($n rotations): $lat ms"
		note_result "cache=$mode $c: rename->seen $lat ms over $n rotations; reader ${summary#summary }"
	done
	kill "${stampers[@]}" 2>/dev/null || true
	stampers=()
	[[ $(stat -c %i "${dirs[sep]}") == "$ino" ]] || fail "the host directory was replaced"
	[[ $(vm_exec "$sb" stat -c %i "$VM_GUEST_SHARED/${names[sep]}") == "$gino" ]] || fail "the guest's entry changed inode"

	# Removal in Kata's order: the task goes at StopContainer (the agent removes the
	# container, the shim unshares its mounts), then RemoveContainer (the daemon removes the
	# directory), then the sandbox.
	t=$(nii_ms)
	for c in sep comb; do
		"$CRICTL" stop -t 0 "${cids[$c]}" >/dev/null
		vm_container_remove "$sb" "${cids[$c]}"
		"$CRICTL" rm "${cids[$c]}" >/dev/null
		[[ ! -e ${dirs[$c]} ]] || fail "$c: ${dirs[$c]} still exists after RemoveContainer"
	done
	bed_wait 10 "the guest to drop the entries" guest_sees_nothing "$sb" "${cids[sep]}" "${cids[comb]}" ||
		fail "the guest still sees: $(vm_exec "$sb" sh -c "ls $VM_GUEST_SHARED; find $VM_GUEST_SHARED -name '*.pem'")"
	note "removed: host directories gone, the guest sees neither entry nor file after $(($(nii_ms) - t)) ms"
	"$CRICTL" stopp "$sb" >/dev/null && "$CRICTL" rmp "$sb" >/dev/null
	[[ ! -e $NII_ARTIFACTS/$pod_uid ]] || fail "pod directory left behind"
	vm_down "$sb"
	vm_check_clean "$sb" || fail "sandbox $sb left something behind"
	trap - EXIT
}

# guest_sees_nothing SB CID... : no shared entry of these containers, and no identity file
# anywhere in the guest's share.
guest_sees_nothing() {
	local sb=$1 list
	shift
	list=$(vm_exec "$sb" sh -c 'ls "$1"; find "$1" -name "*.pem"' - "$VM_GUEST_SHARED") || return 1
	for c in "$@"; do
		! grep -q "^$c" <<<"$list" || return 1
	done
	! grep -q '\.pem$' <<<"$list"
}

scenario_vm_auto() { vm_scenario auto; }
scenario_vm_never() { vm_scenario never; }

scenario_refusals() {
	local e pod_uid pod sb cid err dir ann
	e=$(bed_entry /ns/e2e/sa/fc k8s:ns:e2e k8s:sa:fc)
	bed_wait_entry "$e"
	pod_uid=$(bed_uuid)
	kubelet_fake_add "$pod_uid" fc
	ann=$(nii_annotations \
		identity.noderesource.dev/container.plain "$(nii_identity /var/certs)" \
		identity.noderesource.dev/container.consent "$(nii_identity /var/certs 'copy_once: true')")
	pod=$(bed_pod_json fc "$pod_uid" "$ann")
	sb=$("$CRICTL" runp --runtime kata-fc "$pod")
	if err=$("$CRICTL" create "$sb" "$(bed_ctr_json plain sleep 3600)" "$pod" 2>&1); then
		fail "a kata-fc container without copy_once: true was created"
	fi
	for part in "copy_once: true" kata-fc "e2e/fc" plain; do
		[[ $err == *"$part"* ]] || fail "the refusal does not say '$part': $err"
	done
	note "kata-fc without consent, refused at CreateContainer: ${err##*nri-identity-injector: }"
	cid=$("$CRICTL" create "$sb" "$(bed_ctr_json consent sleep 3600)" "$pod")
	dir=$(nii_dir "$pod_uid" "$cid")
	"$NII_IDENTITY_CHECK" --spiffe-id "spiffe://$E2E_TD/ns/e2e/sa/fc" "$dir" >/dev/null ||
		fail "copy_once: true: $("$NII_IDENTITY_CHECK" "$dir")"
	note "kata-fc with copy_once: true: created with its files (what the sandbox copies in once)"
	"$CRICTL" rmp -f "$sb" >/dev/null

	pod_uid=$(bed_uuid)
	kubelet_fake_add "$pod_uid" fc
	pod=$(bed_pod_json pidvm "$pod_uid" "$(nii_annotations identity.noderesource.dev/pod "$(nii_identity /var/certs 'attestation: pid')")")
	sb=$("$CRICTL" runp --runtime kata-qemu "$pod")
	if err=$("$CRICTL" create "$sb" "$(bed_ctr_json c0 sleep 3600)" "$pod" 2>&1); then
		fail "a kata-qemu container in PID mode was created"
	fi
	[[ $err == *hypervisor* && $err == *kata-qemu* ]] || fail "unclear refusal: $err"
	[[ ! -e $NII_ARTIFACTS/$pod_uid ]] || fail "something was written for the refused pod"
	note "kata-qemu with attestation: pid, refused at CreateContainer: ${err##*nri-identity-injector: }"
	"$CRICTL" rmp -f "$sb" >/dev/null
}

ALL=(refusals vm_auto vm_never)
(($#)) || set -- "${ALL[@]}"

kata_finish() {
	local rc=$? d pid st
	# A failed scenario keeps the bed's logs (bed_down keeps them for a failed status).
	((NII_FAILED == 0)) || rc=1
	# Sandboxes of this run a failed scenario left behind (vm_reap spares them: this script,
	# their owner, still runs).
	for d in "$VM_ROOT"/*/; do
		[[ -r $d/owner ]] || continue
		read -r pid st <"$d/owner"
		[[ $pid == "$$" ]] || continue
		d=${d%/}
		vm_down "${d##*/}" 1 || true
	done
	if [[ -n ${E2E:-} && -s $E2E/kata-results ]]; then
		sed 's/^/kata: /' "$E2E/kata-results"
	fi
	nii_finish kata "$rc"
}
trap kata_finish EXIT
trap 'exit 130' INT TERM

t0=$(nii_ms)
nii_build
nii_build_identity_check
# Copied into every guest container's /bin.
VM_ROOTFS_EXTRA_BINS=$NII_IDENTITY_CHECK
E2E_LOCK_WAIT=${E2E_LOCK_WAIT:-3600} bed_up
kubelet_fake_up
cat >"$E2E/nii.toml" <<EOF
# VM handlers as a node with Kata would list them (these are also the defaults' patterns).
vm_runtime_handlers = ["kata*"]
copy_once_runtime_handlers = ["kata-fc*", "kata-qemu-tdx*", "kata-qemu-snp*"]
EOF
nii_start --config "$E2E/nii.toml" --kubelet-url "http://127.0.0.1:$KUBELET_FAKE_PORT"
echo "kata: bed and daemon up in $(($(nii_ms) - t0)) ms"
nii_scenarios "$@"
