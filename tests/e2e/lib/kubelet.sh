# shellcheck shell=bash
# A real standalone kubelet on the bed (no API server, no kubeconfig): static
# pods from $E2E/manifests, run by the bed's runtime (containerd, or CRI-O with
# E2E_RUNTIME=cri-o), with the read-only port on 127.0.0.1 for SPIRE's k8s
# workload attestor. Source after bed.sh:
#
#   E2E_K8S_ATTESTOR=1          # before bed_up: the agent gets the k8s attestor
#   trap 'bed_down $?' EXIT     # bed_down calls kubelet_down (BED_DOWN_HOOKS)
#   bed_up && kubelet_up
#   kubelet_static_pod p1 "$(bed_uuid)" 'spec: {containers: [{name: c0, command: [sleep, inf]}]}'
#   cid=$(kubelet_wait_container p1 c0)
#
# Exported after kubelet_up: KUBELET (binary), KUBELET_NODE (node name; static
# pods are named <manifest name>-$KUBELET_NODE), KUBELET_NS (default namespace
# of kubelet_static_pod), KUBELET_RO_PORT (read-only port: /pods, no auth),
# KUBELET_PORT (secure port: TLS with a serving certificate for 127.0.0.1 from
# $KUBELET_PKI/ca.pem, client certificates only, no anonymous access),
# KUBELET_PKI (ca.pem, client.pem + client-key.pem that the kubelet accepts,
# other-ca.pem that signed nothing it uses), KUBELET_HEALTHZ_PORT,
# KUBELET_MANIFESTS. After apiserver_up (lib/apiserver.sh) the kubelet joins
# that control plane: tokens and RBAC decide on its secure port.
#
# The kubelet touches the host outside $E2E in ways no flag avoids: sysctls
# (vm.overcommit_memory, kernel.panic, kernel.panic_on_oops), the fixed paths
# /var/lib/kubelet/device-plugins and /var/log/containers, /run/mount (via
# mount(8)), and the QoS cgroups /kubepods/{burstable,besteffort} in every
# hierarchy. kubelet_up records the state of each before it starts, in
# $E2E/kubelet-host/, and kubelet_down puts back exactly that. After a crash
# (under the bed lock, so that a waiting bed cannot start meanwhile):
#   flock /run/lock/nii-e2e.lock env E2E=/tmp/nii-e2e.XXXXXX bash -c \
#     '. tests/e2e/lib/bed.sh; . tests/e2e/lib/kubelet.sh; bed_down'
#
# While the kubelet runs it owns every pod of the runtime (on containerd, of
# its k8s.io namespace): it kills the bed's crictl-made pods within about 2 s
# ("Clean up containers for orphaned pod we had not seen before"). Use static
# pods only.

_KUBELET_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

KUBELET_NODE=${KUBELET_NODE:-nii-e2e-node}
KUBELET_NS=${KUBELET_NS:-e2e}
export KUBELET_NODE KUBELET_NS

# Host paths the kubelet may create outside $E2E (the ones it is configured
# away from are watched too, to prove it). /var/run is /run on Debian.
KUBELET_HOST_PATHS=(/var/lib/kubelet /var/log/containers /var/log/pods
	/usr/libexec/kubernetes /run/mount /run/kubernetes /etc/kubernetes
	/etc/cni /opt/cni /var/lib/cni)
# The sysctls kubelet's setupKernelTunables may rewrite (protectKernelDefaults
# false, the default; true makes it refuse to start on this host instead).
KUBELET_SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
	kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

# bed_down runs this first; it does nothing unless kubelet_up recorded state.
case " ${BED_DOWN_HOOKS:-} " in
*" kubelet_down "*) ;;
*) BED_DOWN_HOOKS="kubelet_down ${BED_DOWN_HOOKS:-}" ;;
esac

_kubelet_log() { printf 'kubelet: %s\n' "$*" >&2; }

_kubelet_sysctl_file() { echo "/proc/sys/${1//.//}"; }

# ---------------------------------------------------------------- host state

