"""Builds guest images from recipes in images/templates/*.yaml.

For a template it makes, from Debian packages and without installing anything into the host:
- the kernel: `linux-image-*-cloud-amd64` downloaded and unpacked; the bzImage plus the ELF vmlinux
  extracted from it (QEMU boots the ELF through PVH, 0.4-0.9 s faster; Cloud Hypervisor boots only the ELF);
- an initramfs: busybox-static, the recipe's modules with their dependencies in modules.dep order, and an
  /init that loads them, mounts /dev/vda and switch_roots into the agent;
- the root filesystem: debootstrap of the recipe, the agent with its own runtime added (images/runtime.py: the
  agent never uses the image's python), turned into ext4 by `mkfs.ext4 -d` (no loop mount; images/rootfs.py).

Each stage is cached under $MVM_CACHE_DIR/images keyed by the hash of exactly what it is built from, so an
unchanged recipe is never rebuilt, and a change to the agent rebuilds only the final image.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from images.cache import cache_root
from images.cache import content_hash as _hash
from images.cache import run as _run
from images.cache import stage as _stage
from images.cache import step as _step
from images.rootfs import filesystem_id, finish_tree, make_ext4
from images.runtime import build_agent_runtime

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "images" / "templates"
BUILDER_VERSION = "4"
LZ4_MAGIC = b"\x02\x21\x4c\x18"


@dataclass
class Recipe:
    name: str
    suite: str
    variant: str
    packages: list[str]
    kernel_package: str
    modules: list[str]
    rootfs_size_mib: int
    path: Path = field(default=Path(), repr=False)

    @classmethod
    def load(cls, path: Path) -> Recipe:
        data = yaml.safe_load(path.read_text())
        known = {"name", "suite", "variant", "packages", "kernel_package", "modules", "rootfs_size_mib"}
        unknown = set(data) - known
        if unknown:
            raise SystemExit(f"{path}: unknown keys {sorted(unknown)}")
        return cls(path=path, **data)


@dataclass
class BuiltImage:
    """Paths of a built template, as compute uses them."""

    name: str
    directory: Path
    kernel: Path  # ELF vmlinux (PVH entry point)
    bzimage: Path
    initramfs: Path
    rootfs: Path
    manifest: dict

    @classmethod
    def load(cls, name: str, root: Path | None = None) -> BuiltImage:
        root = root or cache_root()
        pointer = root / name / "current"
        if not pointer.exists():
            raise FileNotFoundError(f"template {name!r} is not built (run `make images`)")
        return cls.at(root / name / pointer.read_text().strip())

    @classmethod
    def at(cls, directory: Path) -> BuiltImage:
        """A specific build, e.g. the one a stopped VM's disk overlay was made on."""
        if not (directory / ".complete").exists():
            raise FileNotFoundError(f"image build {directory} no longer exists")
        manifest = json.loads((directory / "manifest.json").read_text())
        name = manifest["template"]
        return cls(
            name=name,
            directory=directory,
            kernel=directory / "vmlinux",
            bzimage=directory / "bzImage",
            initramfs=directory / "initramfs.cpio.gz",
            rootfs=directory / "rootfs.ext4",
            manifest=manifest,
        )

    @functools.cached_property
    def rootfs_id(self) -> str:
        """Which build of the root filesystem this is (images/rootfs.py `filesystem_id`): a snapshot records it, and
        is restored only over the same one."""
        return filesystem_id(self.rootfs)


def available_templates(root: Path | None = None) -> list[str]:
    root = root or cache_root()
    return sorted(p.parent.name for p in root.glob("*/current")) if root.exists() else []


