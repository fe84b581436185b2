# shellcheck shell=bash
# End-to-end test bed: a real container runtime (containerd, or CRI-O with
# E2E_RUNTIME=cri-o; CRI + NRI), driven by crictl, and a real SPIRE server and
# agent, all confined to one scratch directory. Source this file, then:
#
#   trap 'bed_down $?' EXIT      # before bed_up: a half-built bed is torn down
#   bed_up
#   pod=$(bed_pod_json p1 "$(bed_uuid)")
#   ctr=$(bed_ctr_json c1 sh -c 'id -u')
#   pid=$("$CRICTL" runp "$pod"); cid=$("$CRICTL" create "$pid" "$ctr" "$pod")
#
# Exported after bed_up (all single words, safe to quote and to hand to child
# processes): E2E, E2E_RUNTIME, CRI_SOCK, E2E_RUNTIME_LOG, CRICTL, SPIRE_SERVER,
# SPIRE_AGENT, SPIRE_SERVER_SOCK, AGENT_SOCK, ADMIN_SOCK, BROKER_SOCK, NRI_SOCK, E2E_RUN_ID,
# E2E_TD; on containerd also CONTAINERD_SOCK and CTR.
#
# CRI-O (E2E_RUNTIME=cri-o): its NRI settings are a drop-in of the directory it
# reads with --config-dir; E2E_CRIO_NRI_DROPIN=FILE adds FILE there verbatim,
# after the bed's own, so that every key FILE sets wins (a literal nri_listen
# outside the scratch directory included: the bed lock makes that safe).
#
# Only one bed runs per host at a time (a lock enforces it): containerd keeps
# shim sockets and runc state in fixed places under /run/containerd that a
# second instance would share, and the kubelet and a literal NRI socket path
# are host-wide. To clean up after a run that was SIGKILLed:
#   E2E=/tmp/nii-e2e.XXXXXX bash -euo pipefail -c '. tests/e2e/lib/bed.sh; bed_down'
#
# Like every file under lib/, this one leaves the shell options to the script that
# sources it (which sets -euo pipefail).

_BED_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/e2e/lib/build.sh
. "$_BED_LIB/build.sh"

E2E_TD=example.org
E2E_DELEGATE_ID=spiffe://$E2E_TD/nri-identity-injector
E2E_NODE_ID=spiffe://$E2E_TD/node
# The CRI names the images are imported under (normalized, as CRI resolves).
E2E_IMAGE=docker.io/library/e2e-busybox:1
E2E_PAUSE_IMAGE=registry.k8s.io/pause:3.10.2
# FROM scratch: only the static tools/idcheck binary, as /idcheck (its entrypoint).
E2E_SCRATCH_IMAGE=docker.io/library/e2e-scratch:1
export E2E_TD E2E_DELEGATE_ID E2E_NODE_ID E2E_IMAGE E2E_PAUSE_IMAGE E2E_SCRATCH_IMAGE

# ---------------------------------------------------------------- utilities

_bed_log() { printf 'bed: %s\n' "$*" >&2; }
_bed_die() {
	_bed_log "ERROR: $*"
	return 1
}

# Milliseconds since the epoch, for the step timings.
_bed_ms() {
	local t=${EPOCHREALTIME/./}
	echo $((t / 1000))
}

# _bed_since MS : seconds elapsed since MS with one decimal.
_bed_since() {
	local d=$(($(_bed_ms) - $1))
	printf '%d.%ds' $((d / 1000)) $((d % 1000 / 100))
}

# bed_wait TIMEOUT_S WHAT CMD... : poll CMD every 0.1 s until it succeeds.
bed_wait() {
	local timeout=$1 what=$2 deadline
	shift 2
	deadline=$(($(_bed_ms) + timeout * 1000))
	until "$@" >/dev/null 2>&1; do
		if (($(_bed_ms) > deadline)); then
			_bed_die "timed out after ${timeout}s waiting for $what"
			return 1
		fi
		sleep 0.1
	done
}

# A random RFC 4122 UUID (pod uids; SPIRE's k8s tooling wants the dashed form).
bed_uuid() { cat /proc/sys/kernel/random/uuid; }

# Field 22 of /proc/PID/stat (start time in ticks): tells a recorded process
# from an unrelated one that reused its PID.
_bed_starttime() {
	local stat fields
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	read -ra fields <<<"${stat##*) }"
	echo "${fields[19]}"
}

# True while PID runs and is not a zombie.
_bed_alive() {
	local stat
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	[[ ${stat:0:1} != Z ]]
}

# bed_spawn NAME CMD... : start CMD in the background, output to
# $E2E/logs/NAME.log, and record its PID so bed_down stops it. Use it for the
# plugin under test too. The bed lock is not inherited, so a daemon left
# behind by a crashed script does not block the next bed.
bed_spawn() {
	local name=$1 pid
	shift
	if [[ -n ${_BED_LOCK_FD:-} ]]; then
		"$@" >>"$E2E/logs/$name.log" 2>&1 </dev/null {_BED_LOCK_FD}>&- &
	else
		"$@" >>"$E2E/logs/$name.log" 2>&1 </dev/null &
	fi
	pid=$!
	echo "$pid $(_bed_starttime "$pid" || echo 0)" >"$E2E/pids/$name"
	echo "$pid"
}

# bed_pid NAME : the recorded PID of NAME if it is still that process.
bed_pid() {
	local pid st
	[[ -r $E2E/pids/$1 ]] || return 1
	read -r pid st <"$E2E/pids/$1"
	_bed_alive "$pid" && [[ $(_bed_starttime "$pid") == "$st" ]] && echo "$pid"
}

# _bed_rotate_log NAME : keep the log of a process about to be restarted as
# NAME.log.<n>, so that waits on NAME.log (bed_wait_entry, a grep for plugin
# registration) only see what the new process wrote.
_bed_rotate_log() {
	local n=1
	[[ -e $E2E/logs/$1.log ]] || return 0
	while [[ -e $E2E/logs/$1.log.$n ]]; do n=$((n + 1)); done
	mv "$E2E/logs/$1.log" "$E2E/logs/$1.log.$n"
}

# bed_stop NAME [TIMEOUT_S] : SIGTERM the recorded process, SIGKILL it after
# TIMEOUT_S (default 10), forget it.
bed_stop() {
	local name=$1 timeout=${2:-10} pid i
	if pid=$(bed_pid "$name"); then
		kill -TERM "$pid" 2>/dev/null || true
		for ((i = 0; i < timeout * 10; i++)); do
			_bed_alive "$pid" || break
			sleep 0.1
		done
		if _bed_alive "$pid"; then
			_bed_log "$name ($pid) ignored SIGTERM for ${timeout}s; killing"
			kill -KILL "$pid" 2>/dev/null || true
			for ((i = 0; i < 100; i++)); do
				_bed_alive "$pid" || break
				sleep 0.1
			done
		fi
		# Reap it if it is our child, quietly (no "Terminated" report).
		wait "$pid" 2>/dev/null || true
	fi
	rm -f "$E2E/pids/$name"
}

# ---------------------------------------------------------------- configs