# _kubelet_record_host : snapshot what kubelet_down must restore.
_kubelet_record_host() {
	local d=$E2E/kubelet-host key f p root q i=0
	mkdir -p "$d"
	: >"$d/sysctl"
	for key in "${KUBELET_SYSCTLS[@]}"; do
		f=$(_kubelet_sysctl_file "$key")
		[[ -r $f ]] && printf '%s %s\n' "$key" "$(<"$f")" >>"$d/sysctl"
	done
	# paths: "<path> absent" or "<path> present <index>" with the listing of
	# what was there in paths.<index>.
	: >"$d/paths"
	for p in "${KUBELET_HOST_PATHS[@]}"; do
		if [[ -e $p || -L $p ]]; then
			echo "$p present $i" >>"$d/paths"
			find "$p" -xdev -print 2>/dev/null | sort >"$d/paths.$i"
			i=$((i + 1))
		else
			echo "$p absent" >>"$d/paths"
		fi
	done
	# cgroups: QoS-level directories that existed before (the kubelet's
	# pod<uid> directories below them are always its own).
	: >"$d/cgroups"
	for root in $(_bed_cgroup_roots); do
		for q in kubepods kubepods/burstable kubepods/besteffort; do
			[[ -d $root/$q ]] && echo "$root/$q" >>"$d/cgroups"
		done
	done
	return 0
}

# _kubelet_cgroup_dirs [RECORD-DIR] : the kubelet's cgroup directories that
# were not there before kubelet_up, deepest first.
_kubelet_cgroup_dirs() {
	local root q pre=${1:-$E2E/kubelet-host}/cgroups
	for root in $(_bed_cgroup_roots); do
		[[ -d $root/kubepods ]] || continue
		{
			# Pods: guaranteed ones directly under kubepods, the others under
			# their QoS class. (The bed's own pods live in kubepods/nii-e2e-*.)
			find "$root/kubepods" "$root/kubepods/burstable" "$root/kubepods/besteffort" \
				-mindepth 1 -maxdepth 1 -type d -name 'pod*' 2>/dev/null |
				while read -r q; do find "$q" -depth -type d; done
			for q in kubepods/burstable kubepods/besteffort kubepods; do
				[[ -d $root/$q ]] && ! grep -qxF "$root/$q" "$pre" && echo "$root/$q"
			done
		}
	done
	return 0
}

_kubelet_restore_host() {
	local d=$E2E/kubelet-host key val f p state idx mp bad=0
	[[ -d $d ]] || return 0
	while read -r key val; do
		f=$(_kubelet_sysctl_file "$key")
		if [[ $(<"$f") != "$val" ]]; then
			echo "$val" >"$f" || { _kubelet_log "cannot restore $key=$val" && bad=1; }
		fi
	done <"$d/sysctl"
	while read -r p state idx; do
		# Anything mounted below first (nothing is expected).
		while read -r mp; do
			umount "$mp" 2>/dev/null || umount -l "$mp" || bad=1
		done < <(awk -v p="$p" '$5 == p || index($5, p "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r)
		if [[ $state == absent ]]; then
			if [[ -e $p || -L $p ]]; then
				rm -rf --one-file-system "$p" || bad=1
				# Parents the kubelet made for it (/usr/libexec/kubernetes...)
				# are covered by the list itself.
			fi
		elif [[ -e $p ]]; then
			# Existed before: remove only what is new, deepest first.
			find "$p" -xdev -print 2>/dev/null | sort | comm -13 "$d/paths.$idx" - | sort -r |
				while read -r f; do rm -rf --one-file-system "$f"; done
		fi
	done <"$d/paths"
	return "$bad"
}

# ---------------------------------------------------------------- up / down

_kubelet_write_config() {
	# With a control plane (lib/apiserver.sh): bearer tokens are checked by
	# TokenReview and every request is authorised by SubjectAccessReview.
	local webhook=false authz=AlwaysAllow
	if [[ -n ${APISERVER_URL:-} ]]; then webhook=true authz=Webhook; fi
	cat >"$E2E/kubelet-config.yaml" <<EOF
# Generated by tests/e2e/lib/kubelet.sh.
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
# v1.34 still runs on cgroup v1; say so explicitly (1.35 refuses by default).
failCgroupV1: false
# The bed's runtime (bed_up: containerd or CRI-O), both with cgroupfs.
containerRuntimeEndpoint: unix://$CRI_SOCK
imageServiceEndpoint: unix://$CRI_SOCK
staticPodPath: $KUBELET_MANIFESTS
# The directory is watched with inotify too; this is only the resync.
fileCheckFrequency: 2s
podLogsDir: $E2E/kubelet-logs
# Default /usr/libexec/kubernetes/...: keep it in the scratch dir.
volumePluginDir: $E2E/kubelet-volume-plugins
address: 127.0.0.1
port: $KUBELET_PORT
readOnlyPort: $KUBELET_RO_PORT
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
# The secure port as on a cluster node, minus the API server: a serving
# certificate from a CA the client checks, and client certificates (token
# authentication would need a TokenReview webhook, hence an API server).
tlsCertFile: $KUBELET_PKI/serving.pem
tlsPrivateKeyFile: $KUBELET_PKI/serving-key.pem
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: $webhook, cacheTTL: 1s}
  x509: {clientCAFile: $KUBELET_PKI/ca.pem}
authorization:
  mode: $authz
  webhook: {cacheAuthorizedTTL: 1s, cacheUnauthorizedTTL: 1s}
failSwapOn: false
makeIPTablesUtilChains: false
# Never collect the imported images (they cannot be pulled back) and never
# evict on this shared, fairly full disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 50Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
resolvConf: /etc/resolv.conf
EOF
}

