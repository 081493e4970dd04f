"""Image archives as template bases (images/oci.py): each kind unpacks to the same tree with its whiteouts applied,
a bad archive is INVALID_BASE with a message naming it, and an unpacked tree becomes an ext4 root filesystem with
the agent's runtime without writing outside the tree. No guest: tests/integration/test_archive_base_guest.py
boots one."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from images.builder import BuiltImage
from images.definition.errors import INVALID_BASE, DefinitionError
from images.oci import make_base_rootfs, publish_archive_image, unpack_archive
from images.runtime import RUNTIME_DIR
from tests import musl_base

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    assert not musl_base.missing_tools(), f"missing {musl_base.missing_tools()}: run `make deps`"
    root = tmp_path_factory.mktemp("archives")
    layout = musl_base.oci_layout(root / "layout")
    return {
        "oci": layout,
        "oci-archive": musl_base.oci_archive(layout, root / "musl.oci.tar"),
        "docker-archive": musl_base.docker_archive(layout, root / "musl.docker.tar"),
    }


@pytest.mark.parametrize("kind", ["oci", "oci-archive", "docker-archive"])
def test_each_archive_kind_unpacks_to_the_musl_root_and_its_config(archives, kind, tmp_path):
    tree = tmp_path / "tree"
    config = unpack_archive(archives[kind], kind, tree)
    assert (tree / "bin" / "busybox").is_file() and (tree / "bin" / "sh").readlink() == Path("/bin/busybox")
    assert (tree / musl_base.MUSL_LOADER).read_bytes() == musl_base.MUSL_LIBC.read_bytes()
    assert "ID=alpine" in (tree / "etc" / "os-release").read_text()
    assert not list(tree.glob("usr/bin/python*"))
    assert config.env == tuple(tuple(item.split("=", 1)) for item in musl_base.ENV)
    assert (config.workdir, config.user) == ("/srv", "")
    assert config.image_config() == {"env": dict(config.env), "workdir": "/srv"}
    assert not list(tmp_path.glob(".unpack.*"))  # its scratch space is gone


def test_whiteouts_remove_files_and_opaque_directories_hide_lower_layers(archives, tmp_path):
    tree = tmp_path / "tree"
    unpack_archive(archives["oci-archive"], "oci-archive", tree)
    assert not (tree / "etc" / "doomed.conf").exists()
    assert sorted(p.name for p in (tree / "var" / "cache" / "old").iterdir()) == ["fresh"]
    assert (tree / "srv" / "keep.txt").read_text() == "kept\n"
    assert not [p for p in tree.rglob(".wh.*")]


def corrupt_layout(archives, tmp_path) -> Path:
    layout = tmp_path / "corrupt"
    shutil.copytree(archives["oci"], layout)
    largest = max((layout / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    largest.chmod(0o644)
    largest.write_bytes(bytes(data))
    return layout


def truncated(archives, tmp_path) -> Path:
    path = tmp_path / "truncated.tar"
    path.write_bytes(archives["oci-archive"].read_bytes()[: archives["oci-archive"].stat().st_size // 2])
    return path


def junk(archives, tmp_path) -> Path:
    path = tmp_path / "junk.tar"
    path.write_bytes(bytes(range(256)) * 400)
    return path


@pytest.mark.parametrize(
    "make, kind, says",
    [
        (junk, "oci-archive", "invalid tar header"),
        (truncated, "oci-archive", "cannot read the image"),
        (lambda a, t: a["docker-archive"], "oci-archive", "index.json"),  # a docker save tarball named oci-archive
        (lambda a, t: a["oci-archive"], "docker-archive", "manifest.json"),
        (lambda a, t: a["oci-archive"], "oci", "not an OCI layout directory"),
        (lambda a, t: t, "oci", "not an OCI layout directory"),
        (lambda a, t: a["oci"], "docker-archive", "not an archive file"),
        (corrupt_layout, "oci", "did not match"),
        (lambda a, t: a["oci"], "zip", "unknown archive kind"),
    ],
)
def test_a_bad_archive_is_an_invalid_base_naming_it(archives, tmp_path, make, kind, says):
    archive = make(archives, tmp_path)
    with pytest.raises(DefinitionError) as raised:
        unpack_archive(archive, kind, tmp_path / "out" / "tree")
    assert raised.value.reason == INVALID_BASE
    assert says in str(raised.value)
    assert kind == "zip" or f"{kind}:{archive.name}" in str(raised.value)
    assert str(tmp_path / "out") not in str(raised.value)  # no scratch paths of ours in what the user reads
    assert not (tmp_path / "out" / "tree").exists() and not list((tmp_path / "out").glob(".unpack.*"))


def test_an_image_for_another_architecture_is_refused(archives, tmp_path):
    layout = tmp_path / "arm"
    shutil.copytree(archives["oci"], layout)
    subprocess.run(["umoci", "config", "--image", f"{layout}:latest", "--architecture", "arm64"], check=True)
    with pytest.raises(DefinitionError, match="linux/arm64; sandboxes run linux/amd64"):
        unpack_archive(layout, "oci", tmp_path / "tree")


def debugfs(image: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True).stdout


def test_base_rootfs_gets_the_agent_runtime_and_guest_files(archives, tmp_path):
    tree = tmp_path / "tree"
    unpack_archive(archives["oci"], "oci", tree)
    (tree / "etc" / "hostname").symlink_to("/etc/hostname")  # an image's symlink is replaced, never followed
    size = make_base_rootfs(tree, tmp_path / "rootfs.ext4")
    assert size >= 1024
    image = tmp_path / "rootfs.ext4"
    assert "Type: regular" in debugfs(image, f"stat /{RUNTIME_DIR}/bin/python3")
    assert "Type: regular" in debugfs(image, f"stat /{RUNTIME_DIR}/lib/ld-linux-x86-64.so.2")
    assert debugfs(image, "cat /etc/hostname") == "sandbox\n"
    assert "Type: regular" in debugfs(image, "stat /etc/resolv.conf")
    for directory in ("/proc", "/sys", "/dev", "/run", "/tmp", "/root", "/opt/microvm/microvm_agent"):
        assert "Type: directory" in debugfs(image, f"stat {directory}"), directory
    assert "/bin/busybox" in debugfs(image, "stat /bin/sh")  # the image itself is as its layers left it


def test_a_tree_whose_opt_is_a_symlink_is_refused_without_writing_outside(archives, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    tree = tmp_path / "tree"
    unpack_archive(archives["oci"], "oci", tree)
    (tree / "opt").symlink_to(outside)
    with pytest.raises(DefinitionError, match="/opt in the image is not a directory") as raised:
        make_base_rootfs(tree, tmp_path / "rootfs.ext4")
    assert raised.value.reason == INVALID_BASE
    assert list(outside.iterdir()) == []


def fake_kernel_image(root: Path, runtime_aware: bool = True) -> BuiltImage:
    directory = root / "default" / "k1"
    directory.mkdir(parents=True)
    for name in ("vmlinux", "bzImage", "initramfs.cpio.gz"):
        (directory / name).write_bytes(name.encode())
    manifest = {"template": "default", "key": "k1", "kernel_version": "6.1-test"}
    (directory / "manifest.json").write_text(json.dumps(manifest | ({"agent_runtime": "r"} if runtime_aware else {})))
    (directory / ".complete").touch()
    return BuiltImage.at(directory)


def test_published_archive_image_is_a_built_image_with_the_default_kernel(archives, tmp_path):
    kernel_from = fake_kernel_image(tmp_path / "builtin")
    image = publish_archive_image(
        archives["docker-archive"], "docker-archive", "u-musl", tmp_path / "user", kernel_from
    )
    assert image == BuiltImage.load("u-musl", tmp_path / "user")
    assert (
        image.kernel.read_bytes() == b"vmlinux" and image.initramfs.stat().st_ino == kernel_from.initramfs.stat().st_ino
    )
    assert "Type: regular" in debugfs(image.rootfs, "stat /opt/microvm/agent.py")
    manifest = image.manifest
    assert manifest["config"] == {"env": dict(item.split("=", 1) for item in musl_base.ENV), "workdir": "/srv"}
    assert manifest["base"]["kind"] == "docker-archive" and manifest["base"]["digest"].startswith("sha256:")
    assert manifest["kernel_version"] == "6.1-test" and manifest["rootfs_size_mib"] >= 1024
    # The same archive again is the same build, not a new one.
    mtime = image.rootfs.stat().st_mtime_ns
    again = publish_archive_image(
        archives["docker-archive"], "docker-archive", "u-musl", tmp_path / "user", kernel_from
    )
    assert again.directory == image.directory and again.rootfs.stat().st_mtime_ns == mtime


def test_publishing_needs_a_kernel_image_whose_initramfs_knows_the_runtime(archives, tmp_path):
    old = fake_kernel_image(tmp_path / "builtin", runtime_aware=False)
    with pytest.raises(ValueError, match="predates the agent runtime"):
        publish_archive_image(archives["oci"], "oci", "u-musl", tmp_path / "user", old)
