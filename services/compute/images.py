"""NodeImages: the images this node can boot. Built-in ones come from the image cache (`make images`, shared by
every installation on the host); user templates' builds are published into the installation's state directory
as `u-<build id>` (they are tenants' data, not a cache). Both have the same layout (BuiltImage), so everything
that boots, snapshots or pools an image treats them alike.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from google.protobuf import json_format

from images.builder import BuiltImage, available_templates
from microvm.types.v1 import template_pb2
from services.common.errors import NotFound

USER_PREFIX = "u-"


def is_user_image(name: str) -> bool:
    return name.startswith(USER_PREFIX)


class NodeImages:
    def __init__(self, builtin_root: Path, user_root: Path) -> None:
        self.builtin_root, self.user_root = builtin_root, user_root

    def names(self) -> list[str]:
        return sorted(set(available_templates(self.builtin_root)) | set(available_templates(self.user_root)))

    def root_of(self, name: str) -> Path:
        return self.user_root if is_user_image(name) else self.builtin_root

    def load(self, name: str) -> BuiltImage:
        return BuiltImage.load(name, self.root_of(name))

    def require(self, name: str, node: str) -> BuiltImage:
        try:
            return self.load(name)
        except FileNotFoundError:
            raise NotFound(f"image {name!r} is not on node {node}", reason="IMAGE_NOT_FOUND") from None

    def config(self, name: str) -> template_pb2.ImageConfig:
        """What a user image carries besides its files (empty for a built-in one)."""
        config = template_pb2.ImageConfig(pool_size=-1)
        try:
            stored = self.load(name).manifest.get("config")
        except FileNotFoundError:
            return config
        if stored:
            json_format.ParseDict(stored, config)
        try:  # the template's pool size as changed since its build (UpdateTemplate)
            config.pool_size = int((self.user_root / name / "pool_size").read_text())
        except (OSError, ValueError):
            pass
        return config

    def set_pool_size(self, name: str, pool_size: int) -> None:
        """Overrides the pool size the image was built with (negative: back to it)."""
        self.require(name, "this node")
        path = self.user_root / name / "pool_size"
        if pool_size < 0:
            path.unlink(missing_ok=True)
        else:
            path.write_text(str(pool_size))

    def stage(self, name: str, base: BuiltImage, config: template_pb2.ImageConfig) -> Path:
        """A work directory for image `name`: `base`'s kernel and initramfs and a manifest with `config`. The
        caller writes its `rootfs.ext4`, then `complete` makes it visible."""
        work = self.user_root / name / ".build.partial"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        for source in (base.kernel, base.bzimage, base.initramfs):
            if source.exists():
                try:
                    os.link(source, work / source.name)  # one kernel and initramfs serve all templates
                except OSError:
                    shutil.copy(source, work / source.name)
        manifest = {
            "template": name,
            "key": name,
            "base": base.name,
            "rootfs_size_mib": int(base.manifest.get("rootfs_size_mib", 0)),
            "config": json_format.MessageToDict(config),
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
        return work

    def complete(self, name: str, work: Path) -> BuiltImage:
        directory = work.with_name("build")
        (work / ".complete").touch()
        shutil.rmtree(directory, ignore_errors=True)
        work.rename(directory)
        (directory.parent / "current").write_text(directory.name + "\n")
        return BuiltImage.at(directory)

    def delete(self, name: str) -> None:
        if not is_user_image(name):
            raise NotFound(f"image {name!r} is built in: it cannot be deleted", reason="IMAGE_NOT_FOUND")
        (self.user_root / name / "current").unlink(missing_ok=True)
        shutil.rmtree(self.user_root / name, ignore_errors=True)
