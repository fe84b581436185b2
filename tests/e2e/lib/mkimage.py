#!/usr/bin/env python3
"""Build registry-free OCI image tarballs for the end-to-end bed.

The bed has no registry and no internet, so its images are made here from the
host's static busybox:

* docker.io/library/e2e-busybox:1  - workload image, Cmd /bin/sh
* registry.k8s.io/pause:3.10.2     - sandbox image, Entrypoint /bin/sleep inf

Both share one uncompressed layer: bin/busybox, one symlink per applet, an
/etc/passwd and /etc/group with root, nobody and the unprivileged user 1001
'app' the test containers run as, and a sticky world-writable /tmp.

With --scratch-binary, a third image as a FROM scratch Containerfile would make
it: one layer holding only that static binary, as /idcheck, and nothing else
(no shell, no /etc, no directories):

* docker.io/library/e2e-scratch:1  - Entrypoint /idcheck

Every timestamp and owner is fixed, so the same busybox gives byte-identical
tarballs (and digests) on every run. index.json carries the full normalized
name in io.containerd.image.name: without it `ctr images import` invents an
`import-<date>:<tag>` name that CRI will not resolve.

Usage: mkimage.py [--busybox PATH] [--scratch-binary PATH] [--only busybox|pause|scratch] OUTDIR
Writes OUTDIR/e2e-busybox.tar, OUTDIR/pause.tar and, given --scratch-binary,
OUTDIR/e2e-scratch.tar (python3 stdlib only).
"""

import argparse
import hashlib
import io
import json
import os
import platform
import struct
import subprocess
import sys
import tarfile

# Fixed mtime for every tar member and the image configs: reproducibility
# matters more than a meaningful date.
EPOCH = 0
CREATED = "1970-01-01T00:00:00Z"

IMAGES = {
    "busybox": {
        "file": "e2e-busybox.tar",
        "name": "docker.io/library/e2e-busybox:1",
        "config": {"Cmd": ["/bin/sh"]},
    },
    "pause": {
        "file": "pause.tar",
        "name": "registry.k8s.io/pause:3.10.2",
        # The sandbox only has to stay alive until CRI SIGKILLs it.
        "config": {"Entrypoint": ["/bin/sleep", "inf"]},
    },
    "scratch": {
        "file": "e2e-scratch.tar",
        "name": "docker.io/library/e2e-scratch:1",
        "config": {"Entrypoint": ["/idcheck"]},
    },
}

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    "app:x:1001:1001:app:/home/app:/bin/sh\n"
)
GROUP = "root:x:0:\nnogroup:x:65534:\napp:x:1001:\n"


def oci_arch():
    """Map the host machine to the OCI architecture CRI matches images on."""
    machine = platform.machine()
    return {
        "x86_64": "amd64",
        "aarch64": "arm64",
        "armv7l": "arm",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
        "riscv64": "riscv64",
    }.get(machine, machine)


def _info(name, kind, mode, uid=0, gid=0, size=0, linkname=""):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.uname = ti.gname = ""
    ti.mtime = EPOCH
    ti.size = size
    ti.linkname = linkname
    return ti


