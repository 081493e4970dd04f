"""A materialized snapshot's files and the snapshot store: their hashes, and each file sent (its holes as lengths)
or fetched (runs of zeros left as holes) as an artifact. Also what the host offers for loading RAM files."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from pathlib import Path

from microvm.snapshot.v1 import snapshot_pb2
from services.common import deadlines
from services.common.client_streams import send_until_refused
from services.common.errors import DataLoss

# Artifact name in the snapshot store -> file in a materialized snapshot.
ARTIFACT_FILES = {
    "memory": "memory.bin",
    "devices": "devices.bin",
    "ram": "ram",
    "disk": "disk.qcow2",
    "disk-tree": "disk.tar",
    "vmm-state": "vmm-state.tar",
    "config": "config.json",
    # An image build offered with the snapshots taken over it (build_exchange.py BUILD_FILES).
    "rootfs": "rootfs.ext4",
    "kernel": "vmlinux",
    "bzimage": "bzImage",
    "initramfs": "initramfs.cpio.gz",
    "manifest": "manifest.json",
}
UPLOAD_CHUNK = 1 << 20


def hash_files(directory: Path, files: dict[str, str]) -> dict[str, dict]:
    result = {}
    for name, filename in files.items():
        if not (directory / filename).exists():
            continue
        digest = hashlib.sha256()
        with open(directory / filename, "rb") as f:
            while block := f.read(UPLOAD_CHUNK * 4):
                digest.update(block)
        result[name] = {"sha256": digest.hexdigest(), "size": (directory / filename).stat().st_size}
    return result


def extents(fd: int, size: int) -> list[tuple[int, int, bool]]:
    """The file as (offset, length, has_data) runs: its holes (SEEK_HOLE) are zeros nobody needs to read or send.
    A filesystem that cannot tell says the whole file is data."""
    runs, offset = [], 0
    try:
        while offset < size:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: only a hole is left
                    raise
                data = size
            if data > offset:
                runs.append((offset, data - offset, False))
            if data >= size:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            runs.append((data, hole - data, True))
            offset = hole
    except OSError:
        return [(0, size, True)] if size else []
    return runs


async def upload(store, snapshot_id: str, name: str, path: Path) -> int:
    """The file as an artifact; holes go as their lengths. Raises DataLoss when the store kept another size (a
    store that does not know zero runs would drop them)."""
    size = path.stat().st_size

    async def requests():
        yield snapshot_pb2.PutArtifactRequest(header=snapshot_pb2.PutArtifactHeader(snapshot_id=snapshot_id, name=name))
        with open(path, "rb") as f:
            for offset, length, has_data in extents(f.fileno(), size):
                if not has_data:
                    yield snapshot_pb2.PutArtifactRequest(zero_bytes=length)
                    continue
                f.seek(offset)
                while length > 0:
                    data = await asyncio.to_thread(f.read, min(UPLOAD_CHUNK, length))
                    if not data:
                        break
                    length -= len(data)
                    yield snapshot_pb2.PutArtifactRequest(data=data)

    # A refusal (mvm-refused) stops the upload at once instead of after the whole file (client_streams.py).
    reply = await send_until_refused(lambda r: store.PutArtifact(r, timeout=deadlines.TRANSFER), requests())
    if reply.artifact.size_bytes != size:
        raise DataLoss(
            f"the snapshot store kept {reply.artifact.size_bytes} bytes of artifact {name} of {snapshot_id}, "
            f"not its {size}",
            reason="ARTIFACT_SIZE_MISMATCH",
        )
    return reply.artifact.size_bytes


def on_tmpfs(path: Path) -> bool:
    """Whether `path` (or the nearest directory above it that exists) is on a tmpfs mount."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    best, fstype = "", ""
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            mount_point, kind = fields[4], fields[fields.index("-") + 1]
            if (str(path) + "/").startswith(mount_point.rstrip("/") + "/") and len(mount_point) >= len(best):
                best, fstype = mount_point, kind
    except (OSError, ValueError, IndexError):
        return False
    return fstype == "tmpfs"


def available_memory_kib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


async def download(store, snapshot_id: str, name: str, path: Path) -> None:
    """The artifact into `path`; runs of zeros (most of a fresh guest's RAM) stay holes in a sparse file."""
    with open(path, "wb") as f:
        request = snapshot_pb2.GetArtifactRequest(snapshot_id=snapshot_id, name=name)
        async for chunk in store.GetArtifact(request, timeout=deadlines.TRANSFER):
            if chunk.data.count(0) == len(chunk.data):
                f.seek(len(chunk.data), 1)
            else:
                await asyncio.to_thread(f.write, chunk.data)
        f.truncate()
