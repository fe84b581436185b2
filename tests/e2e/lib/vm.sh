# shellcheck shell=bash
# shellcheck disable=SC2016 # the shim-side scripts ('...') expand their own arguments
# The VM bed: a "Kata sandbox" made of real parts, laid out on the host and in
# the guest as Kata Containers 3.x lays it out (virtcontainers/fs_share_linux.go,
# kata_agent.go, mount.go; the shim's containerd-shim-v2/service.go), without
# Kata itself. Source this file, then:
#
#   trap 'vm_down "$sb"' EXIT
#   VM_CACHE_MODE=auto vm_up "$sb"                      # qemu + virtiofsd + guest agent
#   name=$(vm_shim_add_mount "$sb" c1 /host/dir /run/x rbind,ro)
#   vm_container_start "$sb" c1 1001 1001 cat /run/x/file
#   vm_container_wait "$sb" c1 30                       # its output; status = its status
#   vm_container_remove "$sb" c1                        # agent, then shim side
#   vm_exec "$sb" ls /run/kata-containers/shared/containers
#
# What is reproduced, and where it happens:
#   - The shim runs in its own mount namespace (made rslave, then rshared, as
#     Kata's shim does at start). A holder process keeps it; every host-side
#     mount of the sandbox happens in it (nsenter), so the host's own mount
#     table never changes and the namespace's mounts vanish with its last
#     process.
#   - Host layout /run/kata-containers/shared/sandboxes/SB/: mounts/ (the
#     shim's bind mounts), shared/ (a read-only bind of mounts/, made a slave
#     so that mounts added to mounts/ later appear in it) and private/.
#     virtiofsd (Rust, Kata's default arguments: --cache=$VM_CACHE_MODE
#     --thread-pool-size=1 --announce-submounts) exports shared/ as
#     `kataShared`; the guest mounts it at /run/kata-containers/shared/containers/.
#   - An OCI bind mount (vm_shim_add_mount) becomes mounts/CID-<16 hex>-<basename
#     of the destination>: a private bind of the source, or for a read-only
#     one a read-only bind made through private/ first (a remount would not
#     propagate). Its removal is a lazy unmount, then rmdir (or rm of an empty
#     file). A container's rootfs is bind-mounted at mounts/CID/rootfs.
#   - The guest's /init (vm-guest/init) is the agent: it bind-mounts each
#     shared entry at its destination inside the container's rootfs, in the
#     container's own mount namespace, and runs the command chrooted there
#     (vm-guest/ctr.sh).
# Differences from Kata: no vsock agent protocol (this host has no vhost-vsock;
# requests travel through a second virtio-fs share with a doorbell on a
# second serial port, see vm-guest/init), no containerd shim or OCI bundle
# (the caller passes the container's mounts and command), qemu's `pc` machine
# under TCG (Kata uses q35 with KVM; this host's /dev/kvm cannot run stock
# kernels), virtiofsd 1.14 told --inode-file-handles=never (the default of the
# 1.13 that Kata 3.x ships) and logging to a file instead of syslog, and a
# container's rootfs is a busybox directory the bed writes.
#
# Knobs: VM_CACHE_MODE (auto|never|always|metadata, default auto), VM_MEM_MIB
# (default 256), VM_BOOT_TIMEOUT (seconds, default 120), VM_AGENT_POLL (how
# often the guest agent looks for requests without a ring on its doorbell,
# seconds, default 1), VM_INODE_FILE_HANDLES (virtiofsd's
# --inode-file-handles for kataShared: never, as Kata 3.x runs it, or
# prefer|mandatory), VM_ROOTFS_EXTRA_BINS
# (host files copied into every container rootfs's /bin: the hook for static
# guest-side checkers such as a certificate verifier), VM_KEEP_LOGS (1: copy a
# failed sandbox's logs to /tmp/nii-vm-logs.SB at vm_down, the default;
# always; 0).
#
# Bed state lives in $VM_ROOT/SB (pids, logs, the control share, rootfs dirs);
# every process of a sandbox carries that path on its command line, which is
# how vm_down finds them even after the test that started them was killed.
# vm_up first tears down sandboxes whose owning script is gone; by hand:
#   bash -euo pipefail -c '. tests/e2e/lib/vm.sh; vm_reap'   # or vm_down SB
# The shell options are the sourcing script's (-euo pipefail), not set here.

