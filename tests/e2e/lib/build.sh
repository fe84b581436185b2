#!/usr/bin/env bash
# Builds the real programs the end-to-end bed runs (containerd, its runc shim,
# ctr, crictl, runc, spire-server, spire-agent; CRI-O and pinns on demand) from
# the Go module proxy, and installs the Debian packages the bed needs
# (busybox-static, gcc, libseccomp-dev; conmon for CRI-O).
#
# Executed: builds everything that is missing, then prints the binary dirs.
# Sourced:  defines nii_build_all and the NII_*_DIR variables (bed.sh does
#           this) without building anything until nii_build_all is called.
#
# Binaries are cached per version under $NII_CACHE/bin/<name>-<version>/ so a
# warm run costs nothing; GOMODCACHE and GOCACHE stay at the Go defaults so
# they survive between runs and are shared with every other Go build here.
# A directory only appears once its build completed (build into a temp dir,
# then rename), so an interrupted build is simply redone.
# Sourced, it leaves the shell options to the sourcing script (-euo pipefail).
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
	set -euo pipefail
fi

NII_CACHE=${NII_CACHE:-/var/cache/nri-identity-injector}
NII_CONTAINERD_VERSION=${NII_CONTAINERD_VERSION:-v2.3.4}
NII_CRICTL_VERSION=${NII_CRICTL_VERSION:-v1.34.0}
NII_SPIRE_VERSION=${NII_SPIRE_VERSION:-v1.13.3}
NII_KUBELET_VERSION=${NII_KUBELET_VERSION:-v1.34.4}
NII_ETCD_VERSION=${NII_ETCD_VERSION:-v3.6.16}
NII_CRIO_VERSION=${NII_CRIO_VERSION:-v1.36.3}
NII_HELM_VERSION=${NII_HELM_VERSION:-v3.22.0}
# runc from 1.2.8, 1.3.3 and 1.4.0 on closes its exec FIFO before the OCI startContainer
# hooks run, so `runc start` returns without waiting for them (older ones wait, holding
# containerd's StartContainer, and NRI plugin synchronisation with it, until the hooks end);
# the same releases fix the November 2025 container-escape CVEs.
NII_RUNC_VERSION=${NII_RUNC_VERSION:-v1.4.0}

NII_CONTAINERD_DIR=$NII_CACHE/bin/containerd-$NII_CONTAINERD_VERSION
NII_CRICTL_DIR=$NII_CACHE/bin/crictl-$NII_CRICTL_VERSION
NII_SPIRE_DIR=$NII_CACHE/bin/spire-$NII_SPIRE_VERSION
NII_KUBELET_DIR=$NII_CACHE/bin/kubelet-$NII_KUBELET_VERSION
# kube-apiserver, kube-controller-manager and kubectl of the kubelet's release.
NII_CONTROL_PLANE_DIR=$NII_CACHE/bin/kube-control-plane-$NII_KUBELET_VERSION
NII_ETCD_DIR=$NII_CACHE/bin/etcd-$NII_ETCD_VERSION
# crio, pinns (its namespace pinner) and copyimg (its test suite's image loader).
NII_CRIO_DIR=$NII_CACHE/bin/crio-$NII_CRIO_VERSION
NII_HELM_DIR=$NII_CACHE/bin/helm-$NII_HELM_VERSION
NII_RUNC_DIR=$NII_CACHE/bin/runc-$NII_RUNC_VERSION
# The OCI runtime the bed's shim calls; NII_RUNC=/usr/sbin/runc picks the distribution's.
NII_RUNC=${NII_RUNC:-$NII_RUNC_DIR/runc}
export NII_CACHE NII_CONTAINERD_DIR NII_CRICTL_DIR NII_SPIRE_DIR NII_KUBELET_DIR NII_CONTROL_PLANE_DIR NII_ETCD_DIR \
	NII_CRIO_DIR NII_HELM_DIR NII_RUNC_DIR NII_RUNC

# The toolchain must be the installed one: the module proxy is reachable but
# toolchain downloads are not, and a silent toolchain switch would hide a
# version mismatch behind a network error.
export GOTOOLCHAIN=local

