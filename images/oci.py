"""Image archives as template bases: an OCI layout directory, an oci-archive or a `docker save` tarball (a
definition's `FROM oci:PATH`, `oci-archive:PATH`, `docker-archive:PATH`) turned into an image compute boots.

    config = unpack_archive(archive, kind, tree)           # skopeo to an OCI layout, umoci applies the layers
    size_mib = make_base_rootfs(tree, rootfs_ext4)         # + the agent with its own runtime, ext4 by mkfs -d
    image = publish_archive_image(archive, kind, name, image_root, kernel_from=BuiltImage.load("default"))

The base may be Debian, Ubuntu, Alpine/musl or have no Python at all: the agent brings its own runtime
(images/runtime.py). One kernel and initramfs serve every template, so a published image links the kernel and
initramfs of `kernel_from` (the default image). Layers are applied by umoci, whiteouts (`.wh.NAME`) and opaque
directories (`.wh..wh..opq`) included; nothing is loop-mounted. Run as root, files keep the owners the layers
give them; otherwise umoci unpacks rootless and every file belongs to the caller.

Whatever is wrong with the archive (not of its kind, corrupt, another architecture, unsafe paths) is a
DefinitionError with reason INVALID_BASE: it is the user's input.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from images.builder import BuiltImage, prune_old_builds
from images.cache import content_hash, stage, write_pointer
from images.definition.errors import INVALID_BASE, DefinitionError
from images.definition.planner import ARCHIVE_KINDS
from images.rootfs import UnsafeTree, finish_tree, make_ext4, tree_size_mib
from images.runtime import build_agent_runtime

OCI_VERSION = "1"
TAG = "base"
# Room left in a published root filesystem beyond what the image holds (ext4 images are sparse), and its least size.
HEADROOM_MIB = 512
MIN_ROOTFS_MIB = 1024
# Skopeo's and umoci's last words on a bad archive: enough to say what is wrong, never a whole log.
MAX_TOOL_MESSAGE = 500


@dataclass(frozen=True)
class ArchiveConfig:
    """What the image's config says (the OCI image config's `config`): its environment as (name, value) pairs in
    order, working directory and user (empty when unset), and the manifest digest that was unpacked."""

    env: tuple[tuple[str, str], ...]
    workdir: str
    user: str
    manifest_digest: str

    def image_config(self) -> dict:
        """As microvm.types.v1.ImageConfig's JSON (what compute's NodeImages reads from a manifest's `config`)."""
        config: dict = {"env": dict(self.env)} if self.env else {}
        if self.workdir:
            config["workdir"] = self.workdir
        if self.user:
            config["user"] = self.user
        return config


def _invalid(archive: Path, kind: str, message: str) -> DefinitionError:
    return DefinitionError(INVALID_BASE, f"{kind}:{archive.name}: {message}")


def _tool(command: list[str], archive: Path, kind: str, what: str, work: Path) -> None:
    """Runs skopeo or umoci; a failure is the archive's: its message, without our temporary paths."""
    process = subprocess.run(command, capture_output=True, text=True, errors="replace")
    if process.returncode != 0:
        text = process.stderr or process.stdout
        messages = re.findall(r'msg="((?:[^"\\]|\\.)*)"', text)  # logrus lines: time=... level=fatal msg="..."
        text = " ".join(" ".join(messages or [text]).split()).replace('\\"', '"')
        text = text.replace(f"{work}/source", archive.name).replace(str(work), "...")
        raise _invalid(archive, kind, f"{what}: {text[-MAX_TOOL_MESSAGE:] or f'exit status {process.returncode}'}")


def _check_kind(archive: Path, kind: str) -> None:
    if kind not in ARCHIVE_KINDS:
        raise DefinitionError(INVALID_BASE, f"unknown archive kind {kind!r} (one of {', '.join(ARCHIVE_KINDS)})")
    if kind == "oci":
        if not (archive / "oci-layout").is_file() or not (archive / "index.json").is_file():
            raise _invalid(archive, kind, "not an OCI layout directory (no oci-layout and index.json)")
    elif not archive.is_file():
        raise _invalid(archive, kind, "not an archive file")


