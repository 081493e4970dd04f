"""What turns a directory tree into a root filesystem our guests boot: the agent with its own runtime, the few
files and mount points the agent needs, and an ext4 image made by `mkfs.ext4 -d` (no loop mount, no root needed
beyond owning the tree's files). The default image (images/builder.py) and image archives (images/oci.py) both go
through here, so every image starts its agent the same way."""

from __future__ import annotations

from pathlib import Path

from images.cache import run
from images.runtime import install_agent_runtime

# Mount points of the agent's setup_filesystems() and the initramfs (/dev is moved in before switch_root), and the
# directories a sandbox's processes expect.
DIRECTORIES = {"dev": 0o755, "proc": 0o555, "sys": 0o555, "run": 0o755, "tmp": 0o1777, "root": 0o700}
GUEST_FILES = {
    "etc/hostname": "sandbox\n",
    "etc/hosts": "127.0.0.1 localhost\n",
    # Empty until the sandbox has a network: the agent writes it then (its rename replaces whatever is here).
    "etc/resolv.conf": "",
}
# Only when the image has none (a `FROM scratch` image): root must exist for the agent's default user.
FILES_IF_MISSING = {"etc/passwd": "root:x:0:0:root:/root:/bin/sh\n", "etc/group": "root:x:0:\n"}


class UnsafeTree(ValueError):
    """The tree has a symlink (or a file) where we write a directory: following it could write outside the tree."""


def _real_directory(tree: Path, relative: str, mode: int) -> Path:
    """tree/relative as a directory we may write into: made when absent, refused when a symlink or a file."""
    path = tree / relative
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UnsafeTree(f"/{relative} in the image is not a directory (a symlink or a file)")
    if not path.exists():
        path.mkdir(mode=mode)
        path.chmod(mode)  # mkdir's mode is masked by the umask
    return path


def finish_tree(tree: Path, bundle: Path | None = None) -> None:
    """Adds the agent runtime (`bundle`, default: the cached build of this host's), mount points and guest files
    to `tree`. Never follows a symlink of the tree: a mount point that is one is left as it is (it resolves in the
    guest), a file we write replaces one, and a directory we write into (/etc, /opt) may not be one."""
    for relative, mode in DIRECTORIES.items():
        if not (tree / relative).is_symlink():
            _real_directory(tree, relative, mode)
    _real_directory(tree, "etc", 0o755)
    for relative, text in GUEST_FILES.items():
        path = tree / relative
        if path.is_dir() and not path.is_symlink():
            raise UnsafeTree(f"/{relative} in the image is a directory")
        path.unlink(missing_ok=True)
        path.write_text(text)
        path.chmod(0o644)
    for relative, text in FILES_IF_MISSING.items():
        path = tree / relative
        if not path.is_symlink() and not path.exists():
            path.write_text(text)
            path.chmod(0o644)
    try:
        install_agent_runtime(tree, bundle)
    except ValueError as exc:
        raise UnsafeTree(str(exc)) from None


def make_ext4(tree: Path, out: Path, size_mib: int) -> None:
    """An ext4 image of `tree` (owners, modes and xattrs as in the tree), labelled root, `size_mib` big (sparse)."""
    run(["mkfs.ext4", "-q", "-F", "-L", "root", "-E", "root_owner=0:0", "-d", str(tree), str(out), f"{size_mib}M"])


# ext4's superblock: 1024 bytes in, its magic at 0x38, the filesystem's UUID at 0x68.
SUPERBLOCK_OFFSET, EXT4_MAGIC = 1024, 0xEF53


def filesystem_id(image: Path) -> str:
    """The UUID of the ext4 filesystem in `image` (hex), "" when it holds none (not ext4, not a file).

    mkfs.ext4 makes a new UUID on every run, and ext4 seeds its metadata checksums from it. So it tells two builds
    of the same recipe apart: a guest frozen on one build and restored over another would fail every checksum of
    blocks it had cached. Copies of one build (another node's, converted to qcow2 and back) keep it."""
    try:
        with open(image, "rb") as f:
            f.seek(SUPERBLOCK_OFFSET)
            superblock = f.read(0x78)
    except (IsADirectoryError, FileNotFoundError):
        return ""
    if len(superblock) < 0x78 or int.from_bytes(superblock[0x38:0x3A], "little") != EXT4_MAGIC:
        return ""
    return superblock[0x68:0x78].hex()


def tree_size_mib(tree: Path) -> int:
    """Disk usage of `tree` in MiB, rounded up (du: blocks allocated, hard links once)."""
    output = run(["du", "-s", "-B1M", str(tree)], capture_output=True, text=True).stdout
    return int(output.split()[0])
