#!/usr/bin/env bash
# The kernel's own decision on the daemon's SELinux labels. This host runs no SELinux, so a
# guest does: the VM bed's Debian cloud kernel (lib/build_vm.sh) booted with
# `security=selinux`, Debian's reference policy (selinux-policy-default, compiled offline into
# the binary policy) loaded from the initramfs, and the kernel's access check
# (/sys/fs/selinux/access, what libselinux's security_compute_av asks) queried for a process
# at a pod's level reading a file at each level the daemon may set. Debian's policy has no
# container_t/container_file_t; its sVirt types (svirt_t processes, svirt_image_t files) are
# under the same MCS constraints (mcs_constrained, the policy's mlsconstrain rules), so:
#
#   process svirt_t:s0:c1,c2 reads svirt_image_t:s0        (the daemon's "shared")   allowed
#   process svirt_t:s0:c1,c2 reads svirt_image_t:s0:c1,c2  ("private", its own pod)  allowed
#   process svirt_t:s0:c1,c2 reads svirt_image_t:s0:c3,c4  ("private", another pod)  denied
#
# The last line is "N passed, M failed". About 1 minute warm (one guest under TCG); the first
# run compiles the policy (about 1 minute) into the cache.
#
#   tests/e2e/selinux_mcs.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/e2e/lib/build.sh
. "$here/lib/build.sh"

work=$(mktemp -d "${TMPDIR:-/tmp}/nii-selinux-vm.XXXXXX")
trap 'rm -rf "$work"' EXIT

nii_vm_install_packages
nii_build_vm_kernel
nii_build_selinux_policy

# The guest: busybox, the policy and an /init that loads it and asks the kernel.
root=$work/root
mkdir -p "$root"/{bin,proc,sys,dev}
cp "$NII_VM_BUSYBOX" "$root/bin/busybox"
cp "$NII_SELINUX_POLICY" "$root/policy"
cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
say() { echo "NII-SELINUX: $*"; }
if ! mount -t selinuxfs selinuxfs /sys/fs/selinux; then
	say "error no selinuxfs: the kernel did not enable SELinux"
	poweroff -f
fi
# One write of the whole policy: the kernel refuses a policy written in pieces.
if ! dd if=/policy of=/sys/fs/selinux/load bs=16M 2>/dev/null; then
	say "error the kernel refused the policy"
	poweroff -f
fi
say "loaded mls=$(cat /sys/fs/selinux/mls) enforce=$(cat /sys/fs/selinux/enforce) policyvers=$(cat /sys/fs/selinux/policyvers)"
class=$(cat /sys/fs/selinux/class/file/index)
read_bit=$(cat /sys/fs/selinux/class/file/perms/read)
# valid CONTEXT : the policy knows the context (a write to `context` fails otherwise).
valid() { printf '%s' "$1" >/sys/fs/selinux/context 2>/dev/null; }
# ask NAME SOURCE TARGET : one access-vector query for the file class; prints whether the
# read permission is in the allowed vector.
ask() {
	valid "$2" || { say "error invalid context $2"; return; }
	valid "$3" || { say "error invalid context $3"; return; }
	exec 3<>/sys/fs/selinux/access
	printf '%s %s %s' "$2" "$3" "$class" >&3
	read -r allowed decided rest <&3
	exec 3<&-
	say "case $1 read=$(((0x$allowed >> (read_bit - 1)) & 1)) allowed=0x$allowed"
}
p=system_u:system_r:svirt_t:s0:c1,c2
ask shared "$p" system_u:object_r:svirt_image_t:s0
ask own "$p" system_u:object_r:svirt_image_t:s0:c1,c2
ask other "$p" system_u:object_r:svirt_image_t:s0:c3,c4
say done
poweroff -f
EOF
chmod 0755 "$root/init"
(cd "$root" && find . | "$NII_VM_BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -1) >"$work/initrd"

t=$SECONDS
# TCG: this host's KVM runs no stock Debian kernel. SELinux permissive: the access check
# answers the same either way, and nothing in the guest needs to be allowed.
timeout 300 "$NII_VM_QEMU" -accel tcg -m 512M -smp 1 -nographic -no-reboot \
	-kernel "$NII_VM_KERNEL_DIR/vmlinuz" -initrd "$work/initrd" \
	-append "console=ttyS0 quiet panic=-1 security=selinux selinux=1 enforcing=0" \
	</dev/null >"$work/console" 2>&1 || true
# The firmware's escape sequences may precede a line on the serial console.
out=$(tr -d '\r' <"$work/console" | grep -o 'NII-SELINUX: .*' | sed 's/^NII-SELINUX: //') || true
echo "selinux-mcs: guest ran in $((SECONDS - t)) s ($(sed 's/-[0-9]*$//' "$NII_VM_KERNEL_DIR/release") kernel, $(cat "$(dirname "$(dirname "$NII_SELINUX_POLICY")")/package"))"

passed=0 failed=0
check() {
	local name=$1 want=$2 got
	got=$(sed -n "s/^case $name read=\([01]\).*/\1/p" <<<"$out")
	if [[ $got == "$want" ]]; then
		passed=$((passed + 1))
		echo "PASS $name: read $([[ $want == 1 ]] && echo allowed || echo denied) ($(grep "^case $name " <<<"$out"))"
	else
		failed=$((failed + 1))
		echo "FAIL $name: expected read=$want, got '${got:-nothing}'"
	fi
}
if ! grep -q '^loaded mls=1' <<<"$out"; then
	echo "FAIL: no MCS policy loaded:"
	tail -30 "$work/console"
	echo "selinux-mcs: 0 passed, 1 failed"
	exit 1
fi
echo "  $(grep '^loaded' <<<"$out")"
grep '^error' <<<"$out" && failed=$((failed + 1))
check shared 1
check own 1
check other 0
echo "selinux-mcs: $passed passed, $failed failed"
((failed == 0))
