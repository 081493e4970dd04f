"""Disks shared by every VMM driver: per-VM qcow2 overlays, disks frozen for snapshots, and the fake VMM's disk
trees as tar archives."""

from __future__ import annotations

import asyncio
import os
import struct
import tarfile
from pathlib import Path

from services.common.errors import FailedPrecondition, ResourceExhausted

QCOW2_MAGIC = 0x514649FB  # "QFI\xfb"
QCOW2_HEADER = struct.Struct(">IIQI")  # magic, version, backing file offset, backing file name size


async def _qemu_img(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "qemu-img", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await process.communicate()
    return process.returncode, stderr.decode().strip()


async def run_tool(*argv: str, reason: str) -> None:
    """Runs a disk tool (qemu-img, cp) to its end; RESOURCE_EXHAUSTED with `reason` and its last words if it fails
    (a full disk is what makes these fail)."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        raise ResourceExhausted(f"{argv[0]} failed: {stderr.decode().strip()[-500:]}", reason=reason)


def pack_tree(tree: Path, archive: Path) -> None:
    """A directory disk (the fake VMM's) as one tar."""
    with tarfile.open(archive, "w") as tar:
        tar.add(tree, arcname=".")


def unpack_tree(archive: Path, tree: Path) -> None:
    tree.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")


async def create_overlay(backing: Path, backing_format: str, path: Path, size_mib: int = 0) -> None:
    """A copy-on-write qcow2 overlay: instant, and only what the VM writes takes space. `size_mib` larger than the
    backing file's size makes a larger disk (the guest's file system is grown separately)."""
    size = [f"{size_mib}M"] if size_mib else []
    code, error = await _qemu_img(
        "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", backing_format, str(path), *size
    )
    if code != 0:
        raise ResourceExhausted(f"cannot create the VM disk: {error}", reason="DISK_CREATE_FAILED")


# The name a frozen disk gives its base image (its qcow2 backing file), relative to the disk's own directory: a
# symlink beside it, pointed on each node at that node's copy of the exact build (its own, or one fetched from the
# node that offered it). An absolute path would name whatever build of the same recipe sits there on another node.
BASE_LINK = "rootfs.base"


async def freeze(disk: Path, base_image: Path, target: Path, link_base: bool = False) -> None:
    """Copies a (stopped) VM's overlay rebased onto the template image, so the copy stands alone. With `link_base`
    the copy names its base through `BASE_LINK` (see there)."""
    base = str(base_image)
    if link_base:
        point_base_link(target.parent, base_image)
        base = BASE_LINK
    code, error = await _qemu_img("convert", "-U", "-O", "qcow2", "-B", base, "-F", "raw", str(disk), str(target))
    if code != 0:
        raise FailedPrecondition(f"cannot freeze the disk: {error}", reason="DISK_SNAPSHOT_FAILED")


def point_base_link(directory: Path, base_image: Path) -> None:
    """`directory`'s BASE_LINK names `base_image` (replaced at once: a restore opening it meanwhile sees either)."""
    link = directory / BASE_LINK
    if link.is_symlink() and Path(os.readlink(link)) == base_image:
        return
    staged = directory / f".{BASE_LINK}.new"
    staged.unlink(missing_ok=True)
    staged.symlink_to(base_image)
    staged.replace(link)


def backing_name(qcow2: Path) -> str | None:
    """The backing file name recorded in a qcow2 header ("" for none); None when `qcow2` is not a qcow2 file."""
    try:
        with open(qcow2, "rb") as f:
            header = f.read(QCOW2_HEADER.size)
            if len(header) < QCOW2_HEADER.size:
                return None
            magic, _, offset, size = QCOW2_HEADER.unpack(header)
            if magic != QCOW2_MAGIC:
                return None
            if not offset:
                return ""
            f.seek(offset)
            return f.read(size).decode(errors="replace")
    except OSError:
        return None
