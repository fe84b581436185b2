# shellcheck shell=bash
# A Kubernetes control plane for the bed: etcd, kube-apiserver and a minimal
# kube-controller-manager (service accounts, kube-root-ca.crt and namespace
# deletion only; no scheduler: pods name spec.nodeName) on 127.0.0.1, all
# under $E2E and started with bed_spawn, so bed_down stops them and removes
# their files.
#
#   . lib/bed.sh; . lib/kubelet.sh; . lib/apiserver.sh
#   bed_up; apiserver_up; kubelet_up      # the kubelet registers as a node
#   kubectl_e2e get nodes
#
# With the control plane up, kubelet_up joins it: node client certificate,
# bearer tokens checked by TokenReview and every request authorised by
# SubjectAccessReview (RBAC), as on a cluster node.
#
# Exported after apiserver_up: APISERVER_URL, APISERVER_PKI (ca.pem, sa keys,
# client certificates), APISERVER_ADMIN_KUBECONFIG, APISERVER_NODE_KUBECONFIG.

_as_log() { printf 'apiserver: %s\n' "$*" >&2; }

# _as_pki DIR NODE : CA, apiserver serving certificate, client certificates
# (admin in system:masters, the node, the controller manager, the apiserver's
# kubelet client) and the service-account key pair. EC P-256, one day.
_as_pki() {
	local d=$1 node=$2
	mkdir -p "$d" && chmod 700 "$d"
	bed_ca "$d" ca nii-e2e-k8s-ca &&
		bed_cert "$d" ca apiserver /CN=kube-apiserver server \
			IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc &&
		bed_cert "$d" ca admin /O=system:masters/CN=nii-e2e-admin client &&
		bed_cert "$d" ca node "/O=system:nodes/CN=system:node:$node" client &&
		bed_cert "$d" ca kcm /CN=system:kube-controller-manager client &&
		bed_cert "$d" ca apiserver-kubelet-client /CN=kube-apiserver-kubelet-client client &&
		bed_ec_key "$d/sa-key.pem" &&
		openssl pkey -in "$d/sa-key.pem" -pubout -out "$d/sa.pub" 2>/dev/null
}

# _as_kubeconfig FILE CERT-NAME : a kubeconfig for $APISERVER_URL with the
# client certificate $APISERVER_PKI/CERT-NAME.pem, everything embedded.
_as_kubeconfig() {
	local f=$1 c=$2 k=$NII_CONTROL_PLANE_DIR/kubectl p=$APISERVER_PKI
	"$k" config --kubeconfig="$f" set-cluster e2e --server="$APISERVER_URL" --certificate-authority="$p/ca.pem" --embed-certs >/dev/null &&
		"$k" config --kubeconfig="$f" set-credentials "$c" --client-certificate="$p/$c.pem" --client-key="$p/$c-key.pem" --embed-certs >/dev/null &&
		"$k" config --kubeconfig="$f" set-context e2e --cluster=e2e --user="$c" >/dev/null &&
		"$k" config --kubeconfig="$f" use-context e2e >/dev/null
}

# kubectl_e2e ARGS... : kubectl as cluster admin.
kubectl_e2e() { "$NII_CONTROL_PLANE_DIR/kubectl" --kubeconfig="$APISERVER_ADMIN_KUBECONFIG" "$@"; }

