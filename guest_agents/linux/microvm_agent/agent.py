"""The agent's protocol engine: one multiplexed channel, many concurrent exec and file streams.

Transport-agnostic: `Agent.serve(transport)` runs over anything that reads and writes bytes (the
virtio-serial port in a guest, a unix socket in tests). Output travels only within the credit the host
grants per stream (WindowUpdate), so a slow client applies back-pressure all the way to the process's
pipe instead of making either side buffer without bound.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import pty
import pwd
import shutil
import signal
import socket
import stat as stat_module
import struct
import subprocess
import termios
import uuid

from microvm.agent.v1 import agent_pb2
from microvm_agent import system
from microvm_agent.framing import MAX_FRAME_BYTES, FrameDecoder, FrameTooLarge, encode_parts

PROTOCOL_VERSION = 1
INITIAL_WINDOW = 1 << 20
OUTPUT_CHUNK = 1 << 20
FILE_CHUNK = 1 << 20
F_SETPIPE_SZ = 1031
PIPE_BYTES = 1 << 20
DEFAULT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# How long output may keep arriving after the process exited (a background child holding the pipe
# must not hold the exit event hostage).
DRAIN_AFTER_EXIT_SECONDS = 0.5

# google.rpc.Code numbers.
INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED = 3, 5, 6, 7
FAILED_PRECONDITION, INTERNAL, CANCELLED = 9, 13, 1


class StreamError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def os_error(exc: OSError, path: str) -> StreamError:
    code = {
        errno.ENOENT: NOT_FOUND,
        errno.EEXIST: ALREADY_EXISTS,
        errno.EACCES: PERMISSION_DENIED,
        errno.EPERM: PERMISSION_DENIED,
        errno.EISDIR: FAILED_PRECONDITION,
        errno.ENOTDIR: FAILED_PRECONDITION,
        errno.ENOTEMPTY: FAILED_PRECONDITION,
        errno.ENAMETOOLONG: INVALID_ARGUMENT,
        errno.ENOSPC: 8,
    }.get(exc.errno, INTERNAL)
    return StreamError(code, f"{path}: {exc.strerror or exc}")


class Credit:
    """Bytes a stream may still send; waiters resume when the host grants more."""

    def __init__(self, initial: int) -> None:
        self.available = initial
        self._granted = asyncio.Event()

    def grant(self, amount: int) -> None:
        self.available += amount
        self._granted.set()

    async def take(self, wanted: int) -> int:
        while self.available <= 0:
            self._granted.clear()
            await self._granted.wait()
        amount = min(wanted, self.available)
        self.available -= amount
        return amount


async def wait_readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def read_fd(fd: int, size: int) -> bytes:
    """Reads once from a non-blocking fd; b'' at end of file (EIO from a pty master counts as EOF)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b""
            raise
        ready = loop.create_future()
        loop.add_reader(fd, ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_reader(fd)


async def write_fd(fd: int, data: bytes) -> None:
    await writev_fd(fd, [data])


async def writev_fd(fd: int, buffers: list[bytes]) -> None:
    loop = asyncio.get_running_loop()
    views = [memoryview(b) for b in buffers if b]
    while views:
        try:
            written = os.writev(fd, views[:512])
            while written and views:
                if written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][written:]
                    written = 0
            continue
        except BlockingIOError:
            pass
        ready = loop.create_future()
        loop.add_writer(fd, ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_writer(fd)


# Host simulation (`--root DIR`, the fake VMM of tests): guest paths live under DIR on the host.
PATH_ROOT = ""


def real(path: str) -> str:
    """The host path of guest path `path` (itself inside a guest)."""
    return PATH_ROOT + path if PATH_ROOT else path


def file_info(path: str) -> agent_pb2.FileInfo:
    st = os.lstat(path)
    kind = agent_pb2.FILE_KIND_UNSPECIFIED
    if stat_module.S_ISREG(st.st_mode):
        kind = agent_pb2.FILE_KIND_FILE
    elif stat_module.S_ISDIR(st.st_mode):
        kind = agent_pb2.FILE_KIND_DIRECTORY
    elif stat_module.S_ISLNK(st.st_mode):
        kind = agent_pb2.FILE_KIND_SYMLINK
    info = agent_pb2.FileInfo(
        path=path[len(PATH_ROOT) :] or "/" if PATH_ROOT else path,
        kind=kind,
        size=st.st_size,
        mode=stat_module.S_IMODE(st.st_mode),
        modify_time_ns=st.st_mtime_ns,
        uid=st.st_uid,
        gid=st.st_gid,
    )
    if kind == agent_pb2.FILE_KIND_SYMLINK:
        info.symlink_target = os.readlink(path)
    return info


def require_absolute(path: str) -> str:
    if not path.startswith("/"):
        raise StreamError(INVALID_ARGUMENT, f"path must be absolute, got {path!r}")
    if "\x00" in path:
        raise StreamError(INVALID_ARGUMENT, "path contains a NUL byte")
    return real(os.path.normpath(path))


class Process:
    """A process started for one exec stream."""

    def __init__(self, agent: Agent, stream_id: int, start: agent_pb2.ExecStart) -> None:
        self.agent = agent
        self.stream_id = stream_id
        self.start = start
        self.credit = Credit(agent.initial_window)
        self.popen: subprocess.Popen | None = None
        self.exit_status: asyncio.Future = asyncio.get_running_loop().create_future()
        self.timed_out = False
        self.stdin_fd: int | None = None
        self.pty_master: int | None = None
        self.stdin_queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        # Signals that arrived before the process existed: delivered right after it starts.
        self.early_signals: list[int] = []

    def _spawn(self) -> list[int]:
        start = self.start
        if not start.argv:
            raise StreamError(INVALID_ARGUMENT, "argv is empty")
        argv = ["/bin/sh", "-c", " ".join(start.argv)] if start.shell else list(start.argv)
        user = None
        if start.user and start.user not in ("root", "0"):
            try:
                user = pwd.getpwuid(int(start.user)) if start.user.isdigit() else pwd.getpwnam(start.user)
            except KeyError:
                raise StreamError(INVALID_ARGUMENT, f"no such user {start.user!r}") from None
        home = user.pw_dir if user else "/root"
        env = dict(DEFAULT_ENV, HOME=home, USER=user.pw_name if user else "root")
        if start.pty:
            env["TERM"] = "xterm-256color"
        env.update(start.env)
        cwd = real(start.cwd or home)
        if not os.path.isdir(cwd):
            if start.cwd:
                raise StreamError(NOT_FOUND, f"working directory {start.cwd} does not exist")
            cwd = real("/")
        if shutil.which(argv[0], path=env["PATH"]) is None and "/" not in argv[0]:
            raise StreamError(NOT_FOUND, f"{argv[0]}: command not found")

        def take_terminal() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        # Without a preexec function subprocess can use vfork, which under emulation is many times
        # cheaper than forking the agent: only the rare pty case pays for one.
        identity = {}
        if user:
            identity = {
                "user": user.pw_uid,
                "group": user.pw_gid,
                "extra_groups": os.getgrouplist(user.pw_name, user.pw_gid),
            }

        parent_fds: list[int] = []
        if start.pty:
            master, slave = pty.openpty()
            self._set_size(master, start.cols or 80, start.rows or 24)
            self.pty_master = master
            stdin = stdout = stderr = slave
        else:
            stdin = subprocess.PIPE if start.stdin else subprocess.DEVNULL
            stdout = stderr = subprocess.PIPE
        try:
            self.popen = subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                cwd=cwd,
                env=env,
                start_new_session=True,
                close_fds=True,
                preexec_fn=take_terminal if start.pty else None,
                **identity,
            )
        except FileNotFoundError:
            raise StreamError(NOT_FOUND, f"{argv[0]}: no such file") from None
        except PermissionError:
            raise StreamError(PERMISSION_DENIED, f"{argv[0]}: permission denied") from None
        finally:
            if start.pty:
                os.close(slave)
        self.agent.children[self.popen.pid] = self
        if start.pty:
            os.set_blocking(self.pty_master, False)
            self.stdin_fd = self.pty_master
            parent_fds.append(self.pty_master)
        else:
            for pipe in (self.popen.stdout, self.popen.stderr):
                os.set_blocking(pipe.fileno(), False)
                try:  # bigger pipes: fewer reads and frames for bulk output
                    fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, PIPE_BYTES)
                except OSError:
                    pass
                parent_fds.append(pipe.fileno())
            if self.popen.stdin:
                os.set_blocking(self.popen.stdin.fileno(), False)
                self.stdin_fd = self.popen.stdin.fileno()
        return parent_fds

    @staticmethod
    def _set_size(fd: int, cols: int, rows: int) -> None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    async def run(self) -> None:
        fds = self._spawn()
        self.agent.send(self.stream_id, exec_started=agent_pb2.ExecStarted(pid=self.popen.pid))
        for signum in self.early_signals:
            self.kill(signum)
        if self.start.timeout_ms:
            asyncio.get_running_loop().call_later(self.start.timeout_ms / 1000, self._on_timeout)
        channels = (
            [agent_pb2.OUTPUT_CHANNEL_STDOUT]
            if self.pty_master is not None
            else [agent_pb2.OUTPUT_CHANNEL_STDOUT, agent_pb2.OUTPUT_CHANNEL_STDERR]
        )
        pumps = [asyncio.create_task(self._pump(fd, channel)) for fd, channel in zip(fds, channels, strict=True)]
        if self.stdin_fd is not None:
            self.tasks.append(asyncio.create_task(self._feed_stdin()))
        status = await self.exit_status
        # Let the pipes drain, but not forever: a background child may keep them open.
        done, pending = await asyncio.wait(pumps, timeout=DRAIN_AFTER_EXIT_SECONDS)
        if pending and self.credit.available > 0:
            done, pending = await asyncio.wait(pending, timeout=DRAIN_AFTER_EXIT_SECONDS)
        for task in pending:
            task.cancel()
        for task in self.tasks:
            task.cancel()
        self._close_fds()
        exited = agent_pb2.ExecExited(timed_out=self.timed_out)
        if os.WIFSIGNALED(status):
            exited.signal = os.WTERMSIG(status)
        else:
            exited.exit_code = os.WEXITSTATUS(status)
        self.agent.send(self.stream_id, exec_exited=exited)

    async def _pump(self, fd: int, channel: int) -> None:
        while True:
            # Credit is taken only once data is waiting: a quiet stdout must not starve a busy stderr.
            await wait_readable(fd)
            allowed = await self.credit.take(OUTPUT_CHUNK)
            data = await read_fd(fd, allowed)
            if len(data) < allowed:
                self.credit.grant(allowed - len(data))
            if not data:
                return
            self.agent.send(self.stream_id, output=agent_pb2.Output(channel=channel, data=data))

    async def _feed_stdin(self) -> None:
        while True:
            data = await self.stdin_queue.get()
            if data is None:
                if self.pty_master is None:
                    os.close(self.stdin_fd)
                    self.popen.stdin = None
                else:
                    await write_fd(self.stdin_fd, b"\x04")  # ^D: end of input for the terminal
                self.stdin_fd = None
                return
            try:
                await write_fd(self.stdin_fd, data)
            except (BrokenPipeError, OSError):
                return

    def _close_fds(self) -> None:
        if self.pty_master is not None:
            try:
                os.close(self.pty_master)
            except OSError:
                pass
        if self.popen:
            for pipe in (self.popen.stdout, self.popen.stderr, self.popen.stdin):
                try:
                    if pipe:
                        pipe.close()
                except OSError:
                    pass

    def _on_timeout(self) -> None:
        if not self.exit_status.done():
            self.timed_out = True
            self.kill(signal.SIGKILL)

    def kill(self, signum: int) -> None:
        if self.popen and not self.exit_status.done():
            try:
                os.killpg(self.popen.pid, signum)
            except ProcessLookupError:
                pass

    def handle(self, frame: agent_pb2.Frame) -> None:
        body = frame.WhichOneof("body")
        if body == "stdin":
            if frame.stdin.data:
                self.stdin_queue.put_nowait(frame.stdin.data)
            if frame.stdin.eof:
                self.stdin_queue.put_nowait(None)
        elif body == "signal":
            if self.popen is None:
                self.early_signals.append(frame.signal.signal)
            elif not self.exit_status.done():
                try:
                    os.killpg(self.popen.pid, frame.signal.signal)
                except (ProcessLookupError, OSError):
                    pass
        elif body == "resize":
            if self.pty_master is not None:
                self._set_size(self.pty_master, frame.resize.cols or 80, frame.resize.rows or 24)
            else:  # not started yet: start at this size
                self.start.cols, self.start.rows = frame.resize.cols, frame.resize.rows
        elif body == "window_update":
            self.credit.grant(frame.window_update.increment)


