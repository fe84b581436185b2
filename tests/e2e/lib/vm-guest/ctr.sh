#!/bin/sh
# shellcheck shell=sh
# ctr.sh CID NMOUNTS [NAME DEST OPTIONS]... CMD...
#
# A container of the VM bed's guest, started by the agent (init) as a session
# leader in a fresh mount namespace: what Kata's agent does for a container
# whose OCI bind mounts the runtime rewrote to shared entries. Its rootfs is
# /run/kata-containers/shared/containers/CID/rootfs (shared by the host); each
# shared entry NAME is bind-mounted at DEST inside it (recursive for `rbind`,
# then remounted with the ro/nosuid/nodev/noexec flags of OPTIONS, a comma
# list as in the OCI spec); CMD runs chrooted as the rootfs's user `ctr` (su),
# whose uid and gid the host wrote into the rootfs's /etc/passwd and
# /etc/group. Its exit status goes to /ctl/ctr/CID.rc.
set -u
SHARED=/run/kata-containers/shared/containers
cid=$1
n=$2
shift 2
rootfs=$SHARED/$cid/rootfs

done_rc() {
	echo "$1" >"/ctl/ctr/.$cid.rc"
	mv "/ctl/ctr/.$cid.rc" "/ctl/ctr/$cid.rc"
	exit "$1"
}
fail() {
	echo "container $cid: $*" >&2
	done_rc 126
}

[ -x "$rootfs/bin/busybox" ] || fail "no rootfs at $rootfs"
while [ "$n" -gt 0 ]; do
	name=$1 dest=$2 opts=$3
	shift 3
	n=$((n - 1))
	src=$SHARED/$name
	tgt=$rootfs$dest
	[ -e "$src" ] || fail "no shared entry $src"
	if [ -d "$src" ]; then
		[ -d "$tgt" ] || mkdir -p "$tgt" || fail "mkdir $tgt"
	else
		[ -d "${tgt%/*}" ] || mkdir -p "${tgt%/*}" || fail "mkdir ${tgt%/*}"
		[ -e "$tgt" ] || : >"$tgt" || fail "create $tgt"
	fi
	bind=bind flags=
	IFS=,
	for o in $opts; do
		case $o in
		rbind) bind=rbind ;;
		ro | nosuid | nodev | noexec) flags=$flags,$o ;;
		esac
	done
	unset IFS
	mount -o "$bind" "$src" "$tgt" || fail "bind $src at $tgt"
	if [ -n "$flags" ]; then
		mount -o "remount,bind$flags" "$tgt" || fail "remount $tgt with ${flags#,}"
	fi
done
mount -t proc proc "$rootfs/proc" || fail "mount proc"
mount -o rbind /dev "$rootfs/dev" || fail "mount dev"
mount -t tmpfs -o mode=1777 tmpfs "$rootfs/tmp" || fail "mount tmp"

# The command as one `sh -c` string: su's option parser would take a `-c`
# among trailing arguments for its own.
quote() {
	Q='' s=$1
	while :; do
		case $s in
		*\'*)
			Q="$Q${s%%\'*}'\\''"
			s=${s#*\'}
			;;
		*) break ;;
		esac
	done
	Q="'$Q$s'"
}
cmd='exec'
for a in "$@"; do
	quote "$a"
	cmd="$cmd $Q"
done

: >"/run/nii/ctr/$cid.started"
chroot "$rootfs" /bin/su -p -s /bin/sh ctr -c "$cmd"
done_rc "$?"