# apiserver_up : build (first use) and start etcd, kube-apiserver and the
# controller manager; wait until the default namespace has its CA ConfigMap.
# Call after bed_up and before kubelet_up.
apiserver_up() {
	local t t1 d p etcd_port peer_port
	[[ -n ${E2E:-} && -d $E2E ]] || _bed_die "apiserver_up needs bed_up first" || return 1
	t=$(_bed_ms)
	nii_build_control_plane || return 1
	d=$E2E/apiserver
	mkdir -p "$d/etcd" && chmod 700 "$d/etcd"
	APISERVER_PKI=$d/pki
	_as_pki "$APISERVER_PKI" "${KUBELET_NODE:-nii-e2e-node}" || _bed_die "cannot make the control plane's certificates" || return 1
	p=$APISERVER_PKI
	etcd_port=$(_bed_free_port)
	peer_port=$(_bed_free_port)
	APISERVER_URL=https://127.0.0.1:$(_bed_free_port)
	export APISERVER_PKI APISERVER_URL

	t1=$(_bed_ms)
	# No fsync: a bed's etcd lives as long as the test.
	bed_spawn etcd "$NII_ETCD_DIR/etcd" --name e2e --data-dir "$d/etcd" \
		--listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
		--listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
		--initial-cluster "e2e=http://127.0.0.1:$peer_port" --initial-cluster-state new \
		--listen-metrics-urls '' --log-level warn --unsafe-no-fsync --quota-backend-bytes $((512 << 20)) >/dev/null
	bed_wait 30 "etcd /health" curl -fsS -o /dev/null "http://127.0.0.1:$etcd_port/health" || return 1

	# --endpoint-reconciler-type=none: a loopback advertise address is refused
	# as the kubernetes Service's endpoint, and nothing here needs one.
	bed_spawn kube-apiserver "$NII_CONTROL_PLANE_DIR/kube-apiserver" \
		--etcd-servers="http://127.0.0.1:$etcd_port" \
		--bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="${APISERVER_URL##*:}" \
		--endpoint-reconciler-type=none --cert-dir="$d/certs" \
		--tls-cert-file="$p/apiserver.pem" --tls-private-key-file="$p/apiserver-key.pem" \
		--client-ca-file="$p/ca.pem" \
		--service-account-key-file="$p/sa.pub" --service-account-signing-key-file="$p/sa-key.pem" \
		--service-account-issuer=https://kubernetes.default.svc --service-cluster-ip-range=10.0.0.0/24 \
		--authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
		--kubelet-client-certificate="$p/apiserver-kubelet-client.pem" --kubelet-client-key="$p/apiserver-kubelet-client-key.pem" \
		--kubelet-certificate-authority="${KUBELET_PKI:-$p}/ca.pem" --v=1 >/dev/null
	bed_wait 90 "kube-apiserver /readyz" curl -fsS -o /dev/null --cacert "$p/ca.pem" --cert "$p/admin.pem" \
		--key "$p/admin-key.pem" "$APISERVER_URL/readyz" || { tail -20 "$E2E/logs/kube-apiserver.log" >&2; return 1; }
	_bed_log "etcd + kube-apiserver ready in $(_bed_since "$t1")"

	APISERVER_ADMIN_KUBECONFIG=$d/admin.kubeconfig
	APISERVER_NODE_KUBECONFIG=$d/node.kubeconfig
	export APISERVER_ADMIN_KUBECONFIG APISERVER_NODE_KUBECONFIG
	_as_kubeconfig "$APISERVER_ADMIN_KUBECONFIG" admin &&
		_as_kubeconfig "$APISERVER_NODE_KUBECONFIG" node &&
		_as_kubeconfig "$d/kcm.kubeconfig" kcm || return 1
	# Only what pods with service accounts need: a `default` account per
	# namespace and the kube-root-ca.crt ConfigMap their token volumes mount;
	# and the namespace controller, so that a deleted namespace goes (helm
	# uninstall of a chart that owns its namespace, tests/e2e/openshift.sh).
	bed_spawn kube-controller-manager "$NII_CONTROL_PLANE_DIR/kube-controller-manager" \
		--kubeconfig="$d/kcm.kubeconfig" --leader-elect=false --secure-port=0 \
		--use-service-account-credentials=true --controllers=serviceaccount,root-ca-cert-publisher,namespace \
		--root-ca-file="$p/ca.pem" --v=1 >/dev/null
	bed_wait 60 "kube-root-ca.crt" kubectl_e2e -n default get configmap kube-root-ca.crt || return 1
	# The kubelet now asks RBAC about every client: the bed's own kubelet client
	# certificate (lib/kubelet.sh) and the apiserver's (logs, exec) may do anything.
	kubectl_e2e create clusterrolebinding nii-e2e-kubelet-clients --clusterrole=system:kubelet-api-admin \
		--user=nri-identity-injector --user=kube-apiserver-kubelet-client >/dev/null || return 1
	_bed_log "control plane $NII_KUBELET_VERSION up in $(_bed_since "$t") at $APISERVER_URL"
}

# apiserver_down : stop the control plane, newest first (kube-apiserver waits for
# etcd while it shuts down). bed_down calls it after kubelet_down.
apiserver_down() {
	[[ -n ${E2E:-} ]] || return 0
	bed_stop kube-controller-manager 10
	bed_stop kube-apiserver 30
	bed_stop etcd 10
}

case " ${BED_DOWN_HOOKS:-} " in
*" apiserver_down "*) ;;
*) BED_DOWN_HOOKS="${BED_DOWN_HOOKS:-} apiserver_down" ;;
esac