# _kubelet_pki : a CA, the kubelet's serving certificate (127.0.0.1, localhost), a
# client certificate, and an unrelated CA, in $KUBELET_PKI (EC P-256, 1 day).
_kubelet_pki() {
	local d=$KUBELET_PKI
	[[ -s $d/client.pem ]] && return 0
	mkdir -p "$d" && chmod 700 "$d"
	{
		bed_ca "$d" ca nii-e2e-kubelet-ca &&
			bed_ca "$d" other-ca nii-e2e-other-ca &&
			bed_cert "$d" ca serving "/CN=$KUBELET_NODE" server IP:127.0.0.1,DNS:localhost &&
			bed_cert "$d" ca client /CN=nri-identity-injector client
	} || _bed_die "cannot make the kubelet's certificates in $d"
}

# kubelet_up : start the kubelet (builds it on first use) and wait for
# /healthz and the read-only port. Needs bed_up first.
kubelet_up() {
	local t
	[[ -n ${E2E:-} && -S ${CRI_SOCK:-} ]] || _bed_die "kubelet_up needs bed_up first" || return 1
	if bed_pid kubelet >/dev/null; then
		_bed_die "the kubelet already runs"
		return 1
	fi
	# Any other kubelet (a real node's, or one a crashed bed left) shares
	# /var/lib/kubelet/device-plugins and /var/log/containers with this one.
	if pgrep -x kubelet >/dev/null; then
		_bed_die "a kubelet already runs on this host: $(pgrep -ax kubelet | head -3)"
		return 1
	fi
	t=$(_bed_ms)
	nii_build_kubelet || return 1
	KUBELET=$NII_KUBELET_DIR/kubelet
	KUBELET_MANIFESTS=$E2E/manifests
	KUBELET_RO_PORT=${KUBELET_RO_PORT:-$(_bed_free_port)}
	KUBELET_PORT=${KUBELET_PORT:-$(_bed_free_port)}
	KUBELET_HEALTHZ_PORT=${KUBELET_HEALTHZ_PORT:-$(_bed_free_port)}
	KUBELET_PKI=$E2E/kubelet-pki
	export KUBELET KUBELET_MANIFESTS KUBELET_RO_PORT KUBELET_PORT KUBELET_HEALTHZ_PORT KUBELET_PKI
	mkdir -p "$KUBELET_MANIFESTS" "$E2E/kubelet" "$E2E/kubelet-logs" "$E2E/kubelet-volume-plugins"
	_kubelet_pki || return 1
	_kubelet_write_config
	# Recorded once per bed: a second kubelet_up after kubelet_down must not
	# take the first kubelet's changes for the host's own state.
	[[ -e $E2E/kubelet-host/paths ]] || _kubelet_record_host || return 1
	_bed_rotate_log kubelet
	local join=()
	# After apiserver_up: register as a node of that control plane.
	[[ -z ${APISERVER_NODE_KUBECONFIG:-} ]] || join=(--kubeconfig "$APISERVER_NODE_KUBECONFIG")
	bed_spawn kubelet "$KUBELET" --config "$E2E/kubelet-config.yaml" "${join[@]}" \
		--root-dir "$E2E/kubelet" --cert-dir "$E2E/kubelet/pki" \
		--hostname-override "$KUBELET_NODE" -v="${KUBELET_V:-2}" >/dev/null
	bed_wait 60 "kubelet /healthz" curl -fsS -o /dev/null "http://127.0.0.1:$KUBELET_HEALTHZ_PORT/healthz" ||
		{ tail -20 "$E2E/logs/kubelet.log" >&2; return 1; }
	bed_wait 30 "kubelet read-only port" curl -fsS -o /dev/null "http://127.0.0.1:$KUBELET_RO_PORT/pods" || return 1
	bed_wait 10 "kubelet secure port" curl -fsS -o /dev/null --cacert "$KUBELET_PKI/ca.pem" \
		--cert "$KUBELET_PKI/client.pem" --key "$KUBELET_PKI/client-key.pem" \
		"https://127.0.0.1:$KUBELET_PORT/pods" || return 1
	_bed_log "kubelet $NII_KUBELET_VERSION ready in $(_bed_since "$t") (read-only port $KUBELET_RO_PORT)"
}

