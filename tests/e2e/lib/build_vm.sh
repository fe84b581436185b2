# shellcheck shell=bash
# The programs of the VM bed (lib/vm.sh), sourced by build.sh:
#   - qemu-system-x86 and busybox-static, installed from Debian;
#   - a Debian cloud kernel and the modules a virtio-fs guest needs, taken out
#     of the package with `apt-get download` + `dpkg-deb -x` into the cache
#     (no kernel is installed on the host);
#   - the Rust virtiofsd from crates.io, built with `cargo install --locked`.
# `nii_build_vm` does all three and exports NII_VM_QEMU, NII_VM_BUSYBOX,
# NII_VIRTIOFSD and NII_VM_KERNEL_DIR (vmlinuz, modules/*.ko in load order as
# listed in modules/order, release). Each part prints one timing line.

NII_VIRTIOFSD_VERSION=${NII_VIRTIOFSD_VERSION:-1.14.0}
NII_VIRTIOFSD_DIR=$NII_CACHE/bin/virtiofsd-$NII_VIRTIOFSD_VERSION
# The kernel package is the one this metapackage depends on at build time;
# each package version gets its own cache directory.
NII_VM_KERNEL_META=${NII_VM_KERNEL_META:-linux-image-cloud-amd64}
# What the guest loads: the virtio PCI transport and virtio-fs (their
# dependencies are added from each module's own `depends=`).
NII_VM_KERNEL_MODULES=${NII_VM_KERNEL_MODULES:-virtio_pci virtiofs}
NII_VM_QEMU=/usr/bin/qemu-system-x86_64
NII_VM_BUSYBOX=/bin/busybox
NII_VIRTIOFSD=$NII_VIRTIOFSD_DIR/bin/virtiofsd
export NII_VIRTIOFSD_VERSION NII_VIRTIOFSD_DIR NII_VM_QEMU NII_VM_BUSYBOX NII_VIRTIOFSD

# _nii_pkg_installed PKG : the Debian package is installed.
_nii_pkg_installed() {
	dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'
}

# _nii_apt_install PKG... : installs what is missing, refreshing the lists only
# when the cached ones cannot satisfy the install.
_nii_apt_install() {
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2 && return 0
	apt-get update >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2
}

# nii_vm_install_packages: qemu (the hypervisor), busybox-static (the guest's
# userland and the containers' rootfs) and the headers virtiofsd links with.
nii_vm_install_packages() {
	local p missing=() start=$SECONDS
	for p in qemu-system-x86 busybox-static libcap-ng-dev libseccomp-dev; do
		_nii_pkg_installed "$p" || missing+=("$p")
	done
	if ((${#missing[@]} == 0)); then
		_nii_log "vm packages present (0s): qemu $(dpkg-query -W -f='${Version}' qemu-system-x86)"
		return 0
	fi
	_nii_apt_install "${missing[@]}" || return 1
	_nii_log "vm packages ${missing[*]} installed in $((SECONDS - start))s"
}

_nii_build_virtiofsd() {
	# cargo's own temporary target dir: nothing of the build stays behind but
	# the binary (and cargo's registry cache, shared with every other build).
	env -u CARGO_TARGET_DIR cargo install --quiet --locked --root "$1" \
		"virtiofsd@$NII_VIRTIOFSD_VERSION"
}

# nii_build_virtiofsd: the Rust virtiofsd (about 5 minutes cold).
nii_build_virtiofsd() {
	local lock rc=0
	# Cached: no need to wait for the build lock (other builds may hold it
	# for many minutes).
	if _nii_have_all "$NII_VIRTIOFSD_DIR" bin/virtiofsd; then
		_nii_log "virtiofsd $NII_VIRTIOFSD_VERSION cached (0s) in $NII_VIRTIOFSD_DIR"
		return 0
	fi
	mkdir -p "$NII_CACHE/bin"
	exec {lock}>"$NII_CACHE/.build.lock"
	flock "$lock"
	_nii_build "virtiofsd $NII_VIRTIOFSD_VERSION" "$NII_VIRTIOFSD_DIR" bin/virtiofsd \
		_nii_build_virtiofsd || rc=1
	exec {lock}>&-
	return "$rc"
}

# _nii_kernel_pkg : "PACKAGE VERSION" of the kernel the metapackage points at.
_nii_kernel_pkg() {
	local pkg ver
	pkg=$(apt-cache depends --no-recommends --no-suggests "$NII_VM_KERNEL_META" 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
	[[ -n $pkg ]] || { _nii_log "no kernel package behind $NII_VM_KERNEL_META (apt-get update?)"; return 1; }
	ver=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | awk '$1 == "Version:" { print $2; exit }')
	[[ -n $ver ]] || { _nii_log "no version of $pkg in the apt lists"; return 1; }
	echo "$pkg $ver"
}

# _nii_ko_file TREE NAME : the file of module NAME (dashes and underscores are
# the same in module names).
_nii_ko_file() {
	local tree=$1 name=$2
	find "$tree" -type f \( -name "$name.ko*" -o -name "${name//_/-}.ko*" \) -print -quit
}

# _nii_ko_add TREE OUT NAME : copies NAME and, first, its dependencies into
# OUT (uncompressed, as busybox insmod wants them), appending each to
# OUT/order once, in load order.
_nii_ko_add() {
	local tree=$1 out=$2 name=${3//-/_} file dep deps
	grep -qx "$name" "$out/order" 2>/dev/null && return 0
	file=$(_nii_ko_file "$tree" "$name")
	if [[ -z $file ]]; then
		# Built into the kernel: nothing to load.
		grep -q "/${name}.ko" "$tree/modules.builtin" 2>/dev/null && return 0
		grep -q "/${name//_/-}.ko" "$tree/modules.builtin" 2>/dev/null && return 0
		_nii_log "kernel module $name: neither a module nor built in"
		return 1
	fi
	case $file in
	*.ko) cp "$file" "$out/$name.ko" ;;
	*.ko.xz) xz -dc "$file" >"$out/$name.ko" ;;
	*.ko.zst) zstd -qdc "$file" >"$out/$name.ko" ;;
	*.ko.gz) gzip -dc "$file" >"$out/$name.ko" ;;
	*) _nii_log "kernel module $name: unknown format $file"; return 1 ;;
	esac
	# The .modinfo section is NUL-separated key=value strings.
	deps=$(tr '\0' '\n' <"$out/$name.ko" | sed -n 's/^depends=//p' | head -n1)
	for dep in ${deps//,/ }; do
		_nii_ko_add "$tree" "$out" "$dep" || return 1
	done
	echo "$name" >>"$out/order"
}