_VM_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/e2e/lib/build.sh
. "$_VM_LIB/build.sh"

VM_ROOT=${VM_ROOT:-/run/nii-vm}
VM_KATA_HOST=/run/kata-containers/shared/sandboxes
VM_GUEST_SHARED=/run/kata-containers/shared/containers
VM_CACHE_MODE=${VM_CACHE_MODE:-auto}
VM_MEM_MIB=${VM_MEM_MIB:-256}
VM_BOOT_TIMEOUT=${VM_BOOT_TIMEOUT:-120}
VM_ROOTFS_EXTRA_BINS=${VM_ROOTFS_EXTRA_BINS:-}
VM_AGENT_POLL=${VM_AGENT_POLL:-1}
# How virtiofsd refers to the guest's inodes. Kata 3.x ships virtiofsd 1.13,
# whose default is `never` (an O_PATH descriptor per inode); virtiofsd 1.14
# made `prefer` (file handles) the default. It decides what the guest sees of
# a file renamed over on the host: with a descriptor the guest keeps reading
# the old inode until its cached entry expires; with a handle, opening the
# replaced inode fails (ESTALE) and the guest looks the name up again.
VM_INODE_FILE_HANDLES=${VM_INODE_FILE_HANDLES:-never}
# Kata's kernel parameters for qemu on amd64 (virtcontainers/qemu_amd64.go):
# they skip slow probes, which matters all the more under TCG.
_VM_KATA_KERNEL_PARAMS="tsc=reliable no_timer_check rcupdate.rcu_expedited=1 i8042.direct=1 \
i8042.dumbkbd=1 i8042.nopnp=1 i8042.noaux=1 noreplace-smp reboot=k cryptomgr.notests \
net.ifnames=0 pci=lastbus=0"
export VM_ROOT VM_KATA_HOST VM_GUEST_SHARED

# ---------------------------------------------------------------- utilities

_vm_log() { printf 'vm: %s\n' "$*" >&2; }
_vm_die() {
	_vm_log "ERROR: $*"
	return 1
}

_vm_ms() {
	local t=${EPOCHREALTIME/./}
	echo $((t / 1000))
}

# _vm_nap SECONDS : sleeps without a fork (a read with a timeout on a FIFO
# nobody writes), so tight polling loops stay cheap.
_vm_nap() {
	if [[ -z ${_VM_NAP_FD:-} ]]; then
		local f
		f=$(mktemp -u "${TMPDIR:-/tmp}/nii-vm-nap.XXXXXX")
		mkfifo -m 0600 "$f"
		exec {_VM_NAP_FD}<>"$f"
		rm -f "$f"
	fi
	read -r -t "$1" -u "$_VM_NAP_FD" _ || true
}

# _vm_q ARG : ARG single-quoted for a POSIX shell (the guest's busybox sh).
_vm_q() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

_vm_starttime() {
	local stat fields
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	read -ra fields <<<"${stat##*) }"
	echo "${fields[19]}"
}

_vm_alive() {
	local stat
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	[[ ${stat:0:1} != Z ]]
}

_vm_check_id() {
	[[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$ ]] || _vm_die "bad id '$1' (letters, digits, _ . -)"
}

_vm_dir() { echo "$VM_ROOT/$1"; }
_vm_kata_dir() { echo "$VM_KATA_HOST/$1"; }

# _vm_pid SB NAME : the recorded PID of NAME if it is still that process.
_vm_pid() {
	local f pid st
	f=$(_vm_dir "$1")/pids/$2
	[[ -r $f ]] || return 1
	read -r pid st <"$f"
	_vm_alive "$pid" && [[ $(_vm_starttime "$pid") == "$st" ]] && echo "$pid"
}

# _vm_spawn SB NAME CMD... : CMD in the background, logged to logs/NAME.log,
# its PID recorded. It inherits neither the caller's output (a $(...) around
# vm_up returns) nor the e2e bed's lock (lib/bed.sh), so a sandbox left
# behind never blocks the next bed.
_vm_spawn() {
	local sb=$1 name=$2 d pid
	shift 2
	d=$(_vm_dir "$sb")
	if [[ -n ${_BED_LOCK_FD:-} ]]; then
		"$@" >>"$d/logs/$name.log" 2>&1 </dev/null {_BED_LOCK_FD}>&- &
	else
		"$@" >>"$d/logs/$name.log" 2>&1 </dev/null &
	fi
	pid=$!
	echo "$pid $(_vm_starttime "$pid" || echo 0)" >"$d/pids/$name"
}