# _bed_runc_handlers SHIM : containerd runtime tables for the extra handler names in
# E2E_RUNC_HANDLERS (e.g. "kata-qemu kata-fc"), each served by runc like the default one: pods
# created with `crictl runp --runtime NAME` report NAME as their runtime handler (through CRI
# and NRI) while their containers stay host processes.
_bed_runc_handlers() {
	local h
	for h in ${E2E_RUNC_HANDLERS:-}; do
		[[ $h =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || _bed_die "E2E_RUNC_HANDLERS: bad name '$h'" || return 1
		cat <<EOF

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.'$h']
  runtime_type = 'io.containerd.runc.v2'
  runtime_path = '$1'

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.'$h'.options]
  BinaryName = '$NII_RUNC'
  SystemdCgroup = false
EOF
	done
}

_bed_write_containerd_config() {
	local shim=$NII_CONTAINERD_DIR/containerd-shim-runc-v2 extra
	extra=$(_bed_runc_handlers "$shim") || return 1
	cat >"$E2E/containerd/config.toml" <<EOF
# Generated by tests/e2e/lib/bed.sh. Absolute paths only: TOML expands nothing.
version = 3
root = '$E2E/containerd/root'
state = '$E2E/containerd/state'

[grpc]
  # CRI is served on this socket too.
  address = '$CONTAINERD_SOCK'

[plugins.'io.containerd.internal.v1.opt']
  # Default /opt/containerd would outlive the bed.
  path = '$E2E/containerd/opt'

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  # Must equal the imported pause image's normalized name, or CRI pulls.
  sandbox = '$E2E_PAUSE_IMAGE'

[plugins.'io.containerd.cri.v1.runtime']
  # Root here lacks CAP_SYS_RESOURCE: CRI's -998 for sandboxes would fail
  # every RunPodSandbox; this clamps scores to containerd's own.
  restrict_oom_score_adj = true
  disable_apparmor = true

[plugins.'io.containerd.cri.v1.runtime'.containerd]
  default_runtime_name = 'runc'

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = 'io.containerd.runc.v2'
  # Pin our shim: one found earlier in PATH (a distro containerd's) would win.
  runtime_path = '$shim'

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  BinaryName = '$NII_RUNC'
  SystemdCgroup = false
$extra

[plugins.'io.containerd.cri.v1.runtime'.cni]
  # Unused: every pod is host-network.
  bin_dirs = ['$E2E/cni/bin']
  conf_dir = '$E2E/cni/net.d'

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = '127.0.0.1'
  stream_server_port = '0'

[plugins.'io.containerd.nri.v1.nri']
  disable = false
  disable_connections = false
  socket_path = '$NRI_SOCK'
  plugin_path = '$E2E/nri/plugins'
  plugin_config_path = '$E2E/nri/conf.d'
  plugin_registration_timeout = '5s'
  plugin_request_timeout = '2s'
EOF
}

_bed_write_crictl_config() {
	# crictl's default 2 s timeout is shorter than NRI may legitimately take
	# (up to the request timeout per plugin per event).
	cat >"$E2E/crictl.yaml" <<EOF
runtime-endpoint: unix://$CRI_SOCK
image-endpoint: unix://$CRI_SOCK
timeout: 60
pull-image-on-create: false
disable-pull-on-run: true
EOF
}

# The bed's NRI settings for CRI-O, in the drop-in that sorts first in its
# --config-dir: a supplied drop-in (E2E_CRIO_NRI_DROPIN) sorts after it, so it
# overrides any of these keys and inherits the others.
_BED_CRIO_NRI_DROPIN=00-nii-e2e-nri.conf

# _bed_crio_runc : the runc CRI-O runs, printed: Debian's, or on hosts like
# this one a wrapper that first does to the bundle's config.json what
# containerd's CRI does itself, and nothing else:
# - without CAP_SYS_RESOURCE, root cannot lower oom_score_adj, so a container
#   asking for less than the runtime's own score (kubelet: -997 for
#   Guaranteed pods, CRI-O: -998 for infra containers) would fail; the score
#   is raised to the runtime's own, as restrict_oom_score_adj does;
# - the kubelet asks for a hugetlb limit (0) per page size, which CRI-O passes
#   on whenever the kernel has the controller (/proc/cgroups), and runc then
#   fails every container if no cgroup v1 hierarchy mounts it (hugetlb unused
#   on the unified hierarchy here); the limits are dropped, as containerd's
#   tolerate_missing_hugetlb_controller does.
_bed_crio_runc() {
	local w=$E2E/bin/runc-for-this-host oom=0 hugetlb=0 cap
	cap=$(awk '$1 == "CapEff:" { print $2 }' /proc/self/status)
	(((0x$cap >> 24) & 1)) || oom=1
	[[ -d /sys/fs/cgroup/hugetlb || $(stat -fc %T /sys/fs/cgroup) == cgroup2fs ]] || hugetlb=1
	if ((oom == 0 && hugetlb == 0)); then
		echo "$NII_RUNC"
		return 0
	fi
	{
		printf '#!/bin/bash\n'
		printf '# Generated by tests/e2e/lib/bed.sh (_bed_crio_runc): runc, after raising\n'
		printf "# oomScoreAdj to this process's own and dropping hugepageLimits in the\n"
		printf "# bundle's config.json, as chosen here.\n"
		printf 'clamp=%d drop=%d runc=%q\n' "$oom" "$hugetlb" "$NII_RUNC"
		cat <<'EOF'
bundle=
prev=
for a in "$@"; do
	case $prev in --bundle | -b) bundle=$a ;; esac
	case $a in --bundle=*) bundle=${a#--bundle=} ;; esac
	prev=$a
done
if [[ -n $bundle ]] && grep -qsE '"hugepageLimits"|"oomScoreAdj": *-' "$bundle/config.json"; then
	python3 -c '
import json, sys
path, clamp, drop = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
with open(path) as f:
    spec = json.load(f)
if drop:
    spec.get("linux", {}).get("resources", {}).pop("hugepageLimits", None)
proc = spec.get("process") or {}
if clamp and proc.get("oomScoreAdj") is not None:
    with open("/proc/self/oom_score_adj") as f:
        proc["oomScoreAdj"] = max(proc["oomScoreAdj"], int(f.read()))
with open(path + ".tmp", "w") as f:
    json.dump(spec, f)
' "$bundle/config.json" "$clamp" "$drop" || exit 1
	mv "$bundle/config.json.tmp" "$bundle/config.json" || exit 1
fi
exec "$runc" "$@"
EOF
	} >"$w"
	chmod 0755 "$w"
	_bed_log "CRI-O runs runc through $w (oom_score_adj clamp $oom, hugetlb limits dropped $hugetlb)"
	echo "$w"
}

