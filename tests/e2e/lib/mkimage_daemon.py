#!/usr/bin/env python3
"""Build the daemon's image (deploy/Containerfile) as an OCI archive, without a container engine.

deploy/Containerfile is FROM scratch, one COPY of the static release binary and an
ENTRYPOINT. This script reads those two lines from it (so the two cannot drift apart) and
writes the same image: one layer holding the binary at the COPY destination, the
ENTRYPOINT as the config's Entrypoint. The archive is reproducible (fixed timestamps and
owners, the helpers of mkimage.py) and names the image in io.containerd.image.name, so
`ctr -n k8s.io images import` makes it visible to CRI under NAME.

Usage: mkimage_daemon.py [--binary PATH] [--containerfile PATH] NAME OUT.tar
(python3 stdlib only; the binary defaults to the COPY source, relative to the repository).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mkimage  # noqa: E402  (the sibling module, found through the path set above)

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))


def parse_containerfile(path):
    """(copy source, copy destination, entrypoint list) of a FROM scratch Containerfile."""
    base = copy = entrypoint = None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            word, _, rest = line.partition(" ")
            if word == "FROM":
                base = rest.strip()
            elif word == "COPY":
                parts = rest.split()
                if len(parts) != 2 or parts[0].startswith("--"):
                    sys.exit(f"mkimage_daemon: only 'COPY <src> <dest>' is supported: {line}")
                copy = parts
            elif word == "ENTRYPOINT":
                entrypoint = json.loads(rest)
            else:
                sys.exit(f"mkimage_daemon: unsupported instruction in {path}: {line}")
    if base != "scratch" or copy is None or entrypoint is None:
        sys.exit(f"mkimage_daemon: {path} must be FROM scratch with one COPY and an ENTRYPOINT")
    return copy[0], copy[1], entrypoint


def build_layer(binary, dest):
    with open(binary, "rb") as f:
        data = f.read()
    t = mkimage.DeterministicTar()
    parts = dest.strip("/").split("/")
    for i in range(1, len(parts)):
        t.dir("/".join(parts[:i]) + "/")
    t.file("/".join(parts), data, 0o755)
    return t.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--containerfile", default=os.path.join(REPO, "deploy", "Containerfile"))
    ap.add_argument("--binary", help="the static binary (default: the COPY source)")
    ap.add_argument("name", help="image name, e.g. ghcr.io/nri-identity-injector/nri-identity-injector:0.1.0")
    ap.add_argument("out", help="the OCI archive to write")
    args = ap.parse_args()

    src, dest, entrypoint = parse_containerfile(args.containerfile)
    binary = args.binary or os.path.join(REPO, src)
    if not mkimage.is_static_elf(binary):
        # The image has no libc: a dynamic binary would not start.
        sys.exit(f"mkimage_daemon: {binary} is not a static ELF binary (make release)")
    if entrypoint[0] != dest:
        sys.exit(f"mkimage_daemon: ENTRYPOINT {entrypoint[0]} is not the copied {dest}")
    if ":" not in args.name.rsplit("/", 1)[-1]:
        sys.exit("mkimage_daemon: the image name needs a tag")

    layer = build_layer(binary, dest)
    spec = {"name": args.name, "config": {"Entrypoint": entrypoint}}
    data = mkimage.build_image(spec, layer, mkimage.oci_arch())
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, args.out)
    print(f"{args.out} {args.name}")


if __name__ == "__main__":
    main()
