"""Disks shared by every VMM driver: per-VM qcow2 overlays, disks frozen for snapshots, and the fake VMM's disk
trees as tar archives."""

from __future__ import annotations

import asyncio
import tarfile
from pathlib import Path

from services.common.errors import FailedPrecondition, ResourceExhausted


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


async def freeze(disk: Path, base_image: Path, target: Path) -> None:
    """Copies a (stopped) VM's overlay rebased onto the template image, so the copy stands alone."""
    code, error = await _qemu_img(
        "convert", "-U", "-O", "qcow2", "-B", str(base_image), "-F", "raw", str(disk), str(target)
    )
    if code != 0:
        raise FailedPrecondition(f"cannot freeze the disk: {error}", reason="DISK_SNAPSHOT_FAILED")
