# shellcheck shell=bash
# The bed of the chaos and soak runs (source after bed.sh and nii.sh): containerd with NRI's
# default validator (pods name the daemon as a required plugin, as deploy/ recommends), the
# artifact root on a small tmpfs that a filler file can exhaust, short-lived identities, the
# workload-side checker, and the driver (lib/chaos.py).

_CHAOS_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# chaos_bed_up ROOT_SIZE : bed_up, the default validator, the artifact root on a ROOT_SIZE
# tmpfs (its parent $E2E/artfs holds the filler: one file system for both).
chaos_bed_up() {
	nii_build
	nii_build_identity_check
	# A SPIRE server that is killed must come back with its CA, as production servers do
	# (disk, a KMS or an upstream authority): with the bed's default in-memory keys it
	# would come back with a new CA that its agents do not trust, and they would stop.
	export E2E_SPIRE_SERVER_KEYMANAGER=disk
	bed_up
	# containerd's NRI default validator, which honours required-plugins.noderesource.dev:
	# a container the daemon did not take part in creating is refused, not started bare.
	cat >>"$E2E/containerd/config.toml" <<-'EOF'

		[plugins.'io.containerd.nri.v1.nri'.default_validator]
		  enable = true
	EOF
	bed_restart_runtime
	if grep -E 'Ignoring unknown key in TOML|default validator is disabled' "$E2E_RUNTIME_LOG" >&2; then
		echo "chaos: containerd did not take the default validator" >&2
		return 1
	fi
	nii_places
	mkdir -p "$E2E/artfs" "$NII_ARTIFACTS"
	mount -t tmpfs -o "size=$1,mode=0700" nii-chaos-artifacts "$E2E/artfs"
	mkdir -m 0700 "$E2E/artfs/root"
	# nii_start finds a mount point and leaves it; the daemon finds a tmpfs.
	mount --bind "$E2E/artfs/root" "$NII_ARTIFACTS"
}

# chaos_identities FIRST_UID COUNT TTL_S : COUNT registration entries, one per uid from
# FIRST_UID (spiffe://$E2E_TD/chaos/u<uid>, unix:uid:<uid>), created in one call, and waits
# until the agent holds an SVID for each.
chaos_identities() {
	local first=$1 count=$2 ttl=$3 file=$E2E/spire/chaos-entries.json before
	python3 - "$first" "$count" "$ttl" "$E2E_TD" "$E2E_NODE_ID" >"$file" <<-'EOF'
		import json, sys
		first, count, ttl, td, parent = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
		json.dump({"entries": [{
		    "spiffe_id": f"spiffe://{td}/chaos/u{u}",
		    "parent_id": parent,
		    "selectors": [{"type": "unix", "value": f"uid:{u}"}],
		    "x509_svid_ttl": ttl,
		} for u in range(first, first + count)]}, sys.stdout)
	EOF
	before=$(grep -c 'SVID updated' "$E2E/logs/spire-agent.log" || true)
	"$SPIRE_SERVER" entry create -data "$file" >/dev/null
	bed_wait 600 "the agent's SVIDs for $count entries" \
		_chaos_agent_has $((before + count))
}

_chaos_agent_has() { (($(grep -c 'SVID updated' "$E2E/logs/spire-agent.log") >= $1)); }

# chaos_driver MODE ARGS... : lib/chaos.py MODE with the bed's variables.
chaos_driver() {
	python3 "$_CHAOS_LIB/chaos.py" "$@"
}