_bed_write_crio_config() {
	local c=$E2E/crio name runc
	runc=$(_bed_crio_runc)
	# Every path CRI-O would otherwise use on the host is moved here; what
	# stays outside is read-only (binaries) or set by a supplied drop-in.
	cat >"$c/crio.conf" <<EOF
# Generated by tests/e2e/lib/bed.sh. NRI settings: crio.conf.d/.
[crio]
root = "$c/root"
runroot = "$c/run"
storage_driver = "overlay"
log_dir = "$c/pod-logs"
version_file = "$c/version"
clean_shutdown_file = "$c/clean.shutdown"

[crio.api]
listen = "$CRI_SOCK"
stream_address = "127.0.0.1"
stream_port = "0"

[crio.runtime]
default_runtime = "runc"
cgroup_manager = "cgroupfs"
selinux = false
# CRI-O's (and OpenShift's) default: no infra container for pods whose PID
# namespace is not POD (bed_pod_json's, the kubelet's by default).
drop_infra_ctr = true
pinns_path = "$NII_CRIO_DIR/pinns"
namespaces_dir = "$c/ns"
container_exits_dir = "$c/exits"
container_attach_socket_dir = "$c/attach"
decryption_keys_path = "$c/keys"
hooks_dir = ["$c/hooks.d"]
cdi_spec_dirs = ["$c/cdi"]
# The defaults name files under /etc/sysconfig.
irqbalance_config_file = "$c/irqbalance"
irqbalance_config_restore_file = "disable"
disable_hostport_mapping = true
log_level = "debug"

[crio.runtime.runtimes.runc]
runtime_path = "$runc"
runtime_type = "oci"
runtime_root = "$c/runc"
monitor_path = "/usr/bin/conmon"
# conmon in the pod's cgroup, which bed_down removes with everything in it.
monitor_cgroup = "pod"

[crio.image]
pause_image = "$E2E_PAUSE_IMAGE"
# Empty: the image's own entrypoint (lib/mkimage.py's has no /pause).
pause_command = ""
pinned_images = ["$E2E_PAUSE_IMAGE"]
signature_policy = "$c/policy.json"
signature_policy_dir = "$c/policies"
short_name_mode = "disabled"
big_files_temporary_dir = "$c/tmp"

[crio.network]
# Unused: every pod is host-network.
network_dir = "$E2E/cni/net.d"
plugin_dirs = ["$E2E/cni/bin"]

[crio.metrics]
enable_metrics = false
EOF
	cat >"$c/crio.conf.d/$_BED_CRIO_NRI_DROPIN" <<EOF
# Generated by tests/e2e/lib/bed.sh: the bed's NRI settings; a later drop-in
# overrides any of them.
[crio.nri]
enable_nri = true
nri_listen = "$E2E/nri/nri.sock"
nri_plugin_dir = "$E2E/nri/plugins"
nri_plugin_config_dir = "$E2E/nri/conf.d"
nri_plugin_registration_timeout = "5s"
nri_plugin_request_timeout = "2s"
EOF
	if [[ -n ${E2E_CRIO_NRI_DROPIN:-} ]]; then
		name=${E2E_CRIO_NRI_DROPIN##*/}
		[[ -f $E2E_CRIO_NRI_DROPIN ]] || _bed_die "E2E_CRIO_NRI_DROPIN: no file $E2E_CRIO_NRI_DROPIN" || return 1
		# CRI-O reads its drop-in directory in name order, later keys winning.
		[[ $name > "$_BED_CRIO_NRI_DROPIN" ]] ||
			_bed_die "E2E_CRIO_NRI_DROPIN: '$name' must sort after the bed's $_BED_CRIO_NRI_DROPIN" || return 1
		cp "$E2E_CRIO_NRI_DROPIN" "$c/crio.conf.d/$name"
	fi
	printf '{"default": [{"type": "insecureAcceptAnything"}]}\n' >"$c/policy.json"
	# Empty, with an empty .d directory: a host /etc/containers (skopeo or
	# podman bring one) must not reach the bed.
	: >"$c/registries.conf"
	cat >"$c/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$c/root"
runroot = "$c/run"
EOF
}

# _bed_crio_args : CRI-O's command line on the bed, in _BED_CRIO_ARGS (its
# environment: CONTAINERS_STORAGE_CONF=$E2E/crio/storage.conf).
_bed_crio_args() {
	# The auth directory has no key in the config template (default
	# /etc/crio/auth, created at startup): the flag moves it.
	_BED_CRIO_ARGS=(--config "$E2E/crio/crio.conf" --config-dir "$E2E/crio/crio.conf.d"
		--registries-conf "$E2E/crio/registries.conf"
		--registries-conf-dir "$E2E/crio/registries.conf.d"
		--namespaced-auth-dir "$E2E/crio/auth")
}

# _bed_crio ARGS... : CRI-O's binary with the bed's configuration.
_bed_crio() {
	_bed_crio_args
	CONTAINERS_STORAGE_CONF=$E2E/crio/storage.conf "$NII_CRIO_DIR/crio" "${_BED_CRIO_ARGS[@]}" "$@"
}

# _bed_crio_check_keys FILE... : CRI-O ignores keys it does not know without a
# word; print every key of FILEs that its own default configuration lacks
# (handler tables are checked against the default handler's keys; the
# template prints some [crio.runtime] keys after the handler table, where
# TOML files them under the handler, so those count for both).
_bed_crio_check_keys() {
	local defaults
	defaults=$(_bed_crio config --default 2>/dev/null) || _bed_die "crio config --default failed" || return 1
	python3 -c '
import sys, tomllib
default = tomllib.loads(sys.stdin.read())
runtime = default["crio"]["runtime"]
handler = next(iter(runtime["runtimes"].values()))
runtime.update({k: v for k, v in handler.items() if k not in runtime})
bad = []
def walk(path, have, want):
    for k, v in have.items():
        sub = f"{path}.{k}" if path else k
        if sub == "crio.runtime.runtimes":
            for name, h in v.items():
                walk(f"{sub}.{name}", h, handler)
        elif k not in want:
            bad.append(sub)
        elif isinstance(v, dict) and isinstance(want[k], dict):
            walk(sub, v, want[k])
for f in sys.argv[1:]:
    with open(f, "rb") as fh:
        walk("", tomllib.load(fh), default)
    for k in bad:
        print(f"{f}: unknown key {k}")
    bad.clear()' "$@" <<<"$defaults"
}

# _bed_crio_setting TABLE KEY DEFAULT : a key as CRI-O itself resolves the
# bed's file and drop-ins (`crio config` prints only keys off their default).
_bed_crio_setting() {
	local out
	out=$(_bed_crio config 2>/dev/null) || _bed_die "crio config failed" || return 1
	python3 -c '
import sys, tomllib
t = tomllib.loads(sys.stdin.read())
for part in sys.argv[1].split("."):
    t = t.get(part, {})
v = t.get(sys.argv[2], sys.argv[3])
print(str(v).lower() if isinstance(v, bool) else v)' "$1" "$2" "$3" <<<"$out"
}

_bed_write_spire_configs() {
	local ttl="" km='KeyManager "memory" { plugin_data {} }'
	if [[ -n ${E2E_SVID_TTL:-} ]]; then
		# Short SVIDs exercise rotation (SPIRE's default is 1h).
		ttl="default_x509_svid_ttl = \"$E2E_SVID_TTL\""
	fi
	if [[ ${E2E_SPIRE_SERVER_KEYMANAGER:-memory} == disk ]]; then
		# The CA's keys survive a server restart; with "memory" a restarted server signs
		# with a new CA that no agent trusts yet, and the agents stop.
		km="KeyManager \"disk\" { plugin_data { keys_path = \"$E2E/spire/server/data/keys.json\" } }"
	fi
	cat >"$E2E/spire/server.conf" <<EOF
server {
  bind_address = "127.0.0.1"
  bind_port    = "$E2E_SPIRE_PORT"
  socket_path  = "$SPIRE_SERVER_SOCK"
  trust_domain = "$E2E_TD"
  data_dir     = "$E2E/spire/server/data"
  log_level    = "DEBUG"
  $ttl
  # Agents only see entries once the server's in-memory entry cache reloads
  # (default every 5s), whatever the agent's sync_interval: 1s here.
  experimental { cache_reload_interval = "1s" }
}
plugins {
  DataStore "sql" {
    plugin_data {
      database_type     = "sqlite3"
      connection_string = "$E2E/spire/server/data/datastore.sqlite3"
    }
  }
  NodeAttestor "join_token" { plugin_data {} }
  $km
}
EOF
	local k8s=""
	if [[ ${E2E_K8S_ATTESTOR:-0} == 1 ]]; then
		# For lib/kubelet.sh: the agent reads the kubelet's read-only port
		# from its config, so the port is chosen now and kubelet_up uses it.
		# E2E_K8S_DISABLE_CONTAINER_SELECTORS=true: pod-level selectors only.
		KUBELET_RO_PORT=${KUBELET_RO_PORT:-$(_bed_free_port)}
		export KUBELET_RO_PORT
		# With E2E_BROKER=1 the plugin resolves the broker's pod references too, for the
		# daemon only, among the kubelet's pods (agent_node), without asking the API server
		# whether the daemon may impersonate the pod (permissive: this bed has none).
		local k8s_broker=""
		if [[ ${E2E_BROKER:-0} == 1 ]]; then
			k8s_broker="experimental {
        broker {
          access_policy = \"permissive\"
          brokers = [{ id = \"$E2E_DELEGATE_ID\", pod_reference_scope = \"agent_node\" }]
        }
      }"
		fi
		k8s="WorkloadAttestor \"k8s\" {
    plugin_data {
      kubelet_read_only_port      = $KUBELET_RO_PORT
      use_new_container_locator   = true
      disable_container_selectors = ${E2E_K8S_DISABLE_CONTAINER_SELECTORS:-false}
      $k8s_broker
    }
  }"
	fi
	# E2E_BROKER=1: the agent also serves the SPIFFE Broker API (SPIRE v1.15.2 and later) at
	# BROKER_SOCK, to the daemon's SPIFFE ID only, for every reference type.
	local broker=""
	if [[ ${E2E_BROKER:-0} == 1 ]]; then
		broker="broker {
      socket_path = \"$BROKER_SOCK\"
      brokers = [{ id = \"$E2E_DELEGATE_ID\", allowed_reference_types = [{ type_url = \"*\" }] }]
    }"
	fi
	# The admin socket must not be in or below the public socket's directory
	# (the agent refuses to start otherwise), hence spire/admin vs spire/public.
	cat >"$E2E/spire/agent.conf" <<EOF
agent {
  data_dir             = "$E2E/spire/agent/data"
  log_level            = "DEBUG"
  server_address       = "127.0.0.1"
  server_port          = "$E2E_SPIRE_PORT"
  trust_domain         = "$E2E_TD"
  socket_path          = "$AGENT_SOCK"
  admin_socket_path    = "$ADMIN_SOCK"
  trust_bundle_path    = "$E2E/spire/bundle.pem"
  authorized_delegates = ["$E2E_DELEGATE_ID"]
  # Default 5s; 1s makes new entries reach the agent quickly.
  experimental {
    sync_interval = "1s"
    $broker
  }
}
plugins {
  NodeAttestor "join_token" { plugin_data {} }
  # Disk keys let the agent restart (bed_restart_agent) without a new token.
  KeyManager "disk" {
    plugin_data { directory = "$E2E/spire/agent/data" }
  }
  WorkloadAttestor "unix" {
    # Enables unix:path/sha256 selectors (resolved from /proc/<pid>/exe). The agent then hashes
    # the executable of every process it attests, the Delegated Identity API's caller
    # included, on every call; E2E_UNIX_DISCOVER_WORKLOAD_PATH=false (the plugin's default)
    # measures without that (tests/e2e/bench.sh).
    plugin_data { discover_workload_path = ${E2E_UNIX_DISCOVER_WORKLOAD_PATH:-true} }
  }
  $k8s
}
EOF
}

# Single-word wrappers, so tests (and non-bash callers) can run "$CRICTL" ...
_bed_write_wrappers() {
	local b=$E2E/bin
	printf '#!/bin/sh\nexec %q --config %q "$@"\n' \
		"$NII_CRICTL_DIR/crictl" "$E2E/crictl.yaml" >"$b/crictl"
	if [[ $E2E_RUNTIME == containerd ]]; then
		printf '#!/bin/sh\nexec %q -a %q -n k8s.io "$@"\n' \
			"$NII_CONTAINERD_DIR/ctr" "$CONTAINERD_SOCK" >"$b/ctr"
		chmod 0755 "$b/ctr"
	fi
	# spire-server wants -socketPath after the subcommand words ("entry
	# create -socketPath ..."): insert it before the first flag.
	cat >"$b/spire-server" <<EOF
#!/usr/bin/env bash
set -euo pipefail
words=()
while ((\$#)) && [[ \$1 != -* ]]; do words+=("\$1"); shift; done
exec '$NII_SPIRE_DIR/spire-server' "\${words[@]}" -socketPath '$SPIRE_SERVER_SOCK' "\$@"
EOF
	chmod 0755 "$b/crictl" "$b/spire-server"
}

# ---------------------------------------------------------------- runtimes

# _bed_runtime_proc : the bed_spawn name (and log name) of the runtime daemon.
_bed_runtime_proc() {
	case ${E2E_RUNTIME:-containerd} in
	cri-o) echo crio ;;
	*) echo containerd ;;
	esac
}

_bed_start_runtime() {
	case $E2E_RUNTIME in
	containerd) _bed_start_containerd ;;
	cri-o) _bed_start_crio ;;
	esac
}

