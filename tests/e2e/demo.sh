#!/usr/bin/env bash
# `make demo`: SPIRE server and agent, containerd with NRI, the daemon, and one annotated
# pod whose container prints the SPIFFE ID in its own certificate. Everything is torn down
# on exit. Needs root; the first run builds containerd, crictl and SPIRE (cached after).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/e2e/lib/bed.sh
. "$here/lib/bed.sh"
# shellcheck source=tests/e2e/lib/nii.sh
. "$here/lib/nii.sh"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
trap 'nii_stop 2>/dev/null || true; bed_down $?' EXIT

say "building the daemon and the real peers (cached after the first run)"
nii_build
say "starting containerd (NRI on), SPIRE server and agent"
bed_up
say "starting nri-identity-injector"
nii_start
echo "daemon ready: $(curl -fsS "http://$NII_HTTP/readyz" | tr '\n' ' ')"

say "registering spiffe://$E2E_TD/demo for workloads running as uid 1001"
bed_wait_entry "$(bed_entry /demo unix:uid:1001)"

annotation=$(nii_identity /var/certs)
say "a pod with the annotation identity.noderesource.dev/container.app:"
printf '%s\n' "$annotation"
pod_uid=$(bed_uuid)
pod=$(bed_pod_json demo "$pod_uid" "$(nii_annotations identity.noderesource.dev/container.app "$annotation")")
# The workload reads its own certificate with nothing but busybox: the SPIFFE ID is the URI
# SAN, a DER [6] IA5String (tag 0x86, one length byte, then the text).
cat >"$E2E/specs/whoami.sh" <<'SCRIPT'
echo "I am uid $(id -u). My files:"
ls -l /var/certs
echo "My SPIFFE ID (from /var/certs/svid.pem):"
awk '/BEGIN/{f=1;next} /END/{exit} f' /var/certs/svid.pem | base64 -d | od -An -v -tx1 | tr -s ' ' '\n' | grep . |
	awk 'BEGIN { for (i = 0; i < 256; i++) v[sprintf("%02x", i)] = i }
	{ b[n++] = $1 }
	END { for (i = 0; i < n - 9; i++) if (b[i] == "86" && b[i+2] == "73" && b[i+3] == "70" && b[i+8] == "3a") {
		s = ""; for (j = 0; j < v[b[i+1]]; j++) s = s sprintf("%c", v[b[i+2+j]]); print s; exit } }'
SCRIPT
script=$(cat "$E2E/specs/whoami.sh")
pid=$("$CRICTL" runp "$pod")
cid=$("$CRICTL" create "$pid" "$(bed_ctr_json app sh -c "$script")" "$pod")
t=$(nii_ms)
"$CRICTL" start "$cid" >/dev/null
echo "crictl start took $(($(nii_ms) - t)) ms; the daemon delivered the identity in $(nii_delivered_ms "$cid") ms, before the container's first instruction"
bed_wait_exited "$cid" 30

say "the container's output"
"$CRICTL" logs "$cid"

dir=$(nii_dir "$pod_uid" "$cid")
say "on the host, bind-mounted read-only at /var/certs: $dir"
ls -l "$dir"
echo "certificate: $(openssl x509 -in "$dir/svid.pem" -noout -subject -enddate -ext subjectAltName 2>/dev/null | tr '\n' ' ')"

say "removing the pod: the directory goes with it"
"$CRICTL" rmp -f "$pid" >/dev/null
[[ -e $dir ]] && echo "still there?!" || echo "$dir is gone"
say "tearing down"
