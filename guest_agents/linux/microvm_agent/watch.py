"""watch_start: a directory's changes as WatchEvents frames, from inotify (through ctypes; no dependency).

Recursive watches add every directory below the target, and each directory created (or moved in) while the watch
runs, reporting what such a directory already holds as CREATE. Changes wait in a bounded queue for the credit the
host grants; beyond MAX_PENDING they are dropped and the next frame says `overflow` (as does the kernel's own queue
overflowing). A rename within the tree is one RENAME (inotify's cookie pairs the halves of a move read together);
a move out of the tree is REMOVE, a move in CREATE. The stream ends when the host cancels it, or with `ended` once
the watched directory itself is removed or moved.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import struct
from collections import deque
from typing import TYPE_CHECKING

from microvm.agent.v1 import agent_pb2
from microvm_agent import files
from microvm_agent.streams import FAILED_PRECONDITION, Credit, StreamError, os_error

if TYPE_CHECKING:
    from microvm_agent.agent import Agent

IN_MODIFY, IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x4, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ONLYDIR, IN_DONT_FOLLOW = 0x4000, 0x8000, 0x1000000, 0x2000000
IN_EXCL_UNLINK, IN_ISDIR = 0x4000000, 0x40000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
WATCH_MASK = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
EVENT = struct.Struct("iIII")
MAX_PENDING = 4096
MAX_BATCH = 256
# WriteFile's temporary name (files.py: `.NAME.mvm-XXXXXXXX`, renamed over NAME when complete): a watcher sees the
# file NAME created and written, never the temporary.
TEMPORARY = re.compile(r"^\..+\.mvm-[0-9a-f]{8}$")
Type = agent_pb2.WatchEventType

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, path: str) -> int:
    if result < 0:
        number = ctypes.get_errno()
        raise os_error(OSError(number, os.strerror(number)), path)
    return result


def guest_path(path: str) -> str:
    return (path[len(files.PATH_ROOT) :] or "/") if files.PATH_ROOT else path


class DirectoryWatch:
    def __init__(self, agent: Agent, stream_id: int) -> None:
        self.agent, self.stream_id = agent, stream_id
        self.credit = Credit(agent.initial_window)
        self.pending: deque[agent_pb2.WatchEvent] = deque()
        self.overflow = False
        self.ended = False
        self.wake = asyncio.Event()
        self.paths: dict[int, str] = {}  # watch descriptor -> host path of the directory
        self.fd = -1
        self.root_wd = -1
        self.recursive = False

    def handle(self, frame: agent_pb2.Frame) -> None:
        if frame.WhichOneof("body") == "window_update":
            self.credit.grant(frame.window_update.increment)

    async def run(self, start: agent_pb2.WatchStart) -> None:
        root = files.require_absolute(start.path)
        self.recursive = start.recursive
        if not os.path.isdir(root) or os.path.islink(root):
            if not os.path.lexists(root):
                raise os_error(FileNotFoundError(2, "No such file or directory"), start.path)
            raise StreamError(FAILED_PRECONDITION, f"{start.path} is not a directory")
        self.fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), start.path)
        loop = asyncio.get_running_loop()
        try:
            self.root_wd = self.add(root, report=False)
            self.agent.send(self.stream_id, watch_events=agent_pb2.WatchEvents(started_directories=len(self.paths)))
            loop.add_reader(self.fd, self.read_events)
            await self.send_events()
        finally:
            loop.remove_reader(self.fd)
            os.close(self.fd)

    def add(self, directory: str, report: bool) -> int:
        """Watches `directory` (and, recursive, the directories below it); `report`: its entries are CREATE."""
        wd = _check(
            _libc.inotify_add_watch(
                self.fd, os.fsencode(directory), WATCH_MASK | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK
            ),
            guest_path(directory),
        )
        self.paths[wd] = directory
        if self.recursive or report:
            try:
                entries = list(os.scandir(directory))
            except OSError:
                return wd  # gone again already: its parent reports that
            for entry in entries:
                if TEMPORARY.match(entry.name):
                    continue
                is_dir = entry.is_dir(follow_symlinks=False)
                if report:
                    self.queue(Type.WATCH_EVENT_TYPE_CREATE, entry.path, is_dir)
                if is_dir and self.recursive:
                    try:
                        self.add(entry.path, report)
                    except StreamError:
                        continue
        return wd

    def queue(self, kind: int, path: str, directory: bool, previous: str = "") -> None:
        if len(self.pending) >= MAX_PENDING:
            self.overflow = True
            return
        self.pending.append(
            agent_pb2.WatchEvent(
                type=kind,
                path=guest_path(path),
                previous_path=guest_path(previous) if previous else "",
                directory=directory,
            )
        )
        self.wake.set()

    def read_events(self) -> None:
        moved: dict[int, tuple[str, bool]] = {}
        while True:
            try:
                data = os.read(self.fd, 64 << 10)
            except BlockingIOError:
                break
            offset = 0
            while offset + EVENT.size <= len(data):
                wd, mask, cookie, length = EVENT.unpack_from(data, offset)
                name = data[offset + EVENT.size : offset + EVENT.size + length].rstrip(b"\0")
                offset += EVENT.size + length
                self.event(wd, mask, cookie, os.fsdecode(name), moved)
        for path, directory in moved.values():  # moved out of the tree
            if TEMPORARY.match(os.path.basename(path)):
                continue
            self.forget(path)
            self.queue(Type.WATCH_EVENT_TYPE_REMOVE, path, directory)
        self.wake.set()

    def event(self, wd: int, mask: int, cookie: int, name: str, moved: dict[int, tuple[str, bool]]) -> None:
        if mask & IN_Q_OVERFLOW:
            self.overflow = True
            return
        base = self.paths.get(wd)
        if base is None:
            return
        if mask & IN_IGNORED:
            self.paths.pop(wd, None)
            if wd == self.root_wd:
                self.ended = True
            return
        if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
            if wd == self.root_wd:
                self.queue(Type.WATCH_EVENT_TYPE_REMOVE, base, True)
                self.ended = True
            return  # a directory below: its parent reports it
        path = os.path.join(base, name) if name else base
        directory = bool(mask & IN_ISDIR)
        if name and TEMPORARY.match(name) and not mask & IN_MOVED_FROM:
            return
        if mask & IN_CREATE:
            self.queue(Type.WATCH_EVENT_TYPE_CREATE, path, directory)
            if directory and self.recursive:
                self._watch_new(path)
        elif mask & IN_MOVED_FROM:
            moved[cookie] = (path, directory)
        elif mask & IN_MOVED_TO:
            if cookie in moved:
                previous, _ = moved.pop(cookie)
                if TEMPORARY.match(os.path.basename(previous)):  # a WriteFile completed: NAME replaced
                    self.queue(Type.WATCH_EVENT_TYPE_CREATE, path, directory)
                    self.queue(Type.WATCH_EVENT_TYPE_WRITE, path, directory)
                    return
                self.queue(Type.WATCH_EVENT_TYPE_RENAME, path, directory, previous)
                if directory:
                    self.renamed(previous, path)
            else:
                self.queue(Type.WATCH_EVENT_TYPE_CREATE, path, directory)
                if directory and self.recursive:
                    self._watch_new(path)
        elif mask & IN_DELETE:
            self.queue(Type.WATCH_EVENT_TYPE_REMOVE, path, directory)
        elif mask & IN_MODIFY:
            self.queue(Type.WATCH_EVENT_TYPE_WRITE, path, directory)
        elif mask & IN_ATTRIB:
            self.queue(Type.WATCH_EVENT_TYPE_CHMOD, path, directory)

    def _watch_new(self, path: str) -> None:
        try:
            self.add(path, report=True)
        except StreamError:
            pass  # removed again, or out of watches: its events are what the caller gets

    def renamed(self, previous: str, path: str) -> None:
        for wd, watched in list(self.paths.items()):
            if watched == previous or watched.startswith(previous + "/"):
                self.paths[wd] = path + watched[len(previous) :]

    def forget(self, path: str) -> None:
        for wd, watched in list(self.paths.items()):
            if wd != self.root_wd and (watched == path or watched.startswith(path + "/")):
                _libc.inotify_rm_watch(self.fd, wd)
                self.paths.pop(wd, None)

    async def send_events(self) -> None:
        while True:
            while not self.pending and not self.overflow and not self.ended:
                self.wake.clear()
                await self.wake.wait()
            batch = agent_pb2.WatchEvents(overflow=self.overflow)
            self.overflow = False
            while self.pending and len(batch.events) < MAX_BATCH:
                batch.events.append(self.pending.popleft())
            batch.ended = self.ended and not self.pending
            needed = batch.ByteSize()
            while needed > 0:  # sent only within the credit the host grants, as file data
                needed -= await self.credit.take(needed)
            self.agent.send(self.stream_id, watch_events=batch)
            if batch.ended:
                return


FILE_STREAMS = {"watch_start": DirectoryWatch}