# bed_restart_runtime : stop the runtime daemon (containers keep running) and
# start it again; the old log is kept as <name>.log.<n>.
bed_restart_runtime() {
	local t name
	t=$(_bed_ms)
	name=$(_bed_runtime_proc)
	bed_stop "$name" 30
	_bed_rotate_log "$name"
	_bed_start_runtime || return 1
	_bed_log "$E2E_RUNTIME restarted in $(_bed_since "$t")"
}

# _bed_socket_live PATH : something accepts connections on the socket.
_bed_socket_live() {
	python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$1" 2>/dev/null
}

# _bed_clear_nri_socket : a stale NRI socket would make the readiness check
# pass too early; a live one belongs to a runtime this bed does not own.
_bed_clear_nri_socket() {
	[[ -n $NRI_SOCK && -e $NRI_SOCK ]] || return 0
	if _bed_socket_live "$NRI_SOCK"; then
		_bed_die "NRI socket $NRI_SOCK is in use by another process"
		return 1
	fi
	rm -f "$NRI_SOCK"
}

# _bed_wait_runtime : CRI answers, then the NRI socket exists (it appears
# just before CRI reports ready on both runtimes, but poll anyway).
_bed_wait_runtime() {
	bed_wait 60 "$E2E_RUNTIME CRI" "$CRICTL" info || return 1
	[[ -z $NRI_SOCK ]] || bed_wait 30 "NRI socket $NRI_SOCK" test -S "$NRI_SOCK"
}

_bed_import_images() {
	local out
	gcc -static -Os -s -o "$E2E/images/idcheck" "$_BED_LIB/../tools/idcheck/idcheck.c" || return 1
	python3 "$_BED_LIB/mkimage.py" --scratch-binary "$E2E/images/idcheck" "$E2E/images" >/dev/null || return 1
	bed_load_image "$E2E/images/pause.tar" "$E2E_PAUSE_IMAGE" || return 1
	bed_load_image "$E2E/images/e2e-busybox.tar" "$E2E_IMAGE" || return 1
	bed_load_image "$E2E/images/e2e-scratch.tar" "$E2E_SCRATCH_IMAGE" || return 1
	out=$("$CRICTL" images) || return 1
	if ! grep -q 'registry.k8s.io/pause  *3\.10\.2' <<<"$out" ||
		! grep -q 'docker.io/library/e2e-busybox  *1 ' <<<"$out" ||
		! grep -q 'docker.io/library/e2e-scratch  *1 ' <<<"$out"; then
		_bed_die "imported images not visible to CRI:"$'\n'"$out"
	fi
}

