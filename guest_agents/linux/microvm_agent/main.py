"""Entry point of the agent.

In a guest it runs as PID 1 (the initramfs switch_roots into it): it mounts proc/sys/dev/tmp, sets the
hostname from the `mvm.hostname=` kernel argument, reaps every zombie, then serves the host over the
virtio-serial port named `microvm.agent`, surviving host disconnects for as long as the guest runs.

`--unix PATH` serves a unix socket instead, to run the same engine on a host in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys

from microvm_agent import files as agent_files
from microvm_agent import system, workload
from microvm_agent.agent import Agent
from microvm_agent.host_link import HostLink
from microvm_agent.spawning import seal_descriptors
from microvm_agent.streams import read_waiting, unwritten, writev_fd

PORT_NAME = "microvm.agent"
VSOCK_PORT = 1024


def find_port(name: str = PORT_NAME) -> str | None:
    base = "/sys/class/virtio-ports"
    try:
        for entry in os.listdir(base):
            try:
                with open(f"{base}/{entry}/name") as f:
                    if f.read().strip() == name:
                        return f"/dev/{entry}"
            except OSError:
                continue
    except OSError:
        return None
    return None


class PortTransport:
    """The virtio-serial port. read() returns b'' while no host is connected, so wait for one.

    The port stays registered with the loop while a reader waits on it, instead of registering and unregistering
    around every wait: each is a system call, and under emulation one costs tens of µs, on every frame the host sends.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._waiter: asyncio.Future | None = None
        self._watched = False

    def _readable(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        else:  # nobody reads now (the port is level-triggered: a hang-up would wake the loop on every turn)
            self.unwatch()

    def unwatch(self) -> None:
        if self._watched:
            asyncio.get_running_loop().remove_reader(self.fd)
            self._watched = False

    async def read(self, size: int) -> bytes:
        # A port read returns one of the guest driver's small buffers (a page): take every one waiting at once, so a
        # 1 MiB frame costs a few wakeups of the loop, not hundreds.
        while True:
            data = read_waiting(self.fd, size)
            if data is not None:
                return data
            if not self._watched:
                asyncio.get_running_loop().add_reader(self.fd, self._readable)
                self._watched = True
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def write_buffers(self, buffers: list[bytes]) -> None:
        await writev_fd(self.fd, buffers)

    def write_now(self, buffers) -> list:
        """Writes what the port takes without waiting; returns the rest (the writer's to finish, or to fail on)."""
        try:
            written = os.writev(self.fd, buffers)
        except OSError:
            return list(buffers)
        return unwritten(buffers, written)


async def serve_port(agent: Agent, path: str) -> None:
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    transport = PortTransport(fd)
    host = HostLink(fd)
    while True:
        await host.until_connected()  # the port reports hang-up until the host side connects
        try:
            await agent.serve(transport)
        finally:
            transport.unwatch()
        await asyncio.sleep(0.02)  # a host gone whose hang-up the port does not show yet: no spin meanwhile


class SocketTransport:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self, size: int) -> bytes:
        return await self.reader.read(size)

    async def write_buffers(self, buffers: list[bytes]) -> None:
        self.writer.writelines(buffers)
        await self.writer.drain()

    def write_now(self, buffers) -> list:
        """Hands the frame to the socket unless it is closing or still holds unsent data (then the writer's)."""
        transport = self.writer.transport
        if transport.is_closing() or transport.get_write_buffer_size():
            return list(buffers)
        self.writer.writelines(buffers)
        return []


async def serve_unix(agent: Agent, path: str) -> None:
    async def connected(reader, writer):
        try:
            await agent.serve(SocketTransport(reader, writer))
        finally:
            writer.close()

    server = await asyncio.start_unix_server(connected, path)
    async with server:
        await server.serve_forever()


async def serve_vsock(agent: Agent, port: int) -> None:
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, port))

    async def connected(reader, writer):
        try:
            await agent.serve(SocketTransport(reader, writer))
        finally:
            writer.close()

    server = await asyncio.start_server(connected, sock=listener)
    async with server:
        await server.serve_forever()


async def run(args) -> None:
    loop = asyncio.get_running_loop()
    is_init = os.getpid() == 1
    agent = Agent(is_init=is_init, simulated=bool(args.root))
    if args.root:
        agent_files.PATH_ROOT = os.path.realpath(args.root)
        # Where the guest's agent works (main), so a stand-in spawns its default commands the same way.
        home = agent_files.real("/root")
        if os.path.isdir(home):
            os.chdir(home)
        agent.simulated_hostname = args.hostname or agent.simulated_hostname
        agent.own_uts = args.own_uts
        if args.own_uts:
            socket.sethostname(agent.simulated_hostname)
    seal_descriptors()  # before the first spawn: nothing the agent inherited reaches what it starts
    loop.add_signal_handler(signal.SIGCHLD, agent.reap_children)
    if is_init or args.root:
        # The guest's PID 1 (or its stand-in) survives whatever a process in the guest sends it (`kill -INT 1`):
        # handled signals reach PID 1, and these handlers do nothing. Handlers, not SIG_IGN, so the processes it
        # starts get the default dispositions back at exec.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
            loop.add_signal_handler(signum, lambda: None)
    if args.unix:
        await serve_unix(agent, args.unix)
        return
    path = None
    for _ in range(100):
        path = find_port()
        if path:
            break
        await asyncio.sleep(0.01)
    if path:
        await serve_port(agent, path)
        return
    # No virtio-serial port: a VMM with virtio-vsock (Cloud Hypervisor, hybrid mode on the host side).
    try:
        await serve_vsock(agent, VSOCK_PORT)
    except OSError as exc:
        print(f"microvm-agent: no virtio port named {PORT_NAME} and no vsock: {exc}", file=sys.stderr, flush=True)
        if is_init:
            system.power_off()


def main() -> None:
    parser = argparse.ArgumentParser(prog="microvm-agent")
    parser.add_argument("--unix", help="serve on this unix socket instead of the virtio port")
    parser.add_argument(
        "--root",
        help="stand in for a guest on a host (tests): guest paths live under ROOT, "
        "host name and network changes are only recorded",
    )
    parser.add_argument("--hostname", help="with --root: the simulated guest's host name")
    parser.add_argument(
        "--own-uts",
        action="store_true",
        help="with --root: runs in a UTS namespace of its own, so the host name is really set there",
    )
    args = parser.parse_args()
    if os.getpid() == 1:
        system.setup_filesystems()
        args_by_name = system.kernel_args()
        system.set_hostname(args_by_name.get("mvm.hostname", "sandbox"))
        max_pids = args_by_name.get("mvm.max_pids", "")
        workload.current.setup(int(max_pids) if max_pids.isdigit() else workload.default_max_pids())
        system.bring_up_loopback()
        system.prefetch_image_libc()
        os.chdir("/root" if os.path.isdir("/root") else "/")
        print("microvm-agent: ready", flush=True)
    try:
        asyncio.run(run(args))
    except BaseException as exc:
        print(f"microvm-agent: fatal: {exc!r}", file=sys.stderr, flush=True)
        if os.getpid() == 1:
            system.power_off()
        raise


if __name__ == "__main__":
    main()