# kubelet_restart : stop and start the kubelet (pods keep running).
kubelet_restart() {
	bed_stop kubelet 30
	kubelet_up
}

# _kubelet_pod_ids : sandboxes the kubelet made (static pods: config.source=file;
# pods from an API server, lib/apiserver.sh: config.source=api).
_kubelet_pod_ids() {
	"$CRICTL" pods -o json 2>/dev/null | python3 -c '
import json, sys
for p in json.load(sys.stdin).get("items") or []:
    if (p.get("annotations") or {}).get("kubernetes.io/config.source") in ("file", "api"):
        print(p["id"])'
}

# kubelet_down : stop the kubelet, then remove its pods, restore the host.
# Idempotent; a no-op unless kubelet_up ran in this bed.
kubelet_down() {
	local t ids d p keep bad=0
	[[ -n ${E2E:-} && -d $E2E/kubelet-host ]] || return 0
	t=$(_bed_ms)
	# First: a running kubelet recreates whatever is removed under it.
	bed_stop kubelet 30
	if [[ -x $E2E/bin/crictl ]] && bed_pid "$(_bed_runtime_proc)" >/dev/null; then
		ids=$(_kubelet_pod_ids)
		if [[ -n $ids ]]; then
			# shellcheck disable=SC2086 # one ID per word
			bed_rmp $ids 2>/dev/null || _kubelet_log "crictl rmp of the kubelet's pods failed"
		fi
	fi
	# Processes left in the kubelet's pod cgroups (a pod CRI failed to remove).
	for d in $(_kubelet_cgroup_dirs); do
		[[ -r $d/cgroup.procs ]] || continue
		keep=$(<"$d/cgroup.procs")
		for p in $keep; do kill -KILL "$p" 2>/dev/null || true; done
	done
	# The kubelet bind-mounts its root dir onto itself.
	while read -r d; do
		[[ -n $d ]] || continue
		umount "$d" 2>/dev/null || umount -l "$d" 2>/dev/null || true
	done < <(awk -v p="$E2E/kubelet" '$5 == p || index($5, p "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r)
	for d in $(_kubelet_cgroup_dirs); do
		rmdir "$d" 2>/dev/null || { sleep 0.2 && rmdir "$d" 2>/dev/null; } ||
			{ [[ $d == */kubepods ]] || { _kubelet_log "cannot remove cgroup $d" && bad=1; }; }
	done
	_kubelet_restore_host || bad=1
	# Keep the record (bed_check_clean-style checks read it) but mark it done.
	touch "$E2E/kubelet-host/restored"
	_bed_log "kubelet down in $(_bed_since "$t")"
	return "$bad"
}

# kubelet_check_clean [RECORD-DIR] : after kubelet_down, verify the host holds
# nothing of the kubelet: sysctls as recorded, no new host paths, no kubelet
# cgroups or process. RECORD-DIR defaults to $E2E/kubelet-host; to check after
# bed_down (which removes $E2E), copy that directory out first.
kubelet_check_clean() {
	local d=${1:-$E2E/kubelet-host} key val f p state idx bad=0 c
	[[ -d $d ]] || _bed_die "no kubelet record in $d" || return 1
	while read -r key val; do
		f=$(_kubelet_sysctl_file "$key")
		[[ $(<"$f") == "$val" ]] || { _kubelet_log "left behind: $key=$(<"$f") (was $val)" && bad=1; }
	done <"$d/sysctl"
	while read -r p state idx; do
		if [[ $state == absent ]]; then
			[[ ! -e $p && ! -L $p ]] || { _kubelet_log "left behind: $p" && bad=1; }
		elif [[ -e $p ]]; then
			c=$(find "$p" -xdev -print 2>/dev/null | sort | comm -13 "$d/paths.$idx" -)
			[[ -z $c ]] || { _kubelet_log "left behind in $p: ${c//$'\n'/ }" && bad=1; }
		fi
	done <"$d/paths"
	c=$(_kubelet_cgroup_dirs "$d")
	[[ -z $c ]] || { _kubelet_log "left behind: cgroups ${c//$'\n'/ }" && bad=1; }
	if [[ -n ${KUBELET:-} ]] && c=$(pgrep -xf "$(_bed_regex "$KUBELET") .*"); then
		_kubelet_log "left behind: kubelet processes $c" && bad=1
	fi
	((bad == 0)) && _kubelet_log "clean: sysctls restored, no kubelet paths, cgroups or processes left"
}

# ---------------------------------------------------------------- static pods

# kubelet_static_pod NAME UID [BODY-YAML] : write $KUBELET_MANIFESTS/NAME.yaml.
# BODY is a partial Pod (YAML or JSON) merged over these defaults: namespace
# $KUBELET_NS, metadata.uid UID (give a dashed UUID: bed_uuid), hostNetwork,
# dnsPolicy Default, runAsUser ${E2E_CTR_UID:-1001}, grace period 2 s, and for
# each container without them image $E2E_IMAGE and imagePullPolicy Never.
# Lists (containers) replace, maps merge. Prints the manifest path. The
# kubelet names the pod NAME-$KUBELET_NODE. No serviceAccountName: the
# kubelet rejects static pods that name one.
kubelet_static_pod() {
	local name=$1 uid=$2 body=${3:-} f
	f=$KUBELET_MANIFESTS/$name.yaml
	# JSON bodies (what the test scripts pass) need nothing beyond the standard library;
	# YAML ones need PyYAML for whichever python3 is first on PATH.
	if ! python3 -c 'import json, sys; json.loads(sys.argv[1] or "{}")' "$body" 2>/dev/null; then
		_kubelet_need_yaml || return 1
	fi
	# Written aside, then renamed: the kubelet ignores dot files and must
	# never read half a manifest.
	python3 - "$name" "$uid" "$KUBELET_NS" "${E2E_CTR_UID:-1001}" "$E2E_IMAGE" "$body" \
		>"$KUBELET_MANIFESTS/.$name.tmp" <<'EOF' || return 1
import json, sys
name, uid, ns, run_as, image, body = sys.argv[1:]
try:
    parsed = json.loads(body or "{}")
except ValueError:
    import yaml
    parsed = yaml.safe_load(body) or {}
pod = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": name, "namespace": ns, "uid": uid},
    "spec": {
        "hostNetwork": True,
        "dnsPolicy": "Default",
        "terminationGracePeriodSeconds": 2,
        "securityContext": {"runAsUser": int(run_as)},
        "containers": [],
    },
}
def merge(a, b):
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            merge(a[k], v)
        else:
            a[k] = v
merge(pod, parsed)
if not pod["spec"]["containers"]:
    sys.exit("kubelet_static_pod: the body names no container")
for c in pod["spec"]["containers"]:
    c.setdefault("image", image)
    c.setdefault("imagePullPolicy", "Never")
# JSON is YAML: the kubelet reads either.
json.dump(pod, sys.stdout, indent=1)
EOF
	mv "$KUBELET_MANIFESTS/.$name.tmp" "$f"
	echo "$f"
}