# bed_load_image OCI-ARCHIVE NAME : make the image in the archive (as written
# by lib/mkimage.py) available to CRI under NAME.
bed_load_image() {
	local tar=$1 name=$2 out c=$E2E/crio
	case $E2E_RUNTIME in
	containerd)
		# The name comes from the archive's index; quiet unless it fails:
		# ctr echoes containerd's cgroup v1 deprecation warning every time.
		out=$("$CTR" images import "$tar" 2>&1) || _bed_die "ctr images import $tar: $out" || return 1
		;;
	cri-o)
		# Straight into CRI-O's storage, as CRI-O's own test suite does. The
		# copy records blobs in a cache whose path is fixed for root
		# (/var/lib/containers/cache; no flag or variable moves it): give it a
		# private mount namespace with an empty tmpfs on /var/lib, so that
		# nothing reaches the host's. Archives unpack in TMPDIR.
		out=$(CONTAINERS_STORAGE_CONF=$c/storage.conf TMPDIR=$c/tmp unshare --mount --propagation private \
			sh -c 'mount -t tmpfs -o size=16m,mode=0755 nii-e2e-var-lib /var/lib && exec "$@"' copyimg \
			"$NII_CRIO_DIR/copyimg" --root "$c/root" --runroot "$c/run" --storage-driver overlay \
			--signature-policy "$c/policy.json" \
			--image-name "$name" --import-from "oci-archive:$tar" 2>&1) ||
			_bed_die "copyimg $tar as $name: $out" || return 1
		;;
	esac
}

# ---------------------------------------------------------------- containerd

_bed_start_containerd() {
	_bed_clear_nri_socket || return 1
	bed_spawn containerd "$NII_CONTAINERD_DIR/containerd" \
		--config "$E2E/containerd/config.toml" --log-level debug >/dev/null
	_bed_wait_runtime
}

# ---------------------------------------------------------------- CRI-O

_bed_start_crio() {
	_bed_clear_nri_socket || return 1
	_bed_crio_args
	bed_spawn crio env CONTAINERS_STORAGE_CONF="$E2E/crio/storage.conf" \
		"$NII_CRIO_DIR/crio" "${_BED_CRIO_ARGS[@]}" >/dev/null
	_bed_wait_runtime
}

# _bed_crio_nri_paths : resolve CRI-O's effective NRI settings (the bed's
# drop-in plus a supplied one) into NRI_SOCK, and record every directory
# outside the scratch directory that CRI-O may create for them, so that
# bed_down removes exactly what was not there before.
_bed_crio_nri_paths() {
	local enabled p d
	enabled=$(_bed_crio_setting crio.nri enable_nri true) || return 1
	if [[ $enabled != true ]]; then
		NRI_SOCK=""
		_bed_log "CRI-O's NRI is disabled by the drop-ins: no NRI socket"
		return 0
	fi
	NRI_SOCK=$(_bed_crio_setting crio.nri nri_listen /var/run/nri/nri.sock) || return 1
	for p in "$NRI_SOCK" \
		"$(_bed_crio_setting crio.nri nri_plugin_dir /opt/nri/plugins)/x" \
		"$(_bed_crio_setting crio.nri nri_plugin_config_dir /etc/nri/conf.d)/x"; do
		[[ $p == "$E2E"/* ]] && continue
		_bed_log "CRI-O NRI path outside the bed: ${p%/x}"
		[[ $p == */x ]] || echo "file $p" >>"$E2E/host-paths"
		# Missing ancestors, deepest first.
		d=$(dirname "$p")
		while [[ $d != / && ! -e $d ]]; do
			echo "dir $d" >>"$E2E/host-paths"
			d=$(dirname "$d")
		done
	done
}

# ---------------------------------------------------------------- SPIRE

# bed_ec_key FILE : a new EC P-256 private key, PKCS#8 PEM.
bed_ec_key() {
	openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl pkcs8 -topk8 -nocrypt -out "$1"
}

# bed_ca DIR NAME CN : a self-signed EC P-256 CA valid one day, DIR/NAME.pem
# and DIR/NAME-key.pem.
bed_ca() {
	bed_ec_key "$1/$2-key.pem" &&
		openssl req -x509 -new -key "$1/$2-key.pem" -subj "/CN=$3" -days 1 -out "$1/$2.pem" \
			-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
}

# bed_cert DIR CA NAME SUBJECT server|client [SANS] : a leaf certificate signed by
# DIR/CA.pem for one day, DIR/NAME.pem and DIR/NAME-key.pem; SANS e.g.
# IP:127.0.0.1,DNS:localhost.
bed_cert() {
	local d=$1 ca=$2 name=$3 subject=$4 use=$5 sans=${6:-}
	bed_ec_key "$d/$name-key.pem" || return 1
	openssl req -new -key "$d/$name-key.pem" -subj "$subject" -out "$d/$name.csr" 2>/dev/null || return 1
	{
		printf 'extendedKeyUsage=%sAuth\nkeyUsage=critical,digitalSignature\n' "$use"
		[[ -z $sans ]] || printf 'subjectAltName=%s\n' "$sans"
	} >"$d/$name.ext"
	openssl x509 -req -in "$d/$name.csr" -CA "$d/$ca.pem" -CAkey "$d/$ca-key.pem" -CAcreateserial \
		-days 1 -extfile "$d/$name.ext" -out "$d/$name.pem" 2>/dev/null || return 1
	rm -f "$d/$name.csr" "$d/$name.ext"
}