_nii_go() {
	if command -v go >/dev/null 2>&1; then
		command go "$@"
	else
		/usr/local/go/bin/go "$@"
	fi
}

_nii_log() { printf 'build: %s\n' "$*" >&2; }

# _nii_have_all DIR NAME... : every named binary exists and is executable.
_nii_have_all() {
	local dir=$1 name
	shift
	for name in "$@"; do
		[[ -x $dir/$name ]] || return 1
	done
}

# _nii_build LABEL DIR "NAMES" FUNC : runs FUNC TMPDIR unless DIR already holds
# every name, then renames TMPDIR to DIR and prints one timing line.
_nii_build() {
	local label=$1 dir=$2 names=$3 func=$4 start tmp
	# shellcheck disable=SC2086 # names is a space-separated list on purpose
	if _nii_have_all "$dir" $names; then
		_nii_log "$label cached (0s) in $dir"
		return 0
	fi
	start=$SECONDS
	mkdir -p "$(dirname "$dir")"
	tmp=$(mktemp -d "$dir.tmp.XXXXXX")
	if ! "$func" "$tmp"; then
		rm -rf "$tmp"
		_nii_log "$label FAILED after $((SECONDS - start))s"
		return 1
	fi
	# shellcheck disable=SC2086
	if ! _nii_have_all "$tmp" $names; then
		rm -rf "$tmp"
		_nii_log "$label FAILED: not every binary of '$names' was produced"
		return 1
	fi
	rm -rf "$dir"
	mv "$tmp" "$dir"
	_nii_log "$label built in $((SECONDS - start))s in $dir"
}

_nii_build_containerd() {
	# CGO off drops only the btrfs snapshotter (the sole cgo user) and gives
	# static binaries; go install works because v2.3.x's go.mod has no
	# replace/exclude directives. Never add the no_cri tag.
	local m=github.com/containerd/containerd/v2/cmd
	GOBIN=$1 CGO_ENABLED=0 _nii_go install -trimpath -ldflags='-s -w' \
		"$m/containerd@$NII_CONTAINERD_VERSION" \
		"$m/containerd-shim-runc-v2@$NII_CONTAINERD_VERSION" \
		"$m/ctr@$NII_CONTAINERD_VERSION"
}

_nii_build_runc() {
	# cgo: runc's nsexec is C, and seccomp profiles need libseccomp.
	GOBIN=$1 CGO_ENABLED=1 _nii_go install -trimpath -tags seccomp -ldflags='-s -w' \
		"github.com/opencontainers/runc@$NII_RUNC_VERSION"
}

_nii_build_crictl() {
	GOBIN=$1 CGO_ENABLED=0 _nii_go install -trimpath -ldflags='-s -w' \
		"sigs.k8s.io/cri-tools/cmd/crictl@$NII_CRICTL_VERSION"
}

# _nii_in_module NAME FUNC ARGS... : FUNC ARGS, with errexit, inside a throwaway Go
# module example.invalid/NAME. Only a main module's replace directives count, so
# programs whose own go.mod replaces modules are built through one of these; the
# downloads stay in GOMODCACHE, the module directory goes.
_nii_in_module() {
	local name=$1 mod rc=0
	shift
	mod=$(mktemp -d "${TMPDIR:-/tmp}/nii-$name.XXXXXX")
	(
		set -euo pipefail
		cd "$mod"
		_nii_go mod init "example.invalid/$name" >/dev/null 2>&1
		"$@"
	) || rc=$?
	rm -rf "$mod"
	return "$rc"
}

_nii_build_crio() { _nii_in_module crio-tools _nii_crio "$1"; }

# CRI-O's build tags: seccomp (libseccomp through cgo, as CRI-O ships it, so
# RuntimeDefault means what it means on containerd); OpenPGP in Go instead of
# gpgme; no ostree and no btrfs (neither has headers here, neither is used).
NII_CRIO_TAGS='seccomp containers_image_openpgp containers_image_ostree_stub exclude_graphdriver_btrfs'