def _read_config(layout: Path, archive: Path, kind: str) -> ArchiveConfig:
    def blob(digest: str) -> dict:
        algorithm, _, hexdigest = digest.partition(":")
        return json.loads((layout / "blobs" / algorithm / hexdigest).read_text())

    try:
        manifest_digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
        config = blob(blob(manifest_digest)["config"]["digest"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise _invalid(archive, kind, f"unreadable image config: {exc}") from None
    platform = f"{config.get('os', '?')}/{config.get('architecture', '?')}"
    if platform != "linux/amd64":
        raise _invalid(archive, kind, f"the image is for {platform}; sandboxes run linux/amd64")
    settings = config.get("config") or {}
    env = tuple(tuple(item.partition("=")[::2]) for item in settings.get("Env") or [] if "=" in item)
    return ArchiveConfig(env, settings.get("WorkingDir") or "", settings.get("User") or "", manifest_digest)


def unpack_archive(archive: Path, kind: str, out_tree: Path) -> ArchiveConfig:
    """Unpacks image archive `archive` of `kind` ("oci", "oci-archive", "docker-archive") into the new directory
    `out_tree` as a root filesystem tree, and returns what its config says. Raises DefinitionError(INVALID_BASE)."""
    archive = Path(archive)
    _check_kind(archive, kind)
    if out_tree.exists():
        raise FileExistsError(f"{out_tree} exists: unpack_archive makes it")
    out_tree.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".unpack.", dir=out_tree.parent))
    try:
        # skopeo reads `kind:PATH[:REFERENCE]`: a link with a plain name keeps a ':' in the real path from
        # being taken for a reference.
        source = work / "source"
        source.symlink_to(archive.resolve())
        layout = work / "layout"
        _tool(
            [
                "skopeo",
                "--insecure-policy",  # a local archive the user gave us: there is no signature policy to apply
                "--tmpdir",
                str(work),
                "copy",
                "--quiet",
                f"{kind}:{source}",
                f"oci:{layout}:{TAG}",
            ],
            archive,
            kind,
            "cannot read the image",
            work,
        )
        config = _read_config(layout, archive, kind)
        rootless = [] if os.geteuid() == 0 else ["--rootless"]
        _tool(
            ["umoci", "raw", "unpack", *rootless, "--image", f"{layout}:{TAG}", str(out_tree)],
            archive,
            kind,
            "cannot unpack its layers",
            work,
        )
        return config
    except BaseException:
        shutil.rmtree(out_tree, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def make_base_rootfs(tree: Path, out_image: Path, size_mib: int | None = None, runtime: Path | None = None) -> int:
    """Adds the agent with its runtime (`runtime`: a build_agent_runtime() directory, default this host's), the
    mount points and guest files to `tree`, then makes the ext4 image `out_image`. `size_mib` defaults to the
    tree's size plus a tenth (ext4's own blocks) plus HEADROOM_MIB, at least MIN_ROOTFS_MIB. Returns it in MiB."""
    try:
        finish_tree(tree, runtime)
    except UnsafeTree as exc:
        raise DefinitionError(INVALID_BASE, f"the image cannot take the agent: {exc}") from None
    size_mib = size_mib or max(MIN_ROOTFS_MIB, tree_size_mib(tree) * 11 // 10 + HEADROOM_MIB)
    make_ext4(tree, out_image, size_mib)
    return size_mib


def archive_digest(archive: Path) -> str:
    """sha256 of an archive file, or of an OCI layout directory's file names and contents (symlinks by target)."""
    digest = hashlib.sha256()
    files = [archive]
    if not archive.is_file():
        files = sorted(p for p in archive.rglob("*") if not p.is_dir() or p.is_symlink())
    for file in files:
        if file != archive:
            digest.update(b"\0" + str(file.relative_to(archive)).encode() + b"\0")
        if file.is_symlink():
            digest.update(os.readlink(file).encode())
            continue
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def publish_archive_image(
    archive: Path, kind: str, name: str, image_root: Path, kernel_from: BuiltImage, size_mib: int | None = None
) -> BuiltImage:
    """Builds image `name` from `archive` under `image_root` (as `image_root/NAME/KEY`, `current` naming it: the
    layout BuiltImage.load(name, image_root) and compute read) with the kernel and initramfs of `kernel_from`.
    Cached by the archive's content, the agent runtime and `kernel_from`'s build: publishing the same archive
    again returns the existing build. The image config's env, workdir and user go into the manifest's `config`."""
    archive = Path(archive)
    _check_kind(archive, kind)
    if "agent_runtime" not in kernel_from.manifest:
        raise ValueError(f"{kernel_from.directory} predates the agent runtime: its initramfs needs the image's python3")
    runtime = build_agent_runtime()
    digest = archive_digest(archive)
    sources = (Path(__file__), Path(__file__).with_name("rootfs.py"))
    key = content_hash(OCI_VERSION, *sources, kind, digest, runtime.name, kernel_from.directory.name, size_mib)
    directory = image_root / name / key

    def build(work: Path) -> None:
        for source in (kernel_from.kernel, kernel_from.bzimage, kernel_from.initramfs):
            try:
                os.link(source, work / source.name)  # one kernel and initramfs serve all templates
            except OSError:
                shutil.copy(source, work / source.name)
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            tree = Path(tmp) / "tree"
            config = unpack_archive(archive, kind, tree)
            size = make_base_rootfs(tree, work / "rootfs.ext4", size_mib, runtime)
        manifest = {
            "template": name,
            "key": key,
            "kernel_version": kernel_from.manifest.get("kernel_version", ""),
            "kernel_from": str(kernel_from.directory),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "base": {"kind": kind, "archive": archive.name, "digest": digest, "manifest": config.manifest_digest},
            "agent_runtime": runtime.name,
            "rootfs_size_mib": size,
            "config": config.image_config(),
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1))

    stage(directory, build)
    write_pointer(image_root / name / "current", key + "\n")
    prune_old_builds(image_root / name, keep={key})
    return BuiltImage.load(name, image_root)