_kubelet_need_yaml() {
	python3 -c 'import yaml' 2>/dev/null && return 0
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-yaml >/dev/null ||
		_bed_die "python3-yaml is needed for kubelet_static_pod"
}

# _kubelet_pod_name POD : the kubelet's name for a static pod (NAME-node).
_kubelet_pod_name() {
	if [[ $1 == *-"$KUBELET_NODE" ]]; then echo "$1"; else echo "$1-$KUBELET_NODE"; fi
}

# kubelet_pod_id POD : the ready sandbox of static pod POD (manifest name or
# full name), if any.
kubelet_pod_id() {
	local id
	id=$("$CRICTL" pods --label "io.kubernetes.pod.name=$(_kubelet_pod_name "$1")" --state ready -q 2>/dev/null | head -1)
	[[ -n $id ]] && echo "$id"
}

# kubelet_container_id POD CONTAINER : the running container CONTAINER of POD.
kubelet_container_id() {
	local id
	id=$("$CRICTL" ps --label "io.kubernetes.pod.name=$(_kubelet_pod_name "$1")" \
		--label "io.kubernetes.container.name=$2" --state running -q 2>/dev/null | head -1)
	[[ -n $id ]] && echo "$id"
}

# kubelet_wait_container POD CONTAINER [TIMEOUT_S] : wait until the container
# runs; prints its ID.
kubelet_wait_container() {
	bed_wait "${3:-60}" "container $2 of static pod $1" kubelet_container_id "$1" "$2" || return 1
	kubelet_container_id "$1" "$2"
}

# kubelet_pods : the kubelet's pod list (what SPIRE's k8s attestor reads).
kubelet_pods() { curl -fsS "http://127.0.0.1:$KUBELET_RO_PORT/pods"; }
