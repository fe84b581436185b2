#!/usr/bin/env python3
"""Render the shipped manifests (deploy/) as static pods for the bed's standalone kubelet.

tests/e2e/deploy.sh runs the DaemonSet's pod template, as shipped, on a real kubelet. A
static pod cannot use what the API server provides, and the bed keeps its sockets in its
scratch directory, so exactly these things change; everything else (the securityContext and
its capabilities, the volume mounts, the probes, the entrypoint) is the manifest's:

* the ConfigMap volume becomes a hostPath directory holding its config.toml;
* each hostPath volume is pointed at the bed's directory for it (NRI socket, SPIRE admin
  socket, artifact root); the artifact root keeps its rule of being mounted at its host
  path, so its mountPath and artifact_root follow; a hostPath the bed has no mapping for is
  an error, so the bed never touches the real node paths;
* the service account goes (static pods cannot name one), so there is no token: the kubelet
  is the bed's read-only port (http, no credentials), reached over the host network;
* the daemon's HTTP port is a free one (the host network is shared), in the config, the
  container port and the scrape hint alike;
* images are the locally imported ones, never pulled.

Usage: render_deploy.py daemon|example OUT.json [--set KEY=VALUE ...]
Keys: uid; for daemon nri_dir, admin_dir, artifact_root, kubelet_url, http_port and
config_dir (where config.toml is written: not in the kubelet's manifest directory), and
caps (a comma-separated list replacing the added capabilities: test variants only); for
example image and name (default the Deployment's). Writes the pod as JSON, which the
kubelet reads as YAML.
"""

import argparse
import json
import os
import sys

import yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
MANIFEST = os.path.join(REPO, "deploy", "nri-identity-injector.yaml")
EXAMPLE = os.path.join(REPO, "deploy", "example-pod.yaml")


def die(msg):
    sys.exit(f"render_deploy: {msg}")


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def one(docs, kind):
    found = [d for d in docs if d.get("kind") == kind]
    if len(found) != 1:
        die(f"expected one {kind}, found {len(found)}")
    return found[0]


def static_pod(template, name, namespace, uid):
    """A Pod from a workload's pod template, without what only the API server provides."""
    meta = template.get("metadata") or {}
    spec = dict(template["spec"])
    spec.pop("serviceAccountName", None)
    spec.pop("serviceAccount", None)
    spec.pop("automountServiceAccountToken", None)
    spec["hostNetwork"] = True
    spec["dnsPolicy"] = "Default"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "labels": meta.get("labels") or {},
            "annotations": meta.get("annotations") or {},
        },
        "spec": spec,
    }


def set_toml_key(text, key, value):
    """Replaces the line `key = ...` of a flat TOML document (the ConfigMap's is flat)."""
    lines = text.splitlines()
    hits = [i for i, l in enumerate(lines) if l.split("=", 1)[0].strip() == key]
    if len(hits) != 1:
        die(f"config.toml sets {key} {len(hits)} times")
    lines[hits[0]] = f"{key} = {json.dumps(value)}"
    return "\n".join(lines) + "\n"


def toml_value(text, key):
    for l in text.splitlines():
        k, sep, v = l.partition("=")
        if sep and k.strip() == key:
            return json.loads(v.strip())
    die(f"config.toml does not set {key}")


def render_daemon(opts, out):
    docs = load(MANIFEST)
    ds = one(docs, "DaemonSet")
    cm = one(docs, "ConfigMap")
    config = cm["data"]["config.toml"]
    pod = static_pod(ds["spec"]["template"], ds["metadata"]["name"], ds["metadata"]["namespace"], opts["uid"])
    spec = pod["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "nri-identity-injector"]
    container["imagePullPolicy"] = "Never"

    artifact_root = toml_value(config, "artifact_root")
    # host path in the manifest -> (host path on the bed, mount at the same path too)
    host_paths = {
        os.path.dirname(toml_value(config, "nri_socket")): (opts["nri_dir"], False),
        os.path.dirname(toml_value(config, "agent_socket")): (opts["admin_dir"], False),
        artifact_root: (opts["artifact_root"], True),
    }
    config_dir = opts["config_dir"]
    moved = {}
    for vol in spec["volumes"]:
        if "configMap" in vol:
            if vol["configMap"]["name"] != cm["metadata"]["name"]:
                die(f"volume {vol['name']} is another ConfigMap")
            vol.pop("configMap")
            vol["hostPath"] = {"path": config_dir, "type": "Directory"}
        elif "hostPath" in vol:
            path = vol["hostPath"]["path"]
            if path not in host_paths:
                die(f"no bed directory for hostPath {path}")
            bed_path, same_path = host_paths[path]
            vol["hostPath"]["path"] = bed_path
            if same_path:
                moved[vol["name"]] = bed_path
        else:
            die(f"volume {vol['name']} is neither a ConfigMap nor a hostPath")
    for m in container["volumeMounts"]:
        if m["name"] in moved:
            m["mountPath"] = moved[m["name"]]
    config = set_toml_key(config, "artifact_root", opts["artifact_root"])

    # The kubelet: its read-only port on the host network (plain HTTP: the token and CA
    # settings stay, unused).
    found = False
    for e in container.get("env", []):
        if e["name"] == "NRI_IDENTITY_KUBELET_URL":
            e["value"] = opts["kubelet_url"]
            found = True
    if not found:
        die("the DaemonSet sets no NRI_IDENTITY_KUBELET_URL")

    # The HTTP port, shared with the host now.
    host, _, port = toml_value(config, "http_address").rpartition(":")
    config = set_toml_key(config, "http_address", f"{host}:{opts['http_port']}")
    for p in container.get("ports", []):
        if p["containerPort"] == int(port):
            p["containerPort"] = int(opts["http_port"])
    ann = pod["metadata"]["annotations"]
    if "prometheus.io/port" in ann:
        ann["prometheus.io/port"] = str(opts["http_port"])

    # Test variants only (deploy.sh's capability scenario): other added capabilities.
    if "caps" in opts:
        container["securityContext"]["capabilities"]["add"] = [c for c in opts["caps"].split(",") if c]

    os.makedirs(config_dir, exist_ok=True)
    with open(os.path.join(config_dir, "config.toml"), "w") as f:
        f.write(config)
    return pod


def render_example(opts, out):
    docs = load(EXAMPLE)
    dep = one(docs, "Deployment")
    name = opts.get("name", dep["metadata"]["name"])
    pod = static_pod(dep["spec"]["template"], name, dep["metadata"]["namespace"], opts["uid"])
    pod["spec"]["terminationGracePeriodSeconds"] = 2
    for c in pod["spec"]["containers"]:
        c["image"] = opts["image"]
        c["imagePullPolicy"] = "Never"
    return pod


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("what", choices=["daemon", "example"])
    ap.add_argument("out")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    opts = dict(s.split("=", 1) for s in args.set)
    pod = (render_daemon if args.what == "daemon" else render_example)(opts, args.out)
    # Written aside, then renamed: the kubelet ignores dot files and must never read half
    # a manifest.
    tmp = os.path.join(os.path.dirname(os.path.abspath(args.out)), "." + os.path.basename(args.out) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(pod, f, indent=1)
    os.replace(tmp, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