# _vm_shim SB CMD... : CMD in the sandbox shim's mount namespace.
_vm_shim() {
	local sb=$1 pid
	shift
	pid=$(_vm_pid "$sb" shim) || _vm_die "sandbox $sb: its shim namespace holder is gone" || return 1
	nsenter --mount="/proc/$pid/ns/mnt" -- "$@"
}

# _vm_shim_spawn SB NAME CMD... : _vm_spawn of CMD in the shim's namespace
# (nsenter execs CMD, so the recorded PID is CMD's).
_vm_shim_spawn() {
	local sb=$1 name=$2 pid
	shift 2
	pid=$(_vm_pid "$sb" shim) || _vm_die "sandbox $sb: its shim namespace holder is gone" || return 1
	_vm_spawn "$sb" "$name" nsenter --mount="/proc/$pid/ns/mnt" -- "$@"
}

# _vm_running SB : qemu still runs; otherwise says so with the console's tail.
_vm_running() {
	_vm_pid "$1" qemu >/dev/null && return 0
	_vm_log "sandbox $1: qemu is gone; console tail:"
	tail -n 20 "$(_vm_dir "$1")/logs/console.log" >&2 2>/dev/null || true
	return 1
}

# _vm_wait_file SB FILE TIMEOUT_S WHAT : until FILE exists, while qemu runs.
_vm_wait_file() {
	local sb=$1 f=$2 deadline i=0
	deadline=$(($(_vm_ms) + $3 * 1000))
	until [[ -e $f ]]; do
		if ((i++ % 20 == 0)); then
			_vm_running "$sb" || return 1
		fi
		(($(_vm_ms) < deadline)) || _vm_die "sandbox $sb: timed out after ${3}s waiting for $4" || return 1
		_vm_nap 0.005
	done
}

# ---------------------------------------------------------------- artifacts

