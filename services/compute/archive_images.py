"""ArchiveImages: a template's `FROM` image archive (docker save tarball, OCI archive or layout) made into an image
this node boots: unpacked with skopeo/umoci, the agent's own runtime added (any base works: musl, no Python), the
default image's kernel and initramfs (images/oci.py). Cached by the archive's content."""

from __future__ import annotations

import asyncio
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

from google.protobuf import json_format

from images.definition import DefinitionError
from images.oci import publish_archive_image
from microvm.types.v1 import template_pb2
from services.common.client_streams import lead_message
from services.common.errors import InvalidArgument
from services.compute.images import is_user_image
from services.compute.lifecycle import VmLifecycle

KINDS = ("oci-archive", "docker-archive", "oci")
NAME = re.compile(r"^u-oci-[0-9a-f]{16,64}$")


class ArchiveImages:
    def __init__(self, lifecycle: VmLifecycle) -> None:
        self.lifecycle = lifecycle

    async def receive(self, requests, max_bytes: int = 16 << 30) -> tuple[str, str, int, Path]:
        """(image, kind, size_mib, archive file) from an ImportImage stream; the caller removes the file's
        directory."""
        header, iterator = await lead_message(requests, "header", "ImportImage", "HEADER_MISSING")
        if header.kind not in KINDS or not NAME.match(header.image) or not is_user_image(header.image):
            raise InvalidArgument(
                f"cannot import {header.kind!r} as {header.image!r}: kind is one of {', '.join(KINDS)}, image "
                "u-oci-<hex digest>",
                reason="INVALID_IMPORT",
            )
        work = Path(tempfile.mkdtemp(prefix=".import.", dir=self.lifecycle.root.parent))
        archive, received = work / "archive", 0
        with open(archive, "wb") as out:
            async for message in iterator:
                received += len(message.data)
                if received > max_bytes:
                    shutil.rmtree(work, ignore_errors=True)
                    raise InvalidArgument(f"the archive is larger than {max_bytes} bytes", reason="ARCHIVE_TOO_LARGE")
                out.write(message.data)
        return header.image, header.kind, header.size_mib, archive

    def publish(self, image: str, kind: str, size_mib: int, archive: Path) -> tuple[template_pb2.ImageConfig, int]:
        """Blocking: unpack, add the runtime, make the ext4, publish under the node's user images."""
        source = archive
        if kind == "oci":  # a layout directory travels as a tar stream
            source = archive.with_name("layout")
            with tarfile.open(archive) as tar:
                tar.extractall(source, filter="data")
        default = self.lifecycle.images.load("default")
        try:
            built = publish_archive_image(
                source, kind, image, self.lifecycle.images.user_root, default, size_mib or None
            )
        except DefinitionError as exc:
            raise InvalidArgument(str(exc), reason=exc.reason) from None
        config = template_pb2.ImageConfig(pool_size=-1)
        json_format.ParseDict(built.manifest.get("config") or {}, config)
        return config, built.rootfs.stat().st_size

    async def import_image(self, requests) -> tuple[template_pb2.ImageConfig, int]:
        image, kind, size_mib, archive = await self.receive(requests)
        try:
            return await asyncio.to_thread(self.publish, image, kind, size_mib, archive)
        finally:
            shutil.rmtree(archive.parent, ignore_errors=True)