def build_kernel(recipe: Recipe) -> Path:
    """Unpacks the Debian kernel package; returns a directory with bzImage, vmlinux and lib/modules."""
    if (
        "Candidate: (none)"
        in subprocess.run(["apt-cache", "policy", recipe.kernel_package], capture_output=True, text=True).stdout
        or not subprocess.run(
            ["apt-cache", "policy", recipe.kernel_package], capture_output=True, text=True
        ).stdout.strip()
    ):
        _step("kernel: package lists are empty; running apt-get update once")
        _run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL)
    depends = subprocess.run(
        ["apt-cache", "depends", recipe.kernel_package], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"Depends: (linux-image-\S+)", depends)
    package = match.group(1) if match else recipe.kernel_package
    version = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True, check=True).stdout
    match = re.search(r"Candidate: (\S+)", version)
    if not match or match.group(1) == "(none)":
        raise SystemExit(f"kernel: apt has no candidate for {package}")
    candidate = match.group(1)
    directory = cache_root() / "_kernel" / _hash(package, candidate, BUILDER_VERSION)

    def build(work: Path) -> None:
        _step(f"kernel: downloading {package} {candidate}")
        _run(["apt-get", "download", f"{package}={candidate}"], cwd=work, stdout=subprocess.DEVNULL)
        deb = next(work.glob("*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(work / "root")])
        deb.unlink()
        bzimage = next((work / "root" / "boot").glob("vmlinuz-*"))
        shutil.copy(bzimage, work / "bzImage")
        kernel_version = bzimage.name.removeprefix("vmlinuz-")
        (work / "version").write_text(kernel_version)
        _step("kernel: extracting the ELF vmlinux from the LZ4 bzImage")
        data = bzimage.read_bytes()
        offset = data.find(LZ4_MAGIC)
        if offset < 0:
            raise SystemExit("kernel: no LZ4 payload in the bzImage")
        with open(work / "vmlinux", "wb") as out:
            # lz4 stops at the end of the frame; trailing bytes of the bzImage make it exit 2 after
            # writing everything, so judge by the ELF it produced rather than the exit code.
            subprocess.run(["lz4", "-dc"], input=data[offset:], stdout=out, stderr=subprocess.DEVNULL)
        if (work / "vmlinux").read_bytes()[:4] != b"\x7fELF":
            raise SystemExit("kernel: the extracted vmlinux is not an ELF file")
        modules_root = work / "root" / "lib" / "modules" / kernel_version
        _run(["depmod", "-b", str(work / "root"), kernel_version])
        shutil.move(str(work / "root" / "lib"), str(work / "lib"))
        shutil.rmtree(work / "root")
        del modules_root

    return _stage(directory, build)


def module_load_order(modules_dir: Path, wanted: list[str]) -> list[Path]:
    """Module files for `wanted` with their dependencies, each after everything it depends on."""
    depends: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        module, _, deps = line.partition(":")
        depends[module] = deps.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in depends}
    order: list[str] = []

    def visit(module: str) -> None:
        if module in order:
            return
        # modules.dep lists the full closure, nearest dependency first: load from the far end.
        for dependency in reversed(depends[module]):
            visit(dependency)
        order.append(module)

    for name in wanted:
        if name not in by_name:
            raise SystemExit(f"module {name} is not in the kernel package (built in, or misspelt?)")
        visit(by_name[name])
    return [modules_dir / m for m in order]


INIT_SCRIPT = """#!/bin/busybox sh
# initramfs /init: load virtio modules in dependency order, mount the root disk, hand over to the agent.
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs devtmpfs /dev
for module in $(/bin/busybox cat /modules/order); do
  /bin/busybox insmod /modules/$module 2>/dev/null || echo "init: insmod $module failed"
done
for i in $(/bin/busybox seq 1 200); do [ -b /dev/vda ] && break; /bin/busybox usleep 10000; done
/bin/busybox mount -t ext4 -o rw,noatime /dev/vda /newroot || \
  { echo "init: cannot mount /dev/vda"; exec /bin/busybox sh; }
/bin/busybox umount /proc
/bin/busybox mount --move /dev /newroot/dev
# The agent's own runtime (images/runtime.py) through its own loader when the root filesystem has it: nothing in the
# environment, so nothing reaches the image's programs. Else the image's python3.
runtime=/opt/microvm/runtime
if [ -x /newroot$runtime/bin/python3 ]; then
  exec /bin/busybox switch_root /newroot $runtime/lib/ld-linux-x86-64.so.2 --library-path $runtime/lib \\
    $runtime/bin/python3 -I -S -X frozen_modules=on /opt/microvm/agent.py
fi
exec /bin/busybox switch_root /newroot /usr/bin/python3 -I -S -X frozen_modules=on /opt/microvm/agent.py
"""


def build_initramfs(recipe: Recipe, kernel_dir: Path, out: Path) -> None:
    version = (kernel_dir / "version").read_text().strip()
    modules_dir = kernel_dir / "lib" / "modules" / version
    order = module_load_order(modules_dir, recipe.modules)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bin").mkdir()
        (root / "modules").mkdir()
        shutil.copy("/bin/busybox", root / "bin" / "busybox")
        names = []
        for module in order:
            target = root / "modules" / module.name
            if module.suffix == ".xz":
                target = target.with_suffix("")
                _run(["xz", "-dc", str(module)], stdout=open(target, "wb"))
            else:
                shutil.copy(module, target)
            names.append(target.name)
        (root / "modules" / "order").write_text("\n".join(names) + "\n")
        (root / "init").write_text(INIT_SCRIPT)
        (root / "init").chmod(0o755)
        files = subprocess.run(["find", ".", "-print0"], cwd=root, capture_output=True, check=True).stdout
        archive = subprocess.run(
            ["cpio", "--null", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, capture_output=True, check=True
        ).stdout
        out.write_bytes(gzip.compress(archive, compresslevel=6))


def build_rootfs_tree(recipe: Recipe) -> Path:
    directory = cache_root() / "_rootfs" / _hash(recipe.suite, recipe.variant, recipe.packages, BUILDER_VERSION)

    def build(work: Path) -> None:
        tree = work / "tree"
        _step(
            f"rootfs: debootstrap {recipe.suite} ({recipe.variant}) + {', '.join(recipe.packages)}; takes a few minutes"
        )
        started = time.monotonic()
        process = subprocess.Popen(
            [
                "debootstrap",
                f"--variant={recipe.variant}",
                f"--include={','.join(recipe.packages)}",
                recipe.suite,
                str(tree),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in process.stdout:
            if line.startswith(
                (
                    "I: Retrieving",
                    "I: Extracting",
                    "I: Installing",
                    "I: Configuring",
                    "I: Base system",
                    "E:",
                    "W: Failure",
                )
            ):
                if line.startswith(("I: Retrieving", "I: Extracting", "I: Configuring")):
                    stage = line.split()[1]
                    print(
                        f"\r[images] rootfs: {stage} {line.split()[-1][:40]:40} {time.monotonic() - started:5.0f}s",
                        end="",
                        flush=True,
                    )
                else:
                    print(f"\n[images] {line.rstrip()}", flush=True)
        print(flush=True)
        if process.wait() != 0:
            log = tree / "debootstrap" / "debootstrap.log"
            raise SystemExit(f"debootstrap failed; see {log}")
        _step("rootfs: trimming docs, man pages, locales and apt lists")
        for junk in (
            "usr/share/doc",
            "usr/share/man",
            "usr/share/info",
            "usr/share/locale",
            "var/lib/apt/lists",
            "var/cache/apt",
            "var/cache/debconf",
            "var/log",
        ):
            shutil.rmtree(tree / junk, ignore_errors=True)
            (tree / junk).mkdir(parents=True, exist_ok=True)

    return _stage(directory, build)


def build_template(recipe: Recipe, force: bool = False) -> BuiltImage:
    kernel_dir = build_kernel(recipe)
    tree_dir = build_rootfs_tree(recipe)
    runtime_dir = build_agent_runtime()
    key = _hash(
        recipe.__dict__ | {"path": None},
        BUILDER_VERSION,
        Path(__file__),
        REPO / "images" / "rootfs.py",  # what finishes the tree and makes the ext4
        (kernel_dir / "version").read_text(),
        tree_dir.name,
        runtime_dir.name,
    )
    directory = cache_root() / recipe.name / key
    if force and directory.exists():
        shutil.rmtree(directory)

    def build(work: Path) -> None:
        _step(f"{recipe.name}: kernel and initramfs")
        shutil.copy(kernel_dir / "vmlinux", work / "vmlinux")
        shutil.copy(kernel_dir / "bzImage", work / "bzImage")
        build_initramfs(recipe, kernel_dir, work / "initramfs.cpio.gz")
        _step(f"{recipe.name}: root filesystem with the agent ({recipe.rootfs_size_mib} MiB ext4)")
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            tree = Path(tmp) / "tree"
            _run(["cp", "-a", "--reflink=auto", str(tree_dir / "tree"), str(tree)])
            quiet_login_shells(tree)
            finish_tree(tree, runtime_dir)
            make_ext4(tree, work / "rootfs.ext4", recipe.rootfs_size_mib)
        manifest = {
            "template": recipe.name,
            "key": key,
            "kernel_version": (kernel_dir / "version").read_text(),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "recipe": recipe.path.name,
            "agent_runtime": runtime_dir.name,
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1))

    started = time.monotonic()
    fresh = not (directory / ".complete").exists()
    _stage(directory, build)
    (cache_root() / recipe.name / "current").write_text(key + "\n")
    prune_old_builds(cache_root() / recipe.name, keep={key})
    _step(f"{recipe.name}: {'built' if fresh else 'cached'} {directory} ({time.monotonic() - started:.1f}s)")
    return BuiltImage.load(recipe.name)


def quiet_login_shells(tree: Path) -> None:
    """A login shell spawns no program of its own. Debian's stock files start two in every `bash -l`, which is how
    the E2B SDK runs each command (`/bin/bash -l -c CMD`): `$(id -u)` in /etc/profile and `mesg n` in root's
    ~/.profile. Under TCG each costs 30-100 ms. bash has $EUID (dash falls back to `id -u`), and `mesg` only matters
    on a terminal, which `[ -t 0 ]` tells without a process."""
    replacements = {
        tree / "etc" / "profile": ('"$(id -u)"', '"${EUID:-$(id -u)}"'),
        tree / "root" / ".profile": ("\nmesg n 2> /dev/null || true", "\n[ -t 0 ] && mesg n 2> /dev/null || true"),
    }
    for path, (old, new) in replacements.items():
        if path.is_file() and not path.is_symlink():
            path.write_text(path.read_text().replace(old, new))


def prune_old_builds(template_dir: Path, keep: set[str], keep_newest: int = 2) -> None:
    """Removes superseded builds of a template, keeping the newest few (running VMs may still use them)."""
    builds = sorted(
        (d for d in template_dir.iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: d.stat().st_mtime,
        reverse=True,
    )
    for old in builds[keep_newest:]:
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m images.builder")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build templates (cached by recipe hash)")
    build.add_argument("templates", nargs="*")
    build.add_argument("--all", action="store_true")
    build.add_argument("--force", action="store_true", help="rebuild the final image even if cached")
    args = parser.parse_args(argv)
    names = [p.stem for p in sorted(TEMPLATES.glob("*.yaml"))] if args.all or not args.templates else args.templates
    for name in names:
        build_template(Recipe.load(TEMPLATES / f"{name}.yaml"), force=args.force)


if __name__ == "__main__":
    main()
