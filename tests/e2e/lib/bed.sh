# shellcheck shell=bash
# End-to-end test bed: a real containerd (CRI + NRI), driven by crictl, and a
# real SPIRE server and agent, all confined to one scratch directory. Source
# this file, then:
#
#   trap 'bed_down $?' EXIT      # before bed_up: a half-built bed is torn down
#   bed_up
#   pod=$(bed_pod_json p1 "$(bed_uuid)")
#   ctr=$(bed_ctr_json c1 sh -c 'id -u')
#   pid=$("$CRICTL" runp "$pod"); cid=$("$CRICTL" create "$pid" "$ctr" "$pod")
#
# Exported after bed_up (all single words, safe to quote and to hand to child
# processes): E2E, CRICTL, CTR, SPIRE_SERVER, SPIRE_AGENT, SPIRE_SERVER_SOCK,
# AGENT_SOCK, ADMIN_SOCK, NRI_SOCK, CONTAINERD_SOCK, E2E_RUN_ID, E2E_TD.
#
# Only one bed runs per host at a time (a lock enforces it): containerd keeps
# shim sockets and runc state in fixed places under /run/containerd that a
# second instance would share. To clean up after a run that was SIGKILLed:
#   E2E=/tmp/nii-e2e.XXXXXX bash -c '. tests/e2e/lib/bed.sh; bed_down'
set -euo pipefail

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

_bed_write_containerd_config() {
	local shim=$NII_CONTAINERD_DIR/containerd-shim-runc-v2
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
	# crictl's default 2 s timeout is shorter than NRI may legitimately take
	# (up to the request timeout per plugin per event).
	cat >"$E2E/crictl.yaml" <<EOF
runtime-endpoint: unix://$CONTAINERD_SOCK
image-endpoint: unix://$CONTAINERD_SOCK
timeout: 60
pull-image-on-create: false
disable-pull-on-run: true
EOF
}

_bed_write_spire_configs() {
	local ttl=""
	if [[ -n ${E2E_SVID_TTL:-} ]]; then
		# Short SVIDs exercise rotation (SPIRE's default is 1h).
		ttl="default_x509_svid_ttl = \"$E2E_SVID_TTL\""
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
  KeyManager "memory" { plugin_data {} }
}
EOF
	local k8s=""
	if [[ ${E2E_K8S_ATTESTOR:-0} == 1 ]]; then
		# For lib/kubelet.sh: the agent reads the kubelet's read-only port
		# from its config, so the port is chosen now and kubelet_up uses it.
		# E2E_K8S_DISABLE_CONTAINER_SELECTORS=true: pod-level selectors only.
		KUBELET_RO_PORT=${KUBELET_RO_PORT:-$(_bed_free_port)}
		export KUBELET_RO_PORT
		k8s="WorkloadAttestor \"k8s\" {
    plugin_data {
      kubelet_read_only_port      = $KUBELET_RO_PORT
      use_new_container_locator   = true
      disable_container_selectors = ${E2E_K8S_DISABLE_CONTAINER_SELECTORS:-false}
    }
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
  experimental { sync_interval = "1s" }
}
plugins {
  NodeAttestor "join_token" { plugin_data {} }
  # Disk keys let the agent restart (bed_restart_agent) without a new token.
  KeyManager "disk" {
    plugin_data { directory = "$E2E/spire/agent/data" }
  }
  WorkloadAttestor "unix" {
    # Enables unix:path/sha256 selectors (resolved from /proc/<pid>/exe).
    plugin_data { discover_workload_path = true }
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
	printf '#!/bin/sh\nexec %q -a %q -n k8s.io "$@"\n' \
		"$NII_CONTAINERD_DIR/ctr" "$CONTAINERD_SOCK" >"$b/ctr"
	# spire-server wants -socketPath after the subcommand words ("entry
	# create -socketPath ..."): insert it before the first flag.
	cat >"$b/spire-server" <<EOF
#!/usr/bin/env bash
set -euo pipefail
words=()
while ((\$#)) && [[ \$1 != -* ]]; do words+=("\$1"); shift; done
exec '$NII_SPIRE_DIR/spire-server' "\${words[@]}" -socketPath '$SPIRE_SERVER_SOCK' "\$@"
EOF
	chmod 0755 "$b/crictl" "$b/ctr" "$b/spire-server"
}

# ---------------------------------------------------------------- containerd

_bed_start_containerd() {
	# A stale NRI socket would make the readiness check pass too early.
	rm -f "$NRI_SOCK"
	bed_spawn containerd "$NII_CONTAINERD_DIR/containerd" \
		--config "$E2E/containerd/config.toml" --log-level debug >/dev/null
	bed_wait 60 "containerd CRI" "$CRICTL" info || return 1
	# NRI's socket appears just before CRI reports ready, but poll anyway.
	bed_wait 30 "NRI socket $NRI_SOCK" test -S "$NRI_SOCK"
}

bed_restart_containerd() {
	local t
	t=$(_bed_ms)
	bed_stop containerd 30
	_bed_rotate_log containerd
	_bed_start_containerd || return 1
	_bed_log "containerd restarted in $(_bed_since "$t")"
}

_bed_import_images() {
	local out img
	gcc -static -Os -s -o "$E2E/images/idcheck" "$_BED_LIB/../tools/idcheck/idcheck.c" || return 1
	python3 "$_BED_LIB/mkimage.py" --scratch-binary "$E2E/images/idcheck" "$E2E/images" >/dev/null || return 1
	for img in pause e2e-busybox e2e-scratch; do
		# Quiet unless it fails: ctr echoes containerd's cgroup v1 deprecation
		# warning on every call.
		out=$("$CTR" images import "$E2E/images/$img.tar" 2>&1) ||
			_bed_die "ctr images import $img.tar: $out" || return 1
	done
	out=$("$CRICTL" images) || return 1
	if ! grep -q 'registry.k8s.io/pause  *3\.10\.2' <<<"$out" ||
		! grep -q 'docker.io/library/e2e-busybox  *1 ' <<<"$out" ||
		! grep -q 'docker.io/library/e2e-scratch  *1 ' <<<"$out"; then
		_bed_die "imported images not visible to CRI:"$'\n'"$out"
	fi
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
        # namespace runc refuses to set one. pid 1 = CONTAINER, ipc 0 = POD.
        "security_context": {"namespace_options": {"network": 2, "pid": 1, "ipc": 0}},
    },
}, sys.stdout, indent=1)
EOF
	echo "$f"
}