_nii_crio() {
	# `go install github.com/cri-o/cri-o/cmd/crio@version` is refused by the
	# proxy (it will not list the module's versions), but the exact version
	# resolves as a tool of a throwaway module.
	local gobin=$1 m=github.com/cri-o/cri-o v=$NII_CRIO_VERSION src
	_nii_go get -tool "$m/cmd/crio@$v" "$m/test/copyimg@$v"
	CGO_ENABLED=1 _nii_go build -trimpath -tags "$NII_CRIO_TAGS" \
		-ldflags "-s -w -X $m/internal/version.buildCommit=$v" -o "$gobin/crio" "$m/cmd/crio"
	# copyimg loads an OCI archive into CRI-O's storage with the same
	# containers/image and storage code CRI-O runs: no skopeo, whose Debian
	# dependencies would write /etc/containers.
	CGO_ENABLED=1 _nii_go build -trimpath -tags "$NII_CRIO_TAGS" -ldflags '-s -w' \
		-o "$gobin/copyimg" "$m/test/copyimg"
	# pinns is C in the module's pinns/ (no Debian package ships it); its
	# Makefile writes ../bin, so build in a copy (the module cache is read-only).
	src=$(_nii_go list -m -f '{{.Dir}}' "$m")
	cp -r "$src/pinns" "$gobin/pinns-src"
	chmod -R u+w "$gobin/pinns-src"
	make -s -C "$gobin/pinns-src" ../bin/pinns
	mv "$gobin/bin/pinns" "$gobin/pinns"
	rm -rf "${gobin:?}/pinns-src" "${gobin:?}/bin"
}

_nii_build_spire() { _nii_in_module spire-tools _nii_spire "$1"; }

_nii_spire() {
	# A direct `go install ...@version` of SPIRE may be refused: resolve it as
	# tools of a throwaway module.
	local gobin=$1 s=github.com/spiffe/spire/cmd
	# SPIRE v1.15's server requires ejbca-go-client-sdk v1.1.0, which the module proxy
	# refuses (403); v1.0.2 builds the same plugin. Harmless for versions that pin v1.0.2.
	_nii_go mod edit -replace github.com/Keyfactor/ejbca-go-client-sdk=github.com/Keyfactor/ejbca-go-client-sdk@v1.0.2
	_nii_go get -tool "$s/spire-server@$NII_SPIRE_VERSION" "$s/spire-agent@$NII_SPIRE_VERSION"
	# The server's sqlite datastore exists only with cgo (bundled
	# amalgamation, so gcc is enough); without it the server builds but
	# refuses sqlite3 at run time.
	GOBIN=$gobin CGO_ENABLED=1 _nii_go install -trimpath -ldflags='-s -w' "$s/spire-server"
	# The agent needs no cgo; keep it static.
	GOBIN=$gobin CGO_ENABLED=0 _nii_go install -trimpath -ldflags='-s -w' "$s/spire-agent"
}