# _vm_initramfs : builds (once per content) the guest's initramfs: static
# busybox, the kernel's virtio-fs modules, /init and ctr.sh. Sets VM_INITRAMFS.
_vm_initramfs() {
	local hash stage tmp
	hash=$(cat "$_VM_LIB/vm-guest/init" "$_VM_LIB/vm-guest/ctr.sh" "$NII_VM_BUSYBOX" \
		"$NII_VM_KERNEL_DIR/modules/order" "$NII_VM_KERNEL_DIR"/modules/*.ko | sha256sum | cut -c1-16)
	VM_INITRAMFS=$NII_CACHE/vm/initramfs-$hash.cpio.gz
	[[ -s $VM_INITRAMFS ]] && return 0
	stage=$(mktemp -d "${TMPDIR:-/tmp}/nii-vm-initramfs.XXXXXX")
	mkdir -p "$stage"/{bin,lib/modules,lib/nii,proc,sys,dev,tmp,run,ctl}
	install -m 0755 "$NII_VM_BUSYBOX" "$stage/bin/busybox"
	ln -s busybox "$stage/bin/sh"
	install -m 0755 "$_VM_LIB/vm-guest/init" "$stage/init"
	install -m 0755 "$_VM_LIB/vm-guest/ctr.sh" "$stage/lib/nii/ctr.sh"
	install -m 0644 "$NII_VM_KERNEL_DIR"/modules/* "$stage/lib/modules/"
	tmp=$(mktemp "$VM_INITRAMFS.XXXXXX")
	(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
		"$NII_VM_BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -6) >"$tmp"
	rm -rf "$stage"
	mv "$tmp" "$VM_INITRAMFS"
}

# _vm_rootfs DIR UID GID : a container rootfs: busybox and its applets (a
# copy of a base built once per busybox), VM_ROOTFS_EXTRA_BINS, and a user
# `ctr` with UID and GID (the agent runs commands as that user).
_vm_rootfs() {
	local r=$1 base a b tmp
	base=$NII_CACHE/vm/rootfs-$(sha256sum "$NII_VM_BUSYBOX" | cut -c1-16)
	if [[ ! -d $base ]]; then
		tmp=$(mktemp -d "$base.XXXXXX")
		mkdir -p "$tmp"/{bin,etc,proc,dev,tmp}
		install -m 0755 "$NII_VM_BUSYBOX" "$tmp/bin/busybox"
		(
			cd "$tmp/bin"
			while read -r a; do
				[[ $a == busybox ]] || ln -s busybox "$a"
			done < <("$NII_VM_BUSYBOX" --list)
		)
		chmod 0755 "$tmp"
		mv -T "$tmp" "$base" 2>/dev/null || rm -rf "$tmp"
	fi
	cp -a "$base" "$r"
	for b in $VM_ROOTFS_EXTRA_BINS; do
		install -m 0755 "$b" "$r/bin/"
	done
	printf 'root:x:0:0::/:/bin/sh\nctr:x:%d:%d::/tmp:/bin/sh\n' "$2" "$3" >"$r/etc/passwd"
	if (($3 == 0)); then
		printf 'root:x:0:\n' >"$r/etc/group"
	else
		printf 'root:x:0:\nctr:x:%d:\n' "$3" >"$r/etc/group"
	fi
}

# ---------------------------------------------------------------- lifecycle

# vm_up SB : a Kata-style sandbox SB (qemu, virtiofsd, the guest agent ready).
vm_up() {
	local sb=$1 d k t0 q
	_vm_check_id "$sb" || return 1
	case $VM_CACHE_MODE in
	auto | never | always | metadata) ;;
	*) _vm_die "VM_CACHE_MODE=$VM_CACHE_MODE: auto, never, always or metadata" || return 1 ;;
	esac
	case $VM_INODE_FILE_HANDLES in
	never | prefer | mandatory) ;;
	*) _vm_die "VM_INODE_FILE_HANDLES=$VM_INODE_FILE_HANDLES: never, prefer or mandatory" || return 1 ;;
	esac
	d=$(_vm_dir "$sb")
	k=$(_vm_kata_dir "$sb")
	[[ ! -e $d && ! -e $k ]] || _vm_die "sandbox $sb exists ($d or $k)" || return 1
	nii_build_vm >&2 || return 1
	_vm_initramfs || return 1
	vm_reap
	t0=$(_vm_ms)

	mkdir -p "$d"/{pids,logs,rootfs,shares,ctl/req,ctl/res,ctl/ctr}
	echo "$$ $(_vm_starttime $$)" >"$d/owner"
	echo "$VM_CACHE_MODE" >"$d/cache-mode"

	# The shim's mount namespace, as Kata's shim makes its own: a slave of the
	# host's (host mounts still arrive), then shared inside, so that a bind of
	# mounts/ to shared/ can be a slave that receives later mounts.
	_vm_spawn "$sb" shim unshare --mount --propagation slave -- \
		bash -c 'mount --make-rshared / && exec -a "$0" sleep infinity' "nii-vm-shim:$d/"
	local i
	for ((i = 0; i < 200; i++)); do
		[[ $(_vm_pid "$sb" shim) ]] && grep -q ' / / .*shared:' "/proc/$(_vm_pid "$sb" shim)/mountinfo" 2>/dev/null && break
		_vm_nap 0.01
	done
	((i < 200)) || _vm_die "sandbox $sb: the shim namespace did not come up" || return 1

	# FilesystemShare.Prepare: shared/ 0700, mounts/ 0750, shared/ a
	# read-only slave bind of mounts/.
	_vm_shim "$sb" bash -euc '
		mkdir -p "$1/shared" "$1/mounts"
		chmod 0700 "$1/shared"; chmod 0750 "$1/mounts"
		mount --bind "$1/mounts" "$1/shared"
		mount --make-slave "$1/shared"
		mount -o remount,bind,ro "$1/shared"' - "$k" || return 1

	# virtiofsd with Kata's default arguments, and one for the control share.
	_vm_shim_spawn "$sb" virtiofsd "$NII_VIRTIOFSD" --socket-path="$d/kata.sock" \
		--shared-dir="$k/shared" --cache="$VM_CACHE_MODE" --thread-pool-size=1 --announce-submounts \
		--inode-file-handles="$VM_INODE_FILE_HANDLES"
	_vm_shim_spawn "$sb" virtiofsd-ctl "$NII_VIRTIOFSD" --socket-path="$d/ctl.sock" \
		--shared-dir="$d/ctl" --cache=never --thread-pool-size=1
	for ((i = 0; i < 1000; i++)); do
		[[ -S $d/kata.sock && -S $d/ctl.sock ]] && break
		_vm_nap 0.01
	done
	((i < 1000)) || _vm_die "sandbox $sb: virtiofsd sockets did not appear (logs in $d/logs)" || return 1

	# shellcheck disable=SC2054 # qemu's comma-separated properties
	q=(-name "nii-vm-$sb" -accel tcg -smp 1 -m "${VM_MEM_MIB}M" -nodefaults -no-user-config
		-display none -no-reboot
		-kernel "$NII_VM_KERNEL_DIR/vmlinuz" -initrd "$VM_INITRAMFS"
		-append "console=ttyS0 quiet panic=-1 $_VM_KATA_KERNEL_PARAMS nii.poll=$VM_AGENT_POLL"
		-object "memory-backend-memfd,id=mem,size=${VM_MEM_MIB}M,share=on" -numa node,memdev=mem
		-chardev "socket,id=kata,path=$d/kata.sock"
		-device vhost-user-fs-pci,chardev=kata,tag=kataShared,queue-size=1024
		-chardev "socket,id=ctl,path=$d/ctl.sock"
		-device vhost-user-fs-pci,chardev=ctl,tag=nii-ctl
		-chardev "file,id=con,path=$d/logs/console.log" -serial chardev:con
		-chardev "pipe,id=bell,path=$d/bell" -serial chardev:bell)
	# The doorbell's FIFOs (qemu opens PATH.in and PATH.out read-write).
	mkfifo -m 0600 "$d/bell.in" "$d/bell.out"
	_vm_shim_spawn "$sb" qemu "$NII_VM_QEMU" "${q[@]}"
	_vm_wait_file "$sb" "$d/ctl/ready" "$VM_BOOT_TIMEOUT" "the guest agent" || return 1
	VM_BOOT_MS=$(($(_vm_ms) - t0))
	export VM_BOOT_MS
	_vm_log "sandbox $sb up in ${VM_BOOT_MS} ms (cache=$VM_CACHE_MODE, inode-file-handles=$VM_INODE_FILE_HANDLES; guest ready $(<"$d/ctl/ready") s after kernel start)"
}

# _vm_procs D : PIDs of every process of the sandbox whose state dir is D
# (that path on their command line), qemu first.
_vm_procs() {
	local d=$1 f p re qemu=() other=()
	# "[/]" in the pattern: grep's own command line must not match it.
	re="$(printf '%s' "$d" | sed 's/[][\.*^$+?(){}|]/\\&/g')[/]"
	while read -r f; do
		p=${f#/proc/}
		p=${p%/cmdline}
		[[ $p == "$$" || $p == "$BASHPID" ]] && continue
		if grep -qaF qemu-system "$f" 2>/dev/null; then qemu+=("$p"); else other+=("$p"); fi
	done < <(grep -laE -- "$re" /proc/[0-9]*/cmdline 2>/dev/null)
	echo "${qemu[*]} ${other[*]}"
}