# bed_ctr_json NAME COMMAND... : write a container config (busybox image,
# uid ${E2E_CTR_UID:-1001}, seccomp RuntimeDefault); prints its path. Run as
# non-root so unix:uid selectors tell workloads from the root plugin.
# E2E_CTR_IMAGE: another image (e.g. $E2E_SCRATCH_IMAGE); E2E_CTR_READONLY=1:
# a read-only root file system; E2E_CTR_EXTRA: a JSON object of further CRI
# container config keys (annotations, mounts).
bed_ctr_json() {
	local name=$1 f=$E2E/specs/ctr-$1.json
	shift
	python3 - "$name" "${E2E_CTR_UID:-1001}" "${E2E_CTR_IMAGE:-$E2E_IMAGE}" \
		"${E2E_CTR_READONLY:-0}" "${E2E_CTR_EXTRA:-"{}"}" "$@" >"$f" <<'EOF' || return 1
import json, sys
name, uid, image, readonly, extra, *cmd = sys.argv[1:]
config = {
    "metadata": {"name": name},
    "image": {"image": image},
    "command": cmd,
    "log_path": f"{name}.log",
    "linux": {
        "security_context": {
            "namespace_options": {"network": 2, "pid": 1, "ipc": 0},
            "run_as_user": {"value": int(uid)},
            "seccomp": {"profile_type": 0},
            "readonly_rootfs": readonly == "1",
        },
    },
}
config.update(json.loads(extra))
json.dump(config, sys.stdout, indent=1)
EOF
	echo "$f"
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

bed_up() {
	local t0 t
	t0=$(_bed_ms)
	nii_build_all || return 1
	# One bed per host; wait for a concurrent one rather than corrupting it.
	exec {_BED_LOCK_FD}>"${E2E_LOCK:-/run/lock/nii-e2e.lock}"
	flock -w "${E2E_LOCK_WAIT:-900}" "$_BED_LOCK_FD" || _bed_die "another bed holds the lock" || return 1

	# Short: every socket path must fit sun_path (108 bytes).
	E2E=$(mktemp -d "${E2E_TMPDIR:-/tmp}/nii-e2e.XXXXXX")
	# World-traversable, so a non-root host process can reach the agent's
	# public socket (as /run/spire/sockets would be).
	chmod 0755 "$E2E"
	E2E_RUN_ID=${E2E##*.}
	CONTAINERD_SOCK=$E2E/containerd/containerd.sock
	NRI_SOCK=$E2E/nri/nri.sock
	SPIRE_SERVER_SOCK=$E2E/spire/server/api.sock
	AGENT_SOCK=$E2E/spire/public/api.sock
	ADMIN_SOCK=$E2E/spire/admin/admin.sock
	CRICTL=$E2E/bin/crictl
	CTR=$E2E/bin/ctr
	SPIRE_SERVER=$E2E/bin/spire-server
	SPIRE_AGENT=$NII_SPIRE_DIR/spire-agent
	export E2E E2E_RUN_ID CONTAINERD_SOCK NRI_SOCK SPIRE_SERVER_SOCK AGENT_SOCK \
		ADMIN_SOCK CRICTL CTR SPIRE_SERVER SPIRE_AGENT
	mkdir -p "$E2E"/{bin,pids,containerd,nri/plugins,nri/conf.d,logs/pods,specs,images,cni/bin,cni/net.d} \
		"$E2E"/spire/{server/data,agent/data,public,admin}
	chmod 0755 "$E2E/spire" "$E2E/spire/public"
	: >"$E2E/spire/entries"
	_bed_write_containerd_config
	_bed_write_wrappers
	_bed_log "scratch $E2E (run $E2E_RUN_ID)"

	t=$(_bed_ms)
	_bed_start_containerd || return 1
	# containerd only warns about misspelt keys: make that fatal here.
	if grep 'Ignoring unknown key in TOML' "$E2E/logs/containerd.log" >&2; then
		_bed_die "containerd ignored part of the config (see above)"
		return 1
	fi
	# Informational: CRI and NRI themselves were proven by the waits above.
	grep 'failed to load plugin' "$E2E/logs/containerd.log" >&2 || true
	_bed_log "containerd ready in $(_bed_since "$t")"

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
	local status=${1:-0} t name mp root p keep i
	[[ -n ${E2E:-} && -d $E2E ]] || return 0
	t=$(_bed_ms)
	E2E_RUN_ID=${E2E##*.}
	# Add-on libraries' teardowns first (lib/kubelet.sh: the kubelet must stop
	# before the pods go, or it recreates them).
	for name in ${BED_DOWN_HOOKS:-}; do
		"$name" || _bed_log "down hook $name failed"
	done
	# Pods first, while containerd (and any plugin) still run: stopping a pod
	# kills its containers without grace, and the shims exit with them.
	if [[ -x $E2E/bin/crictl ]] && bed_pid containerd >/dev/null; then
		timeout 120 "$E2E/bin/crictl" rm -af >/dev/null 2>&1 || _bed_log "crictl rm -af failed"
		timeout 120 "$E2E/bin/crictl" rmp -af >/dev/null 2>&1 || _bed_log "crictl rmp -af failed"
	fi
	# Extra processes (plugins) before the daemons they talk to.
	for name in "$E2E"/pids/*; do
		[[ -e $name ]] || continue
		name=${name##*/}
		case $name in containerd | spire-agent | spire-server) continue ;; esac
		bed_stop "$name"
	done
	for name in spire-agent spire-server containerd; do
		bed_stop "$name" 30
	done
	# Whatever survived (a shim or container of a pod CRI failed to remove).
	for i in 1 2 3; do
		keep=$(_bed_run_pids)
		[[ -n $keep ]] || break
		_bed_log "killing leftover processes: ${keep//$'\n'/ }"
		for p in $keep; do kill -KILL "$p" 2>/dev/null || true; done
		# Reap our own children quietly (no "Killed" job reports).
		for p in $keep; do wait "$p" 2>/dev/null || true; done
		sleep 0.5
	done
	# Rootfs overlays and sandbox shm normally go with the pods.
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
	# --one-file-system: never descend into something still mounted.
	rm -rf --one-file-system "$E2E" || _bed_log "cannot remove $E2E"
	# containerd keeps shim sockets and runc state outside root/state.
	rm -rf /run/containerd/s /run/containerd/runc/k8s.io
	rmdir /run/containerd/runc /run/containerd 2>/dev/null || true
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
	for p in /run/containerd/s /run/containerd/runc/k8s.io; do
		[[ ! -e $p ]] || { _bed_log "left behind: $p" && bad=1; }
	done
	((bad == 0)) && _bed_log "clean: no processes, mounts, cgroups or files of run $E2E_RUN_ID left"
}