_bed_free_port() {
	python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

_bed_start_agent() {
	# Extra arguments (the join token) go to `spire-agent run`.
	bed_spawn spire-agent "$SPIRE_AGENT" run -config "$E2E/spire/agent.conf" "$@" >/dev/null
	bed_wait 60 "spire-agent health" "$SPIRE_AGENT" healthcheck -socketPath "$AGENT_SOCK"
}

_bed_start_spire() {
	local token
	E2E_SPIRE_PORT=${E2E_SPIRE_PORT:-$(_bed_free_port)}
	export E2E_SPIRE_PORT
	_bed_write_spire_configs
	bed_spawn spire-server "$NII_SPIRE_DIR/spire-server" run -config "$E2E/spire/server.conf" >/dev/null
	bed_wait 60 "spire-server health" "$SPIRE_SERVER" healthcheck || return 1
	"$SPIRE_SERVER" bundle show >"$E2E/spire/bundle.pem" || return 1
	# The -spiffeID makes the agent's alias that every entry is parented to.
	token=$("$SPIRE_SERVER" token generate -spiffeID "$E2E_NODE_ID" | sed -n 's/^Token: *//p')
	[[ -n $token ]] || _bed_die "no join token from spire-server" || return 1
	_bed_start_agent -joinToken "$token" || return 1
	# The plugin runs as root; workloads run as 1001, so uid 0 names only it.
	bed_entry "$E2E_DELEGATE_ID" unix:uid:0 >/dev/null
}

bed_restart_agent() {
	local t
	t=$(_bed_ms)
	bed_stop spire-agent 30
	_bed_rotate_log spire-agent
	# No token: the agent re-uses its SVID and key from the disk KeyManager.
	_bed_start_agent || return 1
	_bed_log "spire-agent restarted in $(_bed_since "$t")"
}

# bed_entry SPIFFE-PATH SELECTOR... [-- EXTRA-ARGS...] : create a workload
# entry parented to the node alias; prints the entry ID. SPIFFE-PATH is
# "/name" (in $E2E_TD) or a full spiffe:// ID. EXTRA-ARGS go verbatim to
# `spire-server entry create` (e.g. -x509SVIDTTL 120, -hint h).
bed_entry() {
	local id=$1 out eid args=()
	shift
	[[ $id == spiffe://* ]] || id=spiffe://$E2E_TD$id
	while (($#)); do
		if [[ $1 == -- ]]; then
			shift
			args+=("$@")
			break
		fi
		args+=(-selector "$1")
		shift
	done
	out=$("$SPIRE_SERVER" entry create -parentID "$E2E_NODE_ID" -spiffeID "$id" "${args[@]}") ||
		_bed_die "entry create $id failed: $out" || return 1
	eid=$(sed -n 's/^Entry ID *: *//p' <<<"$out")
	[[ -n $eid ]] || _bed_die "no entry ID in: $out" || return 1
	echo "$eid" >>"$E2E/spire/entries"
	echo "$eid"
}

# bed_wait_entry [ENTRY-ID...] [--timeout S] : wait until the agent's cache
# holds the given entries (default: every entry bed_entry created) with an
# SVID minted, read from the agent's debug log ("SVID updated" entry=<id>,
# logged after "Entry created"; later rotations log it again).
bed_wait_entry() {
	local ids=() timeout=30 id
	while (($#)); do
		case $1 in
		--timeout)
			timeout=$2
			shift 2
			;;
		*)
			ids+=("$1")
			shift
			;;
		esac
	done
	if ((${#ids[@]} == 0)); then
		mapfile -t ids <"$E2E/spire/entries"
	fi
	for id in "${ids[@]}"; do
		bed_wait "$timeout" "agent sync of entry $id" \
			grep -q "SVID updated.*entry=$id" "$E2E/logs/spire-agent.log" || return 1
	done
}

# ---------------------------------------------------------------- pods

# bed_pod_json NAME UID [ANNOTATIONS-JSON] : write a host-network pod config
# for `crictl runp`/`create`; prints its path.
bed_pod_json() {
	local name=$1 uid=$2 ann=${3:-'{}'} f=$E2E/specs/pod-$1.json
	python3 - "$name" "$uid" "$ann" "$E2E" "$E2E_RUN_ID" >"$f" <<'EOF' || return 1
import json, sys
name, uid, ann, e2e, run = sys.argv[1:]
json.dump({
    "metadata": {"name": name, "namespace": "e2e", "uid": uid, "attempt": 0},
    "log_directory": f"{e2e}/logs/pods/{name}",
    # Own resolv.conf instead of depending on the host's.
    "dns_config": {"servers": ["127.0.0.1"]},
    "labels": {"nii-e2e": run},
    "annotations": json.loads(ann),
    "linux": {
        # Unique per run: bed_down removes the whole subtree, and no run
        # can trip over a leftover of another.
        "cgroup_parent": f"/kubepods/nii-e2e-{run}/pod{uid}",
        # network 2 = NODE: no netns, no CNI. No hostname: without a UTS
        # namespace runc refuses to set one. pid 1 = CONTAINER (the kubelet's
        # default; CRI-O then runs no infra container), ipc 0 = POD.
        "security_context": {"namespace_options": {"network": 2, "pid": 1, "ipc": 0}},
    },
}, sys.stdout, indent=1)
EOF
	echo "$f"
}

# bed_ctr_json NAME COMMAND... : write a container config (busybox image,
# uid ${E2E_CTR_UID:-1001}, gid ${E2E_CTR_GID} if set, seccomp RuntimeDefault);
# prints its path. Run as non-root so unix:uid selectors tell workloads from
# the root plugin. E2E_CTR_IMAGE: another image (e.g. $E2E_SCRATCH_IMAGE);
# E2E_CTR_READONLY=1: a read-only root file system; E2E_CTR_EXTRA: a JSON object
# of further CRI container config keys (annotations, mounts).
bed_ctr_json() {
	local name=$1 f=$E2E/specs/ctr-$1.json
	shift
	python3 - "$name" "${E2E_CTR_UID:-1001}" "${E2E_CTR_GID:-}" "${E2E_CTR_IMAGE:-$E2E_IMAGE}" \
		"${E2E_CTR_READONLY:-0}" "${E2E_CTR_EXTRA:-"{}"}" "$@" >"$f" <<'EOF' || return 1
import json, sys
name, uid, gid, image, readonly, extra, *cmd = sys.argv[1:]
security = {
    "namespace_options": {"network": 2, "pid": 1, "ipc": 0},
    "run_as_user": {"value": int(uid)},
    "seccomp": {"profile_type": 0},
    "readonly_rootfs": readonly == "1",
}
if gid:
    security["run_as_group"] = {"value": int(gid)}
config = {
    "metadata": {"name": name},
    "image": {"image": image},
    "command": cmd,
    # CRI-O names the container (NRI's Container.name) from this label, which
    # the kubelet sets and crictl does not; containerd ignores it.
    "labels": {"io.kubernetes.container.name": name},
    "log_path": f"{name}.log",
    "linux": {"security_context": security},
}
config.update(json.loads(extra))
json.dump(config, sys.stdout, indent=1)
EOF
	echo "$f"
}

# bed_runtime_only RUNTIME REASON : for a script not (yet) made to run on every
# runtime: exits 2, saying REASON, unless E2E_RUNTIME is RUNTIME.
bed_runtime_only() {
	if [[ ${E2E_RUNTIME:-containerd} != "$1" ]]; then
		printf '%s: runs on %s only, not E2E_RUNTIME=%s: %s\n' "${0##*/}" "$1" "$E2E_RUNTIME" "$2" >&2
		exit 2
	fi
}

# bed_rmp POD-ID... : remove the pods, their containers first and without grace:
# containerd's StopPodSandbox kills them at once, CRI-O's gives each running one
# the rest of the request's deadline (crictl's timeout, 60 s) to exit on SIGTERM,
# which a shell as PID 1 ignores.
bed_rmp() {
	local id cids=()
	for id in "$@"; do
		mapfile -t -O "${#cids[@]}" cids < <("$E2E/bin/crictl" ps -aq --pod "$id")
	done
	if ((${#cids[@]})); then "$E2E/bin/crictl" rm -f "${cids[@]}" >/dev/null || return 1; fi
	"$E2E/bin/crictl" rmp -f "$@" >/dev/null
}

# bed_ctr_exit_code CID : the exit code of an exited container.
bed_ctr_exit_code() {
	"$CRICTL" inspect -o go-template --template '{{.status.exitCode}}' "$1"
}

# bed_ctr_state CID : CONTAINER_CREATED, CONTAINER_RUNNING, CONTAINER_EXITED...
bed_ctr_state() {
	"$CRICTL" inspect -o go-template --template '{{.status.state}}' "$1"
}

# bed_wait_exited CID [TIMEOUT_S] : wait until the container has exited.
bed_wait_exited() {
	bed_wait "${2:-30}" "container $1 to exit" _bed_is_exited "$1"
}
_bed_is_exited() { [[ $(bed_ctr_state "$1") == CONTAINER_EXITED ]]; }

# ---------------------------------------------------------------- up / down

# Host paths a runtime of the bed could create outside $E2E (defaults that the
# configs move away, and what their tools write): bed_up records which are
# absent, bed_check_clean proves they still are.
_BED_HOST_WATCH=(/run/containerd /run/crio /var/lib/crio /var/log/crio /etc/crio
	/run/containers /var/lib/containers /etc/containers /run/runc /run/nri
	/opt/nri /etc/nri /run/netns /etc/sysconfig)

bed_up() {
	local t0 t p
	t0=$(_bed_ms)
	E2E_RUNTIME=${E2E_RUNTIME:-containerd}
	case $E2E_RUNTIME in
	containerd | cri-o) ;;
	*) _bed_die "E2E_RUNTIME=$E2E_RUNTIME: containerd or cri-o" || return 1 ;;
	esac
	export E2E_RUNTIME
	nii_build_all || return 1
	if [[ $E2E_RUNTIME == cri-o ]]; then nii_build_crio || return 1; fi
	# One bed per host; wait for a concurrent one rather than corrupting it.
	exec {_BED_LOCK_FD}>"${E2E_LOCK:-/run/lock/nii-e2e.lock}"
	flock -w "${E2E_LOCK_WAIT:-900}" "$_BED_LOCK_FD" || _bed_die "another bed holds the lock" || return 1

	# Short: every socket path must fit sun_path (108 bytes).
	E2E=$(mktemp -d "${E2E_TMPDIR:-/tmp}/nii-e2e.XXXXXX")
	# World-traversable, so a non-root host process can reach the agent's
	# public socket (as /run/spire/sockets would be).
	chmod 0755 "$E2E"
	E2E_RUN_ID=${E2E##*.}
	echo "$E2E_RUNTIME" >"$E2E/runtime"
	: >"$E2E/host-paths"
	for p in "${_BED_HOST_WATCH[@]}"; do
		[[ -e $p ]] || echo "$p"
	done >"$E2E/host-absent"
	NRI_SOCK=$E2E/nri/nri.sock
	SPIRE_SERVER_SOCK=$E2E/spire/server/api.sock
	AGENT_SOCK=$E2E/spire/public/api.sock
	ADMIN_SOCK=$E2E/spire/admin/admin.sock
	BROKER_SOCK=$E2E/spire/broker/broker.sock
	CRICTL=$E2E/bin/crictl
	SPIRE_SERVER=$E2E/bin/spire-server
	SPIRE_AGENT=$NII_SPIRE_DIR/spire-agent
	E2E_RUNTIME_LOG=$E2E/logs/$(_bed_runtime_proc).log
	mkdir -p "$E2E"/{bin,pids,nri/plugins,nri/conf.d,logs/pods,specs,images,cni/bin,cni/net.d} \
		"$E2E"/spire/{server/data,agent/data,public,admin,broker}
	chmod 0755 "$E2E/spire" "$E2E/spire/public"
	: >"$E2E/spire/entries"
	case $E2E_RUNTIME in
	containerd)
		CONTAINERD_SOCK=$E2E/containerd/containerd.sock
		CRI_SOCK=$CONTAINERD_SOCK
		CTR=$E2E/bin/ctr
		export CONTAINERD_SOCK CTR
		mkdir -p "$E2E/containerd"
		_bed_write_containerd_config || return 1
		;;
	cri-o)
		CRI_SOCK=$E2E/crio/crio.sock
		mkdir -p "$E2E"/crio/{crio.conf.d,registries.conf.d,hooks.d,cdi,pod-logs,tmp,auth}
		_bed_write_crio_config || return 1
		p=$(_bed_crio_check_keys "$E2E/crio/crio.conf" "$E2E/crio/crio.conf.d/$_BED_CRIO_NRI_DROPIN") || return 1
		[[ -z $p ]] || _bed_die "CRI-O would ignore part of the bed's config:"$'\n'"$p" || return 1
		if [[ -n ${E2E_CRIO_NRI_DROPIN:-} ]]; then
			p=$(_bed_crio_check_keys "$E2E_CRIO_NRI_DROPIN") || return 1
			[[ -z $p ]] || _bed_log "warning: CRI-O ignores part of E2E_CRIO_NRI_DROPIN:"$'\n'"$p"
		fi
		_bed_crio_nri_paths || return 1
		;;
	esac
	export E2E E2E_RUN_ID CRI_SOCK E2E_RUNTIME_LOG NRI_SOCK SPIRE_SERVER_SOCK AGENT_SOCK \
		ADMIN_SOCK BROKER_SOCK CRICTL SPIRE_SERVER SPIRE_AGENT
	_bed_write_crictl_config
	_bed_write_wrappers
	_bed_log "scratch $E2E (run $E2E_RUN_ID, $E2E_RUNTIME)"

	t=$(_bed_ms)
	_bed_start_runtime || return 1
	if [[ $E2E_RUNTIME == containerd ]]; then
		# containerd only warns about misspelt keys: make that fatal here.
		if grep 'Ignoring unknown key in TOML' "$E2E_RUNTIME_LOG" >&2; then
			_bed_die "containerd ignored part of the config (see above)"
			return 1
		fi
		# Informational: CRI and NRI themselves were proven by the waits above.
		grep 'failed to load plugin' "$E2E_RUNTIME_LOG" >&2 || true
	fi
	_bed_log "$E2E_RUNTIME ready in $(_bed_since "$t")"

	t=$(_bed_ms)
	_bed_import_images || return 1
	_bed_log "images imported in $(_bed_since "$t")"

	if [[ ${E2E_SPIRE:-1} != 0 ]]; then
		t=$(_bed_ms)
		_bed_start_spire || return 1
		_bed_log "spire server+agent ready in $(_bed_since "$t")"
	fi
	_bed_log "up in $(_bed_since "$t0")"
}

# Mount points at or below $E2E, deepest first.
_bed_mounts() {
	local mp
	[[ -n ${E2E:-} ]] || return 0
	while read -r _ _ _ _ mp _; do
		# mountinfo escapes space, tab, newline and backslash as octal.
		mp=$(printf '%b' "$mp")
		if [[ $mp == "$E2E" || $mp == "$E2E"/* ]]; then
			echo "$mp"
		fi
	done </proc/self/mountinfo | sort -r
}

# Every cgroup (v1 and v2) mount point of this host.
_bed_cgroup_roots() {
	awk '$9 == "cgroup" || $9 == "cgroup2" { print $5 }' /proc/self/mountinfo | sort -u
}

# _bed_regex STRING : STRING as an extended regex matching itself literally.
_bed_regex() {
	# shellcheck disable=SC2001 # a bracket expression is clearer than a loop
	sed 's/[][\\.*^$+?(){}|]/\\&/g' <<<"$1"
}

# PIDs of processes that belong to this run: in its cgroups, or with the
# scratch dir on their command line (shims: -address $E2E/...; daemons:
# -config $E2E/...). Never the calling shell or its ancestors.
_bed_run_pids() {
	local root p keep=" " cur=$BASHPID
	[[ -n ${E2E:-} ]] || return 0
	while ((cur > 1)); do
		keep+="$cur "
		cur=$(awk '{ print $4 }' "/proc/$cur/stat" 2>/dev/null) || break
	done
	{
		for root in $(_bed_cgroup_roots); do
			[[ -d $root/kubepods/nii-e2e-$E2E_RUN_ID ]] || continue
			find "$root/kubepods/nii-e2e-$E2E_RUN_ID" -name cgroup.procs -exec cat {} + 2>/dev/null || true
		done
		# The dot in brackets keeps this grep from matching its own
		# command line.
		grep -lsE -- "$(_bed_regex "${E2E%.*}")[.]$E2E_RUN_ID/" /proc/[0-9]*/cmdline | cut -d/ -f3 || true
	} | sort -un | while read -r p; do
		if [[ $keep != *" $p "* ]]; then
			echo "$p"
		fi
	done
}

# bed_down [STATUS] : tear everything down; safe to call repeatedly, after a
# partial bed_up, or from another shell with E2E set. A non-zero STATUS keeps
# a copy of the logs for post-mortems in ${E2E_TMPDIR:-/tmp}/nii-e2e-logs.<run>
# (E2E_KEEP_LOGS=0: never, E2E_KEEP_LOGS=always: also on success).
bed_down() {
	local status=${1:-0} t name mp root p keep i kind runtime
	[[ -n ${E2E:-} && -d $E2E ]] || return 0
	t=$(_bed_ms)
	E2E_RUN_ID=${E2E##*.}
	# From another shell (after a crash) only $E2E is known.
	runtime=$(cat "$E2E/runtime" 2>/dev/null || echo containerd)
	E2E_RUNTIME=${E2E_RUNTIME:-$runtime}
	runtime=$(_bed_runtime_proc)
	# Add-on libraries' teardowns first (lib/kubelet.sh: the kubelet must stop
	# before the pods go, or it recreates them).
	for name in ${BED_DOWN_HOOKS:-}; do
		"$name" || _bed_log "down hook $name failed"
	done
	# Pods first, while the runtime (and any plugin) still run: stopping a pod
	# kills its containers without grace, and the shims (conmons) exit with
	# them.
	if [[ -x $E2E/bin/crictl ]] && bed_pid "$runtime" >/dev/null; then
		timeout 120 "$E2E/bin/crictl" rm -af >/dev/null 2>&1 || _bed_log "crictl rm -af failed"
		timeout 120 "$E2E/bin/crictl" rmp -af >/dev/null 2>&1 || _bed_log "crictl rmp -af failed"
	fi
	# Extra processes (plugins) before the daemons they talk to.
	for name in "$E2E"/pids/*; do
		[[ -e $name ]] || continue
		name=${name##*/}
		case $name in containerd | crio | spire-agent | spire-server) continue ;; esac
		bed_stop "$name"
	done
	for name in spire-agent spire-server containerd crio; do
		bed_stop "$name" 30
	done
	# Whatever survived (a shim, conmon or container of a pod CRI failed to
	# remove).
	for i in 1 2 3; do
		keep=$(_bed_run_pids)
		[[ -n $keep ]] || break
		_bed_log "killing leftover processes: ${keep//$'\n'/ }"
		for p in $keep; do kill -KILL "$p" 2>/dev/null || true; done
		# Reap our own children quietly (no "Killed" job reports).
		for p in $keep; do wait "$p" 2>/dev/null || true; done
		sleep 0.5
	done
	# Rootfs overlays, sandbox shm and CRI-O's pinned namespaces normally go
	# with the pods.
	while read -r mp; do
		[[ -n $mp ]] || continue
		umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || _bed_log "cannot unmount $mp"
	done < <(_bed_mounts)
	# runc removes only leaf cgroups; the pod parents stay in every hierarchy.
	for root in $(_bed_cgroup_roots); do
		if [[ -d $root/kubepods/nii-e2e-$E2E_RUN_ID ]]; then
			find "$root/kubepods/nii-e2e-$E2E_RUN_ID" -depth -type d -exec rmdir {} + 2>/dev/null ||
				_bed_log "cannot remove cgroup $root/kubepods/nii-e2e-$E2E_RUN_ID"
		fi
		# Shared parent: goes only once empty (rmdir refuses otherwise).
		rmdir "$root/kubepods" 2>/dev/null || true
	done
	if [[ -d $E2E/logs ]] && [[ ${E2E_KEEP_LOGS:-1} == always || ($status != 0 && ${E2E_KEEP_LOGS:-1} != 0) ]]; then
		keep=${E2E_TMPDIR:-/tmp}/nii-e2e-logs.$E2E_RUN_ID
		rm -rf "$keep"
		cp -a "$E2E/logs" "$keep" 2>/dev/null && _bed_log "status $status: logs kept in $keep"
	fi
	# Outside $E2E: what a supplied CRI-O drop-in named (an NRI socket and
	# the directories CRI-O made for it), recorded by bed_up.
	_BED_HOST_PATHS=$(cat "$E2E/host-paths" 2>/dev/null || true)
	_BED_HOST_ABSENT=$(cat "$E2E/host-absent" 2>/dev/null || true)
	while read -r kind p; do
		case $kind in
		file) rm -f "$p" ;;
		dir) rmdir "$p" 2>/dev/null || _bed_log "cannot remove $p (not empty?)" ;;
		esac
	done <<<"$_BED_HOST_PATHS"
	# --one-file-system: never descend into something still mounted.
	rm -rf --one-file-system "$E2E" || _bed_log "cannot remove $E2E"
	# bed_check_clean looks for containerd's host paths only after a containerd bed: a
	# CRI-O bed never makes them, and whatever is there belongs to another run.
	_BED_DOWN_RUNTIME=$runtime
	if [[ $runtime == containerd ]]; then
		# containerd keeps shim sockets and runc state outside root/state.
		rm -rf /run/containerd/s /run/containerd/runc/k8s.io
		rmdir /run/containerd/runc /run/containerd 2>/dev/null || true
	fi
	if [[ -n ${_BED_LOCK_FD:-} ]]; then
		exec {_BED_LOCK_FD}>&-
		unset _BED_LOCK_FD
	fi
	_bed_log "down in $(_bed_since "$t")"
}

# bed_check_clean : after bed_down, verify this run left nothing behind;
# prints what it finds and fails if anything.
bed_check_clean() {
	local bad=0 p root
	[[ -n ${E2E:-} ]] || _bed_die "E2E is not set" || return 1
	E2E_RUN_ID=${E2E##*.}
	p=$(_bed_run_pids)
	[[ -z $p ]] || { _bed_log "left behind: processes $p" && bad=1; }
	p=$(_bed_mounts)
	[[ -z $p ]] || { _bed_log "left behind: mounts $p" && bad=1; }
	[[ ! -e $E2E ]] || { _bed_log "left behind: $E2E" && bad=1; }
	for root in $(_bed_cgroup_roots); do
		[[ ! -e $root/kubepods/nii-e2e-$E2E_RUN_ID ]] ||
			{ _bed_log "left behind: cgroup $root/kubepods/nii-e2e-$E2E_RUN_ID" && bad=1; }
	done
	if [[ ${_BED_DOWN_RUNTIME:-containerd} == containerd ]]; then
		for p in /run/containerd/s /run/containerd/runc/k8s.io; do
			[[ ! -e $p ]] || { _bed_log "left behind: $p" && bad=1; }
		done
	fi
	# Host paths that were absent at bed_up, and those bed_down removed.
	while read -r p; do
		[[ -z $p || ! -e $p ]] || { _bed_log "left behind: $p" && bad=1; }
	done < <(printf '%s\n' "${_BED_HOST_ABSENT:-}"; awk '{ print $2 }' <<<"${_BED_HOST_PATHS:-}")
	((bad == 0)) && _bed_log "clean: no processes, mounts, cgroups or files of run $E2E_RUN_ID left"
}