class FileTransfer:
    """A streaming write into, or read out of, the guest's filesystem."""

    def __init__(self, agent: Agent, stream_id: int) -> None:
        self.agent = agent
        self.stream_id = stream_id
        self.credit = Credit(agent.initial_window)
        self.chunks: asyncio.Queue[agent_pb2.FileData] = asyncio.Queue()

    async def write(self, start: agent_pb2.FileWriteStart) -> None:
        path = require_absolute(start.path)
        parent = os.path.dirname(path)
        try:
            if start.make_parents:
                os.makedirs(parent, exist_ok=True)
            if os.path.isdir(path):
                raise StreamError(FAILED_PRECONDITION, f"{path} is a directory")
            if start.append:
                target, fd = path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, start.mode or 0o644)
            else:
                target = os.path.join(parent, f".{os.path.basename(path)}.mvm-{uuid.uuid4().hex[:8]}")
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise os_error(exc, path) from None
        digest = hashlib.sha256()
        try:
            while True:
                chunk = await self.chunks.get()
                if chunk.data:
                    view = memoryview(chunk.data)
                    while view:
                        view = view[os.write(fd, view) :]
                    digest.update(chunk.data)
                    self.agent.send(self.stream_id, window_update=agent_pb2.WindowUpdate(increment=len(chunk.data)))
                if chunk.eof:
                    break
            os.fchmod(fd, start.mode or 0o644)
            os.close(fd)
            fd = -1
            if target != path:
                os.rename(target, path)
        except OSError as exc:
            raise os_error(exc, path) from None
        finally:
            if fd >= 0:
                os.close(fd)
            if target != path and os.path.exists(target):
                os.unlink(target)
        self.agent.send(
            self.stream_id, file_write_done=agent_pb2.FileWriteDone(file=file_info(path), sha256=digest.hexdigest())
        )

    async def read(self, start: agent_pb2.FileReadStart) -> None:
        path = require_absolute(start.path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise os_error(exc, path) from None
        try:
            if stat_module.S_ISDIR(os.fstat(fd).st_mode):
                raise StreamError(FAILED_PRECONDITION, f"{path} is a directory")
            if start.offset:
                os.lseek(fd, start.offset, os.SEEK_SET)
            remaining = start.length or -1
            while remaining != 0:
                allowed = await self.credit.take(FILE_CHUNK if remaining < 0 else min(FILE_CHUNK, remaining))
                data = os.read(fd, allowed)
                if len(data) < allowed:
                    self.credit.grant(allowed - len(data))
                if not data:
                    break
                if remaining > 0:
                    remaining -= len(data)
                self.agent.send(self.stream_id, file_data=agent_pb2.FileData(data=data))
        except OSError as exc:
            raise os_error(exc, path) from None
        finally:
            os.close(fd)
        self.agent.send(self.stream_id, file_data=agent_pb2.FileData(eof=True))

    def handle(self, frame: agent_pb2.Frame) -> None:
        body = frame.WhichOneof("body")
        if body == "file_data":
            self.chunks.put_nowait(frame.file_data)
        elif body == "window_update":
            self.credit.grant(frame.window_update.increment)


def stat_path(request: agent_pb2.StatRequest) -> agent_pb2.FileResult:
    path = require_absolute(request.path)
    try:
        return agent_pb2.FileResult(entries=[file_info(path)])
    except OSError as exc:
        raise os_error(exc, path) from None


def list_dir(request: agent_pb2.ListDirRequest) -> agent_pb2.FileResult:
    path = require_absolute(request.path)
    try:
        names = sorted(os.listdir(path))
        entries = []
        for name in names:
            try:
                entries.append(file_info(os.path.join(path, name)))
            except FileNotFoundError:
                continue  # removed while listing
        return agent_pb2.FileResult(entries=entries)
    except OSError as exc:
        raise os_error(exc, path) from None


def make_dir(request: agent_pb2.MakeDirRequest) -> agent_pb2.FileResult:
    path = require_absolute(request.path)
    try:
        if request.parents:
            os.makedirs(path, mode=request.mode or 0o755, exist_ok=True)
        else:
            os.mkdir(path, request.mode or 0o755)
        return agent_pb2.FileResult(entries=[file_info(path)])
    except OSError as exc:
        raise os_error(exc, path) from None


def remove(request: agent_pb2.RemoveRequest) -> agent_pb2.FileResult:
    path = require_absolute(request.path)
    if path == real("/"):
        raise StreamError(INVALID_ARGUMENT, "refusing to remove /")
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            if request.recursive:
                shutil.rmtree(path)
            else:
                os.rmdir(path)
        else:
            os.unlink(path)
        return agent_pb2.FileResult()
    except OSError as exc:
        raise os_error(exc, path) from None


FILE_OPERATIONS = {"stat": stat_path, "list_dir": list_dir, "make_dir": make_dir, "remove": remove}


class Agent:
    def __init__(self, initial_window: int = INITIAL_WINDOW, is_init: bool = False, simulated: bool = False) -> None:
        self.initial_window = initial_window
        self.is_init = is_init
        # On a host standing in for a guest: identity and network changes are recorded, never applied.
        self.simulated = simulated
        self.simulated_hostname = "simulated-guest"
        # Simulated in a UTS namespace of its own (`unshare --uts`): it may set the host name it lives in.
        self.own_uts = False
        self.boot_id = uuid.uuid4().hex
        self.streams: dict[int, Process | FileTransfer] = {}
        self.tasks: dict[int, asyncio.Task] = {}
        self.children: dict[int, Process] = {}
        self._outgoing: asyncio.Queue[bytes] = asyncio.Queue()

    # --- sending ---------------------------------------------------------------------------------
    def send(self, stream_id: int, **body) -> None:
        header, payload = encode_parts(agent_pb2.Frame(stream_id=stream_id, **body))
        self._outgoing.put_nowait(header)
        self._outgoing.put_nowait(payload)

    def send_error(self, stream_id: int, code: int, message: str) -> None:
        self.send(stream_id, error=agent_pb2.Error(code=code, message=message[:4096]))

    # --- child processes (the agent may be PID 1: it reaps everything) ----------------------------
    def reap_children(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            process = self.children.pop(pid, None)
            if process is not None:
                process.popen.returncode = status  # tell subprocess not to wait for it again
                if not process.exit_status.done():
                    process.exit_status.set_result(status)

    # --- receiving -------------------------------------------------------------------------------
    def dispatch(self, body: bytes) -> None:
        try:
            frame = agent_pb2.Frame.FromString(body)
        except Exception as exc:
            self.send_error(0, INVALID_ARGUMENT, f"malformed frame: {exc}")
            return
        kind = frame.WhichOneof("body")
        stream_id = frame.stream_id
        if kind == "ping":
            total, available = system.meminfo_kib()
            self.send(
                0,
                pong=agent_pb2.Pong(
                    nonce=frame.ping.nonce,
                    uptime_seconds=system.uptime_seconds(),
                    mem_total_kib=total,
                    mem_available_kib=available,
                    boot_id=self.boot_id,
                    hostname=self.hostname,
                ),
            )
        elif kind == "set_identity":
            self._set_identity(frame.set_identity)
        elif kind == "shutdown":
            if self.is_init:
                system.power_off()
        elif (
            kind in ("exec_start", "file_write_start", "file_read_start", "configure_network")
            or kind in FILE_OPERATIONS
        ):
            if stream_id == 0 or stream_id in self.streams or stream_id in self.tasks:
                self.send_error(stream_id, INVALID_ARGUMENT, f"stream {stream_id} is already in use")
                return
            # Registered before the task runs: stdin or data frames right behind the start must find it.
            if kind == "exec_start":
                self.streams[stream_id] = Process(self, stream_id, frame.exec_start)
            elif kind in ("file_write_start", "file_read_start"):
                self.streams[stream_id] = FileTransfer(self, stream_id)
            self.tasks[stream_id] = asyncio.create_task(self._run_stream(stream_id, kind, frame))
        elif kind == "cancel":
            self.cancel_stream(stream_id)
        elif kind is None:
            self.send_error(stream_id, INVALID_ARGUMENT, "frame has no body")
        else:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.handle(frame)
            # Frames for unknown streams are stale (sent before a restore or reconnect): ignore them.

    async def _run_stream(self, stream_id: int, kind: str, frame: agent_pb2.Frame) -> None:
        try:
            if kind == "exec_start":
                await self.streams[stream_id].run()
            elif kind == "file_write_start":
                await self.streams[stream_id].write(frame.file_write_start)
            elif kind == "file_read_start":
                await self.streams[stream_id].read(frame.file_read_start)
            elif kind == "configure_network":
                request = frame.configure_network
                try:
                    interface = (
                        "simulated0"
                        if self.simulated
                        else await system.configure_network(
                            request.mac_address, request.address_cidr, request.gateway, list(request.dns_servers)
                        )
                    )
                except OSError as exc:
                    raise StreamError(FAILED_PRECONDITION, f"configure network: {exc.strerror or exc}") from None
                self.send(stream_id, network_configured=agent_pb2.NetworkConfigured(interface=interface))
            else:
                result = FILE_OPERATIONS[kind](getattr(frame, kind))
                self.send(stream_id, file_result=result)
        except StreamError as exc:
            self.send_error(stream_id, exc.code, str(exc))
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            self.send_error(stream_id, INTERNAL, f"{exc.__class__.__name__}: {exc}")
        finally:
            stream = self.streams.pop(stream_id, None)
            if isinstance(stream, Process):
                stream.kill(signal.SIGKILL)
                stream._close_fds()
            self.tasks.pop(stream_id, None)

    def cancel_stream(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if isinstance(stream, Process):
            stream.kill(signal.SIGKILL)  # run() then reports the exit as usual
        else:
            task = self.tasks.get(stream_id)
            if task:
                task.cancel()

    def cancel_all(self) -> None:
        for stream_id in list(self.tasks):
            stream = self.streams.get(stream_id)
            if isinstance(stream, Process):
                stream.kill(signal.SIGKILL)
            task = self.tasks.get(stream_id)
            if task:
                task.cancel()

    @property
    def hostname(self) -> str:
        return self.simulated_hostname if self.simulated else os.uname().nodename

    def _set_identity(self, identity: agent_pb2.SetIdentity) -> None:
        if self.simulated:
            self.simulated_hostname = identity.hostname or self.simulated_hostname
            if self.own_uts:  # its own UTS namespace: the processes it starts see the name too
                socket.sethostname(self.simulated_hostname)
            return
        try:
            if identity.hostname:
                system.set_hostname(identity.hostname)
            if identity.entropy:
                system.add_entropy(identity.entropy)
        except OSError as exc:
            self.send_error(0, INTERNAL, f"set identity: {exc}")

    # --- the channel -----------------------------------------------------------------------------
    async def serve(self, transport) -> None:
        """Runs the protocol over `transport` until it closes; streams of that connection are cancelled."""
        decoder = FrameDecoder()
        writer = asyncio.create_task(self._write_loop(transport))
        self.send(
            0,
            hello=agent_pb2.Hello(
                protocol_version=PROTOCOL_VERSION,
                boot_id=self.boot_id,
                hostname=self.hostname,
                initial_window=self.initial_window,
            ),
        )
        try:
            while True:
                data = await transport.read(MAX_FRAME_BYTES)
                if not data:
                    return
                try:
                    bodies = decoder.feed(data)
                except FrameTooLarge as exc:
                    self.send_error(0, INVALID_ARGUMENT, str(exc))
                    continue
                for body in bodies:
                    self.dispatch(body)
        finally:
            writer.cancel()
            self.cancel_all()
            while not self._outgoing.empty():
                self._outgoing.get_nowait()

    async def _write_loop(self, transport) -> None:
        while True:
            buffers = [await self._outgoing.get()]
            size = len(buffers[0])
            # Hand over what is queued in one call (bounded, to keep latency low), without copying.
            while not self._outgoing.empty() and size < (4 << 20):
                buffers.append(self._outgoing.get_nowait())
                size += len(buffers[-1])
            await transport.write_buffers(buffers)