# _nii_k8s GOBIN CMD... : k8s.io/kubernetes/cmd/CMD for each CMD, at the
# kubelet's version (run by _nii_in_module).
_nii_k8s() {
	# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces every
	# k8s.io staging module with ./staging/src/... and requires them at
	# v0.0.0. The throwaway module requires it and points each of those at
	# the published staging release of the same patch (v1.X.Y -> v0.X.Y).
	local gobin=$1 k=$NII_KUBELET_VERSION staging gomod m ver c pkgs=()
	shift
	staging=v0.${k#v1.}
	export CGO_ENABLED=0
	_nii_go mod edit -require="k8s.io/kubernetes@$k"
	gomod=$(_nii_go mod download -json "k8s.io/kubernetes@$k" |
		sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
	[[ -r $gomod ]] || { _nii_log "no go.mod for k8s.io/kubernetes@$k"; return 1; }
	# The modules kubernetes itself redirects into its staging tree.
	while read -r m; do
		_nii_go mod edit -replace="$m=$m@$staging"
	done < <(awk '$2 == "=>" && $3 ~ /^\.\/staging\// { print $1 }' "$gomod")
	# Keep kubernetes' own GODEBUG defaults (its go.mod says
	# `godebug default=go1.24`; a wrapper's go line would be newer).
	ver=$(awk '$1 == "godebug" { print $2; exit }' "$gomod")
	[[ -z $ver ]] || _nii_go mod edit -godebug="$ver"
	# Every command in one `go get` (go.sum must cover all their packages),
	# each at $k: without a version `go get` would upgrade kubernetes.
	for c in "$@"; do pkgs+=("k8s.io/kubernetes/cmd/$c@$k"); done
	_nii_go get "${pkgs[@]}"
	for c in "$@"; do
		# The version stamps the binaries report (and log) instead of v0.0.0.
		_nii_go build -trimpath -o "$gobin/$c" -ldflags "-s -w \
			-X k8s.io/component-base/version.gitVersion=$k \
			-X k8s.io/client-go/pkg/version.gitVersion=$k" \
			"k8s.io/kubernetes/cmd/$c"
	done
}

_nii_build_kubelet() { _nii_in_module k8s-wrap _nii_k8s "$1" kubelet; }

_nii_build_control_plane() {
	_nii_in_module k8s-wrap _nii_k8s "$1" kube-apiserver kube-controller-manager kubectl
}

_nii_build_etcd() { _nii_in_module etcd-wrap _nii_etcd "$1"; }

_nii_etcd() {
	# go.etcd.io/etcd/server/v3 (etcd's main package) replaces its sibling
	# modules with ../ paths: pin them to the same release instead.
	local gobin=$1 e=$NII_ETCD_VERSION m
	_nii_go mod edit -require="go.etcd.io/etcd/server/v3@$e"
	for m in api/v3 client/pkg/v3 client/v3 pkg/v3; do
		_nii_go mod edit -replace="go.etcd.io/etcd/$m=go.etcd.io/etcd/$m@$e"
	done
	_nii_go get "go.etcd.io/etcd/server/v3@$e"
	CGO_ENABLED=0 _nii_go build -trimpath -ldflags '-s -w' -o "$gobin/etcd" go.etcd.io/etcd/server/v3
}

# nii_build_control_plane: etcd, kube-apiserver, kube-controller-manager and
# kubectl (lib/apiserver.sh), built only on demand: about 7 minutes cold.
nii_build_control_plane() {
	local lock rc=0
	mkdir -p "$NII_CACHE/bin"
	exec {lock}>"$NII_CACHE/.build.lock"
	flock "$lock"
	_nii_build "etcd $NII_ETCD_VERSION" "$NII_ETCD_DIR" etcd _nii_build_etcd || rc=1
	_nii_build "kube control plane $NII_KUBELET_VERSION" "$NII_CONTROL_PLANE_DIR" \
		"kube-apiserver kube-controller-manager kubectl" _nii_build_control_plane || rc=1
	exec {lock}>&-
	return "$rc"
}

_nii_build_helm() { _nii_in_module helm-tools _nii_helm "$1"; }

_nii_helm() {
	# The proxy refuses helm's version list, so `go install ...@version` may be
	# refused too: resolve the exact version as a tool of a throwaway module.
	local gobin=$1 h=helm.sh/helm/${NII_HELM_VERSION%%.*}/cmd/helm
	_nii_go get -tool "$h@$NII_HELM_VERSION"
	GOBIN=$gobin CGO_ENABLED=0 _nii_go install -trimpath \
		-ldflags="-s -w -X helm.sh/helm/${NII_HELM_VERSION%%.*}/internal/version.version=$NII_HELM_VERSION" "$h"
}

# nii_build_helm: the helm CLI (charts/), built only on demand; sets NII_HELM.
nii_build_helm() {
	local lock rc=0
	mkdir -p "$NII_CACHE/bin"
	exec {lock}>"$NII_CACHE/.build.lock"
	flock "$lock"
	_nii_build "helm $NII_HELM_VERSION" "$NII_HELM_DIR" helm _nii_build_helm || rc=1
	exec {lock}>&-
	NII_HELM=$NII_HELM_DIR/helm
	export NII_HELM
	return "$rc"
}

# nii_build_kubelet: the standalone kubelet (lib/kubelet.sh), built only on
# demand: about 3 minutes and 1.5 GB of RAM cold, so not part of nii_build_all.
nii_build_kubelet() {
	local lock rc=0
	mkdir -p "$NII_CACHE/bin"
	exec {lock}>"$NII_CACHE/.build.lock"
	flock "$lock"
	_nii_build "kubelet $NII_KUBELET_VERSION" "$NII_KUBELET_DIR" kubelet _nii_build_kubelet || rc=1
	exec {lock}>&-
	return "$rc"
}

# nii_build_delegated_fetch: tests/e2e/tools/delegated-fetch, a Delegated
# Identity API client, cached under a hash of its sources; sets
# NII_DELEGATED_FETCH to the binary.
nii_build_delegated_fetch() {
	local src hash dir lock rc=0
	src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../tools/delegated-fetch" && pwd)
	hash=$(cat "$src/go.mod" "$src/go.sum" "$src"/*.go | sha256sum | cut -c1-12)
	dir=$NII_CACHE/bin/delegated-fetch-$hash
	mkdir -p "$NII_CACHE/bin"
	exec {lock}>"$NII_CACHE/.build.lock"
	flock "$lock"
	_NII_DF_SRC=$src _nii_build "delegated-fetch $hash" "$dir" delegated-fetch _nii_build_delegated_fetch || rc=1
	exec {lock}>&-
	NII_DELEGATED_FETCH=$dir/delegated-fetch
	export NII_DELEGATED_FETCH
	return "$rc"
}

_nii_build_delegated_fetch() {
	# -mod=readonly: the committed go.sum must be complete.
	(cd "$_NII_DF_SRC" && CGO_ENABLED=0 _nii_go build -mod=readonly -trimpath \
		-ldflags='-s -w' -o "$1/delegated-fetch" .)
}

# nii_build_crio: CRI-O (crio, pinns, copyimg) and the Debian packages it
# needs, built only on demand (E2E_RUNTIME=cri-o): about N minutes cold.
nii_build_crio() {
	local lock rc=0
	_nii_apt conmon libseccomp-dev || return 1
	mkdir -p "$NII_CACHE/bin"
	exec {lock}>"$NII_CACHE/.build.lock"
	flock "$lock"
	_nii_build "cri-o $NII_CRIO_VERSION" "$NII_CRIO_DIR" "crio pinns copyimg" _nii_build_crio || rc=1
	exec {lock}>&-
	return "$rc"
}

# _nii_apt PACKAGE... : install the packages that are not installed yet.
_nii_apt() {
	local missing=() p start=$SECONDS
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
	done
	((${#missing[@]})) || return 0
	# Refresh the lists only when the cached ones cannot satisfy the install.
	if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"; then
		apt-get update
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
	fi
	_nii_log "packages ${missing[*]} installed in $((SECONDS - start))s"
}

# nii_build_e2e_tool NAME : tests/e2e/tools/NAME, a Go program of the tests with its own
# module (committed go.mod and go.sum), cached under a hash of its sources; prints the
# binary's path. The OpenShift checkers (ignition-check, scc-admission) are built this way.
nii_build_e2e_tool() {
	local name=$1 src hash dir lock rc=0
	src=$(cd "$(dirname "${BASH_SOURCE[0]}")/../tools/$name" && pwd)
	hash=$(cat "$src/go.mod" "$src/go.sum" "$src"/*.go | sha256sum | cut -c1-12)
	dir=$NII_CACHE/bin/$name-$hash
	mkdir -p "$NII_CACHE/bin"
	exec {lock}>"$NII_CACHE/.build.lock"
	flock "$lock"
	_NII_TOOL_SRC=$src _NII_TOOL_NAME=$name _nii_build "$name $hash" "$dir" "$name" _nii_build_e2e_tool >&2 || rc=1
	exec {lock}>&-
	((rc == 0)) || return 1
	echo "$dir/$name"
}

_nii_build_e2e_tool() {
	# -mod=readonly: the committed go.sum must be complete.
	(cd "$_NII_TOOL_SRC" && CGO_ENABLED=0 _nii_go build -mod=readonly -trimpath \
		-ldflags='-s -w' -o "$1/$_NII_TOOL_NAME" .)
}

# nii_install_packages: runc (the distribution's, for NII_RUNC=/usr/sbin/runc), a
# static busybox (the only content of the test images), gcc (spire-server's and
# runc's cgo, the scratch image's binary) and libseccomp-dev (runc's seccomp).
# Debian's containerd is deliberately not installed: its shim would shadow ours.
nii_install_packages() {
	local missing=()
	[[ -x /usr/sbin/runc ]] || missing+=(runc)
	dpkg-query -W -f='${Status}' libseccomp-dev 2>/dev/null | grep -q 'ok installed' || missing+=(libseccomp-dev)
	# The images need the *static* busybox; the dynamic one would not run
	# inside a rootfs that holds nothing else.
	dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || missing+=(busybox-static)
	command -v gcc >/dev/null 2>&1 || missing+=(gcc)
	if ((${#missing[@]} == 0)); then
		_nii_log "packages present (0s)"
		return 0
	fi
	_nii_apt "${missing[@]}"
}

nii_build_all() {
	local lock
	nii_install_packages
	mkdir -p "$NII_CACHE/bin"
	# Serialise concurrent callers (several test scripts, several sessions):
	# the second one waits and then finds everything cached.
	exec {lock}>"$NII_CACHE/.build.lock"
	flock "$lock"
	local rc=0
	_nii_build "containerd $NII_CONTAINERD_VERSION" "$NII_CONTAINERD_DIR" \
		"containerd containerd-shim-runc-v2 ctr" _nii_build_containerd || rc=1
	((rc)) || _nii_build "crictl $NII_CRICTL_VERSION" "$NII_CRICTL_DIR" "crictl" _nii_build_crictl || rc=1
	((rc)) || _nii_build "runc $NII_RUNC_VERSION" "$NII_RUNC_DIR" "runc" _nii_build_runc || rc=1
	((rc)) || _nii_build "spire $NII_SPIRE_VERSION" "$NII_SPIRE_DIR" \
		"spire-server spire-agent" _nii_build_spire || rc=1
	exec {lock}>&-
	((rc == 0)) || return 1
	if [[ -e /usr/bin/containerd-shim-runc-v2 ]]; then
		_nii_log "warning: /usr/bin/containerd-shim-runc-v2 exists (distro containerd?); the bed pins runtime_path anyway"
	fi
}

# The VM bed's programs (qemu, a guest kernel, virtiofsd): lib/vm.sh.
# shellcheck source=tests/e2e/lib/build_vm.sh
. "$(dirname "${BASH_SOURCE[0]}")/build_vm.sh"

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
	# `build.sh vm`: only what the VM bed needs.
	if [[ ${1:-} == vm ]]; then
		nii_build_vm
		printf 'NII_VM_QEMU=%s\nNII_VIRTIOFSD=%s\nNII_VM_KERNEL_DIR=%s\n' \
			"$NII_VM_QEMU" "$NII_VIRTIOFSD" "$NII_VM_KERNEL_DIR"
		exit 0
	fi
	nii_build_all
	printf 'NII_CONTAINERD_DIR=%s\nNII_CRICTL_DIR=%s\nNII_SPIRE_DIR=%s\nNII_RUNC=%s\n' \
		"$NII_CONTAINERD_DIR" "$NII_CRICTL_DIR" "$NII_SPIRE_DIR" "$NII_RUNC"
	# `build.sh kubelet cri-o`: also the standalone kubelet, CRI-O.
	for extra in "$@"; do
		case $extra in
		kubelet)
			nii_build_kubelet
			printf 'NII_KUBELET_DIR=%s\n' "$NII_KUBELET_DIR"
			;;
		cri-o)
			nii_build_crio
			printf 'NII_CRIO_DIR=%s\n' "$NII_CRIO_DIR"
			;;
		*)
			_nii_log "unknown extra '$extra' (kubelet, cri-o)"
			exit 2
			;;
		esac
	done
fi
