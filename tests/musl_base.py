"""An Alpine-like musl base image built here, offline, as a template base for tests: busybox as /bin/sh and its
applets, musl's loader and libc as Alpine lays them out (/lib/ld-musl-x86_64.so.1), no Python anywhere.

Debian's `busybox-static` and `musl` packages give the files; umoci makes an OCI layout of three layers, the
later two exercising whiteouts:

1. the userland, plus /etc/doomed.conf, /var/cache/old/{a,b} and /srv/keep.txt;
2. a whiteout of /etc/doomed.conf (`.wh.doomed.conf`);
3. an opaque /var/cache/old holding only `fresh` (`.wh..wh..opq`: a and b are gone).

`oci_layout()` gives the layout directory (tag `latest`), `oci_archive()` and `docker_archive()` the same image
packed by skopeo.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
MUSL_LIBC = Path("/lib/x86_64-linux-musl/libc.so")  # Debian's musl package: the libc is its own loader
MUSL_LOADER = "lib/ld-musl-x86_64.so.1"
ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "MUSL_FIXTURE=1")
OS_RELEASE = 'NAME="musl test base"\nID=alpine\nID_LIKE=alpine\nPRETTY_NAME="Alpine-like musl base (tests)"\n'


def _run(*command: str | Path) -> None:
    subprocess.run([str(part) for part in command], check=True, capture_output=True)


def missing_tools() -> list[str]:
    """What building it needs that this host lacks (`make deps` installs them)."""
    needed = {"umoci": shutil.which("umoci"), "skopeo": shutil.which("skopeo")}
    needed |= {"busybox-static": BUSYBOX.exists() or None, "musl": MUSL_LIBC.exists() or None}
    return sorted(name for name, found in needed.items() if not found)


def _userland(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = root / applet
        if applet != "bin/busybox" and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    (root / "lib").mkdir(exist_ok=True)
    shutil.copy(MUSL_LIBC, root / MUSL_LOADER)
    (root / "lib" / "libc.musl-x86_64.so.1").symlink_to("ld-musl-x86_64.so.1")
    etc = root / "etc"
    etc.mkdir()
    (etc / "os-release").write_text(OS_RELEASE)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n")
    (etc / "group").write_text("root:x:0:root\nnobody:x:65534:\n")
    (etc / "doomed.conf").write_text("removed by a whiteout in the second layer\n")
    for directory in ("root", "tmp", "var/cache/old", "srv"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "var/cache/old/a").write_text("a\n")
    (root / "var/cache/old/b").write_text("b\n")
    (root / "srv/keep.txt").write_text("kept\n")


def oci_layout(directory: Path) -> Path:
    """Builds the image as an OCI layout at `directory` (created), tag `latest`; returns `directory`."""
    image = f"{directory}:latest"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        _userland(root)
        _run("umoci", "init", "--layout", directory)
        _run("umoci", "new", "--image", image)
        _run("umoci", "insert", "--image", image, root, "/")
        _run("umoci", "insert", "--image", image, "--whiteout", "/etc/doomed.conf")
        fresh = Path(tmp) / "fresh"
        fresh.mkdir()
        (fresh / "fresh").write_text("fresh\n")
        _run("umoci", "insert", "--image", image, "--opaque", fresh, "/var/cache/old")
    config = [f"--config.env={item}" for item in ENV]
    _run("umoci", "config", "--image", image, "--os", "linux", "--architecture", "amd64", *config,
         "--config.workingdir=/srv", "--config.cmd=/bin/sh")  # fmt: skip
    return directory


def oci_archive(layout: Path, out: Path) -> Path:
    _run("skopeo", "--insecure-policy", "copy", "--quiet", f"oci:{layout}:latest", f"oci-archive:{out}")
    return out


def docker_archive(layout: Path, out: Path) -> Path:
    _run("skopeo", "--insecure-policy", "copy", "--quiet", f"oci:{layout}:latest", f"docker-archive:{out}:musl:latest")
    return out