_nii_build_vm_kernel() {
	local out=$1 dl tree release m
	dl=$(mktemp -d "${TMPDIR:-/tmp}/nii-kernel.XXXXXX")
	# apt's download sandbox user must be able to write there.
	chmod 0755 "$dl"
	chown _apt "$dl" 2>/dev/null || true
	if ! (cd "$dl" && apt-get download -q "$_NII_KPKG=$_NII_KVER" >&2); then
		rm -rf "$dl"
		return 1
	fi
	mkdir "$dl/x"
	dpkg-deb -x "$dl"/*.deb "$dl/x" || { rm -rf "$dl"; return 1; }
	release=$(find "$dl/x/lib/modules" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | head -n1)
	tree=$dl/x/lib/modules/$release
	install -m 0755 "$dl/x/boot/vmlinuz-$release" "$out/vmlinuz"
	echo "$release" >"$out/release"
	mkdir "$out/modules"
	: >"$out/modules/order"
	for m in $NII_VM_KERNEL_MODULES; do
		_nii_ko_add "$tree" "$out/modules" "$m" || { rm -rf "$dl"; return 1; }
	done
	rm -rf "$dl"
}

# nii_build_vm_kernel: the guest kernel and its modules; sets NII_VM_KERNEL_DIR.
nii_build_vm_kernel() {
	local lock rc=0 kp
	kp=$(_nii_kernel_pkg) || return 1
	_NII_KPKG=${kp% *}
	_NII_KVER=${kp#* }
	NII_VM_KERNEL_DIR=$NII_CACHE/vm/kernel-$_NII_KPKG-$_NII_KVER
	export NII_VM_KERNEL_DIR
	if _nii_have_all "$NII_VM_KERNEL_DIR" vmlinuz modules; then
		_nii_log "kernel $_NII_KPKG $_NII_KVER cached (0s) in $NII_VM_KERNEL_DIR"
		return 0
	fi
	mkdir -p "$NII_CACHE/vm"
	exec {lock}>"$NII_CACHE/.build.lock"
	flock "$lock"
	_nii_build "kernel $_NII_KPKG $_NII_KVER" "$NII_VM_KERNEL_DIR" "vmlinuz modules" \
		_nii_build_vm_kernel || rc=1
	exec {lock}>&-
	return "$rc"
}

# nii_build_vm: everything lib/vm.sh needs.
nii_build_vm() {
	nii_vm_install_packages || return 1
	nii_build_vm_kernel || return 1
	nii_build_virtiofsd || return 1
}