class DeterministicTar:
    """A tar writer in memory with fixed metadata."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.USTAR_FORMAT)

    def dir(self, name, mode=0o755, uid=0, gid=0):
        self.tar.addfile(_info(name, tarfile.DIRTYPE, mode, uid, gid))

    def file(self, name, data, mode=0o644):
        self.tar.addfile(_info(name, tarfile.REGTYPE, mode, size=len(data)), io.BytesIO(data))

    def symlink(self, name, target):
        self.tar.addfile(_info(name, tarfile.SYMTYPE, 0o777, linkname=target))

    def close(self):
        self.tar.close()
        return self.buf.getvalue()


def is_static_elf(path):
    """True for an ELF file without a PT_INTERP program header."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF":
        return False
    is64 = data[4] == 2
    order = "<" if data[5] == 1 else ">"
    if is64:
        phoff, = struct.unpack_from(order + "Q", data, 0x20)
        phentsize, phnum = struct.unpack_from(order + "HH", data, 0x36)
    else:
        phoff, = struct.unpack_from(order + "I", data, 0x1C)
        phentsize, phnum = struct.unpack_from(order + "HH", data, 0x2A)
    for i in range(phnum):
        p_type, = struct.unpack_from(order + "I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP: needs a dynamic loader
            return False
    return True


def applets(busybox):
    """Applet names of this busybox, from the binary itself."""
    out = subprocess.run([busybox, "--list"], check=True, capture_output=True, text=True).stdout
    return sorted({a for a in out.split() if a and "/" not in a and a != "busybox"})


def build_layer(busybox):
    with open(busybox, "rb") as f:
        binary = f.read()
    t = DeterministicTar()
    for d in ("bin", "dev", "etc", "proc", "run", "sys", "var", "home"):
        t.dir(d + "/")
    t.dir("root/", 0o700)
    # Sticky and world-writable: uid 1001 must be able to write there.
    t.dir("tmp/", 0o1777)
    t.dir("home/app/", 0o755, 1001, 1001)
    t.file("bin/busybox", binary, 0o755)
    for applet in applets(busybox):
        t.symlink("bin/" + applet, "busybox")
    t.file("etc/passwd", PASSWD.encode())
    t.file("etc/group", GROUP.encode())
    # CRI bind-mounts these over the image's; having the targets avoids runc
    # creating them in the rootfs.
    for name in ("hosts", "resolv.conf", "hostname"):
        t.file("etc/" + name, b"")
    return t.close()


def build_scratch_layer(binary):
    with open(binary, "rb") as f:
        data = f.read()
    t = DeterministicTar()
    t.file("idcheck", data, 0o755)
    return t.close()


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build_image(spec, layer, arch):
    config = {
        "created": CREATED,
        "architecture": arch,
        "os": "linux",
        "config": dict(
            {"Env": ["PATH=/bin"], "WorkingDir": "/"},
            **spec["config"],
        ),
        "rootfs": {"type": "layers", "diff_ids": [digest(layer)]},
        "history": [{"created": CREATED, "created_by": "tests/e2e/lib/mkimage.py"}],
    }
    config_blob = canonical(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(config_blob),
            "size": len(config_blob),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": digest(layer),
                "size": len(layer),
            }
        ],
    }
    manifest_blob = canonical(manifest)
    name = spec["name"]
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest(manifest_blob),
                "size": len(manifest_blob),
                "platform": {"architecture": arch, "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
                },
            }
        ],
    }
    t = DeterministicTar()
    t.file("oci-layout", canonical({"imageLayoutVersion": "1.0.0"}))
    t.file("index.json", canonical(index))
    t.dir("blobs/")
    t.dir("blobs/sha256/")
    for blob in (layer, config_blob, manifest_blob):
        t.file("blobs/sha256/" + digest(blob).split(":", 1)[1], blob)
    return t.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--busybox", default="/bin/busybox", help="a static busybox binary")
    ap.add_argument("--scratch-binary", help="a static binary: the only content of the scratch image")
    ap.add_argument("--only", choices=sorted(IMAGES), action="append", help="build only this image")
    ap.add_argument("outdir")
    args = ap.parse_args()

    if not is_static_elf(args.busybox):
        # A dynamic busybox would fail inside an image that has no libc.
        sys.exit(f"mkimage: {args.busybox} is not a static ELF binary (install busybox-static)")
    wanted = args.only or [k for k in sorted(IMAGES) if k != "scratch" or args.scratch_binary]
    if "scratch" in wanted and not (args.scratch_binary and is_static_elf(args.scratch_binary)):
        sys.exit("mkimage: the scratch image needs --scratch-binary, a static ELF binary")

    os.makedirs(args.outdir, exist_ok=True)
    layer = build_layer(args.busybox)
    arch = oci_arch()
    for key in wanted:
        spec = IMAGES[key]
        path = os.path.join(args.outdir, spec["file"])
        image_layer = build_scratch_layer(args.scratch_binary) if key == "scratch" else layer
        data = build_image(spec, image_layer, arch)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        print(f"{path} {spec['name']}")


if __name__ == "__main__":
    main()