# _vm_stop_procs D : SIGTERM qemu first (the guest goes, then virtiofsd
# sees its frontend go), then everything else of the sandbox; SIGKILL what is
# left after 5 s.
_vm_stop_procs() {
	local d=$1 pids qemu p i sig
	read -ra pids <<<"$(_vm_procs "$d")"
	for p in "${pids[@]}"; do
		grep -qaF qemu-system "/proc/$p/cmdline" 2>/dev/null || continue
		kill -TERM "$p" 2>/dev/null || true
		qemu=$p
	done
	for ((i = 0; i < 50; i++)); do
		if [[ -z ${qemu:-} ]] || ! _vm_alive "$qemu"; then break; fi
		_vm_nap 0.1
	done
	for sig in TERM KILL; do
		read -ra pids <<<"$(_vm_procs "$d")"
		((${#pids[@]})) || return 0
		kill "-$sig" "${pids[@]}" 2>/dev/null || true
		for ((i = 0; i < 50; i++)); do
			read -ra pids <<<"$(_vm_procs "$d")"
			((${#pids[@]})) || return 0
			_vm_nap 0.1
		done
	done
	_vm_die "processes of $d survive SIGKILL: ${pids[*]}"
}

# _vm_host_mounts PATH : mount points at or under PATH in the host's table,
# deepest first.
_vm_host_mounts() {
	awk -v p="$1" '$5 == p || index($5, p "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}

# vm_down SB [STATUS] : stops everything of SB, removes its files; copies its
# logs first if STATUS is non-zero (VM_KEEP_LOGS). Safe to repeat.
vm_down() {
	local sb=$1 st=${2:-0} d k m keep=${VM_KEEP_LOGS:-1} rc=0
	_vm_check_id "$sb" || return 1
	d=$(_vm_dir "$sb")
	k=$(_vm_kata_dir "$sb")
	if [[ -d $d/logs ]] && { [[ $keep == always ]] || { [[ $keep == 1 ]] && ((st != 0)); }; }; then
		rm -rf "/tmp/nii-vm-logs.$sb"
		cp -r "$d/logs" "/tmp/nii-vm-logs.$sb" && _vm_log "logs of $sb kept in /tmp/nii-vm-logs.$sb"
	fi
	_vm_stop_procs "$d" || rc=1
	# Every mount of the sandbox lived in the shim's namespace, gone with its
	# processes; anything in the host's table would be a bug, undone anyway.
	while read -r m; do
		[[ -n $m ]] || continue
		_vm_log "unexpected host mount $m"
		umount -l "$m" || rc=1
	done < <(_vm_host_mounts "$k"; _vm_host_mounts "$d")
	rm -rf --one-file-system "$k" "$d" || rc=1
	# Parents only when empty (another sandbox may be using them).
	rmdir "$VM_KATA_HOST" /run/kata-containers/shared /run/kata-containers 2>/dev/null || true
	rmdir "$VM_ROOT" 2>/dev/null || true
	return "$rc"
}

# vm_reap : vm_down for every sandbox whose owning script is gone.
vm_reap() {
	local d pid st
	for d in "$VM_ROOT"/*/; do
		[[ -r $d/owner ]] || continue
		read -r pid st <"$d/owner"
		if _vm_alive "$pid" && [[ $(_vm_starttime "$pid") == "$st" ]]; then
			continue
		fi
		d=${d%/}
		_vm_log "reaping sandbox ${d##*/} (owner $pid gone)"
		vm_down "${d##*/}" || true
	done
}

# vm_check_clean SB : nothing of SB is left: no process, no mount in any
# mount namespace, no file.
vm_check_clean() {
	local sb=$1 d k bad=0 pids f
	d=$(_vm_dir "$sb")
	k=$(_vm_kata_dir "$sb")
	read -ra pids <<<"$(_vm_procs "$d")"
	((${#pids[@]} == 0)) || { _vm_log "left: processes ${pids[*]}"; bad=1; }
	for f in /proc/[0-9]*/mountinfo; do
		if grep -qF -e " $k " -e " $k/" -e " $d " -e " $d/" "$f" 2>/dev/null; then
			_vm_log "left: mounts of the sandbox in $f"
			bad=1
			break
		fi
	done
	[[ ! -e $d && ! -e $k ]] || { _vm_log "left: $d or $k"; bad=1; }
	return "$bad"
}

# vm_cpu SB : CPU seconds used so far by SB's processes ("qemu=… other=…").
vm_cpu() {
	local d p f qt=0 ot=0 hz
	d=$(_vm_dir "$1")
	hz=$(getconf CLK_TCK)
	for p in $(_vm_procs "$d"); do
		# Fields after "(comm) ": state is 0, utime 11, stime 12.
		f=$(cat "/proc/$p/stat" 2>/dev/null) || continue
		read -ra f <<<"${f##*) }"
		if grep -qaF qemu-system "/proc/$p/cmdline" 2>/dev/null; then
			qt=$((qt + f[11] + f[12]))
		else
			ot=$((ot + f[11] + f[12]))
		fi
	done
	awk -v q="$qt" -v o="$ot" -v hz="$hz" 'BEGIN { printf "qemu=%.2fs virtiofsd+shim=%.2fs\n", q / hz, o / hz }'
}

# ---------------------------------------------------------------- requests

# _vm_request SB TIMEOUT_S OP ARGS... : runs op_OP ARGS in the guest agent;
# prints its output, returns its status.
_vm_request() {
	local sb=$1 timeout=$2 op=$3 d id a line rc
	shift 3
	d=$(_vm_dir "$sb")
	id=${EPOCHREALTIME/./}-$BASHPID
	line="op_$op"
	for a in "$@"; do line+=" $(_vm_q "$a")"; done
	printf '%s\n' "$line" >"$d/ctl/req/.$id"
	mv "$d/ctl/req/.$id" "$d/ctl/req/$id.req"
	# Ring (opened read-write: never blocks, even if qemu is gone).
	printf '\n' 1<>"$d/bell.in"
	_vm_wait_file "$sb" "$d/ctl/res/$id.rc" "$timeout" "request $op" || return 1
	cat "$d/ctl/res/$id.out"
	rc=$(<"$d/ctl/res/$id.rc")
	rm -f "$d/ctl/res/$id.out" "$d/ctl/res/$id.rc"
	return "$rc"
}

# vm_exec SB CMD... : CMD in the guest (outside any container), 60 s at most.
vm_exec() {
	local sb=$1
	shift
	_vm_request "$sb" 60 exec "$@"
}

# ---------------------------------------------------------------- shim side

# vm_shim_add_mount SB CID SOURCE DESTINATION [OPTIONS] : what Kata's shim
# does with an OCI mount of container CID (OPTIONS: the OCI options, comma
# separated, default rbind,ro). Prints the shared entry's name (the guest sees
# it at $VM_GUEST_SHARED/NAME), or nothing for a mount Kata does not share
# (not a bind mount, a /proc or /sys source, /dev/shm, or a /dev destination
# that is not a regular file on the host).
vm_shim_add_mount() {
	local sb=$1 cid=$2 src=$3 dest=$4 opts=${5:-rbind,ro} k d o bind=0 ro=0 name
	_vm_check_id "$sb" && _vm_check_id "$cid" || return 1
	[[ $dest == /* ]] || _vm_die "destination '$dest' is not absolute" || return 1
	k=$(_vm_kata_dir "$sb")
	d=$(_vm_dir "$sb")
	for o in ${opts//,/ }; do
		case $o in
		bind | rbind) bind=1 ;;
		ro) ro=1 ;;
		esac
	done
	# Kata shares bind mounts only, and not these (container.go).
	src=$(realpath -e -- "$src") || _vm_die "source '$3' does not exist" || return 1
	# (isHostDevice looks at the destination's path on the host.)
	if ((!bind)) || [[ $src == /proc || $src == /proc/* || $src == /sys || $src == /sys/* ||
		$dest == /dev/shm || $dest == /dev || ($dest == /dev/* && -e $dest && ! -f $dest) ]]; then
		_vm_log "$cid: $dest ($opts) is not shared by Kata"
		return 0
	fi
	name=$cid-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')-$(basename -- "$dest")
	_vm_shim "$sb" bash -euc '
		k=$1 name=$2 src=$3 ro=$4
		# ensureDestinationExists: a directory for a directory, else a file.
		mkpoint() {
			mkdir -p -m 0755 "$(dirname "$1")"
			if [[ -d $src ]]; then
				[[ -d $1 ]] || mkdir -m 0755 "$1"
			else
				[[ -e $1 ]] || { : >"$1"; chmod 0755 "$1"; }
			fi
		}
		if ((ro)); then
			# A read-only remount would not propagate to shared/: bind
			# read-only in private/, bind that into mounts/, drop the first.
			mkpoint "$k/private/$name"
			mount --bind "$src" "$k/private/$name"
			mount --make-private "$k/private/$name"
			mount -o remount,bind,ro "$k/private/$name"
			mkpoint "$k/mounts/$name"
			mount --bind "$k/private/$name" "$k/mounts/$name"
			mount --make-private "$k/mounts/$name"
			umount -l "$k/private/$name"
		else
			mkpoint "$k/mounts/$name"
			mount --bind "$src" "$k/mounts/$name"
			mount --make-private "$k/mounts/$name"
		fi' - "$k" "$name" "$src" "$ro" || return 1
	printf '%s\t%s\t%s\n' "$name" "$dest" "$opts" >>"$d/shares/$cid"
	echo "$name"
}

# vm_shim_remove_mounts SB CID : what Kata's shim does with CID's shared
# mounts when the container goes (UnshareFile): lazy unmount, then remove the
# mount point if it is a directory or an empty file.
vm_shim_remove_mounts() {
	local sb=$1 cid=$2 d k name dest opts rc=0
	d=$(_vm_dir "$sb")
	k=$(_vm_kata_dir "$sb")
	[[ -r $d/shares/$cid ]] || return 0
	while IFS=$'\t' read -r name dest opts; do
		_vm_shim "$sb" bash -euc '
			umount -l "$1"
			if [[ -d $1 ]]; then rmdir "$1"; elif [[ -f $1 && ! -s $1 ]]; then rm -f "$1"; fi' \
			- "$k/mounts/$name" || rc=1
	done <"$d/shares/$cid"
	rm -f "$d/shares/$cid"
	return "$rc"
}

# _vm_share_rootfs SB CID ROOTFS : bindMountContainerRootfs (mounts/CID/rootfs).
_vm_share_rootfs() {
	_vm_shim "$1" bash -euc '
		mkdir -p -m 0755 "$1"
		mount --bind "$2" "$1"
		mount --make-private "$1"' - "$(_vm_kata_dir "$1")/mounts/$2/rootfs" "$3"
}

# _vm_unshare_rootfs SB CID : bindUnmountContainerRootfs, then the empty
# container directory.
_vm_unshare_rootfs() {
	_vm_shim "$1" bash -euc '
		[[ -d $1/rootfs ]] || exit 0
		umount -l "$1/rootfs"
		rmdir "$1/rootfs"
		rmdir "$1" 2>/dev/null || true' - "$(_vm_kata_dir "$1")/mounts/$2"
}

# ---------------------------------------------------------------- containers

# vm_container_start SB CID UID GID CMD... : creates container CID (a busybox
# rootfs shared from the host, every mount added with vm_shim_add_mount for
# CID at its destination) and starts CMD in it as UID:GID. Returns once CMD is
# starting; its output accumulates in "$(vm_container_out SB CID)".
vm_container_start() {
	local sb=$1 cid=$2 uid=$3 gid=$4 d r n=0 name dest opts m=()
	shift 4
	_vm_check_id "$cid" || return 1
	[[ $uid =~ ^[0-9]+$ && $gid =~ ^[0-9]+$ ]] || _vm_die "uid/gid must be numeric" || return 1
	d=$(_vm_dir "$sb")
	r=$d/rootfs/$cid
	[[ ! -e $r ]] || _vm_die "container $cid exists in $sb" || return 1
	_vm_rootfs "$r" "$uid" "$gid"
	_vm_share_rootfs "$sb" "$cid" "$r" || return 1
	if [[ -r $d/shares/$cid ]]; then
		while IFS=$'\t' read -r name dest opts; do
			m+=("$name" "$dest" "$opts")
			n=$((n + 1))
		done <"$d/shares/$cid"
	fi
	_vm_request "$sb" 60 start "$cid" "$n" "${m[@]}" "$@"
}

# vm_container_out SB CID : the host path of CID's output (growing while it runs).
vm_container_out() { echo "$(_vm_dir "$1")/ctl/ctr/$2.out"; }

# vm_container_wait SB CID TIMEOUT_S : waits for CID's command to exit;
# prints its output and returns its status.
vm_container_wait() {
	local sb=$1 cid=$2 d
	d=$(_vm_dir "$sb")
	_vm_wait_file "$sb" "$d/ctl/ctr/$cid.rc" "$3" "container $cid to exit" || return 1
	cat "$d/ctl/ctr/$cid.out"
	return "$(<"$d/ctl/ctr/$cid.rc")"
}

# vm_container_remove SB CID : the agent kills the container (its mount
# namespace goes), then the shim unshares its mounts and its rootfs, in
# Kata's order.
vm_container_remove() {
	local sb=$1 cid=$2 rc=0
	_vm_request "$sb" 30 remove "$cid" || rc=1
	vm_shim_remove_mounts "$sb" "$cid" || rc=1
	_vm_unshare_rootfs "$sb" "$cid" || rc=1
	rm -rf "$(_vm_dir "$sb")/rootfs/$cid"
	return "$rc"
}
