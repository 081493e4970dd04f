"""The file API's plain data: entries, write results and watch events (shared by the async and sync files)."""

from __future__ import annotations

import enum
import posixpath
import stat
from dataclasses import dataclass
from datetime import UTC, datetime

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api

FILE_TYPES = {sandbox_pb2.FILE_TYPE_FILE: "file", sandbox_pb2.FILE_TYPE_DIRECTORY: "dir"}
FILE_TYPES[sandbox_pb2.FILE_TYPE_SYMLINK] = "symlink"


@dataclass
class EntryInfo:
    """One file, directory or link: `type` is "file", "dir", "symlink" or "other"."""

    name: str
    path: str
    type: str
    size: int
    mode: int
    uid: int
    gid: int
    modified_time: datetime
    symlink_target: str = ""

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @property
    def permissions(self) -> str:
        """`-rw-r--r--`-style."""
        kind = {"dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}.get(self.type, stat.S_IFREG)
        return stat.filemode(kind | self.mode)

    @classmethod
    def of(cls, info: sandbox_pb2.FileInfo) -> EntryInfo:
        return cls(
            name=posixpath.basename(info.path) or "/",
            path=info.path,
            type=FILE_TYPES.get(info.type, "other"),
            size=info.size,
            mode=info.mode,
            uid=info.uid,
            gid=info.gid,
            modified_time=info.modify_time.ToDatetime(UTC),
            symlink_target=info.symlink_target,
        )


@dataclass
class WriteInfo:
    """What `write_many` (or `upload` of a directory) wrote: the archive's entries, bytes and sha256."""

    entries: int
    bytes: int
    sha256: str


class FilesystemEventType(enum.Enum):
    CREATE = "create"
    WRITE = "write"
    REMOVE = "remove"
    RENAME = "rename"
    CHMOD = "chmod"


EVENT_TYPES = {
    api.FILE_EVENT_TYPE_CREATE: FilesystemEventType.CREATE,
    api.FILE_EVENT_TYPE_WRITE: FilesystemEventType.WRITE,
    api.FILE_EVENT_TYPE_REMOVE: FilesystemEventType.REMOVE,
    api.FILE_EVENT_TYPE_RENAME: FilesystemEventType.RENAME,
    api.FILE_EVENT_TYPE_CHMOD: FilesystemEventType.CHMOD,
}


@dataclass
class FilesystemEvent:
    """A change in a watched directory. `overflow` events (type None) say changes were dropped: list again."""

    type: FilesystemEventType | None
    path: str
    previous_path: str = ""
    is_dir: bool = False
    overflow: bool = False

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)
